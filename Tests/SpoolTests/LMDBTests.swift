import Foundation
import LMDB
import Testing

@Suite struct LMDBTests {
    private func open(_ dir: TemporaryDirectory, mapSize: Int = 1 << 20) throws -> Environment {
        try Environment(path: dir.path, mapSize: mapSize, maxDatabases: 4)
    }

    private func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    @Test func dataWrittenIntoTheZeroedTailSurvivesAReopen() throws {
        let dir = TemporaryDirectory()
        var env = try open(dir, mapSize: 4 << 20)
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        let before = try env.dataFileSize
        // Zeros up to 2 MiB; asking past the map stops at the map.
        try env.extendDataFile(to: 2 << 20)
        #expect(try env.dataFileSize == 2 << 20)
        #expect(env.usedSize < 2 << 20 && before < 2 << 20)
        try env.extendDataFile(to: 64 << 20)
        #expect(try env.dataFileSize == 4 << 20)
        // LMDB's next pages land in the zeros: overwrites, not growth.
        let value = [UInt8](repeating: 0xA5, count: 300_000)
        try env.write { txn throws in
            for i in 0..<4 { try txn.put(db, bytes("k\(i)"), value) }
        }
        #expect(try env.dataFileSize == 4 << 20)
        env.close()
        // A map smaller than the file: LMDB maps what the data needs (the
        // zeros past the last page are nobody's).
        env = try open(dir, mapSize: 1 << 20)
        defer { env.close() }
        #expect(env.mapSize >= env.usedSize)
        try env.read { txn throws in
            let db = try txn.openDatabase("t")
            for i in 0..<4 { #expect(try txn.get(db, bytes("k\(i)")) == value) }
        }
    }

    /// Bytes this thread has had the kernel write to storage (the
    /// "write_bytes" of /proc/thread-self/io): counted when a page of the
    /// page cache turns dirty, the whole folio at once.
    private func storageBytesWritten() -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/thread-self/io", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("write_bytes:") {
            return Int(line.dropFirst("write_bytes:".count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// The zeros go out of the page cache once synced: written in 1 MiB
    /// pieces they sat in large folios (ext4 since Linux 6.16), and a commit
    /// that put one 4 KiB page into such a folio dirtied all of it, so that
    /// its sync wrote up to a megabyte (seen: 117 KB written per 1 KiB
    /// message under load, 22 KB after).
    @Test func aCommitIntoTheZeroedTailWritesItsPagesOnly() throws {
        let dir = TemporaryDirectory()
        let env = try open(dir, mapSize: 64 << 20)
        defer { env.close() }
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        guard let start = storageBytesWritten() else { return }
        try env.extendDataFile(to: 16 << 20)
        guard let filled = storageBytesWritten(), filled - start >= 8 << 20 else {
            // A file system that does not count (tmpfs): nothing to see.
            return
        }
        // On past the first megabyte of zeros, where the folios are large
        // (each is aligned to its size), a few pages a commit: the pages
        // one commit writes in one go make a folio of their own.
        let filler = [UInt8](repeating: 2, count: 8 << 10)
        for i in 0..<128 {
            try env.write { txn throws in try txn.put(db, bytes("filler\(i)"), filler) }
        }
        for round in 0..<8 {
            let before = try #require(storageBytesWritten())
            try env.write { txn throws in try txn.put(db, bytes("key\(round)"), [UInt8](repeating: 1, count: 100)) }
            let written = try #require(storageBytesWritten()) - before
            // A leaf, the database's record in the main tree, a meta page:
            // a few pages, where a folio of zeros would be hundreds.
            #expect(written <= 64 << 10, "commit \(round) had \(written) bytes written")
        }
    }

    @Test func putGetDeleteAndRanges() throws {
        let dir = TemporaryDirectory()
        let env = try open(dir)
        let db = try env.write { txn throws in
            let db = try txn.openDatabase("t", create: true)
            for k in ["a", "b1", "b2", "b3", "c"] { try txn.put(db, bytes(k), bytes("v" + k)) }
            #expect(try txn.insert(db, bytes("a"), bytes("other")) == false)
            return db
        }
        try env.read { txn throws in
            #expect(try txn.get(db, bytes("b2")) == bytes("vb2"))
            #expect(try txn.get(db, bytes("zz")) == nil)
            #expect(try txn.entries(db, from: bytes("b"), to: bytes("c")).map(\.key) == [bytes("b1"), bytes("b2"), bytes("b3")])
            #expect(try txn.entries(db).count == 5)
            #expect(try txn.get(db, bytes("a")) == bytes("va"))
        }
        try env.write { txn throws in
            #expect(try txn.deleteRange(db, from: bytes("b"), to: bytes("c")) == 3)
            #expect(try txn.delete(db, bytes("a")))
            #expect(try txn.delete(db, bytes("a")) == false)
        }
        try env.read { txn throws in
            #expect(try txn.entries(db).map(\.key) == [bytes("c")])
            try txn.withCursor(db) { c throws in
                #expect(try c.last()?.key == bytes("c"))
                #expect(try c.next() == nil)
            }
        }
    }

    @Test func deleteRangeAcrossManyPages() throws {
        let dir = TemporaryDirectory()
        let env = try open(dir, mapSize: 16 << 20)
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        func key(_ prefix: UInt8, _ n: Int) -> [UInt8] { [prefix, UInt8(n >> 8), UInt8(n & 0xFF)] }
        try env.write { txn throws in
            for n in 0..<3000 {
                for p: UInt8 in [1, 2, 3] { try txn.put(db, key(p, n), [UInt8](repeating: p, count: 100)) }
            }
        }
        let deleted = try env.write { txn throws in try txn.deleteRange(db, from: [2], to: [3]) }
        #expect(deleted == 3000)
        try env.read { txn throws in
            let keys = try txn.entries(db).map { $0.key[0] }
            #expect(keys.filter { $0 == 1 }.count == 3000)
            #expect(keys.filter { $0 == 2 }.count == 0)
            #expect(keys.filter { $0 == 3 }.count == 3000)
        }
    }

    @Test func uncommittedTransactionsAbort() throws {
        let dir = TemporaryDirectory()
        let env = try open(dir)
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        do {
            let txn = try env.beginWrite()
            try txn.put(db, bytes("k"), bytes("v"))
            // released without commit
        }
        // The writer lock was released (else this would block) and nothing was written.
        try env.write { txn throws in #expect(try txn.get(db, bytes("k")) == nil) }
        struct Boom: Error {}
        #expect(throws: Boom.self) {
            try env.write { txn throws in
                try txn.put(db, bytes("k"), bytes("v"))
                throw Boom()
            }
        }
        try env.read { txn throws in #expect(try txn.get(db, bytes("k")) == nil) }
    }

    @Test func nestedTransactions() throws {
        let dir = TemporaryDirectory()
        let env = try open(dir)
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        try env.write { txn throws in
            try txn.put(db, bytes("parent"), bytes("1"))
            let kept = try txn.beginChild()
            #expect(throws: LMDBError.self) { try txn.put(db, bytes("x"), bytes("parent busy")) }
            try kept.put(db, bytes("kept"), bytes("2"))
            try kept.commit()
            let dropped = try txn.beginChild()
            try dropped.put(db, bytes("dropped"), bytes("3"))
            try dropped.delete(db, bytes("parent"))
            dropped.abort()
            #expect(try txn.get(db, bytes("parent")) == bytes("1"))
        }
        try env.read { txn throws in
            #expect(try txn.entries(db).map(\.key) == [bytes("kept"), bytes("parent")])
        }
    }

    /// mdb_txn_abort of a parent frees its active child too: the child is
    /// ended with it, and its own abort (or deinit) later does nothing,
    /// instead of aborting freed memory. Also when the body of a write
    /// throws with a child open.
    @Test func abortingAParentEndsItsChild() throws {
        struct Thrown: Error {}
        let dir = TemporaryDirectory()
        let env = try open(dir)
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        var escaped: WriteTransaction?
        #expect(throws: Thrown.self) {
            try env.write { txn throws in
                let child = try txn.beginChild()
                try child.put(db, bytes("k"), bytes("v"))
                escaped = child
                throw Thrown()
            }
        }
        #expect(escaped?.isActive == false)
        escaped?.abort()
        escaped = nil
        try env.read { txn throws in #expect(try txn.entries(db).isEmpty) }
        try env.write { txn throws in try txn.put(db, bytes("after"), bytes("1")) }
        try env.read { txn throws in #expect(try txn.entries(db).map(\.key) == [bytes("after")]) }
    }

    @Test func readTransactionOnAnotherThread() throws {
        // MDB_NOTLS: a read transaction begun here may be used and ended elsewhere.
        let dir = TemporaryDirectory()
        let env = try open(dir)
        let db = try env.write { txn throws in
            let db = try txn.openDatabase("t", create: true)
            try txn.put(db, bytes("k"), bytes("v"))
            return db
        }
        nonisolated(unsafe) let txn = try env.beginRead()
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var value: [UInt8]?
        Thread {
            value = try? txn.get(db, [UInt8]("k".utf8))
            txn.abort()
            done.signal()
        }.start()
        done.wait()
        #expect(value == bytes("v"))
    }

    @Test func mapFullIsDistinguishableAndGrowthHelps() throws {
        let dir = TemporaryDirectory()
        let env = try open(dir, mapSize: 64 << 10)
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        let big = [UInt8](repeating: 1, count: 200 << 10)
        do {
            try env.write { txn throws in try txn.put(db, bytes("big"), big) }
            Issue.record("200 KiB fit in a 64 KiB map")
        } catch let e as LMDBError {
            #expect(e.isMapFull)
            #expect(!e.isNoSpace)
            #expect(e.message.contains("MDB_MAP_FULL"))
        }
        try env.setMapSize(1 << 20)
        #expect(env.mapSize == 1 << 20)
        try env.write { txn throws in try txn.put(db, bytes("big"), big) }
        try env.read { txn throws in #expect(try txn.get(db, bytes("big")) == big) }
        #expect(LMDBError(code: ENOSPC, operation: "x").isNoSpace)
    }

    @Test func parentSurvivesMapFullInChild() throws {
        // The spool relies on this: at the map size limit, a submission that
        // does not fit fails in its nested transaction and the others commit.
        let dir = TemporaryDirectory()
        let env = try open(dir, mapSize: 128 << 10)
        let db = try env.write { txn throws in try txn.openDatabase("t", create: true) }
        try env.write { txn throws in
            try txn.put(db, bytes("before"), [UInt8](repeating: 2, count: 1000))
            let child = try txn.beginChild()
            do {
                try child.put(db, bytes("huge"), [UInt8](repeating: 1, count: 1 << 20))
                Issue.record("1 MiB fit in a 128 KiB map")
            } catch let e as LMDBError {
                #expect(e.isMapFull)
            }
            child.abort()
            try txn.put(db, bytes("after"), [UInt8](repeating: 3, count: 1000))
        }
        try env.read { txn throws in
            #expect(try txn.entries(db).map(\.key) == [bytes("after"), bytes("before")])
        }
    }

    @Test func closedEnvironmentRefusesTransactions() throws {
        let dir = TemporaryDirectory()
        let env = try open(dir)
        env.close()
        #expect(env.isClosed)
        #expect(throws: LMDBError.self) { try env.beginRead() }
        #expect(Environment.version.hasPrefix("LMDB 0.9"))
    }
}
