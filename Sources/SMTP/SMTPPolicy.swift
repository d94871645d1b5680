/// Configuration of an SMTP server session (`SMTPServerPolicy`), what the I/O
/// layer knows about the client (`SMTPClientInfo`), and relay control as a
/// pure decision function (`RelayPolicy.decide`).
///
/// Relay control (issue item 5): recipients in local domains and configured
/// relay domains are accepted from anyone; any other destination only from a
/// trusted client network or an authenticated session. Sender-specified
/// routing is refused for untrusted, unauthenticated clients with 554 5.7.1:
/// the "%" hack (`user%elsewhere@us`), "!" paths (`host!user@us`), quoted
/// local parts containing "@" (`"user@elsewhere"@us`), and source routes
/// whose final domain is not ours. A source route to one of our own domains
/// is accepted and ignored, as RFC 5321 section 4.1.1.3 says.

/// When AUTH may be offered (issue item 6).
public enum SMTPAuthAvailability: Sendable, Hashable {
    /// Never offered; AUTH gets 503 5.5.1.
    case never
    /// Offered on this connection as it is (loopback, or implicit TLS on 465).
    case always
    /// Offered only once TLS is active; before, AUTH gets 538 5.7.11.
    case afterTLS
}

public struct SMTPServerPolicy: Sendable {
    /// Our name, in the greeting, the EHLO reply and Received lines.
    public var hostname: String
    /// Product name in the greeting and Received lines.
    public var softwareName = "Sealpost"
    /// Command line limit including CRLF (RFC 5321 4.5.3.1.4).
    public var commandLineLimit = 512
    /// Limit for AUTH command and response lines (RFC 4954 section 4: 12288).
    public var authLineLimit = 12288
    /// Text line limit including CRLF (RFC 5321 4.5.3.1.6); nil: unlimited.
    public var textLineLimit: Int? = 1000
    public var maxRecipients = 1000
    /// Largest message accepted, in octets after dot-unstuffing.
    public var maxMessageSize: UInt64 = 10_240_000
    /// Error replies tolerated before 421 4.7.0 and disconnect.
    public var maxErrors = 10
    /// NOOP, RSET, VRFY and HELP commands a session may send before each
    /// further one counts as an error (Postfix's smtpd_junk_command_limit);
    /// the count starts again after each message queued. With `maxErrors`
    /// it bounds how long a client can keep a session busy without mail.
    public var maxJunkCommands = 100
    /// Extensions that may be advertised (further gated by state).
    public var extensions: SMTPExtensions = .all
    /// Submission port (587/465): MAIL requires authentication.
    public var isSubmission = false
    /// A TLS server process is available to the I/O layer (STARTTLS offered
    /// while TLS is not active).
    public var tlsAvailable = false
    public var auth: SMTPAuthAvailability = .never
    /// Whether an authenticated user may use a MAIL FROM path; false
    /// refuses MAIL with 553 5.7.1 (Postfix's reject_sender_login_mismatch).
    /// nil: any sender. Called with the authenticated user and the
    /// reverse-path (null for <>) only once the path parsed.
    public var senderAllowed: (@Sendable (_ user: String, _ sender: SMTPPath) -> Bool)?
    /// Refuse 8-bit octets in the header section unless SMTPUTF8 was given
    /// (RFC 6532 header fields need SMTPUTF8 transport).
    public var reject8BitHeaders = true
    public var relay = RelayPolicy()
    /// Whether a local part of a local domain names a mailbox or an alias
    /// (smtp-listen's view of local-deliver's table); false refuses RCPT
    /// with 550 5.1.1, as Postfix's local_recipient_maps. Called with the
    /// local part as it goes to the queue (quoted when it is not a
    /// dot-string). nil: every local part is accepted.
    public var isKnownLocalPart: (@Sendable (_ localPart: String) -> Bool)?
    /// Input buffered while a queue or authentication decision is pending;
    /// above this `wantsInput` turns false, above four times this the session
    /// gives up on the connection after the pending reply.
    public var maxPendingInput = 256 * 1024
    /// Size of the `.messageData` chunks (a message is never held whole).
    public var messageChunkSize = 64 * 1024

