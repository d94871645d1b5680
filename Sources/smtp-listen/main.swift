// smtp-listen: Sealpost's SMTP server (the receiving side of the pipeline)
//
// SYNOPSIS
//      smtp-listen
//
// DESCRIPTION
//      smtp-listen accepts mail over SMTP (RFC 5321) with the extensions
//      PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, DSN and
//      CHUNKING, decides relay access per recipient, and streams each
//      accepted message into the queue as the client sends it. It answers
//      "250 2.0.0 Ok: queued as ID" only after the queue has committed the
//      message to disk; if the queue refuses, its reply is passed on; if the
//      queue cannot be reached, the client gets 451 4.3.0 and tries again.
//
//      One process serves every session, event-driven (SwiftNIO; threads:
//      smtp.event_loops, by default half the cores): no thread or process
//      per connection. The protocol
//      decisions are made by the pure state machine of the SMTP library.
//
//      Relay control: recipients in local.domains and smtp.relay_domains
//      are accepted from anyone; other destinations only from
//      smtp.trusted_networks (default 127.0.0.0/8 and ::1) or after AUTH.
//
// AUTHENTICATION
//      The submission listeners require authentication (RFC 6409): MAIL
//      without AUTH gets 530 5.7.0. AUTH PLAIN and LOGIN (RFC 4954) check
//      the accounts of the password file smtp.auth_users (default
//      Config/users, written by "sealpost user add"; Argon2id hashes). It
//      is offered on the submission listeners only: to loopback clients at
//      once, to others only after STARTTLS. The check runs on a small
//      thread pool, off the event loop. A failed AUTH gets 535 5.7.8 after
//      a one-second delay and counts as an error. With
//      smtp.sender_login_match (default on), an authenticated client may
//      use only the envelope senders its account owns (NAME@each local
//      domain, or the list in its line): others get 553 5.7.1.
//      Authenticated mail is marked ESMTPA in Received and carries
//      auth-user to the queue.
//
//      The password file is read once, at start, as root and before the
//      chroot: it lives outside the data directory, readable by root
//      alone, so it cannot be read again later (no reload on SIGHUP);
//      restart smtp-listen after "sealpost user" changes. Missing file:
//      AUTH is not offered (logged). A file that others may read, that the
//      group may write, or that does not parse stops smtp-listen (exit 78).
//
// CLIENT NAMES
//      With smtp.client_name_lookup (the default), each client's name is
//      looked up before the greeting: the PTR names of its address, the
//      first that resolves back to the address (forward-confirmed reverse
//      DNS). It is written in the logs, "connect from NAME[ADDRESS]", and in
//      the Received header; "unknown" when there is none, the lookup failed
//      or it took more than 10 seconds. Queries go to the [dns] forwarders
//      (libunbound, no DNSSEC validation) and answers are cached for their
//      TTL. Nothing is decided on the name. With the name cached (or no
//      lookup), the 220 goes out as the connection is accepted.
//
// RECIPIENTS
//      With smtp.reject_unknown_local_recipients (the default), RCPT to a
//      local domain whose local part is neither a local user nor an alias
//      gets "550 5.1.1 <x@host>: Recipient address rejected: User unknown
//      in local recipient table" (user+ext counts as user; postmaster is
//      always accepted). The names come from local/recipients under the
//      data directory, which local-deliver writes at each start and reload
//      (Pipeline/PROTOCOL.md section 8; the supervisor starts smtp-listen
//      once local-deliver has, section 7); smtp-listen looks at it at start
//      and then once a second, and loads a new one (logged: "local
//      recipient table loaded: N names from PATH"). Without the file every
//      local part is accepted; one that does not load leaves the table in
//      use (a warning says why).
//
// DESCRIPTORS
//      Listening sockets are either inherited or bound here:
//      - socket activation (the systemd convention, sd_listen_fds(3)):
//        when LISTEN_PID is this process and LISTEN_FDS=n, descriptors
//        3 .. 3+n-1 are listening sockets, named by LISTEN_FDNAMES
//        (colon-separated). The supervisor always starts smtp-listen this
//        way: it binds the [smtp] addresses itself (as root, so port 25
//        needs no privilege here) and keeps them open across restarts of
//        smtp-listen, so a connection that arrives while smtp-listen
//        restarts waits in the backlog instead of being refused. A name is
//        KIND-PORT ("smtp-25", "submission-587", "smtps-465"); a systemd
//        socket unit uses the same names (FileDescriptorName=,
//        Config/systemd/). Each descriptor must be a listening socket
//        bound to the address of exactly one configured listener (a bare
//        kind, "unknown" or no name match by address alone), and each
//        configured listener (smtps only with a certificate) must get
//        one: otherwise smtp-listen stops with exit 78 naming both. The
//        variables are removed from the environment; when LISTEN_PID is
//        missing or names another process they are ignored, as systemd's
//        library does. Adopted sockets are logged ("adopted listening
//        socket 3 (smtp-25) for smtp on 127.0.0.1:25");
//      - otherwise the addresses of [smtp] listen, submission and smtps
//        in the configuration, bound before privileges are dropped (so
//        port 25 works when started directly as root).
//      Connections are accepted on a NIO event loop and served on the
//      group's loops in turn (with one loop, the default up to three
//      cores, on the loop that accepted them); the TCP descriptor, handed
//      to crypto-negotiate for TLS, is the channel's own. No descriptor is
//      passed to another program except those that go to crypto-negotiate
//      (smtp-listen starts no process), so accepted sockets need no
//      close-on-exec.
//
// TLS
//      When [tls] lists certificates, smtp-listen keeps one connection to
//      crypto-negotiate (run/tls, the `tls` protocol of Pipeline/PROTOCOL.md
//      section 4.5), reconnecting every second while it is away. At start,
//      accepting waits (clients wait in the listen backlog) until that
//      connection is up, at most 10 s: crypto-negotiate starts just before
//      smtp-listen, and the first clients must be offered STARTTLS too.
//      While it is connected, EHLO offers STARTTLS (and, once TLS is active,
//      REQUIRETLS); after "220 2.0.0 Ready to start TLS" the client's socket
//      goes to crypto-negotiate and the session continues on the plaintext
//      socket it returns, with a new EHLO (RFC 3207). Bytes pipelined after
//      STARTTLS are discarded (CVE-2011-0411). Connections to smtps
//      listeners (port 465, RFC 8314) are handed over at once and greeted
//      over the plaintext socket; while crypto-negotiate is away they are
//      closed. Received: lines say ESMTPS and "(using TLSv1.3 with cipher
//      ...)". smtp-listen itself never links TLS nor reads keys.
//
// QUEUE
//      For each message, a connection to the queue's inject socket
//      (run/inject under the data directory) speaking the inject protocol
//      of Pipeline/PROTOCOL.md section 4.2: HELLO, MAIL (with the client's
//      address, name, HELO, protocol, SIZE, RET, ENVID, SMTPUTF8, BODY,
//      REQUIRETLS), one RCPT per recipient (NOTIFY, ORCPT), BODY frames of
//      at most 64 KiB (the first holds the Received: header smtp-listen
//      adds), END; the queue answers ACCEPTED or REFUSED. A queue that
//      refuses the connection (restarting: its socket missing or not
//      listening) is tried again every 200 ms for up to 10 s before the
//      client gets 451, which would send it away for its retry interval
//      (often 15-30 minutes). A connection whose transaction ended
//      cleanly is kept for the next one of its event loop (at most 32 per
//      loop, each closed after 60 s idle: the queue closes them after
//      300 s).
//
// PRIVILEGES
//      Started as root, smtp-listen opens its listeners, then chroots into
//      the data directory and becomes SEALPOST_USER (set by the supervisor;
//      by convention sealpost-smtp-listen). It never reads keys, the spool
//      or TLS material. Started as another user, it keeps that user.
//
// LOGGING
//      One line per event on stderr, as Postfix's smtpd writes them:
//      "smtp-listen[pid]: connect from unknown[192.0.2.1]",
//      "ID: client=...", "NOQUEUE: reject: RCPT from ...", "disconnect from
//      ... ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5".
//
// LIMITS
//      From [smtp]: command_line_limit (512 octets), text_line_limit
//      (1000), error_limit (20, then 421), client_connection_limit (50
//      sessions per client address, trusted networks exempt),
//      session_limit (10,000 sessions in all, every client: 421 4.3.2
//      past it; lowered at start, with a warning, to what the descriptor
//      limit carries at two descriptors per session beyond 256 kept for
//      the rest; 0: no limit, accepting pauses while descriptors run
//      out); an smtps connection counts against both from its accept, while
//      crypto-negotiate has it (past them it is closed: no reply is possible
//      before TLS), and is given up if no answer comes within the hand-off
//      timeout ([tls] handshake_timeout + 10 s), command_timeout (5 min), data_timeout (3 min); from [queue]:
//      recipient_limit, message_size_limit; queue_reply_timeout (5 min:
//      how long an answer from the queue is awaited) and queue_restart_wait
//      (10 s: how long a queue that refuses connections is tried again).
//
// SIGNALS
//      SIGTERM, SIGINT: stop listening, let sessions finish a message in
//      progress, say 421 to idle ones, exit (at most 30 s later). Taken with
//      sigwait(2), not libdispatch (which traps in the chroot).
//
// EXIT STATUS
//      0 after a signal; 64 (usage) for arguments; 71 (osErr) when a
//      listener cannot be opened, or stops accepting connections (an
//      accept error other than running out of descriptors or memory,
//      which only pause it); 77 (noPerm) or 67 (noUser) when
//      privileges cannot be dropped; 78 (config) for a bad configuration
//      or bad LISTEN_* variables.

