// Where smtp-listen accepts connections: sockets handed over by the process
// that started it (the systemd socket-activation convention, which the
// supervisor follows too), or the addresses of [smtp] in the configuration,
// bound by smtp-listen itself before it drops privileges.
//
// Socket activation (sd_listen_fds(3)): when LISTEN_PID is our pid,
// LISTEN_FDS=n says that descriptors 3 .. 3+n-1 are listening sockets, and
// LISTEN_FDNAMES (colon-separated, optional) names them. As systemd's
// library does, the variables are ignored when LISTEN_PID is missing or
// names another process, and removed from the environment once read, so
// that no child inherits them.
//
// Every descriptor must match one configured listener, and every configured
// listener must get one descriptor (else smtp-listen stops, exit 78): a
// socket unit and the configuration that disagree are a mistake to report,
// not to paper over. A descriptor's name (ListenerDefinition.socketName in
// StageRuntime) says which:
//   "smtp-25", "submission-587", "smtps-465"   kind and port (what the
//                                              supervisor passes)
//   "smtp", "submission", "smtps" ("listen")   the kind, any port
//   "unknown" or empty (systemd's default)     any kind
// and the address the socket is bound to (getsockname) must be the
// listener's: the same port, and the same address when the configuration
// gives a numeric one (a host name in the configuration matches any
// address). Among several listeners that fit, the first in the
// configuration's order not yet taken is used.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DNS
import NIOCore
import StageRuntime

/// The service a listening socket offers.
public enum ListenerKind: String, Sendable, Hashable, CaseIterable {
    /// Port 25: mail from other MTAs, relay control.
    case smtp
    /// Port 587 (RFC 6409): message submission, authentication required.
    case submission
    /// Port 465 (RFC 8314): submission over implicit TLS.
    case smtps
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

/// A descriptor passed by socket activation, before it is matched.
public struct InheritedDescriptor: Sendable, Hashable {
    public var fd: Int32
    /// Its LISTEN_FDNAMES entry ("" when none was given).
    public var name: String
    /// Where it is bound (getsockname), nil when unknown.
    public var address: ListenAddress?

    public init(fd: Int32, name: String, address: ListenAddress?) {
        self.fd = fd
        self.name = name
        self.address = address
    }
}

public enum SocketActivation {
    public static let firstDescriptor: Int32 = 3
    /// More than any sensible server listens on; a bound on what is read.
    public static let maximumDescriptors = 64

    /// The descriptors described by `environment` (names, no addresses
    /// yet), or nil when the process was not socket-activated: no
    /// LISTEN_FDS, or LISTEN_PID missing or naming another process.
    /// Throws for malformed variables.
    public static func descriptors(environment: [String: String], pid: Int32) throws(ListenerError) -> [InheritedDescriptor]? {
        guard let countText = environment["LISTEN_FDS"] else { return nil }
        guard let pidText = environment["LISTEN_PID"] else { return nil }
        guard let owner = Int32(pidText), owner > 0 else { throw ListenerError("LISTEN_PID is not a process id: \"\(pidText)\"") }
        guard owner == pid else { return nil }
        guard countText.allSatisfy({ $0.isASCII && $0.isNumber }), let count = Int(countText),
              (0...maximumDescriptors).contains(count) else {
            throw ListenerError("LISTEN_FDS is not a number from 0 to \(maximumDescriptors): \"\(countText)\"")
        }
        var names = [String](repeating: "", count: count)
        if let namesText = environment["LISTEN_FDNAMES"] {
            let given = namesText.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard given.count == count else {
                throw ListenerError("LISTEN_FDNAMES names \(given.count) descriptors, LISTEN_FDS says \(count)")
            }
            names = given
        }
        return names.enumerated().map { InheritedDescriptor(fd: firstDescriptor + Int32($0.offset), name: $0.element, address: nil) }
    }

