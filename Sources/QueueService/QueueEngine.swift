// The queue's state and decisions at run time: the schedule, the connected
// delivery stages, the spool writes that follow each event, and the log
// lines. Everything here runs on ONE event loop (the service's); handlers of
// the three servers call in on that loop, and completions of the spool's
// committer thread hop back onto it. That confinement is what makes the
// class safe to mark @unchecked Sendable.

#if canImport(Glibc)
import Glibc
#endif
import Logging
import MailMessage
import NIOCore
import SealpostConfig
import Spool
import StageProtocol

/// Counters of the running queue (the `stats` control verb).
public struct QueueStatistics: Sendable, Equatable, CustomStringConvertible {
    /// Synced LMDB transactions so far (the spool's committer).
    public var commits: UInt64
    /// Spool operations committed (inserts, updates, deletes).
    public var operations: UInt64
    /// Messages inserted into the spool: injected mail plus notices.
    public var messages: UInt64
    /// Messages accepted over the inject socket.
    public var injected: UInt64
    /// Transactions refused over the inject socket.
    public var refused: UInt64
    /// Messages in the queue now.
    public var queued: Int
    /// Jobs sent to delivery stages and not yet done.
    public var activeJobs: Int
    /// Recipient results so far.
    public var sent: UInt64, deferred: UInt64, bounced: UInt64
    /// Connected delivery stages, per transport.
    public var localStages: Int, remoteStages: Int

    public var description: String {
        "commits=\(commits) messages=\(messages) operations=\(operations) injected=\(injected) refused=\(refused) "
            + "queued=\(queued) active-jobs=\(activeJobs) sent=\(sent) deferred=\(deferred) bounced=\(bounced) "
            + "local-stages=\(localStages) remote-stages=\(remoteStages)"
    }
}

final class QueueEngine: @unchecked Sendable {
    let loop: EventLoop
    let spool: Spool
    let config: SealpostConfiguration
    let options: QueueServiceOptions
    let policy: RetryPolicy
    let router: Router
    var logger: Logger
    var scheduler: Scheduler
    /// Message bodies held by unfinished inject transactions.
    let pendingBodies: PendingBodies
    /// Open inject connections by peer uid, for those counted.
    private var injectConnections: [UInt32: Int] = [:]

    /// Connected delivery stages (after their HELLO), in connection order.
    private var stages: [DeliverHandler] = []
    /// Messages whose "delivery temporarily suspended" lines were logged,
    /// per transport: a message with local and remote recipients is
    /// suspended for each transport that has no stage.
    private struct Suspension: Hashable {
        var id: QueueID
        var transport: Transport
    }
    private var suspendedLogged: Set<Suspension> = []
    /// Since when each transport has had no stage (the start counts as
    /// such a moment). Its due recipients are not attempted meanwhile, so
    /// once that has lasted a maintenance interval the wait counts as a
    /// deferral, as Postfix's "mail transport unavailable" does, and an
    /// expired message returns to its sender without an attempt. Any other
    /// recipient expires only when an attempt fails (RecipientUpdate).
    private var stagelessSince: [Transport: UInt64] = [:]
    /// Jobs that ended while the deletion of their message was being
    /// committed: applied if that commit fails and the message stays.
    private var endedWhileDeleting: [QueueID: [OutstandingJob]] = [:]
    private var nextMaintenance: UInt64 = 0
    private var stopping = false

    var injected: UInt64 = 0, refused: UInt64 = 0
    var sentCount: UInt64 = 0, deferredCount: UInt64 = 0, bouncedCount: UInt64 = 0