    public init(hostname: String) {
        self.hostname = hostname
    }
}

/// What the I/O layer knows about the peer.
public struct SMTPClientInfo: Sendable, Hashable {
    /// Numeric address, "192.0.2.1" or "2001:db8::1".
    public var address: String
    /// Verified reverse DNS name, if any.
    public var hostname: String?
    /// The client is in a configured trusted network (default: the host
    /// itself) and may relay anywhere.
    public var isTrusted: Bool
    /// The connection is already encrypted (implicit TLS, port 465).
    public var tlsActive: Bool

    public init(address: String, hostname: String? = nil, isTrusted: Bool = false, tlsActive: Bool = false) {
        self.address = address
        self.hostname = hostname
        self.isTrusted = isTrusted
        self.tlsActive = tlsActive
    }
}

/// The outcome of relay control for one recipient.
public enum RelayDecision: Sendable, Hashable {
    /// Our own domain (or `<postmaster>`): local delivery.
    case local
    /// A domain we relay for, from anyone.
    case relayDomain
    /// Elsewhere, allowed because the client is trusted or authenticated.
    case relayAllowed
    case denied(SMTPReply)

    public var isAccepted: Bool {
        if case .denied = self { return false }
        return true
    }
}

public struct RelayPolicy: Sendable, Hashable {
    /// Lower-cased domain names we deliver locally; address literals such as
    /// "[192.0.2.1]" may be listed too.
    public var localDomains: Set<String>
    /// Lower-cased domains we relay for. An entry ".example.org" matches every
    /// subdomain of example.org (not example.org itself).
    public var relayDomains: Set<String>

    public init(localDomains: Set<String> = [], relayDomains: Set<String> = []) {
        self.localDomains = Set(localDomains.map { $0.lowercased() })
        self.relayDomains = Set(relayDomains.map { $0.lowercased() })
    }

    public static let relayDenied = SMTPReply(554, "5.7.1", "Relay access denied")
    public static let routingDenied = SMTPReply(554, "5.7.1", "Sender-specified routing not permitted")

    /// Postfix's wording, which administrators grep for.
    public static func unknownLocalRecipient(_ path: SMTPPath) -> SMTPReply {
        SMTPReply(550, "5.1.1", "\(path): Recipient address rejected: User unknown in local recipient table")
    }

    public func isLocal(_ domain: String) -> Bool { localDomains.contains(domain.lowercased()) }

    public func isRelayDomain(_ domain: String) -> Bool {
        let d = domain.lowercased()
        if relayDomains.contains(d) { return true }
        var rest = Substring(d)
        while let dot = rest.firstIndex(of: ".") {
            rest = rest[dot...]
            if relayDomains.contains(String(rest)) { return true }
            rest = rest.dropFirst()
        }
        return false
    }

    /// Pure decision for one RCPT path.
    public func decide(_ path: SMTPPath, clientTrusted: Bool, authenticated: Bool) -> RelayDecision {
        let privileged = clientTrusted || authenticated
        guard let mailbox = path.mailbox else {
            // <postmaster> is always ours; <> cannot reach here.
            return .local
        }
        let local = isLocal(mailbox.normalizedDomain)
        let relay = !local && isRelayDomain(mailbox.normalizedDomain)
        if !privileged {
            // Bytes, not Characters: a "%" or "@" followed by a combining
            // mark is one Character, and still the byte another MTA would
            // route by.
            let routing = mailbox.localPart.utf8.contains {
                $0 == UInt8(ascii: "%") || $0 == UInt8(ascii: "!") || $0 == UInt8(ascii: "@")
            }
            if routing { return .denied(Self.routingDenied) }
            if !path.sourceRoute.isEmpty && !local { return .denied(Self.routingDenied) }
        }
        if local { return .local }
        if relay { return .relayDomain }
        return privileged ? .relayAllowed : .denied(Self.relayDenied)
    }
}
