/// Streaming decoders for message content: DATA (dot-unstuffing, end at
/// <CRLF>.<CRLF> only) and BDAT chunks (RFC 3030, no stuffing), with the
/// content checks both share.
///
/// Smuggling (the 2023 "SMTP smuggling" family): only the exact sequence
/// CR LF "." CR LF ends DATA. A bare LF or bare CR never starts a line for the
/// purpose of the end marker, so "\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n",
/// "\r\n.\r" and the like are ordinary (and illegal) content. A bare CR or LF
/// marks the message as refused; decoding still continues to the real end
/// marker, so the client's next commands are read in sync.
///
/// Refusals, reported after the end of the data (and as `.abortMessage` as
/// soon as they are detected, so the I/O layer stops feeding the queue):
/// - bare CR or LF: 550 5.6.0 (RFC 5321 2.3.8 forbids them);
/// - NUL: 550 5.6.0;
/// - a text line over 998 octets plus CRLF: 554 5.6.0. Postfix silently
///   splits such lines; we refuse, since splitting changes the message and
///   would break signatures (RFC 5321 4.5.3.1.6);
/// - 8-bit octets in the header section without SMTPUTF8: 554 5.6.0
///   (5.6.7 names non-ASCII *addresses*, so the generic media code is used);
/// - more octets than the size limit: 552 5.3.4.

enum ContentViolation: Sendable, Hashable {
    case bareLineEnd, nul, longLine, eightBitHeader, tooBig

    var reply: SMTPReply {
        switch self {
        case .bareLineEnd: return SMTPReply(550, "5.6.0", "Message contains bare CR or LF")
        case .nul: return SMTPReply(550, "5.6.0", "Message contains NUL")
        case .longLine: return SMTPReply(554, "5.6.0", "Message contains a line longer than 998 octets")
        case .eightBitHeader: return SMTPReply(554, "5.6.0", "8-bit header without SMTPUTF8")
        case .tooBig: return SMTPReply(552, "5.3.4", "Message size exceeds fixed limit")
        }
    }
}

/// Checks applied to decoded content, line by line.
struct ContentChecker {
    /// Longest line without CRLF; nil: unlimited.
    let maxLineLength: Int?
    let allow8BitHeaders: Bool
    let maxSize: UInt64
    private(set) var size: UInt64 = 0
    private(set) var lineLength = 0
    private(set) var inHeaders = true
    private(set) var violation: ContentViolation?

    init(textLineLimit: Int?, allow8BitHeaders: Bool, maxSize: UInt64) {
        self.maxLineLength = textLineLimit.map { max(0, $0 - 2) }
        self.allow8BitHeaders = allow8BitHeaders
        self.maxSize = maxSize
    }

    var accepting: Bool { violation == nil }

    mutating func flag(_ v: ContentViolation) {
        if violation == nil { violation = v }
    }

    /// A content byte other than a line end.
    @inline(__always) mutating func byte(_ b: UInt8) {
        lineLength += 1
        size += 1
        if b == 0 { flag(.nul) }
        if b >= 0x80 && inHeaders && !allow8BitHeaders { flag(.eightBitHeader) }
        if let m = maxLineLength, lineLength > m { flag(.longLine) }
        if size > maxSize { flag(.tooBig) }
    }

    /// `count` content bytes that are none of CR, LF, NUL nor (in headers
    /// without SMTPUTF8) 8-bit: what `byte` would do for each of them,
    /// flagging the limit that the bytes one at a time would meet first.
    @inline(__always) mutating func ordinary(_ count: Int) {
        let oldLine = lineLength, oldSize = size
        lineLength += count
        size += UInt64(count)
        guard violation == nil else { return }
        // Offsets in the run of the first byte past each limit (byte()
        // checks the line before the size).
        var lineAt = Int.max, sizeAt = Int.max
        if let m = maxLineLength, lineLength > m { lineAt = m - oldLine }
        // No violation yet, so oldSize <= maxSize (any byte past it flags
        // one): the difference is below count.
        if size > maxSize { sizeAt = Int(maxSize - oldSize) }
        if lineAt != .max || sizeAt != .max { flag(lineAt <= sizeAt ? .longLine : .tooBig) }
    }

