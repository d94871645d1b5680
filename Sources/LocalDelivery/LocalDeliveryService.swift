// Wiring for the local-deliver stage: what it loads at start (while it still
// sees the whole file system: /etc/passwd, the aliases file) and how it runs
// its workers afterwards (inside the chroot).
//
// Reloading: a chrooted, unprivileged instance can read neither the aliases
// file nor the account database again, so it never reloads itself. The
// supervisor starts a new instance instead (SEALPOST_RELOAD), which loads
// everything as a first start does and then reports on SEALPOST_READY_FD (as
// every instance the supervisor starts does); only then does the supervisor
// stop the old one (SIGTERM: it finishes the
// deliveries in progress). A new instance that cannot load its tables logs
// why, as a warning, and exits: the old instance never stopped, so mail goes
// on with the last tables that loaded.

#if canImport(Glibc)
import StageRuntime
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import FileAccess
import Logging
import SealpostConfig
import StageProtocol

public enum LocalDeliveryService {
    /// Workers (connections to the queue, each with one job at a time) when
    /// SEALPOST_LOCAL_CONCURRENCY is not set.
    public static let defaultConcurrency = 4
    public static let concurrencyRange = 1...64

    /// SEALPOST_LOCAL_CONCURRENCY, an integer in 1...64, else the default.
    public static func concurrency(environment value: String?) throws(LocalSetupError) -> Int {
        guard let value, !value.isEmpty else { return defaultConcurrency }
        guard let n = Int(value), concurrencyRange.contains(n) else {
            throw LocalSetupError("SEALPOST_LOCAL_CONCURRENCY: expected an integer from \(concurrencyRange.lowerBound) to \(concurrencyRange.upperBound), got \"\(value)\"")
        }
        return n
    }

    /// The local users of `settings`: the system's accounts plus the listed
    /// users (`accounts = "system"`), or the listed users alone. Call before
    /// chroot. An error reading the system's accounts is an error: a list
    /// cut short would bounce mail to the accounts it missed.
    ///
    /// A list cut short without an error is checked against `previous`, the
    /// table the last instance published: glibc ends the enumeration quietly
    /// when a source is unavailable (sssd or nslcd not answering), and the
    /// accounts of that source would then be refused at RCPT and bounced.
    /// Each name of the last table that neither the list nor `otherNames`
    /// (the aliases) has is looked up by name: an account found stays (a
    /// source that answers by name but does not enumerate), one that no
    /// source has is gone, and one a source could not answer for is kept as
    /// it was, with a warning, until a later start can tell (an alias
    /// removed meanwhile too: the table does not say which names were
    /// aliases, and a wrong keep costs a mailbox, a wrong drop a bounce). After
    /// `unavailableLimit` such answers in a row the source is taken as down
    /// and the rest are kept without asking (a down directory can take
    /// seconds per question).
    public static func users(_ settings: LocalSettings,
                             previous: LocalRecipientTable? = nil,
                             otherNames: Set<String> = [],
                             log: DeliveryLog = .discard,
                             systemAccounts: () throws(TableFileError) -> [String] = LocalUsers.systemAccountNames,
                             lookUpAccount: (String) -> AccountLookup = LocalUsers.lookUpAccount) throws(TableFileError) -> LocalUsers {
        switch settings.accounts {
        case .listed:
            return LocalUsers(names: settings.users)
        case .system:
            var names = try systemAccounts() + settings.users
            guard let previous else { return LocalUsers(names: names) }
            let listed = Set(LocalUsers(names: names).lowercasedNames).union(otherNames)
            var kept: [String] = []
            var gone: [String] = []
            var reason: String?
            var unavailableInARow = 0
            for name in previous.names.subtracting(listed).sorted() {
                let answer: AccountLookup = unavailableInARow >= unavailableLimit
                    ? .unavailable(reason ?? "unavailable") : lookUpAccount(name)
                switch answer {
                case .found(let canonical):
                    names.append(canonical)
                    unavailableInARow = 0
                case .notFound:
                    gone.append(name)
                    unavailableInARow = 0
                case .unavailable(let why):
                    names.append(name)
                    kept.append(name)
                    reason = reason ?? why
                    unavailableInARow += 1
                }
            }
            if !gone.isEmpty {
                log.info("names of the last recipient table that are neither accounts nor aliases now: \(summary(gone))")
            }
            if !kept.isEmpty {
                log.warning("the user database no longer lists \(kept.count) account(s) of the last recipient table"
                    + " and cannot say whether they exist (getpwnam: \(reason ?? "unavailable")): kept until it can:"
                    + " \(summary(kept))")
            }
            return LocalUsers(names: names)
        }
    }

