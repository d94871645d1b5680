/// The client side's readers: server replies (RFC 5321 section 4.2) with
/// bounded memory, and the EHLO keywords (RFC 5321 4.1.1.1 and the
/// extension RFCs).

/// Why a reply was not acceptable. Becomes a `.protocolError`.
public struct SMTPReplyError: Error, Sendable, Hashable, CustomStringConvertible {
    public var reason: String
    init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Incremental reply parser. Feed bytes with `append`, take replies with
/// `next()`. Strict about structure, lenient about line ends:
///
/// - each line is a three-digit code whose first digit is 2-5, then "-"
///   (more lines follow) or " " or nothing (the last line); every line of
///   a reply has the same code;
/// - a line ends with CRLF; a bare LF is taken as a line end too (broken
///   servers exist, and a client must interoperate), a CR elsewhere in a
///   line is kept and sanitized to "?" like any control character;
/// - an empty line, a NUL, a line over `maxLineLength`, a reply over
///   `maxLines` lines or `maxBytes` bytes: error. The buffer never holds
///   more than one line plus what the I/O layer handed over in one call.
///
/// Enhanced status codes (RFC 2034) are taken from the text when it starts
/// with one whose class matches the reply code, whether or not the server
/// advertised ENHANCEDSTATUSCODES (the greeting comes before EHLO, and a
/// well-formed "5.1.1 " prefix cannot mean anything else); they are removed
/// from every line that repeats them.
public struct SMTPClientReplyParser: Sendable {
    public let limits: SMTPClientReplyLimits
    private var input: [UInt8] = []
    private var position = 0
    private var code: Int?
    private var lines: [[UInt8]] = []
    private var replyBytes = 0

    public init(limits: SMTPClientReplyLimits = SMTPClientReplyLimits()) {
        self.limits = limits
    }

    /// Bytes received and not yet part of a returned reply.
    public var hasBufferedInput: Bool { position < input.count || !lines.isEmpty }

    /// Bytes held (for the memory bound invariant).
    public var bufferedByteCount: Int { input.count - position + lines.reduce(0) { $0 + $1.count } }

    public mutating func append<C: Collection<UInt8>>(_ bytes: C) {
        if position > 0 && position == input.count {
            input.removeAll(keepingCapacity: true)
            position = 0
        } else if position > 4096 && position * 2 > input.count {
            input.removeSubrange(0..<position)
            position = 0
        }
        input.append(contentsOf: bytes)
    }

    /// The next complete reply, nil when more bytes are needed.
    public mutating func next() throws(SMTPReplyError) -> SMTPReply? {
        while true {
            guard let lf = input[position...].firstIndex(of: 10) else {
                if input.count - position > limits.maxLineLength + 1 {
                    throw SMTPReplyError("reply line longer than \(limits.maxLineLength) bytes")
                }
                return nil
            }
            var end = lf
            if end > position && input[end - 1] == 13 { end -= 1 }
            let line = Array(input[position..<end])
            let consumed = lf + 1 - position
            position = lf + 1
            if line.count > limits.maxLineLength {
                throw SMTPReplyError("reply line longer than \(limits.maxLineLength) bytes")
            }
            if line.isEmpty { throw SMTPReplyError("empty reply line") }
            if line.contains(0) { throw SMTPReplyError("NUL byte in reply") }
            guard line.count >= 3, (50...53).contains(line[0]),
                  (48...57).contains(line[1]), (48...57).contains(line[2])
            else { throw SMTPReplyError("malformed reply line: \(Self.show(line))") }
            let lineCode = Int(line[0] - 48) * 100 + Int(line[1] - 48) * 10 + Int(line[2] - 48)
            if let code, code != lineCode {
                throw SMTPReplyError("reply code changed from \(code) to \(lineCode) within a reply")
            }
            var last = true
            if line.count > 3 {
                switch line[3] {
                case UInt8(ascii: "-"): last = false
                case UInt8(ascii: " "): break
                default: throw SMTPReplyError("malformed reply line: \(Self.show(line))")
                }
            }
            code = lineCode
            replyBytes += consumed
            lines.append(line.count > 4 ? Array(line[4...]) : [])
            if lines.count > limits.maxLines { throw SMTPReplyError("reply longer than \(limits.maxLines) lines") }
            if replyBytes > limits.maxBytes { throw SMTPReplyError("reply longer than \(limits.maxBytes) bytes") }
            if last {
                let reply = Self.build(lineCode, lines)
                code = nil
                lines = []
                replyBytes = 0
                return reply
            }
        }
    }

