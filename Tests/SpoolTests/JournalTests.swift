import Foundation
import LMDB
import Testing
@testable import Spool

/// The journal in front of LMDB (Journal.swift, Committer's applier).
@Suite struct JournalTests {
    static let options = SpoolOptions(mapSize: 4 << 20, mapSizeLimit: 64 << 20, journalSize: 1 << 20)

    /// Records, in order, the durable calls and completions, or what the
    /// spool reports.
    final class Events: @unchecked Sendable {
        private let lock = NSLock()
        private var list: [String] = []
        func add(_ e: String) { lock.lock(); list.append(e); lock.unlock() }
        var all: [String] { lock.lock(); defer { lock.unlock() }; return list }
    }

    @Test func urgentInsertsAreAnsweredFromTheJournalThenAppliedAndSurviveAReopen() throws {
        let dir = TemporaryDirectory()
        var ids: [QueueID] = []
        let events = Events()
        do {
            let spool = try Spool(directory: dir.spool, options: Self.options)
            defer { spool.close() }
            ids = (0..<40).map { _ in spool.newQueueID() }
            let group = DispatchGroup()
            for (n, id) in ids.enumerated() {
                let body = try seal(spool, Array("body \(n)".utf8))
                group.enter()
                spool.submit([.insert(sampleEnvelope(id, recipients: 1), body)], durable: {
                    events.add("durable \(id)")
                }) { result in
                    events.add(failure(result) == nil ? "applied \(id)" : "failed \(id)")
                    group.leave()
                }
            }
            group.wait()
            let stats = spool.statistics
            #expect(stats.journaledSubmissions == 40)
            #expect(stats.journalRecords >= 1 && stats.journalRecords <= 40)
            #expect(stats.messagesInserted == 40)
            // Applied in fewer LMDB commits than journal records, or as many.
            #expect(stats.commits <= stats.journalRecords)
            for id in ids { #expect(try spool.envelope(id) != nil) }
        }
        let seen = events.all
        for id in ids {
            let durable = seen.firstIndex(of: "durable \(id)")
            let applied = seen.firstIndex(of: "applied \(id)")
            #expect(durable != nil && applied != nil && durable! < applied!, "\(id): \(seen)")
        }
        let reopened = try Spool(directory: dir.spool, options: Self.options)
        defer { reopened.close() }
        #expect(reopened.replayedFromJournal == 0)
        for (n, id) in ids.enumerated() {
            #expect(try readAll(reopened, id) == Array("body \(n)".utf8))
        }
    }

    /// A crash after the journal append and before the LMDB commit: the
    /// record is in the journal alone, as the committer left it.
    @Test func aMessageOnlyInTheJournalIsAppliedAtTheNextOpenAndOnlyOnce() throws {
        let dir = TemporaryDirectory()
        var inserts: [(envelope: EnvelopeRecord, body: SealedBody)] = []
        do {
            let spool = try Spool(directory: dir.spool, options: Self.options)
            for n in 0..<3 {
                inserts.append((sampleEnvelope(spool.newQueueID(), recipients: 1), try seal(spool, Array("lost \(n)".utf8))))
            }
            spool.close()
        }
        do {
            let journal = try Journal(directory: dir.spool, capacity: 1 << 20)
            _ = try journal.records(after: 0)
            _ = try journal.append(Journal.payload(inserts))
        }
        do {
            let spool = try Spool(directory: dir.spool, options: Self.options)
            defer { spool.close() }
            #expect(spool.replayedFromJournal == 3)
            for (n, insert) in inserts.enumerated() {
                #expect(try readAll(spool, insert.envelope.queueID) == Array("lost \(n)".utf8))
            }
            // A new ID comes above the replayed ones.
            #expect(spool.newQueueID().value > inserts.map(\.envelope.queueID.value).max()!)
        }
        let again = try Spool(directory: dir.spool, options: Self.options)
        defer { again.close() }
        #expect(again.replayedFromJournal == 0)
        #expect(try again.allEnvelopes().count == 3)
    }

    @Test func aDeliveredMessageIsNotBroughtBackFromTheJournal() throws {
        let dir = TemporaryDirectory()
        let id: QueueID
        do {
            let spool = try Spool(directory: dir.spool, options: Self.options)
            defer { spool.close() }
            id = spool.newQueueID()
            #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, [1, 2, 3]))])) == nil)
            #expect(spool.statistics.journaledSubmissions == 1)
            #expect(failure(spool.submitAndWait([.delete(id)])) == nil)
        }
        // The record is still in the journal file, at or below "journal-applied".
        let journal = try Journal(directory: dir.spool, capacity: 1 << 20)
        #expect(try journal.records(after: 0).count == 1)
        let spool = try Spool(directory: dir.spool, options: Self.options)
        defer { spool.close() }
        #expect(spool.replayedFromJournal == 0)
        #expect(try spool.envelope(id) == nil)
    }

    @Test func readingStopsAtATornRecordAndAtOneFromBeforeARewind() throws {
        let dir = TemporaryDirectory()
        try FileManager.default.createDirectory(atPath: dir.spool, withIntermediateDirectories: true)
        let journal = try Journal(directory: dir.spool, capacity: 1 << 20)
        for n in 1...3 { #expect(try journal.append([UInt8](repeating: UInt8(n), count: 100 * n)) == UInt64(n)) }
        #expect(try Journal(directory: dir.spool, capacity: 1 << 20).records(after: 0).map(\.sequence) == [1, 2, 3])
        #expect(try Journal(directory: dir.spool, capacity: 1 << 20).records(after: 2).map(\.payload) == [[UInt8](repeating: 3, count: 300)])

        // One byte of the third record's payload changed: a torn write.
        let fd = open(journal.path, O_RDWR)
        var flipped: UInt8 = 0xFF
        #expect(pwrite(fd, &flipped, 1, off_t(2 * Journal.alignment + Journal.headerSize + 5)) == 1)
        close(fd)
        let reread = try Journal(directory: dir.spool, capacity: 1 << 20)
        #expect(try reread.records(after: 0).map(\.sequence) == [1, 2])
        #expect(reread.lastSequence == 2)

        // After a rewind record 4 is at the start; what comes next in the
        // file (the old record 2) does not follow it.
        journal.rewind()
        #expect(try journal.append([9]) == 4)
        let afterRewind = try Journal(directory: dir.spool, capacity: 1 << 20)
        #expect(try afterRewind.records(after: 0).map(\.sequence) == [4])
        #expect(afterRewind.lastSequence == 4)
    }

    @Test func payloadDecodingIsStrict() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let id = spool.newQueueID()
        let body = try seal(spool, Array(repeating: 7, count: 100_000))
        let payload = Journal.payload([(sampleEnvelope(id), body)])
        let decoded = try Journal.inserts(payload)
        #expect(decoded.count == 1)
        #expect(decoded[0].envelope == sampleEnvelope(id))
        #expect(decoded[0].body.chunks == body.chunks)
        #expect(decoded[0].body.size == 100_000)
        #expect(Journal.payloadSize([(sampleEnvelope(id), body)]) >= payload.count)

        #expect(throws: SpoolError.self) { try Journal.inserts(payload + [0]) }
        #expect(throws: SpoolError.self) { try Journal.inserts(Array(payload.dropLast())) }
        #expect(throws: SpoolError.self) { try Journal.inserts([0, 0, 0, 1]) }
        // The chunk count (after the two records) no longer matches the key record.
        var wrongCount = payload
        let envelopeLength = Int(wrongCount[4..<8].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        let keyAt = 8 + envelopeLength
        let keyLength = Int(wrongCount[keyAt..<(keyAt + 4)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        wrongCount[keyAt + 4 + keyLength + 3] &+= 1
        #expect(throws: SpoolError.self) { try Journal.inserts(wrongCount) }
    }

    @Test func theJournalStartsOverOnceEverythingInItIsApplied() throws {
        let dir = TemporaryDirectory()
        var ids: [QueueID] = []
        let chunk = [UInt8](repeating: 0x5A, count: 60_000)
        do {
            let spool = try Spool(directory: dir.spool, options: Self.options)
            defer { spool.close() }
            for _ in 0..<40 {
                let id = spool.newQueueID()
                ids.append(id)
                #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, chunk))])) == nil)
            }
            let stats = spool.statistics
            #expect(stats.journaledSubmissions == 40)
            // 40 records of 60 KiB in a journal of 1 MiB.
            #expect(stats.journalRewinds >= 2)
        }
        let spool = try Spool(directory: dir.spool, options: Self.options)
        defer { spool.close() }
        #expect(spool.replayedFromJournal == 0)
        for id in ids { #expect(try readAll(spool, id) == chunk) }
        var info = stat()
        #expect(stat(dir.spool + "/journal", &info) == 0)
        #expect(Int(info.st_size) <= 1 << 20)
    }

    @Test func aMessageTooBigForTheJournalIsCommittedToLMDBBeforeItsAnswer() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: Self.options)
        defer { spool.close() }
        let id = spool.newQueueID()
        let events = Events()
        let done = DispatchSemaphore(value: 0)
        // Over a quarter of the 1 MiB journal.
        spool.submit([.insert(sampleEnvelope(id), try seal(spool, [UInt8](repeating: 1, count: 300_000)))],
                     durable: { events.add("durable") }) { result in
            events.add(failure(result) == nil ? "applied" : "failed")
            done.signal()
        }
        done.wait()
        #expect(events.all == ["durable", "applied"])
        #expect(spool.statistics.journaledSubmissions == 0)
        #expect(try spool.envelope(id) != nil)
    }

    @Test func aJournaledMessageIsReadableBeforeItIsInLMDB() throws {
        let dir = TemporaryDirectory()
        var options = Self.options
        options.applyDelay = 3600   // the applier waits for 64 messages, or for a submission that needs LMDB
        let spool = try Spool(directory: dir.spool, options: options)
        let id = spool.newQueueID()
        let durable = DispatchSemaphore(value: 0)
        let applied = DispatchSemaphore(value: 0)
        spool.submit([.insert(sampleEnvelope(id), try seal(spool, Array("early".utf8)))], durable: { durable.signal() }) { _ in
            applied.signal()
        }
        durable.wait()
        #expect(spool.statistics.commits == 0)
        #expect(try readAll(spool, id) == Array("early".utf8))
        #expect(try spool.envelope(id)?.queueID == id)
        // An update needs LMDB: the applier applies the insert before it.
        var envelope = sampleEnvelope(id)
        envelope.held = false
        #expect(failure(spool.submitAndWait([.update(envelope)])) == nil)
        applied.wait()
        #expect(spool.statistics.commits == 1)
        #expect(try spool.envelope(id)?.held == false)
        #expect(try readAll(spool, id) == Array("early".utf8))

        // Closing applies what is still unapplied.
        let late = spool.newQueueID()
        spool.submit([.insert(sampleEnvelope(late), try seal(spool, Array("late".utf8)))], durable: { durable.signal() }) { _ in }
        durable.wait()
        spool.close()
        let reopened = try Spool(directory: dir.spool, options: Self.options)
        defer { reopened.close() }
        #expect(reopened.replayedFromJournal == 0)
        #expect(try readAll(reopened, late) == Array("late".utf8))
    }

    /// Messages sealed under the spool's key, then written to its journal
    /// alone, as a crash before the applier's commit leaves them.
    static func journalOnly(_ dir: TemporaryDirectory, options: SpoolOptions, count: Int, bodySize: Int,
                            records: Int = 1) throws -> [(envelope: EnvelopeRecord, body: SealedBody)] {
        var inserts: [(envelope: EnvelopeRecord, body: SealedBody)] = []
        let spool = try Spool(directory: dir.spool, options: options)
        for n in 0..<count {
            inserts.append((sampleEnvelope(spool.newQueueID(), recipients: 1),
                            try seal(spool, [UInt8](repeating: UInt8(n & 0xFF), count: bodySize))))
        }
        spool.close()
        let journal = try Journal(directory: dir.spool, capacity: 16 << 20)
        _ = try journal.records(after: 0)
        let perRecord = (count + records - 1) / records
        for start in stride(from: 0, to: count, by: perRecord) {
            _ = try journal.append(Journal.payload(Array(inserts[start..<min(count, start + perRecord)])))
        }
        return inserts
    }

    @Test func theReplayGrowsTheMapAsTheMessagesNeed() throws {
        let dir = TemporaryDirectory()
        let options = SpoolOptions(mapSize: 1 << 20, mapSizeLimit: 64 << 20, journalSize: 16 << 20)
        let inserts = try Self.journalOnly(dir, options: options, count: 30, bodySize: 100_000, records: 3)
        let spool = try Spool(directory: dir.spool, options: options)
        defer { spool.close() }
        #expect(spool.replayedFromJournal == 30)
        #expect(spool.statistics.mapSize > 1 << 20)
        for (n, insert) in inserts.enumerated() {
            #expect(try readAll(spool, insert.envelope.queueID) == [UInt8](repeating: UInt8(n & 0xFF), count: 100_000))
        }
    }

    @Test func aJournalIsAppliedEvenWhenTheConfigurationNoLongerAsksForOne() throws {
        let dir = TemporaryDirectory()
        let inserts = try Self.journalOnly(dir, options: Self.options, count: 2, bodySize: 10)
        let spool = try Spool(directory: dir.spool, options: smallOptions)   // journalSize 0
        defer { spool.close() }
        #expect(spool.replayedFromJournal == 2)
        for insert in inserts { #expect(try spool.envelope(insert.envelope.queueID) != nil) }
        let id = spool.newQueueID()
        #expect(failure(spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, [1]))])) == nil)
        #expect(spool.statistics.journaledSubmissions == 0)
    }

    @Test func aRecordLMDBRefusesAtReplayIsKeptAsideAndTheRestApplied() throws {
        let dir = TemporaryDirectory()
        _ = try Self.journalOnly(dir, options: Self.options, count: 1, bodySize: 10)
        // Record 2: a good checksum around a payload that does not decode.
        let journal = try Journal(directory: dir.spool, capacity: 16 << 20)
        _ = try journal.records(after: 0)
        let bad: [UInt8] = [0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3]
        #expect(try journal.append(bad) == 2)
        // Record 3: one more good message.
        let spool = try Spool(directory: dir.spool, options: Self.options)
        let late = (sampleEnvelope(spool.newQueueID(), recipients: 1), try seal(spool, [7]))
        spool.close()
        let again = try Journal(directory: dir.spool, capacity: 16 << 20)
        let seen = try again.records(after: 0).map(\.sequence)
        #expect(seen == [1, 2], "\(seen)")   // the good one was applied by the open above
        #expect(FileManager.default.contents(atPath: dir.spool + "/journal-rejected-2") == Data(bad))
        again.continueAfter(2)
        _ = try again.append(Journal.payload([late]))
        let warnings = Events()
        var options = Self.options
        options.warn = { warnings.add($0) }
        let reopened = try Spool(directory: dir.spool, options: options)
        defer { reopened.close() }
        #expect(reopened.replayedFromJournal == 1)
        #expect(try readAll(reopened, late.0.queueID) == [7])
        let envelopes = try reopened.allEnvelopes().map(\.queueID)
        #expect(envelopes.count == 2, "\(envelopes)")
        #expect(warnings.all.isEmpty, "record 2 was dealt with at the open before: \(warnings.all)")
    }

    @Test func updatesAndDeletionsGoStraightToLMDBInOrderWithJournaledInserts() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: Self.options)
        defer { spool.close() }
        let id = spool.newQueueID()
        var envelope = sampleEnvelope(id)
        #expect(failure(spool.submitAndWait([.insert(envelope, try seal(spool, [1]))])) == nil)
        envelope.held = false
        #expect(failure(spool.submitAndWait([.update(envelope)])) == nil)
        #expect(try spool.envelope(id)?.held == false)
        #expect(failure(spool.submitAndWait([.update(sampleEnvelope(spool.newQueueID()))])) == .noSuchMessage)
        #expect(spool.statistics.journaledSubmissions == 1)
    }
}
