// Spool: the queue's durable store. One LMDB environment in the spool
// directory, owned by the queue process alone, with these named databases:
//
//   envelopes  QueueID (12 ASCII hex digits) -> EnvelopeRecord (Records.swift)
//   keys       QueueID -> KeyRecord: the per-message key wrapped with
//              crypto_secretbox under the master key, the secretstream
//              header, the chunk count and the plaintext size
//   bodies     QueueID + chunk number (u32 big-endian) -> one secretstream
//              chunk: 64 KiB of plaintext + 17 bytes; the last chunk (possibly
//              empty) carries TAG_FINAL
//   meta       "format" -> u32 format version; "key-check" -> a secretbox of
//              a constant under the master key (detects a key that does not
//              belong to this spool); "commits", "operations", "messages" ->
//              u64 running totals since the spool was created;
//              "highest-id" -> u64, the highest queue ID ever committed
//              (so IDs are not reused after its message is gone)
//   schedule, security, sts-cache, tlsrpt, receipts: reserved for later stages
//
// Writes go through one committer thread (group commit): `submit` queues a
// list of operations; the thread takes every submission waiting, applies
// them all in one write transaction, commits once with a full sync, then
// calls the completions. Should one fail, the batch is applied again with
// a nested transaction per submission, so that it fails alone. Under load
// from many submitters (inject connections, named in `submit`), a batch
// first waits up to `commitDelay` (3 ms by default, [queue] commit_delay)
// for 60% of those active in the last 50 ms to join it, as PostgreSQL's
// commit_delay waits for commit_siblings: more messages per commit for a
// wait no client notices; a lone submitter, or two taking turns, never
// waits. A submission marked `.deferred` (the removal of a delivered
// message) does not start a commit of its own at once: it waits, up to
// `deferral` (0.5 s by default), for the next commit that happens anyway
// and rides along (see SpoolUrgency). Semantics:
//   - a submission is atomic: all its operations are applied or none;
//   - a submission that fails validation (insert of an existing queue ID,
//     update or delete of a missing one) fails alone, with its own error;
//     the other submissions of the batch are committed;
//   - MDB_MAP_FULL: the batch is abandoned, the map doubled (up to
//     mapSizeLimit) and the batch retried. At the limit the submissions
//     that do not fit fail with `.full`, the others are committed. A disk
//     full at commit (ENOSPC, EDQUOT, or EIO from a short write while the
//     file system has no room left) fails the whole batch with `.full`.
//     In every case what was committed before stays as it was.
//
// Reads (envelopes, bodies) use short read transactions from any thread.
// LMDB allows changing the map size only while no transaction is active in
// the process, so every read transaction holds a reader/writer lock shared
// and the resize holds it exclusively.

import Foundation
import LMDB
import Sodium

// MARK: - Public API

public struct SpoolOptions: Sendable {
    /// Initial LMDB map size in bytes.
    public var mapSize: Int
    /// The map grows (doubling) on demand up to this size.
    public var mapSizeLimit: Int
    /// Longest wait of a `.deferred` submission for a commit to ride on.
    public var deferral: Double
    /// Longest wait of an urgent batch for the other submitters active
    /// lately (group commit under load, see `submit`); 0: none.
    public var commitDelay: Double
    /// How long after its last urgent submission a submitter counts as
    /// active (tests lengthen it, so that what waits does not depend on
    /// the machine's speed).
    var siblingWindow = 0.05
    /// Called once, from the thread that found it, when LMDB can no longer
    /// use the environment (EnvironmentHealth): every later transaction
    /// fails (or, after a failed resize, would crash), so the queue exits
    /// and starts again from the last commit on disk. Nil: the spool only
    /// fails every call from then on.
    public var environmentFailed: (@Sendable (String) -> Void)?

    public init(mapSize: Int = 256 << 20, mapSizeLimit: Int = 16 << 30, deferral: Double = 0.5,
                commitDelay: Double = 0.003) {
        self.mapSize = mapSize
        self.mapSizeLimit = mapSizeLimit
        self.deferral = deferral
        self.commitDelay = commitDelay
    }
}

