import Testing
@testable import MailMessage

@Suite struct HeaderCompletionTests {
    static func run(_ input: String, splitAt cuts: [Int] = [], limit: Int = 64) -> String {
        var completion = StreamingHeaderCompletion(limit: limit) { block in block.append("X-Added", "yes") }
        let bytes = Array(input.utf8)
        var out: [UInt8] = []
        var start = 0
        for cut in cuts + [bytes.count] where cut >= start {
            out += completion.feed(bytes[start..<cut])
            start = cut
        }
        out += completion.finish()
        return String(decoding: out, as: UTF8.self)
    }

    @Test(arguments: [
        // The empty line ends the header: the field goes before it.
        ("A: 1\r\nB: 2\r\n\r\nbody\r\n", "A: 1\r\nB: 2\r\nX-Added: yes\r\n\r\nbody\r\n"),
        // Folded fields stay whole.
        ("A: 1\r\n  more\r\n\r\nbody\r\n", "A: 1\r\n  more\r\nX-Added: yes\r\n\r\nbody\r\n"),
        // A line that is no field ends the header; the empty line it lacked is added.
        ("A: 1\r\nnot a field\r\n", "A: 1\r\nX-Added: yes\r\n\r\nnot a field\r\n"),
        // No header at all: the fields, the empty line, then the body.
        ("just text\r\n", "X-Added: yes\r\n\r\njust text\r\n"),
        ("\r\nbody\r\n", "X-Added: yes\r\n\r\nbody\r\n"),
        // Header fields alone (the data ends there), with or without the last CRLF.
        ("A: 1\r\n", "A: 1\r\nX-Added: yes\r\n\r\n"),
        ("A: 1", "A: 1\r\nX-Added: yes\r\n\r\n"),
        ("", "X-Added: yes\r\n\r\n"),
        // A body line that looks like a field is body once the header ended.
        ("A: 1\r\n\r\nB: 2\r\n", "A: 1\r\nX-Added: yes\r\n\r\nB: 2\r\n"),
    ])
    func completesAtTheHeadersEnd(input: String, expected: String) {
        #expect(Self.run(input) == expected)
        // Split anywhere, one byte at a time included: the same bytes.
        let count = input.utf8.count
        for cut in 0...count { #expect(Self.run(input, splitAt: [cut]) == expected, "cut at \(cut)") }
        #expect(Self.run(input, splitAt: Array(0...count)) == expected)
    }

    /// Past the limit inside the header fields, the header goes on as the
    /// client wrote it (nothing added, nothing lost), also when no line end
    /// comes.
    @Test func aHeaderOverTheLimitPassesUnchanged() {
        let long = "A: " + String(repeating: "x", count: 70) + "\r\nB: 2\r\n\r\nbody\r\n"
        #expect(Self.run(long) == long)
        let fields = (0..<20).map { "F\($0): v\r\n" }.joined() + "\r\nbody\r\n"
        #expect(Self.run(fields) == fields)
        let endless = String(repeating: "y", count: 200)
        #expect(Self.run(endless, splitAt: [10, 100]) == endless)
    }

    @Test func originatorFieldsAreAddedWhenMissing() {
        var block = HeaderBlock.parse(Array("Subject: s\r\nDate: Thu, 3 Dec 2026 08:00:00 +0000\r\n\r\n".utf8)).block
        let added = OriginatorFields.addMissing(to: &block, resent: false, from: { "a@example.test" },
                                                hostname: "mx.example.test", unixTime: 1_796_284_800)
        #expect(added == ["From", "Message-ID"])
        #expect(block.first("From")?.value == "a@example.test")
        #expect(block.values("Date") == ["Thu, 3 Dec 2026 08:00:00 +0000"])
        #expect(block.first("Message-ID")?.value.hasSuffix("@mx.example.test>") == true)
        var resent = HeaderBlock.parse(Array("From: x@example.test\r\nDate: d\r\nMessage-ID: <m@x>\r\nResent-To: b@example.test\r\n\r\n".utf8)).block
        #expect(OriginatorFields.isResent(resent))
        #expect(OriginatorFields.addMissing(to: &resent, resent: true, from: { "a@example.test" },
                                            hostname: "mx.example.test", unixTime: 1_796_284_800)
                == ["Resent-From", "Resent-Date", "Resent-Message-ID"])
    }
}