import Accounts
import DNS
import Logging
import NIOCore
import NIOPosix
import SMTPService
import SealpostConfig
import StageRuntime

#if canImport(Glibc)
import Glibc
#endif

let config = StageRuntime.bootstrap(stage: "smtp-listen")
if CommandLine.arguments.count > 1 {
    StageRuntime.fatal("usage: smtp-listen (takes no arguments; see SEALPOST_CONFIG)", exit: .usage)
}
let logger = Logger(label: "smtp-listen")

let specs: [ListenerSpec]
do {
    let configured = try configuredListeners(listen: config.smtp.listen, submission: config.smtp.submission,
                                             smtps: config.smtp.smtps)
    // What the supervisor binds and passes (the same rule: no smtps
    // without a certificate), as .bind specs to match descriptors against.
    let served = ListenerDefinition.served(by: config).map {
        ListenerSpec(kind: ListenerKind(rawValue: $0.kind) ?? .smtp, source: .bind(ListenAddress(host: $0.host, port: $0.port)))
    }
    if let inherited = try SocketActivation.takeFromEnvironment(configured: served) {
        for (spec, definition) in zip(inherited, served) {
            if case .inherited(let fd) = spec.source, case .bind(let address) = definition.source {
                logger.info("adopted listening socket \(fd) (\(ListenerDefinition.socketName(kind: spec.kind.rawValue, port: address.port))) for \(spec.kind.rawValue) on \(address)")
            }
        }
        if served.count < configured.count {
            logger.warning("smtps (implicit TLS, RFC 8314) is not served: no TLS certificate is configured ([tls] certificates)")
        }
        specs = inherited
    } else {
        specs = configured
    }
} catch {
    StageRuntime.fatal("\(error)", exit: .config)
}
if specs.isEmpty {
    StageRuntime.fatal("no listeners: [smtp] listen and submission are empty and no sockets were passed", exit: .config)
}

