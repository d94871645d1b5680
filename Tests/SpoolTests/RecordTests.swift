import Testing
@testable import Spool

@Suite struct RecordTests {
    let envelope = sampleEnvelope(QueueID(rawValue: "0123456789AB")!, recipients: 2)

    @Test func roundTrip() throws {
        #expect(try EnvelopeRecord(decoding: envelope.encoded()) == envelope)
        let minimal = EnvelopeRecord(queueID: QueueID(rawValue: "000000000001")!, sender: "", arrival: 0, size: 0)
        #expect(try EnvelopeRecord(decoding: minimal.encoded()) == minimal)
        let key = KeyRecord(wrappedKey: [UInt8](repeating: 1, count: 72), header: [UInt8](repeating: 2, count: 24), chunkCount: 3, size: 150_000)
        #expect(try KeyRecord(decoding: key.encoded()) == key)
    }

    @Test func everyTruncationIsRejected() throws {
        let bytes = envelope.encoded()
        for n in 0..<bytes.count {
            #expect(throws: RecordDecodingError.self, "prefix of \(n) bytes") {
                try EnvelopeRecord(decoding: Array(bytes[0..<n]))
            }
        }
        let key = KeyRecord(wrappedKey: [1, 2], header: [3], chunkCount: 1, size: 0).encoded()
        for n in 0..<key.count {
            #expect(throws: RecordDecodingError.self) { try KeyRecord(decoding: Array(key[0..<n])) }
        }
    }

    @Test func extraBytesAreRejected() {
        for extra in [[0], [19, 0, 0, 0, 0], [1, 0, 0, 0, 0]] as [[UInt8]] {
            #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: envelope.encoded() + extra) }
        }
    }

    @Test func unknownVersionIsRejected() {
        var bytes = envelope.encoded()
        bytes[0] = 2
        #expect(throws: RecordDecodingError(record: "envelope", reason: "unknown version 2")) {
            try EnvelopeRecord(decoding: bytes)
        }
    }

    /// Builds a record field by field to exercise the decoder's rules.
    private func record(_ fields: [(UInt8, [UInt8])]) -> [UInt8] {
        var w = RecordWriter(version: 1)
        for (t, v) in fields { w.field(t, v) }
        return w.finish()
    }

    /// The typed fields' bytes, pinned: tag, u32 length, big-endian value.
    @Test func writerLayout() {
        var w = RecordWriter(version: 1)
        w.text(1, "ab")
        w.text(2, nil)
        w.u8(3, 7)
        w.bool(4, true)
        w.u32(5, 0x0102_0304)
        w.u32(6, nil)
        w.u64(7, 0x0102_0304_0506_0708)
        w.text(8, "é")
        #expect(w.finish() == [1, 0, 0, 0, 48,
                               1, 0, 0, 0, 2, 0x61, 0x62,
                               3, 0, 0, 0, 1, 7,
                               4, 0, 0, 0, 1, 1,
                               5, 0, 0, 0, 4, 1, 2, 3, 4,
                               7, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
                               8, 0, 0, 0, 2, 0xC3, 0xA9])
    }

    private var validFields: [(UInt8, [UInt8])] {
        [(1, Array("0123456789AB".utf8)), (2, Array("a@b".utf8)), (3, [0, 0, 0, 0, 0, 0, 0, 1]),
         (4, [0, 0, 0, 0, 0, 0, 0, 2]), (7, [0]), (8, [1]), (16, [0]), (17, [0])]
    }

    @Test func fieldRules() throws {
        #expect(try EnvelopeRecord(decoding: record(validFields)).sender == "a@b")
        // Missing required field.
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: record(validFields.filter { $0.0 != 3 })) }
        // Out of order, duplicated, unknown.
        var swapped = validFields
        swapped.swapAt(1, 2)
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: record(swapped)) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: record(validFields + [(17, [0])])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: record(validFields + [(99, [])])) }
        // Wrong sizes and values.
        func with(_ tag: UInt8, _ value: [UInt8]) -> [UInt8] { record(validFields.map { $0.0 == tag ? (tag, value) : $0 }) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: with(3, [0, 1])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: with(7, [2])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: with(7, [0, 0])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: with(17, [9])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: with(2, [0xFF, 0xFE])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: with(1, Array("0123456789ab".utf8))) }
        // A nested recipient with extra bytes.
        let recipient = RecipientRecord(address: "x@y").encoded()
        #expect(throws: Never.self) { try EnvelopeRecord(decoding: record(validFields + [(18, recipient)])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: record(validFields + [(18, recipient + [0])])) }
        #expect(throws: RecordDecodingError.self) { try EnvelopeRecord(decoding: record(validFields + [(18, Array(recipient.dropLast()))])) }
        // Recipients may repeat.
        let two = try EnvelopeRecord(decoding: record(validFields + [(18, recipient), (18, recipient)]))
        #expect(two.recipients.count == 2)
    }
}
