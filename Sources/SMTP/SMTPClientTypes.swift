/// The vocabulary of the SMTP client state machine (`SMTPClientSession`):
/// its policy, the message it is asked to deliver, the actions it hands to
/// its I/O layer, the per-recipient and per-message results, session
/// failures, and the protocol phases with their RFC 5321 timeouts.

/// How this connection uses TLS (RFC 3207, RFC 7435). Host authentication
/// (DANE, PKIX, pins) is enforced by crypto-negotiate; the machine only
/// learns from `SMTPClientTLSReport` whether the peer was authenticated.
public enum SMTPClientTLSMode: String, Sendable, Hashable {
    /// Never STARTTLS (policy "none"), except for a message that carries
    /// REQUIRETLS, which may only travel over TLS anyway.
    case none
    /// STARTTLS when offered; clear text otherwise (policy "may").
    case opportunistic
    /// STARTTLS or no delivery: 4.7.4 when the host does not offer it
    /// (policies "encrypt", "dane", "verify", ...).
    case required
}

/// AUTH PLAIN credentials for a smarthost (RFC 4954, RFC 4616).
public struct SMTPClientCredentials: Sendable, Hashable, CustomStringConvertible {
    public var username: String
    public var password: String
    /// PLAIN authorization identity; nil or empty: act as `username`.
    public var authorizationIdentity: String?

    public init(username: String, password: String, authorizationIdentity: String? = nil) {
        self.username = username
        self.password = password
        self.authorizationIdentity = authorizationIdentity
    }

    /// Never prints the password.
    public var description: String { "PLAIN user=\(username)" }
}

/// Limits on what the server may send in one reply (bounded memory: a
/// hostile or broken server cannot make the client buffer without end).
public struct SMTPClientReplyLimits: Sendable, Hashable {
    /// Lines in one reply (an EHLO reply has a dozen or two).
    public var maxLines = 100
    /// Bytes in one reply, all lines and line ends included.
    public var maxBytes = 65536
    /// Bytes in one line, without its line end (RFC 5321 4.5.3.1.5 says
    /// 512; real servers exceed it, so be generous but bounded).
    public var maxLineLength = 2048

    public init() {}
}

/// What a connection may do. One policy per connection: the I/O layer
/// builds it from the destination policy and the configuration.
public struct SMTPClientPolicy: Sendable, Hashable {
    /// The name this client gives in EHLO/HELO.
    public var hostname: String
    public var tls: SMTPClientTLSMode = .opportunistic
    /// AUTH PLAIN with these (smarthosts). Sent only once TLS is active,
    /// unless `allowAuthenticationWithoutTLS` (a smarthost on loopback).
    public var credentials: SMTPClientCredentials?
    public var allowAuthenticationWithoutTLS = false
    /// Use PIPELINING (RFC 2920) when the host offers it.
    public var pipelining = true
    /// A message declared BODY=8BITMIME, to a host that does not offer
    /// 8BITMIME (RFC 6152 section 3: downgrade to 7 bit or return it).
    public var eightBitWithout8BITMIME: SMTPEightBitPolicy = .convert
    public var limits = SMTPClientReplyLimits()

    public init(hostname: String) {
        self.hostname = hostname
    }
}

/// What the client does with a message declared BODY=8BITMIME when the
/// host does not offer 8BITMIME (`[remote] eight_bit_without_8bitmime`).
public enum SMTPEightBitPolicy: String, Sendable, Hashable, CaseIterable {
    /// Convert the 8-bit MIME parts to quoted-printable (`.downgradeBody`),
    /// what RFC 6152 section 3 asks and what Postfix does by default
    /// (disable_mime_output_conversion = no). DKIM signatures over the
    /// converted parts break; that is the accepted price.
    case convert
    /// Send the 8-bit data unchanged, without BODY= (Postfix with
    /// disable_mime_output_conversion = yes): most servers take it, but it
    /// violates RFC 6152. The message result carries a note for the log.
    case send
    /// Bounce with 5.6.3 ("conversion required but not supported").
    case bounce
}

/// The I/O layer's answer to `.downgradeBody` when the body could be made
/// 7-bit (`SMTPClientSession.bodyDowngraded(_:)`).
public struct SMTPBodyDowngrade: Sendable, Hashable {
    /// The size of the body that will be streamed (SIZE=, and the check
    /// against the host's limit).
    public var size: UInt64
    /// Parts re-encoded as quoted-printable (0: the body had nothing to
    /// convert and goes as it was).
    public var convertedParts: Int
    /// What stayed 8-bit and why, for the log ("8-bit header fields sent
    /// unchanged").
    public var remarks: [String]

