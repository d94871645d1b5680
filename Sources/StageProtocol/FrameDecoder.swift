// A pure decoder for the stage protocol: bytes in, validated frames out.
// No I/O, so it is tested byte by byte and can be fuzzed. It enforces every
// rule of PROTOCOL.md section 2 and the schema of section 4 for one
// protocol and one direction; the stage itself checks the order of the
// conversation beyond "HELLO first".

public struct FrameDecoder: Sendable {
    /// Direction of the frames this decoder receives.
    public let direction: Direction
    /// The schema in force: nil until the peer's HELLO names the protocol
    /// (when the decoder was not told it).
    public private(set) var schema: ProtocolSchema?
    /// True once a HELLO was decoded (or the decoder was created after it).
    public private(set) var helloReceived: Bool
    /// Stream offset of the first byte not yet consumed by a decoded frame.
    public private(set) var consumedBytes: UInt64 = 0

    private var buffer: [UInt8] = []
    private var start = 0
    private var failure: ProtocolError?

    /// `protocol` nil: before the HELLO; only HELLO and ERROR are accepted and
    /// the HELLO's `protocol` attribute chooses the schema. Given: a HELLO
    /// must name that protocol.
    public init(protocol: ProtocolName?, direction: Direction) {
        self.init(protocol: `protocol`, direction: direction, afterHello: false)
    }

    /// `afterHello`: the HELLO exchange happened before this decoder was
    /// created (it then needs the protocol); a HELLO is no longer allowed.
    public init(protocol: ProtocolName?, direction: Direction, afterHello: Bool) {
        precondition(!afterHello || `protocol` != nil, "FrameDecoder: afterHello needs a protocol")
        self.direction = direction
        self.schema = `protocol`.map(ProtocolSchema.standard)
        self.helloReceived = afterHello
    }

    /// A decoder for a protocol described outside PROTOCOL.md version 1.
    public init(schema: ProtocolSchema, direction: Direction, afterHello: Bool = false) {
        self.direction = direction
        self.schema = schema
        self.helloReceived = afterHello
    }

    /// The protocol in force, when it is one of version 1.
    public var protocolName: ProtocolName? { schema.flatMap { ProtocolName(rawValue: $0.name) } }

    /// Bytes received and not yet returned as a frame (a partial frame).
    public var bufferedByteCount: Int { buffer.count - start }

    /// Tells the decoder the protocol (a client that learns it only when it
    /// sends its own HELLO). No effect once a schema is in force.
    public mutating func expect(protocol name: ProtocolName) {
        if schema == nil { schema = .standard(name) }
    }

    public mutating func append<C: Collection<UInt8>>(_ bytes: C) {
        // Compact lazily: drop consumed bytes once they are the larger part.
        if start > 0 && start >= buffer.count / 2 {
            buffer.removeSubrange(0..<start)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame, or nil when more bytes are needed. After an
    /// error the decoder stays failed: the connection must be closed.
    public mutating func next() throws(ProtocolError) -> Frame? {
        if let failure { throw failure }
        do {
            return try decodeOne()
        } catch {
            failure = error
            throw error
        }
    }

    // MARK: - Decoding

    private mutating func decodeOne() throws(ProtocolError) -> Frame? {
        let available = buffer.count - start
        guard available >= 4 else { return nil }
        let length = Int(readBE32(start))
        guard length >= WireLimits.minFrameLength else {
            throw ProtocolError("frame length \(length) is below the minimum of \(WireLimits.minFrameLength)")
        }
        guard length <= WireLimits.maxFrameLength else {
            throw ProtocolError("frame length \(length) exceeds the limit of \(WireLimits.maxFrameLength)")
        }
        guard available >= 6 else { return nil }
        // Type checks as soon as the type is known: no need to buffer a
        // quarter megabyte of a frame that is rejected anyway.
        let rawType = UInt16(buffer[start + 4]) << 8 | UInt16(buffer[start + 5])
        guard let type = FrameType(rawValue: rawType) else {
            throw ProtocolError("frame type \(rawType) is unknown")
        }
        try checkAllowed(type)
        guard available >= 4 + length else { return nil }

        let frame = try parseAttributes(type, from: start + 6, to: start + 4 + length)
        try validate(frame)
        start += 4 + length
        consumedBytes += UInt64(4 + length)
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: buffer.capacity <= 4 * WireLimits.maxBytes)
            start = 0
        }
        return frame
    }

