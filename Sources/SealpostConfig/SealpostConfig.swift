// SealpostConfig: reads Config/sealpost.toml into typed settings.
//
// The file is the schema: every key is optional and defaults to the value
// written in the shipped file, so an empty file is a valid configuration.
// Strict on purpose: an unknown section or key, a value of the wrong type or
// a malformed duration, size, domain, address or listener is an error that
// names the file, the line and the key. A typo must stop the MTA at start-up
// rather than silently run it with a default.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct SealpostConfiguration: Sendable {
    /// Absolute path of the file read.
    public var file: String
    /// Absolute.
    public var dataDirectory: String
    /// Lower-cased; the system's host name when the file leaves it empty.
    public var hostname: String
    /// An RFC 5321 address, domain lower-cased.
    public var postmaster: String
    /// The envelope sender of the queue's notices to the postmaster (double
    /// bounces), as Postfix's double_bounce_sender: a notice from it that
    /// cannot be delivered is discarded, not reported again, so a double
    /// bounce that an alias forwarded on (keeping its sender) ends where
    /// it fails instead of coming back as another one.
    public var doubleBounceSender: String { "double-bounce@\(hostname)" }
    public var queue: QueueSettings
    public var local: LocalSettings
    public var smtp: SMTPSettings
    /// [tls]: crypto-negotiate's certificates, CA bundles, protocols.
    public var tls: TLSSettings
    public var dns: DNSSettings
    public var remote: RemoteDeliverySettings

    // Derived paths (absolute, under dataDirectory).
    /// data/run
    public var runtimeDirectory: String
    /// data/run/inject
    public var injectSocket: String
    /// data/run/deliver
    public var deliverSocket: String
    /// data/run/control
    public var controlSocket: String
    /// data/queue
    public var spoolDirectory: String
    /// data/log
    public var logDirectory: String
    /// data/local/recipients: the local recipient table local-deliver
    /// writes for smtp-listen (PROTOCOL.md section 8)
    public var localRecipientTable: String
    /// data/run/tls: crypto-negotiate's socket (PROTOCOL.md section 4.5)
    public var tlsSocket: String { ConfigPath.join(runtimeDirectory, "tls") }
    /// data/tls: where Pipeline/start puts the self-signed certificates
    public var tlsDirectory: String { ConfigPath.join(dataDirectory, "tls") }

    /// The built-in defaults (those of the shipped Config/sealpost.toml) for a
    /// configuration file at `file` (absolute): data under `../var`.
    public init(file: String) {
        self.file = file
        let directory = ConfigPath.directory(of: file)
        self.dataDirectory = ConfigPath.resolve("../var", relativeTo: directory)
        let hostname = ConfigPath.systemHostname()
        self.hostname = hostname
        self.postmaster = "postmaster@localhost"
        self.queue = QueueSettings()
        self.local = LocalSettings()
        self.local.aliasesFile = ConfigPath.resolve("aliases", relativeTo: directory)
        self.smtp = SMTPSettings()
        self.smtp.authUsersFile = ConfigPath.resolve("users", relativeTo: directory)
        self.dns = DNSSettings()
        self.remote = RemoteDeliverySettings(heloName: hostname,
                                             transportTable: ConfigPath.resolve("transport", relativeTo: directory))
        self.runtimeDirectory = ""
        self.injectSocket = ""
        self.deliverSocket = ""
        self.controlSocket = ""
        self.spoolDirectory = ""
        self.logDirectory = ""
        self.localRecipientTable = ""
        self.tls = TLSSettings(tlsDirectory: ConfigPath.join(dataDirectory, "tls"))
        deriveDataPaths()
    }

    /// Recomputes the derived paths from `dataDirectory`; call after
    /// changing it.
    /// The directories the pipeline keeps in the data directory (run/,
    /// queue/, log/, local/, tls/, supervise/, and crypto-negotiate's
    /// empty/ root): no mailbox may be made among them.
    public static let dataLayoutNames: Set<String> = ["run", "queue", "log", "local", "tls", "supervise", "empty"]

    public mutating func deriveDataPaths() {
        runtimeDirectory = ConfigPath.join(dataDirectory, "run")
        injectSocket = ConfigPath.join(runtimeDirectory, "inject")
        deliverSocket = ConfigPath.join(runtimeDirectory, "deliver")
        controlSocket = ConfigPath.join(runtimeDirectory, "control")
        spoolDirectory = ConfigPath.join(dataDirectory, "queue")
        logDirectory = ConfigPath.join(dataDirectory, "log")
        localRecipientTable = ConfigPath.join(ConfigPath.join(dataDirectory, "local"), "recipients")
    }

    /// Reads and validates the configuration file at `path`. Errors name
    /// `path` as given, so that messages read like the command line.
    public static func load(path: String) throws(ConfigError) -> SealpostConfiguration {
        let text = try ConfigPath.readText(path)
        return try parse(text: text, file: path)
    }

    /// Validates `text` as if it were the content of `file` (relative paths
    /// resolve against the directory of `file`).
    public static func parse(text: String, file: String) throws(ConfigError) -> SealpostConfiguration {
        try ConfigParser(text: text, file: file).parse()
    }

    /// SEALPOST_CONFIG, else <checkout>/Config/sealpost.toml found from the
    /// executable's real path (/proc/self/exe), else /etc/sealpost/sealpost.toml.
    public static func locate() -> String {
        let environment = getenv("SEALPOST_CONFIG").map { String(cString: $0) }
        return locate(environment: environment, executable: ConfigPath.realPath("/proc/self/exe"))
    }

    /// The testable core of `locate()`.
    static func locate(environment: String?, executable: String?) -> String {
        if let environment, !environment.isEmpty { return environment }
        if let executable, executable.hasPrefix("/") {
            // A checkout: the binaries live in <checkout>/.build/<triple>/<mode>/.
            var directory = ConfigPath.directory(of: executable)
            while true {
                let candidate = ConfigPath.join(directory, "Config/sealpost.toml")
                if ConfigPath.isRegularFile(candidate),
                   ConfigPath.isRegularFile(ConfigPath.join(directory, "Package.swift")) {
                    return candidate
                }
                if directory == "/" { break }
                directory = ConfigPath.directory(of: directory)
            }
        }
        return "/etc/sealpost/sealpost.toml"
    }
}