    /// Lookups answered "unavailable" in a row after which the rest are not
    /// asked (LocalDeliveryService.users).
    public static let unavailableLimit = 3

    private static func summary(_ names: [String]) -> String {
        let shown = names.prefix(10).joined(separator: ", ")
        return names.count > 10 ? shown + " and \(names.count - 10) more" : shown
    }

    /// Users and aliases as the configuration names them, the users checked
    /// against the last published table (`users`). Call before chroot.
    public static func makeResolver(_ config: SealpostConfiguration, log: DeliveryLog = .discard) throws(AliasError) -> RecipientResolver {
        let domains = Set(config.local.domains.map { $0.lowercased() })
        let aliases = try AliasTable.load(path: config.local.aliasesFile, localDomains: domains)
        var previous: LocalRecipientTable?
        if config.local.accounts == .system {
            do {
                previous = try LocalRecipientTable.read(from: config.localRecipientTable)
            } catch {
                log.warning("the last local recipient table is not readable (\(error)): accounts are not checked against it")
            }
        }
        let users = try users(config.local, previous: previous,
                              otherNames: Set(aliases.entries.keys.map { $0.lowercased() }), log: log)
        return RecipientResolver(users: users, aliases: aliases, localDomains: domains,
                                 defaultDomain: config.local.domains.first)
    }

    /// A warning for the log when mail to postmaster, which smtp-listen
    /// always accepts (RFC 5321 section 4.5.1), would bounce: no alias or
    /// user of that name, and no root to fall back to.
    public static func postmasterWarning(_ resolver: RecipientResolver, aliasesFile: String) -> String? {
        do {
            _ = try resolver.resolve("postmaster")
            return nil
        } catch {
            return "mail to postmaster is accepted but cannot be delivered (\(error.text)):"
                + " add a line \"postmaster: USER\" to \(aliasesFile)"
        }
    }

    /// Writes the local recipient table for smtp-listen at `path`
    /// (`RuntimePaths.localRecipientTable`). A failure is only a warning:
    /// delivery goes on, and smtp-listen keeps the table it has (or, with
    /// none, accepts every local part as before).
    public static func publishRecipientTable(_ resolver: RecipientResolver, path: String, log: DeliveryLog) {
        do {
            try resolver.recipientTable.write(to: path)
        } catch {
            log.warning("local recipient table not written: \(error) (smtp-listen goes on with the table it has)")
        }
    }

    /// A DeliveryLog writing through swift-log (the stage's log handler adds
    /// "local-deliver[pid]: " and "warning: ").
    public static func log(_ logger: Logger) -> DeliveryLog {
        DeliveryLog(info: { logger.info("\($0)") }, warning: { logger.warning("\($0)") })
    }

    /// Runs the workers, each on its own thread (the first on the calling
    /// thread), and returns once every one has stopped (`stop()`: SIGTERM).
    public static func run(workers: [DeliveryWorker]) {
        precondition(!workers.isEmpty)
        StageRuntime.runOnThreads(workers.map { worker in { worker.run() } })
    }