/// When a submission must be committed. Every commit is synced, whatever
/// it holds: urgency only decides whether a submission starts one.
public enum SpoolUrgency: Sendable {
    /// Commit as soon as possible (the next batch): anything a reply waits
    /// for, first of all a message being accepted (the 250 follows the sync).
    case now
    /// May wait up to the spool's deferral for a commit started by another
    /// submission, then is committed (synced) anyway. For changes whose
    /// loss in a crash before that commit is harmless but duplicates: the
    /// removal of a delivered message (a crash in that window delivers it
    /// again, as a crash between delivery and removal always could). It
    /// halves the commits (fsyncs) per message under load: removals share
    /// the commits of the acceptances. Postfix, for comparison, removes a
    /// delivered queue file with a plain unlink(2) that nothing syncs.
    case deferred
}

public enum SpoolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The map reached its limit or the disk is full: refuse new mail (452 4.3.1).
    case full
    /// A system or LMDB failure (451 4.3.0).
    case io(String)
    /// Stored data that cannot be decoded or decrypted.
    case corrupt(String)
    /// The queue ID is not in the spool.
    case noSuchMessage

    public var description: String {
        switch self {
        case .full: return "spool full (map size limit or disk full)"
        case .io(let m): return "spool I/O error: \(m)"
        case .corrupt(let m): return "spool data corrupt: \(m)"
        case .noSuchMessage: return "no such message in the spool"
        }
    }

    /// Enhanced status code (RFC 3463) when this reaches an SMTP reply.
    public var enhancedStatus: String {
        switch self {
        case .full: return "4.3.1"
        case .io, .corrupt, .noSuchMessage: return "4.3.0"
        }
    }

    /// The SMTP reply code.
    public var replyCode: Int { self == .full ? 452 : 451 }
}

public struct SpoolStatistics: Sendable, Equatable {
    /// Write transactions committed by this process.
    public var commits: UInt64 = 0
    /// Operations committed (each insert/update/delete counts one).
    public var operations: UInt64 = 0
    /// Messages inserted.
    public var messagesInserted: UInt64 = 0
    /// Current size of the LMDB map in bytes.
    public var mapSize: Int = 0
    /// Submissions completed successfully / with an error.
    public var submissions: UInt64 = 0
    public var failedSubmissions: UInt64 = 0
    /// Times the map was grown.
    public var mapGrowths: UInt64 = 0
    /// Times zeros were written ahead at the end of data.mdb.
    public var fileExtensions: UInt64 = 0
    /// Commits that waited for the submitters active lately (commitDelay).
    public var delayedCommits: UInt64 = 0
    /// Batches applied a second time, with a nested transaction per
    /// submission, because one of their submissions failed.
    public var isolatedBatches: UInt64 = 0
}

/// What one submission may do. Insert stores an envelope and its encrypted
/// body; update replaces an envelope (the body stays); delete removes the
/// envelope, the key and every body chunk.
public enum SpoolOperation: Sendable {
    case insert(EnvelopeRecord, SealedBody)
    case update(EnvelopeRecord)
    case delete(QueueID)
}

/// An encrypted body ready to be inserted: the wrapped per-message key,
/// the secretstream header and the ciphertext chunks. Holds no plaintext.
public struct SealedBody: Sendable {
    let wrappedKey: [UInt8]
    let header: [UInt8]
    let chunks: [[UInt8]]
    /// Plaintext size in bytes.
    public let size: UInt64
}

/// Plaintext bytes per body chunk.
let bodyChunkSize = 64 * 1024

