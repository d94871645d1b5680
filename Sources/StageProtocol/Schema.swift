// The schema of PROTOCOL.md section 4 as data: per protocol and direction,
// which frame types may travel, which attributes each defines, their value
// types, which are required, and the few value rules the page states
// (enumerations, ranges, RFC 3463 status codes). The decoder checks every
// received frame against it; StageConnection and FrameEncoderHandler check
// every frame they send, so nothing the peer would reject leaves a stage.
//
// The schema is public so that a later protocol (the TLS channel of
// crypto-negotiate, which will pass descriptors) can be described the same
// way and decoded by the same decoder.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One attribute a frame type defines.
public struct AttributeRule: Sendable {
    public var name: String
    public var type: ValueType
    public var required: Bool
    /// Extra check of the value; returns what is wrong, or nil.
    public var check: (@Sendable (AttributeValue) -> String?)?

    public init(_ name: String, _ type: ValueType, required: Bool = false,
                check: (@Sendable (AttributeValue) -> String?)? = nil) {
        self.name = name
        self.type = type
        self.required = required
        self.check = check
    }
}

/// The attributes of one frame type in one protocol and direction.
public struct FrameRule: Sendable {
    public var attributes: [String: AttributeRule] {
        didSet { requiredNames = Self.requiredNames(attributes) }
    }
    /// The names of the required attributes, sorted (the first missing
    /// one is reported): checked for every frame, without going through
    /// every attribute the type defines.
    public private(set) var requiredNames: [String]
    /// A check across attributes (e.g. `queue-id` required for some verbs);
    /// returns what is wrong, or nil.
    public var check: (@Sendable (Frame) -> String?)?

    public init(_ attributes: [AttributeRule], check: (@Sendable (Frame) -> String?)? = nil) {
        var map: [String: AttributeRule] = [:]
        for a in attributes { map[a.name] = a }
        self.attributes = map
        self.requiredNames = Self.requiredNames(map)
        self.check = check
    }

    private static func requiredNames(_ attributes: [String: AttributeRule]) -> [String] {
        attributes.values.filter(\.required).map(\.name).sorted()
    }
}

/// What may travel in one protocol, per direction.
public struct ProtocolSchema: Sendable {
    /// The value of the `protocol` attribute of its HELLO.
    public var name: String
    public var clientToServer: [FrameType: FrameRule]
    public var serverToClient: [FrameType: FrameRule]

    public init(name: String, clientToServer: [FrameType: FrameRule], serverToClient: [FrameType: FrameRule]) {
        self.name = name
        self.clientToServer = clientToServer
        self.serverToClient = serverToClient
    }

    public func rules(_ direction: Direction) -> [FrameType: FrameRule] {
        direction == .clientToServer ? clientToServer : serverToClient
    }

    /// The schema of a version-1 protocol of PROTOCOL.md.
    public static func standard(_ name: ProtocolName) -> ProtocolSchema {
        switch name {
        case .inject: Standard.inject
        case .deliver: Standard.deliver
        case .control: Standard.control
        case .tls: Standard.tls
        }
    }

    /// Checks a complete frame against this schema (not the framing rules,
    /// see `FrameEncoder.checkFraming`). Messages name frame, attribute, rule.
    public func validate(_ frame: Frame, direction: Direction) throws(ProtocolError) {
        let t = frame.type.name
        guard let rule = rules(direction)[frame.type] else {
            throw ProtocolError("\(t): not allowed in protocol \(name) from \(direction)")
        }
        for (attrName, value) in frame.attributes {
            guard let a = rule.attributes[attrName] else {
                throw ProtocolError("\(t): attribute \"\(attrName)\" is not defined for \(t) in protocol \(name) (\(direction))")
            }
            guard value.type == a.type else {
                throw ProtocolError("\(t): attribute \"\(attrName)\": expected \(a.type), got \(value.type)")
            }
            if let check = a.check, let problem = check(value) {
                throw ProtocolError("\(t): attribute \"\(attrName)\": \(problem)")
            }
        }
        // Required attributes; when one is missing, the first by name is
        // reported (a stable message).
        for name in rule.requiredNames where frame[name] == nil {
            throw ProtocolError("\(t): required attribute \"\(name)\" is missing")
        }
        if let check = rule.check, let problem = check(frame) {
            throw ProtocolError("\(t): \(problem)")
        }
    }
}

