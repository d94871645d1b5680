// Message-ID (RFC 5322 section 3.6.4): "<20261129161343.4F3A2B1C5D6E7F80@host>".
// The time keeps IDs roughly sortable for a human reading logs; the 64
// random bits make them unique without any state shared between processes.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum MessageID {
    /// A new msg-id, angle brackets included.
    public static func generate(hostname: String) -> String {
        var rng = SystemRandomNumberGenerator()
        return generate(hostname: hostname, unixTime: Int(time(nil)), using: &rng)
    }

    public static func generate<R: RandomNumberGenerator>(hostname: String, unixTime: Int,
                                                          using rng: inout R) -> String {
        let random = rng.next() as UInt64
        var hex = String(random, radix: 16, uppercase: true)
        if hex.count < 16 { hex = String(repeating: "0", count: 16 - hex.count) + hex }
        return "<\(CivilTime(unixTime: unixTime).compact).\(hex)@\(domainPart(hostname))>"
    }

    /// The id-right must be a dot-atom; a host name that is not one (empty,
    /// or a misconfigured value) is replaced rather than producing a header
    /// that strict parsers reject.
    static func domainPart(_ hostname: String) -> String {
        let ok = !hostname.isEmpty && !hostname.hasPrefix(".") && !hostname.hasSuffix(".")
            && !hostname.contains("..")
            && hostname.unicodeScalars.allSatisfy { s in
                (s.value < 128 && Lexer.isAtext(UInt8(s.value))) || s == "."
            }
        return ok ? hostname : "localhost"
    }
}
