// Pure tests of the queue's decisions: backoff, expiry, NOTIFY, routing,
// job grouping, scheduling, lost jobs and the notices a message calls for.

import Testing
@testable import QueueService
import Spool

func qid(_ n: Int) -> QueueID {
    let hex = String(n, radix: 16, uppercase: true)
    return QueueID(rawValue: String(repeating: "0", count: 12 - hex.count) + hex)!
}

private func envelope(_ n: Int, sender: String = "a@example.org", arrival: UInt64 = 1000,
                      kind: MessageKind = .normal, _ rcpts: [String], notify: String? = nil) -> EnvelopeRecord {
    EnvelopeRecord(queueID: qid(n), sender: sender, arrival: arrival, size: 100, kind: kind,
                   recipients: rcpts.map { RecipientRecord(address: $0, notify: notify, nextAttempt: arrival) })
}

private func take(_ s: inout Scheduler, _ t: Transport, _ now: UInt64) throws -> JobPlan {
    let job = s.nextJob(for: t, now: now)
    return try #require(job)
}

private let doubleBounceSender = "double-bounce@mx.example.test"
private let router = Router(isLocal: { $0 == "localhost" || $0 == "example.test" })

@Suite struct RetryPolicyTests {
    let policy = RetryPolicy(minimalBackoff: 300, maximalBackoff: 4000, maximalLifetime: 86400,
                             bounceLifetime: 3600, delayWarning: 14400, jitter: 0.1)

    @Test func backoffDoublesUpToTheCeiling() {
        #expect(policy.backoff(attempts: 1, random: 0.5) == 300)
        #expect(policy.backoff(attempts: 2, random: 0.5) == 600)
        #expect(policy.backoff(attempts: 3, random: 0.5) == 1200)
        #expect(policy.backoff(attempts: 4, random: 0.5) == 2400)
        #expect(policy.backoff(attempts: 5, random: 0.5) == 4000)
        #expect(policy.backoff(attempts: 60, random: 0.5) == 4000)
        #expect(policy.backoff(attempts: .max, random: 0.5) == 4000)
    }

    @Test func jitterSpreadsButStaysInBounds() {
        #expect(policy.backoff(attempts: 2, random: 0) == 540)
        #expect(policy.backoff(attempts: 2, random: 1) == 660)
        // Never below the minimum nor above the maximum, whatever the draw.
        #expect(policy.backoff(attempts: 1, random: 0) == 300)
        #expect(policy.backoff(attempts: 9, random: 1) == 4000)
        for r in stride(from: 0.0, to: 1.0, by: 0.05) {
            let d = policy.backoff(attempts: 3, random: r)
            #expect(d >= 1080 && d <= 1320)
        }
    }

    @Test func lifetimesDependOnTheKind() {
        #expect(!policy.isExpired(arrival: 1000, kind: .normal, now: 1000 + 86399))
        #expect(policy.isExpired(arrival: 1000, kind: .normal, now: 1000 + 86400))
        #expect(policy.isExpired(arrival: 1000, kind: .bounce, now: 1000 + 3600))
        #expect(policy.isExpired(arrival: 1000, kind: .doubleBounce, now: 1000 + 3600))
        #expect(!policy.isExpired(arrival: .max - 10, kind: .normal, now: .max))
        #expect(!policy.delayWarningDue(arrival: 0, now: 14399))
        #expect(policy.delayWarningDue(arrival: 0, now: 14400))
        var off = policy; off.delayWarning = 0
        #expect(!off.delayWarningDue(arrival: 0, now: 1 << 40))
    }
}

@Suite struct NotifyAndRoutingTests {
    @Test func notifyParsing() {
        #expect(NotifyConditions(parameter: nil) == [.failure, .delay])
        #expect(NotifyConditions(parameter: "NEVER") == [])
        #expect(NotifyConditions(parameter: "SUCCESS") == [.success])
        #expect(NotifyConditions(parameter: "success,FAILURE") == [.success, .failure])
        #expect(NotifyConditions(parameter: "DELAY,FAILURE,SUCCESS") == [.success, .failure, .delay])
    }

    @Test func routing() {
        #expect(router.destination(of: "u@localhost") == Destination(transport: .local, nexthop: nil))
        #expect(router.destination(of: "u@LocalHost") == Destination(transport: .local, nexthop: nil))
        #expect(router.destination(of: "postmaster") == Destination(transport: .local, nexthop: nil))
        #expect(router.destination(of: "\"a@b\"@Example.NET") == Destination(transport: .remote, nexthop: "example.net"))
        #expect(Router.domain(of: "x@") == nil)
    }
}