    private func checkAllowed(_ type: FrameType) throws(ProtocolError) {
        if !helloReceived {
            guard type == .hello || type == .error else {
                throw ProtocolError("\(type.name): not allowed before HELLO (only HELLO and ERROR are)")
            }
            return
        }
        if type == .hello {
            throw ProtocolError("HELLO: allowed only once, as the first frame")
        }
        if let schema, schema.rules(direction)[type] == nil {
            throw ProtocolError("\(type.name): not allowed in protocol \(schema.name) from \(direction)")
        }
    }

    private mutating func validate(_ frame: Frame) throws(ProtocolError) {
        switch frame.type {
        case .hello:
            let named = try frame.text("protocol")
            if let schema {
                guard named == schema.name else {
                    throw ProtocolError("HELLO: attribute \"protocol\": this connection speaks \(schema.name), got \(Checks.quoted(named))")
                }
                try schema.validate(frame, direction: direction)
            } else {
                guard let name = ProtocolName(rawValue: named) else {
                    throw ProtocolError("HELLO: attribute \"protocol\": " + Checks.oneOf(Standard.protocolNames)(.text(named))!)
                }
                let schema = ProtocolSchema.standard(name)
                try schema.validate(frame, direction: direction)
                self.schema = schema
            }
            helloReceived = true
        case .error where schema == nil:
            try Standard.beforeHello.validate(frame, direction: direction)
        default:
            // checkAllowed guarantees a schema here, except for ERROR.
            try schema!.validate(frame, direction: direction)
        }
    }

    private func parseAttributes(_ type: FrameType, from: Int, to end: Int) throws(ProtocolError) -> Frame {
        let t = type.name
        var frame = Frame(type)
        var seen: Set<String>?
        var p = from
        while p < end {
            let k = Int(buffer[p])
            p += 1
            guard k >= 1 else { throw ProtocolError("\(t): attribute name is empty") }
            guard k <= WireLimits.maxNameLength else {
                throw ProtocolError("\(t): attribute name of \(k) bytes exceeds the limit of \(WireLimits.maxNameLength)")
            }
            guard end - p >= k else {
                throw ProtocolError("\(t): attribute name runs past the end of the frame (\(k) bytes, \(end - p) left)")
            }
            let nameBytes = buffer[p..<(p + k)]
            if !Self.isValidName(nameBytes), let problem = Self.nameProblem(Array(nameBytes)) {
                throw ProtocolError("\(t): \(problem)")
            }
            let name = String(decoding: nameBytes, as: UTF8.self)
            p += k
            guard end - p >= 5 else {
                throw ProtocolError("\(t): attribute \"\(name)\": value header runs past the end of the frame")
            }
            let rawValueType = buffer[p]
            let v = Int(readBE32(p + 1))
            p += 5
            guard let valueType = ValueType(rawValue: rawValueType) else {
                throw ProtocolError("\(t): attribute \"\(name)\": unknown value type \(rawValueType)")
            }
            switch valueType {
            case .uint where v != 8, .bool where v != 1, .fd where v != 0:
                let must = valueType == .uint ? 8 : valueType == .bool ? 1 : 0
                throw ProtocolError("\(t): attribute \"\(name)\": \(valueType) value length is \(v), must be \(must)")
            case .text where v > WireLimits.maxText:
                throw ProtocolError("\(t): attribute \"\(name)\": text value of \(v) bytes exceeds the limit of \(WireLimits.maxText)")
            case .bytes where v > WireLimits.maxBytes:
                throw ProtocolError("\(t): attribute \"\(name)\": bytes value of \(v) bytes exceeds the limit of \(WireLimits.maxBytes)")
            default: break
            }
            guard end - p >= v else {
                throw ProtocolError("\(t): attribute \"\(name)\": value of \(v) bytes runs past the end of the frame (\(end - p) left)")
            }
            let raw = buffer[p..<(p + v)]
            p += v
            let value: AttributeValue
            switch valueType {
            case .uint:
                value = .uint(raw.reduce(0) { $0 << 8 | UInt64($1) })
            case .bool:
                let b = raw[raw.startIndex]
                guard b <= 1 else {
                    throw ProtocolError("\(t): attribute \"\(name)\": bool value is \(b), must be 0 or 1")
                }
                value = .bool(b == 1)
            case .fd:
                value = .fd(-1)
            case .bytes:
                value = .bytes(Array(raw))
            case .text:
                if let problem = Self.textProblem(raw) {
                    throw ProtocolError("\(t): attribute \"\(name)\": \(problem)")
                }
                guard let s = String(validatingUTF8Bytes: raw) else {
                    throw ProtocolError("\(t): attribute \"\(name)\": text is not valid UTF-8")
                }
                value = .text(s)
            }
            guard !Self.repeats(name, after: frame.attributes[...], seen: &seen) else {
                throw ProtocolError("\(t): attribute \"\(name)\" appears twice")
            }
            frame.attributes.append((name: name, value: value))
        }
        return frame
    }