    /// Whether a new inject connection from `uid` may stay. The socket is
    /// open to every local user, and each connection holds a descriptor of
    /// the queue's: without a bound one user could take them all, and
    /// smtp-listen could then hand in no more mail. The uids in
    /// `injectConnectionLimit.unbounded` (root, smtp-listen) are not
    /// bounded. Counted until `releaseInjectConnection`.
    func admitInjectConnection(uid: UInt32) -> Bool {
        guard let limit = options.injectConnectionLimit, !limit.unbounded.contains(uid) else { return true }
        let open = injectConnections[uid, default: 0]
        guard open < limit.perUser else { return false }
        injectConnections[uid] = open + 1
        return true
    }

    func releaseInjectConnection(uid: UInt32) {
        guard let open = injectConnections[uid] else { return }
        injectConnections[uid] = open > 1 ? open - 1 : nil
    }

    init(loop: EventLoop, spool: Spool, config: SealpostConfiguration, options: QueueServiceOptions, logger: Logger) {
        self.loop = loop
        self.spool = spool
        self.config = config
        self.options = options
        self.logger = logger
        let q = config.queue
        self.policy = RetryPolicy(minimalBackoff: UInt64(max(1, q.minimalBackoffTime)),
                                  maximalBackoff: UInt64(max(1, q.maximalBackoffTime)),
                                  maximalLifetime: UInt64(max(0, q.maximalQueueLifetime)),
                                  bounceLifetime: UInt64(max(0, q.bounceQueueLifetime)),
                                  delayWarning: UInt64(max(0, q.delayWarningTime)),
                                  jitter: options.jitter)
        let local = config.local
        self.router = Router(isLocal: { local.isLocal(domain: $0) })
        self.scheduler = Scheduler(router: router, maxRecipientsPerJob: options.maxRecipientsPerJob)
        self.pendingBodies = PendingBodies(limit: options.pendingBodyLimit)
        let start = options.clock()
        for transport in Transport.allCases { stagelessSince[transport] = start }
    }

    var now: UInt64 { options.clock() }

    // MARK: Start and stop

    /// Rebuilds the schedule from the spool. Nothing is in flight after a
    /// start: every recipient that is neither sent nor bounced is scheduled
    /// at its recorded next attempt (pending ones at once).
    func load() throws {
        loop.preconditionInEventLoop()
        let (envelopes, damaged) = try spool.readableEnvelopes()
        for record in damaged {
            logger.error("spool: the envelope of \(record.key) cannot be read (\(record.reason)); it stays in the spool, not scheduled")
        }
        let t = now
        var recipients = 0
        for env in envelopes {
            scheduler.insert(env, now: t)
            recipients += env.recipients.filter { !$0.state.isFinal }.count
        }
        let aside = damaged.isEmpty ? "" : ", \(damaged.count) damaged envelopes left aside"
        logger.info("spool: \(envelopes.count) messages with \(recipients) unfinished recipients in the spool\(aside)")
        maintenance()
    }

    func stop() {
        loop.preconditionInEventLoop()
        stopping = true
    }

    // MARK: Statistics

    func statistics() -> QueueStatistics {
        let s = spool.statistics
        return QueueStatistics(commits: s.commits, operations: s.operations, messages: s.messagesInserted,
                               injected: injected, refused: refused, queued: scheduler.count,
                               activeJobs: stages.reduce(0) { $0 + $1.outstandingCount },
                               sent: sentCount, deferred: deferredCount, bounced: bouncedCount,
                               localStages: stages.filter { $0.transport == .local }.count,
                               remoteStages: stages.filter { $0.transport == .remote }.count)
    }

    func logStatistics() {
        logger.info("statistics: \(statistics())")
    }

    // MARK: Injection

    /// A message whose insert committed: schedule it and log it.
    func accepted(_ env: EnvelopeRecord) {
        loop.preconditionInEventLoop()
        injected += 1
        scheduler.insert(env, now: now)
        logQueued(env)
        if env.held {
            logger.info("\(env.queueID): hold: on arrival ([queue] hold_incoming)")
            return
        }
        dispatch()
    }

    func logQueued(_ env: EnvelopeRecord) {
        logger.info("\(env.queueID): from=<\(env.sender)>, size=\(env.size), nrcpt=\(env.recipients.count) (queue active)")
    }

