// The header section of an RFC 5322 message: the lines up to the first empty
// line. Fields keep their original bytes so that a field nobody touched goes
// out exactly as it came in (folding, 8-bit bytes and all); lookups work on
// the unfolded value and ignore the case of the field name.
//
// Hostile input is expected (this parses whatever a local user pipes into
// queue-inject, or a message that came from the network): no separator,
// huge lines, NUL and 8-bit bytes. Parsing is a single linear pass, never
// traps, and a line that is not a header field ends the header section (the
// rest is body), as in Postfix's cleanup.

public struct HeaderField: Sendable, Equatable {
    /// The field name as written (without trailing white space).
    public var name: String
    /// The field exactly as it appeared, including continuation lines and
    /// the line end(s).
    public var raw: [UInt8]

    /// The value: everything after the colon, unfolded (line ends before
    /// white space removed, RFC 5322 section 2.2.3), leading and trailing
    /// white space trimmed. Bytes that are not UTF-8 become U+FFFD.
    public var value: String { HeaderBlock.value(ofField: raw[...]) }

    /// The raw bytes after the colon, still folded.
    public var valueBytes: ArraySlice<UInt8> { HeaderBlock.valueBytes(ofField: raw[...]) }

    /// Case-insensitive (ASCII) comparison of the field name.
    public func hasName(_ other: String) -> Bool {
        HeaderBlock.equalsIgnoringCase(name, other)
    }

    /// A new field "Name: value" with a CRLF line end. `value` must not hold
    /// line ends; any CR or LF is replaced by a space so that a caller can
    /// never inject a header field by accident.
    public init(name: String, value: String) {
        self.name = name
        var bytes = Array(name.utf8)
        bytes.append(contentsOf: ": ".utf8)
        for b in value.utf8 { bytes.append(b == 13 || b == 10 ? 32 : b) }
        bytes.append(contentsOf: [13, 10])
        self.raw = bytes
    }

    init(name: String, raw: [UInt8]) {
        self.name = name
        self.raw = raw
    }
}

public struct HeaderBlock: Sendable, Equatable {
    public var fields: [HeaderField]

    /// How the header section ended.
    public enum Termination: Sendable, Equatable {
        /// An empty line; the body starts after it.
        case emptyLine
        /// A line that is neither a field nor a continuation (it is the
        /// first line of the body; no separator was present).
        case nonHeaderLine
        /// The data ended inside the header section (a message with no body).
        case endOfData
    }

    public init(fields: [HeaderField] = []) {
        self.fields = fields
    }

    /// Parses the header section at the start of `bytes`. Returns the block,
    /// how it ended, and the offset (relative to `bytes.startIndex`) where
    /// the body starts: after the empty line, at the non-header line, or at
    /// the end.
    public static func parse(_ bytes: ArraySlice<UInt8>) -> (block: HeaderBlock, termination: Termination, bodyOffset: Int) {
        var fields: [HeaderField] = []
        // The visitor never stops the walk: it always has an end.
        let (termination, bodyOffset) = walkFields(bytes) { name, lines in
            fields.append(HeaderField(name: String(decoding: name, as: UTF8.self), raw: Array(bytes[lines])))
            return true
        }!
        return (HeaderBlock(fields: fields), termination, bodyOffset)
    }

    /// The unfolded value of the first field named `name` (ASCII, any case)
    /// in the header section at the start of `bytes`: what
    /// `parse(bytes).block.first(name)?.value` gives, without building a
    /// field for every line (the queue looks up the Message-ID of every
    /// message it accepts).
    public static func firstValue(_ name: String, in bytes: ArraySlice<UInt8>) -> String? {
        var value: String?
        _ = walkFields(bytes) { fieldName, lines in
            guard equalsIgnoringCase(fieldName, name.utf8) else { return true }
            value = Self.value(ofField: bytes[lines])
            return false
        }
        return value
    }

    /// The one pass over the header section at the start of `bytes`:
    /// `visit` gets each field's name and its lines (continuations
    /// included, line ends too) until it returns false. Returns how the
    /// section ended and the offset (from `bytes.startIndex`) where the
    /// body starts; nil when `visit` stopped the walk first.
    private static func walkFields(_ bytes: ArraySlice<UInt8>,
                                   _ visit: (_ name: ArraySlice<UInt8>, _ lines: Range<Int>) -> Bool)
        -> (termination: Termination, bodyOffset: Int)? {
        var current: (name: ArraySlice<UInt8>, start: Int)?
        var pos = bytes.startIndex
        while pos < bytes.endIndex {
            let lineEnd = nextLineEnd(bytes, from: pos)
            let kind = shape(of: bytes[pos..<lineEnd], afterField: current != nil)
            if case .continuation = kind {
                pos = lineEnd
                continue
            }
            // Any other line ends the field before it.
            if let field = current, !visit(field.name, field.start..<pos) { return nil }
            current = nil
            switch kind {
            case .empty: return (.emptyLine, lineEnd - bytes.startIndex)
            case .other: return (.nonHeaderLine, pos - bytes.startIndex)
            case .field(let name): current = (name, pos)
            case .continuation: break
            }
            pos = lineEnd
        }
        if let field = current, !visit(field.name, field.start..<pos) { return nil }
        return (.endOfData, bytes.count)
    }

