// The transport table: per destination domain, where its mail goes instead
// of (or how to reach) the domain's MX hosts. A Postfix-like text file,
// `Config/transport` next to sealpost.toml, one entry a line:
//
//     # domain            next hop                     options
//     example.com         relay:[192.0.2.10]:587       auth=relay.auth tls=encrypt
//     .example.com        smtp:mail.example.com        (MX lookup on mail.example.com)
//     lab.test            smtp:[127.0.0.1]:2525        (this host, this port, no DNS)
//     secure.example      smtp:                        tls=verify (the domain's own MX, another policy)
//     internal.test       local
//     *                   relay:[smarthost.example.net]:587 auth=/etc/sealpost/smarthost.auth
//
// Keys: a domain matches itself; ".domain" matches every subdomain (not the
// domain itself); "*" matches anything not matched otherwise. The most
// specific key wins: exact, then the longest ".parent", then "*".
//
// Next hops: "smtp:" or "relay:" (the same transport; two names as
// Postfix has), followed by
//   - "[host]" or "[host]:port": that host, no MX lookup (an IP literal or
//     a name looked up for A/AAAA); IPv6 as "[2001:db8::1]" or
//     "[ipv6:2001:db8::1]";
//   - "host" or "host:port": the MX hosts of `host` (its A/AAAA when it has
//     no MX: the implicit MX of RFC 5321 5.1);
//   - nothing: the domain's own MX hosts (to attach options only).
// "local" hands the domain to local delivery: the queue routes by it; a job
// that still reaches remote-deliver is deferred (misrouted).
//
// Options, "name=value", after the next hop:
//   - auth=FILE: AUTH PLAIN credentials (one line "username:password",
//     the first colon separates them); relative to the table's directory.
//     Read when the table is loaded (before the stage drops privileges).
//     Without tls=, auth= means tls=verify: the password goes only over
//     TLS to a server whose certificate (from a trusted CA) names the next
//     hop, never to whoever answers in between, as OpenSMTPD's relay with
//     auth verifies by default. tls=encrypt sends it to any TLS server (a
//     smarthost with a self-signed certificate), tls=none in clear text to
//     a loopback next hop only (a local TLS tunnel).
//   - tls=none|may|encrypt|dane|dane-only|verify|secure: the TLS
//     requirement for the destination (DestinationPolicy's static input).
//
// Errors name the file and line: "Config/transport:7: unknown option \"tsl\"".

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DNS
import FileAccess
import SealpostConfig
import SMTP

public typealias TransportTableError = TableFileError

/// Where mail for one destination goes.
public enum NextHop: Sendable, Hashable, CustomStringConvertible {
    /// This host (name or IP literal) and port, no MX lookup.
    case host(String, port: Int)
    /// The MX hosts of this domain, on this port.
    case mailExchangers(String, port: Int)
    /// Local delivery: not remote-deliver's job.
    case local

    public var description: String {
        switch self {
        case .host(let h, let port): return h.contains(":") ? "[\(h)]:\(port)" : "[\(h)]:\(port)"
        case .mailExchangers(let d, let port): return port == 25 ? d : "\(d):\(port)"
        case .local: return "local"
        }
    }
}

/// The TLS requirement for a destination, Postfix's vocabulary
/// (smtp_tls_security_level).
public enum TLSRequirement: String, Sendable, Hashable, CaseIterable {
    /// Never STARTTLS.
    case none
    /// Opportunistic (RFC 7435): STARTTLS when offered, else clear text.
    case may
    /// TLS required, the peer not authenticated.
    case encrypt
    /// DANE when the TLSA records are DNSSEC-secure, else `may` (RFC 7672).
    case dane
    /// DANE or no delivery.
    case daneOnly = "dane-only"
    /// PKIX with the MX host name.
    case verify
    /// PKIX with the destination's names (the next hop domain).
    case secure

