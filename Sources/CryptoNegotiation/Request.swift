// NEGOTIATE requests (PROTOCOL.md section 4.5) as values, and the reply
// frames. The frame's schema was checked by the decoder; this adds what a
// schema cannot say (decoding TLSA records and pins into bytes).

import StageProtocol
import TLS

public struct NegotiationRequest: Sendable, Equatable {
    public enum Role: Sendable, Equatable {
        case server
        /// `ciphers`: `.opportunistic` when the request says the client
        /// falls back to clear text (`opportunistic`, policy `none`).
        case client(serverName: String?, policy: VerificationPolicy, caBundle: String, ciphers: TLSClientCiphers)
    }
    public var session: UInt64
    public var socket: Int32
    public var role: Role
    public var handshakeTimeout: Double?
    public var idleTimeout: Double?
    /// For logs only, e.g. "mx.example.net[192.0.2.1]:25".
    public var peer: String?
    /// Send CLOSED when the relayed session ends (the default).
    public var reportClose: Bool

    public init(_ frame: Frame) throws(ProtocolError) {
        guard frame.type == .negotiate else { throw ProtocolError("\(frame.type.name): expected NEGOTIATE") }
        session = try frame.uint("session")
        socket = try frame.fd("socket")
        peer = try frame.optionalText("peer")
        handshakeTimeout = try frame.optionalUInt("handshake-timeout").map { Double($0) }
        idleTimeout = try frame.optionalUInt("idle-timeout").map { Double($0) }
        reportClose = try frame.bool("report-close", default: true)
        guard try frame.text("role") == "client" else {
            role = .server
            return
        }
        let serverName = try frame.optionalText("server-name")
        let names = try frame.optionalText("match-names").map { $0.split(separator: ",").map { String($0).lowercased() } }
            ?? serverName.map { [$0.lowercased()] } ?? []
        let policy: VerificationPolicy
        switch try frame.optionalText("policy") ?? "none" {
        case "pkix":
            policy = .pkix(names: names)
        case "dane":
            policy = .dane(records: try Self.tlsaRecords(frame.bytes("tlsa")), names: names)
        case "pin":
            let pins = try frame.text("pins").split(separator: ",").map { Hex.decode($0)! }
            policy = .pin(spkiSHA256: pins)
        default:
            policy = .none
        }
        // The schema allows `opportunistic` only with policy none.
        let ciphers: TLSClientCiphers = try frame.bool("opportunistic", default: false) ? .opportunistic : .strict
        role = .client(serverName: serverName, policy: policy, caBundle: try frame.optionalText("ca") ?? "default",
                       ciphers: ciphers)
    }

    /// The `tlsa` attribute: records back to back (usage, selector,
    /// matching type, 2-byte length, data); well-formed per the schema.
    static func tlsaRecords(_ b: [UInt8]) throws(ProtocolError) -> [TLSARecord] {
        var out: [TLSARecord] = []
        var p = 0
        while p + 5 <= b.count {
            let n = Int(b[p + 3]) << 8 | Int(b[p + 4])
            guard p + 5 + n <= b.count else { throw ProtocolError("NEGOTIATE: attribute \"tlsa\": record runs past the end") }
            out.append(TLSARecord(usage: b[p], selector: b[p + 1], matchingType: b[p + 2], data: Array(b[p + 5 ..< p + 5 + n])))
            p += 5 + n
        }
        return out
    }

    /// Encodes records for the `tlsa` attribute (the inverse of decoding).
    public static func encodeTLSA(_ records: [TLSARecord]) -> [UInt8] {
        var out: [UInt8] = []
        for r in records {
            out += [r.usage, r.selector, r.matchingType, UInt8(r.data.count >> 8), UInt8(r.data.count & 0xff)]
            out += r.data
        }
        return out
    }
}

enum Replies {
    static func negotiated(session: UInt64, plaintext: Int32, _ r: TLSReport) -> Frame {
        Frame(.negotiated, attributes: [
            ("session", .uint(session)),
            ("plaintext", .fd(plaintext)),
            ("protocol", .text(r.protocolVersion)),
            ("cipher", .sanitizedText(r.cipher)),
            ("authentication", .text(r.authentication.rawValue)),
            ("resumed", .bool(r.resumed)),
        ])
        .with("group", r.group.map { .sanitizedText($0) })
        .with("server-name", r.serverName.map { .sanitizedText($0) })
        .with("peer-subject", r.peerSubject.map { .sanitizedText($0) })
        .with("peer-spki", r.peerSPKISHA256.map { .text($0) })
        .with("verify-error", r.verifyError.map { .sanitizedText($0) })
    }

    static func failed(session: UInt64, _ e: TLSError) -> Frame {
        Frame(.failed, attributes: [
            ("session", .uint(session)),
            ("status", .text(e.enhancedStatus)),
            ("text", .sanitizedText(e.message)),
        ])
        .with("verify-error", e.verifyError.map { .sanitizedText($0) })
    }

    static func closed(session: UInt64, _ s: RelaySummary) -> Frame {
        Frame(.closed, attributes: [
            ("session", .uint(session)),
            ("received", .uint(s.received)),
            ("sent", .uint(s.sent)),
            ("close-notify", .bool(s.closeNotify)),
            ("reason", .sanitizedText(s.reason)),
        ])
    }
}
