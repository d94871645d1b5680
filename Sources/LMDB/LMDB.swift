// LMDB: the one Swift wrapper around liblmdb (CLMDB).
//
// Ownership of the C handles lives in classes: an `Environment` closes its
// MDB_env when the last reference goes; a `Transaction` aborts itself on
// deinit unless it was committed or aborted explicitly, so an error path
// can never leak a write lock or a reader slot.
//
// Threading (see lmdb.h): environments are opened with MDB_NOTLS, so a
// read-only transaction is not tied to the thread that began it and may be
// used from any thread (one thread at a time). A write transaction must be
// begun, used and ended on one thread: LMDB's writer lock is a mutex owned
// by the thread that took it. The types are not Sendable for that reason.

import CLMDB
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - Errors

/// An error from liblmdb (negative MDB_* codes) or the system (errno values,
/// e.g. ENOSPC when the disk is full, EACCES on permissions).
public struct LMDBError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The return code: an MDB_* constant or an errno value.
    public let code: Int32
    /// The liblmdb call that failed, for the log line.
    public let operation: String

    public init(code: Int32, operation: String) {
        self.code = code
        self.operation = operation
    }

    /// mdb_strerror's text (it also covers errno values through strerror).
    public var message: String { String(cString: mdb_strerror(code)) }

    public var description: String { "\(operation): \(message) (\(code))" }

    /// The map (mdb_env_set_mapsize) is too small for the transaction.
    public var isMapFull: Bool { code == MDB_MAP_FULL }
    /// The file system is full.
    public var isNoSpace: Bool { code == ENOSPC }
    /// Key not found (only seen from the raw calls; `get` returns nil).
    public var isNotFound: Bool { code == MDB_NOTFOUND }
    /// MDB_NOOVERWRITE put on an existing key.
    public var isKeyExists: Bool { code == MDB_KEYEXIST }
    /// LMDB gave up on the environment: a meta page it could not write
    /// (MDB_FATAL_ERROR) leaves every later transaction failing so.
    public var isPanic: Bool { code == MDB_PANIC }
    /// The data file is damaged or not an LMDB file.
    public var isCorrupted: Bool { code == MDB_CORRUPTED || code == MDB_INVALID || code == MDB_PAGE_NOTFOUND }

    @inline(__always)
    static func check(_ rc: Int32, _ operation: @autoclosure () -> String) throws(LMDBError) {
        if rc != MDB_SUCCESS { throw LMDBError(code: rc, operation: operation()) }
    }
}

// MARK: - Environment

/// An LMDB environment (a directory holding data.mdb and lock.mdb).
public final class Environment: @unchecked Sendable {
    // @unchecked Sendable: an MDB_env is thread-safe for opening
    // transactions. The only mutable state is the handle, which `close()`
    // clears; the caller guarantees that no transaction is alive then.
    private var envHandle: OpaquePointer?
    public let path: String

    /// The MDB_env, or an error once closed.
    var handle: OpaquePointer {
        get throws(LMDBError) {
            guard let envHandle else { throw LMDBError(code: EINVAL, operation: "environment \(path) is closed") }
            return envHandle
        }
    }

    /// Opens (creating the files when missing) the environment in directory `path`.
    /// - Parameters:
    ///   - mapSize: size of the memory map in bytes, the maximum database size until grown.
    ///   - maxDatabases: number of named databases the environment may hold.
    ///   - maxReaders: reader table size (concurrent read transactions).
    ///   - flags: extra MDB_* environment flags; MDB_NOTLS is always added.
    ///   - mode: file mode of data.mdb and lock.mdb when created.
    public init(path: String, mapSize: Int, maxDatabases: UInt32, maxReaders: UInt32 = 126,
                flags: Int32 = 0, mode: mode_t = 0o600) throws(LMDBError) {
        var env: OpaquePointer?
        try LMDBError.check(mdb_env_create(&env), "mdb_env_create")
        guard let env else { throw LMDBError(code: ENOMEM, operation: "mdb_env_create") }
        do {
            try LMDBError.check(mdb_env_set_mapsize(env, mapSize), "mdb_env_set_mapsize")
            try LMDBError.check(mdb_env_set_maxdbs(env, MDB_dbi(maxDatabases)), "mdb_env_set_maxdbs")
            try LMDBError.check(mdb_env_set_maxreaders(env, maxReaders), "mdb_env_set_maxreaders")
            try LMDBError.check(mdb_env_open(env, path, UInt32(bitPattern: flags | MDB_NOTLS), mode),
                                "mdb_env_open \(path)")
        } catch {
            mdb_env_close(env)
            throw error
        }
        self.envHandle = env
        self.path = path
    }