    // MARK: Delivery stages

    func stageConnected(_ stage: DeliverHandler) {
        loop.preconditionInEventLoop()
        stages.append(stage)
        if let transport = stage.transport { stagelessSince[transport] = nil }
        logger.info("\(stage.transport?.stageName ?? "delivery stage") connected: max-jobs=\(stage.maxJobs)")
        dispatch()
    }

    func stageDisconnected(_ stage: DeliverHandler, lost jobs: [OutstandingJob]) {
        loop.preconditionInEventLoop()
        stages.removeAll { $0 === stage }
        if let transport = stage.transport, !stages.contains(where: { $0.transport == transport }) {
            stagelessSince[transport] = now
        }
        if !jobs.isEmpty {
            logger.warning("\(stage.transport?.stageName ?? "delivery stage") disconnected with \(jobs.count) jobs outstanding; their recipients without a result are retried")
        }
        for job in jobs { jobDone(job) }
        dispatch()
    }

    /// Hands due jobs to delivery stages with free capacity, one job per
    /// stage per round so that the load spreads over all connected stages.
    func dispatch() {
        loop.preconditionInEventLoop()
        guard !stopping else { return }
        let t = now
        scheduler.advance(now: t)
        var progress = true
        while progress {
            progress = false
            for stage in stages where stage.freeCapacity > 0 {
                guard let transport = stage.transport, let plan = scheduler.nextJob(for: transport, now: t) else { continue }
                startJob(plan, on: stage)
                progress = true
            }
        }
        noteSuspended(now: t)
    }

    /// Messages due for a transport no stage serves: log once per message
    /// and show the recipients as deferred. Not a failed attempt: they are
    /// dispatched as soon as such a stage connects. Only once the transport
    /// has been without a stage for `suspensionGrace` seconds: until then
    /// the messages stay among the newly ready (a tick looks again), and a
    /// stage that connects meanwhile simply takes them.
    private func noteSuspended(now t: UInt64) {
        for transport in Transport.allCases {
            if let since = stagelessSince[transport], t < since &+ options.suspensionGrace { continue }
            let waiting = scheduler.takeNewlyReady(transport)
            guard !waiting.isEmpty, !stages.contains(where: { $0.transport == transport }) else { continue }
            let reason = "delivery temporarily suspended: no \(transport.stageName) stage connected"
            for id in waiting where !suspendedLogged.contains(Suspension(id: id, transport: transport)) {
                let inFlight = scheduler.inFlight(id)
                // The recipients deferred now, for the log lines: one pass,
                // no copy of the envelope.
                let deferred = scheduler.modify(id) { env -> (addresses: [String], delay: UInt64) in
                    var addresses: [String] = []
                    for i in env.recipients.indices
                    where !env.recipients[i].state.isFinal && !inFlight.contains(i)
                        && router.destination(of: env.recipients[i].address).transport == transport {
                        env.recipients[i].state = .deferred
                        if env.recipients[i].lastError == nil { env.recipients[i].lastError = reason }
                        addresses.append(env.recipients[i].address)
                    }
                    return (addresses, delay(env, t))
                }
                guard let deferred, !deferred.addresses.isEmpty else { continue }
                suspendedLogged.insert(Suspension(id: id, transport: transport))
                for address in deferred.addresses {
                    logger.info("\(id): to=<\(address)>, relay=none, delay=\(deferred.delay), dsn=4.3.2, status=deferred (\(reason))")
                }
            }
        }
    }

    private func delay(_ env: EnvelopeRecord, _ t: UInt64) -> UInt64 { t >= env.arrival ? t - env.arrival : 0 }

    private func forgetSuspensions(_ id: QueueID) {
        for transport in Transport.allCases { suspendedLogged.remove(Suspension(id: id, transport: transport)) }
    }

