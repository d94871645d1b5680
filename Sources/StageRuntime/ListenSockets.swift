// smtp-listen's listening sockets as the configuration defines them, in the
// one place both sides read: the supervisor binds them (and hands them over
// the systemd way, LISTEN_FDS), smtp-listen adopts them and checks that it
// got exactly these.
//
// Each listener has a name, used in LISTEN_FDNAMES: "<kind>-<port>", e.g.
// "smtp-25", "submission-587", "smtps-465". The kind is the [smtp] key's
// service ("smtp" for the key "listen"). A systemd .socket unit names its
// sockets the same way (FileDescriptorName=smtp-25, Config/systemd/).

import SealpostConfig
#if canImport(Glibc)
import Glibc
#endif

/// One configured listening address of smtp-listen.
public struct ListenerDefinition: Sendable, Hashable, CustomStringConvertible {
    /// "smtp", "submission" or "smtps".
    public var kind: String
    /// A numeric address or a host name, without brackets.
    public var host: String
    public var port: Int

    public init(kind: String, host: String, port: Int) {
        self.kind = kind
        self.host = host
        self.port = port
    }

    /// The name in LISTEN_FDNAMES.
    public var socketName: String { ListenerDefinition.socketName(kind: kind, port: port) }

    public static func socketName(kind: String, port: Int) -> String { "\(kind)-\(port)" }

    /// "host:port", "[v6]:port".
    public var address: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    public var description: String { "\(kind) on \(address)" }

    /// The listeners smtp-listen serves with this configuration, in the
    /// order of the file (listen, submission, smtps). smtps listeners are
    /// left out when no server certificate is configured: they could not be
    /// served, and a socket held open for them would leave clients waiting
    /// instead of refused.
    public static func served(by config: SealpostConfiguration) -> [ListenerDefinition] {
        var result: [ListenerDefinition] = []
        let groups: [(String, [String])] = [("smtp", config.smtp.listen), ("submission", config.smtp.submission),
                                            ("smtps", config.tls.certificates.isEmpty ? [] : config.smtp.smtps)]
        for (kind, addresses) in groups {
            for text in addresses {
                // The syntax was checked when the configuration was loaded.
                guard let (host, port) = splitHostPort(text) else { continue }
                result.append(ListenerDefinition(kind: kind, host: host, port: port))
            }
        }
        return result
    }

    /// "host:port" or "[v6]:port" -> (host, port); nil when malformed (an
    /// IPv6 address needs its brackets). Port 0, "any free port", passes.
    public static func splitHostPort(_ text: String) -> (host: String, port: Int)? {
        let host: Substring
        let port: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].first == ":" else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            port = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            port = text[text.index(after: colon)...]
            if host.contains(":") { return nil }
        }
        guard !host.isEmpty, (1...5).contains(port.count), port.allSatisfy({ $0.isASCII && $0.isNumber }),
              let number = Int(port), (0...65535).contains(number) else { return nil }
        return (String(host), number)
    }
}

/// Why a listening socket could not be opened ("bind: Address already in use").
public struct ListenSocketError: Error, Sendable, CustomStringConvertible {
    public var reason: String
    public var description: String { reason }
}

/// A listening TCP socket on `host` (a numeric address or a name) and
/// `port`, close-on-exec, with SO_REUSEADDR (restarts do not wait for
/// TIME_WAIT) and IPV6_V6ONLY (an IPv6 listener takes no IPv4 clients:
/// each address family is configured on its own). Used by the supervisor,
/// which binds smtp-listen's sockets, and by smtp-listen when started alone.
public func bindListeningSocket(host: String, port: Int) throws(ListenSocketError) -> Int32 {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE
    var result: UnsafeMutablePointer<addrinfo>? = nil
    let rc = getaddrinfo(host, String(port), &hints, &result)
    guard rc == 0, let first = result else {
        throw ListenSocketError(reason: "cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
    }
    defer { freeaddrinfo(result) }
    let family = first.pointee.ai_family
    let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw ListenSocketError(reason: "socket: \(String(cString: strerror(errno)))") }
    var one: Int32 = 1
    _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    if family == AF_INET6 {
        _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
    }
    guard bind(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0, listen(fd, SOMAXCONN) == 0 else {
        let reason = String(cString: strerror(errno))
        close(fd)
        throw ListenSocketError(reason: "bind: \(reason)")
    }
    return fd
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
        guard let (host, port) = ListenerDefinition.splitHostPort(text) else { return nil }
        self.init(host: host, port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
