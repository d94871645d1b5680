import Foundation
import LMDB
import Testing
@testable import Spool

@Suite struct CommitTests {
    @Test func groupCommitFromManyThreads() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let threads = 20, perThread = 10
        let results = ResultCollector()
        let group = DispatchGroup()
        let ids = (0..<threads * perThread).map { _ in spool.newQueueID() }
        let sealed = try ids.map { id in try seal(spool, Array("body of \(id)".utf8)) }
        let payload = Array(zip(ids, sealed))
        for t in 0..<threads {
            group.enter()
            Thread {
                for i in 0..<perThread {
                    let n = t * perThread + i
                    let (id, body) = payload[n]
                    group.enter()
                    spool.submit([.insert(sampleEnvelope(id, recipients: 1), body)]) { r in
                        results.set(n, r)
                        group.leave()
                    }
                }
                group.leave()
            }.start()
        }
        group.wait()
        #expect(results.count == 200)
        #expect(results.all.allSatisfy { failure($0) == nil })
        let stats = spool.statistics
        #expect(stats.operations == 200)
        #expect(stats.messagesInserted == 200)
        #expect(stats.submissions == 200)
        #expect(stats.commits >= 1)
        #expect(stats.commits < 200, "group commit: \(stats.commits) commits for 200 submissions")
        #expect(try spool.allEnvelopes().map(\.queueID) == ids)
        for id in ids { #expect(try readAll(spool, id) == Array("body of \(id)".utf8)) }
    }

    @Test func aDeferredRemovalRidesOnTheNextCommit() throws {
        let dir = TemporaryDirectory()
        // Only the urgent insert can have brought the removal to disk.
        let spool = try Spool(directory: dir.spool, options: deferringOptions)
        defer { spool.close() }
        let first = spool.newQueueID(), second = spool.newQueueID()
        #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(first), try seal(spool, [1]))])) == nil)
        let before = spool.statistics.commits
        let removed = DispatchSemaphore(value: 0)
        spool.submit([.delete(first)], urgency: .deferred) { result in
            #expect(failure(result) == nil)
            removed.signal()
        }
        #expect(try spool.envelope(first) != nil, "not committed on its own")
        #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(second), try seal(spool, [2]))])) == nil)
        removed.wait()
        #expect(spool.statistics.commits == before + 1, "one commit for both")
        #expect(try spool.envelope(first) == nil)
        #expect(try spool.envelope(second) != nil)
    }

    @Test func aDeferredRemovalAloneIsCommittedAfterTheDeferral() throws {
        let dir = TemporaryDirectory()
        var options = smallOptions
        options.deferral = 0.05
        let spool = try Spool(directory: dir.spool, options: options)
        let id = spool.newQueueID()
        #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, [1]))])) == nil)
        let removed = DispatchSemaphore(value: 0)
        spool.submit([.delete(id)], urgency: .deferred) { _ in removed.signal() }
        removed.wait()
        #expect(try spool.envelope(id) == nil)
        spool.close()
        // Durable: gone after a reopen too.
        let again = try Spool(directory: dir.spool, options: options)
        defer { again.close() }
        #expect(try again.envelope(id) == nil)
    }

