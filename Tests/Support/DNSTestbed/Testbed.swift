// The DNS test bed (Tests/testbed/dns), a library target of its own shared by
// DNSTests and RemoteDeliveryTests: nsd serving the signed dane.test and
// the unsigned insecure.test, unbound validating in front of it. Started once
// per test process, on first use; stopped at exit, and by the test bed's
// watchdog if this process dies without running exit handlers.
import Foundation
import DNS

public enum DNSTestbed {
    public struct Running: Sendable {
        public var directory: String
        public var resolver: String          // "127.0.0.11@PORT"
        public var authority: String         // "127.0.0.10@PORT"
        public var trustAnchor: String
    }

    public static let scripts: String = {
        // #filePath: .../Tests/Support/DNSTestbed/Testbed.swift
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("testbed/dns").path
    }()

    /// The daemons and tools the test bed needs; tests are disabled without them.
    public static let available: Bool = {
        ["nsd", "unbound", "ldns-signzone", "ldns-keygen", "dig", "openssl"].allSatisfy { tool in
            ["/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/"].contains {
                FileManager.default.isExecutableFile(atPath: $0 + tool)
            }
        }
    }()
    /// For `.enabled(if: DNSTestbed.available, Comment(rawValue: Comment(rawValue: DNSTestbed.unavailableReason)))`.
    public static let unavailableReason =
        "DNS test bed skipped: nsd, unbound, ldnsutils, bind9-dnsutils or openssl not installed"

    nonisolated(unsafe) private static var startedDirectory: String?

    public static let shared: Result<Running, TestbedError> = start()

    public struct TestbedError: Error, CustomStringConvertible { public var description: String }

    public static func running() throws -> Running { try shared.get() }

    private static func start() -> Result<Running, TestbedError> {
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("sealpost-dns-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        mkdir(directory, 0o700)
        startedDirectory = directory
        atexit {
            guard let directory = DNSTestbed.startedDirectory else { return }
            _ = DNSTestbed.run(DNSTestbed.scripts + "/stop.sh", [directory], output: directory + "/stop.out")
            try? FileManager.default.removeItem(atPath: directory)
        }
        setenv("DNS_TESTBED_WATCH_PID", String(getpid()), 1)
        let status = run(scripts + "/start.sh", [directory], output: directory + "/start.out")
        let output = (try? String(contentsOfFile: directory + "/start.out", encoding: .utf8)) ?? ""
        let errors = (try? String(contentsOfFile: directory + "/start.out.err", encoding: .utf8)) ?? ""
        guard status == 0 else {
            return .failure(TestbedError(description: "start.sh failed (\(status)): " + errors))
        }
        let resolver = output.trimmingCharacters(in: .whitespacesAndNewlines)
        var env: [String: String] = [:]
        let envText = (try? String(contentsOfFile: directory + "/env", encoding: .utf8)) ?? ""
        for line in envText.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { env[String(parts[0])] = String(parts[1]) }
        }
        return .success(Running(directory: directory, resolver: resolver,
                                authority: env["DNS_AUTHORITY"] ?? "",
                                trustAnchor: env["DNS_TRUST_ANCHOR"] ?? directory + "/trust-anchor.key"))
    }

    /// Runs a script with posix_spawn (Foundation's Process can hang in
    /// waitUntilExit here), stdout to `output`, stderr to `output`.err.
    /// Returns the exit status, or -1.
    public static func run(_ path: String, _ arguments: [String], output: String) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, output + ".err", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, path, &actions, nil, argv, environ) == 0 else { return -1 }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { return -1 }
        }
        // WIFEXITED / WEXITSTATUS do not import: decode by hand.
        return status & 0x7f == 0 ? (status >> 8) & 0xff : -1
    }

    /// libunbound forwarding to the test bed's validating unbound, with the
    /// dane.test trust anchor loaded so that it validates itself.
    public static func resolver(timeout: Duration = .seconds(5)) throws -> Resolver {
        let bed = try running()
        return try Resolver(ResolverConfiguration(
            forwarders: [bed.resolver],
            trustAnchorFiles: [bed.trustAnchor],
            insecureDomains: ["insecure.test"],
            resolveReservedZones: ["test"],
            timeout: timeout))
    }

    /// libunbound talking to nsd directly (stub zones), validating itself.
    public static func stubResolver(timeout: Duration = .seconds(5)) throws -> Resolver {
        let bed = try running()
        return try Resolver(ResolverConfiguration(
            // Everything outside the stub zones goes to nsd too (refused):
            // no query may leave loopback.
            forwarders: [bed.authority],
            stubZones: [StubZone(zone: "dane.test", addresses: [bed.authority]),
                        StubZone(zone: "insecure.test", addresses: [bed.authority])],
            trustAnchorFiles: [bed.trustAnchor],
            insecureDomains: ["insecure.test"],
            resolveReservedZones: ["test"],
            timeout: timeout))
    }
}