    deinit {
        if let envHandle { mdb_env_close(envHandle) }
    }

    /// Closes the environment now (otherwise it closes when released).
    /// No transaction may be alive: LMDB frees the reader table and the
    /// map. Needed before the same files are opened again in this process,
    /// because LMDB's file locks are per process.
    public func close() {
        if let envHandle { mdb_env_close(envHandle) }
        envHandle = nil
    }

    public var isClosed: Bool { envHandle == nil }

    /// The current size of the memory map (may exceed the size asked for at
    /// open time when the data file was already larger).
    public var mapSize: Int {
        guard let envHandle else { return 0 }
        var info = MDB_envinfo()
        mdb_env_info(envHandle, &info)
        return info.me_mapsize
    }

    /// The last page number used, times the page size: how much of the map
    /// holds data.
    public var usedSize: Int {
        guard let envHandle else { return 0 }
        var info = MDB_envinfo()
        var stat = MDB_stat()
        mdb_env_info(envHandle, &info)
        mdb_env_stat(envHandle, &stat)
        return (info.me_last_pgno + 1) * Int(stat.ms_psize)
    }

    /// The size of data.mdb in bytes (LMDB grows it as pages are written
    /// past its end; it never shrinks).
    public var dataFileSize: Int {
        get throws(LMDBError) {
            let fd = try dataFileDescriptor
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw LMDBError(code: errno, operation: "fstat \(path)/data.mdb") }
            return Int(st.st_size)
        }
    }

    /// Writes zeros from the end of data.mdb up to `size` (no further than
    /// the map) and syncs them. Why: a commit that writes pages past the end
    /// of the file changes its size, and the fdatasync of every such commit
    /// then also commits the file system's journal (ext4: a third more time
    /// per sync, measured); pages written into zeros already on disk are
    /// overwrites, whose sync flushes data only. Call it only between write
    /// transactions (LMDB writes past the end only inside a commit); readers
    /// never look beyond the last page in use. On failure (a full disk) the
    /// file is cut back to its old size, so the zeros take no space.
    /// Once synced, the zeros leave the page cache (POSIX_FADV_DONTNEED):
    /// written in 1 MiB pieces they sit in large folios (ext4 since Linux
    /// 6.16), and LMDB's first 4 KiB page in one dirtied the whole folio,
    /// which the commit's sync then wrote out: 117 KB per 1 KiB message
    /// under load instead of 22 KB (bench figures in the commit message).
    /// Pages LMDB writes into uncached zeros get folios of their own size.
    public func extendDataFile(to size: Int) throws(LMDBError) {
        let fd = try dataFileDescriptor
        let target = min(size, mapSize)
        let original = try dataFileSize
        var offset = original
        guard offset < target else { return }
        let operation = "extending \(path)/data.mdb to \(target) bytes"
        let failure: Int32 = Self.zeros.withUnsafeBytes { zeros in
            while offset < target {
                let n = pwrite(fd, zeros.baseAddress, min(zeros.count, target - offset), off_t(offset))
                if n < 0 {
                    if errno == EINTR { continue }
                    return errno
                }
                offset += n
            }
            return 0
        }
        if failure == 0, fdatasync(fd) == 0 {
            // Advice only: a page still mapped or dirty simply stays.
            _ = posix_fadvise(fd, off_t(original), off_t(target - original), POSIX_FADV_DONTNEED)
            return
        }
        let code = failure != 0 ? failure : errno
        _ = ftruncate(fd, off_t(original))
        throw LMDBError(code: code, operation: operation)
    }

    private static let zeros = [UInt8](repeating: 0, count: 1 << 20)

    /// LMDB's own descriptor of data.mdb (it stays LMDB's: never closed here).
    private var dataFileDescriptor: Int32 {
        get throws(LMDBError) {
            var fd: Int32 = -1
            try LMDBError.check(mdb_env_get_fd(try handle, &fd), "mdb_env_get_fd")
            return fd
        }
    }

    /// Grows (or shrinks) the map. LMDB requires that no transaction is
    /// active in this process while this runs: callers serialize it against
    /// every transaction (the spool uses a reader/writer lock).
    public func setMapSize(_ size: Int) throws(LMDBError) {
        try LMDBError.check(mdb_env_set_mapsize(try handle, size), "mdb_env_set_mapsize")
    }

    /// Flushes the data to disk (only needed with MDB_NOSYNC / MDB_NOMETASYNC).
    public func sync(force: Bool = true) throws(LMDBError) {
        try LMDBError.check(mdb_env_sync(try handle, force ? 1 : 0), "mdb_env_sync")
    }

    /// Begins a read-only transaction (usable from any thread thanks to MDB_NOTLS).
    public func beginRead() throws(LMDBError) -> ReadTransaction {
        try ReadTransaction(environment: self)
    }

    /// Begins a write transaction; LMDB allows one at a time per environment
    /// (the call blocks until the writer lock is free).
    public func beginWrite() throws(LMDBError) -> WriteTransaction {
        try WriteTransaction(environment: self, parent: nil)
    }

    /// Runs `body` in a read transaction, ended (aborted: reads need no commit) afterwards.
    public func read<T, E: Error>(_ body: (ReadTransaction) throws(E) -> T) throws -> T {
        let txn = try beginRead()
        defer { txn.abort() }
        return try body(txn)
    }

    /// Runs `body` in a write transaction and commits it when `body` returns;
    /// aborts when it throws.
    public func write<T, E: Error>(_ body: (WriteTransaction) throws(E) -> T) throws -> T {
        let txn = try beginWrite()
        do {
            let result = try body(txn)
            try txn.commit()
            return result
        } catch {
            txn.abort()
            throw error
        }
    }

    /// `mdb_version`: "LMDB 0.9.24: (July 24, 2019)".
    public static var version: String { String(cString: mdb_version(nil, nil, nil)) }
}

