// Frames of the Sealpost stage protocol (Pipeline/PROTOCOL.md, section 2):
// the values that travel between stages, independent of any transport.

/// Frame types, numbered once for all protocols (PROTOCOL.md section 4).
public enum FrameType: UInt16, Sendable, CaseIterable {
    case hello = 1, error = 2
    case mail = 16, rcpt = 17, body = 18, end = 19, abort = 20, accepted = 21, refused = 22, queueID = 23
    case job = 32, jobRcpt = 33, jobEnd = 34, result = 35, jobDone = 36
    case request = 48, entry = 49, entryRcpt = 50, done = 51
    case negotiate = 64, negotiated = 65, failed = 66, closed = 67
    case certificates = 80

    /// The name PROTOCOL.md uses, as it appears in error messages and logs.
    public var name: String {
        switch self {
        case .hello: "HELLO"
        case .error: "ERROR"
        case .mail: "MAIL"
        case .rcpt: "RCPT"
        case .body: "BODY"
        case .end: "END"
        case .abort: "ABORT"
        case .accepted: "ACCEPTED"
        case .refused: "REFUSED"
        case .queueID: "QUEUE-ID"
        case .job: "JOB"
        case .jobRcpt: "JOB-RCPT"
        case .jobEnd: "JOB-END"
        case .result: "RESULT"
        case .jobDone: "JOB-DONE"
        case .request: "REQUEST"
        case .entry: "ENTRY"
        case .entryRcpt: "ENTRY-RCPT"
        case .done: "DONE"
        case .negotiate: "NEGOTIATE"
        case .negotiated: "NEGOTIATED"
        case .failed: "FAILED"
        case .closed: "CLOSED"
        case .certificates: "CERTIFICATES"
        }
    }
}

/// The value types of section 2, with their wire codes.
public enum ValueType: UInt8, Sendable, CustomStringConvertible {
    case uint = 1, text = 2, bytes = 3, bool = 4, fd = 5
    public var description: String {
        switch self {
        case .uint: "uint"
        case .text: "text"
        case .bytes: "bytes"
        case .bool: "bool"
        case .fd: "fd"
        }
    }
}

/// A typed attribute value.
///
/// `fd`: on the sending side, a descriptor the sender keeps owning (the
/// kernel duplicates it into the peer with SCM_RIGHTS). On the receiving
/// side, `FrameDecoder` yields `.fd(-1)` (the descriptor travels out of
/// band) and `StageConnection.receive()` replaces it with the received
/// descriptor, which the caller then owns and must close.
public enum AttributeValue: Sendable, Equatable {
    case uint(UInt64)
    case text(String)
    case bytes([UInt8])
    case bool(Bool)
    case fd(Int32)

    public var type: ValueType {
        switch self {
        case .uint: .uint
        case .text: .text
        case .bytes: .bytes
        case .bool: .bool
        case .fd: .fd
        }
    }

    /// `sanitizedText` of a String: usually there is nothing to replace (a
    /// host name, a HELO), and the text goes as it is, without being
    /// rebuilt a scalar at a time.
    public static func sanitizedText(_ string: String) -> AttributeValue {
        var string = string
        let clean = string.withUTF8 { bytes in
            bytes.count <= WireLimits.maxText && !bytes.contains(where: { $0 == 0 || $0 == 13 || $0 == 10 })
        }
        return clean ? .text(string) : sanitizedText(Substring(string))
    }

    /// A text value made safe for the wire from arbitrary text (a remote
    /// server's reply, a file name...): NUL, CR and LF become spaces and the
    /// result is cut, on a character boundary, to the 8192-byte limit.
    public static func sanitizedText(_ string: some StringProtocol) -> AttributeValue {
        var out = String.UnicodeScalarView()
        var size = 0
        for scalar in string.unicodeScalars {
            let s: Unicode.Scalar = (scalar == "\0" || scalar == "\r" || scalar == "\n") ? " " : scalar
            let n = UTF8.width(s)
            if size + n > WireLimits.maxText { break }
            size += n
            out.append(s)
        }
        return .text(String(out))
    }
}

/// The hard limits of PROTOCOL.md sections 2 and 5.
public enum WireLimits {
    /// Largest value of the 4-byte length field (type + attributes).
    public static let maxFrameLength = 262_144
    public static let minFrameLength = 2
    public static let maxNameLength = 32
    public static let maxText = 8192
    public static let maxBytes = 65_536
}

/// Which way frames travel: from the side that connected (client) to the
/// side that listens (server), or back.
public enum Direction: Sendable, Hashable, CustomStringConvertible {
    case clientToServer, serverToClient
    public var reversed: Direction { self == .clientToServer ? .serverToClient : .clientToServer }
    public var description: String { self == .clientToServer ? "client to server" : "server to client" }
}

