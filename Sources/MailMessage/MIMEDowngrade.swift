// 8-bit MIME content converted to 7 bit (RFC 6152 section 3) for a host
// that does not offer 8BITMIME, as Postfix's smtp client does by default
// (disable_mime_output_conversion = no, its mime_state.c): every leaf part
// whose body holds 8-bit bytes and whose Content-Transfer-Encoding is 8bit,
// 7bit or absent is re-encoded as quoted-printable (RFC 2045 section 6.7)
// and labelled so; multipart/* and message/rfc822 (message/global) are
// entered and their own label set to 7bit. Anything that holds no 8-bit
// byte is copied as it is, byte for byte, so that a 7-bit message (or part)
// never changes.
//
// What cannot be made 7-bit, and what happens to it:
//
// - Content-Transfer-Encoding: binary with 8-bit bytes: an error (5.6.3);
//   binary data has no line structure that quoted-printable could keep, and
//   the RFC allows returning the message instead.
// - A message without MIME-Version is not MIME (RFC 2045 section 4): no
//   label can be changed, so its body goes unchanged, as Postfix sends it
//   (its MIME parser sees a default text/plain 7bit body and never converts
//   one). The result says so (`Remark.nonMIMEBody`) for the log.
// - 8-bit bytes in header fields: sent unchanged, as Postfix does
//   (`Remark.headerFields`). RFC 2047 encoding would need to know which
//   fields are unstructured and which charset the bytes are in; a message
//   that is UTF-8 on purpose needs SMTPUTF8 instead, which the SMTP client
//   checks before it ever asks for this conversion.
// - 8-bit bytes inside a part already labelled quoted-printable or base64
//   (or an unknown encoding), or inside message/* types other than rfc822
//   and global (RFC 2046 allows no encoding for them): left unchanged, the
//   label would have to lie (`Remark.unconvertedPart`).
// - A multipart/* entity without a usable boundary parameter, nesting
//   deeper than `Limits.maximumDepth`, a header section over
//   `Limits.maximumHeaderBytes`, a boundary over
//   `Limits.maximumBoundaryLength`: errors (5.6.3) rather than a guess.
//
// Delimiter lines follow RFC 2046 section 5.1.1 exactly: "--" boundary,
// "--" for the close delimiter, then only white space (Python's email
// package reads them the same way); the line end before a delimiter
// belongs to it, not to the part. Each multipart/* looks for its own
// boundary only, in the range its parent gave it, so an inner part that
// lacks its close delimiter ends at the next outer one. The preamble and
// the epilogue are quoted-printable-encoded text when they hold 8-bit
// bytes (readers ignore them; the bytes stay recoverable). In the output
// of the encoder no line begins with "--" (the first '-' becomes "=2D"), so
// a soft line break can never make a delimiter out of a part's text.
//
// Memory: the input is one contiguous buffer (remote-deliver holds the
// job's body anyway, at most queue.message_size_limit); the output is
// built once, at most about 3.2 times the bytes converted. Recursion is
// bounded by `maximumDepth`; each level scans its own range once, so time
// is linear in the size times the depth. Nothing here traps on any input
// (fuzz/run-mime-downgrade).

/// The 8-bit to 7-bit conversion of a message body (header and body, CRLF
/// line ends as the queue stores them).
public enum MIMEDowngrade {
    public struct Limits: Sendable, Hashable {
        /// Nested multipart/* and message/* entities (Postfix's
        /// mime_nesting_limit is 100; 50 is plenty for real mail).
        public var maximumDepth = 50
        /// RFC 2046 allows 70; some software writes longer ones.
        public var maximumBoundaryLength = 256
        /// The header section of one entity (Postfix's header_size_limit
        /// is per field; the whole section is bounded here).
        public var maximumHeaderBytes = 262_144

        public init() {}
    }

    /// What was left 8-bit, for the log line. None of these stops delivery.
    public enum Remark: Sendable, Hashable, CustomStringConvertible {
        /// Header fields with 8-bit bytes (sent unchanged).
        case headerFields
        /// No MIME-Version: the 8-bit body went unchanged.
        case nonMIMEBody
        /// A part whose label does not allow re-encoding (the type and the
        /// transfer encoding, lower-cased), sent unchanged.
        case unconvertedPart(String)