// MARK: - Databases

/// A named (or the main, unnamed) database inside an environment. The handle
/// stays valid for the environment's lifetime once the transaction that
/// opened it committed.
public struct Database: Hashable, Sendable {
    public let dbi: MDB_dbi
    public let name: String?
}

// MARK: - Transactions

/// The operations common to read and write transactions.
public class Transaction {
    fileprivate var handle: OpaquePointer?
    /// Keeps the environment open as long as the transaction lives.
    public let environment: Environment
    /// Set while a child transaction is active: the parent must not be used then.
    fileprivate var hasChild = false

    fileprivate init(environment: Environment, parent: Transaction?, flags: UInt32) throws(LMDBError) {
        self.environment = environment
        var txn: OpaquePointer?
        let env = try environment.handle
        try LMDBError.check(mdb_txn_begin(env, parent?.handle, flags, &txn),
                            "mdb_txn_begin")
        self.handle = txn
    }

    deinit {
        // Ending without commit means abort (and releases the reader slot or writer lock).
        if let handle { mdb_txn_abort(handle) }
    }

    /// Whether the transaction is still open (not committed or aborted).
    public var isActive: Bool { handle != nil }

    fileprivate func live(_ operation: String) throws(LMDBError) -> OpaquePointer {
        guard let handle, !hasChild else { throw LMDBError(code: EINVAL, operation: operation + " (transaction ended or has an active child)") }
        return handle
    }

    /// Ends the transaction without committing. Safe to call more than once.
    public func abort() {
        if let handle {
            mdb_txn_abort(handle)
            self.handle = nil
        }
    }

    /// Opens an existing database (or the main one with `name == nil`).
    /// LMDB's rule: a handle opened in a transaction becomes valid for the
    /// whole environment only if that transaction commits; open handles in a
    /// write transaction at start-up.
    public func openDatabase(_ name: String?) throws(LMDBError) -> Database {
        let txn = try live("mdb_dbi_open")
        var dbi: MDB_dbi = 0
        try LMDBError.check(mdb_dbi_open(txn, name, 0, &dbi), "mdb_dbi_open \(name ?? "(main)")")
        return Database(dbi: dbi, name: name)
    }

    /// Copies the value stored under `key`, or nil when the key is absent.
    public func get(_ db: Database, _ key: some ContiguousBytes) throws(LMDBError) -> [UInt8]? {
        try rawGet(db, key).map { Array($0) }
    }

    /// Calls `body` with the value stored under `key` (nil when absent) without
    /// copying: the buffer points into the map and is valid only inside `body`.
    public func withValue<T>(_ db: Database, _ key: some ContiguousBytes,
                             _ body: (UnsafeRawBufferPointer?) throws -> T) throws -> T {
        try body(try rawGet(db, key))
    }