    /// How the SMTP client state machine treats STARTTLS for it.
    public var clientMode: SMTPClientTLSMode {
        switch self {
        case .none: return .none
        case .may, .dane: return .opportunistic
        case .encrypt, .daneOnly, .verify, .secure: return .required
        }
    }

    /// The peer must be authenticated (not just encrypted).
    public var requiresAuthentication: Bool {
        switch self {
        case .daneOnly, .verify, .secure: return true
        case .none, .may, .encrypt, .dane: return false
        }
    }
}

/// One line of the table.
public struct TransportEntry: Sendable, Hashable {
    /// "example.com", ".example.com" or "*".
    public var key: String
    /// nil: the domain's own MX hosts (an entry that only sets options).
    public var nextHop: NextHop?
    public var credentials: SMTPClientCredentials?
    public var tls: TLSRequirement?
    /// file:line, for messages.
    public var origin: String

    public init(key: String, nextHop: NextHop?, credentials: SMTPClientCredentials? = nil,
                tls: TLSRequirement? = nil, origin: String = "") {
        self.key = key
        self.nextHop = nextHop
        self.credentials = credentials
        self.tls = tls
        self.origin = origin
    }
}

public struct TransportTable: Sendable {
    /// A bound on what is read: a transport table is a few KiB.
    public static let maximumFileSize = 16 << 20
    public private(set) var entries: [String: TransportEntry] = [:]

    public init(entries: [TransportEntry] = []) {
        for e in entries { self.entries[e.key] = e }
    }

    public var isEmpty: Bool { entries.isEmpty }

    /// The entry for `domain`: exact, then the longest ".parent", then "*".
    public func lookup(_ domain: String) -> TransportEntry? {
        var d = domain.lowercased()
        while d.hasSuffix(".") { d.removeLast() }
        if let e = entries[d] { return e }
        var rest = Substring(d)
        while let dot = rest.firstIndex(of: ".") {
            rest = rest[rest.index(after: dot)...]
            if let e = entries["." + rest] { return e }
        }
        return entries["*"]
    }

    /// Loads `path`; a missing file is an empty table (nothing configured).
    public static func load(path: String) throws(TransportTableError) -> TransportTable {
        let bytes: [UInt8]
        do {
            guard let file = try WholeFile.readIfPresent(path, maximumSize: maximumFileSize, options: .characterDevices) else { return TransportTable() }
            bytes = file.bytes
        } catch {
            throw TransportTableError(file: path, line: nil, message: error.withoutPath)
        }
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        return try parse(bytes, file: path) { (name: String) throws(TransportTableError) -> SMTPClientCredentials in
            try readCredentials(name.hasPrefix("/") ? name : directory + "/" + name)
        }
    }

