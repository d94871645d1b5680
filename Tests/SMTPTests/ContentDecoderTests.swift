/// The DATA and BDAT decoders take runs of ordinary bytes in one step; here
/// they are checked against the plain byte-at-a-time decoders they replace,
/// on random content made of the bytes that matter (CR, LF, dot, NUL, 8-bit)
/// with small line and size limits, fed in random pieces.
import Testing
@testable import SMTP

/// The byte-at-a-time DATA decoder, the specification of DotDecoder.
private struct ReferenceDotDecoder {
    var checker: ContentChecker
    var atLineStart = true, sawCR = false, dotLine = false

    mutating func decode(_ input: [UInt8], from start: Int, upTo n: Int, into out: inout [UInt8]) -> (next: Int, ended: Bool) {
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
                checker.bare()
                dotLine = false
                atLineStart = false
            }
            switch b {
            case 13: sawCR = true
            case 10:
                checker.bare()
                atLineStart = false
                dotLine = false
            case UInt8(ascii: ".") where atLineStart:
                atLineStart = false
                dotLine = true
            default:
                atLineStart = false
                dotLine = false
                checker.byte(b)
                if checker.accepting { out.append(b) }
            }
        }
        return (i, false)
    }
}

/// The byte-at-a-time BDAT decoder, the specification of ChunkDecoder.
private struct ReferenceChunkDecoder {
    var checker: ContentChecker
    var sawCR = false

    mutating func decode(_ input: ArraySlice<UInt8>, into out: inout [UInt8]) {
        for b in input {
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
            }
        }
    }
}

private struct Case {
    let bytes: [UInt8]
    let pieces: [Int]
    let lineLimit: Int?
    let maxSize: UInt64
    let allow8Bit: Bool

    init(seed: UInt64) {
        var g = SplitMix(state: seed)   // the same cases on every run: a failure can be replayed
        // Mostly letters, in runs, with the bytes the decoders decide on;
        // a third of the cases without what refuses a message (bare CR or
        // LF, NUL, 8-bit, limits).
        let clean = Int.random(in: 0..<3, using: &g) == 0
        let special: [UInt8] = clean ? [UInt8(ascii: "."), UInt8(ascii: " ")]
                                     : [13, 10, UInt8(ascii: "."), 0, 0xC3, 0xA9, UInt8(ascii: " ")]
        var bytes: [UInt8] = []
        // One case in ten long, with long runs and limits near the real ones.
        let long = Int.random(in: 0..<10, using: &g) == 0
        let length = Int.random(in: 0...(long ? 6_000 : 400), using: &g)
        while bytes.count < length {
            if Int.random(in: 0..<3, using: &g) == 0 {
                bytes.append(special.randomElement(using: &g)!)
            } else if Int.random(in: 0..<4, using: &g) == 0 {
                bytes += [13, 10]
            } else {
                bytes += (0..<Int.random(in: 1...(long ? 1_500 : 40), using: &g)).map { _ in UInt8.random(in: 0x21...0x7E, using: &g) }
            }
        }
        if Bool.random(using: &g) { bytes += Array("\r\n.\r\n".utf8) }
        self.bytes = bytes
        var pieces: [Int] = []
        var left = bytes.count
        while left > 0 {
            let n = Int.random(in: 1...max(1, left), using: &g)
            pieces.append(n)
            left -= n
        }
        self.pieces = pieces
        lineLimit = !clean && Bool.random(using: &g) ? Int.random(in: 2...(long ? 1_000 : 60), using: &g) : nil
        maxSize = !clean && Bool.random(using: &g)
            ? (long ? [0, 1, 4_000, UInt64(Int.max), UInt64(Int.max) + 1, .max - 1].randomElement(using: &g)!
                    : UInt64.random(in: 0...300, using: &g))
            : .max
        allow8Bit = Bool.random(using: &g)
    }

    var checker: ContentChecker {
        ContentChecker(textLineLimit: lineLimit, allow8BitHeaders: allow8Bit, maxSize: maxSize)
    }
}

