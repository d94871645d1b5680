// What a lookup returns: the records' RDATA with everything libunbound knows
// about the answer (response code, DNSSEC status, canonical name), and typed
// views of the RDATA.

/// A resource record type (RFC 1035 3.2.2 and later registrations).
public struct RRType: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let a = RRType(rawValue: 1)
    public static let ns = RRType(rawValue: 2)
    public static let cname = RRType(rawValue: 5)
    public static let soa = RRType(rawValue: 6)
    public static let ptr = RRType(rawValue: 12)
    public static let mx = RRType(rawValue: 15)
    public static let txt = RRType(rawValue: 16)
    public static let aaaa = RRType(rawValue: 28)
    public static let tlsa = RRType(rawValue: 52)

    public var description: String {
        switch self {
        case .a: return "A"
        case .ns: return "NS"
        case .cname: return "CNAME"
        case .soa: return "SOA"
        case .ptr: return "PTR"
        case .mx: return "MX"
        case .txt: return "TXT"
        case .aaaa: return "AAAA"
        case .tlsa: return "TLSA"
        default: return "TYPE\(rawValue)"   // RFC 3597 notation
        }
    }
}

/// The DNS response code (RFC 1035 4.1.1, RFC 6895).
public struct ResponseCode: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public var rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    public static let noError = ResponseCode(rawValue: 0)
    public static let formErr = ResponseCode(rawValue: 1)
    public static let servFail = ResponseCode(rawValue: 2)
    public static let nxDomain = ResponseCode(rawValue: 3)
    public static let notImp = ResponseCode(rawValue: 4)
    public static let refused = ResponseCode(rawValue: 5)

    public var description: String {
        switch self {
        case .noError: return "NOERROR"
        case .formErr: return "FORMERR"
        case .servFail: return "SERVFAIL"
        case .nxDomain: return "NXDOMAIN"
        case .notImp: return "NOTIMP"
        case .refused: return "REFUSED"
        default: return "RCODE\(rawValue)"
        }
    }
}

/// DNSSEC status of an answer (RFC 4033 5, RFC 4035 4.3).
///
/// libunbound reports "secure" and "bogus" itself. An answer that is neither
/// but came with a real response (NOERROR or NXDOMAIN) is `insecure`: no
/// trust anchor covers the name, or a validated chain proved the zone
/// unsigned. An answer without a usable response (SERVFAIL without a
/// validation failure, REFUSED, ...) is `indeterminate`: nothing is known.
public enum DNSSECStatus: Sendable, Hashable, CustomStringConvertible {
    case secure
    case insecure
    /// Validation failed; the reason is libunbound's why_bogus text.
    case bogus(reason: String)
    case indeterminate

    public var isSecure: Bool { self == .secure }
    public var isBogus: Bool { if case .bogus = self { return true } else { return false } }

    public var description: String {
        switch self {
        case .secure: return "secure"
        case .insecure: return "insecure"
        case .bogus(let reason): return reason.isEmpty ? "bogus" : "bogus (\(reason))"
        case .indeterminate: return "indeterminate"
        }
    }
}

/// Errors of the DNS module.
public enum DNSError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The query's deadline passed; it was cancelled.
    case timeout(name: String, type: RRType)
    /// libunbound refused or failed (ub_strerror text).
    case resolver(code: Int32, message: String)
    /// The resolver could not be configured as asked.
    case configuration(String)
    /// A file the configuration names (a trust anchor) is missing or
    /// unreadable; `reason` is strerror's text.
    case unreadableFile(path: String, reason: String)
    /// The name cannot be queried (not ASCII, bad label, too long).
    case invalidName(String, reason: String)
    /// A record's RDATA did not decode.
    case malformed(RDataError)
    /// DNSSEC validation failed: the records must not be used (RFC 4035
    /// 5.5); the raw RDATA stays in the answer for diagnostics only.
    case bogus(name: String, type: RRType, reason: String)

    /// True for failures that may go away on retry (RFC 5321 4.4.x deferral).
    public var isTemporary: Bool {
        switch self {
        case .timeout, .resolver, .bogus: return true
        case .configuration, .unreadableFile, .invalidName, .malformed: return false
        }
    }

    public var description: String {
        switch self {
        case .timeout(let name, let type): return "DNS lookup of \(name)/\(type) timed out"
        case .resolver(let code, let message): return "resolver error \(code): \(message)"
        case .configuration(let message): return "resolver configuration: \(message)"
        case .unreadableFile(let path, let reason): return "resolver configuration: cannot read \(path): \(reason)"
        case .invalidName(let name, let reason): return "invalid DNS name \"\(name)\": \(reason)"
        case .malformed(let error): return error.description
        case .bogus(let name, let type, let reason):
            return "DNSSEC validation of \(name)/\(type) failed" + (reason.isEmpty ? "" : ": \(reason)")
        }
    }
}

