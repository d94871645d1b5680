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
        /// Called once the submission is durable: after its journal record
        /// (before it is in LMDB), or just before `completion` reports
        /// success. Nil for submitters that wait for `completion` alone.
        let durable: (@Sendable () -> Void)?
        let completion: @Sendable (Result<Void, SpoolError>) -> Void

        /// The message, when the submission is one urgent insert: what the
        /// journal carries.
        var journalable: (envelope: EnvelopeRecord, body: SealedBody)? {
            guard urgency == .now, operations.count == 1, case .insert(let envelope, let body) = operations[0] else { return nil }
            return (envelope, body)
        }
    }

    /// A submission handed to the applier thread, with the sequence of its
    /// journal record when it has one.
    private struct Work {
        let submission: Submission
        let sequence: UInt64?
        let bytes: Int
    }

    /// How long an urgent batch may wait for the submitters active lately
    /// to join it (see `gatherSiblings`); 0: never.
    let commitDelay: TimeInterval
    /// A submitter counts as active lately for this long (ns) after its
    /// last urgent submission.
    let activeWindow: UInt64
    /// The share of the submitters active lately a delayed batch waits for.
    /// 0.6 rather than 0.4 since 2026-12-01: at 20 sessions 1.024x msg/s
    /// over 12 rounds with 4.6% less CPU per message (README, "Speed").
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

    // The journal and its applier thread (Journal.swift): with a journal,
    // the committer thread appends urgent inserts to it, answers them, and
    // hands every submission to the applier, the one thread that writes
    // LMDB. `applierQueue`, `retrying`, `retryAt`, `appliedSequence`,
    // `unappliedBytes`, `drainRequested`, `applierStopping`, `applierRunning`
    // and `applierThread` are guarded by `applierCondition`.
    private let journal: Journal?
    private let applyDelay: TimeInterval
    private let warn: (@Sendable (String) -> Void)?
    private let applierCondition = NSCondition()
    private var applierQueue: [Work] = []
    /// Journaled submissions LMDB had no room for: tried again at `retryAt`.
    private var retrying: [Work] = []
    private var retryAt: Date?
    /// Every record up to this one is in LMDB and committed.
    private var appliedSequence: UInt64 = 0
    /// Payload bytes journaled and not yet applied.
    private var unappliedBytes = 0
    private var drainRequested = false
    private var applierStopping = false
    private var applierRunning = false
    private var applierThread: pthread_t?
    /// The applier waits for this many submissions, up to `applyDelay`,
    /// when none of those waiting needs an answer.
    static let applyBatch = 64

    /// Journaled messages not yet in LMDB, for the readers in between
    /// (Spool.readBody, Spool.envelope): a message answered is readable.
    private let unappliedLock = NSLock()
    private var unapplied: [QueueID: (envelope: EnvelopeRecord, body: SealedBody)] = [:]

    private let statsLock = NSLock()
    private var stats = SpoolStatistics()

    /// The highest queue ID committed (meta "highest-id", or the highest
    /// envelope of a spool from before that record). Committer thread only.
    private var highestID: UInt64

    init(environment: Environment, databases: SpoolDatabases, readLock: ReadWriteLock, mapSizeLimit: Int,
         deferral: TimeInterval = 0.5, commitDelay: TimeInterval = 0, siblingWindow: TimeInterval = 0.05,
         highestID: UInt64 = 0, journal: Journal? = nil, appliedSequence: UInt64 = 0,
         applyDelay: TimeInterval = 0.02, warn: (@Sendable (String) -> Void)? = nil) {
        self.journal = journal
        self.appliedSequence = appliedSequence
        self.applyDelay = applyDelay
        self.warn = warn
        self.deferral = deferral
        self.commitDelay = commitDelay
        self.activeWindow = UInt64(max(0, siblingWindow) * 1e9)
        self.highestID = highestID
        self.environment = environment
        self.databases = databases
        self.readLock = readLock
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
        if journal != nil {
            applierCondition.lock()
            applierRunning = true
            applierCondition.unlock()
            let applier = Thread { [self] in applierRun() }
            applier.name = "spool-applier"
            applier.start()
        }
        let thread = Thread { [self] in run() }
        thread.name = "spool-committer"
        thread.start()
    }

    func submit(_ operations: [SpoolOperation], urgency: SpoolUrgency = .now, submitter: Int? = nil,
                durable: (@Sendable () -> Void)? = nil,
                completion: @escaping @Sendable (Result<Void, SpoolError>) -> Void) {
        condition.lock()
        guard running, !stopping else {
            condition.unlock()
            completion(.failure(.io("spool closed")))
            return
        }
        pending.append(Submission(operations: operations, urgency: urgency, durable: durable, completion: completion))
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

    /// Run by the committer thread as it exits, after the applier: the
    /// closing of the environment when `stop()` could not wait (guarded by
    /// `condition`).
    private var closeAtExit: (() -> Void)?

    /// Lets the threads finish what is queued, then waits for them to exit;
    /// true once they have. Called on the committer or the applier thread
    /// (a completion that releases the last reference to the Spool), it
    /// only asks them to stop (waiting there would wait forever), runs
    /// `atExit` on the committer thread as it exits (when the other thread
    /// no longer uses LMDB either), and returns false.
    @discardableResult
    func stop(atExit: (() -> Void)? = nil) -> Bool {
        applierCondition.lock()
        let onApplier = applierThread.map { pthread_equal($0, pthread_self()) != 0 } ?? false
        applierCondition.unlock()
        condition.lock()
        stopping = true
        condition.broadcast()
        if onApplier || thread.map({ pthread_equal($0, pthread_self()) != 0 }) == true {
            if running { closeAtExit = atExit } else { atExit?() }
            condition.unlock()
            return false
        }
        while running { condition.wait() }
        condition.unlock()
        return true
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
                if journal != nil {
                    // Unlocked: the applier's completions may submit.
                    condition.unlock()
                    stopApplier()
                    condition.lock()
                }
                let close = closeAtExit
                closeAtExit = nil
                running = false
                condition.broadcast()
                condition.unlock()
                close?()
                return
            }
            let batch = pending
            pending = []
            urgentPending = 0
            deferredSince = nil
            condition.unlock()

            if journal != nil {
                handOver(batch)
                continue
            }

            let (results, committed) = process(batch)
            for (submission, result) in zip(batch, results) {
                if case .success = result { submission.durable?() }
                submission.completion(result)
            }
            // After the completions: the batch's answers do not wait for it.
            if committed { keepZeroedAhead() }
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

    // MARK: The journal

    /// With a journal (committer thread): appends the batch's urgent
    /// inserts as one record and answers them as durable, then hands the
    /// whole batch to the applier. Inserts the journal cannot take (no
    /// room now, a message too big for it, LMDB near its limit or stuck, a
    /// failed write) go to the applier like any other submission, and are
    /// answered after its synced commit.
    private func handOver(_ batch: [Submission]) {
        var journaled: [Submission] = []
        var others: [Submission] = []
        var inserts: [(envelope: EnvelopeRecord, body: SealedBody)] = []
        // A record holds at most a quarter of the journal (see
        // appendToJournal): the inserts beyond go the direct way.
        let limit = (journal?.capacity ?? 0) / 4
        var estimate = Journal.payloadSize([])
        for submission in batch {
            if let insert = submission.journalable,
               Journal.recordSize(payloadSize: estimate + Journal.payloadSize([insert]) - Journal.payloadSize([])) <= limit {
                journaled.append(submission)
                inserts.append(insert)
                estimate += Journal.payloadSize([insert]) - Journal.payloadSize([])
            } else {
                others.append(submission)
            }
        }
        var work: [Work] = []
        if !inserts.isEmpty, let (sequence, bytes) = appendToJournal(inserts) {
            unappliedLock.lock()
            for insert in inserts { unapplied[insert.envelope.queueID] = insert }
            unappliedLock.unlock()
            for submission in journaled { submission.durable?() }
            work = journaled.map { Work(submission: $0, sequence: sequence, bytes: bytes / journaled.count) }
        } else {
            others = batch
        }
        work += others.map { Work(submission: $0, sequence: nil, bytes: 0) }
        applierCondition.lock()
        applierQueue += work
        unappliedBytes += work.reduce(0) { $0 + $1.bytes }
        applierCondition.signal()
        applierCondition.unlock()
    }

    /// Appends one record; its sequence and payload size, or nil when the
    /// journal does not take these messages.
    private func appendToJournal(_ inserts: [(envelope: EnvelopeRecord, body: SealedBody)]) -> (UInt64, Int)? {
        guard let journal else { return nil }
        let estimate = Journal.payloadSize(inserts)
        // A record of more than a quarter of the journal would make the
        // journal rewind too often: such messages take the direct way.
        guard Journal.recordSize(payloadSize: estimate) <= journal.capacity / 4 else { return nil }
        applierCondition.lock()
        let stuck = !retrying.isEmpty
        let unapplied = unappliedBytes
        let allApplied = appliedSequence >= journal.lastSequence
        if !journal.fits(payloadSize: estimate), !allApplied { drainRequested = true; applierCondition.signal() }
        applierCondition.unlock()
        // What the journal acknowledges must find room in LMDB later:
        // near the map's limit, the direct way answers "full" instead.
        guard !stuck else { return nil }
        // Under the read lock: the applier's grow() remaps the map.
        readLock.lockShared()
        let used = environment.isClosed ? mapSizeLimit : environment.usedSize
        readLock.unlock()
        guard used + 2 * (unapplied + estimate) + (1 << 20) <= mapSizeLimit else { return nil }
        if !journal.fits(payloadSize: estimate) {
            guard allApplied else { return nil }
            journal.rewind()
            statsLock.lock()
            stats.journalRewinds += 1
            statsLock.unlock()
        }
        let payload = Journal.payload(inserts)
        guard journal.fits(payloadSize: payload.count) else { return nil }
        do {
            let sequence = try journal.append(payload)
            statsLock.lock()
            stats.journalRecords += 1
            stats.journaledSubmissions += UInt64(inserts.count)
            statsLock.unlock()
            return (sequence, payload.count)
        } catch {
            warn?("\(journal.path): cannot append (\(error)): messages are committed to LMDB directly")
            return nil
        }
    }

    /// The applier thread: applies what the committer hands over, in
    /// order, in one LMDB transaction per round (committed with LMDB's
    /// full sync). When every submission waiting is journaled (answered
    /// already), a round first waits up to `applyDelay` for `applyBatch`
    /// of them: fewer, larger commits, off the path of any reply.
    private func applierRun() {
        applierCondition.lock()
        applierThread = pthread_self()
        while true {
            while applierQueue.isEmpty && retrying.isEmpty && !applierStopping { applierCondition.wait() }
            if applierQueue.isEmpty && (retrying.isEmpty || applierStopping) { break }
            if let retryAt {
                while !applierStopping && Date() < retryAt { _ = applierCondition.wait(until: retryAt) }
            }
            if !applierStopping && !drainRequested && retrying.isEmpty && applierQueue.allSatisfy({ $0.sequence != nil }) {
                let deadline = Date().addingTimeInterval(applyDelay)
                while !applierStopping && !drainRequested && applierQueue.count < Self.applyBatch
                        && applierQueue.allSatisfy({ $0.sequence != nil }) && applierCondition.wait(until: deadline) {}
            }
            let work = retrying + applierQueue
            retrying = []
            applierQueue = []
            retryAt = nil
            drainRequested = false
            applierCondition.unlock()

            let (results, committed) = process(work.map(\.submission), sequences: work.map(\.sequence))
            var answers: [(Work, Result<Void, SpoolError>)] = []
            var again: [Work] = []
            for (item, result) in zip(work, results) {
                // A journaled message was answered: whatever LMDB says, it
                // waits in the journal (which cannot start over meanwhile)
                // and is tried again, never dropped.
                if item.sequence != nil, case .failure = result {
                    again.append(item)
                } else {
                    answers.append((item, result))
                }
            }
            if !again.isEmpty {
                let reason = results.lazy.compactMap { result -> SpoolError? in
                    if case .failure(let error) = result { return error } else { return nil }
                }.first.map { "\($0)" } ?? "unknown"
                warn?("\(again.count) journaled messages cannot enter LMDB (\(reason)); they stay in the journal, tried again every second")
            }
            // In LMDB now (or failed for good): read from there.
            unappliedLock.lock()
            for (item, _) in answers where item.sequence != nil {
                if case .insert(let envelope, _) = item.submission.operations[0] { unapplied[envelope.queueID] = nil }
            }
            unappliedLock.unlock()
            applierCondition.lock()
            if committed { appliedSequence = max(appliedSequence, lastAppliedThrough) }
            unappliedBytes -= work.reduce(0) { $0 + $1.bytes } - again.reduce(0) { $0 + $1.bytes }
            retrying = again
            if !again.isEmpty { retryAt = Date().addingTimeInterval(1) }
            applierCondition.unlock()
            for (item, result) in answers {
                if item.sequence == nil, case .success = result { item.submission.durable?() }
                item.submission.completion(result)
            }
            if committed { keepZeroedAhead() }
            applierCondition.lock()
        }
        // Stopping with messages LMDB had no room for: they stay in the
        // journal and are applied at the next open.
        let left = retrying
        retrying = []
        applierRunning = false
        applierCondition.broadcast()
        applierCondition.unlock()
        for item in left {
            item.submission.completion(.failure(.io("spool closed; the message stays in the journal")))
        }
    }

    /// The journaled message `id` while it is not in LMDB yet.
    func unappliedInsert(_ id: QueueID) -> (envelope: EnvelopeRecord, body: SealedBody)? {
        unappliedLock.lock()
        defer { unappliedLock.unlock() }
        return unapplied[id]
    }

    /// Lets the applier finish what it was handed, then waits for it.
    private func stopApplier() {
        applierCondition.lock()
        applierStopping = true
        applierCondition.broadcast()
        while applierRunning { applierCondition.wait() }
        applierCondition.unlock()
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
    private func process(_ batch: [Submission], sequences: [UInt64?] = []) -> ([Result<Void, SpoolError>], committed: Bool) {
        var pass = Pass.direct
        while true {
            switch attempt(batch, pass, sequences: sequences) {
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
    private func attempt(_ batch: [Submission], _ pass: Pass, sequences: [UInt64?] = []) -> Attempt {
        let atLimit = pass == .isolated(atLimit: true)
        let txn: WriteTransaction
        do { txn = try environment.beginWrite() } catch { return .failed(classify(error)) }
        defer { txn.abort() }   // no-op after commit

        var results: [Result<Void, SpoolError>] = []
        var succeeded = 0
        var totals = (operations: UInt64(0), messages: UInt64(0))
        var highest = highestID
        for (index, submission) in batch.enumerated() {
            // A journaled message that is in LMDB already (applied by a
            // commit whose record could not count as applied) is done.
            if index < sequences.count, sequences[index] != nil, case .insert(let envelope, _) = submission.operations[0] {
                let present: Bool
                do { present = try txn.get(databases.envelopes, envelope.queueID.key) != nil } catch { return .failed(classify(error)) }
                if present {
                    results.append(.success(()))
                    continue
                }
            }
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
            // Journal records applied: through the highest one of the
            // batch, or below the first whose message failed (the replay
            // at the next open then tries it again).
            var through: UInt64 = 0
            if let newest = sequences.compactMap({ $0 }).max() {
                let firstFailed = zip(results, sequences).compactMap { result, sequence -> UInt64? in
                    if case .failure = result { return sequence } else { return nil }
                }.min()
                through = firstFailed.map { $0 - 1 } ?? newest
                let stored = try Self.metaNumber(txn, databases, Self.journalAppliedName) ?? 0
                if through > stored { try txn.put(databases.meta, Array(Self.journalAppliedName.utf8), bigEndian(through)) }
            }
            try txn.commit()
            lastAppliedThrough = through
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
    /// meta "journal-applied": every journal record up to it is in LMDB.
    static let journalAppliedName = "journal-applied"
    /// The journal records the last commit applied (see `attempt`).
    private var lastAppliedThrough: UInt64 = 0

    /// Applies the journal records above meta "journal-applied" to LMDB
    /// in one transaction (committed with LMDB's full sync), at open,
    /// before anything else writes; the map grows as needed. A message
    /// already in LMDB (applied by a commit that could not count its record
    /// as applied) is skipped. A record LMDB refuses for another reason than
    /// room (it does not decode, or a message in it fails) is copied to
    /// `journal-rejected-SEQUENCE` beside the journal, as Postfix moves a
    /// queue file it cannot read to its corrupt directory, and reported.
    /// Returns the messages inserted and the sequence the journal's next
    /// record must follow.
    static func replay(_ journal: Journal, _ environment: Environment, _ dbs: SpoolDatabases, mapSizeLimit: Int,
                       warn: (@Sendable (String) -> Void)?) throws -> (messages: Int, last: UInt64) {
        let applied = try environment.read { txn throws in try metaNumber(txn, dbs, journalAppliedName) ?? 0 }
        let records = try journal.records(after: applied)
        journal.continueAfter(applied)
        guard let last = records.last?.sequence else { return (0, journal.lastSequence) }
        while true {
            var messages = 0
            var rejected: [UInt64: String] = [:]
            do {
                try environment.write { txn throws in
                    var highest = try metaNumber(txn, dbs, highestIDName) ?? 0
                    for record in records {
                        let inserts: [(envelope: EnvelopeRecord, body: SealedBody)]
                        do { inserts = try Journal.inserts(record.payload) } catch {
                            rejected[record.sequence] = "\(error)"
                            continue
                        }
                        for (envelope, body) in inserts {
                            highest = max(highest, envelope.queueID.value)
                            if try txn.get(dbs.envelopes, envelope.queueID.key) != nil { continue }
                            let child = try txn.beginChild()
                            do {
                                try apply(.insert(envelope, body), child, dbs)
                                try child.commit()
                                messages += 1
                            } catch {
                                child.abort()
                                if let e = error as? LMDBError, e.isMapFull || e.isNoSpace || e.code == EDQUOT { throw e }
                                rejected[record.sequence, default: ""] += "\(envelope.queueID): \(error); "
                            }
                        }
                    }
                    try txn.put(dbs.meta, Array(highestIDName.utf8), bigEndian(highest))
                    try txn.put(dbs.meta, Array(journalAppliedName.utf8), bigEndian(last))
                    let total = try metaNumber(txn, dbs, "messages") ?? 0
                    try txn.put(dbs.meta, Array("messages".utf8), bigEndian(total &+ UInt64(messages)))
                    // Kept before the commit that counts them as applied.
                    for (sequence, reason) in rejected.sorted(by: { $0.key < $1.key }) {
                        let payload = records.first { $0.sequence == sequence }!.payload
                        let path = try journal.keepRejected(sequence: sequence, payload: payload)
                        warn?("journal record \(sequence) cannot enter LMDB (\(reason)): kept in \(path)")
                    }
                }
                return (messages, journal.lastSequence)
            } catch let e as LMDBError where e.isMapFull {
                let size = environment.mapSize
                guard size < mapSizeLimit else { throw SpoolError.full }
                try environment.setMapSize(size > mapSizeLimit / 2 ? mapSizeLimit : size * 2)
            }
        }
    }

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
        try Self.apply(operation, txn, databases)
    }

    static func apply(_ operation: SpoolOperation, _ txn: WriteTransaction, _ dbs: SpoolDatabases) throws {
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