/// Durations in seconds, sizes in bytes.
public struct QueueSettings: Sendable, Equatable {
    /// `message_size_limit` bounds what the client of the injecting stage
    /// sent (smtp-listen advertises it as SIZE and counts the content
    /// against it); the stage then adds its own header fields (Received,
    /// and for queue-inject Date, Message-ID, From), at most a couple of
    /// KiB. Without this room a message within the advertised SIZE would
    /// be refused by the queue, permanently.
    public static let traceAllowance = 8192
    /// What the queue takes: `messageSizeLimit` plus `traceAllowance`.
    public var acceptedSizeLimit: Int { messageSizeLimit + Self.traceAllowance }

    public var maximalQueueLifetime: Int, bounceQueueLifetime: Int,
               minimalBackoffTime: Int, maximalBackoffTime: Int,
               queueRunDelay: Int, delayWarningTime: Int,
               messageSizeLimit: Int, recipientLimit: Int,
               mapSize: Int, mapSizeLimit: Int
    /// Group commit under load (Spool's commitDelay); 0: none.
    public var commitDelayMilliseconds: Int
    public static let maximumCommitDelayMilliseconds = 100
    /// Every message injected (by smtp-listen or queue-inject) goes on
    /// hold, as `sealpost queue hold` puts one (the flag is in its
    /// committed record); none is delivered until released. The queue's
    /// own notices to senders are not held.
    public var holdIncoming: Bool

    /// The defaults of the shipped file (Postfix's).
    public init() {
        maximalQueueLifetime = 5 * 86400
        bounceQueueLifetime = 5 * 86400
        minimalBackoffTime = 300
        maximalBackoffTime = 4000
        queueRunDelay = 300
        delayWarningTime = 4 * 3600
        messageSizeLimit = 10_240_000
        recipientLimit = 1000
        mapSize = 256 << 20
        mapSizeLimit = 16 << 30
        commitDelayMilliseconds = 3
        holdIncoming = false
    }
}

public struct LocalSettings: Sendable, Equatable {
    public enum Accounts: String, Sendable { case system, listed }
    /// Lower-cased.
    public var domains: [String]
    public var accounts: Accounts
    public var users: [String]
    /// Template with {user}, relative to dataDirectory.
    public var mailbox: String
    /// Absolute.
    public var aliasesFile: String