// MARK: - Value checks

/// Value rules shared by the standard schemas; each returns what is wrong.
enum Checks {
    static func quoted(_ s: String) -> String {
        var shown = s.unicodeScalars.prefix(64).map { $0.isASCII && $0.value >= 0x20 && $0 != "\"" && $0 != "\\" ? String($0) : $0.escaped(asASCII: true) }.joined()
        if s.unicodeScalars.count > 64 { shown += "..." }
        return "\"\(shown)\""
    }

    static func oneOf(_ allowed: [String]) -> @Sendable (AttributeValue) -> String? {
        { value in
            guard case .text(let s) = value else { return nil }
            if allowed.contains(s) { return nil }
            let list = allowed.count == 2 ? "\(allowed[0]) or \(allowed[1])"
                : allowed.dropLast().joined(separator: ", ") + " or " + allowed.last!
            return "must be \(list), got \(quoted(s))"
        }
    }

    static func range(_ r: ClosedRange<UInt64>) -> @Sendable (AttributeValue) -> String? {
        { value in
            guard case .uint(let v) = value else { return nil }
            return r.contains(v) ? nil : "must be \(r.lowerBound)..\(r.upperBound), got \(v)"
        }
    }

    static let nonEmptyText: @Sendable (AttributeValue) -> String? = { value in
        if case .text(let s) = value, s.isEmpty { return "must not be empty" }
        return nil
    }

    static let nonEmptyBytes: @Sendable (AttributeValue) -> String? = { value in
        if case .bytes(let b) = value, b.isEmpty { return "must hold 1..65536 bytes, got 0" }
        return nil
    }

    /// RFC 3463: class "." subject "." detail; class 2, 4 or 5, subject and
    /// detail 1 to 3 digits.
    static let enhancedStatus: @Sendable (AttributeValue) -> String? = { value in
        guard case .text(let s) = value else { return nil }
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        let ok = parts.count == 3 && ["2", "4", "5"].contains(parts[0])
            && parts[1...].allSatisfy { (1...3).contains($0.count) && $0.allSatisfy { $0.isASCII && $0.isNumber } }
        return ok ? nil : "not an RFC 3463 status code (class.subject.detail, e.g. 4.3.0): \(quoted(s))"
    }

    /// RFC 3461 NOTIFY: NEVER, or a comma-separated subset of SUCCESS,
    /// FAILURE, DELAY (each at most once).
    static let notify: @Sendable (AttributeValue) -> String? = { value in
        guard case .text(let s) = value else { return nil }
        if s == "NEVER" { return nil }
        let items = s.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let known = ["SUCCESS", "FAILURE", "DELAY"]
        if !items.isEmpty, items.allSatisfy(known.contains), Set(items).count == items.count { return nil }
        return "must be NEVER or a comma-separated subset of SUCCESS, FAILURE, DELAY, got \(quoted(s))"
    }
}

// MARK: - The standard schemas (PROTOCOL.md section 4)

enum Standard {
    typealias R = AttributeRule

    static let protocolNames = ProtocolName.allCases.map(\.rawValue)

    static func helloClient(_ extra: [AttributeRule] = []) -> FrameRule {
        FrameRule([
            R("protocol", .text, required: true, check: Checks.oneOf(protocolNames)),
            R("version", .uint, required: true),
            R("software", .text),
        ] + extra)
    }

    static let helloServer = helloClient()

