// What smtp-listen needs to know, in one place: names, the inject socket,
// relay control, limits, timeouts and SMTP AUTH. Built from the
// configuration by `SMTPServiceSettings(config:injectSocket:tlsSocket:authenticator:)`
// ([smtp] in Config/sealpost.toml); tests build it directly.
//
// AUTH (RFC 4954) is offered on the submission listeners only, and only
// when a password file was loaded (`authenticator`): on port 25 it would
// only invite password guessing. Where it is offered:
// - to loopback clients (127.0.0.0/8, ::1) at once: their traffic never
//   leaves the host, so a password sent in clear text cannot be sniffed;
// - to everyone else only once TLS is active (`.afterTLS`): after
//   STARTTLS, or at once on the smtps port (implicit TLS); never while
//   crypto-negotiate is away.

import Accounts
import SMTP
import SealpostConfig

/// Session limits. The defaults are RFC 5321's minimums (section 4.5.3.1)
/// and Postfix's habits.
public struct SMTPLimits: Sendable, Hashable {
    /// A command line, CRLF included (RFC 5321 4.5.3.1.4).
    public var commandLine = 512
    /// A text line of the message, CRLF included (RFC 5321 4.5.3.1.6).
    public var textLine = 1000
    /// Recipients per transaction: `queue.recipient_limit`.
    public var recipients = 1000
    /// Message size in octets: `queue.message_size_limit`.
    public var messageSize: UInt64 = 10_240_000
    /// Error replies before 421 4.7.0 and disconnect (Postfix's
    /// smtpd_hard_error_limit is 20).
    public var errors = 20
    /// NOOP, RSET, VRFY and HELP before each further one counts as an
    /// error (Postfix's smtpd_junk_command_limit is 100).
    public var junkCommands = 100
    /// Simultaneous sessions from one client address (Postfix's
    /// smtpd_client_connection_count_limit is 50); more get 421 4.7.0.
    /// Trusted networks are exempt.
    public var sessionsPerClient = 50
    /// IPv6 clients are counted per network of this prefix length (128:
    /// per address).
    public var ipv6PrefixLength = 64
    /// Simultaneous sessions in all; more get 421 4.3.2, trusted clients
    /// too (it bounds what the process holds). Int.max: no limit. Set from
    /// `[smtp] session_limit` by `sessionLimit(configured:descriptorLimit:)`.
    public var sessions = 10_000

    public init() {}

    /// Descriptors one session may hold: its connection, and while it
    /// queues a message a connection to the queue (at most one).
    public static let descriptorsPerSession = 2
    /// Descriptors left for the rest: the listeners, the idle inject
    /// connections of the pools (32 per event loop), the resolver's
    /// sockets, crypto-negotiate's control connection, the log.
    public static let reservedDescriptors = 256

    /// The session limit for `session_limit` under a soft descriptor
    /// limit (nil: none known): at most what the descriptors carry, so
    /// that a flood of connections meets a 421 rather than EMFILE, which
    /// would also fail the sessions under way the moment they need a
    /// connection to the queue. At least 1. `configured` 0: no limit at
    /// all (accepting then pauses while descriptors run out).
    public static func sessionLimit(configured: Int, descriptorLimit: UInt64?) -> Int {
        guard configured > 0 else { return Int.max }
        guard let descriptorLimit, descriptorLimit < UInt64(Int.max) else { return configured }
        let usable = max(0, Int(descriptorLimit) - reservedDescriptors) / descriptorsPerSession
        return max(1, min(configured, usable))
    }
}

