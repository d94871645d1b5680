import Foundation
import LMDB
import Testing
@testable import Spool

@Suite struct SpoolBasicTests {
    @Test func insertReadDelete() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let id = spool.newQueueID()
        let envelope = sampleEnvelope(id)
        let body = Array("Subject: hi\r\n\r\nhello\r\n".utf8)
        try spool.submitAndWait([.insert(envelope, try seal(spool, body))]).get()
        #expect(try spool.envelope(id) == envelope)
        #expect(try readAll(spool, id) == body)
        #expect(try spool.allEnvelopes() == [envelope])
        try spool.submitAndWait([.delete(id)]).get()
        #expect(try spool.envelope(id) == nil)
        #expect(throws: SpoolError.noSuchMessage) { try readAll(spool, id) }
        #expect(failure(spool.submitAndWait([.delete(id)])) == .noSuchMessage)
        // Nothing of the message is left behind.
        spool.close()
        let env = try Environment(path: dir.spool, mapSize: 4 << 20, maxDatabases: 16)
        try env.read { txn throws in
            #expect(try txn.count(txn.openDatabase("bodies")) == 0)
            #expect(try txn.count(txn.openDatabase("keys")) == 0)
            #expect(try txn.count(txn.openDatabase("envelopes")) == 0)
        }
    }

    @Test func envelopeRoundTripAllFieldsAndMinimal() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let full = sampleEnvelope(spool.newQueueID(), recipients: 3)
        let minimal = EnvelopeRecord(queueID: spool.newQueueID(), sender: "", arrival: 0, size: 0,
                                     recipients: [RecipientRecord(address: "bob@example.net")])
        let empty = EnvelopeRecord(queueID: spool.newQueueID(), sender: "x@y", arrival: .max, size: .max,
                                   peerUID: 0, kind: .doubleBounce)
        for e in [full, minimal, empty] {
            try spool.submitAndWait([.insert(e, try seal(spool, []))]).get()
        }
        #expect(try spool.envelope(full.queueID) == full)
        #expect(try spool.envelope(minimal.queueID) == minimal)
        #expect(try spool.envelope(empty.queueID) == empty)
        #expect(try spool.allEnvelopes() == [full, minimal, empty])

        var updated = full
        updated.recipients[1].state = .sent
        updated.recipients[1].remoteMTA = nil
        updated.held = false
        try spool.submitAndWait([.update(updated)]).get()
        #expect(try spool.envelope(full.queueID) == updated)
        #expect(try readAll(spool, full.queueID) == [])
    }

    @Test func queueIDsAreUniqueOrderedAndWellFormed() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        var previous: QueueID?
        var seen = Set<QueueID>()
        for _ in 0..<70_000 {   // more than the 16-bit counter of one second
            let id = spool.newQueueID()
            #expect(QueueID(rawValue: id.rawValue) == id)
            if let previous { #expect(previous < id) }
            previous = id
            seen.insert(id)
        }
        #expect(seen.count == 70_000)
        #expect(QueueID(rawValue: "0123456789AB") != nil)
        for bad in ["0123456789ab", "0123456789A", "0123456789ABC", "0123456789AG", ""] {
            #expect(QueueID(rawValue: bad) == nil, "\(bad)")
        }
    }

    @Test func insertOfExistingIDFailsAndKeepsTheOriginal() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let id = spool.newQueueID()
        let first = sampleEnvelope(id)
        try spool.submitAndWait([.insert(first, try seal(spool, Array("one".utf8)))]).get()
        var second = first
        second.sender = "mallory@example.com"
        let result = spool.submitAndWait([.insert(second, try seal(spool, Array("two".utf8)))])
        #expect(failure(result) != nil)
        #expect(try spool.envelope(id) == first)
        #expect(try readAll(spool, id) == Array("one".utf8))
    }

    @Test func submissionIsAtomicAndFailuresAreIsolated() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let a = sampleEnvelope(spool.newQueueID())
        let b = sampleEnvelope(spool.newQueueID())
        let c = sampleEnvelope(spool.newQueueID())
        let missing = spool.newQueueID()
        let results = ResultCollector()
        let group = DispatchGroup()
        // Queued back to back so they usually share a batch; the outcome
        // must be the same whether they do or not.
        for (index, ops) in [[SpoolOperation.insert(a, try seal(spool, [1]))],
                             [.insert(b, try seal(spool, [2])), .delete(missing)],
                             [.insert(c, try seal(spool, [3])), .update(c)]].enumerated() {
            group.enter()
            spool.submit(ops) { r in results.set(index, r); group.leave() }
        }
        group.wait()
        #expect(failure(results.get(0)) == nil)
        #expect(failure(results.get(1)) == .noSuchMessage)
        #expect(failure(results.get(2)) == nil)
        #expect(try spool.envelope(a.queueID) == a)
        #expect(try spool.envelope(b.queueID) == nil)   // its submission failed as a whole
        #expect(throws: SpoolError.noSuchMessage) { try readAll(spool, b.queueID) }
        #expect(try spool.envelope(c.queueID) == c)
        #expect(failure(spool.submitAndWait([.update(sampleEnvelope(missing))])) == .noSuchMessage)
    }

    /// A batch is applied without nested transactions until one of its
    /// submissions fails; then again, with one per submission. Deferred
    /// submissions ride along with the next urgent one, so these four are
    /// one batch for certain.
    @Test func aFailureInABatchFailsAloneAndTheRestIsCommittedOnce() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: deferringOptions)
        defer { spool.close() }
        let a = sampleEnvelope(spool.newQueueID())
        let b = sampleEnvelope(spool.newQueueID())
        let c = sampleEnvelope(spool.newQueueID())
        let d = sampleEnvelope(spool.newQueueID())
        let before = spool.statistics
        let results = ResultCollector()
        let group = DispatchGroup()
        for (index, ops) in [[SpoolOperation.insert(a, try seal(spool, [1]))],
                             [.insert(b, try seal(spool, [2])), .update(sampleEnvelope(spool.newQueueID()))],
                             [.insert(c, try seal(spool, [3])), .insert(c, try seal(spool, [4]))],
                             [.insert(d, try seal(spool, [5]))]].enumerated() {
            group.enter()
            spool.submit(ops, urgency: index == 3 ? .now : .deferred) { r in results.set(index, r); group.leave() }
        }
        group.wait()
        #expect(failure(results.get(0)) == nil)
        #expect(failure(results.get(1)) == .noSuchMessage)
        #expect(failure(results.get(2)) != nil)
        #expect(failure(results.get(3)) == nil)
        #expect(try readAll(spool, a.queueID) == [1])
        #expect(try spool.envelope(b.queueID) == nil)
        #expect(try spool.envelope(c.queueID) == nil)
        #expect(throws: SpoolError.noSuchMessage) { try readAll(spool, c.queueID) }
        #expect(try readAll(spool, d.queueID) == [5])
        let after = spool.statistics
        #expect(after.commits == before.commits + 1)
        #expect(after.isolatedBatches == before.isolatedBatches + 1)
        #expect(after.messagesInserted == before.messagesInserted + 2)
        #expect(after.failedSubmissions == before.failedSubmissions + 2)

        // A batch where all succeed goes in without a second pass.
        let e = sampleEnvelope(spool.newQueueID())
        #expect(failure(spool.submitAndWait([.insert(e, try seal(spool, [6]))])) == nil)
        #expect(spool.statistics.isolatedBatches == after.isolatedBatches)
    }

    @Test func reopenKeepsEverything() throws {
        let dir = TemporaryDirectory()
        var envelopes: [EnvelopeRecord] = []
        var bodies: [QueueID: [UInt8]] = [:]
        var lastID: QueueID?
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            for i in 0..<10 {
                let e = sampleEnvelope(spool.newQueueID(), recipients: i % 3 + 1)
                let body = (0..<(i * 10_000)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
                try spool.submitAndWait([.insert(e, try seal(spool, body))]).get()
                envelopes.append(e)
                bodies[e.queueID] = body
                lastID = e.queueID
            }
            spool.close()
            #expect(throws: SpoolError.io("spool closed")) { try spool.envelope(envelopes[0].queueID) }
            #expect(failure(spool.submitAndWait([.delete(envelopes[0].queueID)])) == .io("spool closed"))
        }
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        #expect(try spool.allEnvelopes() == envelopes)
        for (id, body) in bodies { #expect(try readAll(spool, id) == body) }
        #expect(spool.newQueueID() > lastID!)
        #expect(spool.statistics.commits == 0)
    }

    @Test func persistentCountersInMeta() throws {
        let dir = TemporaryDirectory()
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            for _ in 0..<3 {
                try spool.submitAndWait([.insert(sampleEnvelope(spool.newQueueID()), try seal(spool, [1]))]).get()
            }
            #expect(spool.statistics.commits == 3)
            spool.close()
        }
        let env = try Environment(path: dir.spool, mapSize: 4 << 20, maxDatabases: 16)
        defer { env.close() }
        try env.read { txn throws in
            let meta = try txn.openDatabase("meta")
            let u64 = { (name: String) throws -> UInt64 in
                try #require(try txn.get(meta, Array(name.utf8))).reduce(0) { $0 << 8 | UInt64($1) }
            }
            #expect(try u64("commits") == 3)
            #expect(try u64("operations") == 3)
            #expect(try u64("messages") == 3)
            #expect(try txn.get(meta, Array("format".utf8)) == [0, 0, 0, 1])
            // The reserved databases exist.
            for name in Spool.databaseNames { _ = try txn.openDatabase(name) }
        }
    }

    @Test func secondOwnerIsRefused() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        #expect(throws: SpoolError.io("\(dir.spool) is in use by another queue process")) {
            try Spool(directory: dir.spool, options: smallOptions)
        }
        spool.close()
        let again = try Spool(directory: dir.spool, options: smallOptions)
        again.close()
    }
}

