// The committer thread: group commit for every write to the spool.
// See the top of Spool.swift for the semantics.

import Foundation
import CSystemShims
import LMDB

final class Committer: @unchecked Sendable {
    // @unchecked Sendable: `pending`, `urgentPending`, `wakeAtUrgent`,
    // `deferredSince`, `lastSubmission`, `stopping` and `running` are guarded by
    // `condition`; `stats` by `statsLock`; the LMDB write transaction lives
    // on the committer thread only (LMDB's writer lock belongs to a thread).

    struct Submission {
        let operations: [SpoolOperation]
        let urgency: SpoolUrgency
        let completion: @Sendable (Result<Void, SpoolError>) -> Void
    }

    /// How long an urgent batch may wait for the submitters active lately
    /// to join it (see `gatherSiblings`); 0: never.
    let commitDelay: TimeInterval
    /// A submitter counts as active lately for this long (ns) after its
    /// last urgent submission.
    let activeWindow: UInt64
    /// The share of the submitters active lately a delayed batch waits for.
    /// 0.6 rather than 0.4 since 2026-12-01: at 20 sessions 1.024x msg/s
    /// over 12 rounds with 4.6% less CPU per message (bench/HISTORY.md).
    static let siblingShare = 0.6

    /// How many urgent submissions a delayed batch waits for with `active`
    /// submitters active lately.
    static func gatherTarget(active: Int) -> Int {
        Int((Double(active) * siblingShare).rounded(.up))
    }

    /// How long a `.deferred` submission may wait for a commit that
    /// happens anyway (see SpoolUrgency).
    let deferral: TimeInterval

    private let environment: Environment
    private let databases: SpoolDatabases
    private let readLock: ReadWriteLock
    private let mapSizeLimit: Int

    private let condition = NSCondition()
    private var pending: [Submission] = []
    /// How many of `pending` are `.now`; with none, the batch waits for one
    /// (or for the deferral of the oldest deferred submission to run out).
    private var urgentPending = 0
    /// When the oldest deferred submission of `pending` came.
    private var deferredSince: Date?
    /// Submitter -> monotonic time (ns) of its last urgent submission.
    private var lastSubmission: [Int: UInt64] = [:]
    /// How many urgent submissions the thread waits for: 1, or while it
    /// gathers siblings their target. A submission below it does not wake
    /// the thread, which would only find it has to wait on (a wake-up per
    /// message, most of the queue's context switches under load).
    private var wakeAtUrgent = 1
    private var stopping = false
    private var running = false
    private var thread: pthread_t?

    private let statsLock = NSLock()
    private var stats = SpoolStatistics()

    /// The highest queue ID committed (meta "highest-id", or the highest
    /// envelope of a spool from before that record). Committer thread only.
    private var highestID: UInt64

    private let health: EnvironmentHealth

    init(environment: Environment, databases: SpoolDatabases, readLock: ReadWriteLock,
         health: EnvironmentHealth = EnvironmentHealth(report: nil), mapSizeLimit: Int,
         deferral: TimeInterval = 0.5, commitDelay: TimeInterval = 0, siblingWindow: TimeInterval = 0.05,
         highestID: UInt64 = 0) {
        self.deferral = deferral
        self.commitDelay = commitDelay
        self.activeWindow = UInt64(max(0, siblingWindow) * 1e9)
        self.highestID = highestID
        self.environment = environment
        self.databases = databases
        self.readLock = readLock
        self.health = health
        self.mapSizeLimit = mapSizeLimit
    }

    var statistics: SpoolStatistics {
        statsLock.lock()
        defer { statsLock.unlock() }
        return stats
    }

    func start() {
        condition.lock()
        running = true
        condition.unlock()
        let thread = Thread { [self] in run() }
        thread.name = "spool-committer"
        thread.start()
    }

    func submit(_ operations: [SpoolOperation], urgency: SpoolUrgency = .now, submitter: Int? = nil,
                completion: @escaping @Sendable (Result<Void, SpoolError>) -> Void) {
        condition.lock()
        guard running, !stopping else {
            condition.unlock()
            completion(.failure(.io("spool closed")))
            return
        }
        pending.append(Submission(operations: operations, urgency: urgency, completion: completion))
        switch urgency {
        case .now:
            urgentPending += 1
            if let submitter, commitDelay > 0 { lastSubmission[submitter] = DispatchTime.now().uptimeNanoseconds }
            if urgentPending >= wakeAtUrgent { condition.signal() }
        case .deferred:
            if deferredSince == nil {
                deferredSince = Date()
                condition.signal()   // to start the timer
            }
        }
        condition.unlock()
    }