    /// Parses the table's text. `credentials` reads an auth= file.
    public static func parse(_ bytes: [UInt8], file: String,
                             credentials: (String) throws(TransportTableError) -> SMTPClientCredentials) throws(TransportTableError) -> TransportTable {
        var table = TransportTable()
        var lineNumber = 0
        for raw in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
            lineNumber += 1
            func fail(_ message: String) -> TransportTableError {
                TransportTableError(file: file, line: lineNumber, message: message)
            }
            var line = Array(raw)
            if line.last == 0x0D { line.removeLast() }
            guard let text = String(validating: line, as: UTF8.self) else { throw fail("not valid UTF-8") }
            let content = text.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            let fields = content.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            if fields.isEmpty { continue }
            if text.first == " " || text.first == "\t" {
                throw fail("continuation lines are not supported: an entry is one line")
            }
            guard fields.count >= 2 else { throw fail("expected \"domain next-hop [options]\", got \"\(fields[0])\" alone") }
            let key = try parseKey(fields[0], fail)
            guard table.entries[key] == nil else {
                throw fail("\"\(key)\" already has an entry (\(table.entries[key]!.origin))")
            }
            var entry = TransportEntry(key: key, nextHop: try parseNextHop(fields[1], fail),
                                       origin: "\(file):\(lineNumber)")
            for option in fields.dropFirst(2) {
                guard let eq = option.firstIndex(of: "="), eq != option.startIndex else {
                    throw fail("expected an option \"name=value\", got \"\(option)\"")
                }
                let name = String(option[..<eq]), value = String(option[option.index(after: eq)...])
                switch name {
                case "auth":
                    guard !value.isEmpty else { throw fail("auth=: missing file name") }
                    guard entry.credentials == nil else { throw fail("auth= given twice") }
                    do {
                        entry.credentials = try credentials(value)
                    } catch {
                        throw fail("auth=\(value): \(error.line.map { "line \($0): " } ?? "")\(error.message)")
                    }
                case "tls":
                    guard let level = TLSRequirement(rawValue: value) else {
                        throw fail("tls=\(value): expected one of \(TLSRequirement.allCases.map(\.rawValue).joined(separator: ", "))")
                    }
                    guard entry.tls == nil else { throw fail("tls= given twice") }
                    entry.tls = level
                default:
                    throw fail("unknown option \"\(name)\" (known: auth, tls)")
                }
            }
            if entry.nextHop == .local && (entry.credentials != nil || entry.tls != nil) {
                throw fail("options make no sense with \"local\"")
            }
            // A password goes only to the server named, unless the entry
            // says otherwise (see the header).
            if entry.credentials != nil && entry.tls == nil { entry.tls = .verify }
            table.entries[key] = entry
        }
        return table
    }

    static func parseKey(_ s: String, _ fail: (String) -> TransportTableError) throws(TransportTableError) -> String {
        if s == "*" { return s }
        let lower = s.lowercased()
        let name = lower.hasPrefix(".") ? String(lower.dropFirst()) : lower
        guard isDomainName(name) else { throw fail("\"\(s)\" is not a domain name, \".domain\" or \"*\"") }
        return lower
    }

    static func parseNextHop(_ s: String, _ fail: (String) -> TransportTableError) throws(TransportTableError) -> NextHop? {
        if s == "local" { return .local }
        guard let colon = s.firstIndex(of: ":") else {
            throw fail("next hop \"\(s)\": expected \"smtp:...\", \"relay:...\" or \"local\"")
        }
        let transport = s[..<colon]
        guard transport == "smtp" || transport == "relay" else {
            throw fail("next hop \"\(s)\": unknown transport \"\(transport)\" (known: smtp, relay, local)")
        }
        let rest = String(s[s.index(after: colon)...])
        if rest.isEmpty { return nil }
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw fail("next hop \"\(s)\": \"[\" without \"]\"") }
            var host = String(rest[rest.index(after: rest.startIndex)..<close]).lowercased()
            if host.hasPrefix("ipv6:") { host.removeFirst(5) }
            let after = rest[rest.index(after: close)...]
            let port: Int
            if after.isEmpty {
                port = 25
            } else {
                guard after.hasPrefix(":") else { throw fail("next hop \"\(s)\": expected \":port\" after \"]\"") }
                port = try parsePort(String(after.dropFirst()), s, fail)
            }
            guard isIPv4(host) || isIPv6(host) || isDomainName(host) else {
                throw fail("next hop \"\(s)\": \"\(host)\" is neither an IP address nor a host name")
            }
            return .host(unmappedIPv4(host) ?? host, port: port)
        }
        let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count <= 2 else {
            throw fail("next hop \"\(s)\": an IPv6 address must be in brackets: \"[2001:db8::1]:25\"")
        }
        let host = String(parts[0]).lowercased()
        if isIPv4(host) {
            // Without brackets the host's MX records would be looked up.
            let port = parts.count == 2 && !parts[1].isEmpty ? ":\(parts[1])" : ""
            throw fail("next hop \"\(s)\": an IP address goes in brackets: \"\(transport):[\(host)]\(port)\"")
        }
        guard isDomainName(host) else { throw fail("next hop \"\(s)\": \"\(host)\" is not a domain name") }
        let port = parts.count == 2 ? try parsePort(String(parts[1]), s, fail) : 25
        return .mailExchangers(host, port: port)
    }

    static func parsePort(_ p: String, _ hop: String, _ fail: (String) -> TransportTableError) throws(TransportTableError) -> Int {
        guard let n = Int(p), (1...65535).contains(n), p.allSatisfy(\.isASCII) else {
            throw fail("next hop \"\(hop)\": \"\(p)\" is not a port number (1-65535)")
        }
        return n
    }

    /// LDH labels of 1-63 bytes, at most 253 in all (RFC 1035, RFC 1123),
    /// the last one not all digits: no top-level domain is (RFC 3696
    /// section 2), which tells a name from a dotted IPv4 address ("192.0.2.1"
    /// would otherwise pass, and be looked up as a name or sent as SNI).
    static func isDomainName(_ s: String) -> Bool {
        let u = Array(s.utf8)
        guard !u.isEmpty, u.count <= 253 else { return false }
        let labels = u.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        for label in labels {
            guard (1...63).contains(label.count), label.first != UInt8(ascii: "-"), label.last != UInt8(ascii: "-"),
                  label.allSatisfy({ (48...57).contains($0) || (97...122).contains($0) || (65...90).contains($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") })
            else { return false }
        }
        return !labels.last!.allSatisfy { (48...57).contains($0) }
    }

    static func isIPv4(_ s: String) -> Bool {
        if case .v4 = IPAddress(text: s) { true } else { false }
    }

    /// "::ffff:192.0.2.1" -> "192.0.2.1": an IPv4-mapped IPv6 address is
    /// the IPv4 host, connected to as such and matched against a
    /// certificate's IPv4 address (OpenSSL compares the 16-byte form with
    /// a 4-byte iPAddress name as different). nil for anything else.
    static func unmappedIPv4(_ s: String) -> String? {
        guard case .v6(let address) = IPAddress(text: s), address.bytes[0..<10].allSatisfy({ $0 == 0 }),
              address.bytes[10] == 0xFF, address.bytes[11] == 0xFF else { return nil }
        return IPv4Address(bytes: Array(address.bytes[12...]))?.description
    }

    static func isIPv6(_ s: String) -> Bool {
        if case .v6 = IPAddress(text: s) { true } else { false }
    }

    /// An auth= file: one line "username:password" (comments and blank
    /// lines allowed). The file should be readable by the stage alone.
    public static func readCredentials(_ path: String) throws(TransportTableError) -> SMTPClientCredentials {
        let bytes: [UInt8]
        do {
            bytes = try WholeFile.read(path, maximumSize: 4096).bytes
        } catch {
            throw TransportTableError(file: path, line: nil, message: error.withoutPath)
        }
        var found: SMTPClientCredentials?
        var number = 0
        for raw in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
            number += 1
            var line = Array(raw)
            if line.last == 0x0D { line.removeLast() }
            guard let text = String(validating: line, as: UTF8.self) else {
                throw TransportTableError(file: path, line: number, message: "not valid UTF-8")
            }
            if text.allSatisfy({ $0 == " " || $0 == "\t" }) || text.first == "#" { continue }
            guard found == nil else {
                throw TransportTableError(file: path, line: number, message: "a second credentials line")
            }
            guard let colon = text.firstIndex(of: ":"), colon != text.startIndex,
                  text.index(after: colon) != text.endIndex else {
                throw TransportTableError(file: path, line: number, message: "expected \"username:password\"")
            }
            found = SMTPClientCredentials(username: String(text[..<colon]), password: String(text[text.index(after: colon)...]))
        }
        guard let found else { throw TransportTableError(file: path, line: nil, message: "no \"username:password\" line") }
        return found
    }
}