    /// Reads the body and sends the job. A body that cannot be read (a
    /// damaged spool) is a failed attempt: the recipients are deferred.
    private func startJob(_ plan: JobPlan, on stage: DeliverHandler) {
        guard let env = scheduler.envelope(plan.queueID) else { return }
        var chunks: [[UInt8]] = []
        do {
            try spool.readBody(plan.queueID) { chunk in
                var offset = 0
                while offset < chunk.count {
                    let end = min(offset + WireLimits.maxBytes, chunk.count)
                    chunks.append(Array(chunk[offset..<end]))
                    offset = end
                }
            }
        } catch {
            logger.warning("\(plan.queueID): cannot read the message body: \(error)")
            var job = OutstandingJob(number: 0, plan: plan, resultsFromQueue: true)
            for i in plan.recipients {
                job.results[i] = DeliveryResult(status: .deferred, dsn: "4.3.0",
                                                text: "cannot read the queued message: \(error)", relay: "none")
            }
            jobDone(job)
            return
        }
        stage.send(plan: plan, envelope: env, body: chunks)
    }

    /// Applies the results of a finished (or lost) job: recipients with a
    /// RESULT get it; the others were lost with the job and come back.
    func jobDone(_ job: OutstandingJob) {
        loop.preconditionInEventLoop()
        let id = job.plan.queueID
        guard scheduler.envelope(id) != nil else {
            // Deleted meanwhile; while that deletion is being committed
            // the job is kept, in case the commit fails (see delete).
            endedWhileDeleting[id]?.append(job)
            return
        }
        let t = now
        var losses: [Int: Int] = [:]
        for i in job.plan.recipients {
            if job.results[i] == nil { losses[i] = scheduler.recordLoss(id, index: i) } else { scheduler.clearLosses(id, index: i) }
        }
        var lines: [String] = []
        let limit = options.lostJobLimit
        let policy = self.policy
        let random = options.random
        scheduler.modify(id) { env in
            for i in job.plan.recipients where i < env.recipients.count && !env.recipients[i].state.isFinal {
                let outcome: RecipientOutcome
                let result = job.results[i]
                if let result {
                    outcome = RecipientUpdate.apply(result, to: &env.recipients[i], arrival: env.arrival, kind: env.kind,
                                                    now: t, policy: policy, random: random())
                } else {
                    outcome = RecipientUpdate.lost(&env.recipients[i], losses: losses[i] ?? 1, lostJobLimit: limit,
                                                   arrival: env.arrival, kind: env.kind, now: t, policy: policy,
                                                   random: random())
                }
                switch outcome {
                case .sent: sentCount += 1
                case .bounced, .expired: bouncedCount += 1
                case .deferred: deferredCount += 1
                }
                guard !Self.stageLogged(result, outcome, resultsFromQueue: job.resultsFromQueue) else { continue }
                let r = env.recipients[i]
                let relay = result?.relay ?? "none"
                let head = "\(env.queueID): to=<\(r.address)>, relay=\(relay), delay=\(t >= env.arrival ? t - env.arrival : 0), dsn=\(r.dsnStatus ?? "4.3.0")"
                let (status, otherwise) = switch outcome {
                case .sent: ("sent", "delivered")
                case .bounced: ("bounced", "undeliverable")
                case .expired: ("expired, returned to sender", "message expired")
                case .deferred: ("deferred", "temporary failure")
                }
                lines.append("\(head), status=\(status) (\(r.lastError ?? otherwise))")
            }
        }
        for line in lines { logger.info("\(line)") }
        scheduler.finish(job.plan, now: t)
        if scheduler.isComplete(id) {
            finalize(id)
        } else if let env = scheduler.envelope(id) {
            persist(env)
        }
    }