    public init(size: UInt64, convertedParts: Int, remarks: [String] = []) {
        self.size = size
        self.convertedParts = convertedParts
        self.remarks = remarks
    }
}

/// One recipient of a message (PROTOCOL.md `JOB-RCPT`).
public struct SMTPClientRecipient: Sendable, Hashable {
    /// The job's recipient index; results name it.
    public var index: Int
    /// The address without angle brackets.
    public var address: String
    public var notify: DSNNotify?
    /// ORCPT, xtext-decoded (the machine encodes it).
    public var orcpt: DSNOriginalRecipient?

    public init(index: Int, address: String, notify: DSNNotify? = nil, orcpt: DSNOriginalRecipient? = nil) {
        self.index = index
        self.address = address
        self.notify = notify
        self.orcpt = orcpt
    }
}

/// One message to deliver (PROTOCOL.md `JOB`); the body is streamed
/// separately, on `.sendBody`.
public struct SMTPClientMessage: Sendable, Hashable {
    /// The reverse path without angle brackets; empty for the null sender.
    public var sender: String
    public var recipients: [SMTPClientRecipient]
    /// The size of the body in bytes (SIZE=, RFC 1870).
    public var size: UInt64
    public var bodyType: SMTPBodyType?
    /// The message needs SMTPUTF8 (RFC 6531). Also implied by a non-ASCII
    /// sender or recipient address.
    public var smtputf8: Bool
    public var ret: DSNReturn?
    /// ENVID, xtext-decoded (the machine encodes it).
    public var envid: String?
    /// REQUIRETLS (RFC 8689): authenticated TLS and a host that offers
    /// REQUIRETLS, or no delivery.
    public var requireTLS: Bool

    public init(sender: String, recipients: [SMTPClientRecipient], size: UInt64, bodyType: SMTPBodyType? = nil,
                smtputf8: Bool = false, ret: DSNReturn? = nil, envid: String? = nil, requireTLS: Bool = false) {
        self.sender = sender
        self.recipients = recipients
        self.size = size
        self.bodyType = bodyType
        self.smtputf8 = smtputf8
        self.ret = ret
        self.envid = envid
        self.requireTLS = requireTLS
    }

    /// SMTPUTF8 is needed: flagged, or an address is not ASCII.
    public var needsSMTPUTF8: Bool {
        smtputf8 || !sender.utf8.allSatisfy { $0 < 0x80 }
            || recipients.contains { !$0.address.utf8.allSatisfy { $0 < 0x80 } }
    }
}

/// What crypto-negotiate reported about the handshake, reduced to what the
/// SMTP client needs (the TLS module's `TLSReport` maps onto it; SMTP has
/// no dependencies).
public struct SMTPClientTLSReport: Sendable, Hashable, CustomStringConvertible {
    public var protocolVersion: String
    public var cipher: String
    /// The peer was authenticated per the destination policy (DANE, PKIX
    /// with names, pin): what REQUIRETLS demands (RFC 8689 section 4.2.1).
    public var peerAuthenticated: Bool

    public init(protocolVersion: String, cipher: String, peerAuthenticated: Bool) {
        self.protocolVersion = protocolVersion
        self.cipher = cipher
        self.peerAuthenticated = peerAuthenticated
    }

    public var description: String {
        "\(peerAuthenticated ? "Verified" : "Untrusted") TLS connection: \(protocolVersion) \(cipher)"
    }
}

/// Where the conversation is. The I/O layer picks its read timeout from it
/// (`timeoutSeconds`), and results name it ("in reply to RCPT TO command").
public enum SMTPClientPhase: String, Sendable, Hashable, CustomStringConvertible {
    case greeting, ehlo, helo, startTLS, tlsHandshake, auth, rset
    case mailFrom, rcptTo, dataInit, dataBlock, dataTermination
    /// Between messages: nothing expected (the connection cache's time).
    case idle
    case quit, closed

    /// RFC 5321 section 4.5.3.2 (and Postfix's defaults where the RFC is
    /// silent: EHLO, STARTTLS, AUTH, RSET, QUIT). nil: no reply awaited.
    /// `.dataBlock` is the limit for each write of body data.
    public var timeoutSeconds: Int? {
        switch self {
        case .greeting: return 300
        case .ehlo, .helo, .startTLS, .auth, .mailFrom, .rcptTo: return 300
        case .tlsHandshake: return 300
        case .rset, .quit: return 300
        case .dataInit: return 120
        case .dataBlock: return 180
        case .dataTermination: return 600
        case .idle, .closed: return nil
        }
    }