    private func rawGet(_ db: Database, _ key: some ContiguousBytes) throws(LMDBError) -> UnsafeRawBufferPointer? {
        let txn = try live("mdb_get")
        var data = MDB_val()
        let rc: Int32 = key.withUnsafeBytes { keyBytes in
            var k = MDB_val(mv_size: keyBytes.count, mv_data: UnsafeMutableRawPointer(mutating: keyBytes.baseAddress))
            return mdb_get(txn, db.dbi, &k, &data)
        }
        if rc == MDB_NOTFOUND { return nil }
        try LMDBError.check(rc, "mdb_get \(db.name ?? "(main)")")
        return UnsafeRawBufferPointer(start: data.mv_data, count: data.mv_size)
    }

    /// Number of entries in `db`.
    public func count(_ db: Database) throws(LMDBError) -> Int {
        let txn = try live("mdb_stat")
        var stat = MDB_stat()
        try LMDBError.check(mdb_stat(txn, db.dbi, &stat), "mdb_stat")
        return stat.ms_entries
    }

    /// Runs `body` with a cursor on `db`; the cursor is closed when `body`
    /// returns and unusable afterwards (LMDB frees cursors with their
    /// transaction, so they must not outlive it).
    public func withCursor<T>(_ db: Database, _ body: (Cursor) throws -> T) throws -> T {
        let txn = try live("mdb_cursor_open")
        var cursor: OpaquePointer?
        try LMDBError.check(mdb_cursor_open(txn, db.dbi, &cursor), "mdb_cursor_open")
        let c = Cursor(handle: cursor!, transaction: self)
        defer { c.close() }
        return try body(c)
    }

    /// Visits the entries of `db` with `lower <= key < upper` in key order
    /// (nil bounds are open); `body` returns false to stop early. The
    /// buffers point into the map and are valid only during the call.
    public func forEach(_ db: Database, from lower: [UInt8]? = nil, to upper: [UInt8]? = nil,
                        _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
        try withCursor(db) { cursor in
            var entry = try lower.map { try cursor.seekRaw(atLeast: $0) } ?? cursor.firstRaw()
            while case let (k, v)? = entry {
                if let upper, compareBytes(k, upper) >= 0 { break }
                if try !body(k, v) { break }
                entry = try cursor.nextRaw()
            }
        }
    }

    /// Every (key, value) of `db` with `lower <= key < upper`, copied.
    public func entries(_ db: Database, from lower: [UInt8]? = nil, to upper: [UInt8]? = nil) throws -> [(key: [UInt8], value: [UInt8])] {
        var result: [(key: [UInt8], value: [UInt8])] = []
        try forEach(db, from: lower, to: upper) { k, v in
            result.append((Array(k), Array(v)))
            return true
        }
        return result
    }
}

/// Lexicographic byte comparison, LMDB's default key order.
func compareBytes(_ a: UnsafeRawBufferPointer, _ b: [UInt8]) -> Int {
    let n = min(a.count, b.count)
    for i in 0..<n where a[i] != b[i] {
        return a[i] < b[i] ? -1 : 1
    }
    return a.count == b.count ? 0 : (a.count < b.count ? -1 : 1)
}

/// A read-only transaction: a consistent snapshot of the environment.
public final class ReadTransaction: Transaction {
    fileprivate init(environment: Environment) throws(LMDBError) {
        try super.init(environment: environment, parent: nil, flags: UInt32(MDB_RDONLY))
    }
}

/// A read-write transaction. Changes become visible and durable with
/// `commit()` (synced to disk unless the environment was opened with
/// MDB_NOSYNC); anything else discards them.
public final class WriteTransaction: Transaction {
    private let parent: WriteTransaction?
    /// The active nested transaction: mdb_txn_abort of this one frees it
    /// too, so this one's abort ends it first (its handle must not be
    /// aborted again later, by it or its deinit).
    private weak var child: WriteTransaction?

    fileprivate init(environment: Environment, parent: WriteTransaction?) throws(LMDBError) {
        self.parent = parent
        if let parent, parent.handle == nil || parent.hasChild {
            throw LMDBError(code: EINVAL, operation: "mdb_txn_begin (parent ended or busy)")
        }
        try super.init(environment: environment, parent: parent, flags: 0)
        parent?.hasChild = true
        parent?.child = self
    }

    deinit {
        // Transaction.deinit aborts the handle; the parent becomes usable again.
        parent?.hasChild = false
    }