@Suite struct RecipientUpdateTests {
    let policy = RetryPolicy(minimalBackoff: 300, maximalBackoff: 4000, maximalLifetime: 86400,
                             bounceLifetime: 3600, delayWarning: 14400, jitter: 0)

    @Test func sentBouncedDeferred() {
        var r = RecipientRecord(address: "u@localhost")
        #expect(RecipientUpdate.apply(DeliveryResult(status: .sent, dsn: "2.0.0", text: "delivered to maildir"),
                                      to: &r, arrival: 0, kind: .normal, now: 10, policy: policy, random: 0.5) == .sent)
        #expect(r.state == .sent && r.attempts == 0 && r.dsnStatus == "2.0.0")

        var b = RecipientRecord(address: "x@localhost")
        let result = DeliveryResult(status: .bounced, dsn: "5.1.1", text: "unknown user", relay: nil,
                                    remoteMTA: "mx.example.net", diagnostic: "550 5.1.1 no such user")
        #expect(RecipientUpdate.apply(result, to: &b, arrival: 0, kind: .normal, now: 10, policy: policy, random: 0.5) == .bounced)
        #expect(b.state == .bounced && b.dsnStatus == "5.1.1" && b.remoteMTA == "mx.example.net"
                && b.diagnostic == "550 5.1.1 no such user" && b.lastError == "unknown user")
        // A later attempt that reached no server (no MX, say) leaves no
        // earlier server's name or words behind.
        var later = b
        later.state = .deferred
        #expect(RecipientUpdate.apply(DeliveryResult(status: .bounced, dsn: "5.1.2", text: "domain not found"),
                                      to: &later, arrival: 0, kind: .normal, now: 20, policy: policy, random: 0.5) == .bounced)
        #expect(later.dsnStatus == "5.1.2" && later.remoteMTA == nil && later.diagnostic == nil)

        var d = RecipientRecord(address: "y@example.net")
        let defer1 = DeliveryResult(status: .deferred, dsn: "4.4.1", text: "connection refused")
        #expect(RecipientUpdate.apply(defer1, to: &d, arrival: 0, kind: .normal, now: 100, policy: policy, random: 0.5)
                == .deferred(nextAttempt: 400))
        #expect(RecipientUpdate.apply(defer1, to: &d, arrival: 0, kind: .normal, now: 400, policy: policy, random: 0.5)
                == .deferred(nextAttempt: 1000))
        #expect(d.state == .deferred && d.attempts == 2 && d.lastError == "connection refused")
    }

    @Test func deferralPastTheLifetimeExpires() {
        var d = RecipientRecord(address: "y@example.net")
        let result = DeliveryResult(status: .deferred, dsn: "4.4.1", text: "connection refused")
        #expect(RecipientUpdate.apply(result, to: &d, arrival: 0, kind: .normal, now: 86400,
                                      policy: policy, random: 0.5) == .expired)
        #expect(d.state == .bounced && d.dsnStatus == "4.4.7" && d.lastError == "message expired: connection refused")
        // A bounce has the shorter lifetime.
        var b = RecipientRecord(address: "y@example.net")
        #expect(RecipientUpdate.apply(result, to: &b, arrival: 0, kind: .bounce, now: 3600,
                                      policy: policy, random: 0.5) == .expired)
    }

    @Test func lostJobsRetryAtOnceThenBackOff() {
        var r = RecipientRecord(address: "u@localhost")
        #expect(RecipientUpdate.lost(&r, losses: 1, lostJobLimit: 3, arrival: 0, kind: .normal, now: 50,
                                     policy: policy, random: 0.5) == .deferred(nextAttempt: 50))
        #expect(r.attempts == 0 && r.state == .deferred)
        #expect(RecipientUpdate.lost(&r, losses: 3, lostJobLimit: 3, arrival: 0, kind: .normal, now: 50,
                                     policy: policy, random: 0.5) == .deferred(nextAttempt: 350))
        #expect(r.attempts == 1)
    }

    /// The delivery stage logs each RESULT; the queue logs only what the
    /// stage could not know, so that every delivery has one log line.
    @Test func theQueueLogsOnlyWhatTheStageCouldNotKnow() {
        func result(_ status: DeliveryStatus) -> DeliveryResult { DeliveryResult(status: status, dsn: "2.0.0", text: "x") }
        #expect(QueueEngine.stageLogged(result(.sent), .sent))
        #expect(QueueEngine.stageLogged(result(.bounced), .bounced))
        #expect(QueueEngine.stageLogged(result(.deferred), .deferred(nextAttempt: 60)))
        // A deferral past the lifetime: the stage said deferred, the queue returns it.
        #expect(!QueueEngine.stageLogged(result(.deferred), .expired))
        // A job lost without a RESULT: no stage logged anything.
        #expect(!QueueEngine.stageLogged(nil, .deferred(nextAttempt: 60)))
        #expect(!QueueEngine.stageLogged(nil, .expired))
        // A deferral the queue made itself (it could not read the body).
        #expect(!QueueEngine.stageLogged(result(.deferred), .deferred(nextAttempt: 60), resultsFromQueue: true))
    }
}

