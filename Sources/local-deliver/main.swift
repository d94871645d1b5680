// NAME
//      local-deliver - Sealpost local delivery to Maildirs
//
// SYNOPSIS
//      local-deliver      (started by the supervisor, Pipeline/stages)
//
// DESCRIPTION
//      local-deliver delivers mail for the local domains (config
//      `local.domains`) into Maildirs. It is a client of the queue: it
//      takes delivery jobs, writes one copy per mailbox, and reports one
//      result per recipient.
//
//      For each recipient: the local part is looked up without regard to
//      case, first in the aliases file (`local.aliases`), then among the
//      local users; `user+ext` falls back to `user`. Local users are the
//      system's accounts plus `local.users` (`local.accounts = "system"`) or
//      `local.users` alone (`"listed"`). Aliases expand recursively (loops
//      and chains deeper than 20 are errors, found when the file is loaded);
//      an alias target outside the local domains is forwarded: a new message
//      is injected into the queue. Command ("|cmd"), file ("/path") and
//      ":include:" targets are refused when the file is loaded. A member
//      that is neither a user, an alias nor an address is left out with a
//      warning (the others get their copies); each alias is expanded once
//      per recipient, and past 1000 destinations the mail waits (4.3.0).
//      Of two accounts differing only in case, the lower-case one is meant.
//
//      Delivery follows the Maildir specification: the message (CRLF line
//      ends converted to LF, "Return-Path:" and "Delivered-To:" prepended)
//      is written to tmp/, fsync'ed, linked into new/, and the new/
//      directory fsync'ed before the result is reported. Mailboxes are
//      `local.mailbox` with {user} replaced, under the data directory,
//      created with mode 0700 when missing. A message that already carries
//      "Delivered-To:" for its recipient is a mail loop and is bounced
//      (5.4.6); an unknown user is bounced (5.1.1); a failed write (full
//      disk, quota, I/O error) is deferred (4.x.x) and retried by the queue.
//
// FILES
//      local/recipients   the local recipient table (Pipeline/PROTOCOL.md
//                    section 8): every local user and alias name, written
//                    at each start (and so at each reload) once the tables
//                    loaded and before reporting ready, for smtp-listen,
//                    which refuses other local parts at RCPT (550 5.1.1).
//                    A failure to write it is a warning; delivery goes on.
//                    Read back at the next start (before the chroot, by
//                    the strict decoder of section 8): a name it holds that
//                    the account enumeration no longer lists is looked up
//                    by name (getpwnam), since glibc ends an enumeration
//                    quietly when a source such as sssd is unavailable;
//                    one no source has is dropped, one a source could not
//                    answer for is kept, with a warning naming it.
//
// SOCKETS
//      run/deliver   client, protocol `deliver`, transport `local`
//                    (Pipeline/PROTOCOL.md section 4.3): one connection per
//                    worker, one job at a time on each (max-jobs 1).
//      run/inject    client, protocol `inject` (section 4.2): one short
//                    connection per forwarded copy.
//      The queue may restart at any time: workers reconnect with a pause
//      growing from 0.1 s to 5 s; jobs in flight are retried by the queue.
//
// ENVIRONMENT
//      SEALPOST_CONFIG              the configuration file
//      SEALPOST_USER                the account to run as (when started as root)
//      SEALPOST_READY_FD            a pipe to report ready on, one byte
//                                   once the tables loaded, the recipient
//                                   table was written and the privileges
//                                   dropped; set by the supervisor at every
//                                   start, which starts smtp-listen only
//                                   then (up to 10 s) and stops a replaced
//                                   instance only then (RELOADING)
//      SEALPOST_RELOAD              set by the supervisor for an instance
//                                   that replaces a running one (RELOADING);
//                                   needs SEALPOST_READY_FD
//      SEALPOST_LOCAL_CONCURRENCY   workers, 1..64 (default 4): deliveries
//                                   that run at once, so that fsyncs overlap
//
// PRIVILEGES
//      Started as root by the supervisor, it reads the account database and
//      the aliases file, then chroots into the data directory and runs as
//      its own user (SEALPOST_USER), which owns the mailboxes (mail/ under
//      the data directory must be writable by it) and local/. It never
//      runs programs and never writes outside the mailboxes and local/. Started as another user, it
//      runs as that user without chroot.
//
// SIGNALS
//      SIGTERM   stop: each worker finishes the delivery it has in progress
//                (its results are reported), idle connections to the queue
//                are closed at once, then exit 0. A job that reaches a
//                worker at that moment is not delivered; the queue, which
//                got no result for it, tries it again.
//      SIGHUP    ignored (with a warning). Reloads go through the
//                supervisor: send it SIGHUP.
//
// RELOADING
//      Chrooted and unprivileged, local-deliver cannot read the aliases
//      file or the account database again, so it never reloads itself: on
//      SIGHUP, and when the aliases file, the configuration or /etc/passwd
//      changes, the supervisor starts a new local-deliver with
//      SEALPOST_RELOAD (the reason) and SEALPOST_READY_FD (a pipe,
//      Pipeline/PROTOCOL.md section 7). The new one reads everything as at
//      any start, drops its privileges, writes one byte to that pipe and
//      logs one line:
//      local-deliver[4211]: reloaded (SIGHUP): 4 workers, 35 local users,
//      12 aliases, domains localhost
//      and the supervisor stops the old one (SIGTERM, above). When the
//      aliases file or the configuration does not load, the new one logs
//      one warning ("aliases not reloaded: ...", "configuration not
//      reloaded: ...") and exits 78 without writing; the old one was never
//      told to stop and goes on with the tables it has:
//      local-deliver[4230]: warning: aliases not reloaded:
//      /etc/sealpost/aliases:7: alias loop: a -> b -> a (the running
//      local-deliver keeps the tables it has)
//      Why a new process rather than the supervisor sending the files'
//      bytes: a new start reads exactly what a restart would (the
//      configuration's users, accounts from every NSS source, not only
//      /etc/passwd), the supervisor parses nothing, and no descriptor
//      outside the chroot is kept open.
//
// LOGGING
//      One line per delivered copy (and per refused recipient) on stderr,
//      as Postfix's local(8); delay in whole seconds since arrival:
//      local-deliver[815]: 4F3A2B1C5D6E: to=<u@localhost>,
//      orig_to=<postmaster@localhost>, relay=local, delay=0, dsn=2.0.0,
//      status=sent (delivered to maildir)
//
// EXIT STATUS
//      0 after SIGTERM, once the deliveries in progress are done. At start:
//      78 (EX_CONFIG) for an unreadable configuration or a malformed
//      aliases file (a warning rather than a fatal error when reloading), a bad
//      SEALPOST_LOCAL_CONCURRENCY, SEALPOST_RELOAD or SEALPOST_READY_FD; 67
//      (EX_NOUSER), 77 (EX_NOPERM) or 71 (EX_OSERR) when privileges cannot
//      be dropped.

