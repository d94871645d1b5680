// Records stored in the spool and their on-disk encoding.
//
// Encoding (written by hand: a few dozen lines, and it must be strict in
// ways a general serializer is not):
//
//   record  = version:u8 length:u32be field*    (length: bytes of the fields)
//   field   = tag:u8 length:u32be value[length]
//
// The record length makes a record cut at a field boundary invalid (without
// it, an envelope truncated between two recipients would decode, quietly
// losing recipients).
// Fields appear in ascending tag order; only tags documented as repeated
// may occur more than once (consecutively). Decoding fails on an unknown
// version, an unknown or out-of-order tag, a missing required field, a
// value of the wrong size, invalid UTF-8, a bool other than 0/1, an enum
// value out of range, and on any byte left over. Optional fields are simply
// absent when nil. Integers are big-endian.

// MARK: - Public types

/// A queue identifier: 12 upper-case hexadecimal digits (48 bits: seconds
/// since the epoch and a counter, see `Spool.newQueueID`).
public struct QueueID: Hashable, Sendable, Comparable, CustomStringConvertible, RawRepresentable {
    public let rawValue: String

    /// Accepts exactly 12 upper-case hex digits.
    public init?(rawValue: String) {
        let u = rawValue.utf8
        guard u.count == 12, u.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x46) }) else { return nil }
        self.rawValue = rawValue
    }

    public init?(_ string: String) { self.init(rawValue: string) }

    /// The 48-bit value as an identifier.
    init(value: UInt64) {
        precondition(value < 1 << 48)
        let hex = String(value, radix: 16, uppercase: true)
        rawValue = String(repeating: "0", count: 12 - hex.utf8.count) + hex
    }

    /// The 48-bit number the identifier spells.
    var value: UInt64 { UInt64(rawValue, radix: 16)! }

    /// The LMDB key: the 12 ASCII digits (so keys sort like identifiers).
    var key: [UInt8] { Array(rawValue.utf8) }

    public var description: String { rawValue }
    public static func < (a: QueueID, b: QueueID) -> Bool { a.rawValue < b.rawValue }
}

public enum RecipientState: String, Sendable, CaseIterable {
    case pending, deferred, sent, bounced
}

public enum MessageKind: UInt8, Sendable, CaseIterable {
    case normal = 0, bounce = 1, doubleBounce = 2
}

public struct RecipientRecord: Sendable, Equatable {
    public var address: String
    public var notify: String?
    public var orcpt: String?
    public var state: RecipientState
    public var attempts: UInt32
    public var nextAttempt: UInt64
    public var lastError: String?
    public var dsnStatus: String?
    public var remoteMTA: String?
    public var diagnostic: String?
    public var delayNotified: Bool

    public init(address: String, notify: String? = nil, orcpt: String? = nil,
                state: RecipientState = .pending, attempts: UInt32 = 0, nextAttempt: UInt64 = 0,
                lastError: String? = nil, dsnStatus: String? = nil, remoteMTA: String? = nil,
                diagnostic: String? = nil, delayNotified: Bool = false) {
        self.address = address; self.notify = notify; self.orcpt = orcpt
        self.state = state; self.attempts = attempts; self.nextAttempt = nextAttempt
        self.lastError = lastError; self.dsnStatus = dsnStatus; self.remoteMTA = remoteMTA
        self.diagnostic = diagnostic; self.delayNotified = delayNotified
    }
}

public struct EnvelopeRecord: Sendable, Equatable {
    public var queueID: QueueID
    public var sender: String
    public var arrival: UInt64
    public var size: UInt64
    public var ret: String?
    public var envid: String?
    public var requireTLS: Bool
    public var smtputf8: Bool
    public var bodyType: String?
    public var clientAddress: String?
    public var clientName: String?
    public var helo: String?
    public var protocolName: String?
    public var authUser: String?
    public var peerUID: UInt32?
    public var held: Bool
    public var kind: MessageKind
    public var recipients: [RecipientRecord]