        public var description: String {
            switch self {
            case .headerFields: return "8-bit header fields sent unchanged"
            case .nonMIMEBody: return "8-bit body of a message without MIME-Version sent unchanged"
            case .unconvertedPart(let what): return "8-bit data in a \(what) part sent unchanged"
            }
        }
    }

    public struct Result: Sendable, Equatable {
        /// The converted body (the input itself when nothing changed).
        public var body: [UInt8]
        /// Parts re-encoded as quoted-printable, preambles and epilogues
        /// included (0: `body` is the input).
        public var convertedParts: Int
        /// Each remark once, in the order met.
        public var remarks: [Remark]
    }

    /// Why the body cannot be converted: RFC 3463 5.6.3, "conversion
    /// required but not supported", for all of them (another MX that
    /// offers 8BITMIME may still take the message).
    public struct Failure: Error, Sendable, Hashable, CustomStringConvertible {
        public enum Kind: String, Sendable, Hashable {
            case binaryContent, nestingTooDeep, headerTooLarge, boundaryTooLong, multipartWithoutBoundary
        }
        public var kind: Kind
        /// "8-bit data in a part with Content-Transfer-Encoding: binary".
        public var reason: String

        public var description: String { reason }
    }

    /// Converts `body`. Without 8-bit bytes the result is `body` itself.
    public static func convert(_ body: [UInt8], limits: Limits = Limits()) throws(Failure) -> Result {
        guard has8Bit(body[...]) else { return Result(body: body, convertedParts: 0, remarks: []) }
        var converter = Converter(input: body, limits: limits)
        try converter.message()
        if converter.convertedParts == 0 { return Result(body: body, convertedParts: 0, remarks: converter.remarks) }
        return Result(body: converter.output, convertedParts: converter.convertedParts, remarks: converter.remarks)
    }

    static func has8Bit(_ bytes: ArraySlice<UInt8>) -> Bool {
        bytes.contains { $0 >= 0x80 }
    }
}

/// The Content-Type and Content-Transfer-Encoding of one entity.
struct MIMEEntityLabel: Equatable {
    enum Encoding: Equatable {
        case sevenBit, eightBit, binary, quotedPrintable, base64, other(String)
    }
    /// Lower-cased "type/subtype".
    var type: String
    var subtype: String
    var boundary: String?
    var encoding: Encoding
    /// A Content-Transfer-Encoding field was present.
    var encodingGiven: Bool

    /// The Content-Transfer-Encoding a composite entity gets once what it
    /// holds is 7 bit: "7bit" in place of a given 8bit or binary, nil (the
    /// field as it was) otherwise.
    var relabeledSevenBit: String? { encodingGiven && encoding != .sevenBit ? "7bit" : nil }

    var isIdentityEncoding: Bool {
        switch encoding {
        case .sevenBit, .eightBit, .binary: return true
        default: return false
        }
    }

    var encodingName: String {
        switch encoding {
        case .sevenBit: return "7bit"
        case .eightBit: return "8bit"
        case .binary: return "binary"
        case .quotedPrintable: return "quoted-printable"
        case .base64: return "base64"
        case .other(let name): return name
        }
    }

    init(header: HeaderBlock, defaultType: (String, String)) {
        (type, subtype) = defaultType
        boundary = nil
        encoding = .sevenBit
        encodingGiven = false
        if let field = header.first("Content-Type") {
            let parsed = MIMEParameterParser.contentType(Array(field.valueBytes))
            if let (t, s) = parsed.type {
                type = t
                subtype = s
                boundary = parsed.parameters["boundary"]
            }
        }
        if let field = header.first("Content-Transfer-Encoding") {
            encodingGiven = true
            let token = MIMEParameterParser.token(Array(field.valueBytes)) ?? ""
            switch token {
            case "7bit", "": encoding = .sevenBit
            case "8bit": encoding = .eightBit
            case "binary": encoding = .binary
            case "quoted-printable": encoding = .quotedPrintable
            case "base64": encoding = .base64
            default: encoding = .other(token)
            }
        }
    }
}