/// One answer from libunbound (a copy of struct ub_result).
public struct DNSAnswer: Sendable, Equatable, CustomStringConvertible {
    /// The name and type asked for.
    public var name: String
    public var type: RRType
    public var rcode: ResponseCode
    public var status: DNSSECStatus
    /// True when there are records of the type asked for.
    public var haveData: Bool
    public var nxDomain: Bool
    /// The name the records belong to after following CNAMEs (no trailing
    /// dot), when libunbound reports one.
    public var canonicalName: String?
    /// TTL of the answer, seconds.
    public var ttl: UInt32
    /// Each record's RDATA, as libunbound returned it (uncompressed).
    public var rdata: [[UInt8]]

    public init(name: String, type: RRType, rcode: ResponseCode, status: DNSSECStatus,
                haveData: Bool, nxDomain: Bool, canonicalName: String?, ttl: UInt32, rdata: [[UInt8]]) {
        self.name = name
        self.type = type
        self.rcode = rcode
        self.status = status
        self.haveData = haveData
        self.nxDomain = nxDomain
        self.canonicalName = canonicalName
        self.ttl = ttl
        self.rdata = rdata
    }

    /// NOERROR without records of the type: the name exists, the type does not.
    public var isNoData: Bool { rcode == .noError && !haveData }

    /// True when the canonical name differs from the name asked (a CNAME
    /// chain was followed).
    public var followedCNAME: Bool {
        guard let canonicalName else { return false }
        return canonicalName.lowercased() != DNSName.trimmed(name).lowercased()
    }

    public func mxRecords() throws(DNSError) -> [MXRecord] {
        try decode(.mx) { rdata throws(RDataError) in try MXRecord(rdata: rdata) }
    }
    public func ipv4Addresses() throws(DNSError) -> [IPv4Address] {
        try decode(.a) { rdata throws(RDataError) in try IPv4Address(rdata: rdata) }
    }
    public func ipv6Addresses() throws(DNSError) -> [IPv6Address] {
        try decode(.aaaa) { rdata throws(RDataError) in try IPv6Address(rdata: rdata) }
    }
    public func tlsaRecords() throws(DNSError) -> [TLSARecord] {
        try decode(.tlsa) { rdata throws(RDataError) in try TLSARecord(rdata: rdata) }
    }
    public func txtRecords() throws(DNSError) -> [TXTRecord] {
        try decode(.txt) { rdata throws(RDataError) in try TXTRecord(rdata: rdata) }
    }

    /// Each TLSA record decoded on its own: RFC 7672 2.2 treats a malformed
    /// record as unusable, not as a failure of the whole RRset. Check
    /// `status` first: bogus records must not be used.
    public func eachTLSARecord() -> [Result<TLSARecord, RDataError>] {
        rdata.map { rdata in Result { () throws(RDataError) in try TLSARecord(rdata: rdata) } }
    }

    private func decode<R>(_ expected: RRType, _ decoder: ([UInt8]) throws(RDataError) -> R) throws(DNSError) -> [R] {
        guard type == expected else {
            throw .malformed(RDataError(type: expected, reason: "answer is for type \(type)"))
        }
        if case .bogus(let reason) = status {
            throw .bogus(name: name, type: type, reason: reason)
        }
        var records: [R] = []
        records.reserveCapacity(rdata.count)
        for bytes in rdata {
            do {
                records.append(try decoder(bytes))
            } catch {
                throw .malformed(error)
            }
        }
        return records
    }

    public var description: String {
        var text = "\(name)/\(type): \(rcode), \(status), \(rdata.count) record(s)"
        if followedCNAME, let canonicalName { text += ", canonical name \(canonicalName)" }
        return text
    }
}

/// Checks on names before they reach libunbound, which parses presentation
/// format (so "\\046" or a space would otherwise mean something else).
public enum DNSName {
    /// Without a trailing dot.
    public static func trimmed(_ name: String) -> String {
        name.hasSuffix(".") && name != "." ? String(name.dropLast()) : name
    }

    /// Accepts ASCII names of letters, digits, '-' and '_' in labels of 1 to
    /// 63 octets, 253 characters at most (a trailing dot allowed). IDNs must
    /// arrive as A-labels (xn--...).
    public static func validate(_ name: String) throws(DNSError) {
        let body = trimmed(name)
        guard !body.isEmpty, body != "." else { throw .invalidName(name, reason: "empty name") }
        guard body.utf8.count <= 253 else { throw .invalidName(name, reason: "longer than 253 characters") }
        for label in body.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard !label.isEmpty else { throw .invalidName(name, reason: "empty label") }
            guard label.count <= 63 else { throw .invalidName(name, reason: "label longer than 63 characters") }
            for byte in label {
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                     UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
                    continue
                default:
                    throw .invalidName(name, reason: byte >= 0x80
                        ? "not ASCII (convert IDNs to A-labels)"
                        : "character 0x\(String(byte, radix: 16)) not allowed")
                }
            }
        }
    }
}