/// Timeouts in seconds (RFC 5321 section 4.5.3.2). The RFC's client-side
/// values tell what the other end tolerates; the server waits at least 5
/// minutes for a command (4.5.3.2.7).
public struct SMTPTimeouts: Sendable, Hashable {
    /// Waiting for the next command line (and the AUTH responses).
    public var command: Int64 = 300
    /// Waiting for the next piece of message data (the client's data block
    /// timeout is 3 minutes: a client that is silent longer is gone).
    public var dataBlock: Int64 = 180
    /// Waiting for an answer from the queue: the message's ID at DATA, the
    /// answer to END (`smtp.queue_reply_timeout`). The client waits 10
    /// minutes for the reply to the final dot (4.5.3.2.6): answer 451 well
    /// before.
    public var queueReply: Int64 = 300
    /// Milliseconds before a 535 (failed AUTH) is sent, on top of the
    /// password check itself, as Postfix's smtpd_error_sleep_time slows
    /// a password guesser down. A timer: the event loop never sleeps.
    public var authFailureDelayMilliseconds: Int64 = 1000
    /// An inject connection left idle in the pool this long is closed
    /// (InjectPool). The queue closes one idle for 300 s
    /// (PROTOCOL.md 4.2): letting it go well before means a transaction
    /// does not take one the queue is closing (which would be retried on a
    /// fresh connection, but a message of more than 64 KiB under a
    /// reserved ID would get 451).
    public var injectPoolIdle: Int64 = 60
    /// How long a message's transaction keeps trying to reach a queue whose
    /// socket refuses connections (or is missing) before its 451: a queue
    /// that restarts is back within seconds (the supervisor starts it again
    /// after 1 s, then it reloads the spool with its sockets listening),
    /// and a 451 would send the client away for its retry interval, often
    /// 15-30 minutes. 0: no second attempt. `smtp.queue_restart_wait`.
    public var queueAway: Int64 = 10

    public init() {}
}

public struct SMTPServiceSettings: Sendable {
    /// Our name in the greeting, EHLO and Received.
    public var hostname: String
    /// The queue's inject socket (a path usable after the chroot).
    public var injectSocket: String
    /// Domains delivered here (`local.domains`), lower-cased.
    public var localDomains: [String]
    /// Domains we accept mail for from anyone and relay
    /// (`smtp.relay_domains`); ".example.org" matches every subdomain.
    public var relayDomains: [String] = []
    /// Clients that may relay anywhere (`smtp.trusted_networks`).
    public var trustedNetworks: [NetworkPrefix] = NetworkPrefix.defaultTrusted
    public var limits = SMTPLimits()
    public var timeouts = SMTPTimeouts()
    /// Software name in the greeting and Received.
    public var softwareName = "Sealpost"
    /// The loaded password file; nil: AUTH is not offered anywhere (and
    /// the submission listeners refuse MAIL with 530 5.7.0).
    public var authenticator: Authenticator?
    /// An authenticated client may use only the senders its account owns
    /// (`smtp.sender_login_match`).
    public var senderLoginMatch = true
    /// Password checks waiting or running at once, over all sessions;
    /// beyond, AUTH gets 454 4.7.0 rather than queueing without bound
    /// (each check takes ~64 MiB and tens of milliseconds).
    public var maxPendingAuthentications = 32
    /// crypto-negotiate's socket (a path usable after the chroot); nil: no
    /// TLS (no certificate configured): neither STARTTLS nor port 465.
    public var tlsSocket: String?
    /// The uids crypto-negotiate may listen as (root and its own user, as
    /// looked up before the chroot); nil: not checked (one user runs every
    /// stage). run/ is the queue's: a socket put in crypto-negotiate's
    /// place would otherwise be handed every STARTTLS session.
    public var tlsServerUIDs: Set<UInt32>?
    /// How long a session waits for crypto-negotiate's answer to a
    /// NEGOTIATE before it gives up (its handshake timeout, plus a margin).
    public var tlsHandoffTimeout: Int64 = 70
    /// At start, how long accepting waits for the connection to
    /// crypto-negotiate (started by the supervisor just before
    /// smtp-listen): the first clients must be offered STARTTLS too.
    /// Clients meanwhile wait in the listen backlog. Not up by then,
    /// sessions start without STARTTLS until it is.
    public var tlsStartWait = 10.0
    /// Verified client names (reverse DNS, forward-confirmed); nil: every
    /// client is "unknown" (`smtp.client_name_lookup = false`, tests).
    public var clientNames: ClientNames?
    /// The local parts RCPT accepts in the local domains
    /// (`smtp.reject_unknown_local_recipients`); nil: all of them.
    public var localRecipients: LocalRecipients?

    public init(hostname: String, injectSocket: String, localDomains: [String] = ["localhost"]) {
        self.hostname = hostname
        self.injectSocket = injectSocket
        self.localDomains = localDomains.map { $0.lowercased() }
    }

