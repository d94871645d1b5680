/// Lookups against the real test bed (nsd + validating unbound, see
/// Tests/testbed/dns): typed answers with their DNSSEC status, bogus and
/// insecure cases, NXDOMAIN, CNAMEs, deadlines.
import DNSTestbed
import Testing
import DNS
#if canImport(Glibc)
import Glibc
#endif

@Suite(.enabled(if: DNSTestbed.available, Comment(rawValue: DNSTestbed.unavailableReason)))
struct ResolverTests {
    /// Both ways to reach the test zones: through the validating unbound
    /// (forwarder), and straight to nsd (stub zones); libunbound validates
    /// in both.
    enum Path: String, CaseIterable, Sendable { case forwarder, stub }

    func resolver(_ path: Path) throws -> Resolver {
        switch path {
        case .forwarder: return try DNSTestbed.resolver()
        case .stub: return try DNSTestbed.stubResolver()
        }
    }

    @Test(arguments: Path.allCases) func secureMX(_ path: Path) throws {
        let answer = try resolver(path).resolve("dane.test", .mx)
        #expect(answer.status == .secure)
        #expect(answer.rcode == .noError)
        #expect(answer.haveData)
        #expect(!answer.nxDomain)
        let records = try answer.mxRecords().sorted { $0.preference < $1.preference }
        #expect(records.map(\.description) == ["10 mx1.dane.test", "20 mx2.dane.test"])
    }

    @Test(arguments: Path.allCases) func secureAddresses(_ path: Path) throws {
        let r = try resolver(path)
        let a = try r.resolve("dual.dane.test", .a)
        #expect(a.status == .secure)
        #expect(try a.ipv4Addresses().map(\.description) == ["127.0.0.27"])
        let aaaa = try r.resolve("dual.dane.test", .aaaa)
        #expect(aaaa.status == .secure)
        #expect(try aaaa.ipv6Addresses().map(\.description) == ["2001:db8::27"])
    }