    public init(queueID: QueueID, sender: String, arrival: UInt64, size: UInt64,
                ret: String? = nil, envid: String? = nil, requireTLS: Bool = false, smtputf8: Bool = false,
                bodyType: String? = nil, clientAddress: String? = nil, clientName: String? = nil,
                helo: String? = nil, protocolName: String? = nil, authUser: String? = nil,
                peerUID: UInt32? = nil, held: Bool = false, kind: MessageKind = .normal,
                recipients: [RecipientRecord] = []) {
        self.queueID = queueID; self.sender = sender; self.arrival = arrival; self.size = size
        self.ret = ret; self.envid = envid; self.requireTLS = requireTLS; self.smtputf8 = smtputf8
        self.bodyType = bodyType; self.clientAddress = clientAddress; self.clientName = clientName
        self.helo = helo; self.protocolName = protocolName; self.authUser = authUser
        self.peerUID = peerUID; self.held = held; self.kind = kind; self.recipients = recipients
    }
}

// MARK: - Encoding primitives

/// A record that failed to decode; `reason` names the field and the problem.
public struct RecordDecodingError: Error, Equatable, Sendable, CustomStringConvertible {
    public var record: String
    public var reason: String
    public var description: String { "\(record) record: \(reason)" }
}

struct RecordWriter {
    private var fields: [UInt8]

    init(version: UInt8) {
        fields = [version, 0, 0, 0, 0]
        // A recipient, or an envelope of one, fits without growing.
        fields.reserveCapacity(256)
    }

    /// The finished record, its length filled in (in place: no copy).
    consuming func finish() -> [UInt8] {
        let n = UInt32(fields.count - 5)
        fields[1] = UInt8(n >> 24); fields[2] = UInt8(truncatingIfNeeded: n >> 16)
        fields[3] = UInt8(truncatingIfNeeded: n >> 8); fields[4] = UInt8(truncatingIfNeeded: n)
        return fields
    }

    /// Byte by byte: no temporary array per field on the path every
    /// message takes.
    private mutating func header(_ tag: UInt8, count: Int) {
        fields.append(tag)
        appendBigEndian(UInt64(count), bytes: 4)
    }

    private mutating func appendBigEndian(_ v: UInt64, bytes: Int) {
        for shift in stride(from: (bytes - 1) * 8, through: 0, by: -8) {
            fields.append(UInt8(truncatingIfNeeded: v >> UInt64(shift)))
        }
    }

    mutating func field(_ tag: UInt8, _ value: some Collection<UInt8>) {
        header(tag, count: value.count)
        fields.append(contentsOf: value)
    }
    mutating func text(_ tag: UInt8, _ s: String) {
        var s = s
        s.withUTF8 { field(tag, $0) }
    }
    mutating func text(_ tag: UInt8, _ s: String?) { if let s { text(tag, s) } }
    mutating func bool(_ tag: UInt8, _ b: Bool) { u8(tag, b ? 1 : 0) }
    mutating func u8(_ tag: UInt8, _ v: UInt8) {
        header(tag, count: 1)
        fields.append(v)
    }
    mutating func u32(_ tag: UInt8, _ v: UInt32) {
        header(tag, count: 4)
        appendBigEndian(UInt64(v), bytes: 4)
    }
    mutating func u32(_ tag: UInt8, _ v: UInt32?) { if let v { u32(tag, v) } }
    mutating func u64(_ tag: UInt8, _ v: UInt64) {
        header(tag, count: 8)
        appendBigEndian(v, bytes: 8)
    }
}

struct RecordReader {
    let record: String
    private let bytes: [UInt8]
    private var offset: Int
    private var lastTag: UInt8 = 0
    private let repeatable: Set<UInt8>
    /// The version byte, checked by the caller against what it understands.
    let version: UInt8
    /// Fields collected by tag, in order (repeated tags keep several values).
    private(set) var fields: [UInt8: [ArraySlice<UInt8>]] = [:]

