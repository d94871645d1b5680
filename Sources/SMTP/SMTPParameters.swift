/// ESMTP extensions and the MAIL/RCPT parameters they define: SIZE (RFC 1870),
/// BODY (RFC 6152), SMTPUTF8 (RFC 6531), DSN's RET, ENVID, NOTIFY and ORCPT
/// (RFC 3461, xtext-decoded and validated), AUTH= (RFC 4954) and REQUIRETLS
/// (RFC 8689).
///
/// Parameters are `keyword[=value]` separated by spaces (RFC 5321 4.1.2).
/// A keyword the server did not advertise gets 555 5.5.4 (RFC 5321 4.1.1.11);
/// a duplicate or a malformed value 501 5.5.4. Values that carry text into
/// the queue (ENVID, ORCPT, AUTH) must decode to printable ASCII: a NUL, a
/// line break or 8-bit data smuggled in through xtext is refused.

/// The extensions a session can advertise.
public struct SMTPExtensions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let pipelining = SMTPExtensions(rawValue: 1 << 0)
    public static let size = SMTPExtensions(rawValue: 1 << 1)
    public static let eightBitMIME = SMTPExtensions(rawValue: 1 << 2)
    public static let smtputf8 = SMTPExtensions(rawValue: 1 << 3)
    public static let enhancedStatusCodes = SMTPExtensions(rawValue: 1 << 4)
    public static let dsn = SMTPExtensions(rawValue: 1 << 5)
    public static let chunking = SMTPExtensions(rawValue: 1 << 6)
    public static let startTLS = SMTPExtensions(rawValue: 1 << 7)
    public static let auth = SMTPExtensions(rawValue: 1 << 8)
    public static let requireTLS = SMTPExtensions(rawValue: 1 << 9)

    /// Everything Sealpost implements; STARTTLS, AUTH and REQUIRETLS are
    /// further gated by the session's TLS and authentication state.
    public static let all: SMTPExtensions = [.pipelining, .size, .eightBitMIME, .smtputf8, .enhancedStatusCodes,
                                             .dsn, .chunking, .startTLS, .auth, .requireTLS]
}

/// BODY= (RFC 6152). BINARYMIME is not offered.
public enum SMTPBodyType: String, Sendable, Hashable {
    case sevenBit = "7BIT"
    case eightBitMIME = "8BITMIME"
}

/// RET= (RFC 3461 section 4.3).
public enum DSNReturn: String, Sendable, Hashable {
    case full = "FULL"
    case headers = "HDRS"
}

/// NOTIFY= (RFC 3461 section 4.1): NEVER, or a non-empty subset of the three.
public struct DSNNotify: Sendable, Hashable, CustomStringConvertible {
    public var never: Bool
    public var success: Bool
    public var failure: Bool
    public var delay: Bool

    public static let never = DSNNotify(never: true, success: false, failure: false, delay: false)

    public init(never: Bool = false, success: Bool = false, failure: Bool = false, delay: Bool = false) {
        self.never = never
        self.success = success
        self.failure = failure
        self.delay = delay
    }

    /// "NEVER" or e.g. "SUCCESS,FAILURE", the form the queue protocol carries.
    public var description: String {
        if never { return "NEVER" }
        var parts: [String] = []
        if success { parts.append("SUCCESS") }
        if failure { parts.append("FAILURE") }
        if delay { parts.append("DELAY") }
        return parts.joined(separator: ",")
    }
}

/// ORCPT= (RFC 3461 section 4.2): address type and the xtext-decoded address.
public struct DSNOriginalRecipient: Sendable, Hashable, CustomStringConvertible {
    public var addressType: String
    public var address: String
    public init(addressType: String, address: String) {
        self.addressType = addressType
        self.address = address
    }
    /// "rfc822;user@example.org", the form the queue protocol carries.
    public var description: String { "\(addressType);\(address)" }
}

/// The parameters of an accepted MAIL command.
public struct SMTPMailParameters: Sendable, Hashable {
    public var size: UInt64?
    public var body: SMTPBodyType?
    public var smtputf8 = false
    public var ret: DSNReturn?
    /// xtext-decoded ENVID.
    public var envid: String?
    /// xtext-decoded AUTH= value ("<>" or an addr-spec), as the client sent it.
    public var auth: String?
    public var requireTLS = false
    public init() {}
}

/// The parameters of an accepted RCPT command.
public struct SMTPRecipientParameters: Sendable, Hashable {
    public var notify: DSNNotify?
    public var orcpt: DSNOriginalRecipient?
    public init() {}
}