/// Encrypts a body as it arrives: every 64 KiB of plaintext becomes one
/// secretstream chunk at once, so memory holds at most one chunk of
/// plaintext (zeroed after use) and ciphertext. Not thread-safe.
public final class BodyWriter {
    private let stream: SecretStreamPush
    private let wrappedKey: [UInt8]
    private let buffer: UnsafeMutableRawBufferPointer
    private var buffered = 0
    private var chunks: [[UInt8]] = []
    private var finished = false
    /// Plaintext bytes appended so far.
    public private(set) var size = 0

    init(masterKey: SecretKey) {
        let key = SecretKey()   // zeroed when released at the end of init
        stream = SecretStreamPush(key: key)
        wrappedKey = SecretBox.seal(key: key, under: masterKey)
        // Not filled with zeros first: only the bytes written are ever read,
        // and plaintext lies only in buffer[0..<buffered] (sealBuffer zeroes
        // what it sealed). Zeroing all 64 KiB here and again at the end
        // was a fifth of the queue's instructions per small message.
        buffer = .allocate(byteCount: bodyChunkSize, alignment: 16)
    }

    deinit {
        Self.zero(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<buffered]))
        buffer.deallocate()
    }

    /// sodium_memzero: a plain store before deallocation may be optimized away.
    private static func zero(_ b: UnsafeMutableRawBufferPointer) {
        Sodium.memzero(b)
    }

    public func append(_ bytes: some Collection<UInt8>) throws {
        guard !finished else { throw SpoolError.io("body writer already finished") }
        let done: Bool? = bytes.withContiguousStorageIfAvailable { storage in
            var remaining = UnsafeRawBufferPointer(storage)
            while !remaining.isEmpty {
                let n = min(bodyChunkSize - buffered, remaining.count)
                UnsafeMutableRawBufferPointer(rebasing: buffer[buffered..<buffered + n])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: remaining[0..<n]))
                buffered += n
                remaining = UnsafeRawBufferPointer(rebasing: remaining[n...])
                if buffered == bodyChunkSize { sealBuffer(final: false) }
            }
            return true
        }
        if done == nil {
            for byte in bytes {
                buffer[buffered] = byte
                buffered += 1
                if buffered == bodyChunkSize { sealBuffer(final: false) }
            }
        }
        size += bytes.count
    }

    private func sealBuffer(final: Bool) {
        // push cannot fail before the final chunk, which is pushed once.
        let chunk = try! stream.push(UnsafeRawBufferPointer(rebasing: buffer[0..<buffered]), final: final)
        chunks.append(chunk)
        Self.zero(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<buffered]))
        buffered = 0
    }

    /// Seals the last chunk (TAG_FINAL, possibly empty) and hands over the
    /// encrypted body. The writer cannot be used afterwards.
    public func finish() throws -> SealedBody {
        guard !finished else { throw SpoolError.io("body writer already finished") }
        sealBuffer(final: true)
        finished = true
        let body = SealedBody(wrappedKey: wrappedKey, header: stream.header, chunks: chunks, size: UInt64(size))
        chunks = []
        return body
    }
}

public final class Spool: @unchecked Sendable {
    // @unchecked Sendable: mutable state is guarded by `idLock` (queue IDs),
    // `readLock` (environment lifetime vs. transactions) and the committer's
    // own condition; the rest is immutable after init.

    public let directory: String
    private let options: SpoolOptions
    private let environment: Environment
    private let masterKey: SecretKey
    private let databases: SpoolDatabases
    private let readLock: ReadWriteLock
    private let health: EnvironmentHealth
    private let committer: Committer
    private let idLock = NSLock()
    private var lastID: UInt64 = 0
    private var closed = false   // guarded by readLock (exclusive to write)
    private let lockDescriptor: Int32

    /// Names of the databases in the environment (the last ones reserved).
    public static let databaseNames = ["envelopes", "bodies", "keys", "meta",
                                       "schedule", "security", "sts-cache", "tlsrpt", "receipts"]
    /// On-disk format version stored in `meta`.
    public static let formatVersion: UInt32 = 1

