import Foundation
import Testing
@testable import Spool

/// Group commit under load (Committer.gatherSiblings): a batch waits for
/// the other submitters active lately, never for a lone one. The window
/// that makes a submitter active is long here (a minute) and the delays
/// too, so that what waits depends on the order of the submissions, never
/// on the machine's speed.
@Suite struct CommitDelayTests {
    static func options(commitDelay: Double) -> SpoolOptions {
        var options = smallOptions
        options.commitDelay = commitDelay
        options.siblingWindow = 60
        return options
    }

    /// Submits one message from `submitter`; `done` gets its result.
    static func submit(_ spool: Spool, submitter: Int, done: @escaping @Sendable (Result<Void, SpoolError>) -> Void) throws {
        spool.submit([.insert(sampleEnvelope(spool.newQueueID(), recipients: 1), try seal(spool, [1, 2, 3]))],
                     submitter: submitter, completion: done)
    }

    /// One message from `submitter`, waiting for its commit as an inject
    /// connection waits for ACCEPTED before its next message.
    static func inject(_ spool: Spool, submitter: Int) throws -> SpoolError? {
        let done = DispatchSemaphore(value: 0)
        let outcome = ResultCollector()
        try submit(spool, submitter: submitter) { result in
            outcome.set(0, result)
            done.signal()
        }
        done.wait()
        return failure(outcome.get(0))
    }

    /// Waits (up to 20 s) until `condition` holds.
    static func eventually(_ condition: () -> Bool) -> Bool {
        for _ in 0..<2000 {
            if condition() { return true }
            usleep(10_000)
        }
        return condition()
    }

    @Test func aBatchWaitsForItsSiblingsAndTheyShareOneCommit() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: Self.options(commitDelay: 60))
        defer { spool.close() }
        // Two connections, one message each: two submitters never wait.
        #expect(try Self.inject(spool, submitter: 1) == nil)
        #expect(try Self.inject(spool, submitter: 2) == nil)
        #expect(spool.statistics.delayedCommits == 0)
        let commits = spool.statistics.commits
        // A third: with three active, its batch waits for a second message.
        let results = ResultCollector()
        let both = DispatchGroup()
        both.enter()
        try Self.submit(spool, submitter: 3) { results.set(3, $0); both.leave() }
        #expect(Self.eventually { spool.statistics.delayedCommits == 1 })
        #expect(results.count == 0, "committed without waiting for a sibling")
        both.enter()
        try Self.submit(spool, submitter: 1) { results.set(1, $0); both.leave() }
        both.wait()
        #expect(results.all.allSatisfy { failure($0) == nil })
        #expect(spool.statistics.commits == commits + 1, "the two messages in one commit")
    }

    /// What a delayed batch waits for: 60% of the submitters active lately,
    /// rounded up, so three active wait for a second message.
    @Test func theTargetIsSixtyPercentOfTheActiveSubmitters() {
        #expect([3, 4, 5, 10, 20, 50].map { Committer.gatherTarget(active: $0) } == [2, 3, 3, 6, 12, 30])
    }

    @Test func aLoneSubmitterNeverWaits() throws {
        let dir = TemporaryDirectory()
        // A delay that a wait would make the test run into (and fail).
        let spool = try Spool(directory: dir.spool, options: Self.options(commitDelay: 5))
        defer { spool.close() }
        for _ in 0..<5 { #expect(try Self.inject(spool, submitter: 1) == nil) }
        // Two taking turns: each one's next message waits for this answer.
        for _ in 0..<3 {
            #expect(try Self.inject(spool, submitter: 1) == nil)
            #expect(try Self.inject(spool, submitter: 2) == nil)
        }
        #expect(spool.statistics.delayedCommits == 0)
        #expect(spool.statistics.commits == 11)
    }

    @Test func aSubmitterThatLeftIsNotWaitedFor() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: Self.options(commitDelay: 5))
        defer { spool.close() }
        // Two connections, one message each, then they close.
        for s in 10..<12 { #expect(try Self.inject(spool, submitter: s) == nil) }
        for s in 10..<12 { spool.submitterLeft(s) }
        // A third, alone now: as if the two had never been (with them it
        // would be one of three active, and its batch would wait).
        for _ in 0..<3 { #expect(try Self.inject(spool, submitter: 20) == nil) }
        #expect(spool.statistics.delayedCommits == 0)
    }

    @Test func manySubmittersComingAndGoing() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: Self.options(commitDelay: 0.2))
        defer { spool.close() }
        let sessions = 16, rounds = 10
        let failures = ResultCollector()
        let group = DispatchGroup()
        for s in 0..<sessions {
            group.enter()
            Thread {
                for r in 0..<rounds {
                    do {
                        if let error = try Self.inject(spool, submitter: s) { failures.set(s * rounds + r, .failure(error)) }
                    } catch {
                        failures.set(s * rounds + r, .failure(.io("\(error)")))
                    }
                }
                spool.submitterLeft(s)   // the connection closes
                group.leave()
            }.start()
        }
        group.wait()
        #expect(failures.count == 0)
        #expect(spool.statistics.messagesInserted == UInt64(sessions * rounds))
        #expect(try spool.allEnvelopes().count == sessions * rounds)
    }
}
