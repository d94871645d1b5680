/// Message content: DATA dot-unstuffing and end detection, every smuggling
/// variant, content refusals, streaming, and BDAT (RFC 3030).
import Testing
@testable import SMTP

let envelopeCommands = "EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"

func dataSession(_ body: String, policy p: SMTPServerPolicy = policy(), mail: String = "MAIL FROM:<a@example.net>") -> Driver {
    var d = Driver(p)
    d.send("EHLO c.example\r\n\(mail)\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    d.send(body)
    return d
}

@Suite struct DataContent {
    @Test func dotUnstuffing() {
        let d = dataSession("..leading\r\n.\r\n...\r\nmid.dle\r\n..\r\n.\r\n")
        #expect(d.messages == [Array(".leading\r\n".utf8)])
        // ".\r\n" on the second line ended the message: the rest are (unknown) commands.
        #expect(d.codes.suffix(6) == ["354", "250 2.0.0", "500 5.5.2", "500 5.5.2", "500 5.5.2", "500 5.5.2"])
    }

    @Test func unstuffingKeepsEverythingElse() {
        let d = dataSession("..\r\n...x\r\n a.\r\n.\tb\r\n\r\n.\r\n")
        #expect(d.messages == [Array(".\r\n..x\r\n a.\r\n\tb\r\n\r\n".utf8)])
    }

    @Test func emptyMessage() {
        let d = dataSession(".\r\n")
        #expect(d.messages == [[]])
        #expect(d.codes.last == "250 2.0.0")
    }

    /// Every way of writing a "line with a dot" that is not CRLF "." CRLF,
    /// followed by a smuggled transaction. None may end the message: the
    /// smuggled commands are content, and the message is refused at the
    /// real end for its bare line ends.
    static let smugglingVariants: [String] = [
        "\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r\n.\r", "\r.\n", "\n.\r", "\r.\r\n",
        "\r\n.\r\r\n", "\r\n.\n\r\n", "\n\n.\n\n", "\n.\r\r\n", "\r\n.\r\0\n", "\r\n\0.\r\n"
    ]

    @Test func spaceDotLineIsContent() {
        let d = dataSession("a\r\n .\r\nMAIL FROM:<evil@example.net>\r\n.\r\n")
        #expect(d.messages == [Array("a\r\n .\r\nMAIL FROM:<evil@example.net>\r\n".utf8)])
        #expect(d.envelopes.count == 1)
    }

    @Test func bareCRBeforeARealEndMarker() {
        // "\r\r\n.\r\n" contains a real CRLF "." CRLF: the message ends
        // there and is refused for its bare CR; what follows is read as
        // commands, exactly as every conforming client would expect.
        let d = dataSession("hello\r\r\n.\r\nNOOP\r\n")
        #expect(d.codes.suffix(2) == ["550 5.6.0", "250 2.0.0"])
        #expect(d.ends == 0)
    }

    @Test("smuggling variants never end the message", arguments: smugglingVariants)
    func smuggling(_ variant: String) {
        let smuggled = "MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nSpoofed\r\n.\r\n"
        let input = envelopeCommands + "DATA\r\nSubject: x\r\n\r\nhello" + variant + smuggled + "QUIT\r\n"
        for feeding in 0..<2 {
            var d = Driver()
            if feeding == 0 { d.send(input) } else { d.sendByteByByte(Array(input.utf8)) }
            #expect(d.ends == 0, "\(variant.debugDescription) ended a message")
            #expect(d.envelopes.count == 1)
            #expect(d.events.contains { if case .abort = $0 { return true } else { return false } })
            #expect(d.codes.suffix(2) == ["550 5.6.0", "221 2.0.0"], "\(variant.debugDescription)")
            #expect(!d.logs.isEmpty)
        }
    }

    @Test func validEndAfterBareLineEndsIsStillTheEnd() {
        // A bare LF earlier does not change where the message ends.
        let d = dataSession("a\nb\r\n.\r\nNOOP\r\n")
        #expect(d.codes.suffix(2) == ["550 5.6.0", "250 2.0.0"])
        #expect(d.ends == 0)
    }

    @Test(arguments: [
        ("a\0b\r\n.\r\n", "550 5.6.0"),
        ("a\rb\r\n.\r\n", "550 5.6.0"),
        (String(repeating: "x", count: 998) + "\r\n.\r\n", "250 2.0.0"),
        (String(repeating: "x", count: 999) + "\r\n.\r\n", "554 5.6.0"),
        ("." + String(repeating: "x", count: 998) + "\r\n.\r\n", "250 2.0.0"),
        ("Subject: caf\u{e9}\r\n\r\nbody\r\n.\r\n", "554 5.6.0"),
        ("Subject: cafe\r\n\r\nbody caf\u{e9}\r\n.\r\n", "250 2.0.0"),
    ])
    func contentRefusals(_ body: String, _ code: String) {
        let d = dataSession(body)
        #expect(d.codes.last == code)
        #expect(d.ends == (code == "250 2.0.0" ? 1 : 0))
    }

    @Test func eightBitHeadersWithSMTPUTF8() {
        let d = dataSession("Subject: caf\u{e9}\r\n\r\nbody\r\n.\r\n", mail: "MAIL FROM:<a@example.net> SMTPUTF8")
        #expect(d.codes.last == "250 2.0.0")
        let lax = dataSession("Subject: caf\u{e9}\r\n\r\nbody\r\n.\r\n", policy: policy { $0.reject8BitHeaders = false })
        #expect(lax.codes.last == "250 2.0.0")
    }

    @Test func sizeLimit() {
        let p = policy { $0.maxMessageSize = 12 }
        let exact = dataSession("0123456789\r\n.\r\n", policy: p)
        #expect(exact.codes.last == "250 2.0.0")
        var over = dataSession("0123456789a\r\nmore\r\n", policy: p)
        #expect(over.events.contains(.abort(SMTPReply(552, "5.3.4", "Message size exceeds fixed limit"))))
        over.send("and more\r\n.\r\nNOOP\r\n")
        #expect(over.codes.suffix(2) == ["552 5.3.4", "250 2.0.0"])
        #expect(over.ends == 0)
    }

    @Test func messageIsStreamedInBoundedChunks() {
        var d = Driver(policy { $0.messageChunkSize = 4096; $0.maxMessageSize = 10_000_000 })
        d.send(envelopeCommands + "DATA\r\n")
        let line = Array((String(repeating: "0123456789", count: 7) + "\r\n").utf8)
        var sent: [UInt8] = []
        var chunk: [UInt8] = []
        for _ in 0..<20_000 {
            chunk += line
            if chunk.count > 50_000 { sent += chunk; d.absorb(d.session.receive(chunk)); chunk = [] }
        }
        sent += chunk
        d.absorb(d.session.receive(chunk + Array(".\r\n".utf8)))
        #expect(d.codes.last == "250 2.0.0")
        #expect(d.messages == [sent])
    }

    @Test func chunksNeverExceedTheConfiguredSize() {
        var s = SMTPServerSession(policy: policy { $0.messageChunkSize = 1000 }, client: outsider)
        _ = s.start()
        _ = s.receive(Array((envelopeCommands + "DATA\r\n").utf8))
        let body = Array(repeating: [UInt8](repeating: 65, count: 98) + [13, 10], count: 500).flatMap { $0 }
        let actions = s.receive(body + Array(".\r\n".utf8))
        var total = 0
        for case .messageData(let d) in actions {
            #expect(d.count <= 1000)
            total += d.count
        }
        #expect(total == 50_000)
        #expect(actions.last == .endMessage)
    }
}

@Suite struct Chunking {
    @Test func bdatMessage() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 7\r\nHello, BDAT 7 LAST\r\nworld\r\n")
        #expect(d.codes == ["220", "250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"])
        #expect(d.replies[4] == "250 2.0.0 7 octets received\r\n")
        #expect(d.replies[5] == "250 2.0.0 Ok: queued as QID1\r\n")
        #expect(d.messages == [Array("Hello, world\r\n".utf8)])
        #expect(d.envelopes[0].transfer == .bdat)
        #expect(d.session.counters.description == "ehlo=1 mail=1 rcpt=1 bdat=2 commands=5")
    }

    @Test func bdatZeroLast() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 5\r\nabc\r\nBDAT 0 LAST\r\n")
        #expect(d.codes.suffix(2) == ["250 2.0.0", "250 2.0.0"])
        #expect(d.messages == [Array("abc\r\n".utf8)])
        var e = Driver()
        e.send(envelopeCommands + "BDAT 0 LAST\r\n")
        #expect(e.messages == [[]])
    }

    @Test func bdatIsVerbatim() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 13 LAST\r\n..x\r\n.\r\nabc\r\nQUIT\r\n")
        #expect(d.messages == [Array("..x\r\n.\r\nabc\r\n".utf8)])
        #expect(d.codes.suffix(2) == ["250 2.0.0", "221 2.0.0"])
    }

    @Test func unterminatedLastLineGetsCRLF() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 3 LAST\r\nabc")
        #expect(d.messages == [Array("abc\r\n".utf8)])
    }

    @Test func crlfSplitAcrossChunksIsFine() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 4\r\nabc\rBDAT 3 LAST\r\n\nd\n")
        #expect(d.codes.last == "550 5.6.0")   // the final bare LF
        var e = Driver()
        e.send(envelopeCommands + "BDAT 4\r\nabc\rBDAT 3 LAST\r\n\nd\r")
        #expect(e.codes.last == "550 5.6.0")   // the final bare CR
        var f = Driver()
        f.send(envelopeCommands + "BDAT 4\r\nabc\rBDAT 1 LAST\r\n\n")
        #expect(f.messages == [Array("abc\r\n".utf8)])
    }

    @Test func chunksAreReadEvenWhenRefused() {
        var d = Driver()
        d.send("EHLO c.example\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n")
        #expect(d.codes == ["220", "250", "503 5.5.1", "250 2.0.0"])
        d.send("MAIL FROM:<a@example.net>\r\nBDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
        #expect(d.codes.suffix(3) == ["250 2.1.0", "554 5.5.1", "250 2.0.0"])
    }

    /// A BDAT with a size but bad syntax after it gets 501 and its chunk
    /// is still read (RFC 3030: the stream stays in sync); one without a
    /// size that fits in 64 bits closes the session with 421, since the
    /// chunk's bytes would otherwise run as commands. Runs of spaces pass.
    @Test func bdatSyntax() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 1 FIRST\r\nXBDAT 3 LAST extra\r\nQ\r\nNOOP\r\n")
        #expect(d.codes.dropFirst(4) == ["501 5.5.4", "501 5.5.4", "250 2.0.0"])
        #expect(!d.session.isClosed)
        for bad in ["BDAT", "BDAT x", "BDAT -1", "BDAT 99999999999999999999999", "BDAT 18446744073709551616 LAST"] {
            var c = Driver()
            c.send(envelopeCommands + bad + "\r\nQUIT\r\n")
            #expect(c.codes.dropFirst(4) == ["421 4.5.4"], "\(bad)")
            #expect(c.session.isClosed, "\(bad)")
            #expect(c.messages.isEmpty && c.ends == 0)
        }
        // Not a syntax error: the chunk is the message, not a QUIT.
        var spaced = Driver()
        spaced.send(envelopeCommands + "BDAT  6   LAST \r\nQUIT\r\n")
        #expect(spaced.messages == [Array("QUIT\r\n".utf8)])
        #expect(!spaced.session.isClosed)
    }

    @Test func dataAfterBdatAndRcptAfterBdat() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 1\r\nxDATA\r\nRCPT TO:<c@example.org>\r\nBDAT 2 LAST\r\n\r\n")
        #expect(d.codes.dropFirst(4) == ["250 2.0.0", "503 5.5.1", "503 5.5.1", "250 2.0.0"])
        #expect(d.messages == [Array("x\r\n".utf8)])
    }

    @Test func bdatSizeLimit() {
        var d = Driver(policy { $0.maxMessageSize = 10 })
        d.send(envelopeCommands + "BDAT 8\r\n12345678BDAT 8 LAST\r\n12345678NOOP\r\n")
        #expect(d.codes.dropFirst(4) == ["250 2.0.0", "552 5.3.4", "250 2.0.0"])
        #expect(d.ends == 0)
        #expect(d.events.contains { if case .abort = $0 { return true } else { return false } })
    }

    @Test func rsetAbortsAnOpenBdatMessage() {
        var d = Driver()
        d.send(envelopeCommands + "BDAT 3\r\nabcRSET\r\nQUIT\r\n")
        #expect(d.codes.dropFirst(4) == ["250 2.0.0", "250 2.0.0", "221 2.0.0"])
        #expect(d.events.contains { if case .abort = $0 { return true } else { return false } })
        #expect(d.ends == 0)
    }

    @Test func disconnectAbortsAnOpenMessage() {
        var d = Driver()
        d.send(envelopeCommands + "DATA\r\npartial")
        d.absorb(d.session.disconnected())
        #expect(d.events.suffix(2).first.map { if case .abort = $0 { return true } else { return false } } == true)
        #expect(d.events.last == .close)
    }
}
