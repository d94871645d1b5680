import Testing
@testable import MailMessage

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }
func text(_ b: [UInt8]) -> String { String(decoding: b, as: UTF8.self) }

@Suite struct HeaderBlockTests {
    @Test func splitUnfoldLookup() {
        let m = bytes("Subject: hello\r\n  world\r\nTO: a@example.org\r\nX-Empty:\r\nto: b@example.org\r\n\r\nbody\r\nline: 2\r\n")
        let (block, term, off) = HeaderBlock.parse(m)
        #expect(term == .emptyLine)
        #expect(text(Array(m[off...])) == "body\r\nline: 2\r\n")
        #expect(block.fields.map(\.name) == ["Subject", "TO", "X-Empty", "to"])
        #expect(block.first("subject")?.value == "hello  world")
        #expect(block.values("To") == ["a@example.org", "b@example.org"])
        #expect(block.first("x-empty")?.value == "")
        #expect(!block.contains("Cc"))
        // Untouched fields keep their bytes.
        #expect(block.serialized() == Array(m[..<(off - 2)]))
    }

    /// A value without the blanks around it (the queue logs the
    /// Message-ID as `value` gives it).
    @Test func valueWithoutSurroundingBlanks() {
        func value(_ v: String) -> String? {
            HeaderBlock.parse(bytes("Message-ID:\(v)\r\n\r\n")).block.first("Message-ID")?.value
        }
        #expect(value(" \t<a@example.org> \t") == "<a@example.org>")
        #expect(value("<a@example.org>") == "<a@example.org>")
        #expect(value(" \t \t") == "")
        #expect(value("") == "")
        #expect(value(" <jörg@例え.jp>\t") == "<jörg@例え.jp>")
        #expect(value("\té") == "é")
        #expect(value("a b") == "a b")
    }

    @Test func removeAndAdd() {
        var (block, _, _) = HeaderBlock.parse(bytes("From: x@y\nBcc: secret@example.org,\n\tother@example.org\nSubject: s\n\n"))
        #expect(block.removeAll("BCC") == 1)
        block.append("Date", "Thu, 1 Jan 1970 00:00:00 +0000")
        block.prepend("Received", "by h; now")
        #expect(text(block.serialized()) == "Received: by h; now\r\nFrom: x@y\nSubject: s\nDate: Thu, 1 Jan 1970 00:00:00 +0000\r\n")
    }

    @Test func addedValuesCannotInjectFields() {
        let f = HeaderField(name: "Subject", value: "a\r\nBcc: evil@example.org")
        #expect(text(f.raw) == "Subject: a  Bcc: evil@example.org\r\n")
    }

    @Test func noSeparatorBodyLine() {
        let m = bytes("Subject: x\r\nThis is not a header\r\nmore\r\n")
        let (block, term, off) = HeaderBlock.parse(m)
        #expect(term == .nonHeaderLine)
        #expect(block.fields.count == 1)
        #expect(text(Array(m[off...])) == "This is not a header\r\nmore\r\n")
    }

    @Test func onlyHeadersNoFinalLineEnd() {
        let (block, term, off) = HeaderBlock.parse(bytes("A: 1\r\nB: 2"))
        #expect(term == .endOfData)
        #expect(off == 10)
        #expect(text(block.serialized()) == "A: 1\r\nB: 2\r\n")
    }

    @Test func firstLineContinuationIsBody() {
        let (block, term, off) = HeaderBlock.parse(bytes(" folded: no\r\n"))
        #expect(block.fields.isEmpty && term == .nonHeaderLine && off == 0)
    }

    @Test(arguments: [
        ("Subject: x", HeaderBlock.LineKind.field(name: "Subject")),
        ("Subject : x\r\n", .field(name: "Subject")),
        ("X-\u{1}: x\r\n", .other),
        (": x\r\n", .other),
        ("Sub ject: x\r\n", .other),
        ("Sübject: x\r\n", .other),
        ("\r\n", .empty),
        ("\n", .empty),
        ("From user Thu Jan 1 00:00:00 1970\n", .other),
        ("NoColon\r\n", .other),
    ])
    func classify(line: String, kind: HeaderBlock.LineKind) {
        #expect(HeaderBlock.classify(line: bytes(line)[...], afterField: true) == kind)
    }