final class ResultCollector: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Int: Result<Void, SpoolError>] = [:]
    func set(_ i: Int, _ r: Result<Void, SpoolError>) { lock.lock(); results[i] = r; lock.unlock() }
    func get(_ i: Int) -> Result<Void, SpoolError> { lock.lock(); defer { lock.unlock() }; return results[i]! }
    var count: Int { lock.lock(); defer { lock.unlock() }; return results.count }
    var all: [Result<Void, SpoolError>] { lock.lock(); defer { lock.unlock() }; return Array(results.values) }
}

/// A damaged envelope record (a disk error, an old version's bug) is set
/// aside, named, rather than failing the read of every other envelope:
/// the queue starts with the readable ones.
@Suite struct DamagedEnvelopeTests {
    @Test func readableEnvelopesSetADamagedRecordAside() throws {
        let dir = TemporaryDirectory()
        var ids: [QueueID] = []
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            for _ in 0..<3 {
                let id = spool.newQueueID()
                try spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, Array("body\r\n".utf8)))]).get()
                ids.append(id)
            }
            spool.close()
        }
        do {
            let env = try Environment(path: dir.spool, mapSize: 4 << 20, maxDatabases: 16)
            try env.write { txn throws in
                try txn.put(try txn.openDatabase("envelopes"), ids[1].key, [0xFF, 0x00, 0x13])
            }
            env.close()
        }
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let (envelopes, damaged) = try spool.readableEnvelopes()
        #expect(envelopes.map(\.queueID) == [ids[0], ids[2]])
        #expect(damaged.map(\.key) == [ids[1].rawValue])
        #expect(throws: SpoolError.self) { try spool.allEnvelopes() }
    }

    /// An envelope stored under one queue ID that names another is damaged
    /// too: it would be scheduled, delivered and removed as the other.
    @Test func anEnvelopeUnderAnotherIDIsDamaged() throws {
        let dir = TemporaryDirectory()
        var ids: [QueueID] = []
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            for _ in 0..<2 {
                let id = spool.newQueueID()
                try spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, Array("body\r\n".utf8)))]).get()
                ids.append(id)
            }
            spool.close()
        }
        do {
            let env = try Environment(path: dir.spool, mapSize: 4 << 20, maxDatabases: 16)
            try env.write { txn throws in
                let envelopes = try txn.openDatabase("envelopes")
                let first = try txn.get(envelopes, ids[0].key)!
                try txn.put(envelopes, ids[1].key, first)
            }
            env.close()
        }
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let (envelopes, damaged) = try spool.readableEnvelopes()
        #expect(envelopes.map(\.queueID) == [ids[0]])
        #expect(damaged.map(\.key) == [ids[1].rawValue])
        #expect(damaged.first?.reason.contains("names \(ids[0].rawValue)") == true)
        #expect(throws: SpoolError.self) { try spool.envelope(ids[1]) }
        #expect(try spool.envelope(ids[0])?.queueID == ids[0])
    }
}
