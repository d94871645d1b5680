// Strict decoders for the RDATA of the record types an MTA needs.
//
// libunbound hands over each record's RDATA exactly as it stores it: the
// bytes after RDLENGTH, with domain names already decompressed (unbound
// expands compression pointers while parsing a packet, so a name inside
// ub_result data is a plain sequence of labels). A compression pointer or an
// extended label type here therefore means corrupt data and is refused, as
// is any byte left over or missing. These decoders are pure functions, so
// the table tests drive them with hostile input directly.

/// Why a record's RDATA was refused.
public struct RDataError: Error, Sendable, Equatable, CustomStringConvertible {
    public var type: RRType
    public var reason: String
    public init(type: RRType, reason: String) {
        self.type = type
        self.reason = reason
    }
    public var description: String { "malformed \(type) rdata: \(reason)" }
}

/// Bounds-checked reader over one record's RDATA.
struct WireReader {
    let bytes: [UInt8]
    let type: RRType
    private(set) var offset = 0

    init(_ bytes: [UInt8], type: RRType) {
        self.bytes = bytes
        self.type = type
    }

    var remaining: Int { bytes.count - offset }
    var atEnd: Bool { offset == bytes.count }

    func fail(_ reason: String) -> RDataError { RDataError(type: type, reason: reason) }

    mutating func u8() throws(RDataError) -> UInt8 {
        guard remaining >= 1 else { throw fail("truncated at byte \(offset)") }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func u16() throws(RDataError) -> UInt16 {
        guard remaining >= 2 else { throw fail("truncated at byte \(offset)") }
        defer { offset += 2 }
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }

    mutating func take(_ count: Int) throws(RDataError) -> [UInt8] {
        guard count >= 0, remaining >= count else {
            throw fail("truncated: \(count) bytes wanted at byte \(offset), \(remaining) left")
        }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }

    mutating func rest() -> [UInt8] {
        defer { offset = bytes.count }
        return Array(bytes[offset...])
    }

    /// An uncompressed wire-format name (RFC 1035 3.1).
    mutating func name() throws(RDataError) -> DomainName {
        var labels: [[UInt8]] = []
        var wireLength = 0
        while true {
            let start = offset
            let length = try u8()
            wireLength += 1
            switch length {
            case 0:
                return DomainName(labels: labels)
            case 1...63:
                guard remaining >= Int(length) else {
                    throw fail("label at byte \(start) runs past the end")
                }
                labels.append(try take(Int(length)))
                wireLength += Int(length)
                // RFC 1035 2.3.4: 255 octets at most, the root label included.
                guard wireLength < 255 else { throw fail("name longer than 255 octets") }
            case 0xC0...0xFF:
                throw fail("compression pointer at byte \(start): names in rdata are uncompressed")
            default:
                throw fail("label type 0x\(String(length, radix: 16)) at byte \(start) (labels are 63 octets at most)")
            }
        }
    }

    func requireEnd() throws(RDataError) {
        guard atEnd else { throw fail("\(remaining) trailing bytes") }
    }
}

/// A domain name as a list of labels (wire form, without the root label).
public struct DomainName: Sendable, Hashable, CustomStringConvertible {
    public var labels: [[UInt8]]

    public init(labels: [[UInt8]]) { self.labels = labels }

    /// The root name ".", which as an MX target means "no mail" (RFC 7505).
    public var isRoot: Bool { labels.isEmpty }

    /// Presentation form without the trailing dot ("." for the root). Bytes
    /// outside letters, digits, '-' and '_' are written as \DDD, and '.' or
    /// '\' inside a label are escaped, so the text never means another name.
    public var text: String {
        if labels.isEmpty { return "." }
        return labels.map { label in
            var out = ""
            for byte in label {
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                     UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
                    out.unicodeScalars.append(Unicode.Scalar(byte))
                case UInt8(ascii: "."), UInt8(ascii: "\\"):
                    out += "\\" + String(Unicode.Scalar(byte))
                default:
                    let digits = String(byte)
                    out += "\\" + String(repeating: "0", count: 3 - digits.count) + digits
                }
            }
            return out
        }.joined(separator: ".")
    }

    public var description: String { text }

    /// True when every label is a host-name label (RFC 952/1123: letters,
    /// digits, inner hyphens; RFC 5321 requires this of an MX target).
    public var isHostname: Bool {
        guard !labels.isEmpty else { return false }
        return labels.allSatisfy { label in
            guard let first = label.first, let last = label.last,
                  first != UInt8(ascii: "-"), last != UInt8(ascii: "-") else { return false }
            return label.allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                     UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"):
                    return true
                default:
                    return false
                }
            }
        }
    }

    /// Decodes exactly one wire-format name occupying all of `bytes`.
    public static func decode(wire bytes: [UInt8]) throws(RDataError) -> DomainName {
        var reader = WireReader(bytes, type: .cname)
        let name = try reader.name()
        try reader.requireEnd()
        return name
    }
}

/// MX (RFC 1035 3.3.9).
public struct MXRecord: Sendable, Hashable, CustomStringConvertible {
    public var preference: UInt16
    public var exchange: DomainName