    /// For logs and DSNs: "in reply to RCPT TO command".
    public var description: String {
        switch self {
        case .greeting: return "while receiving the initial server greeting"
        case .ehlo: return "in reply to EHLO command"
        case .helo: return "in reply to HELO command"
        case .startTLS: return "in reply to STARTTLS command"
        case .tlsHandshake: return "while performing the TLS handshake"
        case .auth: return "in reply to AUTH command"
        case .rset: return "in reply to RSET command"
        case .mailFrom: return "in reply to MAIL FROM command"
        case .rcptTo: return "in reply to RCPT TO command"
        case .dataInit: return "in reply to DATA command"
        case .dataBlock: return "while sending message content"
        case .dataTermination: return "in reply to end of DATA command"
        case .idle: return "while idle"
        case .quit: return "in reply to QUIT command"
        case .closed: return "after the session ended"
        }
    }
}

/// The outcome for one recipient (PROTOCOL.md `RESULT`).
public struct SMTPDeliveryResult: Sendable, Hashable, CustomStringConvertible {
    public enum Status: String, Sendable, Hashable { case sent, deferred, bounced }
    public var status: Status
    /// RFC 3463 code: the peer's when it gave one, else class.0.0.
    public var dsn: EnhancedStatus
    /// The peer's reply, sanitized (printable ASCII, bounded); nil when the
    /// decision was local (SIZE, SMTPUTF8, REQUIRETLS, address syntax).
    public var reply: SMTPReply?
    public var phase: SMTPClientPhase
    /// For the log: "550 5.1.1 No such user (in reply to RCPT TO command)",
    /// or the local reason.
    public var text: String
    /// For the DSN's Diagnostic-Code: the peer's reply ("550 5.1.1 No
    /// such user", type smtp) or the local reason (type X-Sealpost).
    public var diagnostic: String
    /// The refusal is about this host's abilities (SIZE limit, no
    /// SMTPUTF8, no REQUIRETLS): another MX of the destination might take
    /// the message. The I/O layer may try it before reporting the result.
    public var hostSpecific: Bool

    /// Another address of the destination may do better: a temporary
    /// refusal by this host (4xx to MAIL, RCPT, DATA or the end of data),
    /// or a `hostSpecific` bounce. The I/O layer keeps the recipient for
    /// the next address and reports this result only when no address is
    /// left (RFC 5321 section 5.1; Postfix's smtp(8) keeps soft-failed
    /// recipients for a backup server unless this one is the final
    /// server). Final: a sent recipient, and any other bounce: a 5xx is
    /// the destination's permanent answer (RFC 5321 section 4.2.1), which
    /// Postfix does not take to a backup server either.
    public var mayTryAnotherHost: Bool { hostSpecific || (status == .deferred && reply != nil) }

    public init(status: Status, dsn: EnhancedStatus, reply: SMTPReply?, phase: SMTPClientPhase,
                text: String, diagnostic: String, hostSpecific: Bool = false) {
        self.status = status
        self.dsn = dsn
        self.reply = reply
        self.phase = phase
        self.text = text
        self.diagnostic = diagnostic
        self.hostSpecific = hostSpecific
    }

    /// From a peer's reply: 2xx sent, 4xx deferred, 5xx bounced.
    init(reply: SMTPReply, phase: SMTPClientPhase) {
        let cls = reply.code / 100
        status = cls == 2 ? .sent : cls == 4 ? .deferred : .bounced
        dsn = reply.status ?? EnhancedStatus(cls, 0, 0)
        self.reply = reply
        self.phase = phase
        diagnostic = SMTPClientText.quote(reply)
        text = "\(diagnostic) (\(phase))"
        hostSpecific = false
    }

    /// A local decision not to send.
    init(local status: Status, _ dsn: EnhancedStatus, _ reason: String, phase: SMTPClientPhase, hostSpecific: Bool) {
        self.status = status
        self.dsn = dsn
        reply = nil
        self.phase = phase
        text = reason
        diagnostic = reason
        self.hostSpecific = hostSpecific
    }

    public var description: String { "status=\(status.rawValue) dsn=\(dsn) (\(text))" }
}

/// The outcome of one transaction, after every recipient's result.
public struct SMTPMessageResult: Sendable, Hashable {
    public var sent = 0
    public var deferred = 0
    public var bounced = 0
    /// The reply that ended the transaction (end of DATA, or the refusal
    /// of MAIL/DATA), nil when nothing was sent.
    public var reply: SMTPReply?
    public var phase: SMTPClientPhase
    /// Message bytes written after dot-stuffing and line-end repair,
    /// terminating ".\r\n" included (0 when no data was sent).
    public var bytesSent: UInt64 = 0
    /// Remarks for the log, e.g. 8-bit content converted to
    /// quoted-printable for a host without 8BITMIME.
    public var notes: [String] = []

