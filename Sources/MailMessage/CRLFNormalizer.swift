// Streaming line-end normalizer: LF, CR and CRLF all become CRLF, whatever
// the chunking of the input (a chunk may end between CR and LF, or between
// a line-initial "." and its line end). Used on what queue-inject reads from
// stdin, where Unix programs write LF and some Windows-born files CRLF.

public struct CRLFNormalizer: Sendable {
    /// sendmail's behaviour without -i / -oi: a line holding a single "."
    /// ends the input; everything after it is ignored. Lines starting with
    /// a dot are otherwise left alone (sendmail does not un-stuff dots).
    public var dotTerminates: Bool

    /// True once the "." line was seen (only with `dotTerminates`); further
    /// input is discarded.
    public private(set) var isTerminated = false

    private var lastWasCR = false
    private var atLineStart = true
    private var pendingDot = false

    public init(dotTerminates: Bool = false) {
        self.dotTerminates = dotTerminates
    }

    /// Normalizes `chunk`, appending the output to `out`.
    public mutating func feed<C: Collection<UInt8>>(_ chunk: C, into out: inout [UInt8]) {
        if isTerminated { return }
        out.reserveCapacity(out.count + chunk.count + chunk.count / 16)
        for b in chunk {
            if pendingDot {
                pendingDot = false
                if b == 13 || b == 10 {
                    // "." CR LF: the LF (if any) may come in the next chunk;
                    // it is discarded with everything else.
                    isTerminated = true
                    return
                }
                out.append(UInt8(ascii: "."))
                atLineStart = false
            }
            switch b {
            case 13:
                out.append(13); out.append(10)
                lastWasCR = true
                atLineStart = true
            case 10:
                if !lastWasCR { out.append(13); out.append(10) }
                lastWasCR = false
                atLineStart = true
            default:
                lastWasCR = false
                if atLineStart && dotTerminates && b == UInt8(ascii: ".") {
                    pendingDot = true
                    continue
                }
                atLineStart = false
                out.append(b)
            }
        }
    }

    /// Convenience: the normalized bytes of one chunk.
    public mutating func feed<C: Collection<UInt8>>(_ chunk: C) -> [UInt8] {
        var out: [UInt8] = []
        feed(chunk, into: &out)
        return out
    }

    /// End of input: a last line without a line end gets CRLF; a last line
    /// that is a lone "." (no line end) counts as the terminator.
    public mutating func finish(into out: inout [UInt8]) {
        if isTerminated { return }
        if pendingDot {
            pendingDot = false
            isTerminated = true
            return
        }
        if !atLineStart { out.append(13); out.append(10); atLineStart = true }
    }

    public mutating func finish() -> [UInt8] {
        var out: [UInt8] = []
        finish(into: &out)
        return out
    }
}
