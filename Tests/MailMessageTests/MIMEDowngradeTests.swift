import Foundation
import Testing
@testable import MailMessage

/// The 8-bit to 7-bit conversion for hosts without 8BITMIME (RFC 6152
/// section 3). Every converted message is read back by Python's `email`
/// package, an independent MIME implementation: the same tree of parts and
/// content types, each leaf's decoded bytes equal to the original's, every
/// byte 7-bit, quoted-printable lines of at most 76 characters, no defect
/// the original did not have.
@Suite struct MIMEDowngradeTests {
    /// "\n" -> CRLF, so that the messages below stay readable.
    static func crlf(_ text: String) -> [UInt8] {
        var out: [UInt8] = []
        for b in text.utf8 {
            if b == 10 { out += [13, 10] } else { out.append(b) }
        }
        return out
    }

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var message: [UInt8]
        var convertedParts: Int
        var remarks: [MIMEDowngrade.Remark] = []
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "single text part, 8bit", message: crlf("""
            MIME-Version: 1.0
            Subject: greetings
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            Grüße aus Köln
            Zeile zwei

            """), convertedParts: 1),
        Case(name: "multipart/alternative", message: crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/alternative; boundary="alt-1"

            --alt-1
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            Café crème
            --alt-1
            Content-Type: text/html; charset=utf-8
            Content-Transfer-Encoding: 8bit

            <p>Café crème</p>
            --alt-1--

            """), convertedParts: 2),
        Case(name: "nested multipart with a base64 attachment", message: crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary=outer
            Content-Transfer-Encoding: 8bit

            This is a multi-part message in MIME format.
            --outer
            Content-Type: multipart/alternative;
             boundary="inner"

            --inner
            Content-Type: text/plain; charset=iso-8859-1
            Content-Transfer-Encoding: 8bit

            \u{E6}\u{F8}\u{E5} (UTF-8 under a Latin-1 label: bytes are bytes)
            --inner
            Content-Type: text/html; charset=utf-8

            <b>naïve</b> — no CTE field, 8-bit all the same
            --inner--
            --outer
            Content-Type: application/octet-stream; name=a.bin
            Content-Transfer-Encoding: base64

            AAECAwQFBgcICQ==
            --outer--
            epilogue

            """), convertedParts: 2),
        Case(name: "message/rfc822 with 8-bit inside", message: crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary="b1"

            --b1
            Content-Type: text/plain

            Forwarded below.
            --b1
            Content-Type: message/rfc822
            Content-Transfer-Encoding: 8bit

            From: a@example.net
            Subject: inner
            MIME-Version: 1.0
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            Inner text: ½ € ü
            --b1--

            """), convertedParts: 1),
        Case(name: "long lines, '=' and trailing white space", message: crlf("""
            MIME-Version: 1.0
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            \(String(repeating: "é=a b ", count: 60))
            trailing space 
            trailing tab\t
            a=b=c and ünïcödé \(String(repeating: "x", count: 200))
            --not-a-boundary at the start of a line; \(String(repeating: "-", count: 100))

            """), convertedParts: 1),
        Case(name: "CRLF, empty lines, a bare CR", message: crlf("""
            MIME-Version: 1.0
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            first ä


            after two empty lines\rbare CR
            last line without a line end: ö
            """), convertedParts: 1),
        Case(name: "non-text 8bit part keeps every byte", message: crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary=zz

            --zz
            Content-Type: application/x-data
            Content-Transfer-Encoding: 8bit

            \u{1}\u{2}ÿ line
            second \t
            --zz--

            """), convertedParts: 1),
        Case(name: "a top-level non-text part ending the message", message: crlf("""
            MIME-Version: 1.0
            Content-Type: application/octet-stream
            Content-Transfer-Encoding: 8bit

            ÿþ data
            with lines

            """), convertedParts: 1),
        Case(name: "no close delimiter", message: crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary="open"

            --open
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            the last part runs to the end: é

            """), convertedParts: 1),
        Case(name: "delimiters with white space, look-alike lines and an 8-bit preamble", message: crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary="with space"

            préambule
            --with space  
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            --with spaceX is text, not a delimiter: ü
            aaa\(String(repeating: "ü", count: 12))--with space (after a soft line break)
            --with space--\t
            épilogue

            """), convertedParts: 3),
        Case(name: "message/global with UTF-8 header fields (they stay)", message: crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary=g

            --g
            Content-Type: message/global

            From: José <jose@example.net>
            Subject: ¡Hola!

            Cuerpo ñ
            --g--

            """), convertedParts: 1, remarks: [.headerFields]),
        Case(name: "8-bit header fields stay, the body is converted", message: crlf("""
            MIME-Version: 1.0
            Subject: Grüße
            Content-Type: text/plain; charset=utf-8

            Grüße

            """), convertedParts: 1, remarks: [.headerFields]),
        Case(name: "quoted-printable part with stray 8-bit bytes", message: crlf("""
            MIME-Version: 1.0
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: quoted-printable

            caf=C3=A9 and raw é

            """), convertedParts: 0, remarks: [.unconvertedPart("text/plain quoted-printable")]),
    ]

    @Test(arguments: cases)
    func convertsAndPythonReadsTheSameContent(_ c: Case) throws {
        let result = try MIMEDowngrade.convert(c.message)
        #expect(result.convertedParts == c.convertedParts)
        #expect(result.remarks == c.remarks)
        if c.remarks.isEmpty {
            #expect(result.body.allSatisfy { $0 < 0x80 }, "\(String(decoding: result.body, as: UTF8.self))")
        }
        // Converting again changes nothing: the output is 7-bit MIME.
        if c.remarks.isEmpty {
            #expect(try MIMEDowngrade.convert(result.body).body == result.body)
        }
        try Self.pythonAgrees(original: c.message, converted: result.body, sevenBit: c.remarks.isEmpty)
    }

    @Test func exactOutputOfASimplePart() throws {
        let input = Self.crlf("""
            MIME-Version: 1.0
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8BIT
            X-After: kept

            a=b é\u{20}
            c\t
            -- signature
            """)
        let result = try MIMEDowngrade.convert(input)
        #expect(String(decoding: result.body, as: UTF8.self) == String(decoding: Self.crlf("""
            MIME-Version: 1.0
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: quoted-printable
            X-After: kept

            a=3Db =C3=A9=20
            c=09
            =2D- signature
            """), as: UTF8.self))
    }

    /// An embedded message without MIME-Version (a returned non-MIME
    /// original, say) is no MIME entity: the Content-Transfer-Encoding its
    /// conversion gets comes with a MIME-Version, or a strict reader shows
    /// the encoded text. One that has it keeps its own.
    @Test func anEmbeddedNonMIMEMessageGetsAMIMEVersion() throws {
        let input = Self.crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/report; boundary="B"

            --B
            Content-Type: message/rfc822

            Subject: caf\u{e9}

            Gr\u{fc}\u{df}e
            --B
            Content-Type: message/rfc822

            MIME-Version: 1.0
            Subject: x

            \u{e9}
            --B--
            """)
        let result = try MIMEDowngrade.convert(input)
        let text = String(decoding: result.body, as: UTF8.self)
        #expect(text.contains(String(decoding: Self.crlf("""
            Content-Type: message/rfc822

            Subject: caf\u{e9}
            MIME-Version: 1.0
            Content-Transfer-Encoding: quoted-printable

            Gr=C3=BC=C3=9Fe
            """), as: UTF8.self)), "\(text)")
        #expect(text.contains(String(decoding: Self.crlf("""
            MIME-Version: 1.0
            Subject: x
            Content-Transfer-Encoding: quoted-printable

            =C3=A9
            """), as: UTF8.self)), "\(text)")
        #expect(text.components(separatedBy: "MIME-Version").count == 4)
    }

    @Test func softBreaksAtSeventySixColumns() throws {
        let line = String(repeating: "é", count: 40)       // 80 bytes, 240 encoded
        let result = try MIMEDowngrade.convert(Self.crlf("MIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n\n\(line)\n"))
        let text = String(decoding: result.body, as: UTF8.self)
        let body = text.components(separatedBy: "\r\n\r\n")[1]
        let lines = body.components(separatedBy: "\r\n").dropLast()
        #expect(lines.count == 4)
        #expect(lines.dropLast().allSatisfy { $0.count <= 76 && $0.hasSuffix("=") })
        #expect(lines.allSatisfy { $0.count <= 76 })
        #expect(lines.joined().replacingOccurrences(of: "=", with: "").count == 240 / 3 * 2)
    }

    @Test func sevenBitMessagesAreUnchangedByteForByte() throws {
        let messages = [
            Self.crlf("""
                MIME-Version: 1.0
                Content-Type: multipart/mixed; boundary=x
                Content-Transfer-Encoding: 8bit

                --x
                Content-Type: text/plain
                Content-Transfer-Encoding: 8bit

                Only ASCII, although the label says 8bit; a line longer than seventy-six characters stays as it is.
                --x
                Content-Type: text/plain; charset=utf-8
                Content-Transfer-Encoding: quoted-printable

                caf=C3=A9
                --x--
                """),
            Self.crlf("Subject: no MIME at all\n\nplain text\n"),
            [],
        ]
        for m in messages {
            let result = try MIMEDowngrade.convert(m)
            #expect(result.body == m)
            #expect(result.convertedParts == 0 && result.remarks.isEmpty)
        }
        // 8-bit in one part: the other parts keep their bytes.
        let mixed = Self.crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary=x

            --x
            Content-Type: text/plain
            Content-Transfer-Encoding: 8bit

            ASCII =, and a line longer than seventy-six characters, which nobody needs to touch here.
            --x
            Content-Type: text/plain; charset=utf-8
            Content-Transfer-Encoding: 8bit

            é
            --x--

            """)
        let result = try MIMEDowngrade.convert(mixed)
        let text = String(decoding: result.body, as: UTF8.self)
        #expect(text.contains("\r\n\r\nASCII =, and a line longer than seventy-six characters, which nobody needs to touch here.\r\n--x\r\n"))
        #expect(text.contains("Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n--x--"))
    }

    @Test func binaryIsRefused() {
        let message = Self.crlf("""
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary=x

            --x
            Content-Type: image/png
            Content-Transfer-Encoding: binary

            \u{89}PNG
            --x--
            """)
        #expect(throws: MIMEDowngrade.Failure.self) { try MIMEDowngrade.convert(message) }
        do {
            _ = try MIMEDowngrade.convert(message)
        } catch {
            #expect(error.kind == .binaryContent)
            #expect(error.reason == "8-bit data in a image/png part with Content-Transfer-Encoding: binary cannot be converted to 7 bit")
        }
    }

    @Test func nonMIMEMessageIsSentAsPostfixSendsIt() throws {
        let message = Self.crlf("From: a@example.net\nSubject: Grüße\n\nGrüße\n")
        let result = try MIMEDowngrade.convert(message)
        #expect(result.body == message)
        #expect(result.convertedParts == 0)
        #expect(result.remarks == [.headerFields, .nonMIMEBody])
        #expect(result.remarks.map(\.description) == ["8-bit header fields sent unchanged",
                                                      "8-bit body of a message without MIME-Version sent unchanged"])
    }

    @Test func malformedStructuresAreErrorsNotGuesses() {
        func failure(_ message: [UInt8], _ limits: MIMEDowngrade.Limits = .init()) -> MIMEDowngrade.Failure.Kind? {
            do {
                _ = try MIMEDowngrade.convert(message, limits: limits)
                return nil
            } catch {
                return error.kind
            }
        }
        #expect(failure(Self.crlf("MIME-Version: 1.0\nContent-Type: multipart/mixed\n\n--x\n\né\n--x--\n")) == .multipartWithoutBoundary)
        #expect(failure(Self.crlf("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"\"\n\n--\n\né\n")) == .multipartWithoutBoundary)
        let long = String(repeating: "b", count: 300)
        #expect(failure(Self.crlf("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\(long)\n\n--\(long)\n\né\n")) == .boundaryTooLong)
        var small = MIMEDowngrade.Limits()
        small.maximumHeaderBytes = 100
        #expect(failure(Self.crlf("MIME-Version: 1.0\nX-Long: \(String(repeating: "x", count: 200))\n\né\n"), small) == .headerTooLarge)
        #expect(failure(Self.crlf("MIME-Version: 1.0\nX-Long: \(String(repeating: "x", count: 20))\n\né\n"), small) == nil)
        // A multipart of 60 levels (Postfix's nesting limit is 100).
        var deep = "MIME-Version: 1.0\n"
        for level in 0..<60 { deep += "Content-Type: multipart/mixed; boundary=l\(level)\n\n--l\(level)\n" }
        deep += "\né\n"
        #expect(failure(Self.crlf(deep)) == .nestingTooDeep)
        var shallow = "MIME-Version: 1.0\n"
        for level in 0..<10 { shallow += "Content-Type: multipart/mixed; boundary=l\(level)\n\n--l\(level)\n" }
        shallow += "\né\n"
        #expect(failure(Self.crlf(shallow)) == nil)
    }

    @Test func multipartWithoutDelimitersIsAllPreamble() throws {
        // Nothing but preamble: encoded (readers ignore it), nothing lost.
        let message = Self.crlf("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=x\n\nno delimiter: é\n")
        let result = try MIMEDowngrade.convert(message)
        #expect(String(decoding: result.body, as: UTF8.self).hasSuffix("\r\n\r\nno delimiter: =C3=A9\r\n"))
        #expect(result.body.allSatisfy { $0 < 0x80 })
    }

    /// The committed seeds of fuzz/run-mime-downgrade (fuzz/make-seeds),
    /// replayed through the fuzz driver: each keeps the invariants and still
    /// reaches what it was written for.
    @Test func fuzzSeedsReachTheirOutcomes() throws {
        let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("fuzz/corpus/mime-downgrade")
        let expected: [String: MIMEDowngradeFuzz.Outcome] = [
            "single-8bit": .converted(parts: 1), "alternative": .converted(parts: 4),
            "nested-rfc822": .converted(parts: 2), "binary": .failed(.binaryContent),
            "limits": .failed(.headerTooLarge), "non-mime": .unchanged,
        ]
        let files = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasSuffix(".bin") }
        #expect(Set(files.map { String($0.dropLast(4)) }) == Set(expected.keys))
        for file in files {
            let bytes = try #require(FileManager.default.contents(atPath: directory.appendingPathComponent(file).path))
            #expect(MIMEDowngradeFuzz.run([UInt8](bytes)) == expected[String(file.dropLast(4))], "\(file)")
        }
    }

    /// Python's email package reads both and compares (see the suite's comment).
    static func pythonAgrees(original: [UInt8], converted: [UInt8], sevenBit: Bool) throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("mime-downgrade-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let a = directory.appendingPathComponent("original.eml"), b = directory.appendingPathComponent("converted.eml")
        try Data(original).write(to: a)
        try Data(converted).write(to: b)
        let script = """
            import email, sys
            original = email.message_from_bytes(open(sys.argv[1], 'rb').read())
            raw = open(sys.argv[2], 'rb').read()
            converted = email.message_from_bytes(raw)
            if sys.argv[3] == '1':
                assert all(b < 128 for b in raw), 'not 7-bit'
            a, b = list(original.walk()), list(converted.walk())
            assert len(a) == len(b), ('parts', len(a), len(b))
            for x, y in zip(a, b):
                assert x.get_content_type() == y.get_content_type(), (x.get_content_type(), y.get_content_type())
                assert len(y.defects) <= len(x.defects), ('defects', x.defects, y.defects)
                if x.is_multipart():
                    assert x.get_boundary() == y.get_boundary()
                    continue
                dx, dy = x.get_payload(decode=True), y.get_payload(decode=True)
                assert dx == dy, ('content', dx, dy)
                if (y['Content-Transfer-Encoding'] or '').lower() == 'quoted-printable':
                    for line in y.get_payload().split('\\r\\n'):
                        assert len(line) <= 76, ('line', line)
            print('ok')
            """
        let (status, out) = try runPython(script, [a.path, b.path, sevenBit ? "1" : "0"])
        #expect(status == 0 && out == "ok\n",
                "\(out)\n--- converted:\n\(String(decoding: converted, as: UTF8.self))")
    }
}