    /// Begins a nested transaction: its changes join this transaction when
    /// it commits and vanish when it aborts, leaving this one intact. While
    /// the child is active this transaction must not be used.
    public func beginChild() throws(LMDBError) -> WriteTransaction {
        try WriteTransaction(environment: environment, parent: self)
    }

    public override func abort() {
        child?.abort()
        super.abort()
        parent?.hasChild = false
    }

    /// Commits (for the outermost transaction: writes and syncs the data).
    /// On failure the transaction is aborted (LMDB frees it either way).
    public func commit() throws(LMDBError) {
        let txn = try live("mdb_txn_commit")
        handle = nil
        parent?.hasChild = false
        try LMDBError.check(mdb_txn_commit(txn), "mdb_txn_commit")
    }

    /// Opens `name` (nil: the main database), creating it when `create` is set.
    public func openDatabase(_ name: String?, create: Bool) throws(LMDBError) -> Database {
        let txn = try live("mdb_dbi_open")
        var dbi: MDB_dbi = 0
        try LMDBError.check(mdb_dbi_open(txn, name, create ? UInt32(MDB_CREATE) : 0, &dbi),
                            "mdb_dbi_open \(name ?? "(main)")")
        return Database(dbi: dbi, name: name)
    }

    /// Stores `value` under `key`, replacing any previous value.
    public func put(_ db: Database, _ key: some ContiguousBytes, _ value: some ContiguousBytes) throws(LMDBError) {
        let rc = try putRaw(db, key, value, flags: 0)
        try LMDBError.check(rc, "mdb_put \(db.name ?? "(main)")")
    }

    /// Stores `value` under `key` only when the key is absent; returns false
    /// (and changes nothing) when it exists (MDB_NOOVERWRITE).
    @discardableResult
    public func insert(_ db: Database, _ key: some ContiguousBytes, _ value: some ContiguousBytes) throws(LMDBError) -> Bool {
        let rc = try putRaw(db, key, value, flags: UInt32(MDB_NOOVERWRITE))
        if rc == MDB_KEYEXIST { return false }
        try LMDBError.check(rc, "mdb_put \(db.name ?? "(main)")")
        return true
    }

    private func putRaw(_ db: Database, _ key: some ContiguousBytes, _ value: some ContiguousBytes, flags: UInt32) throws(LMDBError) -> Int32 {
        let txn = try live("mdb_put")
        return key.withUnsafeBytes { keyBytes in
            value.withUnsafeBytes { valueBytes in
                var k = MDB_val(mv_size: keyBytes.count, mv_data: UnsafeMutableRawPointer(mutating: keyBytes.baseAddress))
                var v = MDB_val(mv_size: valueBytes.count, mv_data: UnsafeMutableRawPointer(mutating: valueBytes.baseAddress))
                return mdb_put(txn, db.dbi, &k, &v, flags)
            }
        }
    }

    /// Deletes `key`; returns false when it was absent.
    @discardableResult
    public func delete(_ db: Database, _ key: some ContiguousBytes) throws(LMDBError) -> Bool {
        let txn = try live("mdb_del")
        let rc: Int32 = key.withUnsafeBytes { keyBytes in
            var k = MDB_val(mv_size: keyBytes.count, mv_data: UnsafeMutableRawPointer(mutating: keyBytes.baseAddress))
            return mdb_del(txn, db.dbi, &k, nil)
        }
        if rc == MDB_NOTFOUND { return false }
        try LMDBError.check(rc, "mdb_del \(db.name ?? "(main)")")
        return true
    }

    /// Deletes every key with `lower <= key < upper`; returns how many.
    @discardableResult
    public func deleteRange(_ db: Database, from lower: [UInt8], to upper: [UInt8]) throws -> Int {
        try withCursor(db) { cursor in
            var deleted = 0
            var entry = try cursor.seekRaw(atLeast: lower)
            while case let (k, _)? = entry, compareBytes(k, upper) < 0 {
                try cursor.deleteCurrent()
                deleted += 1
                // Seek again rather than rely on where mdb_cursor_del leaves
                // the cursor at a page boundary: O(log n) and unambiguous.
                entry = try cursor.seekRaw(atLeast: lower)
            }
            return deleted
        }
    }

    /// Removes every entry of `db` (the database itself stays).
    public func clear(_ db: Database) throws(LMDBError) {
        let txn = try live("mdb_drop")
        try LMDBError.check(mdb_drop(txn, db.dbi, 0), "mdb_drop")
    }
}