/// The protocols of version 1 (`tls`: the channel to crypto-negotiate,
/// PROTOCOL.md section 4.5).
public enum ProtocolName: String, Sendable, CaseIterable {
    case inject, deliver, control, tls
}

/// A violation of the stage protocol: bad framing, a schema violation, or a
/// missing/mistyped attribute asked for by a stage. The message names the
/// frame type, the attribute and the rule broken, e.g.
/// `MAIL: attribute "sender": text contains LF`.
public struct ProtocolError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One frame: a type and its attributes, in wire order (the order matters
/// for `fd` attributes, which take the passed descriptors in turn).
public struct Frame: Sendable, Equatable {
    public var type: FrameType
    public var attributes: [(name: String, value: AttributeValue)]

    public init(_ type: FrameType, _ attributes: KeyValuePairs<String, AttributeValue> = [:]) {
        self.type = type
        self.attributes = attributes.map { (name: $0.key, value: $0.value) }
    }

    public init(_ type: FrameType, attributes: [(String, AttributeValue)]) {
        self.type = type
        self.attributes = attributes.map { (name: $0.0, value: $0.1) }
    }

    /// Equality is: same type, same attributes in the same order.
    public static func == (a: Frame, b: Frame) -> Bool {
        guard a.type == b.type, a.attributes.count == b.attributes.count else { return false }
        for (x, y) in zip(a.attributes, b.attributes) where x.name != y.name || x.value != y.value {
            return false
        }
        return true
    }

    public subscript(name: String) -> AttributeValue? {
        attributes.first(where: { $0.name == name })?.value
    }

    /// Sets, replaces (in place) or, with nil, removes an attribute.
    public mutating func set(_ name: String, _ value: AttributeValue?) {
        if let i = attributes.firstIndex(where: { $0.name == name }) {
            if let value { attributes[i].value = value } else { attributes.remove(at: i) }
        } else if let value {
            attributes.append((name: name, value: value))
        }
    }

    /// Builder form of `set`, handy for optional attributes.
    public func with(_ name: String, _ value: AttributeValue?) -> Frame {
        var copy = self
        copy.set(name, value)
        return copy
    }

    /// The number of `fd` attributes (descriptors that travel with the frame).
    public var descriptorCount: Int {
        attributes.reduce(0) { $0 + ($1.value.type == .fd ? 1 : 0) }
    }

    // MARK: Typed access

    private func typed(_ name: String, _ expected: ValueType) throws(ProtocolError) -> AttributeValue? {
        guard let value = self[name] else { return nil }
        guard value.type == expected else {
            throw ProtocolError("\(type.name): attribute \"\(name)\": expected \(expected), got \(value.type)")
        }
        return value
    }

    private func missing(_ name: String) -> ProtocolError {
        ProtocolError("\(type.name): required attribute \"\(name)\" is missing")
    }

    public func text(_ name: String) throws(ProtocolError) -> String {
        guard let s = try optionalText(name) else { throw missing(name) }
        return s
    }

    public func optionalText(_ name: String) throws(ProtocolError) -> String? {
        if case .text(let s)? = try typed(name, .text) { return s }
        return nil
    }

    public func uint(_ name: String) throws(ProtocolError) -> UInt64 {
        guard let v = try optionalUInt(name) else { throw missing(name) }
        return v
    }

    public func optionalUInt(_ name: String) throws(ProtocolError) -> UInt64? {
        if case .uint(let v)? = try typed(name, .uint) { return v }
        return nil
    }

    public func bool(_ name: String, default defaultValue: Bool) throws(ProtocolError) -> Bool {
        if case .bool(let b)? = try typed(name, .bool) { return b }
        return defaultValue
    }

    public func bytes(_ name: String) throws(ProtocolError) -> [UInt8] {
        if case .bytes(let b)? = try typed(name, .bytes) { return b }
        throw missing(name)
    }

    /// The descriptor of an `fd` attribute (received ones belong to the caller).
    public func fd(_ name: String) throws(ProtocolError) -> Int32 {
        if case .fd(let d)? = try typed(name, .fd) { return d }
        throw missing(name)
    }
}

extension Frame: CustomStringConvertible {
    /// A one-line rendering for logs and test failures; bytes are summarized.
    public var description: String {
        var s = type.name
        for (name, value) in attributes {
            s += " \(name)="
            switch value {
            case .uint(let v): s += "\(v)"
            case .text(let t): s += "\"\(t)\""
            case .bytes(let b): s += "<\(b.count) bytes>"
            case .bool(let b): s += b ? "true" : "false"
            case .fd(let d): s += "fd:\(d)"
            }
        }
        return s
    }
}
