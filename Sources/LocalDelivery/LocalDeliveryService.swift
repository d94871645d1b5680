// Wiring for the local-deliver stage: what it loads at start (while it still
// sees the whole file system: /etc/passwd, the aliases file) and how it runs
// its workers afterwards (inside the chroot).

#if canImport(Glibc)
import StageRuntime
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import SealpostConfig

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
    /// chroot.
    public static func users(_ settings: LocalSettings, systemAccounts: () -> [String] = LocalUsers.systemAccountNames) -> LocalUsers {
        switch settings.accounts {
        case .system: return LocalUsers(names: systemAccounts() + settings.users)
        case .listed: return LocalUsers(names: settings.users)
        }
    }

    /// Users and aliases as the configuration names them. Call before chroot.
    public static func makeResolver(_ config: SealpostConfiguration) throws(AliasError) -> RecipientResolver {
        let domains = Set(config.local.domains.map { $0.lowercased() })
        let aliases = try AliasTable.load(path: config.local.aliasesFile, localDomains: domains)
        return RecipientResolver(users: users(config.local), aliases: aliases, localDomains: domains,
                                 defaultDomain: config.local.domains.first)
    }

    /// A DeliveryLog writing through swift-log (the stage's log handler adds
    /// "local-deliver[pid]: " and "warning: ").
    public static func log(_ logger: Logger) -> DeliveryLog {
        DeliveryLog(info: { logger.info("\($0)") }, warning: { logger.warning("\($0)") })
    }

    /// Starts `concurrency` workers on their own threads and serves on the
    /// calling thread too; never returns.
    public static func run(workers: [DeliveryWorker]) -> Never {
        precondition(!workers.isEmpty)
        for worker in workers.dropFirst() {
            StageRuntime.detachThread { worker.run() }
        }
        workers[0].run()
        exit(0)   // only after stop(), which the stage never calls
    }
}

public struct LocalSetupError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