    /// Takes the run of ordinary bytes from `start` (up to the next CR,
    /// LF, NUL or, in headers without SMTPUTF8, 8-bit byte) in one step:
    /// checks it as `byte` would each of them and copies it to `out` while
    /// the message is acceptable. Returns the index after the run. Most of
    /// a message is such runs, which byte by byte were smtp-listen's
    /// costliest own code.
    @inline(__always) mutating func takeOrdinaryRun(_ input: UnsafeBufferPointer<UInt8>, from start: Int, upTo n: Int,
                                                    into out: inout [UInt8]) -> Int {
        let eightBitStops = inHeaders && !allow8BitHeaders
        var end = start
        // Eight bytes at a time while none of them stops the run (most of
        // a message, by far): a word with a CR, LF or NUL byte, or (when
        // those stop it) one with its top bit set, goes to the byte loop.
        if let base = input.baseAddress {
            let raw = UnsafeRawPointer(base)
            let ones: UInt64 = 0x0101_0101_0101_0101, highs: UInt64 = 0x8080_8080_8080_8080
            let highMask = eightBitStops ? highs : 0
            @inline(__always) func hasZeroByte(_ v: UInt64) -> Bool { (v &- ones) & ~v & highs != 0 }
            while end + 8 <= n {
                let word = raw.loadUnaligned(fromByteOffset: end, as: UInt64.self)
                if word & highMask != 0 || hasZeroByte(word) || hasZeroByte(word ^ (ones &* 13))
                    || hasZeroByte(word ^ (ones &* 10)) { break }
                end += 8
            }
        }
        while end < n {
            let b = input[end]
            if b == 13 || b == 10 || b == 0 || (eightBitStops && b >= 0x80) { break }
            end += 1
        }
        guard end > start else { return start }
        ordinary(end - start)
        if accepting { out.append(contentsOf: UnsafeBufferPointer(rebasing: input[start..<end])) }
        return end
    }

    /// A CRLF line end.
    @inline(__always) mutating func lineEnd() {
        if inHeaders && lineLength == 0 { inHeaders = false }
        lineLength = 0
        size += 2
        if size > maxSize { flag(.tooBig) }
    }

    /// A bare CR or LF (kept as content, the message is refused anyway).
    mutating func bare() {
        size += 1
        flag(.bareLineEnd)
    }
}

/// DATA decoder: dot-unstuffing and end detection.
struct DotDecoder {
    var checker: ContentChecker
    private var atLineStart = true     // just after CRLF (the DATA command's CRLF counts)
    private var sawCR = false
    private var dotLine = false        // the line so far is the single (stuffing) dot

    init(checker: ContentChecker) { self.checker = checker }

    /// Decodes `input[start..<n]`, appending content to `out` while the message
    /// is acceptable. Returns the index after the last consumed byte and
    /// whether the end marker was seen (then that index is just after it).
    mutating func decode(_ input: [UInt8], from start: Int, upTo n: Int, into out: inout [UInt8]) -> (next: Int, ended: Bool) {
        precondition(start >= 0 && n <= input.count)
        return input.withUnsafeBufferPointer { decode($0, from: start, upTo: n, into: &out) }
    }

    private mutating func decode(_ input: UnsafeBufferPointer<UInt8>, from start: Int, upTo n: Int,
                                 into out: inout [UInt8]) -> (next: Int, ended: Bool) {
        var i = start
        while i < n {
            let b = input[i]
            i += 1
            if sawCR {
                sawCR = false
                if b == 10 {
                    if dotLine { return (i, true) }
                    checker.lineEnd()
                    if checker.accepting { out.append(13); out.append(10) }
                    atLineStart = true
                    continue
                }
                // Bare CR: content, never a line start.
                checker.bare()
                dotLine = false
                atLineStart = false
            }
            switch b {
            case 13:
                sawCR = true
            case 10:
                checker.bare()
                atLineStart = false
                dotLine = false
            case UInt8(ascii: ".") where atLineStart:
                // RFC 5321 4.5.2: the first dot of a line is removed.
                atLineStart = false
                dotLine = true
            default:
                atLineStart = false
                dotLine = false
                checker.byte(b)
                if checker.accepting { out.append(b) }
                i = checker.takeOrdinaryRun(input, from: i, upTo: n, into: &out)
            }
        }
        return (i, false)
    }
}

/// BDAT decoder: the chunk bytes are the message, verbatim; only checked.
struct ChunkDecoder {
    var checker: ContentChecker
    private var sawCR = false

    init(checker: ContentChecker) { self.checker = checker }

    mutating func decode(_ input: ArraySlice<UInt8>, into out: inout [UInt8]) {
        input.withUnsafeBufferPointer { decode($0, into: &out) }
    }

    private mutating func decode(_ input: UnsafeBufferPointer<UInt8>, into out: inout [UInt8]) {
        var i = 0
        let n = input.count
        while i < n {
            let b = input[i]
            i += 1
            if sawCR {
                sawCR = false
                if b == 10 {
                    checker.lineEnd()
                    if checker.accepting { out.append(13); out.append(10) }
                    continue
                }
                checker.bare()
            }
            switch b {
            case 13: sawCR = true
            case 10: checker.bare()
            default:
                checker.byte(b)
                if checker.accepting { out.append(b) }
                i = checker.takeOrdinaryRun(input, from: i, upTo: n, into: &out)
            }
        }
    }

    /// After BDAT LAST: a trailing CR is bare; an unterminated last line
    /// gets its CRLF (the queue stores CRLF-terminated lines).
    mutating func finish(into out: inout [UInt8]) {
        if sawCR { checker.bare(); sawCR = false }
        if checker.lineLength > 0 {
            checker.lineEnd()
            if checker.accepting { out.append(13); out.append(10) }
        }
    }
}