    /// Splits `bytes` into fields, enforcing framing, tag order and `known` tags.
    init(_ bytes: [UInt8], record: String, versions: Set<UInt8>, known: Set<UInt8>, repeatable: Set<UInt8> = []) throws(RecordDecodingError) {
        self.record = record
        self.bytes = bytes
        self.repeatable = repeatable
        guard let v = bytes.first else { throw RecordDecodingError(record: record, reason: "empty") }
        guard versions.contains(v) else { throw RecordDecodingError(record: record, reason: "unknown version \(v)") }
        version = v
        guard bytes.count >= 5 else { throw RecordDecodingError(record: record, reason: "truncated record header") }
        let total = Int(bytes[1]) << 24 | Int(bytes[2]) << 16 | Int(bytes[3]) << 8 | Int(bytes[4])
        guard total == bytes.count - 5 else {
            throw RecordDecodingError(record: record, reason: "record length \(total), \(bytes.count - 5) bytes present")
        }
        offset = 5
        while offset < bytes.count {
            guard bytes.count - offset >= 5 else {
                throw RecordDecodingError(record: record, reason: "truncated field header at byte \(offset)")
            }
            let tag = bytes[offset]
            let length = Int(bytes[offset + 1]) << 24 | Int(bytes[offset + 2]) << 16 | Int(bytes[offset + 3]) << 8 | Int(bytes[offset + 4])
            offset += 5
            guard known.contains(tag) else { throw RecordDecodingError(record: record, reason: "unknown field \(tag)") }
            guard tag > lastTag || (tag == lastTag && repeatable.contains(tag)) else {
                throw RecordDecodingError(record: record, reason: "field \(tag) out of order or repeated")
            }
            guard length <= bytes.count - offset else {
                throw RecordDecodingError(record: record, reason: "field \(tag) truncated (\(length) bytes announced, \(bytes.count - offset) left)")
            }
            fields[tag, default: []].append(bytes[offset..<offset + length])
            offset += length
            lastTag = tag
        }
    }

    func fail(_ reason: String) -> RecordDecodingError { RecordDecodingError(record: record, reason: reason) }