    /// Whether the delivery stage's own log line (PROTOCOL.md 4.3: a stage
    /// logs each RESULT it sends, as Postfix's delivery agents do) already
    /// says what became of the recipient. The queue then adds none: a second
    /// "status=sent" line would count every delivery twice for whoever
    /// greps the log or feeds it to pflogsumm. It logs what only it knows:
    /// a job lost without a RESULT, a deferral that expired the message,
    /// and results it made itself (a body it could not read: no stage saw
    /// the job).
    static func stageLogged(_ result: DeliveryResult?, _ outcome: RecipientOutcome, resultsFromQueue: Bool = false) -> Bool {
        if resultsFromQueue { return false }
        return switch (result?.status, outcome) {
        case (.sent?, .sent), (.bounced?, .bounced), (.deferred?, .deferred): true
        default: false
        }
    }

    /// Writes the current state of a message; a failure is logged and the
    /// state is written again with the message's next change (memory stays
    /// right; after a crash the recipients are simply tried again).
    func persist(_ env: EnvelopeRecord, then: (@Sendable (Result<Void, SpoolError>) -> Void)? = nil) {
        let logger = self.logger
        let id = env.queueID
        spool.submit([.update(env)]) { result in
            if case .failure(let error) = result {
                logger.warning("\(id): cannot update the queue file: \(error)")
            }
            then?(result)
        }
    }

    // MARK: Completion and notices

    /// A message whose recipients are all final leaves the queue; the notice
    /// it calls for (if any) enters it in the same spool transaction.
    func finalize(_ id: QueueID, reason: String? = nil,
                  completion: ((Result<Void, SpoolError>) -> Void)? = nil) {
        loop.preconditionInEventLoop()
        guard let env = scheduler.remove(id) else { completion?(.failure(.noSuchMessage)); return }
        let completion = completion.map { NIOLoopBound($0, eventLoop: loop) }
        forgetSuspensions(id)
        var operations: [SpoolOperation] = []
        var built: (EnvelopeRecord, MessageKind)?
        if let plan = NoticePlanner.completionNotice(for: env, router: router, postmaster: config.postmaster,
                                                     doubleBounceSender: config.doubleBounceSender) {
            do {
                let (n, body) = try buildNotice(plan, original: env, now: now)
                operations.append(.insert(n, body))
                built = (n, plan.kind)
            } catch {
                logger.warning("\(id): cannot create the delivery status notification: \(error); will try again")
                scheduler.insert(env, now: now)
                completion?.value(.failure(.io("cannot create the delivery status notification: \(error)")))
                return
            }
        } else if NoticePlanner.isDiscardedNotice(env, doubleBounceSender: config.doubleBounceSender) {
            logger.warning("\(id): undeliverable postmaster notification discarded")
        }
        operations.append(.delete(id))
        let noticeBuilt = built
        // A plain removal need not start a commit of its own: it rides on
        // the next one (an acceptance's, under load), synced like every
        // commit, at most the spool's deferral later. What a crash in that
        // window costs is a second delivery of this message, the same as a
        // crash between the delivery and the removal always costs; nothing
        // accepted can be lost by it. A removal that brings a notice into
        // the queue is committed at once.
        spool.submit(operations, urgency: noticeBuilt == nil ? .deferred : .now) { [self] result in
            loop.execute { [self] in
                switch result {
                case .success:
                    if let (notice, noticeKind) = noticeBuilt {
                        let what = noticeKind == .doubleBounce ? "postmaster non-delivery notification"
                            : "sender delivery status notification"
                        logger.info("\(id): \(what): \(notice.queueID)")
                        scheduler.insert(notice, now: now)
                        logQueued(notice)
                    }
                    logger.info("\(id): removed\(reason.map { " (\($0))" } ?? "")")
                    dispatch()
                case .failure(let error):
                    logger.warning("\(id): cannot remove the message from the queue: \(error); will try again")
                    scheduler.insert(env, now: now)
                }
                completion?.value(result)
            }
        }
    }

