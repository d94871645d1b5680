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

    /// "host:port" or "[v6]:port" -> (host, port); nil when malformed.
    static func splitHostPort(_ text: String) -> (String, Int)? {
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
        }
        guard !host.isEmpty, let number = Int(port), (0...65535).contains(number) else { return nil }
        return (String(host), number)
    }
}