private func same(_ a: ContentChecker, _ b: ContentChecker) -> Bool {
    a.violation == b.violation && a.size == b.size && a.lineLength == b.lineLength && a.inHeaders == b.inHeaders
}

@Suite struct ContentDecoderRuns {
    @Test func dataDecoderMatchesTheByteAtATimeDecoder() {
        var checked = 0, refused = 0, ended = 0
        for seed in UInt64(1)...4000 {
            let c = Case(seed: seed)
            var fast = DotDecoder(checker: c.checker)
            var slow = ReferenceDotDecoder(checker: c.checker)
            var fastOut: [UInt8] = [], slowOut: [UInt8] = []
            var start = 0
            for piece in c.pieces {
                let end = start + piece
                var i = start
                // Both are fed what is left of the piece after an end.
                while i < end {
                    let f = fast.decode(c.bytes, from: i, upTo: end, into: &fastOut)
                    let s = slow.decode(c.bytes, from: i, upTo: end, into: &slowOut)
                    #expect(f.next == s.next && f.ended == s.ended, "seed \(seed)")
                    guard f.next == s.next, f.ended == s.ended else { return }
                    if f.ended {
                        ended += 1
                        fast = DotDecoder(checker: c.checker)
                        slow = ReferenceDotDecoder(checker: c.checker)
                        fastOut = []; slowOut = []
                    }
                    i = f.next
                }
                start = end
            }
            #expect(same(fast.checker, slow.checker), "seed \(seed)")
            // After a refusal the content is thrown away, so only an
            // accepted message's content must be the same.
            if slow.checker.accepting { #expect(fastOut == slowOut, "seed \(seed)") } else { refused += 1 }
            checked += 1
        }
        // The cases reach every outcome.
        #expect(checked == 4000 && refused > 500 && checked - refused > 500 && ended > 500)
    }

    @Test func chunkDecoderMatchesTheByteAtATimeDecoder() {
        var refused = 0
        for seed in UInt64(10_001)...14_000 {
            let c = Case(seed: seed)
            var fast = ChunkDecoder(checker: c.checker)
            var slow = ReferenceChunkDecoder(checker: c.checker)
            var fastOut: [UInt8] = [], slowOut: [UInt8] = []
            var start = 0
            for piece in c.pieces {
                fast.decode(c.bytes[start..<(start + piece)], into: &fastOut)
                slow.decode(c.bytes[start..<(start + piece)], into: &slowOut)
                start += piece
            }
            #expect(same(fast.checker, slow.checker), "seed \(seed)")
            if slow.checker.accepting { #expect(fastOut == slowOut, "seed \(seed)") } else { refused += 1 }
        }
        #expect(refused > 500 && 4000 - refused > 500)
    }

    /// Where a run crosses both limits, the one a byte at a time meets
    /// first is the one reported.
    @Test func theFirstLimitCrossedInARunIsReported() {
        var line = ContentChecker(textLineLimit: 12, allow8BitHeaders: false, maxSize: 20)
        line.ordinary(15)   // line limit (10 without CRLF) at the 11th byte, size at the 21st
        #expect(line.violation == .longLine)
        var size = ContentChecker(textLineLimit: 32, allow8BitHeaders: false, maxSize: 20)
        size.ordinary(25)   // size at the 21st byte, line (30) never
        #expect(size.violation == .tooBig)
        var both = ContentChecker(textLineLimit: 12, allow8BitHeaders: false, maxSize: 10)
        both.ordinary(11)   // both at the 11th byte: byte() checks the line first
        #expect(both.violation == .longLine)
        var none = ContentChecker(textLineLimit: 12, allow8BitHeaders: false, maxSize: 10)
        none.ordinary(10)
        #expect(none.violation == nil && none.size == 10 && none.lineLength == 10)
        // No limit at all: the largest size is no overflow.
        var unlimited = ContentChecker(textLineLimit: nil, allow8BitHeaders: false, maxSize: .max)
        unlimited.ordinary(Int.max)
        #expect(unlimited.violation == nil && unlimited.size == UInt64(Int.max))
    }
}