    /// The submitter will submit no more (its connection closed): a batch
    /// no longer waits for it.
    func submitterLeft(_ submitter: Int) {
        condition.lock()
        lastSubmission[submitter] = nil
        condition.unlock()
    }

    /// Lets the thread finish what is queued, then waits for it to exit.
    /// Called on the committer thread itself (a completion that releases the
    /// last reference to the Spool), it only asks the thread to stop: waiting
    /// there would wait forever.
    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        if let thread, pthread_equal(thread, pthread_self()) != 0 {
            condition.unlock()
            return
        }
        while running { condition.wait() }
        condition.unlock()
    }

    private func run() {
        condition.lock()
        thread = pthread_self()
        condition.unlock()
        while true {
            condition.lock()
            while !stopping && urgentPending == 0 {
                if let since = deferredSince {
                    let deadline = since.addingTimeInterval(deferral)
                    if Date() >= deadline { break }
                    _ = condition.wait(until: deadline)
                } else {
                    condition.wait()
                }
            }
            gatherSiblings()
            if pending.isEmpty {
                running = false
                condition.broadcast()
                condition.unlock()
                return
            }
            let batch = pending
            pending = []
            urgentPending = 0
            deferredSince = nil
            condition.unlock()

            let (results, committed) = process(batch)
            for (submission, result) in zip(batch, results) {
                submission.completion(result)
            }
            // After the completions: the batch's answers do not wait for it.
            if committed {
                keepZeroedAhead()
            } else if health.failure == nil, results.contains(where: { if case .failure = $0 { true } else { false } }) {
                // Also after "full": a meta page write can fail with
                // ENOSPC (a copy-on-write file system) and leave LMDB fatal.
                checkEnvironment()
            }
        }
    }

    /// Group commit waits for siblings, as PostgreSQL's commit_delay does
    /// for commit_siblings. A batch about to be committed while more than
    /// two submitters were active lately (an urgent submission in the last
    /// `activeWindow`, and not gone since, see `submitterLeft`) waits up to
    /// `commitDelay` until 60% of them have joined it. Under load from many
    /// sessions each commit (two syncs and a dozen page writes) then
    /// carries several times as many messages, and the CPU the commits no longer
    /// take is worth more than the wait, which no client notices. A lone
    /// submitter, or two taking turns, never waits: each one's next
    /// submission needs the answer to this one. Called with `condition`
    /// locked; returns with it locked.
    private func gatherSiblings() {
        guard commitDelay > 0, !stopping, urgentPending > 0, lastSubmission.count > 2 else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        lastSubmission = lastSubmission.filter { now &- $0.value < activeWindow }
        let target = Self.gatherTarget(active: lastSubmission.count)
        guard urgentPending < target else { return }
        statsLock.lock()
        stats.delayedCommits += 1
        statsLock.unlock()
        let deadline = Date().addingTimeInterval(commitDelay)
        wakeAtUrgent = target
        while !stopping && urgentPending < target && condition.wait(until: deadline) {}
        wakeAtUrgent = 1
    }

    // MARK: Applying a batch

    private enum Attempt {
        case done([Result<Void, SpoolError>], committed: Bool)
        case mapFull
        case failed(SpoolError)
        /// A submission failed while the batch was applied without nested
        /// transactions: apply it again with them, so it fails alone.
        case isolateFailures
    }

    /// How a batch is applied: straight into its transaction, or with a
    /// nested transaction per submission (after a failure, and always at
    /// the map's limit, where the submissions that do not fit fail alone).
    private enum Pass: Equatable {
        case direct
        case isolated(atLimit: Bool)
    }

    /// The batch's results, and whether a transaction was committed.
    private func process(_ batch: [Submission]) -> ([Result<Void, SpoolError>], committed: Bool) {
        var pass = Pass.direct
        while true {
            switch attempt(batch, pass) {
            case .isolateFailures:
                pass = .isolated(atLimit: false)
                statsLock.lock()
                stats.isolatedBatches += 1
                statsLock.unlock()
            case .done(let results, let committed):
                record(batch, results, committed: committed)
                return (results, committed)
            case .failed(let error):
                let results = [Result<Void, SpoolError>](repeating: .failure(error), count: batch.count)
                record(batch, results, committed: false)
                return (results, false)
            case .mapFull:
                // Retry bigger; at the limit, retry once more admitting
                // only the submissions that still fit.
                if !grow() { pass = .isolated(atLimit: true) }
            }
        }
    }

    private func record(_ batch: [Submission], _ results: [Result<Void, SpoolError>], committed: Bool) {
        statsLock.lock()
        defer { statsLock.unlock() }
        if committed { stats.commits += 1 }
        for (submission, result) in zip(batch, results) {
            switch result {
            case .success:
                stats.submissions += 1
                stats.operations += UInt64(submission.operations.count)
                stats.messagesInserted += UInt64(submission.operations.filter { if case .insert = $0 { true } else { false } }.count)
            case .failure:
                stats.failedSubmissions += 1
            }
        }
    }

    /// How far data.mdb is known to extend (written, synced zeros or data).
    private var zeroedEnd = 0
    /// After a failed or skipped extension: not again below this use.
    private var retryExtensionAt = 0
    /// Whether zeros ahead pay off on the spool's file system (see
    /// `zerosAheadHelp`).
    private lazy var extending = Self.zerosAheadHelp(environment.path)

    /// Keeps zeros on disk ahead of the pages LMDB will write next (see
    /// Environment.extendDataFile): a quarter of the data in use, 1 to 64
    /// MiB, written whenever less than half of that is left, and only while
    /// the file system keeps 5% (at least 64 MiB) free besides. Once per
    /// extension, not per commit: between extensions this only compares
    /// numbers LMDB keeps in memory.
    private func keepZeroedAhead() {
        guard extending else { return }
        let used = environment.usedSize
        let chunk = min(max(used / 4, 1 << 20), 64 << 20)
        guard used + chunk / 2 > zeroedEnd, used >= retryExtensionAt else { return }
        do {
            zeroedEnd = max(zeroedEnd, try environment.dataFileSize)
            guard used + chunk / 2 > zeroedEnd else { return }
            guard roomToSpare(beyond: used + chunk - zeroedEnd) else {
                retryExtensionAt = used + chunk
                return
            }
            try environment.extendDataFile(to: used + chunk)
            zeroedEnd = try environment.dataFileSize
            statsLock.lock()
            stats.fileExtensions += 1
            statsLock.unlock()
        } catch {
            // Most likely a full disk: commits go on as before (LMDB grows
            // the file itself, or says ENOSPC); try again a chunk later.
            retryExtensionAt = used + chunk
        }
    }

    /// Whether the file system keeps 5% of its size (at least 64 MiB) free
    /// after `bytes` more are written.
    private func roomToSpare(beyond bytes: Int) -> Bool {
        guard let space = fileSystemSpace() else { return false }
        return space.available >= UInt64(bytes) + max(64 << 20, space.size / 20)
    }

    /// Zeros ahead spare the journal commit of a growing file on ext2/3/4
    /// and XFS, which overwrite in place. Elsewhere they cost writes for
    /// nothing: a copy-on-write file system (btrfs, ZFS) allocates anew on
    /// every write anyway, tmpfs syncs nothing and would hold them in memory.
    static func zerosAheadHelp(_ path: String) -> Bool {
        let ext = 0xEF53, xfs = 0x5846_5342
        return [ext, xfs].contains(sealpost_fs_type(path))
    }

    /// After a commit that failed: LMDB gives up on the environment
    /// when it could not write the meta page (every later transaction then
    /// fails with MDB_PANIC), and the queue must learn that now, not at the
    /// next message (which would get a 451 of its own, as every one after).
    private func checkEnvironment() {
        do {
            let probe = try environment.beginWrite()
            probe.abort()
        } catch {
            if error.isPanic { health.fail("the last commit's meta page was not written (\(error))") }
        }
    }

    /// Doubles the map up to the limit; false when already at the limit.
    private func grow() -> Bool {
        let current = environment.mapSize
        guard current < mapSizeLimit else { return false }
        let newSize = current > mapSizeLimit / 2 ? mapSizeLimit : current * 2
        // LMDB: no transaction may be active in the process during the resize.
        readLock.lockExclusive()
        defer { readLock.unlock() }
        do {
            try environment.setMapSize(newSize)
        } catch {
            // LMDB unmaps the old map before it maps the new one: when the
            // mmap fails, no map is left, and the next transaction would
            // dereference it. Setting the size again maps nothing either.
            health.fail("the map could not grow to \(newSize) bytes: \(error)")
            return false
        }
        statsLock.lock()
        stats.mapGrowths += 1
        statsLock.unlock()
        return true
    }

    private func classify(_ error: Error) -> SpoolError {
        if let e = error as? SpoolError { return e }
        if let e = error as? LMDBError {
            if e.isMapFull || e.isNoSpace || e.code == EDQUOT { return .full }
            return .io(e.description)
        }
        return .io("\(error)")
    }

    /// One write transaction for the batch. In a direct pass the
    /// submissions are applied straight to it, and any failure abandons
    /// the attempt (`.isolateFailures`): the common case, where every
    /// submission succeeds, costs no nested transaction. A nested
    /// transaction is not free in LMDB: each page it touches that its
    /// parent had dirtied is copied into a newly allocated and zeroed page,
    /// and the parent's copy is freed at the child's commit (not kept for
    /// reuse), a malloc, a 4 KiB memset and a free for each of a message's
    /// half-dozen B-tree pages. In an isolated pass each submission gets a
    /// nested transaction, so that one that fails (validation, or no room at
    /// the map's limit) fails alone and the others are committed.
    private func attempt(_ batch: [Submission], _ pass: Pass) -> Attempt {
        let atLimit = pass == .isolated(atLimit: true)
        if let failure = health.failure { return .failed(.io(failure)) }
        let txn: WriteTransaction
        do {
            txn = try environment.beginWrite()
        } catch {
            if error.isPanic { health.fail("a write transaction found the environment unusable (\(error))") }
            return .failed(classify(error))
        }
        defer { txn.abort() }   // no-op after commit

        var results: [Result<Void, SpoolError>] = []
        var succeeded = 0
        var totals = (operations: UInt64(0), messages: UInt64(0))
        var highest = highestID
        for submission in batch {
            if case .isolated = pass {
                // A nested transaction per submission: all of its operations or none.
                let child: WriteTransaction
                do { child = try txn.beginChild() } catch { return .failed(classify(error)) }
                do {
                    for operation in submission.operations { try apply(operation, child) }
                    try child.commit()
                } catch {
                    child.abort()
                    let e = classify(error)
                    if e == .full, (error as? LMDBError)?.isMapFull == true, !atLimit { return .mapFull }
                    results.append(.failure(e))
                    continue
                }
            } else {
                do {
                    for operation in submission.operations { try apply(operation, txn) }
                } catch {
                    // A direct pass is never at the map's limit (see Pass): grow.
                    if (error as? LMDBError)?.isMapFull == true { return .mapFull }
                    return .isolateFailures
                }
            }
            results.append(.success(()))
            succeeded += 1
            totals.operations += UInt64(submission.operations.count)
            for case .insert(let envelope, _) in submission.operations {
                totals.messages += 1
                highest = max(highest, envelope.queueID.value)
            }
        }
        guard succeeded > 0 else { return .done(results, committed: false) }
        do {
            try addToCounter(txn, "commits", 1)
            try addToCounter(txn, "operations", totals.operations)
            try addToCounter(txn, "messages", totals.messages)
            // On the meta page the counters dirty anyway: no extra write.
            if highest > highestID { try txn.put(databases.meta, Array(Self.highestIDName.utf8), bigEndian(highest)) }
            try txn.commit()
        } catch {
            if (error as? LMDBError)?.isMapFull == true, !atLimit { return .mapFull }
            if let e = error as? LMDBError, e.code == EIO, diskIsFull(needing: batchBytes(batch)) {
                // LMDB turns a short pwrite (the disk filled in the middle
                // of a page run) into EIO; the file system tells the truth.
                return .failed(.full)
            }
            return .failed(classify(error))
        }
        highestID = highest
        return .done(results, committed: true)
    }

    static let highestIDName = "highest-id"

    /// meta "highest-id": 0 when missing (a spool from before it).
    static func highestID(_ txn: Transaction, _ dbs: SpoolDatabases) throws -> UInt64 {
        try metaNumber(txn, dbs, highestIDName) ?? 0
    }

    /// Roughly the bytes a batch writes (bodies and envelopes).
    private func batchBytes(_ batch: [Submission]) -> Int {
        var total = 0
        for submission in batch {
            for operation in submission.operations {
                switch operation {
                case .insert(_, let body): total += body.chunks.reduce(0) { $0 + $1.count } + 4096
                case .update, .delete: total += 4096
                }
            }
        }
        return total
    }

    /// Whether the spool's file system has less room than a batch needs
    /// (with 1 MiB to spare): a failed write then means "disk full".
    private func diskIsFull(needing bytes: Int) -> Bool {
        guard let space = fileSystemSpace() else { return false }
        return space.available < UInt64(bytes) + (1 << 20)
    }

    /// The spool's file system: its size, and the bytes free to this user.
    private func fileSystemSpace() -> (size: UInt64, available: UInt64)? {
        var fs = statvfs()
        guard statvfs(environment.path, &fs) == 0 else { return nil }
        return (UInt64(fs.f_blocks) * UInt64(fs.f_frsize), UInt64(fs.f_bavail) * UInt64(fs.f_frsize))
    }

    private func addToCounter(_ txn: WriteTransaction, _ name: String, _ delta: UInt64) throws {
        let value = try Self.metaNumber(txn, databases, name) ?? 0
        try txn.put(databases.meta, Array(name.utf8), bigEndian(value &+ delta))
    }

    /// A u64 of `meta` (a counter, "highest-id"); nil when missing.
    static func metaNumber(_ txn: Transaction, _ dbs: SpoolDatabases, _ name: String) throws -> UInt64? {
        guard let value = try txn.get(dbs.meta, Array(name.utf8)) else { return nil }
        guard value.count == 8 else { throw SpoolError.corrupt("meta \(name) has \(value.count) bytes") }
        return value.reduce(0) { $0 << 8 | UInt64($1) }
    }

    private func apply(_ operation: SpoolOperation, _ txn: WriteTransaction) throws {
        let dbs = databases
        switch operation {
        case .insert(let envelope, let body):
            let id = envelope.queueID
            guard !body.chunks.isEmpty else { throw SpoolError.corrupt("\(id): sealed body without chunks") }
            guard try txn.insert(dbs.envelopes, id.key, envelope.encoded()) else {
                throw SpoolError.io("\(id): queue ID already in the spool")
            }
            let keyRecord = KeyRecord(wrappedKey: body.wrappedKey, header: body.header,
                                      chunkCount: UInt32(body.chunks.count), size: body.size)
            guard try txn.insert(dbs.keys, id.key, keyRecord.encoded()) else {
                throw SpoolError.corrupt("\(id): key record exists without an envelope")
            }
            // Chunks left by an earlier message with this ID would be read
            // as part of this body; there must be none.
            try txn.deleteRange(dbs.bodies, from: chunkKey(id, 0), to: id.key + [0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
            for (number, chunk) in body.chunks.enumerated() {
                try txn.put(dbs.bodies, chunkKey(id, UInt32(number)), chunk)
            }
        case .update(let envelope):
            let id = envelope.queueID
            guard try txn.get(dbs.envelopes, id.key) != nil else { throw SpoolError.noSuchMessage }
            try txn.put(dbs.envelopes, id.key, envelope.encoded())
        case .delete(let id):
            guard try txn.delete(dbs.envelopes, id.key) else { throw SpoolError.noSuchMessage }
            try txn.delete(dbs.keys, id.key)
            try txn.deleteRange(dbs.bodies, from: chunkKey(id, 0), to: id.key + [0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
        }
    }
}

/// Whether LMDB can still use the environment: not once it declared it
/// unusable (MDB_PANIC, after a meta page write failed: the pages in memory
/// and on disk may disagree) or lost its map in a failed resize. Reported
/// once (SpoolOptions.environmentFailed); every later transaction of the
/// spool fails with the reason instead of reaching LMDB.
final class EnvironmentHealth: @unchecked Sendable {
    private let lock = NSLock()
    private var reason: String?
    private let report: (@Sendable (String) -> Void)?

    init(report: (@Sendable (String) -> Void)?) {
        self.report = report
    }

    /// Why the environment is unusable, or nil.
    var failure: String? {
        lock.lock()
        defer { lock.unlock() }
        return reason.map { "spool unusable: " + $0 }
    }

    func fail(_ why: String) {
        lock.lock()
        let first = reason == nil
        if first { reason = why }
        lock.unlock()
        if first { report?("spool unusable: " + why) }
    }
}