@Suite struct SchedulerTests {
    @Test func groupsRecipientsPerTransportAndDomain() throws {
        var s = Scheduler(router: router)
        s.insert(envelope(1, ["a@localhost", "b@example.net", "c@example.com", "d@EXAMPLE.net", "e@example.test"]), now: 1000)
        #expect(s.readyCount(.local) == 1 && s.readyCount(.remote) == 1)

        let local = try take(&s, .local, 1000)
        #expect(local.destination == Destination(transport: .local, nexthop: nil))
        #expect(local.recipients == [0, 4] && local.attempt == 1)
        #expect(s.nextJob(for: .local, now: 1000) == nil)

        let r1 = try take(&s, .remote, 1000)
        #expect(r1.destination.nexthop == "example.net" && r1.recipients == [1, 3])
        let r2 = try take(&s, .remote, 1000)
        #expect(r2.destination.nexthop == "example.com" && r2.recipients == [2])
        #expect(s.nextJob(for: .remote, now: 1000) == nil)
        #expect(s.recipientsInFlight == 5)
    }

    @Test func capsRecipientsPerJob() {
        var s = Scheduler(router: router, maxRecipientsPerJob: 2)
        s.insert(envelope(1, ["a@localhost", "b@localhost", "c@localhost"]), now: 1000)
        #expect(s.nextJob(for: .local, now: 1000)?.recipients == [0, 1])
        #expect(s.nextJob(for: .local, now: 1000)?.recipients == [2])
        #expect(s.nextJob(for: .local, now: 1000) == nil)
    }

    @Test func oldestFirstAndNothingBeforeItsTime() {
        var s = Scheduler(router: router)
        s.insert(envelope(2, arrival: 1000, ["a@localhost"]), now: 1000)
        s.insert(envelope(1, arrival: 1000, ["b@localhost"]), now: 1000)
        var late = envelope(3, arrival: 1000, ["c@localhost"])
        late.recipients[0].nextAttempt = 2000
        s.insert(late, now: 1000)
        #expect(s.nextJob(for: .local, now: 1000)?.queueID == qid(2))
        #expect(s.nextJob(for: .local, now: 1000)?.queueID == qid(1))
        #expect(s.nextJob(for: .local, now: 1999) == nil)
        #expect(s.nextWakeup() == 2000)
        s.advance(now: 1999)
        #expect(s.nextJob(for: .local, now: 1999) == nil)
        s.advance(now: 2000)
        #expect(s.nextJob(for: .local, now: 2000)?.queueID == qid(3))
        #expect(s.nextWakeup() == nil)
    }

    @Test func deferredRecipientsComeBackAfterTheirBackoff() throws {
        var s = Scheduler(router: router)
        let policy = RetryPolicy(minimalBackoff: 300, maximalBackoff: 4000, jitter: 0)
        s.insert(envelope(1, ["a@localhost", "b@localhost"]), now: 1000)
        let job = try take(&s, .local, 1000)
        s.modify(job.queueID) { env in
            _ = RecipientUpdate.apply(DeliveryResult(status: .sent, dsn: "2.0.0", text: "ok"), to: &env.recipients[0],
                                      arrival: env.arrival, kind: env.kind, now: 1001, policy: policy, random: 0.5)
            _ = RecipientUpdate.apply(DeliveryResult(status: .deferred, dsn: "4.2.2", text: "mailbox full"),
                                      to: &env.recipients[1], arrival: env.arrival, kind: env.kind, now: 1001,
                                      policy: policy, random: 0.5)
        }
        s.finish(job, now: 1001)
        #expect(!s.isComplete(qid(1)))
        #expect(s.nextWakeup() == 1301)
        s.advance(now: 1301)
        let retry = try take(&s, .local, 1301)
        #expect(retry.recipients == [1] && retry.attempt == 2)
        s.modify(retry.queueID) { env in
            _ = RecipientUpdate.apply(DeliveryResult(status: .sent, dsn: "2.0.0", text: "ok"), to: &env.recipients[1],
                                      arrival: env.arrival, kind: env.kind, now: 1302, policy: policy, random: 0.5)
        }
        s.finish(retry, now: 1302)
        #expect(s.isComplete(qid(1)))
    }

