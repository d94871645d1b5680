#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The value syntaxes of the configuration file, strict and pure. Public so
/// that the CLI can validate values the same way.
public enum ConfigValues {
    /// A duration in seconds: "300s", "90m", "4h", "5d", "2w", or a string of
    /// digits (seconds). No sign, no spaces, no fractions, lower-case units,
    /// no overflow.
    public static func parseDuration(_ text: String) -> Int? {
        let digits = text.prefix(while: { $0.isASCII && $0.isNumber })
        let unit = text[digits.endIndex...]
        let multiplier: Int
        switch unit {
        case "", "s": multiplier = 1
        case "m": multiplier = 60
        case "h": multiplier = 3600
        case "d": multiplier = 86400
        case "w": multiplier = 7 * 86400
        default: return nil
        }
        return scaled(digits, by: multiplier)
    }

    /// A short duration in milliseconds: "1ms", "20ms", or whole seconds
    /// "1s". The unit is required (a bare number would read as seconds in
    /// every other duration key); the same strictness as parseDuration.
    public static func parseMilliseconds(_ text: String) -> Int? {
        let digits = text.prefix(while: { $0.isASCII && $0.isNumber })
        let multiplier: Int
        switch text[digits.endIndex...] {
        case "ms": multiplier = 1
        case "s": multiplier = 1000
        default: return nil
        }
        return scaled(digits, by: multiplier)
    }

    /// A size in bytes: "64KiB", "10MiB", "1GiB", "1TiB", or a string of
    /// digits (bytes). Only the 1024-based IEC units: "10MB" is ambiguous
    /// (10^6 or 2^20?) and is refused rather than guessed.
    public static func parseSize(_ text: String) -> Int? {
        let digits = text.prefix(while: { $0.isASCII && $0.isNumber })
        let unit = text[digits.endIndex...]
        let multiplier: Int
        switch unit {
        case "": multiplier = 1
        case "KiB": multiplier = 1 << 10
        case "MiB": multiplier = 1 << 20
        case "GiB": multiplier = 1 << 30
        case "TiB": multiplier = 1 << 40
        default: return nil
        }
        return scaled(digits, by: multiplier)
    }

    private static func scaled(_ digits: Substring, by multiplier: Int) -> Int? {
        guard !digits.isEmpty, digits.count <= 19, let value = Int(digits) else { return nil }
        let (product, overflow) = value.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : product
    }

    /// A DNS host name in LDH syntax (RFC 1123, 5890 A-labels): labels of
    /// 1-63 letters, digits and hyphens, not starting or ending with a
    /// hyphen, at most 253 octets, no trailing dot, a last label that is not
    /// all digits (so that "10.0.0.1" is not mistaken for a domain).
    public static func isValidDomain(_ text: String) -> Bool {
        guard !text.isEmpty, text.utf8.count <= 253 else { return false }
        let labels = text.split(separator: ".", omittingEmptySubsequences: false)
        for label in labels {
            guard (1...63).contains(label.utf8.count),
                  label.utf8.allSatisfy({ isLetterOrDigit($0) || $0 == UInt8(ascii: "-") }),
                  label.utf8.first != UInt8(ascii: "-"), label.utf8.last != UInt8(ascii: "-")
            else { return false }
        }
        return !labels.last!.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") })
    }

    /// An RFC 5321 mailbox `local-part@domain`: the local part a dot-atom or
    /// a quoted string (UTF-8 allowed, RFC 6531), at most 64 octets; the
    /// domain as `isValidDomain`.
    public static func isValidAddress(_ text: String) -> Bool {
        guard let at = text.utf8.lastIndex(of: UInt8(ascii: "@")) else { return false }
        let local = Substring(text.utf8[..<at])
        let domain = String(Substring(text.utf8[text.utf8.index(after: at)...]))
        return isValidLocalPart(local) && isValidDomain(domain)
    }

    static func isValidLocalPart(_ local: Substring) -> Bool {
        guard !local.isEmpty, local.utf8.count <= 64 else { return false }
        let bytes = Array(local.utf8)
        if bytes.first == UInt8(ascii: "\"") {
            // quoted-string: qtext or quoted-pair, printable only.
            guard bytes.count >= 2, bytes.last == UInt8(ascii: "\"") else { return false }
            var index = 1
            while index < bytes.count - 1 {
                let byte = bytes[index]
                if byte == UInt8(ascii: "\\") {
                    index += 1
                    guard index < bytes.count - 1, bytes[index] >= 0x20, bytes[index] != 0x7f else { return false }
                } else if byte == UInt8(ascii: "\"") || byte < 0x20 || byte == 0x7f {
                    return false
                }
                index += 1
            }
            return true
        }
        // dot-atom: atoms of atext separated by single dots.
        let atoms = local.split(separator: ".", omittingEmptySubsequences: false)
        return atoms.allSatisfy { atom in
            !atom.isEmpty && atom.utf8.allSatisfy { byte in
                byte >= 0x80 || isLetterOrDigit(byte) || "!#$%&'*+-/=?^_`{|}~".utf8.contains(byte)
            }
        }
    }

    /// A listening address: "host:port" with an IPv4 address or a host name,
    /// or "[IPv6]:port"; port 1-65535 in decimal.
    /// Returns nil when valid, else the reason.
    public static func listenerError(_ text: String) -> String? {
        let host: Substring
        let port: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return "missing \"]\" after the IPv6 address" }
            host = text[text.index(after: text.startIndex)..<close]
            let after = text[text.index(after: close)...]
            guard after.first == ":" else { return "expected \":port\" after \"]\"" }
            port = after.dropFirst()
            guard isIPv6(String(host)) else { return "not an IPv6 address: \"\(host)\"" }
        } else {
            guard let colon = text.lastIndex(of: ":") else { return "expected host:port" }
            host = text[..<colon]
            port = text[text.index(after: colon)...]
            if host.contains(":") { return "an IPv6 address needs brackets: [address]:port" }
            if host.isEmpty { return "missing host (use 0.0.0.0 or [::] for every address)" }
            if host.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }) {
                guard isIPv4(String(host)) else { return "not an IPv4 address: \"\(host)\"" }
            } else {
                // A name resolves to any number of addresses (localhost to
                // ::1 and 127.0.0.1), and one socket binds one of them: the
                // others would be left without a listener, unnoticed.
                return "not an IP address: \"\(host)\" (a name may stand for several addresses; list each, e.g. \"127.0.0.1:\(port)\" and \"[::1]:\(port)\")"
            }
        }
        guard !port.isEmpty, port.count <= 5, port.allSatisfy({ $0.isASCII && $0.isNumber }),
              let number = Int(port), (1...65535).contains(number)
        else { return "not a port (1-65535): \"\(port)\"" }
        return nil
    }

    static func isIPv4(_ text: String) -> Bool { addressBytes(text)?.count == 4 }

    static func isIPv6(_ text: String) -> Bool { addressBytes(text)?.count == 16 }

    /// The 4 or 16 bytes of an IPv4 or IPv6 address in text form
    /// (inet_pton's: no brackets), or nil. inet_pton reads a C string, so
    /// text with a NUL is no address (it would be read up to the NUL; the
    /// file's reader refuses \u0000 already, this stays right on its own).
    static func addressBytes(_ text: String) -> [UInt8]? {
        guard !text.utf8.contains(0) else { return nil }
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 { return withUnsafeBytes(of: v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 { return withUnsafeBytes(of: v6) { Array($0) } }
        return nil
    }

    private static func isLetterOrDigit(_ byte: UInt8) -> Bool {
        (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
            || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
            || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
    }
}