    /// Opens (creates) the LMDB environment in `directory` and the master key
    /// `directory/spool.key` (created 0600 on first start).
    public init(directory: String, options: SpoolOptions) throws {
        self.directory = directory
        self.options = options
        let parent = directory.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let parentDirectory = parent.isEmpty ? (directory.hasPrefix("/") ? "/" : ".") : parent
        if mkdir(directory, 0o700) == 0 {
            try syncDirectory(parentDirectory)
        } else if errno != EEXIST {
            throw SpoolError.io("\(directory): cannot create: \(errnoText(errno))")
        }
        // One owner: a second queue process (or a second Spool in this
        // process, which LMDB forbids) is refused instead of sharing the
        // environment. flock locks belong to the open file description and
        // vanish with the process.
        lockDescriptor = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard lockDescriptor >= 0 else { throw SpoolError.io("\(directory): cannot open: \(errnoText(errno))") }
        // A lock held a moment longer by a process that is exiting, or by
        // a child between fork and exec (the descriptor is close-on-exec),
        // is waited for, briefly; a live second owner is still refused.
        var lockAttempts = 0
        while flock(lockDescriptor, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK && lockAttempts < 60 {
            lockAttempts += 1
            usleep(50_000)
        }
        guard lockAttempts < 60, flock(lockDescriptor, LOCK_EX | LOCK_NB) == 0 else {
            let e = errno
            closeDescriptor(lockDescriptor)
            throw SpoolError.io(e == EWOULDBLOCK ? "\(directory) is in use by another queue process" : "\(directory): flock: \(errnoText(e))")
        }
        let lockFD = lockDescriptor
        var initialized = false
        defer { if !initialized { closeDescriptor(lockFD) } }
        // A missing key may be created only for a spool without data.
        let dataExists = access(directory + "/data.mdb", F_OK) == 0
        let masterKey = try MasterKey.load(directory: directory, mayCreate: !dataExists)
        self.masterKey = masterKey

        let environment: Environment
        do {
            environment = try Environment(path: directory, mapSize: options.mapSize,
                                          maxDatabases: UInt32(Self.databaseNames.count + 4))
        } catch {
            throw SpoolError.io("\(directory): \(error)")
        }
        self.environment = environment
        let databases: SpoolDatabases
        var lastID: UInt64 = 0
        do {
            databases = try environment.write { txn throws in
                let dbs = try SpoolDatabases(txn)
                try Self.checkMeta(txn, dbs, masterKey: masterKey)
                return dbs
            }
            // IDs continue above the highest one ever committed, so a
            // restart within the same second (or after a clock step back)
            // does not reuse the ID of a message delivered and removed
            // meanwhile: one log search, one message. ("highest-id" is
            // missing in a spool from before it; its envelopes stand in.)
            lastID = try environment.read { txn throws in
                let stored = try Committer.highestID(txn, databases)
                let highestEnvelope = try txn.withCursor(databases.envelopes) { c in
                    try c.last().flatMap { String(validating: $0.key, as: UTF8.self) }.flatMap { QueueID(rawValue: $0) }?.value ?? 0
                }
                return max(stored, highestEnvelope)
            }
        } catch {
            environment.close()
            if let e = error as? SpoolError { throw e }
            if let e = error as? LMDBError, e.isMapFull || e.isNoSpace { throw SpoolError.full }
            throw SpoolError.io("\(directory): \(error)")
        }
        if !dataExists {
            // data.mdb's directory entry (and the spool directory's, which
            // the queue may have made before): the first commit is durable
            // only once they are. LMDB syncs the file, not the directory.
            do {
                try syncDirectory(directory)
                try syncDirectory(parentDirectory)
            } catch {
                environment.close()
                throw error
            }
        }
        self.databases = databases
        self.lastID = lastID
        initialized = true
        readLock = ReadWriteLock()
        health = EnvironmentHealth(report: options.environmentFailed)
        committer = Committer(environment: environment, databases: databases, readLock: readLock, health: health,
                              mapSizeLimit: max(options.mapSizeLimit, options.mapSize),
                              deferral: max(0, options.deferral),
                              commitDelay: max(0, options.commitDelay), siblingWindow: options.siblingWindow,
                              highestID: lastID)
        committer.start()
    }

    deinit {
        close()
    }

    /// Verifies (or, in a new spool, writes) the format version and the key check.
    private static func checkMeta(_ txn: WriteTransaction, _ dbs: SpoolDatabases, masterKey: SecretKey) throws {
        let checkPlain = Array("sealpost spool key check v1".utf8)
        if let format = try txn.get(dbs.meta, Array("format".utf8)) {
            guard format.count == 4 else { throw SpoolError.corrupt("meta format record has \(format.count) bytes") }
            let version = format.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            guard version == formatVersion else {
                throw SpoolError.corrupt("spool format version \(version), this program reads version \(formatVersion)")
            }
            guard let check = try txn.get(dbs.meta, Array("key-check".utf8)) else {
                throw SpoolError.corrupt("meta key-check record missing")
            }
            guard let opened = try? SecretBox.open(check, key: masterKey), opened == checkPlain else {
                throw SpoolError.corrupt("spool.key does not belong to this spool (key check failed)")
            }
        } else {
            guard try txn.count(dbs.envelopes) == 0, try txn.count(dbs.bodies) == 0 else {
                throw SpoolError.corrupt("spool holds messages but no format record")
            }
            try txn.put(dbs.meta, Array("format".utf8), bigEndian(formatVersion))
            try txn.put(dbs.meta, Array("key-check".utf8), SecretBox.seal(checkPlain, key: masterKey))
        }
    }

    /// Stops the committer after the submissions already queued, and closes
    /// the environment. Later calls fail with `.io("spool closed")`.
    public func close() {
        committer.stop()
        readLock.lockExclusive()
        defer { readLock.unlock() }
        if !closed {
            closed = true
            environment.close()
            closeDescriptor(lockDescriptor)   // releases the flock
        }
    }

    // MARK: Queue IDs

    /// A new queue ID: seconds since the epoch (32 bits) and a 16-bit counter,
    /// strictly increasing within the process (a burst of more than 65536 a
    /// second borrows from the next seconds) and across restarts above the
    /// highest ID ever committed (meta "highest-id"). An ID handed out but
    /// never committed (a refused message) may come again after a restart.
    /// Insert refuses an ID that exists, so an ID can never overwrite
    /// another message.
    public func newQueueID() -> QueueID {
        idLock.lock()
        defer { idLock.unlock() }
        let now = UInt64(UInt32(truncatingIfNeeded: time(nil))) << 16
        lastID = max(lastID + 1, now) & ((1 << 48) - 1)
        return QueueID(value: lastID)
    }

    // MARK: Writing

    public func makeBodyWriter() throws -> BodyWriter {
        BodyWriter(masterKey: masterKey)
    }

    /// Group commit: every write goes through one committer thread, which
    /// takes all submissions waiting and commits them in one synced
    /// transaction, then calls each completion (on the committer thread).
    /// A completion must be quick and must not wait for another commit
    /// (e.g. call `submitAndWait`): the committer would wait for itself.
    /// After `close()`, completions are called at once with `.io("spool closed")`.
    ///
    /// `submitter` names who submits (an inject connection): a batch that
    /// many submitters are likely to join soon waits for them, up to
    /// `commitDelay`, so that one commit carries their messages together.
    public func submit(_ operations: [SpoolOperation], urgency: SpoolUrgency = .now, submitter: Int? = nil,
                       completion: @escaping @Sendable (Result<Void, SpoolError>) -> Void) {
        committer.submit(operations, urgency: urgency, submitter: submitter, completion: completion)
    }

    /// `submitter` will submit no more: batches stop waiting for it.
    public func submitterLeft(_ submitter: Int) {
        committer.submitterLeft(submitter)
    }

    /// `submit` for callers that can block (not on the committer thread):
    /// waits for the commit.
    public func submitAndWait(_ operations: [SpoolOperation]) -> Result<Void, SpoolError> {
        let done = DispatchSemaphore(value: 0)
        let box = ResultBox()
        submit(operations) { result in
            box.set(result)
            done.signal()
        }
        done.wait()
        return box.get()
    }

    // MARK: Reading

    /// Runs `body` in a read transaction under the shared side of the lock.
    private func readTransaction<T>(_ body: (ReadTransaction) throws -> T) throws(SpoolError) -> T {
        readLock.lockShared()
        defer { readLock.unlock() }
        guard !closed else { throw .io("spool closed") }
        if let failure = health.failure { throw .io(failure) }
        do {
            return try environment.read { txn throws in try body(txn) }
        } catch let e as SpoolError {
            throw e
        } catch let e as RecordDecodingError {
            throw .corrupt(e.description)
        } catch {
            if let e = error as? LMDBError, e.isPanic { health.fail("a read found the environment unusable: \(e)") }
            throw .io("\(error)")
        }
    }

    public func envelope(_ id: QueueID) throws -> EnvelopeRecord? {
        try readTransaction { txn in
            guard let bytes = try txn.get(databases.envelopes, id.key) else { return nil }
            return try Self.envelope(decoding: bytes, key: id.key[...])
        }
    }

    /// An envelope record, which must name the queue ID it is stored
    /// under: one that names another (a bug, a damaged page) would be
    /// scheduled, delivered and removed as that other message.
    static func envelope(decoding bytes: some Collection<UInt8>, key: some Collection<UInt8>) throws -> EnvelopeRecord {
        let envelope = try EnvelopeRecord(decoding: Array(bytes))
        guard envelope.queueID.key.elementsEqual(key) else {
            throw RecordDecodingError(record: "envelope",
                                      reason: "stored under \(String(decoding: key, as: UTF8.self)) but names \(envelope.queueID.rawValue)")
        }
        return envelope
    }

    /// Every envelope, in queue ID order; throws on the first record that
    /// does not decode.
    public func allEnvelopes() throws -> [EnvelopeRecord] {
        let (envelopes, damaged) = try readableEnvelopes()
        if let first = damaged.first { throw SpoolError.corrupt("envelope \(first.key): \(first.reason)") }
        return envelopes
    }

    /// An envelope record that does not decode: its key (the queue ID, or
    /// the key in hex if it is none) and why.
    public struct DamagedRecord: Sendable, Equatable {
        public var key: String
        public var reason: String
    }

    /// Every envelope that decodes, in queue ID order, and the records that
    /// do not: one damaged record (a disk error, a bug in an old version)
    /// must not keep the queue from starting and every other message from
    /// moving. The damaged ones stay in the spool as they are.
    public func readableEnvelopes() throws -> (envelopes: [EnvelopeRecord], damaged: [DamagedRecord]) {
        try readTransaction { txn in
            var envelopes: [EnvelopeRecord] = []
            var damaged: [DamagedRecord] = []
            try txn.forEach(databases.envelopes) { key, value in
                do {
                    envelopes.append(try Self.envelope(decoding: value, key: key))
                } catch {
                    // A key that is no queue ID is shown in hex.
                    let name = QueueID(rawValue: String(decoding: key, as: UTF8.self))?.rawValue
                        ?? key.map { String(format: "%02x", $0) }.joined()
                    damaged.append(DamagedRecord(key: name, reason: "\(error)"))
                }
                return true
            }
            return (envelopes, damaged)
        }
    }

    /// Decrypts the body chunk by chunk; throws if truncated or tampered (insists on TAG_FINAL).
    /// Each chunk is read in its own short read transaction, so a slow
    /// consumer never pins old pages nor blocks a map resize; a message
    /// deleted meanwhile ends the read with an error.
    public func readBody(_ id: QueueID, _ chunk: ([UInt8]) throws -> Void) throws {
        guard let keyBytes = try readTransaction({ try $0.get(databases.keys, id.key) }) else {
            throw SpoolError.noSuchMessage
        }
        let record: KeyRecord
        do { record = try KeyRecord(decoding: keyBytes) } catch { throw SpoolError.corrupt("\(id): \(error)") }
        let stream: SecretStreamPull
        do {
            let key = try SecretBox.openKey(record.wrappedKey, under: masterKey)
            stream = try SecretStreamPull(key: key, header: record.header)
        } catch {
            throw SpoolError.corrupt("\(id): message key: \(error)")
        }
        var total: UInt64 = 0
        for number in 0..<record.chunkCount {
            guard let ciphertext = try readTransaction({ try $0.get(databases.bodies, chunkKey(id, number)) }) else {
                throw SpoolError.corrupt("\(id): body chunk \(number) of \(record.chunkCount) missing")
            }
            let plaintext: [UInt8], isFinal: Bool
            do {
                (plaintext, isFinal) = try stream.pull(ciphertext)
            } catch {
                throw SpoolError.corrupt("\(id): body chunk \(number): \(error)")
            }
            guard isFinal == (number == record.chunkCount - 1) else {
                throw SpoolError.corrupt("\(id): body chunk \(number): final chunk out of place")
            }
            total += UInt64(plaintext.count)
            if !plaintext.isEmpty { try chunk(plaintext) }
        }
        do { try stream.finish() } catch { throw SpoolError.corrupt("\(id): body: \(error)") }
        guard total == record.size else { throw SpoolError.corrupt("\(id): body has \(total) bytes, key record says \(record.size)") }
        if try readTransaction({ try $0.get(databases.bodies, chunkKey(id, record.chunkCount)) }) != nil {
            throw SpoolError.corrupt("\(id): body chunk after the final one")
        }
    }

    public var statistics: SpoolStatistics {
        var s = committer.statistics
        readLock.lockShared()
        // mdb_env_info reads the meta pages: not after a resize that lost the map.
        s.mapSize = closed || health.failure != nil ? 0 : environment.mapSize
        readLock.unlock()
        return s
    }
}

// MARK: - Internals

/// The database handles, opened (created) once at start-up.
struct SpoolDatabases: Sendable {
    let envelopes, bodies, keys, meta: Database
    let reserved: [Database]