    public static func parse(_ bytes: [UInt8]) -> (block: HeaderBlock, termination: Termination, bodyOffset: Int) {
        parse(bytes[...])
    }

    /// The index just past the line end (LF, CRLF, or a lone CR) of the line
    /// starting at `from`, or the end of the data.
    static func nextLineEnd(_ bytes: ArraySlice<UInt8>, from: Int) -> Int {
        var i = from
        while i < bytes.endIndex {
            let b = bytes[i]
            if b == 10 { return i + 1 }
            if b == 13 {
                if i + 1 < bytes.endIndex && bytes[i + 1] == 10 { return i + 2 }
                return i + 1
            }
            i += 1
        }
        return i
    }

    public enum LineKind: Sendable, Equatable {
        case empty
        case field(name: String)
        case continuation
        case other
    }

    /// Classifies one line (line end included or not). A continuation is
    /// only one when it follows a field; a field name is 1..998 printable
    /// ASCII characters other than ':' (RFC 5322 ftext), optionally followed
    /// by white space before the colon (the obsolete syntax of section 4.5).
    public static func classify(line: ArraySlice<UInt8>, afterField: Bool) -> LineKind {
        switch shape(of: line, afterField: afterField) {
        case .empty: return .empty
        case .continuation: return .continuation
        case .other: return .other
        case .field(let name): return .field(name: String(decoding: name, as: UTF8.self))
        }
    }

    /// `classify` without making the name a String.
    private enum LineShape {
        case empty
        case field(ArraySlice<UInt8>)
        case continuation
        case other
    }

    private static func shape(of line: ArraySlice<UInt8>, afterField: Bool) -> LineShape {
        var content = line
        while let last = content.last, last == 10 || last == 13 { content = content.dropLast() }
        if content.isEmpty { return .empty }
        let first = content.first!
        if first == 32 || first == 9 { return afterField ? .continuation : .other }
        var i = content.startIndex
        while i < content.endIndex, content[i] >= 33, content[i] <= 126, content[i] != 58 { i += 1 }
        let nameEnd = i
        if nameEnd == content.startIndex || nameEnd - content.startIndex > 998 { return .other }
        while i < content.endIndex, content[i] == 32 || content[i] == 9 { i += 1 }
        guard i < content.endIndex, content[i] == 58 else { return .other }
        return .field(content[content.startIndex..<nameEnd])
    }

    /// A field's raw bytes (name, colon, value, line ends): the bytes after
    /// the colon, still folded.
    static func valueBytes(ofField raw: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        guard let colon = raw.firstIndex(of: UInt8(ascii: ":")) else { return raw[raw.endIndex...] }
        return raw[(colon + 1)...]
    }

    /// A field's raw bytes: its value unfolded (see HeaderField.value).
    static func value(ofField raw: ArraySlice<UInt8>) -> String {
        String(decoding: unfold(valueBytes(ofField: raw)), as: UTF8.self)
    }

    /// Removes line ends that precede white space, then any remaining line
    /// end, and trims white space at both ends.
    static func unfold(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        for b in bytes where b != 13 && b != 10 { out.append(b) }
        var s = out.startIndex, e = out.endIndex
        while s < e, out[s] == 32 || out[s] == 9 { s += 1 }
        while e > s, out[e - 1] == 32 || out[e - 1] == 9 { e -= 1 }
        return Array(out[s..<e])
    }

    static func equalsIgnoringCase(_ a: String, _ b: String) -> Bool {
        equalsIgnoringCase(a.utf8, b.utf8)
    }

    static func equalsIgnoringCase<X: Collection<UInt8>, Y: Collection<UInt8>>(_ x: X, _ y: Y) -> Bool {
        guard x.count == y.count else { return false }
        for (p, q) in zip(x, y) where p != q {
            let lp = (p >= 65 && p <= 90) ? p + 32 : p
            let lq = (q >= 65 && q <= 90) ? q + 32 : q
            if lp != lq { return false }
        }
        return true
    }

    // MARK: lookup and editing

    public func contains(_ name: String) -> Bool {
        fields.contains { $0.hasName(name) }
    }

    public func first(_ name: String) -> HeaderField? {
        fields.first { $0.hasName(name) }
    }

    /// The unfolded values of every field with this name, in order.
    public func values(_ name: String) -> [String] {
        fields.filter { $0.hasName(name) }.map(\.value)
    }

    /// Removes every field with this name; returns how many were removed.
    @discardableResult
    public mutating func removeAll(_ name: String) -> Int {
        let before = fields.count
        fields.removeAll { $0.hasName(name) }
        return before - fields.count
    }

    public mutating func append(_ name: String, _ value: String) {
        fields.append(HeaderField(name: name, value: value))
    }

    public mutating func prepend(_ name: String, _ value: String) {
        fields.insert(HeaderField(name: name, value: value), at: 0)
    }

    /// The fields' bytes in order, without the empty separator line. A
    /// field whose raw bytes end without a line end (data ended there) gets
    /// a CRLF, so that appending a separator cannot join it to the body.
    public func serialized() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(fields.reduce(0) { $0 + $1.raw.count + 2 })
        for f in fields {
            out.append(contentsOf: f.raw)
            if let last = f.raw.last, last != 10 && last != 13 { out.append(contentsOf: [13, 10]) }
        }
        return out
    }
}
