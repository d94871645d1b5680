/// What the session state machine hands to its I/O layer: actions (replies,
/// TLS hand-off, message stream, authentication requests, log events), the
/// envelope of a message, and the per-command counters of the disconnect log
/// line.

/// One accepted recipient.
public struct SMTPRecipient: Sendable, Hashable {
    public var path: SMTPPath
    public var parameters: SMTPRecipientParameters
    public var relay: RelayDecision
    /// Address text for the queue (no angle brackets).
    public var address: String { path.address }
}

/// How the message body arrives.
public enum SMTPTransferMode: Sendable, Hashable { case data, bdat }

/// Everything the queue needs besides the body (PROTOCOL.md MAIL/RCPT frames).
public struct SMTPEnvelope: Sendable, Hashable {
    public var sender: SMTPPath
    public var parameters: SMTPMailParameters
    public var recipients: [SMTPRecipient]
    /// The EHLO/HELO argument as given (validated syntax).
    public var helo: String
    /// RFC 3848 / RFC 6531 protocol name: SMTP, ESMTP, ESMTPA, ESMTPS,
    /// ESMTPSA, UTF8SMTP, UTF8SMTPA, UTF8SMTPS, UTF8SMTPSA.
    public var protocolName: String
    public var authenticatedUser: String?
    public var client: SMTPClientInfo
    public var transfer: SMTPTransferMode
}

/// Credentials from an AUTH exchange, to be checked by the I/O layer, which
/// answers with `authResult(_:)`.
public struct SMTPCredentials: Sendable, Hashable, CustomStringConvertible {
    public enum Mechanism: String, Sendable, Hashable { case plain = "PLAIN", login = "LOGIN" }
    public var mechanism: Mechanism
    /// PLAIN authorization identity (empty or absent: same as the username).
    public var authorizationIdentity: String?
    public var username: String
    public var password: String

    /// Never prints the password.
    public var description: String { "\(mechanism.rawValue) user=\(username)" }
}

/// The answer of the password check.
public enum SMTPAuthResult: Sendable, Hashable {
    case success
    /// Wrong credentials, or the authorization identity is not allowed: 535 5.7.8.
    case failure
    /// Backend unavailable: 454 4.7.0.
    case temporaryFailure
}

/// Why the queue did not take the message (issue item 7).
public enum SMTPQueueFailure: Sendable, Hashable {
    /// Queue unreachable or failing: 451 4.3.0.
    case unavailable
    /// Queue full: 452 4.3.1.
    case full
    /// The queue refused with its own reply (REFUSED frame).
    case refused(SMTPReply)

    var reply: SMTPReply {
        switch self {
        case .unavailable: return SMTPReply(451, "4.3.0", "Queue unavailable, try again later")
        case .full: return SMTPReply(452, "4.3.1", "Insufficient system storage")
        case .refused(let r): return r
        }
    }
}

/// Events for the log (issue item 9). Rejections carry the reply sent.
public enum SMTPEvent: Sendable, Hashable {
    /// A command (or a message) was refused. `command` is the verb
    /// ("RCPT", "DATA", "END-OF-MESSAGE", "CONNECT"...); `detail` names the
    /// envelope addresses when known: "from=<a@b> to=<c@d>".
    case rejected(command: String, reply: SMTPReply, detail: String)
    /// Bytes the client sent after STARTTLS in the same flight, discarded
    /// (CVE-2011-0411 style command injection).
    case discardedAfterSTARTTLS(bytes: Int)
    /// Authentication outcome, never with the password.
    case authenticated(user: String, mechanism: String)
    case authenticationFailed(user: String, mechanism: String)
}

public enum SMTPAction: Sendable, Hashable {
    /// Write this reply.
    case reply(SMTPReply)
    /// The 220 reply to STARTTLS precedes this: flush it, then hand the
    /// socket to the TLS process. Call `tlsEstablished(...)` or `tlsFailed()`.
    case startTLS
    /// Flush the replies and close the connection.
    case close
    /// A message starts (after 354, or at the first BDAT chunk).
    case beginMessage(SMTPEnvelope)
    /// Body bytes, dot-unstuffed, CRLF line ends preserved.
    case messageData([UInt8])
    /// The body is complete: commit it to the queue, then call
    /// `messageCommitted(queueID:)` or `messageFailed(_:)`.
    case endMessage
    /// The message was refused while it streamed (size, bare CR/LF, NUL,
    /// long line, 8-bit header): discard what was sent. The reply follows
    /// later, when the client ends the data.
    case abortMessage(SMTPReply)
    /// Check these credentials, then call `authResult(_:)`.
    case authenticate(SMTPCredentials)
    case log(SMTPEvent)
}

/// Per-command counters for the disconnect line, Postfix style:
/// "ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6" (successful/total when
/// they differ).
public struct SMTPCommandCounters: Sendable, Hashable, CustomStringConvertible {
    public static let order = ["helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat",
                               "rset", "noop", "vrfy", "help", "quit", "unknown"]
    /// Per name of `order`, in that order: commands received, and those
    /// answered with success. Counted for every command of every session,
    /// so arrays rather than dictionaries of strings.
    private var totals = [Int](repeating: 0, count: order.count)
    private var successes = [Int](repeating: 0, count: order.count)
    /// How many commands were counted.
    public private(set) var count = 0
    /// The most recent command counted, as named to `record` ("MAIL",
    /// "EXPN"): what "lost connection after" and "timeout after" name.
    public private(set) var last: String?

    public init() {}

    public var total: [String: Int] { Self.named(totals) }
    public var successful: [String: Int] { Self.named(successes) }

    /// `command` upper case, as the session names it; anything not in
    /// `order` counts as "unknown".
    mutating func record(_ command: String, success: Bool) {
        let index = Self.index(command)
        totals[index] += 1
        if success { successes[index] += 1 }
        count += 1
        last = command
    }

    /// "HELO" -> 0, ... the upper-case names of `order`, and their place.
    private static let places = Dictionary(uniqueKeysWithValues: order.enumerated().map { ($1.uppercased(), $0) })

    private static func index(_ command: String) -> Int {
        places[command] ?? order.count - 1   // "unknown", the last
    }

    private static func named(_ counts: [Int]) -> [String: Int] {
        var named: [String: Int] = [:]
        for (name, n) in zip(order, counts) where n > 0 { named[name] = n }
        return named
    }

    /// "helo=1 mail=1 rcpt=0/1 commands=2/3": built as bytes, as it is
    /// for every disconnect line (appending to a string costs several
    /// times as much).
    public var description: String {
        var text: [UInt8] = []
        text.reserveCapacity(80)
        var ok = 0, all = 0
        for (i, name) in Self.order.enumerated() where totals[i] > 0 {
            let t = totals[i], s = successes[i]
            ok += s
            all += t
            text.append(contentsOf: name.utf8)
            Self.appendCount(s, of: t, to: &text)
            text.append(UInt8(ascii: " "))
        }
        text.append(contentsOf: "commands".utf8)
        Self.appendCount(ok, of: all, to: &text)
        return String(decoding: text, as: UTF8.self)
    }

    /// "=N" when all succeeded, else "=S/N".
    private static func appendCount(_ successes: Int, of total: Int, to text: inout [UInt8]) {
        text.append(UInt8(ascii: "="))
        if successes != total {
            SMTPReply.appendDecimal(successes, to: &text)
            text.append(UInt8(ascii: "/"))
        }
        SMTPReply.appendDecimal(total, to: &text)
    }
}