    /// Builds the RFC 3464 notice of `plan` about `original` as a new
    /// message from `<>` (a double bounce: from the double-bounce sender),
    /// sealed for the spool.
    func buildNotice(_ plan: NoticePlan, original: EnvelopeRecord, now t: UInt64) throws -> (EnvelopeRecord, SealedBody) {
        var body: [UInt8] = []
        do {
            try spool.readBody(original.queueID) { body.append(contentsOf: $0) }
        } catch {
            // The report matters more than the copy: send it without one.
            logger.warning("\(original.queueID): cannot read the message body for the notification: \(error)")
            body = []
        }
        let actions = Set(plan.entries.map(\.action))
        let kind: DeliveryStatusNotification.Kind = actions.contains(.failed) ? .failure
            : (actions.contains(.delayed) ? .delay : .success)
        let recipients = plan.entries.map { entry -> DeliveryStatusNotification.Recipient in
            let r = original.recipients[entry.index]
            let action: DeliveryStatusNotification.Action
            let fallback: String
            switch entry.action {
            case .failed: action = .failed; fallback = "5.0.0"
            case .delayed: action = .delayed; fallback = "4.0.0"
            case .delivered: action = .delivered; fallback = "2.0.0"
            }
            return DeliveryStatusNotification.Recipient(
                address: r.address, orcpt: r.orcpt, action: action, status: r.dsnStatus ?? fallback,
                diagnostic: r.diagnostic ?? r.lastError, remoteMTA: r.remoteMTA,
                lastAttempt: nil,
                willRetryUntil: entry.action == .delayed ? Int(original.arrival + policy.lifetime(of: original.kind)) : nil)
        }
        let ret: String? = plan.kind == .doubleBounce ? "FULL" : (plan.returnFullMessage ? original.ret : "HDRS")
        let dsn = DeliveryStatusNotification(kind: kind, reportingMTA: config.hostname, sender: plan.recipient,
                                             envid: original.envid, ret: ret, arrival: Int(original.arrival),
                                             recipients: recipients, originalMessage: body)
        let message = dsn.build(unixTime: Int(t), messageID: MessageID.generate(hostname: config.hostname))
        let writer = try spool.makeBodyWriter()
        try writer.append(message)
        let sealed = try writer.finish()
        let sender = plan.kind == .doubleBounce ? config.doubleBounceSender : ""
        let env = EnvelopeRecord(queueID: spool.newQueueID(), sender: sender, arrival: t, size: UInt64(message.count),
                                 ret: nil, envid: nil, requireTLS: false,
                                 // Only a notice to an address that is not
                                 // ASCII needs SMTPUTF8: the rest of an
                                 // international original goes in the
                                 // global form's parts, which 8BITMIME (or
                                 // the 7-bit downgrade) carries, so that a
                                 // host without SMTPUTF8 still gets it.
                                 smtputf8: plan.recipient.utf8.contains { $0 >= 0x80 },
                                 bodyType: dsn.bodyType, clientAddress: nil, clientName: nil, helo: nil,
                                 protocolName: "local", authUser: nil, peerUID: nil, held: false,
                                 kind: plan.kind,
                                 recipients: [RecipientRecord(address: plan.recipient, notify: nil, orcpt: nil,
                                                              state: .pending, attempts: 0, nextAttempt: t,
                                                              lastError: nil, dsnStatus: nil, remoteMTA: nil,
                                                              diagnostic: nil, delayNotified: false)])
        return (env, sealed)
    }

    // MARK: Periodic work

    /// Called every tick: due jobs out; every maintenance interval the whole
    /// queue is checked for expiry, delay notices and unfinished completions.
    func tick() {
        loop.preconditionInEventLoop()
        guard !stopping else { return }
        dispatch()
        if now >= nextMaintenance { maintenance() }
    }

