// The queue's in-memory schedule: which recipients are due, which are in a
// job right now, and what to send next to a delivery stage of a transport.
//
// Pure and single-threaded: the service owns one Scheduler on its event loop
// and passes the clock in. The spool stays the truth; the scheduler is
// rebuilt from `Spool.allEnvelopes()` at start, where every recipient that is
// neither sent nor bounced becomes due again (nothing is "in flight" after a
// restart).

import Spool

import Spool

/// One job to hand to a delivery stage: some recipients of one message, all
/// for one destination.
public struct JobPlan: Sendable, Equatable {
    public var queueID: QueueID
    public var destination: Destination
    /// Indexes into the envelope's `recipients`, in envelope order.
    public var recipients: [Int]
    /// The attempt number sent in JOB (1 for the first attempt): one more
    /// than the most attempts any of the job's recipients has had.
    public var attempt: UInt32
}

public struct Scheduler {
    struct Entry {
        var envelope: EnvelopeRecord
        /// Recipients in a job that has not finished.
        var inFlight: Set<Int> = []
        /// Consecutive lost jobs per recipient (see RecipientUpdate.lost).
        var losses: [Int: Int] = [:]
    }

    private var entries: [QueueID: Entry] = [:]
    /// Wake-up times; stale entries are skipped (see `scheduledAt`).
    private var timers = MinHeap()
    /// The earliest live timer of each message.
    private var scheduledAt: [QueueID: UInt64] = [:]
    /// Messages with due recipients, per transport, oldest first.
    private var ready: [Transport: FIFO] = [:]
    private var readySet: [Transport: Set<QueueID>] = [:]
    /// Messages that became ready since the service last looked (for its
    /// "delivery temporarily suspended" log line).
    private var newlyReady: [Transport: [QueueID]] = [:]

    public let router: Router
    public let maxRecipientsPerJob: Int

    public init(router: Router, maxRecipientsPerJob: Int = 50) {
        self.router = router
        self.maxRecipientsPerJob = max(1, maxRecipientsPerJob)
    }

    // MARK: Contents

    public var count: Int { entries.count }
    public var queueIDs: [QueueID] { entries.keys.sorted() }
    public func envelope(_ id: QueueID) -> EnvelopeRecord? { entries[id]?.envelope }
    public func inFlight(_ id: QueueID) -> Set<Int> { entries[id]?.inFlight ?? [] }
    public var envelopes: [EnvelopeRecord] {
        entries.values.map(\.envelope).sorted { ($0.arrival, $0.queueID) < ($1.arrival, $1.queueID) }
    }
    /// Number of recipients currently in jobs.
    public var recipientsInFlight: Int { entries.values.reduce(0) { $0 + $1.inFlight.count } }

    /// Adds (or replaces) a message; its unfinished recipients are due at
    /// their `nextAttempt`.
    public mutating func insert(_ envelope: EnvelopeRecord, now: UInt64) {
        let id = envelope.queueID
        let previous = entries[id]
        entries[id] = Entry(envelope: envelope, inFlight: previous?.inFlight ?? [], losses: previous?.losses ?? [:])
        reschedule(id, now: now)
    }

    @discardableResult
    public mutating func remove(_ id: QueueID) -> EnvelopeRecord? {
        takeEntry(id)?.envelope
    }

    /// Removes a message and returns its whole entry (jobs in flight
    /// included), for `restore` if the removal cannot be committed.
    mutating func takeEntry(_ id: QueueID) -> Entry? {
        scheduledAt[id] = nil
        for t in Transport.allCases { readySet[t]?.remove(id) }
        return entries.removeValue(forKey: id)
    }

    /// Puts back an entry `takeEntry` took: its recipients in jobs stay in
    /// flight, so none is sent a second time while that job runs.
    mutating func restore(_ entry: Entry, now: UInt64) {
        entries[entry.envelope.queueID] = entry
        reschedule(entry.envelope.queueID, now: now)
    }

    /// Changes a message in place. The caller reschedules when it changed
    /// anything that matters for timing.
    @discardableResult
    public mutating func modify<R>(_ id: QueueID, _ body: (inout EnvelopeRecord) throws -> R) rethrows -> R? {
        guard entries[id] != nil else { return nil }
        return try body(&entries[id]!.envelope)
    }

    /// True when every recipient is sent or bounced and no job is out.
    public func isComplete(_ id: QueueID) -> Bool {
        guard let entry = entries[id] else { return false }
        return entry.inFlight.isEmpty && entry.envelope.recipients.allSatisfy { $0.state.isFinal }
    }

    // MARK: Timing

    /// Files the message under its earliest due time: into the ready queues
    /// when that is now or past, else under a timer. Held messages and
    /// recipients in flight are not scheduled.
    public mutating func reschedule(_ id: QueueID, now: UInt64) {
        guard let entry = entries[id], !entry.envelope.held else { return }
        var earliestFuture: UInt64?
        for (i, r) in entry.envelope.recipients.enumerated() where !r.state.isFinal && !entry.inFlight.contains(i) {
            if r.nextAttempt <= now {
                let t = router.destination(of: r.address).transport
                if readySet[t, default: []].insert(id).inserted {
                    ready[t, default: FIFO()].append(id)
                    newlyReady[t, default: []].append(id)
                }
            } else {
                earliestFuture = min(earliestFuture ?? .max, r.nextAttempt)
            }
        }
        if let t = earliestFuture, (scheduledAt[id].map { t < $0 } ?? true) {
            scheduledAt[id] = t
            timers.push(t, id)
        }
    }

