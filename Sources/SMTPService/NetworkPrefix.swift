// Address prefixes for trusted networks ("192.0.2.0/24", "2001:db8::/32",
// "127.0.0.1"), parsed as DNS's IPAddress. IPv4 addresses are kept as
// IPv4-mapped IPv6 (::ffff:a.b.c.d), so an IPv4 client that reaches a dual
// stack listener as ::ffff:192.0.2.1 matches 192.0.2.0/24.

import DNS

public struct NetworkPrefix: Sendable, Hashable, CustomStringConvertible {
    /// 16 bytes, IPv4 mapped into ::ffff:0:0/96.
    public let address: [UInt8]
    /// Prefix length over the 128 bits.
    public let length: Int
    private let text: String

    /// Loopback only, the safe default: 127.0.0.0/8 and ::1.
    public static let defaultTrusted: [NetworkPrefix] = [
        NetworkPrefix("127.0.0.0/8")!, NetworkPrefix("::1/128")!,
    ]

    /// "a.b.c.d[/n]" (n <= 32) or "ipv6[/n]" (n <= 128); "[ipv6]" too. Host
    /// bits must be zero ("10.1.2.3/8" is refused: it is probably a typo).
    public init?(_ text: String) {
        var body = Substring(text)
        var prefix: Int?
        if let slash = body.lastIndex(of: "/") {
            let digits = body[body.index(after: slash)...]
            guard (1...3).contains(digits.count), digits.allSatisfy({ $0.isASCII && $0.isNumber }),
                  let n = Int(digits) else { return nil }
            prefix = n
            body = body[..<slash]
        }
        if body.hasPrefix("["), body.hasSuffix("]") { body = body.dropFirst().dropLast() }
        guard let (bytes, isV4) = NetworkPrefix.parseAddress(String(body)) else { return nil }
        let maxLength = isV4 ? 32 : 128
        let n = prefix ?? maxLength
        guard n <= maxLength else { return nil }
        let total = isV4 ? n + 96 : n
        guard NetworkPrefix.masked(bytes, total) == bytes else { return nil }
        address = bytes
        length = total
        self.text = "\(body)/\(n)"
    }

    public var description: String { text }

    /// Whether the numeric address `text` lies in this prefix.
    public func contains(_ text: String) -> Bool {
        Self.anyContains([self], text)
    }

    /// Whether the numeric address `text` lies in any of `prefixes`; the
    /// text is parsed once (a session's trust check runs per connection).
    public static func anyContains(_ prefixes: [NetworkPrefix], _ text: String) -> Bool {
        guard let (bytes, _) = parseAddress(text) else { return false }
        return prefixes.contains { masked(bytes, $0.length) == $0.address }
    }

    /// 16 bytes (IPv4 mapped) and whether it was written as IPv4.
    static func parseAddress(_ text: String) -> ([UInt8], Bool)? {
        guard !text.isEmpty, text.utf8.count < 64 else { return nil }
        switch IPAddress(text: text) {
        case .v4(let v4)?: return ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF] + v4.bytes, true)
        case .v6(let v6)?: return (v6.bytes, false)
        case nil: return nil
        }
    }

    static func masked(_ bytes: [UInt8], _ bits: Int) -> [UInt8] {
        var out = bytes
        for i in 0..<16 {
            let keep = max(0, min(8, bits - i * 8))
            out[i] &= keep == 8 ? 0xFF : UInt8(truncatingIfNeeded: 0xFF << (8 - keep))
        }
        return out
    }

    /// "::ffff:192.0.2.1" -> "192.0.2.1": how a client is named in logs,
    /// Received lines and relay decisions.
    public static func canonicalClientAddress(_ text: String) -> String {
        let lower = text.lowercased()
        if lower.hasPrefix("::ffff:"), !lower.dropFirst(7).contains(":") {
            let rest = String(text.dropFirst(7))
            if case .v4? = IPAddress(text: rest) { return rest }
        }
        return text
    }
}