#if canImport(Glibc)
import Glibc
#endif
import LocalDelivery
import Logging
import SealpostConfig
import StageRuntime

let config = StageRuntime.bootstrap(stage: "local-deliver")
let logger = Logger(label: "local-deliver")

// Files and directories are created 0600/0700; make sure nothing widens them.
umask(0o077)

let concurrency: Int
let ready: ReadyPipe?
let reload: ReloadRequest?
do {
    concurrency = try LocalDeliveryService.concurrency(environment: getenv("SEALPOST_LOCAL_CONCURRENCY").map { String(cString: $0) })
    ready = try ReadyPipe.from(getenv("SEALPOST_READY_FD").map { String(cString: $0) })
    reload = try ReloadRequest.from(reload: getenv("SEALPOST_RELOAD").map { String(cString: $0) }, ready: ready)
} catch {
    StageRuntime.fatal(error.description, exit: .config)
}

// Everything from outside the chroot is read now.
let log = LocalDeliveryService.log(logger)
let resolver: RecipientResolver
do {
    resolver = try LocalDeliveryService.makeResolver(config, log: log)
} catch {
    guard reload != nil else { StageRuntime.fatal(error.description, exit: .config) }
    // A reload: the instance this one was to replace runs on, with the
    // tables that loaded before. A warning, not a fatal error: nothing stops.
    logger.warning("\(LocalDeliveryService.reloadRefusal(error))")
    exit(ExitCode.config.rawValue)
}
let namer = MaildirNamer()

let paths: RuntimePaths
do {
    paths = try StageRuntime.dropPrivileges(config, chroot: true)
} catch let error as PrivilegeError {
    StageRuntime.fatal(error.message, exit: error.exitCode)
} catch {
    StageRuntime.fatal("\(error)", exit: .osErr)
}

let agent = LocalDeliveryAgent(resolver: resolver, dataDirectory: paths.dataDirectory,
                               mailboxTemplate: config.local.mailbox, namer: namer,
                               forwarder: InjectForwarder(socketPath: paths.injectSocket), log: log)
let workers = (1...concurrency).map {
    DeliveryWorker(socketPath: paths.deliverSocket, agent: agent,
                   maximumMessageSize: config.queue.messageSizeLimit + 1_048_576, name: "worker \($0)")
}
let signals = LocalDeliveryService.drainOnSIGTERM(workers, log: log)
// Before the ready byte: once the supervisor starts smtp-listen, or retires
// the instance this one replaces, smtp-listen finds the new tables.
LocalDeliveryService.publishRecipientTable(resolver, path: paths.localRecipientTable, log: log)
if let warning = LocalDeliveryService.postmasterWarning(resolver, aliasesFile: config.local.aliasesFile) {
    log.warning(warning)
}
if let ready {
    do {
        try ready.report()
    } catch {
        StageRuntime.fatal(error.description, exit: .osErr)
    }
}
logger.info("\(LocalDeliveryService.startLine(resolver, concurrency: concurrency, reload: reload))")
LocalDeliveryService.run(workers: workers)
withExtendedLifetime(signals) {}
exit(ExitCode.ok.rawValue)