    /// SIGTERM (the supervisor stopping, or retiring this instance after a
    /// reload): the workers finish the deliveries in progress and stop, so
    /// that `run(workers:)` returns. Keep the result alive.
    public static func drainOnSIGTERM(_ workers: [DeliveryWorker], log: DeliveryLog) -> SignalEvents {
        let signals = SignalEvents()
        signals.on(SIGTERM) {
            log.info("stopping: finishing the deliveries in progress")
            for worker in workers { worker.stop() }
        }
        // Only the supervisor can reload this stage (it starts a new
        // instance); SIGHUP's default action would end this one and every
        // delivery in progress.
        signals.on(SIGHUP) {
            log.warning("SIGHUP ignored: send it to the supervisor, which starts a local-deliver with the files read anew")
        }
        return signals
    }

    /// The line that says what the instance serves with: at a first start,
    /// or after a reload (the one line an administrator looks for after a
    /// SIGHUP).
    public static func startLine(_ resolver: RecipientResolver, concurrency: Int, reload: ReloadRequest?) -> String {
        let what = reload.map { "reloaded (\($0.reason))" } ?? "starting"
        return "\(what): \(concurrency) workers, \(resolver.users.count) local users, \(resolver.aliases.entries.count) aliases, domains \(resolver.localDomains.sorted().joined(separator: " "))"
    }

    /// The warning of a reload whose aliases file does not load: file, line
    /// and reason, and what happens instead.
    public static func reloadRefusal(_ error: AliasError) -> String {
        "aliases not reloaded: \(error) (the running local-deliver keeps the tables it has)"
    }
}

/// SEALPOST_READY_FD: a pipe to the supervisor (Pipeline/PROTOCOL.md
/// section 7) on which this instance reports that it loaded its tables,
/// published the local recipient table and dropped its privileges. At a
/// reload the supervisor then stops the instance this one replaces; at its
/// own start it then starts smtp-listen.
public struct ReadyPipe: Sendable, Equatable {
    public var descriptor: Int32

    public init(descriptor: Int32) { self.descriptor = descriptor }

    /// From the environment's SEALPOST_READY_FD; nil when not set. It must
    /// name an inherited pipe.
    public static func from(_ value: String?) throws(LocalSetupError) -> ReadyPipe? {
        guard let value else { return nil }
        guard let fd = StageRuntime.inheritedDescriptor(value, type: S_IFIFO) else {
            throw LocalSetupError("SEALPOST_READY_FD=\(value) is not an inherited pipe")
        }
        return ReadyPipe(descriptor: fd)
    }

    /// One byte, then the pipe is closed.
    public func report() throws(LocalSetupError) {
        let code = WholeFile.writeAll(descriptor, [0x2E])
        close(descriptor)
        if code != 0 {
            throw LocalSetupError("SEALPOST_READY_FD: \(String(cString: strerror(code)))")
        }
    }
}

/// This instance replaces a running one to reload its tables: started by
/// the supervisor with SEALPOST_RELOAD (the reason, for the log) and a
/// ready pipe, which the running one waits for.
public struct ReloadRequest: Sendable, Equatable {
    public var reason: String
    public var ready: ReadyPipe

    public init(reason: String, ready: ReadyPipe) {
        self.reason = reason
        self.ready = ready
    }

    /// From the environment's SEALPOST_RELOAD and the ready pipe; nil for
    /// an ordinary start (no SEALPOST_RELOAD). A reload without a ready
    /// pipe is an error: nothing would tell the supervisor.
    public static func from(reload: String?, ready: ReadyPipe?) throws(LocalSetupError) -> ReloadRequest? {
        guard let reload else { return nil }
        guard let ready else {
            throw LocalSetupError("SEALPOST_RELOAD needs SEALPOST_READY_FD")
        }
        return ReloadRequest(reason: reload.isEmpty ? "reload" : reload, ready: ready)
    }
}

public struct LocalSetupError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