    /// Expires what outlived its lifetime (recipients not in flight and due:
    /// with no stage to try them, they would wait forever), sends delay
    /// notices, and finalizes messages left complete (e.g. by a crash between
    /// the last update and the delete).
    func maintenance() {
        loop.preconditionInEventLoop()
        let t = now
        let interval = options.maintenanceInterval(config.queue)
        nextMaintenance = t + interval
        let unserved = Set(stagelessSince.compactMap { transport, since in t >= since + interval ? transport : nil })
        // By queue ID (the order of arrival, nearly): sorting the IDs is
        // cheap, where `scheduler.envelopes` copied every envelope into an
        // array and sorted the copies, half of this walk's time, which
        // holds the event loop (0.3 s every minute with 100,000 messages
        // waiting).
        for id in scheduler.queueIDs {
            guard let env = scheduler.envelope(id), !env.held else { continue }
            let inFlight = scheduler.inFlight(id)
            var changed = false
            if policy.isExpired(arrival: env.arrival, kind: env.kind, now: t) {
                var lines: [String] = []
                scheduler.modify(id) { env in
                    for i in env.recipients.indices where !env.recipients[i].state.isFinal
                        && !inFlight.contains(i) && env.recipients[i].nextAttempt <= t
                        && unserved.contains(router.destination(of: env.recipients[i].address).transport) {
                        RecipientUpdate.expire(&env.recipients[i])
                        bouncedCount += 1
                        changed = true
                        let r = env.recipients[i]
                        lines.append("\(id): to=<\(r.address)>, relay=none, delay=\(t >= env.arrival ? t - env.arrival : 0), dsn=4.4.7, status=expired, returned to sender (\(r.lastError ?? "message expired"))")
                    }
                }
                for line in lines { logger.info("\(line)") }
            }
            if scheduler.isComplete(id) {
                finalize(id)
                continue
            }
            if let current = scheduler.envelope(id),
               let plan = NoticePlanner.delayNotice(for: current, now: t, policy: policy,
                                                       doubleBounceSender: config.doubleBounceSender, inFlight: inFlight) {
                sendDelayNotice(plan, for: id)
                continue
            }
            if changed, let current = scheduler.envelope(id) { persist(current) }
        }
        dispatch()
    }

    private func sendDelayNotice(_ plan: NoticePlan, for id: QueueID) {
        guard let original = scheduler.envelope(id) else { return }
        let notice: EnvelopeRecord, body: SealedBody
        do {
            (notice, body) = try buildNotice(plan, original: original, now: now)
        } catch {
            logger.warning("\(id): cannot create the delay notification: \(error)")
            return
        }
        let indexes = plan.entries.map(\.index)
        scheduler.modify(id) { env in for i in indexes { env.recipients[i].delayNotified = true } }
        guard let updated = scheduler.envelope(id) else { return }
        spool.submit([.update(updated), .insert(notice, body)]) { [self] result in
            loop.execute { [self] in
                switch result {
                case .success:
                    logger.info("\(id): sender delay notification: \(notice.queueID)")
                    scheduler.insert(notice, now: now)
                    logQueued(notice)
                    dispatch()
                case .failure(let error):
                    logger.warning("\(id): cannot queue the delay notification: \(error); will try again")
                    scheduler.modify(id) { env in for i in indexes where i < env.recipients.count { env.recipients[i].delayNotified = false } }
                    // Another write of the message meanwhile (a job's
                    // results) may have carried the flag to the spool: write
                    // it back, or after a restart no notice would come.
                    if let current = scheduler.envelope(id) { persist(current) }
                }
            }
        }
    }

    // MARK: Administration (control socket)

    func flush(_ id: QueueID?) -> Int {
        let n = scheduler.flush(id, now: now)
        dispatch()
        return n
    }

