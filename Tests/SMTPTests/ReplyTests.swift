/// Replies on the wire (RFC 5321 4.2, RFC 2034 enhanced codes), the
/// parsing of enhanced status codes, and the per-command counters of the
/// disconnect line.
import Testing
@testable import SMTP

@Suite struct Replies {
    @Test func rendering() {
        #expect(String(decoding: SMTPReply(250, "2.1.0", "Ok").rendered, as: UTF8.self) == "250 2.1.0 Ok\r\n")
        #expect(String(decoding: SMTPReply(354, nil, "End data").rendered, as: UTF8.self) == "354 End data\r\n")
        #expect(String(decoding: SMTPReply(250, nil, ["mx", "PIPELINING", "SIZE 10"]).rendered, as: UTF8.self)
                == "250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
        #expect(String(decoding: SMTPReply(452, EnhancedStatus(4, 3, 1), ["a", "b"]).rendered, as: UTF8.self)
                == "452-4.3.1 a\r\n452 4.3.1 b\r\n")
        #expect(String(decoding: SMTPReply(550, "5.123.999", "").rendered, as: UTF8.self) == "550 5.123.999\r\n")
        #expect(String(decoding: SMTPReply(221, EnhancedStatus(2, 0, 0), []).rendered, as: UTF8.self) == "221 2.0.0\r\n")
    }

    @Test func textIsSanitized() {
        let echoed = SMTPReply(501, "5.1.3", "bad <a\r\nb\u{0}c\u{e9}\t>")
        #expect(echoed.lines == ["bad <a??b?c??>"])
        let long = SMTPReply(250, "2.0.0", String(repeating: "x", count: 600))
        #expect(long.lines[0].utf8.count == 490)
        let exactly = String(repeating: "y", count: 490)
        #expect(SMTPReply(250, "2.0.0", exactly).lines == [exactly])
        #expect(SMTPReply(250, "2.0.0", "plain text, kept").lines == ["plain text, kept"])
    }

    @Test(arguments: [("2.0.0", EnhancedStatus(2, 0, 0)), ("4.3.1", EnhancedStatus(4, 3, 1)),
                      ("5.123.999", EnhancedStatus(5, 123, 999)), ("5.07.010", EnhancedStatus(5, 7, 10))])
    func statusParsing(text: String, status: EnhancedStatus) {
        #expect(EnhancedStatus(parsing: text) == status)
    }

    @Test(arguments: ["", "2", "2.0", "2.0.", ".0.0", "2..0", "2.0.0.0", "3.0.0", "1.0.0", "6.1.1",
                      "2.1000.0", "2.0.1000", "2.0.0 ", " 2.0.0", "+2.0.0", "2.-1.0", "2.a.0", "\u{664}.0.0"])
    func malformedStatus(text: String) {
        #expect(EnhancedStatus(parsing: text) == nil)
    }
}

@Suite struct CommandCounters {
    @Test func countsAndLastCommand() {
        var c = SMTPCommandCounters()
        #expect(c.count == 0 && c.last == nil && c.description == "commands=0")
        c.record("EHLO", success: true)
        c.record("MAIL", success: true)
        c.record("RCPT", success: false)
        c.record("RCPT", success: true)
        c.record("EXPN", success: false)
        #expect(c.count == 5)
        #expect(c.last == "EXPN")
        #expect(c.total == ["ehlo": 1, "mail": 1, "rcpt": 2, "unknown": 1])
        #expect(c.successful == ["ehlo": 1, "mail": 1, "rcpt": 1])
        #expect(c.description == "ehlo=1 mail=1 rcpt=1/2 unknown=0/1 commands=3/5")
    }

    @Test func lastCommandOfAPipelinedBatch() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nNOOP\r\n")
        #expect(d.session.counters.last == "NOOP")
        #expect(d.session.counters.count == 3)
    }
}