    @Test(arguments: Path.allCases) func secureTLSA(_ path: Path) throws {
        let bed = try DNSTestbed.running()
        let expected = try String(contentsOfFile: bed.directory + "/ee.spki-sha256", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let answer = try resolver(path).resolve("_25._tcp.mx1.dane.test", .tlsa)
        #expect(answer.status == .secure)
        let records = try answer.tlsaRecords()
        #expect(records.count == 1)
        #expect(records.first?.usage == 3)
        #expect(records.first?.selector == 1)
        #expect(records.first?.matchingType == 1)
        #expect(records.first?.dataHex == expected)
    }

    @Test(arguments: Path.allCases) func secureTXTJoinsStrings(_ path: Path) throws {
        let answer = try resolver(path).resolve("_mta-sts.dane.test", .txt)
        #expect(answer.status == .secure)
        let records = try answer.txtRecords()
        #expect(records.count == 1)
        #expect(records.first?.strings.count == 2)
        #expect(records.first?.text == "v=STSv1; id=20240501T000000;")
    }

    @Test(arguments: Path.allCases) func bogusTLSA(_ path: Path) throws {
        let answer = try resolver(path).resolve("_25._tcp.mxbogus.dane.test", .tlsa)
        guard case .bogus(let reason) = answer.status else {
            Issue.record("expected bogus, got \(answer.status)")
            return
        }
        #expect(!reason.isEmpty)
        #expect(throws: DNSError.self) { try answer.tlsaRecords() }
    }

    @Test(arguments: Path.allCases) func insecureZone(_ path: Path) throws {
        let r = try resolver(path)
        let answer = try r.resolve("insecure.test", .mx)
        #expect(answer.status == .insecure)
        #expect(try answer.mxRecords().map(\.description) == ["10 mx.insecure.test"])
        let tlsa = try r.resolve("_25._tcp.mx.insecure.test", .tlsa)
        #expect(tlsa.status == .insecure)
        #expect(try tlsa.tlsaRecords().count == 1)
    }

    @Test(arguments: Path.allCases) func secureNXDomain(_ path: Path) throws {
        let answer = try resolver(path).resolve("no-such-host.dane.test", .a)
        #expect(answer.rcode == .nxDomain)
        #expect(answer.nxDomain)
        #expect(!answer.haveData)
        #expect(answer.status == .secure)
        #expect(try answer.ipv4Addresses().isEmpty)
    }

    @Test func noData() throws {
        let answer = try DNSTestbed.resolver().resolve("mx1.dane.test", .mx)
        #expect(answer.isNoData)
        #expect(answer.status == .secure)
    }

    @Test(arguments: Path.allCases) func cnameIsFollowed(_ path: Path) throws {
        let answer = try resolver(path).resolve("alias.dane.test", .a)
        #expect(answer.status == .secure)
        #expect(answer.followedCNAME)
        #expect(answer.canonicalName == "mx1.dane.test")
        #expect(try answer.ipv4Addresses().map(\.description) == ["127.0.0.21"])
    }

    @Test func withoutTrustAnchorEverythingIsInsecure() throws {
        let bed = try DNSTestbed.running()
        let r = try Resolver(ResolverConfiguration(forwarders: [bed.resolver],
                                                   rootTrustAnchorFile: "/nonexistent/root.key",
                                                   resolveReservedZones: ["test"]))
        #expect(!r.validating)
        let answer = try r.resolve("dane.test", .mx)
        #expect(answer.status == .insecure)
    }

    @Test func callbackAPIFromAnEventLoop() throws {
        // Several queries at once, pumped the way an event loop would:
        // poll on the descriptor, processEvents, expireDeadlines.
        let r = try DNSTestbed.resolver()
        let results = Results()
        let names = ["mx1.dane.test", "mx2.dane.test", "mxbad.dane.test", "mxbogus.dane.test"]
        for name in names {
            try r.query(name, .a) { results.add(name, $0) }
        }
        let cancelled = try r.query("mta-sts.dane.test", .a) { _ in results.add("cancelled", .failure(.configuration("called"))) }
        r.cancel(cancelled)
        while r.pendingCount > 0 {
            var pfd = pollfd(fd: r.fileDescriptor, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, 100) > 0 { r.processEvents() } else { r.expireDeadlines() }
        }
        let all = results.all
        #expect(all.count == names.count)
        #expect(all["cancelled"] == nil)
        #expect(try all["mx2.dane.test"]?.get().ipv4Addresses().map(\.description) == ["127.0.0.22"])
        #expect(try all["mxbogus.dane.test"]?.get().status == .secure)   // only its TLSA is bogus
    }

    @Test func deadlineCancelsAnUnansweredQuery() throws {
        // A "forwarder" that takes queries (UDP and TCP) and never answers.
        let silent = try SilentServer()
        defer { silent.close() }
        let r = try Resolver(ResolverConfiguration(forwarders: ["127.0.0.1@\(silent.port)"],
                                                   rootTrustAnchorFile: "/nonexistent/root.key",
                                                   resolveReservedZones: ["test"],
                                                   timeout: .milliseconds(300)))
        #expect(throws: DNSError.timeout(name: "dane.test", type: .mx)) {
            try r.resolve("dane.test", .mx)
        }
        let resolution = r.resolveMailExchangers("dane.test", timeout: .milliseconds(300))
        guard case .failure(let failure) = resolution else {
            Issue.record("expected a failure, got \(resolution)")
            return
        }
        #expect(failure.temporary)
        #expect(failure.enhancedStatusCode == "4.4.3")
        #expect(r.pendingCount == 0)
    }