    public init(phase: SMTPClientPhase) { self.phase = phase }
}

/// The session failed: the connection is unusable or the host refused it.
/// Recipients without a result are undecided: the I/O layer tries the next
/// MX or defers them with `deferral` (the whole attempt defers; Postfix
/// does the same for a 5xx greeting: skip to the next MX, defer at the end).
public struct SMTPClientFailure: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable, Hashable {
        /// Greeting other than 220.
        case greeting
        /// EHLO and HELO refused.
        case hello
        /// TLS required and STARTTLS not offered or refused.
        case tlsRequired
        /// crypto-negotiate reported a failed handshake.
        case tlsHandshake
        /// AUTH refused, not offered, or not allowed without TLS.
        case authentication
        /// RSET between messages refused.
        case reset
        /// 421: the server is closing the channel.
        case serviceClosing
        case connectionLost
        case timeout
        /// The I/O layer gave the transaction up before the end of data
        /// (the job's owner is gone): the connection closes without the
        /// final dot, so the server discards the message.
        case abandoned
        /// Malformed or unexpected input: the conversation is out of sync.
        case protocolError
    }
    public var kind: Kind
    /// Always class 4: the attempt defers. A peer's 5.x.y becomes 4.x.y.
    public var status: EnhancedStatus
    public var reply: SMTPReply?
    public var phase: SMTPClientPhase
    /// For the log: "host refused to talk to me: 554 5.7.1 Go away
    /// (while receiving the initial server greeting)".
    public var text: String
    /// A TLS handshake failed under an opportunistic policy: a new
    /// connection in clear text may succeed (RFC 7435), as Postfix does.
    public var plaintextRetryMayWork = false

    init(_ kind: Kind, _ status: EnhancedStatus, _ text: String, reply: SMTPReply? = nil, phase: SMTPClientPhase) {
        self.kind = kind
        self.status = status
        self.text = text
        self.reply = reply
        self.phase = phase
    }

    public var description: String { "\(status) \(text)" }

    /// The result for a recipient left undecided when the I/O layer gives up.
    public var deferral: SMTPDeliveryResult {
        SMTPDeliveryResult(status: .deferred, dsn: status, reply: reply, phase: phase, text: text,
                           diagnostic: reply.map(SMTPClientText.quote) ?? text)
    }
}

/// What the machine asks its I/O layer to do.
public enum SMTPClientAction: Sendable, Hashable {
    /// Write these bytes (a pipelined group is one `.send`).
    case send([UInt8])
    /// The server said 220 to STARTTLS: hand the socket to
    /// crypto-negotiate, then call `tlsEstablished(_:)` or `tlsFailed(_:)`.
    case startTLS
    /// The server said 354: stream the body with `bodyChunk(_:)` (each call
    /// returns the bytes to write) and finish with `bodyEnd()`.
    case sendBody
    /// The message is 8-bit and the host does not offer 8BITMIME (policy
    /// `.convert`): convert the body to 7 bit (MailMessage's
    /// `MIMEDowngrade`), then call `bodyDowngraded(_:)` or
    /// `bodyDowngradeFailed(_:)`; on `.sendBody`, stream the converted body.
    case downgradeBody
    /// The final result for the recipient with this job index.
    case recipientResult(index: Int, SMTPDeliveryResult)
    /// Every recipient of the current message has its result; the session
    /// is idle: call `nextMessage(_:)` or `quit()`.
    case messageResult(SMTPMessageResult)
    /// The host refused the session or the connection broke (see
    /// `SMTPClientFailure`). `.send` (QUIT) and/or `.close` follow.
    case sessionFailed(SMTPClientFailure)
    /// The server broke the protocol (malformed or unexpected input):
    /// `.close` follows, the attempt defers.
    case protocolError(SMTPClientFailure)
    /// Close the connection (after writing what was sent before).
    case close
}

/// Rendering of peer replies for logs and DSNs (sanitized, bounded).
enum SMTPClientText {
    static let maxQuote = 1000

    /// "550 5.1.1 No such user / second line", at most `maxQuote` characters.
    static func quote(_ reply: SMTPReply) -> String {
        let s = reply.description
        return s.count <= maxQuote ? s : String(s.prefix(maxQuote - 3)) + "..."
    }
}