    /// Pairs each inherited descriptor with the configured listener it
    /// serves (the rules are at the top of this file). `configured` holds
    /// `.bind` specs; the result holds one `.inherited` spec per configured
    /// listener, in the configured order. Throws, naming both sides, when
    /// a descriptor fits no listener or a listener got no descriptor.
    public static func match(_ inherited: [InheritedDescriptor], to configured: [ListenerSpec]) throws(ListenerError) -> [ListenerSpec] {
        var taken: [Int32?] = Array(repeating: nil, count: configured.count)
        func describe(_ d: InheritedDescriptor) -> String {
            let name = d.name.isEmpty ? "no name" : "name \"\(d.name)\""
            return "descriptor \(d.fd) (\(name), bound to \(d.address.map { "\($0)" } ?? "an unknown address"))"
        }
        func listing() -> String {
            configured.isEmpty ? "none" : configured.compactMap { spec -> String? in
                guard case .bind(let a) = spec.source else { return nil }
                return "\(ListenerDefinition.socketName(kind: spec.kind.rawValue, port: a.port)) (\(spec.kind.rawValue) on \(a))"
            }.joined(separator: ", ")
        }
        for descriptor in inherited {
            let wanted = try parseName(descriptor.name)
            var chosen: Int? = nil
            for (index, spec) in configured.enumerated() where taken[index] == nil {
                guard case .bind(let address) = spec.source else { continue }
                if let kind = wanted.kind, kind != spec.kind { continue }
                if let port = wanted.port, port != address.port { continue }
                if let bound = descriptor.address, !fits(bound, address) { continue }
                chosen = index
                break
            }
            guard let chosen else {
                throw ListenerError("LISTEN_FDS: \(describe(descriptor)) matches no listener of the configuration's [smtp] section (configured: \(listing()))")
            }
            taken[chosen] = descriptor.fd
        }
        var result: [ListenerSpec] = []
        for (index, spec) in configured.enumerated() {
            guard let fd = taken[index] else {
                let name: String
                if case .bind(let a) = spec.source { name = ListenerDefinition.socketName(kind: spec.kind.rawValue, port: a.port) } else { name = "?" }
                let passed = inherited.isEmpty ? "none" : inherited.map { $0.name.isEmpty ? "(unnamed)" : $0.name }.joined(separator: ":")
                throw ListenerError("LISTEN_FDS: no descriptor was passed for \(spec) (name \"\(name)\"; passed: \(passed))")
            }
            result.append(ListenerSpec(kind: spec.kind, source: .inherited(fd: fd)))
        }
        return result
    }

    /// A LISTEN_FDNAMES entry: which kind and port it asks for (nil: any).
    static func parseName(_ name: String) throws(ListenerError) -> (kind: ListenerKind?, port: Int?) {
        switch name {
        case "", "unknown": return (nil, nil)
        case "listen": return (.smtp, nil)
        default: break
        }
        if let kind = ListenerKind(rawValue: name) { return (kind, nil) }
        if let dash = name.lastIndex(of: "-"), let kind = ListenerKind(rawValue: String(name[..<dash])) {
            let digits = name[name.index(after: dash)...]
            if (1...5).contains(digits.count), digits.allSatisfy({ $0.isASCII && $0.isNumber }),
               let port = Int(digits), (1...65535).contains(port) {
                return (kind, port)
            }
        }
        throw ListenerError("LISTEN_FDNAMES: \"\(name)\" names no listener (expected KIND-PORT such as smtp-25, submission-587, smtps-465, or a kind alone)")
    }

    /// Whether a socket bound to `bound` serves the configured `address`:
    /// same port (port 0 in the configuration: any), same address when the
    /// configured host is numeric.
    static func fits(_ bound: ListenAddress, _ address: ListenAddress) -> Bool {
        if address.port != 0 && bound.port != address.port { return false }
        guard let configured = numericAddress(address.host) else { return true }
        return numericAddress(bound.host) == configured
    }

    /// The bytes of a numeric IPv4 or IPv6 address (an IPv4-mapped IPv6
    /// address as its IPv4 bytes), nil for a host name.
    static func numericAddress(_ host: String) -> [UInt8]? {
        switch IPAddress(text: host) {
        case .v4(let v4)?:
            return v4.bytes
        case .v6(let v6)?:
            let bytes = v6.bytes
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xff && bytes[11] == 0xff { return Array(bytes[12...]) }
            return bytes
        case nil:
            return nil
        }
    }

    /// Reads and removes LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from the
    /// process environment and matches the descriptors to `configured`.
    /// nil when not socket-activated. Every inherited descriptor must be a
    /// listening TCP socket; they are marked close-on-exec.
    public static func takeFromEnvironment(configured: [ListenerSpec]) throws(ListenerError) -> [ListenerSpec]? {
        var environment: [String: String] = [:]
        for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            if let value = getenv(key) { environment[key] = String(cString: value) }
            unsetenv(key)
        }
        guard var inherited = try descriptors(environment: environment, pid: getpid()) else { return nil }
        for index in inherited.indices {
            let fd = inherited[index].fd
            guard fcntl(fd, F_SETFD, FD_CLOEXEC) == 0 else {
                throw ListenerError("LISTEN_FDS: descriptor \(fd): \(String(cString: strerror(errno)))")
            }
            var listening: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            guard getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0, listening == 1 else {
                throw ListenerError("LISTEN_FDS: descriptor \(fd) is not a listening socket")
            }
            inherited[index].address = boundAddress(fd)
        }
        return try match(inherited, to: configured)
    }

    /// getsockname as a ListenAddress (numeric host), nil for a socket
    /// that is not IPv4 or IPv6.
    static func boundAddress(_ fd: Int32) -> ListenAddress? {
        guard let address = SMTPServer.localAddress(fd), let host = address.ipAddress, let port = address.port else { return nil }
        return ListenAddress(host: host, port: port)
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