// MARK: - Cursors

/// A cursor over one database; only valid inside `Transaction.withCursor`.
public final class Cursor {
    private var handle: OpaquePointer?
    private unowned let transaction: Transaction

    fileprivate init(handle: OpaquePointer, transaction: Transaction) {
        self.handle = handle
        self.transaction = transaction
    }

    fileprivate func close() {
        // Closing is legal while the transaction lives; withCursor guarantees it.
        if let handle { mdb_cursor_close(handle) }
        handle = nil
    }

    private func move(_ op: MDB_cursor_op, key: [UInt8]? = nil) throws(LMDBError) -> (UnsafeRawBufferPointer, UnsafeRawBufferPointer)? {
        guard let handle, transaction.isActive else { throw LMDBError(code: EINVAL, operation: "mdb_cursor_get (cursor closed)") }
        var k = MDB_val()
        var v = MDB_val()
        let rc: Int32
        if let key {
            rc = key.withUnsafeBytes { bytes in
                k = MDB_val(mv_size: bytes.count, mv_data: UnsafeMutableRawPointer(mutating: bytes.baseAddress))
                return mdb_cursor_get(handle, &k, &v, op)
            }
        } else {
            rc = mdb_cursor_get(handle, &k, &v, op)
        }
        // MDB_GET_CURRENT after deleting the last entry reports EINVAL in 0.9.x.
        if rc == MDB_NOTFOUND || (op == MDB_GET_CURRENT && rc == EINVAL) { return nil }
        try LMDBError.check(rc, "mdb_cursor_get")
        return (UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size),
                UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
    }

    func firstRaw() throws(LMDBError) -> (UnsafeRawBufferPointer, UnsafeRawBufferPointer)? { try move(MDB_FIRST) }
    func nextRaw() throws(LMDBError) -> (UnsafeRawBufferPointer, UnsafeRawBufferPointer)? { try move(MDB_NEXT) }
    func currentRaw() throws(LMDBError) -> (UnsafeRawBufferPointer, UnsafeRawBufferPointer)? { try move(MDB_GET_CURRENT) }
    func seekRaw(atLeast key: [UInt8]) throws(LMDBError) -> (UnsafeRawBufferPointer, UnsafeRawBufferPointer)? {
        // MDB_SET_RANGE with an empty key is rejected by LMDB; it means "first".
        key.isEmpty ? try move(MDB_FIRST) : try move(MDB_SET_RANGE, key: key)
    }

    private func copy(_ e: (UnsafeRawBufferPointer, UnsafeRawBufferPointer)?) -> (key: [UInt8], value: [UInt8])? {
        e.map { (Array($0.0), Array($0.1)) }
    }

    /// The first entry, copied.
    public func first() throws(LMDBError) -> (key: [UInt8], value: [UInt8])? { copy(try move(MDB_FIRST)) }
    /// The last entry, copied.
    public func last() throws(LMDBError) -> (key: [UInt8], value: [UInt8])? { copy(try move(MDB_LAST)) }
    /// The entry after the current one.
    public func next() throws(LMDBError) -> (key: [UInt8], value: [UInt8])? { copy(try move(MDB_NEXT)) }
    /// The entry before the current one.
    public func previous() throws(LMDBError) -> (key: [UInt8], value: [UInt8])? { copy(try move(MDB_PREV)) }
    /// The first entry whose key is >= `key`.
    public func seek(atLeast key: [UInt8]) throws(LMDBError) -> (key: [UInt8], value: [UInt8])? { copy(try seekRaw(atLeast: key)) }

    /// Deletes the entry under the cursor (write transactions only).
    public func deleteCurrent() throws(LMDBError) {
        guard let handle, transaction.isActive else { throw LMDBError(code: EINVAL, operation: "mdb_cursor_del (cursor closed)") }
        try LMDBError.check(mdb_cursor_del(handle, 0), "mdb_cursor_del")
    }
}

// MARK: - Byte containers accepted as keys and values

/// Anything that can lend its bytes contiguously: [UInt8], ArraySlice, and
/// String's UTF-8 through `Array(s.utf8)`.
public protocol ContiguousBytes {
    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R
}
extension Array: ContiguousBytes where Element == UInt8 {}
extension ArraySlice: ContiguousBytes where Element == UInt8 {}
extension ContiguousArray: ContiguousBytes where Element == UInt8 {}
extension UnsafeRawBufferPointer: ContiguousBytes {
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R { try body(self) }
}