    @inline(__always)
    private func readBE32(_ at: Int) -> UInt32 {
        UInt32(buffer[at]) << 24 | UInt32(buffer[at + 1]) << 16 | UInt32(buffer[at + 2]) << 8 | UInt32(buffer[at + 3])
    }

    // MARK: - Rules shared with the encoder

    /// Whether `name` is among the `earlier` attributes' names. A frame has
    /// a handful, so comparing with each beats hashing every name into a
    /// Set (this runs for every attribute sent or received); past 16 the
    /// names go into `seen`, made on first need and kept by the caller.
    static func repeats(_ name: String, after earlier: ArraySlice<(name: String, value: AttributeValue)>,
                        seen: inout Set<String>?) -> Bool {
        if seen == nil, earlier.count >= 16 { seen = Set(earlier.map(\.name)) }
        if seen != nil { return !seen!.insert(name).inserted }
        return earlier.contains { $0.name == name }
    }

    /// Whether `name` is a valid attribute name (nameProblem's valid case,
    /// without copying the bytes into an Array).
    static func isValidName<Bytes: Collection<UInt8>>(_ name: Bytes) -> Bool {
        guard let first = name.first, name.count <= WireLimits.maxNameLength,
              (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(first) else { return false }
        return name.allSatisfy { b in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: "-")
        }
    }

    /// What is wrong with an attribute name, or nil.
    static func nameProblem(_ name: [UInt8]) -> String? {
        guard !name.isEmpty else { return "attribute name is empty" }
        // The valid case first and without building the quoted name: this
        // runs for every attribute of every frame.
        if name.count <= WireLimits.maxNameLength, (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(name[0]),
           name.allSatisfy({ b in
               (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b)
                   || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: "-")
           }) {
            return nil
        }
        let shown = Checks.quoted(String(decoding: name, as: UTF8.self))
        guard name.count <= WireLimits.maxNameLength else {
            return "attribute name \(shown) of \(name.count) bytes exceeds the limit of \(WireLimits.maxNameLength)"
        }
        guard (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(name[0]) else {
            return "attribute name \(shown) does not start with a letter a-z"
        }
        for b in name {
            let ok = (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: "-")
            if !ok {
                return "attribute name \(shown) has byte 0x\(String(b, radix: 16, uppercase: true)) outside [a-z0-9-]"
            }
        }
        return nil
    }

    /// Size and forbidden bytes of a text value (UTF-8 validity is checked
    /// apart, a Swift String being always valid).
    static func textProblem<C: Collection<UInt8>>(_ bytes: C) -> String? {
        if bytes.count > WireLimits.maxText {
            return "text value of \(bytes.count) bytes exceeds the limit of \(WireLimits.maxText)"
        }
        // Every text attribute of every frame, both ways, passes here: over
        // contiguous bytes (a native String's, a slice of the receive
        // buffer) the scan is a loop over a pointer, where a String's
        // UTF8View steps an index through the string's representation.
        if let scanned = bytes.withContiguousStorageIfAvailable(firstForbidden) { return scanned }
        for b in bytes {
            if let problem = forbidden(b) { return problem }
        }
        return nil
    }

    /// The problem of the first forbidden byte, or nil.
    private static func firstForbidden(_ bytes: UnsafeBufferPointer<UInt8>) -> String? {
        for b in bytes where b <= 0x0D {
            if let problem = forbidden(b) { return problem }
        }
        return nil
    }

    @inline(__always)
    private static func forbidden(_ b: UInt8) -> String? {
        switch b {
        case 0: return "text contains NUL"
        case 0x0D: return "text contains CR"
        case 0x0A: return "text contains LF"
        default: return nil
        }
    }
}

extension String {
    /// The bytes as a string when they are valid UTF-8, else nil, as
    /// `String(validating:as: UTF8.self)` answers. That initializer runs
    /// the standard library's unspecialized generic validation (two type
    /// metadata lookups and a transcoding loop, about 900 instructions a
    /// call, for every text attribute of every frame); all-ASCII text, as
    /// nearly every attribute is, takes the specialized decoding. (The SMTP
    /// module has the same few lines: each module is compiled on its own
    /// for the fuzzers, fuzz/build, so neither can lend it.)
    init?(validatingUTF8Bytes bytes: ArraySlice<UInt8>) {
        if bytes.allSatisfy({ $0 < 0x80 }) {
            self = String(decoding: bytes, as: UTF8.self)
        } else if let text = String(validating: bytes, as: UTF8.self) {
            self = text
        } else {
            return nil
        }
    }
}
