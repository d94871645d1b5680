// NAME
//      queue - the Sealpost queue manager
//
// SYNOPSIS
//      queue            (started by the supervisor; SEALPOST_CONFIG selects
//                        the configuration file)
//
// DESCRIPTION
//      The queue is the only process that opens the spool: an LMDB
//      environment under data/queue holding every message, its body
//      encrypted at rest (libsodium secretstream, one key per message,
//      wrapped by the master key data/queue/spool.key, mode 0600).
//
//      It accepts mail over the inject socket and answers ACCEPTED only
//      after the transaction holding the message has been committed with
//      sync; injections that arrive together share one commit (group
//      commit; under load from many connections a commit waits up to
//      commit_delay, 3 ms by default, for more of them, see
//      Sources/Spool/Spool.swift). It schedules every recipient that is
//      neither sent nor bounced: recipients of local domains go to a
//      connected local-deliver stage, the others, grouped per destination
//      domain, to remote-deliver.
//      Failed attempts are retried with exponential backoff (minimal to
//      maximal_backoff_time, with jitter) until maximal_queue_lifetime
//      (bounce_queue_lifetime for notices); then the recipient fails with
//      4.4.7. A transport with no connected stage for 10 s (the stages
//      start after the queue, and a dead one is back within seconds) leaves
//      its recipients deferred ("delivery temporarily suspended") without
//      counting an attempt. A delivery stage that dies loses nothing: the recipients of
//      its outstanding jobs are retried at once.
//
//      When all recipients of a message are final, the message is deleted
//      and, in the same spool transaction, the RFC 3464 notice it calls for
//      is queued: failures (NOTIFY absent or with FAILURE) and local
//      deliveries with NOTIFY=SUCCESS to the sender; nothing is ever sent to
//      the null sender; an undeliverable notice goes to the postmaster as a
//      double bounce, sent from double-bounce@HOSTNAME (Postfix's
//      double_bounce_sender); an undeliverable double bounce, or anything
//      else from that sender (a double bounce an alias forwarded), is
//      logged and dropped, so that a postmaster alias pointing at a failing
//      address cannot loop.
//      Recipients still deferred after delay_warning_time get one delay
//      notice (NOTIFY absent or with DELAY).
//
//      After a restart the schedule is rebuilt from the spool. The sockets
//      listen before that (it takes seconds with a large spool): a stage
//      that connects meanwhile waits in the backlog, and is served once
//      the schedule is loaded.
//
// SOCKETS (under data/run, stale socket files are removed at start; as
//      root, the supervisor gives data/run to the queue's user, mode 0755,
//      so no other stage can create a file there and take a socket's name)
//      inject   0666   protocol "inject" (Pipeline/PROTOCOL.md 4.2): any
//                      local user may submit mail; the peer's uid is
//                      recorded (SO_PEERCRED). A connection idle for 300 s
//                      between transactions is closed.
//      deliver  0660   protocol "deliver" (4.3); group of data/run, so that
//                      the delivery stages' users (members of that group)
//                      can connect; a peer running as smtp-listen's or
//                      crypto-negotiate's user (SO_PEERCRED) is refused.
//      control  0600   protocol "control" (4.4), for the sealpost CLI run by
//                      the queue's user or root: list, show, flush, delete,
//                      hold, release, stats.
//
// PRIVILEGES
//      Started as root (by the supervisor), it chroots into the data
//      directory and becomes SEALPOST_USER before it opens anything.
//      Started as an ordinary user, it runs as that user. No network access.
//
// SIGNALS
//      SIGTERM, SIGINT  stop accepting, close connections, let the spool's
//                       committer finish, exit 0.
//      SIGUSR1          log the statistics (commits, messages, queue size).
//
// LOGGING
//      One line per event on stderr, Postfix style, grep-able by queue ID:
//        queue[pid]: 4F3A2B1C5D6E: uid=1000 from=<a@example.org>
//        queue[pid]: 4F3A2B1C5D6E: from=<a@example.org>, size=1234, nrcpt=2 (queue active)
//        queue[pid]: 4F3A2B1C5D6E: removed
//      A delivery is logged by its delivery stage; the queue logs only what
//      no stage could (a lost job, an expiry: status=expired, returned to
//      sender).
//
// EXIT STATUS
//      0 clean stop; 78 configuration error; 73 a socket cannot be created;
//      71 the spool cannot be opened or read; 77 privileges cannot be dropped;
//      74 LMDB can no longer use the spool while running (a meta page it
//      could not write, a map it could not grow): the supervisor starts the
//      queue again, from the last commit on disk (every 250 was answered
//      after its commit).

#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import QueueService
import SealpostConfig
import Spool
import StageRuntime

let config = StageRuntime.bootstrap(stage: "queue")

// The stages that face the network and are no delivery stage may not take
// jobs (message bodies, decrypted) from the deliver socket, though their
// users share its group: their uids, looked up while /etc/passwd is still
// in reach (before the chroot).
var options = QueueServiceOptions()
if geteuid() == 0 {
    for stage in ["smtp-listen", "crypto-negotiate"] {
        if let entry = getpwnam("sealpost-\(stage)") { options.refusedDeliveryPeers[entry.pointee.pw_uid] = stage }
    }
    options.smtpListenUID = options.refusedDeliveryPeers.first { $0.value == "smtp-listen" }?.key
    // A local user may hold at most 100 inject connections at once (each
    // is a descriptor of the queue's); smtp-listen and root are not bounded.
    options.injectConnectionLimit = (perUser: 100, unbounded: Set([0] + [options.smtpListenUID].compactMap { $0 }))
}

let paths: RuntimePaths
do {
    paths = try StageRuntime.dropPrivileges(config, chroot: true)
} catch let error as PrivilegeError {
    StageRuntime.fatal("cannot drop privileges: \(error)", exit: error.exitCode)
} catch {
    StageRuntime.fatal("cannot drop privileges: \(error)", exit: .noPerm)
}

// Sockets and spool files are ours alone unless chmod'ed on purpose.
umask(0o077)
mkdir(paths.runtimeDirectory, 0o755)
mkdir(paths.spoolDirectory, 0o700)

let spool: Spool
do {
    var spoolOptions = SpoolOptions(mapSize: config.queue.mapSize, mapSizeLimit: config.queue.mapSizeLimit,
                                    commitDelay: Double(config.queue.commitDelayMilliseconds) / 1000)
    spoolOptions.environmentFailed = { reason in
        StageRuntime.fatal("\(reason): stopping, to start again from the last commit on disk", exit: .ioErr)
    }
    spool = try Spool(directory: paths.spoolDirectory, options: spoolOptions)
} catch {
    StageRuntime.fatal("cannot open the spool \(paths.spoolDirectory): \(error)", exit: .osErr)
}

let service = QueueService(configuration: config, paths: paths, spool: spool, options: options)
do {
    try service.start()
} catch let error as QueueServiceError {
    StageRuntime.fatal(error.message, exit: error.exitCode)
} catch {
    StageRuntime.fatal("\(error)", exit: .osErr)
}

let finished = DispatchSemaphore(value: 0)
let signals = SignalEvents()
signals.on(SIGTERM) { finished.signal() }
signals.on(SIGINT) { finished.signal() }
signals.on(SIGUSR1) { service.logStatistics() }
finished.wait()
service.stop()
exit(ExitCode.ok.rawValue)
