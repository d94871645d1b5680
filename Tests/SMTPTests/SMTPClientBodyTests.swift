import Testing
@testable import SMTP

func encodeBody(_ chunks: [[UInt8]]) -> [UInt8] {
    var e = SMTPDataEncoder()
    var out: [UInt8] = []
    for c in chunks { out += e.encode(c) }
    out += e.finish()
    #expect(e.bytesOut == UInt64(out.count))
    return out
}

@Suite struct SMTPClientBodyTests {
    struct Case: Sendable, CustomStringConvertible {
        var input: String
        var wire: String
        var description: String { input.debugDescription }
    }

    static let cases: [Case] = [
        Case(input: "", wire: ".\r\n"),
        Case(input: "a\r\n", wire: "a\r\n.\r\n"),
        Case(input: "a", wire: "a\r\n.\r\n"),                          // no final CRLF
        Case(input: "a\nb\n", wire: "a\r\nb\r\n.\r\n"),                 // bare LF
        Case(input: "a\rb\r", wire: "a\r\nb\r\n.\r\n"),                 // bare CR
        Case(input: "a\r\r\nb", wire: "a\r\n\r\nb\r\n.\r\n"),           // CR then CRLF
        Case(input: "a\n\rb", wire: "a\r\n\r\nb\r\n.\r\n"),             // LF CR: two line ends
        Case(input: ".", wire: "..\r\n.\r\n"),
        Case(input: ".\r\n", wire: "..\r\n.\r\n"),
        Case(input: "..x\r\n", wire: "...x\r\n.\r\n"),
        Case(input: "a\r\n.\r\nb\r\n", wire: "a\r\n..\r\nb\r\n.\r\n"),  // "\r\n.\r\n" inside the body
        Case(input: "a\n.\nb", wire: "a\r\n..\r\nb\r\n.\r\n"),          // the smuggling variant with bare LFs
        Case(input: "a\r.\rb", wire: "a\r\n..\r\nb\r\n.\r\n"),
        Case(input: "x.y\r\n .z\r\n", wire: "x.y\r\n .z\r\n.\r\n"),     // dots not at a line start stay
        Case(input: "\r\n", wire: "\r\n.\r\n"),
        Case(input: "\r\n\r\n", wire: "\r\n\r\n.\r\n"),
        Case(input: "a\r\n\r", wire: "a\r\n\r\n.\r\n"),                 // trailing bare CR
        Case(input: "h\u{0}\u{FF}\r\n", wire: "h\u{0}\u{FF}\r\n.\r\n"), // other bytes untouched
    ]

    @Test(arguments: cases)
    func encodesWhole(c: Case) {
        #expect(encodeBody([Array(c.input.utf8)]) == Array(c.wire.utf8))
    }

    /// Every way of cutting the input into two or three pieces (CR and LF
    /// in different chunks included) gives the same bytes.
    @Test(arguments: cases)
    func chunkBoundariesDoNotMatter(c: Case) {
        let input = Array(c.input.utf8)
        let expected = Array(c.wire.utf8)
        #expect(encodeBody(input.map { [$0] }) == expected)
        for i in 0...input.count {
            for j in i...input.count {
                let chunks = [Array(input[..<i]), Array(input[i..<j]), Array(input[j...])]
                #expect(encodeBody(chunks) == expected, "split at \(i), \(j)")
            }
        }
    }

    @Test func crAtTheEndOfAChunkIsHeldBack() {
        var e = SMTPDataEncoder()
        #expect(e.encode(Array("abc\r".utf8)) == Array("abc".utf8))
        #expect(e.encode(Array("\n.d".utf8)) == Array("\r\n..d".utf8))
        #expect(e.finish() == Array("\r\n.\r\n".utf8))
        #expect(e.finished)
    }

    @Test func randomBodiesMatchTheReference() {
        var rng = SplitMix(state: 0x5EA1_9057)
        let alphabet: [UInt8] = [13, 10, UInt8(ascii: "."), UInt8(ascii: "a"), UInt8(ascii: " "), 0]
        for _ in 0..<2000 {
            let input = (0..<rng.below(40)).map { _ in alphabet[rng.below(alphabet.count)] }
            var chunks: [[UInt8]] = []
            var rest = input[...]
            while !rest.isEmpty {
                let n = rng.below(rest.count) + 1
                chunks.append(Array(rest.prefix(n)))
                rest = rest.dropFirst(n)
            }
            let wire = encodeBody(chunks)
            #expect(wire == SMTPClientFuzz.Checker.referenceEncoding(input))
            // No bare CR or LF, and the only lone "." line is the last.
            let text = wire
            for (i, b) in text.enumerated() {
                if b == 10 { #expect(i > 0 && text[i - 1] == 13) }
                if b == 13 { #expect(i + 1 < text.count && text[i + 1] == 10) }
            }
            // Lines end with CRLF (checked above), so split at LF.
            let lines = text.split(separator: 10, omittingEmptySubsequences: false).dropLast().map { Array($0.dropLast()) }
            #expect(lines.firstIndex(of: [UInt8(ascii: ".")]) == lines.count - 1)
        }
    }

    @Test func bodyStreamsThroughTheSession() {
        let chunks = ["Subject: x\n", "\n.hidden\r", "\nline\r\n.\r", "\nlast"].map { Array($0.utf8) }
        for feed in Feed.allCases {
            let run = drive(clientPolicy(.none), message(["bob@example.net"]), peer: Peer(), feed: feed, bodies: [chunks])
            #expect(run.peer.messages == [Array("Subject: x\r\n\r\n..hidden\r\nline\r\n..\r\nlast\r\n".utf8)])
            #expect(run.status(1) == .sent)
        }
    }

    @Test func base64() {
        let cases = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="),
                     ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]
        for (plain, encoded) in cases {
            #expect(SMTPClientBase64.encode(Array(plain.utf8)) == Array(encoded.utf8))
        }
        #expect(SMTPClientBase64.encode([0, 0xFF, 0xFE]) == Array("AP/+".utf8))
    }
}