    /// Splits off the enhanced status code and sanitizes (SMTPReply does).
    static func build(_ code: Int, _ lines: [[UInt8]]) -> SMTPReply {
        let cls = code / 100
        var status: EnhancedStatus?
        if cls != 3, let first = lines.first, let (s, _) = enhanced(first), s.codeClass == cls { status = s }
        let texts = lines.map { line -> String in
            if let status, let (s, rest) = enhanced(line), s == status { return String(decoding: rest, as: UTF8.self) }
            return String(decoding: line, as: UTF8.self)
        }
        return SMTPReply(code, status, texts)
    }

    /// "5.1.1 rest" -> (5.1.1, "rest"); "5.1.1" alone too.
    static func enhanced(_ line: [UInt8]) -> (EnhancedStatus, ArraySlice<UInt8>)? {
        var end = 0
        while end < line.count && line[end] != UInt8(ascii: " ") { end += 1 }
        guard end >= 5, end <= 9 else { return nil }
        guard let s = EnhancedStatus(parsing: String(decoding: line[0..<end], as: UTF8.self)) else { return nil }
        return (s, line[min(end + 1, line.count)...])
    }

    /// A line for an error message: printable, at most 80 characters.
    static func show(_ line: [UInt8]) -> String {
        let text = String(decoding: line.prefix(80).map { (32...126).contains($0) ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
        return "\"\(text)\(line.count > 80 ? "..." : "")\""
    }
}

/// What the server offered in its EHLO reply.
public struct SMTPServerCapabilities: Sendable, Hashable {
    public var extensions: SMTPExtensions = []
    /// SIZE's fixed maximum (RFC 1870); nil: no SIZE, "SIZE" alone, or 0
    /// (no limit).
    public var sizeLimit: UInt64?
    /// AUTH mechanisms, upper-cased (RFC 4954; also the old "AUTH=" form).
    public var authMechanisms: [String] = []
    /// The domain the server named in the first line of its EHLO reply.
    public var serverName: String?

    public init() {}

    /// Reads the keywords of a 250 EHLO reply; unknown ones are ignored,
    /// malformed ones too (a keyword is a letter or digit, then letters,
    /// digits and hyphens).
    public init(ehlo reply: SMTPReply) {
        self.init()
        if let first = reply.lines.first, let name = first.split(separator: " ").first { serverName = String(name) }
        for line in reply.lines.dropFirst() {
            let words = line.split(separator: " ")
            guard var keyword = words.first?.uppercased() else { continue }
            var params = words.dropFirst().map { String($0) }
            if keyword.hasPrefix("AUTH=") {  // pre-RFC 4954 form, still sent
                params = keyword.dropFirst(5).split(separator: " ").map(String.init) + params
                keyword = "AUTH"
            }
            guard let f = keyword.utf8.first, Self.isAlnum(f),
                  keyword.utf8.allSatisfy({ Self.isAlnum($0) || $0 == UInt8(ascii: "-") })
            else { continue }
            switch keyword {
            case "PIPELINING": extensions.insert(.pipelining)
            case "SIZE":
                extensions.insert(.size)
                if let p = params.first, p.utf8.count <= 19, p.utf8.allSatisfy({ (48...57).contains($0) }),
                   let n = UInt64(p), n > 0 { sizeLimit = n }
            case "8BITMIME": extensions.insert(.eightBitMIME)
            case "SMTPUTF8": extensions.insert(.smtputf8)
            case "ENHANCEDSTATUSCODES": extensions.insert(.enhancedStatusCodes)
            case "DSN": extensions.insert(.dsn)
            case "CHUNKING": extensions.insert(.chunking)
            case "STARTTLS": extensions.insert(.startTLS)
            case "REQUIRETLS": extensions.insert(.requireTLS)
            case "AUTH":
                extensions.insert(.auth)
                for m in params.map({ $0.uppercased() }) where !authMechanisms.contains(m) { authMechanisms.append(m) }
            default: break
            }
        }
    }

    private static func isAlnum(_ b: UInt8) -> Bool {
        (48...57).contains(b) || (65...90).contains(b) || (97...122).contains(b)
    }
}
