// Encoding frames (PROTOCOL.md section 2).
//
// Policy: nothing invalid goes on the wire. `FrameEncoder.encode` treats a
// frame that breaks a framing rule (bad name, duplicate, text with NUL/CR/LF,
// oversized value or frame) as a programming error and stops the process
// with a precondition failure naming the rule. Code that builds frames from
// data it does not control (a remote reply, a user's input) either cleans it
// first (`AttributeValue.sanitizedText`) or calls `checkFraming` /
// `ProtocolSchema.validate`, which throw. The transports (`StageConnection`,
// `FrameEncoderHandler`) always check framing and schema and throw
// `ProtocolError` instead of stopping.

public enum FrameEncoder {
    /// The wire form of `frame`; `fd` attributes are encoded with length 0
    /// (the descriptors travel as SCM_RIGHTS ancillary data).
    /// Precondition: `checkFraming(frame)` does not throw.
    public static func encode(_ frame: Frame) -> [UInt8] {
        var out: [UInt8] = []
        encode(frame, into: &out)
        return out
    }

    /// Appends the wire form of `frame` to `into`. Same precondition.
    public static func encode(_ frame: Frame, into out: inout [UInt8]) {
        let length: Int
        do {
            length = try checkFraming(frame)
        } catch {
            preconditionFailure("FrameEncoder: refusing to encode an invalid frame: \(error.message)")
        }
        unsafeEncode(frame, length: length, into: &out)
    }

    /// Checks the framing rules of section 2 that a `Frame` value can break
    /// and returns the value of the length field.
    @discardableResult
    public static func checkFraming(_ frame: Frame) throws(ProtocolError) -> Int {
        let t = frame.type.name
        var length = 2
        let attributes = frame.attributes
        var seen: Set<String>?
        for (index, (name, value)) in attributes.enumerated() {
            if !FrameDecoder.isValidName(name.utf8), let problem = FrameDecoder.nameProblem(Array(name.utf8)) {
                throw ProtocolError("\(t): \(problem)")
            }
            guard !FrameDecoder.repeats(name, after: attributes[..<index], seen: &seen) else {
                throw ProtocolError("\(t): attribute \"\(name)\" appears twice")
            }
            let valueLength: Int
            switch value {
            case .uint: valueLength = 8
            case .bool: valueLength = 1
            case .fd(let d):
                guard d >= 0 else { throw ProtocolError("\(t): attribute \"\(name)\": fd \(d) is not a descriptor") }
                valueLength = 0
            case .bytes(let b):
                guard b.count <= WireLimits.maxBytes else {
                    throw ProtocolError("\(t): attribute \"\(name)\": bytes value of \(b.count) bytes exceeds the limit of \(WireLimits.maxBytes)")
                }
                valueLength = b.count
            case .text(let s):
                let utf8 = s.utf8
                if let problem = FrameDecoder.textProblem(utf8) {
                    throw ProtocolError("\(t): attribute \"\(name)\": \(problem)")
                }
                valueLength = utf8.count
            }
            length += 1 + name.utf8.count + 1 + 4 + valueLength
        }
        guard length <= WireLimits.maxFrameLength else {
            throw ProtocolError("\(t): frame length \(length) exceeds the limit of \(WireLimits.maxFrameLength)")
        }
        return length
    }

    /// Checks framing, then the schema of `schema` for `direction`.
    public static func check(_ frame: Frame, schema: ProtocolSchema, direction: Direction) throws(ProtocolError) {
        try checkFraming(frame)
        try schema.validate(frame, direction: direction)
    }

    /// Encodes a frame already checked; `length` from `checkFraming`.
    package static func unsafeEncode(_ frame: Frame, length: Int, into out: inout [UInt8]) {
        out.reserveCapacity(out.count + 4 + length)
        appendBE(UInt32(length), &out)
        appendBE(frame.type.rawValue, &out)
        for (name, value) in frame.attributes {
            out.append(UInt8(name.utf8.count))
            out.append(contentsOf: name.utf8)
            out.append(value.type.rawValue)
            switch value {
            case .uint(let v):
                appendBE(UInt32(8), &out)
                appendBE(v, &out)
            case .bool(let b):
                appendBE(UInt32(1), &out)
                out.append(b ? 1 : 0)
            case .fd:
                appendBE(UInt32(0), &out)
            case .bytes(let b):
                appendBE(UInt32(b.count), &out)
                out.append(contentsOf: b)
            case .text(let s):
                appendBE(UInt32(s.utf8.count), &out)
                out.append(contentsOf: s.utf8)
            }
        }
    }

    @inline(__always)
    static func appendBE<T: FixedWidthInteger>(_ v: T, _ out: inout [UInt8]) {
        var be = v.bigEndian
        withUnsafeBytes(of: &be) { out.append(contentsOf: $0) }
    }
}