// SIGTERM and SIGINT are taken with sigwait(2) by the main thread, not
// with SignalEvents: that uses libdispatch, whose worker-pool monitor reads
// /proc/self/task and traps (SIGILL) inside the chroot, where /proc does not
// exist. Blocked here, before any thread starts, so every thread inherits
// the mask and the signals wait for sigwait.
var stopSignals = sigset_t()
sigemptyset(&stopSignals)
sigaddset(&stopSignals, SIGTERM)
sigaddset(&stopSignals, SIGINT)
pthread_sigmask(SIG_BLOCK, &stopSignals, nil)

// The paths the sessions use are those after the chroot; no session runs
// before privileges are dropped (listeners open with accepting paused).
let paths: RuntimePaths = geteuid() == 0 ? RuntimePaths(config).rebased(to: "/") : RuntimePaths(config)
// The password file, read now: as root, before the chroot (see
// AUTHENTICATION above).
let authenticator: Authenticator?
let usersFile = config.smtp.authUsersFile
var usersInfo = stat()
if lstat(usersFile, &usersInfo) != 0 && errno == ENOENT {
    if !specs.allSatisfy({ $0.kind == .smtp }) {
        logger.warning("no password file \(usersFile): AUTH is not offered, submission refuses MAIL (add accounts with: sealpost user add NAME)")
    }
    authenticator = nil
} else {
    do {
        let auth = Authenticator(file: try PasswordFile.load(path: usersFile), localDomains: config.local.domains)
        if auth.userCount == 0 {
            logger.warning("\(usersFile) holds no accounts: AUTH is not offered")
            authenticator = nil
        } else {
            logger.info("\(auth.userCount) accounts read from \(usersFile)")
            authenticator = auth
        }
    } catch {
        StageRuntime.fatal("\(error)", exit: .config)
    }
}
// session_limit is lowered to what the descriptor limit (raised to the hard
// one by bootstrap) carries.
let descriptors = StageRuntime.descriptorLimit()
var settings = SMTPServiceSettings(config: config, injectSocket: paths.injectSocket,
                                   tlsSocket: paths.runtimeDirectory + "/tls", authenticator: authenticator,
                                   descriptorLimit: descriptors)
