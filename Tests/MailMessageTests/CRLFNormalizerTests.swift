import Testing
@testable import MailMessage

@Suite struct CRLFNormalizerTests {
    /// Feeds `input` cut at every possible pair of positions and checks
    /// that the output never depends on the chunking.
    func allChunkings(_ input: [UInt8], dot: Bool) -> Set<[UInt8]> {
        var results = Set<[UInt8]>()
        for a in 0...input.count {
            for b in a...input.count {
                var n = CRLFNormalizer(dotTerminates: dot)
                var out: [UInt8] = []
                n.feed(input[0..<a], into: &out)
                n.feed(input[a..<b], into: &out)
                n.feed(input[b...], into: &out)
                n.finish(into: &out)
                results.insert(out)
            }
        }
        return results
    }

    @Test(arguments: [
        ("a\nb\n", "a\r\nb\r\n"),
        ("a\r\nb\r\n", "a\r\nb\r\n"),
        ("a\rb\r", "a\r\nb\r\n"),
        ("a\r\rb", "a\r\n\r\nb\r\n"),
        ("a\n\rb", "a\r\n\r\nb\r\n"),
        ("a\r\n\nb", "a\r\n\r\nb\r\n"),
        ("no newline", "no newline\r\n"),
        ("", ""),
        ("\n", "\r\n"),
        ("x\n.\ny\n", "x\r\n.\r\ny\r\n"),
        ("..\n", "..\r\n"),
    ])
    func lineEnds(input: String, expected: String) {
        let r = allChunkings(Array(input.utf8), dot: false)
        #expect(r == [Array(expected.utf8)], "\(r.map { String(decoding: $0, as: UTF8.self) })")
    }

    @Test(arguments: [
        ("x\n.\ny\n", "x\r\n"),
        ("x\r\n.\r\ny\r\n", "x\r\n"),
        ("x\r.\rjunk", "x\r\n"),
        (".\n", ""),
        ("x\n.", "x\r\n"),
        ("x\n..\ny\n", "x\r\n..\r\ny\r\n"),
        ("x\n.y\n", "x\r\n.y\r\n"),
        ("x.\ny", "x.\r\ny\r\n"),
        ("a\n. \nb", "a\r\n. \r\nb\r\n"),
    ])
    func dotTermination(input: String, expected: String) {
        let r = allChunkings(Array(input.utf8), dot: true)
        #expect(r == [Array(expected.utf8)], "\(r.map { String(decoding: $0, as: UTF8.self) })")
    }

    @Test func terminatedFlagAndLaterInputIgnored() {
        var n = CRLFNormalizer(dotTerminates: true)
        var out: [UInt8] = []
        n.feed(Array("a\n.".utf8), into: &out)
        #expect(!n.isTerminated)
        n.feed(Array("\nmore\n".utf8), into: &out)
        #expect(n.isTerminated)
        n.feed(Array("still more\n".utf8), into: &out)
        n.finish(into: &out)
        #expect(out == Array("a\r\n".utf8))
    }

    @Test func byteAtATimeLarge() {
        var g = SystemRandomNumberGenerator()
        let input = (0..<5000).map { _ in [UInt8(10), 13, 65, 46, 0, 0xff].randomElement(using: &g)! }
        var whole = CRLFNormalizer()
        let expected = whole.feed(input) + whole.finish()
        var single = CRLFNormalizer()
        var out: [UInt8] = []
        for b in input { single.feed([b], into: &out) }
        single.finish(into: &out)
        #expect(out == expected)
        // Every line end in the output is CRLF.
        for (i, b) in out.enumerated() {
            if b == 13 { #expect(i + 1 < out.count && out[i + 1] == 10) }
            if b == 10 { #expect(i > 0 && out[i - 1] == 13) }
        }
    }
}