    /// From the configuration; `injectSocket` as returned by
    /// `StageRuntime.dropPrivileges` (rebased when chrooted).
    /// `descriptorLimit`: the process's soft RLIMIT_NOFILE, which lowers
    /// `session_limit` to what it carries (nil: not known).
    /// `tlsSocket`: crypto-negotiate's socket as usable after the chroot;
    /// ignored when the configuration has no certificate. `authenticator`:
    /// the password file, loaded before the chroot (nil: no AUTH).
    public init(config: SealpostConfiguration, injectSocket: String, tlsSocket: String? = nil,
                authenticator: Authenticator? = nil, descriptorLimit: UInt64? = nil) {
        self.init(hostname: config.hostname, injectSocket: injectSocket, localDomains: config.local.domains)
        limits.recipients = config.queue.recipientLimit
        limits.messageSize = UInt64(max(0, config.queue.messageSizeLimit))
        self.tlsSocket = config.tls.certificates.isEmpty ? nil : tlsSocket
        tlsHandoffTimeout = Int64(config.tls.handshakeTimeout) + 10
        let smtp = config.smtp
        relayDomains = smtp.relayDomains
        // Validated by SealpostConfig with the same rules.
        trustedNetworks = smtp.trustedNetworks.compactMap(NetworkPrefix.init)
        limits.commandLine = smtp.commandLineLimit
        limits.textLine = smtp.textLineLimit
        limits.errors = smtp.errorLimit
        limits.junkCommands = smtp.junkCommandLimit
        limits.sessionsPerClient = smtp.clientConnectionLimit == 0 ? Int.max : smtp.clientConnectionLimit
        limits.ipv6PrefixLength = smtp.clientIPv6PrefixLength
        limits.sessions = SMTPLimits.sessionLimit(configured: smtp.sessionLimit, descriptorLimit: descriptorLimit)
        timeouts.command = Int64(smtp.commandTimeout)
        timeouts.dataBlock = Int64(smtp.dataTimeout)
        timeouts.queueReply = Int64(smtp.queueReplyTimeout)
        timeouts.queueAway = Int64(smtp.queueRestartWait)
        senderLoginMatch = smtp.senderLoginMatch
        self.authenticator = authenticator
    }

    /// The session policy for one kind of listener and client.
    public func policy(for kind: ListenerKind, client address: String) -> SMTPServerPolicy {
        policy(from: policy(for: kind), client: address)
    }

    /// `policy(for:client:)` from the listener's policy made beforehand
    /// (`policy(for:)`, whose domain sets hash every domain).
    func policy(from base: SMTPServerPolicy, client address: String) -> SMTPServerPolicy {
        var p = base
        if base.isSubmission, let authenticator {
            p.auth = Self.isLoopback(address) ? .always : .afterTLS
            if senderLoginMatch {
                p.senderAllowed = { user, sender in authenticator.owns(user: user, sender: sender.address) }
            }
        }
        return p
    }

    /// 127.0.0.0/8 or ::1 (also as ::ffff:127.x.y.z).
    static func isLoopback(_ address: String) -> Bool {
        NetworkPrefix.anyContains(loopback, address)
    }

    private static let loopback = [NetworkPrefix("127.0.0.0/8")!, NetworkPrefix("::1/128")!]

    /// The session policy for one kind of listener, AUTH left out (see
    /// `policy(for:client:)`).
    public func policy(for kind: ListenerKind) -> SMTPServerPolicy {
        var p = SMTPServerPolicy(hostname: hostname)
        p.softwareName = softwareName
        p.commandLineLimit = limits.commandLine
        p.textLineLimit = limits.textLine
        p.maxRecipients = limits.recipients
        p.maxMessageSize = limits.messageSize
        p.maxErrors = limits.errors
        p.maxJunkCommands = limits.junkCommands
        p.relay = RelayPolicy(localDomains: Set(localDomains), relayDomains: Set(relayDomains))
        if let localRecipients {
            p.isKnownLocalPart = { localRecipients.accepts($0) }
        }
        // STARTTLS is offered per session while crypto-negotiate is
        // reachable (the session handler sets tlsAvailable). AUTH is
        // decided per client in `policy(for:client:)`; without it a
        // submission port accepts no mail (RFC 6409 requires
        // authentication there): MAIL gets 530 5.7.0.
        p.tlsAvailable = false
        p.auth = .never
        p.isSubmission = kind != .smtp
        return p
    }

    func isTrusted(_ address: String) -> Bool {
        NetworkPrefix.anyContains(trustedNetworks, address)
    }
}