    @Test func queueIDsAreNotReusedAfterTheirMessageIsGone() throws {
        let dir = TemporaryDirectory()
        // An ID an hour ahead of the clock, as IDs are after a burst outran
        // the per-second counter or the clock was stepped back.
        let ahead = QueueID(value: (UInt64(time(nil)) + 3600) << 16)
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(ahead), try seal(spool, [1]))])) == nil)
            #expect(failure(spool.submitAndWait([.delete(ahead)])) == nil)
            spool.close()
        }
        let again = try Spool(directory: dir.spool, options: smallOptions)
        defer { again.close() }
        #expect(try again.envelope(ahead) == nil)
        #expect(again.newQueueID() > ahead, "the ID of a removed message came back after a restart")
    }

    @Test func closingCommitsADeferredRemoval() throws {
        let dir = TemporaryDirectory()
        let id: QueueID
        do {
            let spool = try Spool(directory: dir.spool, options: deferringOptions)
            id = spool.newQueueID()
            #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, [1]))])) == nil)
            spool.submit([.delete(id)], urgency: .deferred) { _ in }
            spool.close()
        }
        let again = try Spool(directory: dir.spool, options: deferringOptions)
        defer { again.close() }
        #expect(try again.envelope(id) == nil)
    }

    @Test func mapGrowsThenRefusesAtTheLimitKeepingData() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: SpoolOptions(mapSize: 256 << 10, mapSizeLimit: 1 << 20))
        defer { spool.close() }
        let initial = spool.statistics.mapSize
        #expect(initial == 256 << 10)

        // 400 KiB does not fit in 256 KiB: the map grows and the insert succeeds.
        let first = spool.newQueueID()
        let firstBody = (0..<(400 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        try spool.submitAndWait([.insert(sampleEnvelope(first), try seal(spool, firstBody))]).get()
        #expect(spool.statistics.mapSize > initial)
        #expect(spool.statistics.mapGrowths >= 1)

        // 2 MiB can never fit under a 1 MiB limit.
        let big = spool.newQueueID()
        let bigBody = [UInt8](repeating: 0x55, count: 2 << 20)
        let result = spool.submitAndWait([.insert(sampleEnvelope(big), try seal(spool, bigBody))])
        #expect(failure(result) == .full)
        #expect(spool.statistics.mapSize == 1 << 20)
        #expect(try spool.envelope(big) == nil)

        // Earlier data intact, and the spool still takes what fits.
        #expect(try readAll(spool, first) == firstBody)
        let small = spool.newQueueID()
        try spool.submitAndWait([.insert(sampleEnvelope(small), try seal(spool, Array("small".utf8)))]).get()
        #expect(try readAll(spool, small) == Array("small".utf8))
        #expect(SpoolError.full.enhancedStatus == "4.3.1")
        #expect(SpoolError.full.replyCode == 452)

        // Reopen with the original small size: the grown file stays readable.
        spool.close()
        let again = try Spool(directory: dir.spool, options: SpoolOptions(mapSize: 256 << 10, mapSizeLimit: 1 << 20))
        defer { again.close() }
        #expect(try readAll(again, first) == firstBody)
    }

    @Test func commitsKeepZerosAheadOfTheDataInUse() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: SpoolOptions(mapSize: 64 << 20, mapSizeLimit: 64 << 20))
        var ids: [QueueID] = []
        for i in 0..<40 {
            let id = spool.newQueueID()
            ids.append(id)
            try spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, [UInt8](repeating: UInt8(i), count: 50_000)))]).get()
        }
        // 2 MB of bodies: the file was extended ahead of them, more than
        // once, where that helps (ext4 and XFS; elsewhere never).
        let size = try #require(try FileManager.default.attributesOfItem(atPath: dir.spool + "/data.mdb")[.size] as? Int)
        if Committer.zerosAheadHelp(dir.spool) {
            #expect(spool.statistics.fileExtensions >= 2)
        } else {
            #expect(spool.statistics.fileExtensions == 0)
        }
        #expect(size >= 2_000_000 && size <= 64 << 20)
        spool.close()
        let again = try Spool(directory: dir.spool, options: SpoolOptions(mapSize: 64 << 20, mapSizeLimit: 64 << 20))
        defer { again.close() }
        for (i, id) in ids.enumerated() {
            #expect(try readAll(again, id) == [UInt8](repeating: UInt8(i), count: 50_000))
        }
    }

    @Test func zerosAheadOnlyWhereTheyHelp() {
        // /dev/shm is tmpfs on Linux: syncs nothing, zeros would be memory.
        #expect(!Committer.zerosAheadHelp("/dev/shm"))
        #expect(!Committer.zerosAheadHelp("/nonexistent/directory"))
    }

    @Test func readersDuringGrowth() throws {
        // Readers on other threads while the committer resizes the map:
        // the reader/writer lock must keep them apart (LMDB requires no
        // active transaction during mdb_env_set_mapsize).
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: SpoolOptions(mapSize: 128 << 10, mapSizeLimit: 64 << 20))
        defer { spool.close() }
        let seed = spool.newQueueID()
        let seedBody = [UInt8](repeating: 7, count: 100_000)
        try spool.submitAndWait([.insert(sampleEnvelope(seed), try seal(spool, seedBody))]).get()
        let stop = Flag()
        let failures = ResultCollector()
        let group = DispatchGroup()
        for r in 0..<4 {
            group.enter()
            Thread {
                var n = 0
                while !stop.isSet {
                    do {
                        if try readAll(spool, seed) != seedBody { failures.set(r * 1_000_000 + n, .failure(.corrupt("mismatch"))) }
                    } catch { failures.set(r * 1_000_000 + n, .failure(.io("\(error)"))) }
                    n += 1
                }
                group.leave()
            }.start()
        }
        for _ in 0..<20 {
            let id = spool.newQueueID()
            try spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, [UInt8](repeating: 1, count: 300_000)))]).get()
        }
        stop.set()
        group.wait()
        #expect(failures.count == 0)
        #expect(spool.statistics.mapGrowths >= 3)
    }
}

final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.lock(); value = true; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
}
