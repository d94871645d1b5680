import Foundation
import LMDB
import Testing
@testable import Spool

@Suite struct BodyTests {
    static let sizes = [0, 1, 65535, 65536, 65537, 1 << 20]

    @Test(arguments: sizes) func roundTrip(size: Int) throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let body = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 8) }
        // Appended in uneven pieces, through both the contiguous and the
        // element-by-element path.
        let writer = try spool.makeBodyWriter()
        var offset = 0
        var piece = 1
        while offset < size {
            let end = min(size, offset + piece)
            if piece % 2 == 0 { try writer.append(body[offset..<end]) } else { try writer.append(body[offset..<end].lazy.map { $0 }) }
            offset = end
            piece = piece * 3 + 1
        }
        #expect(writer.size == size)
        let sealed = try writer.finish()
        #expect(sealed.size == UInt64(size))
        #expect(sealed.chunks.count == size / 65536 + 1)
        #expect(throws: SpoolError.self) { try writer.append([1]) }
        let id = spool.newQueueID()
        try spool.submitAndWait([.insert(sampleEnvelope(id), sealed)]).get()
        var chunks: [Int] = []
        var out: [UInt8] = []
        try spool.readBody(id) { chunks.append($0.count); out += $0 }
        #expect(out == body)
        #expect(chunks.allSatisfy { $0 <= 65536 })
    }

    @Test func noPlaintextOnDisk() throws {
        let dir = TemporaryDirectory()
        let marker = Array("SEALPOST-PLAINTEXT-MARKER-7f3a9c".utf8)
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            // Small and large bodies, marker at the start, across a chunk
            // boundary and at the end.
            for size in [100, 200_000] {
                var body = [UInt8](repeating: UInt8(ascii: "x"), count: size)
                body.replaceSubrange(0..<marker.count, with: marker)
                body.replaceSubrange((size - marker.count)..., with: marker)
                if size > 65536 { body.replaceSubrange((65536 - 10)..<(65536 - 10 + marker.count), with: marker) }
                let id = spool.newQueueID()
                try spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, body))]).get()
                #expect(try readAll(spool, id) == body)
            }
            spool.close()
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.spool)
        #expect(files.contains("data.mdb"))
        for file in files {
            let data = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.spool + "/" + file)))
            #expect(!contains(data, marker), "marker found in \(file)")
            // The test can fail: the marker is found when it is there.
            #expect(contains(data + marker, marker))
        }
    }

    private func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard haystack.count >= needle.count else { return false }
        var i = 0
        while i + needle.count <= haystack.count {
            if haystack[i] == needle[0] && Array(haystack[i..<i + needle.count]) == needle { return true }
            i += 1
        }
        return false
    }

    /// Writes a 3-chunk body, closes the spool, lets `tamper` edit the LMDB
    /// files through the LMDB wrapper, reopens, and returns the read result.
    private func readAfterTampering(_ tamper: (WriteTransaction, Database, Database, QueueID) throws -> Void) throws -> Result<[UInt8], Error> {
        let dir = TemporaryDirectory()
        let body = (0..<150_000).map { UInt8(truncatingIfNeeded: $0) }
        let id: QueueID
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            id = spool.newQueueID()
            try spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, body))]).get()
            #expect(try readAll(spool, id) == body)
            spool.close()
        }
        do {
            let env = try Environment(path: dir.spool, mapSize: 4 << 20, maxDatabases: 16)
            try env.write { txn throws in
                try tamper(txn, try txn.openDatabase("bodies"), try txn.openDatabase("keys"), id)
            }
            env.close()
        }
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        return Result { try readAll(spool, id) }
    }

    private func chunk(_ id: QueueID, _ n: UInt32) -> [UInt8] { Array(id.rawValue.utf8) + [0, 0, 0, UInt8(n)] }

    private func expectCorrupt(_ r: Result<[UInt8], Error>, sourceLocation: SourceLocation = #_sourceLocation) {
        switch r {
        case .success: Issue.record("tampered body decrypted", sourceLocation: sourceLocation)
        case .failure(let e):
            guard case .corrupt = e as? SpoolError else {
                Issue.record("unexpected error \(e)", sourceLocation: sourceLocation); return
            }
        }
    }

    @Test func untouchedControlDecrypts() throws {
        let r = try readAfterTampering { _, _, _, _ in }
        #expect((try? r.get())?.count == 150_000)
    }

    @Test func flippedCiphertextByteFails() throws {
        expectCorrupt(try readAfterTampering { txn, bodies, _, id in
            var c = try #require(try txn.get(bodies, chunk(id, 1)))
            c[1000] ^= 0x01
            try txn.put(bodies, chunk(id, 1), c)
        })
    }

    @Test func truncatedChunkFails() throws {
        expectCorrupt(try readAfterTampering { txn, bodies, _, id in
            let c = try #require(try txn.get(bodies, chunk(id, 2)))
            try txn.put(bodies, chunk(id, 2), Array(c.dropLast(1)))
        })
    }

    @Test func missingFinalChunkFails() throws {
        // Drop the final chunk and make the key record agree: only the
        // missing TAG_FINAL reveals the truncation.
        expectCorrupt(try readAfterTampering { txn, bodies, keys, id in
            #expect(try txn.delete(bodies, chunk(id, 2)))
            let raw = try #require(try txn.get(keys, Array(id.rawValue.utf8)))
            var record = try KeyRecord(decoding: raw)
            record.chunkCount = 2
            record.size = 131072
            try txn.put(keys, Array(id.rawValue.utf8), record.encoded())
        })
    }

    @Test func reorderedChunksFail() throws {
        expectCorrupt(try readAfterTampering { txn, bodies, _, id in
            let c0 = try #require(try txn.get(bodies, chunk(id, 0)))
            let c1 = try #require(try txn.get(bodies, chunk(id, 1)))
            try txn.put(bodies, chunk(id, 0), c1)
            try txn.put(bodies, chunk(id, 1), c0)
        })
    }

    @Test func extraChunkAfterFinalFails() throws {
        expectCorrupt(try readAfterTampering { txn, bodies, _, id in
            let c = try #require(try txn.get(bodies, chunk(id, 2)))
            try txn.put(bodies, chunk(id, 3), c)
        })
    }

    @Test func tamperedWrappedKeyFails() throws {
        expectCorrupt(try readAfterTampering { txn, _, keys, id in
            var raw = try #require(try txn.get(keys, Array(id.rawValue.utf8)))
            raw[10] ^= 0x80   // inside the wrapped key
            try txn.put(keys, Array(id.rawValue.utf8), raw)
        })
    }
}