    static let error = FrameRule([
        R("status", .text, required: true, check: Checks.enhancedStatus),
        R("text", .text, required: true),
    ])

    /// What is checked before the protocol is known: a HELLO naming none
    /// of the protocols is refused by its `protocol` rule.
    static let beforeHello = ProtocolSchema(
        name: "(before HELLO)",
        clientToServer: [.hello: helloClient(), .error: error],
        serverToClient: [.hello: helloServer, .error: error])

    static let body = FrameRule([R("data", .bytes, required: true, check: Checks.nonEmptyBytes)])

    /// Envelope options shared by MAIL and JOB.
    static let envelopeOptions: [AttributeRule] = [
        R("ret", .text, check: Checks.oneOf(["FULL", "HDRS"])),
        R("envid", .text),
        R("requiretls", .bool),
        R("smtputf8", .bool),
        R("body-type", .text, check: Checks.oneOf(["7BIT", "8BITMIME", "BINARYMIME"])),
    ]

    static let recipientOptions: [AttributeRule] = [
        R("notify", .text, check: Checks.notify),
        R("orcpt", .text),
    ]

    /// The queue ID reserved for the connection's next MAIL.
    static let nextQueueID = R("next-queue-id", .text, check: Checks.nonEmptyText)

    static let inject = ProtocolSchema(
        name: "inject",
        clientToServer: [
            // Opt-in: the server reserves queue IDs for this connection's
            // MAILs (`next-queue-id`, PROTOCOL.md 4.2).
            .hello: helloClient([R("reserve-ids", .bool)]),
            .error: error,
            .mail: FrameRule([
                R("sender", .text, required: true),
                R("client-address", .text), R("client-name", .text), R("helo", .text),
                R("protocol", .text), R("auth-user", .text), R("size", .uint),
                // Opt-in: answer this MAIL with QUEUE-ID (PROTOCOL.md 4.2).
                R("announce-id", .bool),
                // The ID the server reserved for this connection.
                R("queue-id", .text, check: Checks.nonEmptyText),
            ] + envelopeOptions),
            .rcpt: FrameRule([R("address", .text, required: true, check: Checks.nonEmptyText)] + recipientOptions),
            .body: body,
            .end: FrameRule([]),
            .abort: FrameRule([]),
        ],
        serverToClient: [
            .hello: helloClient([nextQueueID]),
            .error: error,
            .accepted: FrameRule([R("queue-id", .text, required: true, check: Checks.nonEmptyText), nextQueueID]),
            .queueID: FrameRule([R("queue-id", .text, required: true, check: Checks.nonEmptyText)]),
            .refused: FrameRule([
                R("code", .uint, required: true, check: Checks.range(400...599)),
                R("status", .text, required: true, check: Checks.enhancedStatus),
                R("text", .text, required: true),
                nextQueueID,
            ]),
        ])

    static let deliver = ProtocolSchema(
        name: "deliver",
        clientToServer: [
            .hello: helloClient([
                R("transport", .text, required: true, check: Checks.oneOf(["local", "remote"])),
                R("max-jobs", .uint, check: Checks.range(1...256)),
            ]),
            .error: error,
            .result: FrameRule([
                R("job", .uint, required: true),
                R("index", .uint, required: true),
                R("status", .text, required: true, check: Checks.oneOf(["sent", "deferred", "bounced"])),
                R("dsn", .text, required: true, check: Checks.enhancedStatus),
                R("text", .text, required: true),
                R("relay", .text), R("remote-mta", .text), R("diagnostic", .text),
            ]),
            .jobDone: FrameRule([R("job", .uint, required: true)]),
        ],
        serverToClient: [
            .hello: helloServer,
            .error: error,
            .job: FrameRule([
                R("job", .uint, required: true),
                R("queue-id", .text, required: true, check: Checks.nonEmptyText),
                R("sender", .text, required: true),
                R("arrival", .uint, required: true),
                R("size", .uint, required: true),
                R("attempt", .uint, required: true, check: Checks.range(1...UInt64.max)),
                R("nexthop", .text),
            ] + envelopeOptions),
            .jobRcpt: FrameRule([
                R("index", .uint, required: true),
                R("address", .text, required: true, check: Checks.nonEmptyText),
            ] + recipientOptions),
            .body: body,
            .jobEnd: FrameRule([R("job", .uint, required: true)]),
        ])