/// RFC 2045 section 5.1 syntax: type "/" subtype *(";" attribute "="
/// value), tokens or quoted strings, with comments (RFC 5322 CFWS) allowed
/// between them. Lenient where real mail is (a missing value, a trailing
/// ";"); attribute names are lower-cased, the first of a name wins.
enum MIMEParameterParser {
    static func contentType(_ value: [UInt8]) -> (type: (String, String)?, parameters: [String: String]) {
        var scanner = Scanner(bytes: value)
        guard let type = scanner.token(), scanner.skip(UInt8(ascii: "/")), let subtype = scanner.token() else {
            return (nil, [:])
        }
        var parameters: [String: String] = [:]
        while scanner.skip(UInt8(ascii: ";")) {
            guard let name = scanner.token() else { continue }
            guard scanner.skip(UInt8(ascii: "=")) else { continue }
            guard let value = scanner.quotedString() ?? scanner.token(lowercased: false) else { continue }
            if parameters[name] == nil { parameters[name] = value }
        }
        return ((type, subtype), parameters)
    }

    /// The first token, lower-cased (Content-Transfer-Encoding's value).
    static func token(_ value: [UInt8]) -> String? {
        var scanner = Scanner(bytes: value)
        return scanner.token()
    }

    struct Scanner {
        let bytes: [UInt8]
        var i = 0

        init(bytes: [UInt8]) { self.bytes = bytes }

        static func isTokenByte(_ b: UInt8) -> Bool {
            // RFC 2045 token: printable ASCII but SPACE and tspecials.
            guard b > 32 && b < 127 else { return false }
            return !"()<>@,;:\\\"/[]?=".utf8.contains(b)
        }

        /// Skips white space, line ends and (nested) comments.
        mutating func skipCFWS() {
            while i < bytes.count {
                let b = bytes[i]
                if b == 32 || b == 9 || b == 13 || b == 10 {
                    i += 1
                } else if b == UInt8(ascii: "(") {
                    var depth = 0
                    while i < bytes.count {
                        let c = bytes[i]
                        if c == UInt8(ascii: "\\") { i += 2; continue }
                        if c == UInt8(ascii: "(") { depth += 1 }
                        if c == UInt8(ascii: ")") { depth -= 1 }
                        i += 1
                        if depth == 0 { break }
                    }
                } else {
                    return
                }
            }
        }

        mutating func skip(_ byte: UInt8) -> Bool {
            skipCFWS()
            guard i < bytes.count, bytes[i] == byte else { return false }
            i += 1
            return true
        }

        mutating func token(lowercased: Bool = true) -> String? {
            skipCFWS()
            let start = i
            while i < bytes.count, Self.isTokenByte(bytes[i]) { i += 1 }
            guard i > start else { return nil }
            let text = String(decoding: bytes[start..<i], as: UTF8.self)
            return lowercased ? text.lowercased() : text
        }

        mutating func quotedString() -> String? {
            skipCFWS()
            guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { return nil }
            i += 1
            var out: [UInt8] = []
            while i < bytes.count {
                let b = bytes[i]
                i += 1
                if b == UInt8(ascii: "\"") { return String(decoding: out, as: UTF8.self) }
                if b == UInt8(ascii: "\\"), i < bytes.count {
                    out.append(bytes[i])
                    i += 1
                } else if b != 13 && b != 10 {
                    out.append(b)
                }
            }
            // Unterminated: what was there (a boundary is often all of it).
            return String(decoding: out, as: UTF8.self)
        }
    }
}

/// One conversion: walks the entities of `input` and appends to `output`.
struct MIMEDowngradeConverter {
    let input: [UInt8]
    let limits: MIMEDowngrade.Limits
    var output: [UInt8] = []
    var convertedParts = 0
    var remarks: [MIMEDowngrade.Remark] = []

    init(input: [UInt8], limits: MIMEDowngrade.Limits) {
        self.input = input
        self.limits = limits
        output.reserveCapacity(input.count + input.count / 8 + 256)
    }

    typealias Failure = MIMEDowngrade.Failure

    /// The next header written is an embedded message's that lacks
    /// MIME-Version (entity).
    private var addMIMEVersion = false

    mutating func remark(_ r: MIMEDowngrade.Remark) {
        if !remarks.contains(r) { remarks.append(r) }
    }

