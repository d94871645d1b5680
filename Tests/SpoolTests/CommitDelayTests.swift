import Foundation
import Testing
@testable import Spool

/// Group commit under load (Committer.gatherSiblings): a batch waits for
/// the other submitters active lately, never for a lone one. The delays are
/// long here, so that what waited is told by the statistics, not the clock.
@Suite struct CommitDelayTests {
    /// One message from `submitter`, waiting for its commit as an inject
    /// connection waits for ACCEPTED before its next message.
    static func inject(_ spool: Spool, submitter: Int) throws -> SpoolError? {
        let done = DispatchSemaphore(value: 0)
        let outcome = ResultCollector()
        spool.submit([.insert(sampleEnvelope(spool.newQueueID(), recipients: 1), try seal(spool, [1, 2, 3]))],
                     submitter: submitter) { result in
            outcome.set(0, result)
            done.signal()
        }
        done.wait()
        return failure(outcome.get(0))
    }

    static func options(commitDelay: Double) -> SpoolOptions {
        var options = smallOptions
        options.commitDelay = commitDelay
        return options
    }

    @Test func concurrentSubmittersShareCommits() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: Self.options(commitDelay: 0.5))
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
                // The connection closes: nobody waits for this session any more.
                spool.submitterLeft(s)
                group.leave()
            }.start()
        }
        group.wait()
        #expect(failures.count == 0)
        let stats = spool.statistics
        #expect(stats.messagesInserted == UInt64(sessions * rounds))
        #expect(stats.delayedCommits > 0)
        // Each delayed batch waited for 40% of the 16 sessions (7); only the
        // last ones, once sessions had left, went with fewer.
        #expect(stats.submissions >= 4 * stats.commits,
                "\(stats.submissions) messages in \(stats.commits) commits, \(stats.delayedCommits) delayed")
    }

    @Test func aLoneSubmitterNeverWaits() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: Self.options(commitDelay: 2))
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
        let spool = try Spool(directory: dir.spool, options: Self.options(commitDelay: 0.2))
        defer { spool.close() }
        // Five connections, one message each, then they close (a commit may
        // wait for the others meanwhile, up to 0.2 s).
        for s in 10..<15 { #expect(try Self.inject(spool, submitter: s) == nil) }
        for s in 10..<15 { spool.submitterLeft(s) }
        let delayed = spool.statistics.delayedCommits
        // A sixth, alone now: as if the five had never been (it would wait
        // for them, active within the last 50 ms, had they not left).
        for _ in 0..<3 { #expect(try Self.inject(spool, submitter: 20) == nil) }
        #expect(spool.statistics.delayedCommits == delayed)
    }
}