    @Test func badConfigurationIsRefused() {
        #expect(throws: DNSError.self) { try Resolver(ResolverConfiguration(forwarders: ["mx.example"])) }
        #expect(throws: DNSError.self) { try Resolver(ResolverConfiguration(forwarders: ["127.0.0.1@99999"])) }
        // inet_pton would read "127.0.0.1" (a loopback forwarder) and stop at the NUL.
        #expect(throws: DNSError.configuration("forwarder \"127.0.0.1\\0.example\": not an IP address")) {
            try Resolver(ResolverConfiguration(forwarders: ["127.0.0.1\u{0}.example"]))
        }
        #expect(throws: DNSError.self) {
            try Resolver(ResolverConfiguration(trustAnchorFiles: ["/nonexistent/anchor.key"]))
        }
    }

    /// The files are read when the Resolver is made: a stage may then drop
    /// privileges or chroot, and lookups still validate.
    @Test func anchorsAreLoadedAtConfiguration() throws {
        let bed = try DNSTestbed.running()
        let copy = bed.directory + "/anchor-copy-\(UInt32.random(in: 0...UInt32.max)).key"
        let text = try String(contentsOfFile: bed.trustAnchor, encoding: .utf8)
        try text.write(toFile: copy, atomically: false, encoding: .utf8)
        let r = try Resolver(ResolverConfiguration(forwarders: [bed.resolver], trustAnchorFiles: [copy],
                                                   insecureDomains: ["insecure.test"], resolveReservedZones: ["test"],
                                                   timeout: .seconds(5)))
        #expect(unlink(copy) == 0)
        #expect(access(copy, F_OK) != 0)
        let answer = try r.resolve("dane.test", .mx)
        #expect(answer.status == .secure)
        let bogus = try r.resolve("_25._tcp.mxbogus.dane.test", .tlsa)
        #expect(bogus.status.isBogus)
    }

    @Test func missingAnchorIsATypedError() throws {
        let path = "/nonexistent-\(getpid())/anchor.key"
        #expect(throws: DNSError.unreadableFile(path: path, reason: "No such file or directory")) {
            try Resolver(ResolverConfiguration(trustAnchorFiles: [path]))
        }
        #expect(throws: DNSError.unreadableFile(path: "/", reason: "not a regular file")) {
            try Resolver(ResolverConfiguration(trustAnchorFiles: ["/"]))
        }
    }

    /// A file that is readable but holds no trust anchor fails when the
    /// Resolver is made, not at the first lookup.
    @Test func garbageAnchorFailsAtConfiguration() throws {
        let bed = try DNSTestbed.running()
        let path = bed.directory + "/garbage-\(UInt32.random(in: 0...UInt32.max)).key"
        try "this is not a DS record\n".write(toFile: path, atomically: false, encoding: .utf8)
        defer { unlink(path) }
        do {
            _ = try Resolver(ResolverConfiguration(forwarders: [bed.resolver], trustAnchorFiles: [path]))
            Issue.record("a garbage trust anchor was accepted")
        } catch {
            guard case .configuration(let text) = error else {
                Issue.record("unexpected error \(error)")
                return
            }
            #expect(text.contains(path))
        }
    }

    @Test func invalidNameFailsAtOnce() throws {
        let r = try DNSTestbed.resolver()
        #expect(throws: DNSError.self) { try r.resolve("bad name.dane.test", .a) }
        #expect(r.pendingCount == 0)
    }
}

final class Results: @unchecked Sendable {
    private var values: [String: Result<DNSAnswer, DNSError>] = [:]
    private let lock = NSLockLike()
    func add(_ name: String, _ result: Result<DNSAnswer, DNSError>) { lock.locked { values[name] = result } }
    var all: [String: Result<DNSAnswer, DNSError>] { lock.locked { values } }
}

final class NSLockLike: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return body()
    }
}

/// UDP and TCP sockets on one loopback port that accept queries and never
/// answer (the TCP listener is never accept()ed).
struct SilentServer {
    let udp: Int32
    let tcp: Int32
    let port: UInt16

    struct Failed: Error {}

    init() throws {
        for _ in 0..<20 {
            let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = 0
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                    bind(udp, pointer, length) == 0 && getsockname(udp, pointer, &length) == 0
                }
            }
            guard bound else { Glibc.close(udp); continue }
            let tcp = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            let listening = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                    bind(tcp, pointer, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
                }
            } && listen(tcp, 16) == 0
            guard listening else { Glibc.close(udp); Glibc.close(tcp); continue }
            self.udp = udp
            self.tcp = tcp
            self.port = UInt16(bigEndian: address.sin_port)
            return
        }
        throw Failed()
    }

    func close() {
        Glibc.close(udp)
        Glibc.close(tcp)
    }
}