    /// The top level: a MIME message, or a non-MIME one left alone.
    mutating func message() throws(Failure) {
        let all = input.startIndex..<input.endIndex
        let header = try parseHeader(all)
        guard header.block.contains("MIME-Version") else {
            if MIMEDowngrade.has8Bit(input[all.lowerBound..<header.bodyStart]) { remark(.headerFields) }
            if MIMEDowngrade.has8Bit(input[header.bodyStart..<all.upperBound]) { remark(.nonMIMEBody) }
            return
        }
        try entity(all, depth: 0, defaultType: ("text", "plain"))
        // A part encoded without line structure (not text) ends in a soft
        // line break when it ends the message: the SMTP client adds a CRLF
        // after the last line, which must not become content.
        if input.last == 10 && output.last != 10 { output += Array("=\r\n".utf8) }
    }

    struct ParsedHeader {
        var block: HeaderBlock
        var termination: HeaderBlock.Termination
        /// Where the fields end: the separator (an empty line) follows.
        var fieldsEnd: Int
        var bodyStart: Int
    }

    func parseHeader(_ range: Range<Int>) throws(Failure) -> ParsedHeader {
        // At most the limit and one more line's worth is looked at, so a
        // body of header-like lines costs no more than the limit.
        let cap = min(range.upperBound, range.lowerBound + limits.maximumHeaderBytes + 1)
        let (block, termination, offset) = HeaderBlock.parse(input[range.lowerBound..<cap])
        // Cut at the cap, the section is too large unless it ended before
        // the cut: at an empty line, or at a non-header line seen whole.
        let capped = cap < range.upperBound
        let cutLine = termination == .nonHeaderLine
            && HeaderBlock.nextLineEnd(input[range], from: range.lowerBound + offset) > cap
        if capped && (termination == .endOfData || cutLine) || offset > limits.maximumHeaderBytes {
            throw Failure(kind: .headerTooLarge,
                          reason: "MIME header section over \(limits.maximumHeaderBytes) bytes, cannot convert to 7 bit")
        }
        let fieldsLength = block.fields.reduce(0) { $0 + $1.raw.count }
        return ParsedHeader(block: block, termination: termination, fieldsEnd: range.lowerBound + fieldsLength,
                            bodyStart: range.lowerBound + offset)
    }

    /// One entity (header and body) in `range`.
    mutating func entity(_ range: Range<Int>, depth: Int, defaultType: (String, String),
                         embeddedMessage: Bool = false) throws(Failure) {
        guard MIMEDowngrade.has8Bit(input[range]) else {
            output += input[range]
            return
        }
        let header = try parseHeader(range)
        // An embedded message without MIME-Version is no MIME entity (RFC
        // 2045 section 4): the Content-Transfer-Encoding its conversion gets
        // would mean nothing to a strict reader without one.
        addMIMEVersion = embeddedMessage && !header.block.contains("MIME-Version")
        defer { addMIMEVersion = false }
        if MIMEDowngrade.has8Bit(input[range.lowerBound..<header.fieldsEnd]) { remark(.headerFields) }
        let label = MIMEEntityLabel(header: header.block, defaultType: defaultType)
        let body = header.bodyStart..<range.upperBound
        guard MIMEDowngrade.has8Bit(input[body]) else {
            output += input[range]
            return
        }
        switch (label.type, label.subtype) {
        case ("multipart", _) where label.isIdentityEncoding:
            try multipart(range, header: header, label: label, depth: depth)
        case ("message", "rfc822") where label.isIdentityEncoding,
             ("message", "global") where label.isIdentityEncoding:
            try encapsulated(range, header: header, label: label, depth: depth)
        case ("message", "global-delivery-status"), ("message", "global-headers"),
             ("message", "global-disposition-notification"):
            // RFC 6533 section 6: these may be encoded as text is.
            try leaf(range, header: header, label: label)
        case ("message", _), ("multipart", _):
            remark(.unconvertedPart("\(label.type)/\(label.subtype) \(label.encodingName)"))
            output += input[range]
        default:
            try leaf(range, header: header, label: label)
        }
    }

    /// A leaf: re-encoded when its label allows.
    mutating func leaf(_ range: Range<Int>, header: ParsedHeader, label: MIMEEntityLabel) throws(Failure) {
        switch label.encoding {
        case .sevenBit, .eightBit:
            writeHeader(header, encoding: "quoted-printable")
            let mode: QuotedPrintableEncoder.Mode = label.type == "text" || label.type == "message" ? .text : .binary
            QuotedPrintableEncoder.encode(input[header.bodyStart..<range.upperBound], mode: mode, into: &output)
            convertedParts += 1
        case .binary:
            throw Failure(kind: .binaryContent,
                          reason: "8-bit data in a \(label.type)/\(label.subtype) part with Content-Transfer-Encoding: binary cannot be converted to 7 bit")
        case .quotedPrintable, .base64, .other:
            remark(.unconvertedPart("\(label.type)/\(label.subtype) \(label.encodingName)"))
            output += input[range]
        }
    }

