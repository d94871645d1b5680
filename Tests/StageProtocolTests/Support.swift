import Testing
@testable import StageProtocol

/// Raw frame builders, to put on the wire what FrameEncoder would refuse.
enum Raw {
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    static func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(v >> (56 - 8 * $0) & 0xFF) } }

    /// An attribute; `length` overrides the value length field.
    static func attr(_ name: String, _ type: UInt8, _ value: [UInt8], length: UInt32? = nil) -> [UInt8] {
        attr(Array(name.utf8), type, value, length: length)
    }

    static func attr(_ name: [UInt8], _ type: UInt8, _ value: [UInt8], length: UInt32? = nil) -> [UInt8] {
        [UInt8(truncatingIfNeeded: name.count)] + name + [type] + be32(length ?? UInt32(value.count)) + value
    }

    static func text(_ name: String, _ s: String) -> [UInt8] { attr(name, 2, Array(s.utf8)) }
    static func uint(_ name: String, _ v: UInt64) -> [UInt8] { attr(name, 1, be64(v)) }

    /// A frame; `length` overrides the length field.
    static func frame(_ type: UInt16, _ attributes: [[UInt8]] = [], length: UInt32? = nil) -> [UInt8] {
        let body = attributes.flatMap { $0 }
        return be32(length ?? UInt32(2 + body.count)) + [UInt8(type >> 8), UInt8(type & 0xFF)] + body
    }
}

/// Decodes everything in `bytes`; all frames must be complete.
func decodeAll(_ bytes: [UInt8], protocol p: ProtocolName? = .inject,
               direction: Direction = .clientToServer, afterHello: Bool = true) throws -> [Frame] {
    var d = FrameDecoder(protocol: p, direction: direction, afterHello: afterHello)
    d.append(bytes)
    var frames: [Frame] = []
    while let f = try d.next() { frames.append(f) }
    #expect(d.bufferedByteCount == 0, "bytes left over")
    return frames
}

/// Expects the decoder to reject `bytes` with a message containing `message`.
func expectRejected(_ bytes: [UInt8], _ message: String, protocol p: ProtocolName? = .inject,
                    direction: Direction = .clientToServer, afterHello: Bool = true,
                    sourceLocation: SourceLocation = #_sourceLocation) {
    var d = FrameDecoder(protocol: p, direction: direction, afterHello: afterHello)
    d.append(bytes)
    do {
        while try d.next() != nil {}
        Issue.record("accepted, expected an error containing \(message)", sourceLocation: sourceLocation)
    } catch {
        #expect(error.message.contains(message), "\(error.message)", sourceLocation: sourceLocation)
        // The decoder stays failed.
        #expect(throws: ProtocolError.self, sourceLocation: sourceLocation) { _ = try d.next() }
    }
}

func hex(_ bytes: [UInt8]) -> String {
    bytes.map { b in let s = String(b, radix: 16); return s.count == 1 ? "0" + s : s }.joined()
}