    /// Hold or release; the flag is written to the spool before `done`.
    /// Memory changes first (a later write of the message carries the
    /// flag); if the write fails, memory goes back to what the spool and
    /// the administrator's answer say.
    func setHeld(_ id: QueueID, _ held: Bool, done: @escaping (Result<Void, SpoolError>) -> Void) {
        guard let before = scheduler.envelope(id)?.held else { return done(.failure(.noSuchMessage)) }
        scheduler.setHeld(id, held, now: now)
        guard let env = scheduler.envelope(id) else { return done(.failure(.noSuchMessage)) }
        let loop = self.loop
        let done = NIOLoopBound(done, eventLoop: loop)
        persist(env) { [self] result in
            loop.execute { [self] in
                switch result {
                case .success:
                    logger.info("\(id): \(held ? "hold: by administrator" : "released from hold")")
                    if !held { dispatch() }
                case .failure:
                    if scheduler.envelope(id)?.held == held {
                        scheduler.setHeld(id, before, now: now)
                        // As for a delay notice's flag: another write may
                        // have carried this one to the spool meanwhile.
                        if let current = scheduler.envelope(id) { persist(current) }
                    }
                }
                done.value(result)
            }
        }
    }

    /// Why `delete` with bounce must wait, if it must: a recipient in a job
    /// may be delivered yet, and a notice saying it failed would be false.
    func bounceBlocked(_ id: QueueID) -> String? {
        let inFlight = scheduler.inFlight(id).count
        guard inFlight > 0 else { return nil }
        return "\(id): a delivery attempt is in progress for \(inFlight) recipient\(inFlight == 1 ? "" : "s"); "
            + "delete with bounce once it ended (or delete without bounce)"
    }

    /// Deletes a message. `bounce`: its unfinished recipients fail with
    /// 5.0.0 and the sender gets the usual notice; otherwise it vanishes.
    func delete(_ id: QueueID, bounce: Bool, done: @escaping (Result<Void, SpoolError>) -> Void) {
        let loop = self.loop
        let done = NIOLoopBound(done, eventLoop: loop)
        if bounce {
            let original = scheduler.envelope(id)
            scheduler.modify(id) { env in
                for i in env.recipients.indices where !env.recipients[i].state.isFinal {
                    env.recipients[i].state = .bounced
                    env.recipients[i].dsnStatus = "5.0.0"
                    env.recipients[i].lastError = "deleted by the administrator"
                    env.recipients[i].diagnostic = nil
                    env.recipients[i].remoteMTA = nil
                    env.recipients[i].nextAttempt = 0
                }
            }
            if let env = scheduler.envelope(id) {
                for r in env.recipients where r.lastError == "deleted by the administrator" {
                    logger.info("\(id): to=<\(r.address)>, relay=none, delay=\(delay(env, now)), dsn=5.0.0, status=bounced (deleted by the administrator)")
                }
            }
            finalize(id, reason: "deleted by administrator") { [self] result in
                // Not committed: the message stays as it was (and as the
                // spool has it), not bounced by the next maintenance pass.
                if case .failure = result, let original, scheduler.envelope(id) != nil {
                    logger.warning("\(id): not deleted; its recipients are as they were")
                    scheduler.insert(original, now: now)
                }
                done.value(result)
            }
            return
        }
        guard let entry = scheduler.takeEntry(id) else { return done.value(.failure(.noSuchMessage)) }
        forgetSuspensions(id)
        endedWhileDeleting[id] = []
        spool.submit([.delete(id)]) { [self] result in
            loop.execute { [self] in
                let ended = endedWhileDeleting.removeValue(forKey: id) ?? []
                switch result {
                case .success:
                    logger.info("\(id): removed (deleted by administrator)")
                case .failure(let error):
                    // Still in the spool: it stays in the queue, as a failed
                    // removal after delivery does (finalize), with its jobs
                    // still in flight; those that ended meanwhile are
                    // applied now (their recipients would otherwise stay
                    // "in flight" for good, and a delivery be forgotten).
                    logger.warning("\(id): cannot delete the message: \(error); it stays in the queue")
                    scheduler.restore(entry, now: now)
                    for job in ended { jobDone(job) }
                }
                done.value(result)
            }
        }
    }
}