    /// message/rfc822 (or message/global): the embedded message is an
    /// entity of its own, converted the same way; its label becomes 7bit.
    /// (RFC 6532 would let message/global be quoted-printable as a whole,
    /// which keeps its UTF-8 header fields 7-bit, but readers such as
    /// Python's email package then parse the encoded text as a message:
    /// the embedded message is converted instead, and 8-bit header fields
    /// in it stay, with a remark.)
    mutating func encapsulated(_ range: Range<Int>, header: ParsedHeader, label: MIMEEntityLabel, depth: Int) throws(Failure) {
        guard depth + 1 < limits.maximumDepth else { throw tooDeep() }
        writeHeader(header, encoding: label.relabeledSevenBit)
        try entity(header.bodyStart..<range.upperBound, depth: depth + 1, defaultType: ("text", "plain"),
                   embeddedMessage: true)
    }

    /// multipart/*: the preamble, each part between delimiter lines, the
    /// epilogue. Delimiter lines and their line ends are copied as they are.
    mutating func multipart(_ range: Range<Int>, header: ParsedHeader, label: MIMEEntityLabel, depth: Int) throws(Failure) {
        guard depth + 1 < limits.maximumDepth else { throw tooDeep() }
        guard let boundary = label.boundary, !boundary.isEmpty else {
            throw Failure(kind: .multipartWithoutBoundary,
                          reason: "\(label.type)/\(label.subtype) part without a boundary parameter cannot be converted to 7 bit")
        }
        guard boundary.utf8.count <= limits.maximumBoundaryLength else {
            throw Failure(kind: .boundaryTooLong,
                          reason: "MIME boundary over \(limits.maximumBoundaryLength) bytes, cannot convert to 7 bit")
        }
        let delimiter = Array("--".utf8) + Array(boundary.utf8)
        let partType = label.subtype == "digest" ? ("message", "rfc822") : ("text", "plain")
        writeHeader(header, encoding: label.relabeledSevenBit)

        var segmentStart = header.bodyStart      // the preamble, then each part
        var inPreamble = true
        var closed = false
        var lineStart = header.bodyStart
        while lineStart < range.upperBound && !closed {
            let lineEnd = HeaderBlock.nextLineEnd(input[range], from: lineStart)
            if let isClose = Self.delimiterLine(input[lineStart..<lineEnd], delimiter) {
                // The line end before the delimiter line belongs to it.
                var contentEnd = lineStart
                if lineStart > segmentStart {
                    contentEnd -= 1
                    if input[contentEnd] == 10 && contentEnd > segmentStart && input[contentEnd - 1] == 13 { contentEnd -= 1 }
                }
                if inPreamble {
                    writeText(segmentStart..<contentEnd)
                } else {
                    try entity(segmentStart..<contentEnd, depth: depth + 1, defaultType: partType)
                }
                output += input[contentEnd..<lineEnd]
                inPreamble = false
                closed = isClose
                segmentStart = lineEnd
            }
            lineStart = lineEnd
        }
        if closed || inPreamble {
            // The epilogue, or a body without any delimiter (all preamble).
            writeText(segmentStart..<range.upperBound)
        } else {
            // No close delimiter: the last part runs to the end.
            try entity(segmentStart..<range.upperBound, depth: depth + 1, defaultType: partType)
        }
    }

    /// Preamble and epilogue: ignored by readers, encoded when 8-bit.
    mutating func writeText(_ range: Range<Int>) {
        if MIMEDowngrade.has8Bit(input[range]) {
            QuotedPrintableEncoder.encode(input[range], mode: .text, into: &output)
            convertedParts += 1
        } else {
            output += input[range]
        }
    }

