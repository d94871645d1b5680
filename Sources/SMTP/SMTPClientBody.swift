/// The message body on its way out (RFC 5321 section 4.5.2): line ends
/// repaired and lines dot-stuffed, chunk by chunk, with the terminating
/// "<CRLF>.<CRLF>".

/// Streaming DATA encoder. Every line end in the input (CRLF, a bare LF, a
/// bare CR) leaves as CRLF; a line that starts with "." gets one more. A
/// CR at the end of a chunk is held until the next byte shows whether an
/// LF follows, so chunk boundaries never change the output. `finish()`
/// ends an unterminated last line with CRLF and appends ".\r\n": the
/// terminator is always exactly "\r\n.\r\n" after the last line of text,
/// and a "\r\n.\r\n" inside the body is stuffed to "\r\n..\r\n".
///
/// Repairing bare CR and LF is what the queue would have done already
/// (PROTOCOL.md: bodies have CRLF line ends); doing it here too means a
/// broken body can never end the DATA early or make the peer see a bare LF
/// (SMTP smuggling, CVE-2023-51766 and friends).
public struct SMTPDataEncoder: Sendable {
    private var atLineStart = true
    private var pendingCR = false
    /// Bytes produced so far.
    public private(set) var bytesOut: UInt64 = 0
    public private(set) var finished = false

    public init() {}

    public mutating func encode<C: Collection<UInt8>>(_ chunk: C) -> [UInt8] {
        precondition(!finished, "encode after finish")
        var out: [UInt8] = []
        out.reserveCapacity(chunk.count + chunk.count / 32 + 4)
        for b in chunk {
            if pendingCR {
                pendingCR = false
                out.append(13); out.append(10)
                atLineStart = true
                if b == 10 { continue }
            }
            switch b {
            case 13:
                pendingCR = true
            case 10:
                out.append(13); out.append(10)
                atLineStart = true
            case UInt8(ascii: ".") where atLineStart:
                out.append(b); out.append(b)
                atLineStart = false
            default:
                out.append(b)
                atLineStart = false
            }
        }
        bytesOut += UInt64(out.count)
        return out
    }

    public mutating func finish() -> [UInt8] {
        precondition(!finished, "finish twice")
        finished = true
        var out: [UInt8] = []
        if pendingCR {
            pendingCR = false
            out += [13, 10]
            atLineStart = true
        }
        if !atLineStart { out += [13, 10] }
        out += [UInt8(ascii: "."), 13, 10]
        bytesOut += UInt64(out.count)
        return out
    }
}

/// Base64 (RFC 4648 section 4) for AUTH PLAIN. Written here rather than
/// shared with the server's decoder: the client only ever encodes.
enum SMTPClientBase64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func encode(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = bytes[i]
            let b1 = i + 1 < bytes.count ? bytes[i + 1] : 0
            let b2 = i + 2 < bytes.count ? bytes[i + 2] : 0
            out.append(alphabet[Int(b0 >> 2)])
            out.append(alphabet[Int((b0 & 3) << 4 | b1 >> 4)])
            out.append(i + 1 < bytes.count ? alphabet[Int((b1 & 15) << 2 | b2 >> 6)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(b2 & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return out
    }
}