    @Test func hostileInputs() {
        // NUL, 8-bit bytes, bare CRs, a huge line: parsing terminates and
        // every byte is accounted for.
        var m = bytes("X-Nul: a\0b\r\nX-8bit: \u{e9}\u{ff}\r\n")
        m.append(contentsOf: [0x58, 0x3a, 0xff, 0xfe, 0x0d, 0x0a])
        m.append(contentsOf: bytes("X-Long: ") + [UInt8](repeating: 65, count: 2_000_000) + [13, 10])
        m.append(contentsOf: bytes("Y: cr\rZ: lone\r\r\nbody"))
        let (block, term, off) = HeaderBlock.parse(m)
        #expect(block.fields.map(\.name) == ["X-Nul", "X-8bit", "X", "X-Long", "Y", "Z"])
        #expect(term == .emptyLine)
        #expect(text(Array(m[off...])) == "body")
        #expect(block.first("x-long")!.value.utf8.count == 2_000_000)
        #expect(block.serialized().count + 2 + 4 == m.count)  // + "\r\n" + "body"

        // Random bytes never trap.
        var g = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let n = Int.random(in: 0..<300, using: &g)
            let r = (0..<n).map { _ in [UInt8(10), 13, 58, 32, 9, 65, 0, 0xff].randomElement(using: &g)! }
            let (b, _, o) = HeaderBlock.parse(r)
            #expect(o >= 0 && o <= r.count)
            _ = b.serialized()
        }
    }

    /// firstValue gives what the full parse gives, on chosen cases and on
    /// random ones (from bytes that make fields, folds, blanks and ends).
    @Test func firstValueAgreesWithTheFullParse() {
        func same(_ m: [UInt8], _ name: String, sourceLocation: SourceLocation = #_sourceLocation) {
            #expect(HeaderBlock.firstValue(name, in: m[...]) == HeaderBlock.parse(m).block.first(name)?.value,
                    "\(text(m).debugDescription) \(name)", sourceLocation: sourceLocation)
        }
        let cases = [
            "Message-ID: <a@example.org>\r\n\r\nbody",
            "Subject: x\r\nmessage-id:\r\n <folded@example.org>\r\n\tmore\r\nTo: y\r\n\r\n",
            "Subject: x\r\nMESSAGE-ID : <obsolete@example.org>\r\n",
            "Message-ID: <first@example.org>\r\nMessage-ID: <second@example.org>\r\n\r\n",
            "Subject: x\r\nnot a header line\r\nMessage-ID: <body@example.org>\r\n",
            "Subject: x\r\n\r\nMessage-ID: <body@example.org>\r\n",
            " Message-ID: <continuation-first@example.org>\r\n",
            "Message-ID: <no-line-end@example.org>",
            "Message-IDX: <other@example.org>\r\nMessage-I: <short@example.org>\r\n",
            "Message-ID: <lf@example.org>\n more\nTo: y\n\n",
            "",
        ]
        for m in cases {
            same(bytes(m), "Message-ID")
            same(bytes(m), "To")
        }
        // The two share their walk over the lines: some values spelled out.
        let expected: [String?] = ["<a@example.org>", "<folded@example.org>\tmore", "<obsolete@example.org>",
                                   "<first@example.org>", nil, nil, nil, "<no-line-end@example.org>", nil,
                                   "<lf@example.org> more", nil]
        for (m, value) in zip(cases, expected) {
            #expect(HeaderBlock.firstValue("message-id", in: bytes(m)[...]) == value, "\(m.debugDescription)")
        }
        var g = SystemRandomNumberGenerator()
        let pieces = ["M: ", "m :", "To: ", "\r\n", "\n", "\r", " ", "\t", "x", ":", "\u{0}", "\u{e9}"].map(bytes)
        for _ in 0..<2000 {
            let m = (0..<Int.random(in: 0..<24, using: &g)).flatMap { _ in pieces.randomElement(using: &g)! }
            same(m, "M")
            same(m, "to")
        }
    }
}