    static let control = ProtocolSchema(
        name: "control",
        clientToServer: [
            .hello: helloClient(),
            .error: error,
            .request: FrameRule([
                R("verb", .text, required: true,
                  check: Checks.oneOf(["list", "show", "flush", "delete", "hold", "release", "stats"])),
                R("queue-id", .text, check: Checks.nonEmptyText),
                R("bounce", .bool),
                R("all", .bool),
            ], check: { frame in
                guard case .text(let verb)? = frame["verb"] else { return nil }
                if case .bool(true)? = frame["all"] {
                    guard ControlVerbs.forAll.contains(verb) else { return "attribute \"all\" is not allowed for verb \"\(verb)\"" }
                    if frame["queue-id"] != nil { return "attributes \"all\" and \"queue-id\" exclude each other" }
                    return nil
                }
                if ControlVerbs.needingID.contains(verb), frame["queue-id"] == nil {
                    return "attribute \"queue-id\" is required for verb \"\(verb)\""
                }
                return nil
            }),
        ],
        serverToClient: [
            .hello: helloServer,
            .error: error,
            .entry: FrameRule([
                R("queue-id", .text, required: true, check: Checks.nonEmptyText),
                R("size", .uint, required: true),
                R("arrival", .uint, required: true),
                R("sender", .text, required: true),
                R("held", .bool, required: true),
                R("envid", .text),
                R("ret", .text, check: Checks.oneOf(["FULL", "HDRS"])),
            ]),
            .entryRcpt: FrameRule([
                R("address", .text, required: true),
                R("state", .text, required: true, check: Checks.oneOf(["pending", "deferred", "sent", "bounced"])),
                R("attempts", .uint, required: true),
                R("next-attempt", .uint, required: true),
                R("error", .text),
            ]),
            .body: body,
            .done: FrameRule([
                R("ok", .bool, required: true),
                R("text", .text, required: true),
            ]),
        ])
}

// MARK: - The tls protocol (PROTOCOL.md section 4.5)

extension Checks {
    /// Comma-separated list of non-empty items, each checked by `item`.
    static func list(_ what: String, _ item: @escaping @Sendable (Substring) -> Bool) -> @Sendable (AttributeValue) -> String? {
        { value in
            guard case .text(let s) = value else { return nil }
            let items = s.split(separator: ",", omittingEmptySubsequences: false)
            if !items.isEmpty, items.allSatisfy({ !$0.isEmpty && item($0) }) { return nil }
            return "must be a comma-separated list of \(what), got \(quoted(s))"
        }
    }

