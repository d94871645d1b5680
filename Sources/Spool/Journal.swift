// The spool journal: a write-ahead log for accepted messages, so that the
// 250 to end of data waits for one synced append instead of an LMDB commit.
//
// Why: an LMDB commit is durable only after two flushes (the data pages,
// scattered over the file by page reuse, then the meta page). On the bench
// host that is most of the time a session waits for its 250. A journal
// append is one O_DSYNC pwrite of contiguous, already allocated blocks.
// The messages are then applied to LMDB by the committer's applier thread,
// in larger batches and off the path of the reply (Committer.swift).
//
// The file `journal` in the spool directory, mode 0600, at most `capacity`
// bytes, written from offset 0 upwards in records aligned to 4 KiB:
//
//   "SPJ1"      4 bytes, magic
//   length      u32 big-endian, bytes of payload
//   sequence    u64 big-endian, one more than the record before it
//   payload     `length` bytes (below)
//   checksum    32 bytes, BLAKE2b of everything above
//   zeros       up to the next multiple of 4096
//
// payload: u32 count, then per message: u32 + envelope record, u32 + key
// record (Records.swift), u32 chunk count, per chunk u32 + the sealed chunk:
// the very bytes LMDB will hold, so a replay needs no key.
//
// Reading stops at the first record that is not exactly the next one: a
// bad magic or checksum (never written, or torn by a crash), a length past
// the end, or a sequence that does not follow (a record from before the
// last rewind). LMDB's meta "journal-applied" holds the highest sequence
// whose messages are in LMDB, set in the same transaction that inserts
// them, so a replay (at open, `Spool.init`) applies exactly the records
// above it. The writer rewinds to offset 0 only when every record written
// is applied and committed (synced), so a rewind never discards a message
// that exists nowhere else.
//
// The file grows in 1 MiB steps of zeros written with O_DSYNC, never past
// `capacity`: appends are then overwrites of allocated blocks, whose sync
// flushes data only (no file system journal commit).

import Foundation
import Sodium

final class Journal {
    static let fileName = "journal"
    static let magic: [UInt8] = Array("SPJ1".utf8)
    static let headerSize = 16
    static let checksumSize = 32
    static let alignment = 4096
    static let growthStep = 1 << 20
    /// The smallest capacity that holds a record of a useful size.
    static let minimumCapacity = 1 << 20

    let path: String
    let capacity: Int
    private let descriptor: Int32
    /// Where the next record goes.
    private(set) var writeOffset = 0
    /// The sequence of the last record written (or found at open).
    private(set) var lastSequence: UInt64 = 0
    /// How far the file holds allocated bytes (zeros or records).
    private var allocatedEnd: Int