    func optionalRaw(_ tag: UInt8) -> ArraySlice<UInt8>? { fields[tag]?.first }
    func raw(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> ArraySlice<UInt8> {
        guard let v = optionalRaw(tag) else { throw fail("missing \(name)") }
        return v
    }
    func all(_ tag: UInt8) -> [ArraySlice<UInt8>] { fields[tag] ?? [] }

    func text(_ slice: ArraySlice<UInt8>, _ name: String) throws(RecordDecodingError) -> String {
        guard let s = String(validating: slice, as: UTF8.self) else { throw fail("\(name) is not UTF-8") }
        return s
    }
    func text(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> String { try text(try raw(tag, name), name) }
    func optionalText(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> String? {
        guard let v = optionalRaw(tag) else { return nil }
        return try text(v, name)
    }
    func bool(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> Bool {
        let v = try raw(tag, name)
        guard v.count == 1, v.first! <= 1 else { throw fail("\(name) is not a bool") }
        return v.first! == 1
    }
    func u8(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> UInt8 {
        let v = try raw(tag, name)
        guard v.count == 1 else { throw fail("\(name) has \(v.count) bytes, need 1") }
        return v.first!
    }
    func integer(_ v: ArraySlice<UInt8>, width: Int, _ name: String) throws(RecordDecodingError) -> UInt64 {
        guard v.count == width else { throw fail("\(name) has \(v.count) bytes, need \(width)") }
        return v.reduce(0) { $0 << 8 | UInt64($1) }
    }
    func u32(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> UInt32 {
        UInt32(try integer(try raw(tag, name), width: 4, name))
    }
    func optionalU32(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> UInt32? {
        guard let v = optionalRaw(tag) else { return nil }
        return UInt32(try integer(v, width: 4, name))
    }
    func u64(_ tag: UInt8, _ name: String) throws(RecordDecodingError) -> UInt64 {
        try integer(try raw(tag, name), width: 8, name)
    }
}

// MARK: - Envelope records (version 1)

/// Tags of the envelope record, version 1. Never renumber: add new tags
/// (and bump the version when old readers must refuse the record).
enum EnvelopeTag: UInt8, CaseIterable {
    case queueID = 1, sender, arrival, size, ret, envid, requireTLS, smtputf8, bodyType,
         clientAddress, clientName, helo, protocolName, authUser, peerUID, held, kind,
         recipient   // repeated, a nested recipient record
}

enum RecipientTag: UInt8, CaseIterable {
    case address = 1, notify, orcpt, state, attempts, nextAttempt, lastError, dsnStatus,
         remoteMTA, diagnostic, delayNotified
}

extension RecipientState {
    var code: UInt8 {
        switch self { case .pending: 0; case .deferred: 1; case .sent: 2; case .bounced: 3 }
    }
    init?(code: UInt8) {
        switch code { case 0: self = .pending; case 1: self = .deferred; case 2: self = .sent; case 3: self = .bounced; default: return nil }
    }
}

extension RecipientRecord {
    static let version: UInt8 = 1

    func encoded() -> [UInt8] {
        typealias T = RecipientTag
        var w = RecordWriter(version: Self.version)
        w.text(T.address.rawValue, address)
        w.text(T.notify.rawValue, notify)
        w.text(T.orcpt.rawValue, orcpt)
        w.u8(T.state.rawValue, state.code)
        w.u32(T.attempts.rawValue, attempts)
        w.u64(T.nextAttempt.rawValue, nextAttempt)
        w.text(T.lastError.rawValue, lastError)
        w.text(T.dsnStatus.rawValue, dsnStatus)
        w.text(T.remoteMTA.rawValue, remoteMTA)
        w.text(T.diagnostic.rawValue, diagnostic)
        w.bool(T.delayNotified.rawValue, delayNotified)
        return w.finish()
    }

    init(decoding bytes: [UInt8]) throws(RecordDecodingError) {
        typealias T = RecipientTag
        let r = try RecordReader(bytes, record: "recipient", versions: [Self.version],
                                 known: Set(T.allCases.map(\.rawValue)))
        let stateCode = try r.u8(T.state.rawValue, "state")
        guard let state = RecipientState(code: stateCode) else { throw r.fail("unknown state \(stateCode)") }
        self.init(address: try r.text(T.address.rawValue, "address"),
                  notify: try r.optionalText(T.notify.rawValue, "notify"),
                  orcpt: try r.optionalText(T.orcpt.rawValue, "orcpt"),
                  state: state,
                  attempts: try r.u32(T.attempts.rawValue, "attempts"),
                  nextAttempt: try r.u64(T.nextAttempt.rawValue, "nextAttempt"),
                  lastError: try r.optionalText(T.lastError.rawValue, "lastError"),
                  dsnStatus: try r.optionalText(T.dsnStatus.rawValue, "dsnStatus"),
                  remoteMTA: try r.optionalText(T.remoteMTA.rawValue, "remoteMTA"),
                  diagnostic: try r.optionalText(T.diagnostic.rawValue, "diagnostic"),
                  delayNotified: try r.bool(T.delayNotified.rawValue, "delayNotified"))
    }
}

extension EnvelopeRecord {
    static let version: UInt8 = 1

    /// The stored form (see the top of this file).
    public func encoded() -> [UInt8] {
        typealias T = EnvelopeTag
        var w = RecordWriter(version: Self.version)
        w.text(T.queueID.rawValue, queueID.rawValue)
        w.text(T.sender.rawValue, sender)
        w.u64(T.arrival.rawValue, arrival)
        w.u64(T.size.rawValue, size)
        w.text(T.ret.rawValue, ret)
        w.text(T.envid.rawValue, envid)
        w.bool(T.requireTLS.rawValue, requireTLS)
        w.bool(T.smtputf8.rawValue, smtputf8)
        w.text(T.bodyType.rawValue, bodyType)
        w.text(T.clientAddress.rawValue, clientAddress)
        w.text(T.clientName.rawValue, clientName)
        w.text(T.helo.rawValue, helo)
        w.text(T.protocolName.rawValue, protocolName)
        w.text(T.authUser.rawValue, authUser)
        w.u32(T.peerUID.rawValue, peerUID)
        w.bool(T.held.rawValue, held)
        w.u8(T.kind.rawValue, kind.rawValue)
        for r in recipients { w.field(T.recipient.rawValue, r.encoded()) }
        return w.finish()
    }

    /// Decodes the stored form strictly (every byte consumed).
    public init(decoding bytes: [UInt8]) throws(RecordDecodingError) {
        typealias T = EnvelopeTag
        let r = try RecordReader(bytes, record: "envelope", versions: [Self.version],
                                 known: Set(T.allCases.map(\.rawValue)), repeatable: [T.recipient.rawValue])
        let idText = try r.text(T.queueID.rawValue, "queueID")
        guard let id = QueueID(rawValue: idText) else { throw r.fail("invalid queue ID \"\(idText)\"") }
        let kindCode = try r.u8(T.kind.rawValue, "kind")
        guard let kind = MessageKind(rawValue: kindCode) else { throw r.fail("unknown kind \(kindCode)") }
        var recipients: [RecipientRecord] = []
        for slice in r.all(T.recipient.rawValue) {
            recipients.append(try RecipientRecord(decoding: Array(slice)))
        }
        self.init(queueID: id,
                  sender: try r.text(T.sender.rawValue, "sender"),
                  arrival: try r.u64(T.arrival.rawValue, "arrival"),
                  size: try r.u64(T.size.rawValue, "size"),
                  ret: try r.optionalText(T.ret.rawValue, "ret"),
                  envid: try r.optionalText(T.envid.rawValue, "envid"),
                  requireTLS: try r.bool(T.requireTLS.rawValue, "requireTLS"),
                  smtputf8: try r.bool(T.smtputf8.rawValue, "smtputf8"),
                  bodyType: try r.optionalText(T.bodyType.rawValue, "bodyType"),
                  clientAddress: try r.optionalText(T.clientAddress.rawValue, "clientAddress"),
                  clientName: try r.optionalText(T.clientName.rawValue, "clientName"),
                  helo: try r.optionalText(T.helo.rawValue, "helo"),
                  protocolName: try r.optionalText(T.protocolName.rawValue, "protocolName"),
                  authUser: try r.optionalText(T.authUser.rawValue, "authUser"),
                  peerUID: try r.optionalU32(T.peerUID.rawValue, "peerUID"),
                  held: try r.bool(T.held.rawValue, "held"),
                  kind: kind,
                  recipients: recipients)
    }
}

// MARK: - Key records (version 1): how to decrypt one body

/// Stored in the `keys` database under the queue ID: the per-message key
/// wrapped with secretbox under the master key, the secretstream header,
/// and the shape of the body (so a missing chunk is caught before decryption).
struct KeyRecord: Equatable {
    static let version: UInt8 = 1
    var wrappedKey: [UInt8]
    var header: [UInt8]
    var chunkCount: UInt32
    var size: UInt64

    func encoded() -> [UInt8] {
        var w = RecordWriter(version: Self.version)
        w.field(1, wrappedKey)
        w.field(2, header)
        w.u32(3, chunkCount)
        w.u64(4, size)
        return w.finish()
    }

    init(wrappedKey: [UInt8], header: [UInt8], chunkCount: UInt32, size: UInt64) {
        self.wrappedKey = wrappedKey; self.header = header; self.chunkCount = chunkCount; self.size = size
    }

    init(decoding bytes: [UInt8]) throws(RecordDecodingError) {
        let r = try RecordReader(bytes, record: "key", versions: [Self.version], known: [1, 2, 3, 4])
        wrappedKey = Array(try r.raw(1, "wrappedKey"))
        header = Array(try r.raw(2, "header"))
        chunkCount = try r.u32(3, "chunkCount")
        size = try r.u64(4, "size")
        guard chunkCount >= 1 else { throw r.fail("no chunks") }
    }
}