    /// A DNS name as TLS uses it: LDH labels (and `_` for service names),
    /// 1..63 bytes each, at most 253 bytes, no trailing dot.
    static func isHostName(_ s: Substring) -> Bool {
        guard (1...253).contains(s.utf8.count) else { return false }
        return s.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            (1...63).contains(label.utf8.count) && label.utf8.allSatisfy { b in
                (b >= 0x61 && b <= 0x7a) || (b >= 0x41 && b <= 0x5a) || (b >= 0x30 && b <= 0x39) || b == 0x2d || b == 0x5f
            }
        }
    }

    /// A reference name for certificate checks: a host name, or one with a
    /// leading dot for "any name under it" (OpenSSL's X509_check_host;
    /// Postfix's "secure" level matches the next-hop domain and
    /// ".domain"), or the IPv6 address of a next hop given as one
    /// ("smtp:[2001:db8::1] tls=verify"), which the TLS module matches
    /// against the certificate's iPAddress names. (A dotted IPv4 address
    /// already passes as a host name, and is matched as an address too.)
    static func isMatchName(_ s: Substring) -> Bool {
        isHostName(s.hasPrefix(".") ? s.dropFirst() : s) || isIPv6Address(s)
    }

    static func isIPv6Address(_ s: Substring) -> Bool {
        // inet_pton reads a C string: a NUL would end the text early.
        guard s.utf8.count <= 45, s.contains(":"), !s.utf8.contains(0) else { return false }
        var address = in6_addr()
        return inet_pton(AF_INET6, String(s), &address) == 1
    }

    static let hostName: @Sendable (AttributeValue) -> String? = { value in
        guard case .text(let s) = value else { return nil }
        return isHostName(Substring(s)) ? nil : "not a DNS host name: \(quoted(s))"
    }

    /// TLSA records back to back: usage, selector, matching type (one byte
    /// each), a 2-byte big-endian length, then that many bytes of data.
    static let tlsaRecords: @Sendable (AttributeValue) -> String? = { value in
        guard case .bytes(let b) = value else { return nil }
        var p = 0
        var count = 0
        while p < b.count {
            guard b.count - p >= 5 else { return "TLSA record \(count + 1) is cut short" }
            let n = Int(b[p + 3]) << 8 | Int(b[p + 4])
            guard n >= 1 else { return "TLSA record \(count + 1) has no data" }
            guard b.count - p - 5 >= n else { return "TLSA record \(count + 1) runs past the end" }
            p += 5 + n
            count += 1
        }
        return count == 0 ? "must hold at least one TLSA record" : nil
    }

    static func isSHA256Hex(_ s: Substring) -> Bool {
        s.utf8.count == 64 && s.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }
}

extension Standard {
    static let tlsClientOnly = ["policy", "match-names", "tlsa", "pins", "ca", "opportunistic"]

    static let tls = ProtocolSchema(
        name: "tls",
        clientToServer: [
            .hello: helloClient(),
            .error: error,
            .negotiate: FrameRule([
                R("session", .uint, required: true),
                R("socket", .fd, required: true),
                R("role", .text, required: true, check: Checks.oneOf(["server", "client"])),
                R("server-name", .text, check: Checks.hostName),
                R("policy", .text, check: Checks.oneOf(["none", "pkix", "dane", "pin"])),
                R("match-names", .text, check: Checks.list("host names (a leading dot: any name under it) or IP addresses", Checks.isMatchName)),
                R("tlsa", .bytes, check: Checks.tlsaRecords),
                R("pins", .text, check: Checks.list("SPKI SHA-256 digests (64 lower-case hex digits)", Checks.isSHA256Hex)),
                R("ca", .text, check: Checks.nonEmptyText),
                R("handshake-timeout", .uint, check: Checks.range(1...3600)),
                R("idle-timeout", .uint, check: Checks.range(1...86400)),
                R("peer", .text),
                R("report-close", .bool),
                R("opportunistic", .bool),
            ], check: { frame in
                let role = frame["role"]
                if role == .text("server") {
                    for name in tlsClientOnly where frame[name] != nil {
                        return "attribute \"\(name)\" is only for role \"client\""
                    }
                    return nil
                }
                let policy: String
                if case .text(let p)? = frame["policy"] { policy = p } else { policy = "none" }
                if policy != "dane" && frame["tlsa"] != nil {
                    return "attribute \"tlsa\" needs policy \"dane\""
                }
                if policy != "pin" && frame["pins"] != nil {
                    return "attribute \"pins\" needs policy \"pin\""
                }
                // The wider cipher list is for encryption in place of
                // clear text, never for a handshake that authenticates.
                if policy != "none" && frame["opportunistic"] == .bool(true) {
                    return "attribute \"opportunistic\" needs policy \"none\""
                }
                switch policy {
                case "dane" where frame["tlsa"] == nil:
                    return "attribute \"tlsa\" is required for policy \"dane\""
                case "pin" where frame["pins"] == nil:
                    return "attribute \"pins\" is required for policy \"pin\""
                case "pkix" where frame["server-name"] == nil && frame["match-names"] == nil:
                    return "policy \"pkix\" needs \"server-name\" or \"match-names\""
                default:
                    return nil
                }
            }),
        ],
        serverToClient: [
            .hello: helloServer,
            .error: error,
            .negotiated: FrameRule([
                R("session", .uint, required: true),
                R("plaintext", .fd, required: true),
                R("protocol", .text, required: true, check: Checks.oneOf(["TLSv1.2", "TLSv1.3"])),
                R("cipher", .text, required: true, check: Checks.nonEmptyText),
                R("group", .text),
                R("server-name", .text),
                R("peer-subject", .text),
                R("peer-spki", .text, check: Checks.list("SPKI SHA-256 digests", Checks.isSHA256Hex)),
                R("authentication", .text, required: true,
                  check: Checks.oneOf(["encrypted", "pkix", "dane-ee", "dane-ta", "pin"])),
                R("verify-error", .text),
                R("resumed", .bool),
            ]),
            .failed: FrameRule([
                R("session", .uint, required: true),
                R("status", .text, required: true, check: Checks.enhancedStatus),
                R("text", .text, required: true),
                R("verify-error", .text),
                R("protocol", .text),
                R("peer-subject", .text),
                R("peer-spki", .text, check: Checks.list("SPKI SHA-256 digests", Checks.isSHA256Hex)),
            ]),
            .closed: FrameRule([
                R("session", .uint, required: true),
                R("received", .uint, required: true),
                R("sent", .uint, required: true),
                R("close-notify", .bool, required: true),
                R("reason", .text, required: true),
            ]),
        ])
}