    @Test func inFlightRecipientsAreNotSentTwice() throws {
        var s = Scheduler(router: router)
        s.insert(envelope(1, ["a@localhost"]), now: 1000)
        let job = try take(&s, .local, 1000)
        s.flush(nil, now: 1000)
        s.insert(s.envelope(qid(1))!, now: 1000)     // e.g. an update written back
        #expect(s.nextJob(for: .local, now: 1000) == nil)
        // The stage died: the job comes back at once.
        s.modify(job.queueID) { env in
            _ = RecipientUpdate.lost(&env.recipients[0], losses: 1, lostJobLimit: 3, arrival: env.arrival,
                                     kind: env.kind, now: 1005, policy: RetryPolicy(), random: 0.5)
        }
        s.finish(job, now: 1005)
        #expect(s.nextJob(for: .local, now: 1005)?.recipients == [0])
    }

    @Test func heldMessagesWaitForRelease() {
        var s = Scheduler(router: router)
        s.insert(envelope(1, ["a@localhost"]), now: 1000)
        s.setHeld(qid(1), true, now: 1000)
        #expect(s.nextJob(for: .local, now: 1000) == nil)
        s.flush(nil, now: 1001)
        #expect(s.nextJob(for: .local, now: 1001) == nil)
        s.setHeld(qid(1), false, now: 1002)
        #expect(s.nextJob(for: .local, now: 1002)?.queueID == qid(1))
    }

    @Test func flushMakesDeferredRecipientsDueNow() {
        var s = Scheduler(router: router)
        var e = envelope(1, ["a@example.net"])
        e.recipients[0].state = .deferred
        e.recipients[0].nextAttempt = 5000
        s.insert(e, now: 1000)
        #expect(s.nextJob(for: .remote, now: 1000) == nil)
        #expect(s.flush(qid(1), now: 1000) == 1)
        #expect(s.nextJob(for: .remote, now: 1000)?.destination.nexthop == "example.net")
    }

    @Test func newlyReadyIsReportedOncePerMessage() {
        var s = Scheduler(router: router)
        s.insert(envelope(1, ["a@example.net", "b@example.com"]), now: 1000)
        #expect(s.takeNewlyReady(.remote) == [qid(1)])
        #expect(s.takeNewlyReady(.remote) == [])
        s.advance(now: 2000)
        #expect(s.takeNewlyReady(.remote) == [])
        #expect(s.readyCount(.remote) == 1)
    }

    @Test func removedMessagesVanish() {
        var s = Scheduler(router: router)
        s.insert(envelope(1, ["a@localhost"]), now: 1000)
        #expect(s.remove(qid(1)) != nil)
        #expect(s.nextJob(for: .local, now: 1000) == nil)
        #expect(s.count == 0)
    }
}

@Suite struct NoticePlannerTests {
    let postmaster = "postmaster@localhost"

    private func final(_ e: EnvelopeRecord, _ states: [RecipientState]) -> EnvelopeRecord {
        var e = e
        for (i, st) in states.enumerated() { e.recipients[i].state = st }
        return e
    }

    @Test func failuresGoToTheSender() throws {
        let e = final(envelope(1, ["a@localhost", "b@example.net", "c@localhost"]), [.bounced, .sent, .bounced])
        let plan = try #require(NoticePlanner.completionNotice(for: e, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender))
        #expect(plan.kind == .bounce && plan.recipient == "a@example.org" && plan.returnFullMessage)
        #expect(plan.entries == [NoticeEntry(index: 0, action: .failed), NoticeEntry(index: 2, action: .failed)])
    }

