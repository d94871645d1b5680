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
//      One process serves every session, event-driven (SwiftNIO, one thread
//      per core): no thread or process per connection. The protocol
//      decisions are made by the pure state machine of the SMTP library.
//
//      Relay control: recipients in local.domains are accepted from anyone;
//      other destinations only from trusted networks (127.0.0.0/8 and ::1).
//      The submission listener requires authentication (RFC 6409), which is
//      not available yet, so it refuses MAIL with 530 5.7.0 for now.
//
// DESCRIPTORS
//      Listening sockets are either inherited or bound here:
//      - socket activation (the systemd convention, sd_listen_fds(3)):
//        when LISTEN_PID is this process and LISTEN_FDS=n, descriptors
//        3 .. 3+n-1 are listening sockets, named by LISTEN_FDNAMES
//        ("smtp", "submission", "smtps"; unnamed means "smtp");
//      - otherwise the addresses of [smtp] listen and submission in the
//        configuration, bound before privileges are dropped (so port 25
//        works when started as root).
//      Connections are accepted by a thread of smtp-listen's own and then
//      run on NIO event loops (the TCP descriptor must be known to hand it
//      over for TLS).
//
// TLS
//      When [tls] lists certificates, smtp-listen keeps one connection to
//      crypto-negotiate (run/tls, the `tls` protocol of Pipeline/PROTOCOL.md
//      section 4.5), reconnecting every second while it is away. While it is
//      connected, EHLO offers STARTTLS (and, once TLS is active,
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
//      adds), END; the queue answers ACCEPTED or REFUSED.
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
//      Command lines 512 octets, text lines 1000, recipients
//      queue.recipient_limit, message size queue.message_size_limit, 20
//      errors then 421, 50 sessions per client address (trusted networks
//      exempt); timeouts 5 min for a command, 3 min for message data, 5 min
//      for the queue's answer (SMTPServiceSettings.swift has them all).
//
// SIGNALS
//      SIGTERM, SIGINT: stop listening, let sessions finish a message in
//      progress, say 421 to idle ones, exit (at most 30 s later). Taken with
//      sigwait(2), not libdispatch (which traps in the chroot).
//
// EXIT STATUS
//      0 after a signal; 64 (usage) for arguments; 71 (osErr) when a
//      listener cannot be opened; 77 (noPerm) or 67 (noUser) when
//      privileges cannot be dropped; 78 (config) for a bad configuration
//      or bad LISTEN_* variables.

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
    if let inherited = try SocketActivation.takeFromEnvironment() {
        specs = inherited
    } else {
        specs = try configuredListeners(listen: config.smtp.listen, submission: config.smtp.submission,
                                        smtps: config.smtp.smtps)
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
let settings = SMTPServiceSettings(config: config, injectSocket: paths.injectSocket,
                                   tlsSocket: paths.runtimeDirectory + "/tls")

let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
let server = SMTPServer(settings: settings, group: group, logger: logger)
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

server.startAccepting()

var received: Int32 = 0
while sigwait(&stopSignals, &received) != 0 {}
logger.info("stopping on signal \(received): \(server.sessionCount) sessions open")
try? server.shutdown(grace: .seconds(30)).wait()
// No group shutdown: syncShutdownGracefully would use libdispatch (see
// above), and the process ends here anyway.
exit(ExitCode.ok.rawValue)