// MARK: - The certificate channel (PROTOCOL.md section 7)

extension ProtocolSchema {
    /// The supervisor -> crypto-negotiate certificate channel: no HELLO
    /// (the channel is announced by SEALPOST_CERTIFICATE_FD), one frame
    /// type, from the supervisor only (direction `serverToClient`).
    public static let certificates = Standard.certificates

    /// Pairs one CERTIFICATES frame may carry: two descriptors each, within
    /// the 16 descriptors of a frame (section 5).
    public static let maximumCertificatePairs = 8
}

extension Standard {
    static let certificates: ProtocolSchema = {
        let pairs = ProtocolSchema.maximumCertificatePairs
        var rules = [R("count", .uint, required: true, check: Checks.range(1...UInt64(pairs))), R("reason", .text)]
        for i in 1...pairs {
            rules.append(R("cert-\(i)", .fd))
            rules.append(R("key-\(i)", .fd))
        }
        return ProtocolSchema(name: "certificates", clientToServer: [:], serverToClient: [
            .certificates: FrameRule(rules, check: { frame in
                guard case .uint(let count)? = frame["count"] else { return nil }
                for i in 1...pairs {
                    let wanted = UInt64(i) <= count
                    for name in ["cert-\(i)", "key-\(i)"] where (frame[name] != nil) != wanted {
                        return wanted ? "attribute \"\(name)\" is required with count \(count)"
                                      : "attribute \"\(name)\" is beyond count \(count)"
                    }
                }
                return nil
            }),
        ])
    }()
}

/// The `control` protocol's verbs by what they take (PROTOCOL.md 4.4), for
/// the schema and the queue's handler alike.
public enum ControlVerbs {
    /// A REQUEST with these verbs names its message (`queue-id`)...
    public static let needingID: Set<String> = ["show", "delete", "hold", "release"]
    /// ...unless, for these, it sets `all`: every message at once.
    public static let forAll: Set<String> = ["delete", "hold", "release"]
}