// Who may listen on run/tls (a directory of the queue's user): root, which
// creates the socket, or crypto-negotiate's user; looked up while
// /etc/passwd is in reach. Run by one user: no check.
if geteuid() == 0 {
    settings.tlsServerUIDs = Set([0] + [getpwnam("sealpost-crypto-negotiate")].compactMap { $0?.pointee.pw_uid })
}
if config.smtp.sessionLimit > 0, settings.limits.sessions < config.smtp.sessionLimit {
    logger.warning("session_limit \(config.smtp.sessionLimit) lowered to \(settings.limits.sessions): the descriptor limit is \(descriptors ?? 0) (\(SMTPLimits.descriptorsPerSession) per session beyond \(SMTPLimits.reservedDescriptors))")
}
// Client names (CLIENT NAMES above): libunbound is set up now, before the
// chroot, with the [dns] forwarders and no DNSSEC (a PTR answer is only
// trusted once the forward lookup confirms it).
if config.smtp.clientNameLookup {
    do {
        let resolver = try Resolver(ResolverConfiguration(config.dns, validating: false))
        settings.clientNames = ClientNames(resolver: try ResolverThread(resolver),
                                           queryTimeout: .seconds(min(config.dns.timeout, 5)))
    } catch {
        StageRuntime.fatal("\(config.file): [dns]: \(error)", exit: .config)
    }
}

// Unknown local recipients (RECIPIENTS above): local-deliver's table, read
// after the chroot.
if config.smtp.rejectUnknownLocalRecipients {
    settings.localRecipients = LocalRecipients(path: paths.localRecipientTable, info: { logger.info("\($0)") },
                                               warning: { logger.warning("\($0)") })
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: config.smtp.eventLoopThreads(cores: System.coreCount))
// The lines of a tick (connects, queue IDs and disconnects of all the
// sessions it served) go out in one write, not one each.
for loop in group.makeIterator() {
    loop.execute { StageLogHandler.holdLinesOnThisThread { flush in loop.execute(flush) } }
}
// A listener that stops accepting (an error NIO cannot wait out): start
// afresh, on the supervisor's sockets, rather than run on without it.
let server = SMTPServer(settings: settings, group: group, logger: logger) { why in
    StageRuntime.fatal("\(why): exiting to be started again", exit: .osErr)
}
do {
    _ = try server.open(specs).wait()
} catch {
    StageRuntime.fatal("\(error)", exit: .osErr)
}

do {
    let dropped = try StageRuntime.dropPrivileges(config, chroot: true)
    if dropped.injectSocket != paths.injectSocket {
        StageRuntime.fatal("inject socket is \(dropped.injectSocket) after dropping privileges, expected \(paths.injectSocket)", exit: .software)
    }
} catch let error as PrivilegeError {
    StageRuntime.fatal(error.message, exit: error.exitCode)
} catch {
    StageRuntime.fatal("\(error)", exit: .noPerm)
}

settings.localRecipients?.watch()
server.startAccepting()

var received: Int32 = 0
while sigwait(&stopSignals, &received) != 0 {}
logger.info("stopping on signal \(received): \(server.sessionCount) sessions open")
try? server.shutdown(grace: .seconds(30)).wait()
// No group shutdown: syncShutdownGracefully would use libdispatch (see
// above), and the process ends here anyway.
exit(ExitCode.ok.rawValue)
