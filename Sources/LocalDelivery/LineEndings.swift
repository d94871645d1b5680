// Line-end conversion for Maildir files. Messages travel between stages with
// CRLF line ends (RFC 5322 wire form); a Maildir file holds the message with
// the local convention, LF. The message arrives in chunks and a CRLF pair may
// be split across two of them, so the converter keeps a pending CR between
// calls. A CR not followed by LF is kept as it is: changing bare CRs would
// alter the content (and any signature over it) for no reason.

public struct CRLFToLFConverter: Sendable {
    /// A CR was the last byte of the previous chunk; we do not know yet whether
    /// an LF follows.
    private var pendingCR = false

    public init() {}

    /// Converts the next chunk, appending the result to `output`.
    public mutating func convert<C: Collection<UInt8>>(_ chunk: C, into output: inout [UInt8]) {
        output.reserveCapacity(output.count + chunk.count + 1)
        for byte in chunk {
            if pendingCR {
                pendingCR = false
                if byte == 0x0A {           // CR LF -> LF
                    output.append(0x0A)
                    continue
                }
                output.append(0x0D)         // bare CR, kept
            }
            if byte == 0x0D {
                pendingCR = true
            } else {
                output.append(byte)
            }
        }
    }

    /// Convenience form returning the converted bytes.
    public mutating func convert<C: Collection<UInt8>>(_ chunk: C) -> [UInt8] {
        var out: [UInt8] = []
        convert(chunk, into: &out)
        return out
    }

    /// Ends the stream: a CR held back at the very end is emitted as it is.
    public mutating func finish(into output: inout [UInt8]) {
        if pendingCR {
            output.append(0x0D)
            pendingCR = false
        }
    }
}