    /// Moves every message whose timer expired into the ready queues.
    public mutating func advance(now: UInt64) {
        while let (t, id) = timers.peek(), t <= now {
            _ = timers.pop()
            guard scheduledAt[id] == t else { continue }   // superseded or removed
            scheduledAt[id] = nil
            reschedule(id, now: now)
        }
    }

    /// When the next timer fires (nil: none pending).
    public mutating func nextWakeup() -> UInt64? {
        while let (t, id) = timers.peek() {
            if scheduledAt[id] == t { return t }
            _ = timers.pop()
        }
        return nil
    }

    /// Messages that entered a ready queue of `transport` since the last call.
    public mutating func takeNewlyReady(_ transport: Transport) -> [QueueID] {
        defer { newlyReady[transport] = [] }
        return newlyReady[transport] ?? []
    }

    /// How many messages wait in the ready queue of `transport`.
    public func readyCount(_ transport: Transport) -> Int { readySet[transport]?.count ?? 0 }

    // MARK: Jobs

    /// The next job for a stage of `transport`: the due recipients of the
    /// oldest ready message that go to one destination (at most
    /// `maxRecipientsPerJob`). They are in flight until `finish(_:now:)`.
    public mutating func nextJob(for transport: Transport, now: UInt64) -> JobPlan? {
        while let id = ready[transport]?.popFirst() {
            readySet[transport]?.remove(id)
            guard let entry = entries[id], !entry.envelope.held else { continue }
            var destination: Destination?
            var chosen: [Int] = []
            var more = false
            for (i, r) in entry.envelope.recipients.enumerated()
            where !r.state.isFinal && !entry.inFlight.contains(i) && r.nextAttempt <= now {
                let d = router.destination(of: r.address)
                guard d.transport == transport else { continue }
                if destination == nil { destination = d }
                if d == destination && chosen.count < maxRecipientsPerJob { chosen.append(i) } else { more = true }
            }
            guard let destination, !chosen.isEmpty else { continue }
            entries[id]!.inFlight.formUnion(chosen)
            if more, readySet[transport, default: []].insert(id).inserted {
                ready[transport, default: FIFO()].append(id)
            }
            let attempts = chosen.map { entry.envelope.recipients[$0].attempts }.max() ?? 0
            return JobPlan(queueID: id, destination: destination, recipients: chosen, attempt: attempts &+ 1)
        }
        return nil
    }

    /// The job is over (its results, if any, were applied with `modify`):
    /// its recipients are no longer in flight; unfinished ones are scheduled.
    public mutating func finish(_ job: JobPlan, now: UInt64) {
        guard entries[job.queueID] != nil else { return }
        entries[job.queueID]!.inFlight.subtract(job.recipients)
        reschedule(job.queueID, now: now)
    }

    /// Counts one more lost job for a recipient; returns the count so far.
    public mutating func recordLoss(_ id: QueueID, index: Int) -> Int {
        guard entries[id] != nil else { return 0 }
        entries[id]!.losses[index, default: 0] += 1
        return entries[id]!.losses[index]!
    }

    /// A recipient got a real result: its lost-job count starts over.
    public mutating func clearLosses(_ id: QueueID, index: Int) {
        entries[id]?.losses[index] = nil
    }

    // MARK: Administration

    /// Makes every unfinished recipient (of one message, or all) due now.
    /// Returns the messages flushed.
    @discardableResult
    public mutating func flush(_ only: QueueID?, now: UInt64) -> Int {
        let ids = only.map { [$0] } ?? Array(entries.keys)
        var n = 0
        for id in ids where entries[id] != nil {
            n += 1
            for i in entries[id]!.envelope.recipients.indices where !entries[id]!.envelope.recipients[i].state.isFinal {
                entries[id]!.envelope.recipients[i].nextAttempt = min(entries[id]!.envelope.recipients[i].nextAttempt, now)
            }
            reschedule(id, now: now)
        }
        return n
    }

    /// Held messages are not scheduled until released.
    public mutating func setHeld(_ id: QueueID, _ held: Bool, now: UInt64) {
        guard entries[id] != nil else { return }
        entries[id]!.envelope.held = held
        if held {
            scheduledAt[id] = nil
            for t in Transport.allCases { readySet[t]?.remove(id) }
        } else {
            reschedule(id, now: now)
        }
    }
}

// MARK: - Small containers

/// Binary min-heap of (time, queue ID), ordered by time then ID.
struct MinHeap {
    private var items: [(UInt64, QueueID)] = []
    var count: Int { items.count }
    func peek() -> (UInt64, QueueID)? { items.first }
    private static func less(_ a: (UInt64, QueueID), _ b: (UInt64, QueueID)) -> Bool { a.0 != b.0 ? a.0 < b.0 : a.1 < b.1 }
    mutating func push(_ t: UInt64, _ id: QueueID) {
        items.append((t, id))
        var i = items.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            guard Self.less(items[i], items[p]) else { break }
            items.swapAt(i, p); i = p
        }
    }
    mutating func pop() -> (UInt64, QueueID)? {
        guard !items.isEmpty else { return nil }
        items.swapAt(0, items.count - 1)
        let top = items.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < items.count && Self.less(items[l], items[m]) { m = l }
            if r < items.count && Self.less(items[r], items[m]) { m = r }
            if m == i { break }
            items.swapAt(i, m); i = m
        }
        return top
    }
}

/// Array-backed queue with amortised O(1) pops.
struct FIFO {
    private var items: [QueueID] = []
    private var head = 0
    var isEmpty: Bool { head >= items.count }
    mutating func append(_ id: QueueID) { items.append(id) }
    mutating func popFirst() -> QueueID? {
        guard head < items.count else { return nil }
        let id = items[head]
        head += 1
        if head > 64 && head * 2 > items.count { items.removeFirst(head); head = 0 }
        return id
    }
}