    public init(preference: UInt16, exchange: DomainName) {
        self.preference = preference
        self.exchange = exchange
    }

    public init(rdata: [UInt8]) throws(RDataError) {
        var reader = WireReader(rdata, type: .mx)
        preference = try reader.u16()
        exchange = try reader.name()
        try reader.requireEnd()
    }

    public var description: String { "\(preference) \(exchange.text)" }
}

/// An IPv4 address (A record, RFC 1035 3.4.1).
public struct IPv4Address: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]   // always 4

    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 else { return nil }
        self.bytes = bytes
    }

    public init(rdata: [UInt8]) throws(RDataError) {
        guard rdata.count == 4 else {
            throw RDataError(type: .a, reason: "\(rdata.count) bytes, an address has 4")
        }
        bytes = rdata
    }

    public var description: String { bytes.map(String.init).joined(separator: ".") }
}

/// An IPv6 address (AAAA record, RFC 3596).
public struct IPv6Address: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]   // always 16

    public init?(bytes: [UInt8]) {
        guard bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    public init(rdata: [UInt8]) throws(RDataError) {
        guard rdata.count == 16 else {
            throw RDataError(type: .aaaa, reason: "\(rdata.count) bytes, an address has 16")
        }
        bytes = rdata
    }

    /// RFC 5952 text: lower-case hex, leading zeros dropped, the first longest
    /// run of two or more zero groups written as "::".
    public var description: String {
        let groups = (0..<8).map { UInt16(bytes[2 * $0]) << 8 | UInt16(bytes[2 * $0 + 1]) }
        var bestStart = -1, bestLength = 1
        var index = 0
        while index < 8 {
            if groups[index] == 0 {
                var end = index
                while end < 8 && groups[end] == 0 { end += 1 }
                if end - index > bestLength { bestStart = index; bestLength = end - index }
                index = end
            } else {
                index += 1
            }
        }
        let hex = groups.map { String($0, radix: 16) }
        if bestStart < 0 { return hex.joined(separator: ":") }
        let head = hex[..<bestStart].joined(separator: ":")
        let tail = hex[(bestStart + bestLength)...].joined(separator: ":")
        return head + "::" + tail
    }
}

/// Either address family.
public enum IPAddress: Sendable, Hashable, CustomStringConvertible {
    case v4(IPv4Address)
    case v6(IPv6Address)

    public var description: String {
        switch self {
        case .v4(let address): return address.description
        case .v6(let address): return address.description
        }
    }
}

/// TLSA (RFC 6698 2.1). Only the structure is checked here; whether a
/// record is usable (known usage, selector, matching type, digest length) is
/// the DANE policy's decision (RFC 7672 2.2: unusable records are ignored,
/// not fatal).
public struct TLSARecord: Sendable, Hashable, CustomStringConvertible {
    public var usage: UInt8
    public var selector: UInt8
    public var matchingType: UInt8
    public var data: [UInt8]

    public init(usage: UInt8, selector: UInt8, matchingType: UInt8, data: [UInt8]) {
        self.usage = usage
        self.selector = selector
        self.matchingType = matchingType
        self.data = data
    }

    public init(rdata: [UInt8]) throws(RDataError) {
        var reader = WireReader(rdata, type: .tlsa)
        usage = try reader.u8()
        selector = try reader.u8()
        matchingType = try reader.u8()
        data = reader.rest()
        // RFC 6698 2.1.4: the certificate association data is not optional.
        guard !data.isEmpty else {
            throw RDataError(type: .tlsa, reason: "no certificate association data")
        }
    }

    public var dataHex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(data.count * 2)
        for byte in data {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public var description: String { "\(usage) \(selector) \(matchingType) \(dataHex)" }
}

/// TXT (RFC 1035 3.3.14): one or more character-strings.
public struct TXTRecord: Sendable, Hashable, CustomStringConvertible {
    /// The character-strings as published.
    public var strings: [[UInt8]]

    public init(strings: [[UInt8]]) { self.strings = strings }

    public init(rdata: [UInt8]) throws(RDataError) {
        var reader = WireReader(rdata, type: .txt)
        guard !reader.atEnd else { throw RDataError(type: .txt, reason: "empty rdata") }
        var strings: [[UInt8]] = []
        while !reader.atEnd {
            let length = try reader.u8()
            guard reader.remaining >= Int(length) else {
                throw RDataError(type: .txt, reason: "character-string of \(length) bytes runs past the end")
            }
            strings.append(try reader.take(Int(length)))
        }
        self.strings = strings
    }

    /// The strings concatenated without separator, as RFC 7208 3.3 and
    /// RFC 8461 3.1 require for SPF and MTA-STS records.
    public var joined: [UInt8] { strings.flatMap { $0 } }

    /// `joined` as text, nil if it is not valid UTF-8.
    public var text: String? { String(validating: joined, as: UTF8.self) }

    public var description: String {
        strings.map { "\"" + String(decoding: $0, as: UTF8.self) + "\"" }.joined(separator: " ")
    }
}