    /// The defaults of the shipped file; `aliasesFile` is empty until a
    /// configuration file gives it a directory.
    public init() {
        domains = ["localhost"]
        accounts = .system
        users = []
        mailbox = "mail/{user}/Maildir"
        aliasesFile = ""
    }

    /// Case-insensitive; a trailing dot (absolute name) is ignored.
    public func isLocal(domain: String) -> Bool {
        var name = domain.lowercased()
        if name.hasSuffix(".") { name.removeLast() }
        return domains.contains(name)
    }
}

/// [smtp]: listening addresses ("host:port" or "[v6]:port"), relay
/// control, limits, timeouts and SMTP AUTH (smtp-listen).
public struct SMTPSettings: Sendable, Equatable {
    public var listen, submission, smtps: [String]
    /// Domains relayed for anyone, lower-cased; ".example.org" matches
    /// every subdomain of example.org.
    public var relayDomains: [String]
    /// Client networks that may relay anywhere, "address/length" as
    /// written (validated: host bits zero).
    public var trustedNetworks: [String]
    /// Octets, CRLF included (RFC 5321 4.5.3.1.4: at least 512).
    public var commandLineLimit: Int
    /// Octets, CRLF included (RFC 5321 4.5.3.1.6: at least 1000).
    public var textLineLimit: Int
    /// Error replies before 421 and disconnect.
    public var errorLimit: Int
    /// NOOP, RSET, VRFY and HELP before each further one counts as an
    /// error (per message queued).
    public var junkCommandLimit: Int
    /// Simultaneous sessions per client address; 0: no limit.
    public var clientConnectionLimit: Int
    /// IPv6 clients count per network of this prefix length (128: per address).
    public var clientIPv6PrefixLength: Int
    /// Simultaneous sessions in all (smtp-listen); 0: no limit.
    public var sessionLimit: Int
    /// Seconds.
    public var commandTimeout: Int
    /// Seconds.
    public var dataTimeout: Int
    /// Seconds smtp-listen waits for an answer from the queue (the
    /// message's ID at DATA, the answer to its end) before 451 4.3.0.
    public var queueReplyTimeout: Int
    /// Seconds a message keeps trying to reach a queue that refuses
    /// connections (restarting) before 451 4.3.0; 0: no second attempt.
    public var queueRestartWait: Int
    /// The SMTP AUTH password file, absolute; empty until a configuration
    /// file gives it a directory (default "users" beside the file).
    public var authUsersFile: String
    /// An authenticated client may use only the sender addresses its
    /// account owns (Postfix's reject_sender_login_mismatch).
    public var senderLoginMatch: Bool
    /// smtp-listen's event-loop threads; 0: automatic (`eventLoopThreads`).
    public var eventLoops: Int
    /// Look up each client's verified name (reverse DNS, confirmed by a
    /// forward lookup), as Postfix's smtpd_peername_lookup.
    public var clientNameLookup: Bool
    /// Refuse RCPT for a local part of a local domain that is neither a
    /// local user nor an alias (550 5.1.1, Postfix's local_recipient_maps),
    /// by the table local-deliver writes.
    public var rejectUnknownLocalRecipients: Bool

    /// The threads smtp-listen runs: `eventLoops`, or when that is 0, half
    /// the cores (at least one). smtp-listen shares the machine with
    /// crypto-negotiate, the queue and the delivery stages; on a 2-core
    /// machine one loop serves more sessions per second than two (more
    /// events per epoll_wait, fewer thread wake-ups: bench/smtp measured
    /// 15% less CPU per message).
    public func eventLoopThreads(cores: Int) -> Int {
        eventLoops > 0 ? eventLoops : max(1, cores / 2)
    }

    public init() {
        listen = ["127.0.0.1:2525"]
        submission = ["127.0.0.1:2587"]
        smtps = ["127.0.0.1:2465"]
        relayDomains = []
        trustedNetworks = ["127.0.0.0/8", "::1/128"]
        commandLineLimit = 512
        textLineLimit = 1000
        errorLimit = 20
        junkCommandLimit = 100
        clientConnectionLimit = 50
        clientIPv6PrefixLength = 64
        sessionLimit = 10_000
        commandTimeout = 300
        dataTimeout = 180
        queueReplyTimeout = 300
        queueRestartWait = 10
        authUsersFile = ""
        senderLoginMatch = true
        eventLoops = 0
        clientNameLookup = true
        rejectUnknownLocalRecipients = true
    }
}