    init(_ txn: WriteTransaction) throws {
        envelopes = try txn.openDatabase("envelopes", create: true)
        bodies = try txn.openDatabase("bodies", create: true)
        keys = try txn.openDatabase("keys", create: true)
        meta = try txn.openDatabase("meta", create: true)
        reserved = try Spool.databaseNames.dropFirst(4).map { try txn.openDatabase($0, create: true) }
    }
}

func bigEndian(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(truncatingIfNeeded: v >> 16), UInt8(truncatingIfNeeded: v >> 8), UInt8(truncatingIfNeeded: v)] }
func bigEndian(_ v: UInt64) -> [UInt8] { (0..<8).reversed().map { UInt8(truncatingIfNeeded: v >> ($0 * 8)) } }

/// Key of body chunk `number` of message `id`: 12 ASCII digits + u32 BE,
/// so a message's chunks are adjacent and in order.
func chunkKey(_ id: QueueID, _ number: UInt32) -> [UInt8] { id.key + bigEndian(number) }

private final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<Void, SpoolError> = .failure(.io("no result"))
    func set(_ r: Result<Void, SpoolError>) { lock.lock(); result = r; lock.unlock() }
    func get() -> Result<Void, SpoolError> { lock.lock(); defer { lock.unlock() }; return result }
}

/// pthread reader/writer lock: read transactions shared, map resize and
/// close exclusive.
final class ReadWriteLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    init() {
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        pthread_rwlock_init(lock, nil)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    func lockShared() { pthread_rwlock_rdlock(lock) }
    func lockExclusive() { pthread_rwlock_wrlock(lock) }
    func unlock() { pthread_rwlock_unlock(lock) }
}