/// One raw `keyword[=value]`; keyword upper-cased.
struct ESMTPParameter {
    var keyword: String
    var value: [UInt8]?
}

/// xtext (RFC 3461 section 4): printable ASCII except "+" and "=", which
/// travel as "+XX" with upper-case hex digits.
public enum XText {
    /// Strict decoding: nil on any byte outside xchar, a "+" not followed by
    /// two upper-case hex digits, or an empty input.
    public static func decode(_ bytes: some Collection<UInt8>) -> [UInt8]? {
        let input = Array(bytes)
        guard !input.isEmpty else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(input.count)
        var i = 0
        while i < input.count {
            let b = input[i]
            if b == UInt8(ascii: "+") {
                guard i + 2 < input.count, let hi = upperHex(input[i + 1]), let lo = upperHex(input[i + 2]) else { return nil }
                out.append(hi << 4 | lo)
                i += 3
            } else {
                guard (33...126).contains(b), b != UInt8(ascii: "=") else { return nil }
                out.append(b)
                i += 1
            }
        }
        return out
    }

    /// Encodes printable ASCII text; everything else as "+XX".
    public static func encode(_ bytes: some Collection<UInt8>) -> String {
        var out = ""
        let hex = Array("0123456789ABCDEF")
        for b in bytes {
            if (33...126).contains(b), b != UInt8(ascii: "+"), b != UInt8(ascii: "=") {
                out.append(Character(Unicode.Scalar(b)))
            } else {
                out.append("+")
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 15)])
            }
        }
        return out
    }

    static func upperHex(_ b: UInt8) -> UInt8? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return b - 48
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return b - 55
        default: return nil
        }
    }
}

/// What parameter parsing needs to know about the session.
struct ParameterContext {
    var offered: SMTPExtensions
    var maxMessageSize: UInt64?
    /// REQUIRETLS is configured but the session is not (yet) encrypted:
    /// the parameter gets 530 5.7.10 rather than 555.
    var requireTLSNeedsEncryption: Bool
}

enum ESMTPParameters {
    static let badSyntax = SMTPReply(501, "5.5.4", "Syntax error in parameters")

    /// Splits what follows the path. It must be empty or start with a space.
    static func split(_ bytes: ArraySlice<UInt8>) -> [ESMTPParameter]? {
        guard let first = bytes.first else { return [] }
        guard first == UInt8(ascii: " ") else { return nil }
        var result: [ESMTPParameter] = []
        for word in bytes.split(separator: UInt8(ascii: " ")) {
            let keyword: ArraySlice<UInt8>
            var value: [UInt8]?
            if let eq = word.firstIndex(of: UInt8(ascii: "=")) {
                keyword = word[word.startIndex..<eq]
                let v = word[(eq + 1)...]
                // esmtp-value = 1*(%d33-60 / %d62-126), RFC 6531 adds UTF-8.
                guard !v.isEmpty, v.allSatisfy({ ($0 >= 33 && $0 != 61) }) else { return nil }
                value = Array(v)
            } else {
                keyword = word
            }
            guard let k = keyword.first, isASCIIAlnum(k),
                  keyword.allSatisfy({ isASCIIAlnum($0) || $0 == UInt8(ascii: "-") }) else { return nil }
            result.append(ESMTPParameter(keyword: String(decoding: keyword.map(asciiUpper), as: UTF8.self), value: value))
        }
        return result
    }