    @Test func notifyNeverAndRetHdrs() throws {
        var e = final(envelope(1, ["a@localhost", "b@localhost"]), [.bounced, .bounced])
        e.recipients[0].notify = "NEVER"
        e.ret = "HDRS"
        let plan = try #require(NoticePlanner.completionNotice(for: e, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender))
        #expect(plan.entries == [NoticeEntry(index: 1, action: .failed)] && !plan.returnFullMessage)
        e.recipients[1].notify = "SUCCESS"
        #expect(NoticePlanner.completionNotice(for: e, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender) == nil)
    }

    @Test func successOnlyForLocalDeliveries() throws {
        let e = final(envelope(1, ["a@localhost", "b@example.net"], notify: "SUCCESS,FAILURE"), [.sent, .sent])
        let plan = try #require(NoticePlanner.completionNotice(for: e, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender))
        #expect(plan.entries == [NoticeEntry(index: 0, action: .delivered)])
        let quiet = final(envelope(1, ["a@localhost"]), [.sent])
        #expect(NoticePlanner.completionNotice(for: quiet, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender) == nil)
    }

    @Test func neverToTheNullSender() throws {
        let bounce = final(envelope(1, sender: "", kind: .bounce, ["a@example.org"]), [.bounced])
        let plan = try #require(NoticePlanner.completionNotice(for: bounce, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender))
        #expect(plan.kind == .doubleBounce && plan.recipient == postmaster)
        let nullSender = final(envelope(1, sender: "", ["a@localhost"]), [.bounced])
        #expect(NoticePlanner.completionNotice(for: nullSender, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender)?.kind == .doubleBounce)
        let double = final(envelope(1, sender: "", kind: .doubleBounce, [postmaster]), [.bounced])
        #expect(NoticePlanner.completionNotice(for: double, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender) == nil)
        // A double bounce that an alias forwarded comes back as a normal
        // message from the double-bounce sender: its failure is dropped too,
        // or a postmaster alias to a failing address would loop for ever.
        let forwarded = final(envelope(1, sender: "double-bounce@MX.Example.Test", ["admin@example.net"]), [.bounced])
        #expect(NoticePlanner.completionNotice(for: forwarded, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender) == nil)
        #expect(NoticePlanner.isDiscardedNotice(forwarded, doubleBounceSender: doubleBounceSender))
        #expect(NoticePlanner.isDiscardedNotice(double, doubleBounceSender: doubleBounceSender))
        let otherLocalPart = final(envelope(1, sender: "Double-Bounce@mx.example.test", ["admin@example.net"]), [.bounced])
        #expect(NoticePlanner.completionNotice(for: otherLocalPart, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender)?.recipient == "Double-Bounce@mx.example.test")
        let delivered = final(envelope(1, sender: "", kind: .bounce, ["a@example.org"]), [.sent])
        #expect(NoticePlanner.completionNotice(for: delivered, router: router, postmaster: postmaster, doubleBounceSender: doubleBounceSender) == nil)
    }

    @Test func delayNoticeOncePerRecipient() throws {
        let policy = RetryPolicy(delayWarning: 14400)
        var e = envelope(1, arrival: 0, ["a@example.net", "b@example.net", "c@example.net", "d@example.net"])
        e.recipients[0].state = .deferred
        e.recipients[1].state = .deferred; e.recipients[1].notify = "FAILURE"
        e.recipients[2].state = .sent
        e.recipients[3].state = .deferred; e.recipients[3].delayNotified = true
        #expect(NoticePlanner.delayNotice(for: e, now: 14399, policy: policy, doubleBounceSender: doubleBounceSender) == nil)
        let plan = try #require(NoticePlanner.delayNotice(for: e, now: 14400, policy: policy, doubleBounceSender: doubleBounceSender))
        #expect(plan.entries == [NoticeEntry(index: 0, action: .delayed)] && !plan.returnFullMessage)
        #expect(NoticePlanner.delayNotice(for: e, now: 14400, policy: policy, doubleBounceSender: doubleBounceSender, inFlight: [0]) == nil)
        e.sender = "double-bounce@mx.example.test"
        #expect(NoticePlanner.delayNotice(for: e, now: 14400, policy: policy, doubleBounceSender: doubleBounceSender) == nil)
        e.sender = ""
        #expect(NoticePlanner.delayNotice(for: e, now: 14400, policy: policy, doubleBounceSender: doubleBounceSender) == nil)
    }
}
