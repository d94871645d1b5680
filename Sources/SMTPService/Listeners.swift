// Where smtp-listen accepts connections: sockets handed over by the process
// that started it (the systemd socket-activation convention, which the
// supervisor follows too), or the addresses of [smtp] in the configuration,
// bound by smtp-listen itself before it drops privileges.
//
// Socket activation (sd_listen_fds(3)): LISTEN_PID is our pid, LISTEN_FDS
// the number of listening sockets, which are descriptors 3, 4, ...;
// LISTEN_FDNAMES (optional) names them, colon-separated: "smtp",
// "submission" or "smtps". A socket without a name (or named "unknown", the
// systemd default) is an SMTP listener. The variables are removed from the
// environment once read, so that no child inherits them.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The service a listening socket offers.
public enum ListenerKind: String, Sendable, Hashable, CaseIterable {
    /// Port 25: mail from other MTAs, relay control.
    case smtp
    /// Port 587 (RFC 6409): message submission, authentication required.
    case submission
    /// Port 465 (RFC 8314): submission over implicit TLS.
    case smtps
}

/// "host:port", "[ipv6]:port".
public struct ListenAddress: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses the configuration's syntax (already validated by
    /// SealpostConfig; port 0, "any free port", is allowed here for tests).
    public init?(_ text: String) {
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            hostPart = text[text.index(after: text.startIndex)..<close]
            let after = text[text.index(after: close)...]
            guard after.first == ":" else { return nil }
            portPart = after.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
            if hostPart.contains(":") { return nil }
        }
        guard !hostPart.isEmpty, (1...5).contains(portPart.count), portPart.allSatisfy({ $0.isASCII && $0.isNumber }),
              let port = Int(portPart), (0...65535).contains(port) else { return nil }
        self.host = String(hostPart)
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// One listening socket to open or adopt.
public struct ListenerSpec: Sendable, Hashable, CustomStringConvertible {
    public enum Source: Sendable, Hashable {
        case bind(ListenAddress)
        /// An inherited, already bound and listening descriptor.
        case inherited(fd: Int32)
    }
    public var kind: ListenerKind
    public var source: Source

    public init(kind: ListenerKind, source: Source) {
        self.kind = kind
        self.source = source
    }

    public var description: String {
        switch source {
        case .bind(let a): return "\(kind.rawValue) on \(a)"
        case .inherited(let fd): return "\(kind.rawValue) on inherited descriptor \(fd)"
        }
    }
}

public enum SocketActivation {
    public static let firstDescriptor: Int32 = 3

    /// The inherited listeners described by `environment`, or nil when the
    /// process was not socket-activated (no LISTEN_FDS, or LISTEN_PID names
    /// another process). Throws for malformed variables.
    public static func listeners(environment: [String: String], pid: Int32) throws(ListenerError) -> [ListenerSpec]? {
        guard let countText = environment["LISTEN_FDS"] else { return nil }
        if let pidText = environment["LISTEN_PID"] {
            guard let owner = Int32(pidText) else { throw ListenerError("LISTEN_PID is not a number: \"\(pidText)\"") }
            guard owner == pid else { return nil }
        }
        guard let count = Int(countText), (0...64).contains(count) else {
            throw ListenerError("LISTEN_FDS is not a number from 0 to 64: \"\(countText)\"")
        }
        var names: [String] = []
        if let namesText = environment["LISTEN_FDNAMES"] {
            names = namesText.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard names.count == count else {
                throw ListenerError("LISTEN_FDNAMES names \(names.count) descriptors, LISTEN_FDS says \(count)")
            }
        }
        var specs: [ListenerSpec] = []
        for i in 0..<count {
            let name = i < names.count ? names[i] : "smtp"
            let kind: ListenerKind
            switch name {
            case "", "unknown", "smtp", "listen": kind = .smtp
            case "submission": kind = .submission
            case "smtps": kind = .smtps
            default: throw ListenerError("LISTEN_FDNAMES: unknown service \"\(name)\" (expected smtp, submission or smtps)")
            }
            specs.append(ListenerSpec(kind: kind, source: .inherited(fd: firstDescriptor + Int32(i))))
        }
        return specs
    }

    /// Reads and removes LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from the
    /// process environment; the inherited descriptors are marked
    /// close-on-exec.
    public static func takeFromEnvironment() throws(ListenerError) -> [ListenerSpec]? {
        var environment: [String: String] = [:]
        for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            if let value = getenv(key) { environment[key] = String(cString: value) }
            unsetenv(key)
        }
        let specs = try listeners(environment: environment, pid: getpid())
        for spec in specs ?? [] {
            if case .inherited(let fd) = spec.source {
                guard fcntl(fd, F_SETFD, FD_CLOEXEC) == 0 else {
                    throw ListenerError("inherited descriptor \(fd): \(String(cString: strerror(errno)))")
                }
            }
        }
        return specs
    }
}

/// The listeners of the configuration's [smtp] section.
public func configuredListeners(listen: [String], submission: [String], smtps: [String]) throws(ListenerError) -> [ListenerSpec] {
    var specs: [ListenerSpec] = []
    for (kind, addresses) in [(ListenerKind.smtp, listen), (.submission, submission), (.smtps, smtps)] {
        for text in addresses {
            guard let address = ListenAddress(text) else { throw ListenerError("smtp: not host:port: \"\(text)\"") }
            specs.append(ListenerSpec(kind: kind, source: .bind(address)))
        }
    }
    return specs
}

public struct ListenerError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