    /// The header section with Content-Transfer-Encoding set to `encoding`
    /// (nil: unchanged): the first such field is replaced where it stood,
    /// others dropped; without one the field goes last. A header section
    /// that ended without an empty line gets one after the new field.
    mutating func writeHeader(_ header: ParsedHeader, encoding: String?) {
        let start = header.fieldsEnd - header.block.fields.reduce(0) { $0 + $1.raw.count }
        guard let encoding else {
            output += input[start..<header.bodyStart]
            return
        }
        var field = Array("Content-Transfer-Encoding: \(encoding)\r\n".utf8)
        if addMIMEVersion {
            field = Array("MIME-Version: 1.0\r\n".utf8) + field
            addMIMEVersion = false
        }
        var written = false
        for f in header.block.fields {
            if f.hasName("Content-Transfer-Encoding") {
                if !written { output += field }
                written = true
                continue
            }
            output += f.raw
            if let last = f.raw.last, last != 10 && last != 13 { output += [13, 10] }
        }
        if !written { output += field }
        switch header.termination {
        case .emptyLine: output += input[header.fieldsEnd..<header.bodyStart]
        case .nonHeaderLine, .endOfData: output += [13, 10]
        }
    }

    func tooDeep() -> Failure {
        Failure(kind: .nestingTooDeep, reason: "MIME nesting deeper than \(limits.maximumDepth) levels, cannot convert to 7 bit")
    }

    /// nil: not a delimiter line; true: the close delimiter. RFC 2046
    /// 5.1.1: "--" boundary ["--"] then only white space to the line end.
    static func delimiterLine(_ line: ArraySlice<UInt8>, _ delimiter: [UInt8]) -> Bool? {
        guard line.count >= delimiter.count, line.prefix(delimiter.count).elementsEqual(delimiter) else { return nil }
        var rest = line.dropFirst(delimiter.count)
        while let last = rest.last, last == 10 || last == 13 || last == 32 || last == 9 { rest = rest.dropLast() }
        if rest.isEmpty { return false }
        return rest.elementsEqual("--".utf8) ? true : nil
    }
}

extension MIMEDowngrade {
    typealias Converter = MIMEDowngradeConverter
}

/// Quoted-printable (RFC 2045 section 6.7): printable ASCII but "=" as it
/// is, everything else as "=XX"; white space before a line end encoded;
/// output lines at most 76 characters, soft line breaks ("=" CRLF) where a
/// line is longer; a line never starts with "--" (see MIMEDowngrade).
enum QuotedPrintableEncoder {
    enum Mode {
        /// Text: CRLF (and a bare LF) are hard line breaks, kept as CRLF;
        /// a bare CR is data.
        case text
        /// Anything else: CR and LF are data ("=0D", "=0A"), the line
        /// structure comes from soft line breaks only (RFC 2045 6.7 (4)).
        case binary
    }

    static let hex = Array("0123456789ABCDEF".utf8)
    static let maximumLine = 76

    static func encode(_ bytes: ArraySlice<UInt8>, mode: Mode, into out: inout [UInt8]) {
        var column = 0
        var i = bytes.startIndex
        let end = bytes.endIndex
        while i < end {
            let b = bytes[i]
            if mode == .text && (b == 10 || (b == 13 && i + 1 < end && bytes[i + 1] == 10)) {
                out += [13, 10]
                column = 0
                i += b == 13 ? 2 : 1
                continue
            }
            let next = i + 1 < end ? bytes[i + 1] : nil
            let atLineEnd: Bool
            if let next {
                atLineEnd = mode == .text && (next == 10 || (next == 13 && i + 2 < end && bytes[i + 2] == 10))
            } else {
                atLineEnd = true
            }
            var escape = b >= 127 || b == UInt8(ascii: "=") || (b < 32 && b != 9)
            if (b == 32 || b == 9) && atLineEnd { escape = true }
            let width = escape ? 3 : 1
            // A soft break leaves room for its "="; the last unit of a
            // text line may use the 76th column. (Not so in binary mode:
            // at the end of a message the encoding ends with a soft break,
            // see MIMEDowngradeConverter.message().)
            let lastColumn = mode == .text && atLineEnd
            if column + width > maximumLine - 1 && !(lastColumn && column + width <= maximumLine) {
                out += [UInt8(ascii: "="), 13, 10]
                column = 0
            }
            if column == 0 && b == UInt8(ascii: "-") && next == UInt8(ascii: "-") { escape = true }
            if escape {
                out += [UInt8(ascii: "="), hex[Int(b >> 4)], hex[Int(b & 15)]]
                column += 3
            } else {
                out.append(b)
                column += 1
            }
            i += 1
        }
    }
}