    /// Opens (creating when missing) the journal of the spool in `directory`.
    init(directory: String, capacity: Int) throws(SpoolError) {
        precondition(capacity >= Self.minimumCapacity)
        path = directory + "/" + Self.fileName
        self.capacity = capacity / Self.alignment * Self.alignment
        let existed = access(path, F_OK) == 0
        descriptor = open(path, O_RDWR | O_CREAT | O_DSYNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard descriptor >= 0 else { throw .io("\(path): open: \(errnoText(errno))") }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else {
            let e = errno
            closeDescriptor(descriptor)
            throw .io("\(path): fstat: \(errnoText(e))")
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            closeDescriptor(descriptor)
            throw .io("\(path): not a regular file")
        }
        allocatedEnd = Int(info.st_size)
        if !existed {
            do { try syncDirectory(directory) } catch {
                closeDescriptor(descriptor)
                throw error
            }
        }
    }

    deinit { closeDescriptor(descriptor) }

    // MARK: Reading (at open)

    /// Every record readable from offset 0, in order (see the top of the
    /// file for where reading stops), with its payload when its sequence is
    /// above `applied`. Also sets `lastSequence` to the last one found, and
    /// the place of the next record to after it.
    func records(after applied: UInt64) throws(SpoolError) -> [(sequence: UInt64, payload: [UInt8])] {
        var found: [(sequence: UInt64, payload: [UInt8])] = []
        var offset = 0
        var previous: UInt64?
        // The whole file: a journal written with a larger capacity than
        // today's may hold records past it.
        let end = allocatedEnd
        while offset + Self.headerSize + Self.checksumSize <= end {
            let header = try read(Self.headerSize, at: offset)
            guard Array(header[0..<4]) == Self.magic else { break }
            let length = Int(readU32(header, 4))
            let total = Self.headerSize + length + Self.checksumSize
            guard total <= end - offset else { break }
            let record = try read(total, at: offset)
            let sum = record.withUnsafeBytes { Sodium.blake2b(UnsafeRawBufferPointer(rebasing: $0[0..<(total - Self.checksumSize)])) }
            guard Sodium.constantTimeEquals(sum, Array(record[(total - Self.checksumSize)...])) else { break }
            let sequence = readU64(record, 8)
            if let previous, sequence != previous &+ 1 { break }
            previous = sequence
            if sequence > applied {
                found.append((sequence, Array(record[Self.headerSize..<(Self.headerSize + length)])))
            }
            offset += Self.aligned(total)
        }
        lastSequence = max(lastSequence, previous ?? 0)
        writeOffset = offset   // after the last record (Spool.init rewinds once it is all applied)
        return found
    }

    /// Copies a record's payload that LMDB refused at replay to
    /// `journal-rejected-SEQUENCE` beside the journal (synced, 0600), for
    /// a human to look at; returns its path.
    func keepRejected(sequence: UInt64, payload: [UInt8]) throws(SpoolError) -> String {
        let directory = String(path.dropLast(Self.fileName.count + 1))
        let target = "\(directory)/journal-rejected-\(sequence)"
        let fd = open(target, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw .io("\(target): open: \(errnoText(errno))") }
        defer { closeDescriptor(fd) }
        var done = 0
        while done < payload.count {
            let n = payload.withUnsafeBytes { write(fd, $0.baseAddress! + done, payload.count - done) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw .io("\(target): write: \(errnoText(errno))") }
            done += n
        }
        guard fsync(fd) == 0 else { throw .io("\(target): fsync: \(errnoText(errno))") }
        try syncDirectory(directory)
        return target
    }

    // MARK: Writing

    static func aligned(_ n: Int) -> Int { (n + alignment - 1) / alignment * alignment }

    /// The bytes a record with `payloadSize` bytes of payload takes.
    static func recordSize(payloadSize: Int) -> Int { aligned(headerSize + payloadSize + checksumSize) }

    /// Whether a record of `payloadSize` fits after `writeOffset`.
    func fits(payloadSize: Int) -> Bool {
        writeOffset + Self.recordSize(payloadSize: payloadSize) <= capacity
    }

    /// Continues at offset 0. Only when every record written is applied to
    /// LMDB and committed: what follows the new records is then read as
    /// the end of the journal (its sequences do not follow).
    func rewind() { writeOffset = 0 }

    /// Sets the sequence the next record follows (at open: the highest one
    /// applied or found, whichever is higher).
    func continueAfter(_ sequence: UInt64) { lastSequence = max(lastSequence, sequence) }

    /// Writes and syncs one record; returns its sequence. On failure
    /// nothing counts as written (the next append goes to the same place).
    func append(_ payload: [UInt8]) throws(SpoolError) -> UInt64 {
        let size = Self.recordSize(payloadSize: payload.count)
        guard writeOffset + size <= capacity else { throw .io("\(path): no room for a record of \(size) bytes") }
        try allocate(through: writeOffset + size)
        let sequence = lastSequence &+ 1
        var record = [UInt8]()
        record.reserveCapacity(size)
        record += Self.magic
        record += bigEndian(UInt32(payload.count))
        record += bigEndian(sequence)
        record += payload
        record += record.withUnsafeBytes { Sodium.blake2b($0) }
        record += [UInt8](repeating: 0, count: size - record.count)
        try writeFully(record, at: writeOffset)
        writeOffset += size
        lastSequence = sequence
        return sequence
    }

    /// Writes zeros (synced, O_DSYNC) up to `end` rounded up to the growth
    /// step, never past the capacity.
    private func allocate(through end: Int) throws(SpoolError) {
        guard end > allocatedEnd else { return }
        let target = min(capacity, (end + Self.growthStep - 1) / Self.growthStep * Self.growthStep)
        let zeros = [UInt8](repeating: 0, count: min(Self.growthStep, target - allocatedEnd))
        while allocatedEnd < target {
            let n = min(zeros.count, target - allocatedEnd)
            try writeFully(Array(zeros[0..<n]), at: allocatedEnd)
            allocatedEnd += n
        }
    }

    private func writeFully(_ bytes: [UInt8], at offset: Int) throws(SpoolError) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(descriptor, $0.baseAddress! + done, bytes.count - done, off_t(offset + done)) }
            if n < 0 {
                if errno == EINTR { continue }
                let e = errno
                throw e == ENOSPC || e == EDQUOT ? .full : .io("\(path): write: \(errnoText(e))")
            }
            if n == 0 { throw .io("\(path): write returned 0") }
            done += n
        }
    }

    private func read(_ count: Int, at offset: Int) throws(SpoolError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress! + done, count - done, off_t(offset + done)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .io("\(path): read: \(errnoText(errno))")
            }
            if n == 0 { break }
            done += n
        }
        guard done == count else { throw .io("\(path): \(count - done) bytes missing at offset \(offset + done)") }
        return bytes
    }

    // MARK: Payload

    /// The payload of the messages in `inserts`.
    static func payload(_ inserts: [(envelope: EnvelopeRecord, body: SealedBody)]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(payloadSize(inserts))
        out += bigEndian(UInt32(inserts.count))
        for (envelope, body) in inserts {
            let envelopeBytes = envelope.encoded()
            let key = KeyRecord(wrappedKey: body.wrappedKey, header: body.header,
                                chunkCount: UInt32(body.chunks.count), size: body.size).encoded()
            out += bigEndian(UInt32(envelopeBytes.count)) + envelopeBytes
            out += bigEndian(UInt32(key.count)) + key
            out += bigEndian(UInt32(body.chunks.count))
            for chunk in body.chunks { out += bigEndian(UInt32(chunk.count)) + chunk }
        }
        return out
    }

    /// About the size of `payload(inserts)` (envelopes estimated), to decide
    /// before encoding whether a batch goes through the journal.
    static func payloadSize(_ inserts: [(envelope: EnvelopeRecord, body: SealedBody)]) -> Int {
        inserts.reduce(4) { total, insert in
            total + 1024 + insert.body.chunks.reduce(0) { $0 + 4 + $1.count }
        }
    }

    /// The messages of a payload. Strict: every length within the payload,
    /// every record decodes, every byte consumed.
    static func inserts(_ payload: [UInt8]) throws(SpoolError) -> [(envelope: EnvelopeRecord, body: SealedBody)] {
        var reader = PayloadReader(bytes: payload)
        let count = try reader.u32()
        var out: [(envelope: EnvelopeRecord, body: SealedBody)] = []
        for _ in 0..<count {
            let envelope: EnvelopeRecord
            let key: KeyRecord
            do {
                envelope = try EnvelopeRecord(decoding: try reader.field())
                key = try KeyRecord(decoding: try reader.field())
            } catch let e as SpoolError {
                throw e
            } catch {
                throw .corrupt("journal: \(error)")
            }
            let chunkCount = try reader.u32()
            guard chunkCount == key.chunkCount, chunkCount > 0 else {
                throw .corrupt("journal: \(envelope.queueID): \(chunkCount) chunks, the key record says \(key.chunkCount)")
            }
            var chunks: [[UInt8]] = []
            for _ in 0..<chunkCount { chunks.append(try reader.field()) }
            out.append((envelope, SealedBody(wrappedKey: key.wrappedKey, header: key.header, chunks: chunks, size: key.size)))
        }
        guard reader.atEnd else { throw .corrupt("journal: \(payload.count - reader.offset) bytes after the last message") }
        return out
    }

    private struct PayloadReader {
        let bytes: [UInt8]
        var offset = 0
        var atEnd: Bool { offset == bytes.count }

        mutating func u32() throws(SpoolError) -> UInt32 {
            guard bytes.count - offset >= 4 else { throw .corrupt("journal: payload ends inside a length") }
            defer { offset += 4 }
            return readU32(bytes, offset)
        }

        mutating func field() throws(SpoolError) -> [UInt8] {
            let length = Int(try u32())
            guard bytes.count - offset >= length else { throw .corrupt("journal: a field of \(length) bytes runs past the payload") }
            defer { offset += length }
            return Array(bytes[offset..<(offset + length)])
        }
    }
}

private func readU32(_ b: [UInt8], _ at: Int) -> UInt32 {
    b[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) }
}

private func readU64(_ b: [UInt8], _ at: Int) -> UInt64 {
    b[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) }
}