    static func mail(_ params: [ESMTPParameter], _ ctx: ParameterContext) -> Result<SMTPMailParameters, SMTPReply> {
        var out = SMTPMailParameters()
        var seen = Set<String>()
        for p in params {
            guard seen.insert(p.keyword).inserted else {
                return .failure(SMTPReply(501, "5.5.4", "Duplicate parameter \(p.keyword)"))
            }
            switch p.keyword {
            case "SIZE" where ctx.offered.contains(.size):
                guard let v = p.value, v.count <= 20, v.allSatisfy(isASCIIDigit) else { return .failure(bad("SIZE")) }
                let size = v.reduce(UInt64(0)) { acc, d in
                    let (m, o1) = acc.multipliedReportingOverflow(by: 10)
                    let (s, o2) = m.addingReportingOverflow(UInt64(d - 48))
                    return o1 || o2 ? UInt64.max : s
                }
                if let max = ctx.maxMessageSize, size > max {
                    return .failure(SMTPReply(552, "5.3.4", "Message size exceeds fixed limit"))
                }
                out.size = size
            case "BODY" where ctx.offered.contains(.eightBitMIME):
                guard let v = p.value, let t = SMTPBodyType(rawValue: upper(v)) else {
                    return .failure(SMTPReply(501, "5.5.4", "Unsupported BODY type"))
                }
                out.body = t
            case "SMTPUTF8" where ctx.offered.contains(.smtputf8):
                guard p.value == nil else { return .failure(bad("SMTPUTF8")) }
                out.smtputf8 = true
            case "RET" where ctx.offered.contains(.dsn):
                guard let v = p.value, let r = DSNReturn(rawValue: upper(v)) else { return .failure(bad("RET")) }
                out.ret = r
            case "ENVID" where ctx.offered.contains(.dsn):
                guard let v = p.value, let text = decodePrintable(v, maxLength: 100) else { return .failure(bad("ENVID")) }
                out.envid = text
            case "AUTH" where ctx.offered.contains(.auth):
                guard let v = p.value, let text = decodePrintable(v, maxLength: 500) else { return .failure(bad("AUTH")) }
                out.auth = text
            case "REQUIRETLS" where ctx.offered.contains(.requireTLS):
                guard p.value == nil else { return .failure(bad("REQUIRETLS")) }
                out.requireTLS = true
            case "REQUIRETLS" where ctx.requireTLSNeedsEncryption:
                return .failure(SMTPReply(530, "5.7.10", "REQUIRETLS needs an encrypted session"))
            default:
                return .failure(SMTPReply(555, "5.5.4", "Unsupported parameter \(p.keyword)"))
            }
        }
        return .success(out)
    }

    static func recipient(_ params: [ESMTPParameter], _ ctx: ParameterContext) -> Result<SMTPRecipientParameters, SMTPReply> {
        var out = SMTPRecipientParameters()
        var seen = Set<String>()
        for p in params {
            guard seen.insert(p.keyword).inserted else {
                return .failure(SMTPReply(501, "5.5.4", "Duplicate parameter \(p.keyword)"))
            }
            switch p.keyword {
            case "NOTIFY" where ctx.offered.contains(.dsn):
                guard let v = p.value, let n = parseNotify(v) else { return .failure(bad("NOTIFY")) }
                out.notify = n
            case "ORCPT" where ctx.offered.contains(.dsn):
                guard let v = p.value, let o = parseORCPT(v) else { return .failure(bad("ORCPT")) }
                out.orcpt = o
            default:
                return .failure(SMTPReply(555, "5.5.4", "Unsupported parameter \(p.keyword)"))
            }
        }
        return .success(out)
    }

    static func bad(_ keyword: String) -> SMTPReply {
        SMTPReply(501, "5.5.4", "Bad \(keyword) parameter")
    }

    static func upper(_ v: [UInt8]) -> String { String(decoding: v.map(asciiUpper), as: UTF8.self) }

    /// xtext-decoded, then printable ASCII (space included) only.
    static func decodePrintable(_ v: [UInt8], maxLength: Int) -> String? {
        guard let decoded = XText.decode(v), decoded.count <= maxLength,
              decoded.allSatisfy({ (32...126).contains($0) }) else { return nil }
        return String(decoding: decoded, as: UTF8.self)
    }

    static func parseNotify(_ v: [UInt8]) -> DSNNotify? {
        var n = DSNNotify()
        let words = v.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false)
        for w in words {
            switch String(decoding: w.map(asciiUpper), as: UTF8.self) {
            case "NEVER" where words.count == 1: n.never = true
            case "SUCCESS" where !n.success: n.success = true
            case "FAILURE" where !n.failure: n.failure = true
            case "DELAY" where !n.delay: n.delay = true
            default: return nil
            }
        }
        return n
    }

    /// ORCPT = addr-type ";" xtext; addr-type an atom (rfc822, utf-8 ...).
    static func parseORCPT(_ v: [UInt8]) -> DSNOriginalRecipient? {
        guard v.count <= 500, let semi = v.firstIndex(of: UInt8(ascii: ";")) else { return nil }
        let type = v[..<semi]
        guard !type.isEmpty, type.count <= 32, type.allSatisfy({ isASCIIAlnum($0) || $0 == UInt8(ascii: "-") }),
              let address = decodePrintable(Array(v[(semi + 1)...]), maxLength: 500) else { return nil }
        return DSNOriginalRecipient(addressType: String(decoding: type, as: UTF8.self), address: address)
    }
}

@inline(__always) func asciiUpper(_ b: UInt8) -> UInt8 {
    (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) ? b - 32 : b
}
