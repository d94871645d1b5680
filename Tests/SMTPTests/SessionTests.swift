/// Command-level tests of SMTPServerSession: greeting, ordering, pipelining,
/// input discipline on command lines, ESMTP parameters, STARTTLS, limits.
import Testing
@testable import SMTP

let basicSession = """
EHLO client.example.net\r
MAIL FROM:<alice@example.net>\r
RCPT TO:<bob@example.org>\r
DATA\r
Subject: hi\r
\r
Hello.\r
.\r
QUIT\r

"""

@Suite struct Greeting {
    @Test func greetingHasNoEnhancedCode() {
        let d = Driver()
        #expect(d.replies == ["220 mx.example.org ESMTP Sealpost\r\n"])
    }

    @Test func clientTalkingFirstIsRefused() {
        var d = Driver(start: false)
        #expect(d.session.receive(Array("EHLO x\r\n".utf8)).isEmpty)
        d.absorb(d.session.start())
        #expect(d.codes == ["554 5.5.0"])
        #expect(d.events.last == .close)
        d.send("QUIT\r\n")
        #expect(d.codes == ["554 5.5.0"])
    }

    @Test func clientSpokeEarlySignal() {
        var d = Driver(start: false)
        d.session.clientSpokeEarly()
        d.absorb(d.session.start())
        #expect(d.codes == ["554 5.5.0"])
        #expect(d.session.isClosed)
    }
}

@Suite struct Sessions {
    @Test func basicSessionStepByStep() {
        var d = Driver()
        // Line by line (String.split would treat CRLF as one character).
        for line in Array(basicSession.utf8).split(separator: 10) {
            d.send(Array(line) + [10])
        }
        #expect(d.codes == ["220", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"])
        #expect(d.messages == [Array("Subject: hi\r\n\r\nHello.\r\n".utf8)])
        #expect(d.replies[5] == "250 2.0.0 Ok: queued as QID1\r\n")
        #expect(d.events.last == .close)
        #expect(d.session.counters.description == "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")
        let env = d.envelopes[0]
        #expect(env.sender.address == "alice@example.net")
        #expect(env.recipients.map(\.address) == ["bob@example.org"])
        #expect(env.helo == "client.example.net")
        #expect(env.protocolName == "ESMTP")
        #expect(env.transfer == .data)
    }

    @Test func fullyPipelinedSessionAnswersInOrder() {
        var d = Driver()
        d.send(basicSession)
        #expect(d.codes == ["220", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"])
        #expect(d.messages.count == 1)
    }

    @Test func ehloAdvertisesExtensions() {
        var d = Driver(policy { $0.tlsAvailable = true; $0.auth = .always })
        d.send("EHLO c.example\r\n")
        #expect(d.replies[1] == """
        250-mx.example.org\r
        250-PIPELINING\r
        250-SIZE 10240000\r
        250-8BITMIME\r
        250-SMTPUTF8\r
        250-ENHANCEDSTATUSCODES\r
        250-DSN\r
        250-CHUNKING\r
        250-STARTTLS\r
        250 AUTH PLAIN LOGIN\r

        """)
    }

    @Test func ehloGating() {
        var plain = Driver(policy { $0.auth = .afterTLS; $0.tlsAvailable = true })
        plain.send("EHLO c.example\r\n")
        #expect(!plain.replies[1].contains("AUTH"))
        #expect(!plain.replies[1].contains("REQUIRETLS"))
        #expect(plain.replies[1].contains("STARTTLS"))
        var tls = Driver(policy { $0.auth = .afterTLS; $0.tlsAvailable = true },
                         client: SMTPClientInfo(address: "198.51.100.7", tlsActive: true))
        tls.send("EHLO c.example\r\n")
        #expect(tls.replies[1].contains("AUTH PLAIN LOGIN"))
        #expect(tls.replies[1].contains("REQUIRETLS"))
        #expect(!tls.replies[1].contains("STARTTLS"))
        var limited = Driver(policy { $0.extensions = [.pipelining, .enhancedStatusCodes] })
        limited.send("EHLO c.example\r\n")
        #expect(limited.replies[1] == "250-mx.example.org\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
    }

    @Test func heloSessionHasNoExtensions() {
        var d = Driver()
        d.send("HELO c.example\r\nMAIL FROM:<a@example.net> SIZE=10\r\nMAIL FROM:<a@example.net>\r\nBDAT 3 LAST\r\nabcRCPT TO:<b@example.org>\r\n")
        #expect(d.codes == ["220", "250", "555 5.5.4", "250 2.1.0", "503 5.5.1", "250 2.1.5"])
        #expect(d.replies[1] == "250 mx.example.org\r\n")
    }

    @Test func ehloArgumentIsChecked() {
        var d = Driver()
        d.send("EHLO\r\nEHLO bad host\r\nHELO (x)\r\nEHLO [192.0.2.1]\r\n")
        #expect(d.codes == ["220", "501 5.5.4", "501 5.5.4", "501 5.5.4", "250"])
    }

    @Test func commandsOutOfOrder() {
        var d = Driver()
        d.send("MAIL FROM:<a@example.net>\r\nEHLO c.example\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        d.send("MAIL FROM:<a@example.net>\r\nMAIL FROM:<a@example.net>\r\nDATA\r\nRSET\r\nRSET x\r\n")
        #expect(d.codes == ["220", "503 5.5.1", "250", "503 5.5.1", "503 5.5.1",
                            "250 2.1.0", "503 5.5.1", "554 5.5.1", "250 2.0.0", "501 5.5.4"])
    }

    @Test func simpleCommands() {
        var d = Driver()
        d.send("NOOP\r\nnoop anything\r\nVRFY bob\r\nVRFY\r\nEXPN list\r\nHELP\r\nFOO\r\nQUIT now\r\nQuit\r\n")
        #expect(d.codes == ["220", "250 2.0.0", "250 2.0.0", "252 2.5.2", "501 5.5.4", "502 5.5.1",
                            "214 2.0.0", "500 5.5.2", "501 5.5.4", "221 2.0.0"])
        #expect(d.session.counters.description == "noop=2 vrfy=1/2 help=1 quit=1/2 unknown=0/2 commands=5/9")
    }

    @Test func everyFinalReplyCarriesAnEnhancedCode() {
        var d = Driver(policy { $0.auth = .always })
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\nFOO\r\nAUTH PLAIN\r\n*\r\nQUIT\r\n")
        for r in d.replies.dropFirst(2) where !r.hasPrefix("354") && !r.hasPrefix("334") {
            let status = r.split(separator: " ")[1]
            #expect(EnhancedStatus(parsing: String(status)) != nil, "\(r)")
        }
    }
}

@Suite struct CommandLineDiscipline {
    @Test func bareLFEndsABadLine() {
        var d = Driver()
        d.send("NOOP\nNOOP\r\n")
        #expect(d.codes == ["220", "500 5.5.2", "250 2.0.0"])
        #expect(d.replies[1].contains("Bare CR or LF"))
    }

    @Test func bareCRIsRefused() {
        var d = Driver()
        d.send("NOOP\rQUIT\r\nNOOP\r\n")
        #expect(d.codes == ["220", "500 5.5.2", "250 2.0.0"])
        #expect(!d.session.isClosed)
    }

    @Test func nulIsRefused() {
        var d = Driver()
        d.send("NO\0OP\r\nNOOP\r\n")
        #expect(d.codes == ["220", "500 5.5.2", "250 2.0.0"])
        #expect(d.replies[1].contains("NUL"))
    }

    /// A NUL in a MAIL or RCPT line is in an address or a parameter
    /// (ENVID=, ORCPT=): 501, as for the xtext forms; elsewhere 500.
    @Test func nulInArgumentsIs501() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net> ENVID=a\0b\r\nMAIL FROM:<a@example.net>\r\n"
               + "RCPT TO:<b@example.org> ORCPT=rfc822;b\0@example.org\r\nNOOP\r\n")
        #expect(d.codes.dropFirst(2) == ["501 5.5.4", "250 2.1.0", "501 5.5.4", "250 2.0.0"])
    }

    /// MAIL and RCPT lines may be longer by what their parameters add
    /// (RFC 1870, 3461, 4954, 6531): a 256-octet path with NOTIFY and an
    /// ORCPT of the same address is a valid RCPT of some 570 octets.
    @Test func mailAndRcptLinesMayCarryTheirParameters() {
        var d = Driver(policy { $0.auth = .always })
        let local = String(repeating: "l", count: 64)
        let domain = (0..<3).map { _ in String(repeating: "d", count: 50) }.joined(separator: ".") + ".sub.relay.example"
        let address = local + "@" + domain
        #expect(address.utf8.count == 235)   // a relay domain
        let rcpt = "RCPT TO:<\(address)> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;\(address)\r\n"
        #expect(rcpt.utf8.count > 512 && rcpt.utf8.count <= 1012)
        let envid = String(repeating: "e", count: 100)
        let xtext = address.replacingOccurrences(of: "@", with: "+40")
        let mail = "MAIL FROM:<\(address)> SIZE=1000 RET=HDRS ENVID=\(envid) BODY=8BITMIME AUTH=\(xtext)\r\n"
        #expect(mail.utf8.count > 512 && mail.utf8.count <= 512 + 662)
        d.send("EHLO c.example\r\n" + mail + rcpt)
        #expect(d.codes.dropFirst(2) == ["250 2.1.0", "250 2.1.5"], "\(d.replies)")
        // The limits still hold: one octet more than the allowance is too long.
        var e = Driver()
        let head = "RCPT TO:<b@example.org> ORCPT=rfc822;"
        let tooLong = head + String(repeating: "x", count: 1013 - 2 - head.utf8.count) + "\r\n"
        #expect(tooLong.utf8.count == 1013)
        e.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n" + tooLong + "NOOP\r\n")
        #expect(e.codes.dropFirst(3) == ["500 5.5.2", "250 2.0.0"])
    }

    @Test func lineLengthLimit() {
        var d = Driver()
        let ok = "NOOP " + String(repeating: "x", count: 505) + "\r\n"     // 512 octets
        let long = "NOOP " + String(repeating: "x", count: 506) + "\r\n"   // 513 octets
        #expect(ok.utf8.count == 512)
        d.send(ok + long + "NOOP\r\n")
        #expect(d.codes == ["220", "250 2.0.0", "500 5.5.2", "250 2.0.0"])
        #expect(d.replies[2].contains("too long"))
    }

    @Test func veryLongLineIsSkippedWithoutBuffering() {
        var d = Driver()
        d.send("NOOP ")
        for _ in 0..<100 { d.send(String(repeating: "y", count: 10_000)) }
        #expect(d.codes == ["220"])
        d.send("\r\nNOOP\r\n")
        #expect(d.codes == ["220", "500 5.5.2", "250 2.0.0"])
    }

    @Test func longLineEndingInBareLF() {
        var d = Driver()
        d.send(String(repeating: "z", count: 2000) + "\nNOOP\r\n")
        #expect(d.codes == ["220", "500 5.5.2", "250 2.0.0"])
    }

    /// A line that arrives a byte at a time is scanned once, from where
    /// the last read left off: what the scan saw before (a NUL, a bare CR)
    /// still counts at the line's end, and the answers are those of the
    /// line sent whole.
    @Test func aLineSentAByteAtATimeGetsTheSameAnswers() {
        let input = "NO\0OP\r\nNOOP\rX\r\nEHLO c.example\r\nMAIL FROM:<a@example.net> ENVID=a\0b\r\n"
            + "MAIL FROM:<a@example.net> ENVID=" + String(repeating: "e", count: 100) + "\r\n"
            + "RCPT TO:<" + String(repeating: "r", count: 1100) + "@example.org>\r\nNOOP\r\n"
        var whole = Driver()
        whole.send(input)
        var bytes = Driver()
        bytes.sendByteByByte(Array(input.utf8))
        #expect(bytes.codes == whole.codes)
        #expect(whole.codes == ["220", "500 5.5.2", "500 5.5.2", "250", "501 5.5.4", "250 2.1.0", "500 5.5.2", "250 2.0.0"])
    }

    @Test func crSplitAcrossReads() {
        var d = Driver()
        d.send("NOOP\r")
        d.send("\nNOOP\r")
        d.send("\n")
        #expect(d.codes == ["220", "250 2.0.0", "250 2.0.0"])
    }

    @Test func tooManyErrorsCloses() {
        var d = Driver(policy { $0.maxErrors = 3 })
        d.send("FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        #expect(d.codes == ["220", "500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"])
        #expect(d.events.last == .close)
        #expect(d.session.isClosed)
        #expect(d.session.receive(Array("NOOP\r\n".utf8)).isEmpty)
    }

    /// Past the junk command limit each NOOP, RSET, VRFY or HELP counts as
    /// an error (its own reply unchanged), so a client that never sends
    /// mail is let go at the error limit; a queued message starts the
    /// count again (Postfix's smtpd_junk_command_limit).
    @Test func junkCommandsPastTheLimitCountAsErrors() {
        var d = Driver(policy {
            $0.maxErrors = 3
            $0.maxJunkCommands = 4
        })
        d.send("NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n")
        #expect(d.session.errorCount == 0)
        d.send("NOOP\r\nNOOP\r\n")
        #expect(d.session.errorCount == 2)
        #expect(!d.session.isClosed)
        d.send("HELP\r\nNOOP\r\n")
        #expect(d.codes.suffix(3) == ["250 2.0.0", "214 2.0.0", "421 4.7.0"])
        #expect(d.session.isClosed)
    }

    @Test func aQueuedMessageStartsTheJunkCountAgain() {
        var d = Driver(policy { $0.maxJunkCommands = 2 })
        d.send("EHLO c.example\r\nNOOP\r\nNOOP\r\n")
        d.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        #expect(d.replies.last?.hasPrefix("250 2.0.0 Ok: queued as QID1") == true, "\(d.replies)")
        d.send("NOOP\r\nRSET\r\n")
        #expect(d.session.errorCount == 0)
        d.send("NOOP\r\n")
        #expect(d.session.errorCount == 1)
    }
}

@Suite struct Parameters {
    func mail(_ params: String, policy p: SMTPServerPolicy = policy(), client: SMTPClientInfo = outsider) -> String {
        var d = Driver(p, client: client)
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\(params)\r\n")
        return d.codes.last!
    }

    func rcpt(_ params: String) -> String {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\(params)\r\n")
        return d.codes.last!
    }

    @Test(arguments: [
        ("", "250 2.1.0"), (" SIZE=1000", "250 2.1.0"), (" size=10240000", "250 2.1.0"),
        (" SIZE=10240001", "552 5.3.4"), (" SIZE=99999999999999999999", "552 5.3.4"), (" SIZE=", "501 5.5.4"),
        (" SIZE=12x", "501 5.5.4"), (" SIZE=1 SIZE=2", "501 5.5.4"), (" BODY=8BITMIME", "250 2.1.0"),
        (" BODY=7bit", "250 2.1.0"), (" BODY=BINARYMIME", "501 5.5.4"), (" SMTPUTF8", "250 2.1.0"),
        (" SMTPUTF8=yes", "501 5.5.4"), (" RET=FULL", "250 2.1.0"), (" RET=hdrs", "250 2.1.0"),
        (" RET=ALL", "501 5.5.4"), (" ENVID=abc+2Bdef", "250 2.1.0"), (" ENVID=a+0Ab", "501 5.5.4"),
        (" ENVID=a+00b", "501 5.5.4"), (" ENVID=a+0db", "501 5.5.4"), (" ENVID=a+C3+A9", "501 5.5.4"),
        (" ENVID=\u{e9}", "501 5.5.4"), (" ENVID=a+", "501 5.5.4"), (" ENVID=" + String(repeating: "x", count: 101), "501 5.5.4"),
        (" FOO=bar", "555 5.5.4"), (" X-FOO", "555 5.5.4"), ("  SIZE=1", "250 2.1.0"), (" =x", "501 5.5.4"),
        (" SIZE==1", "501 5.5.4"), (" AUTH=<>", "555 5.5.4"), (" REQUIRETLS", "530 5.7.10"),
        ("SIZE=1", "501 5.5.4"),
    ])
    func mailParameters(_ params: String, _ expected: String) {
        #expect(mail(params) == expected, "MAIL FROM:<a@example.net>\(params)")
    }

    @Test func authParameterWhenOffered() {
        let p = policy { $0.auth = .always }
        #expect(mail(" AUTH=<>", policy: p) == "250 2.1.0")
        #expect(mail(" AUTH=user+40example.org", policy: p) == "250 2.1.0")
        #expect(mail(" AUTH=a+00b", policy: p) == "501 5.5.4")
        #expect(mail(" AUTH=a+0Ab", policy: p) == "501 5.5.4")
        #expect(mail(" AUTH=\u{e9}", policy: p) == "501 5.5.4")
    }

    @Test func requireTLSOnlyOverTLS() {
        let tls = SMTPClientInfo(address: "198.51.100.7", tlsActive: true)
        #expect(mail(" REQUIRETLS", client: tls) == "250 2.1.0")
        #expect(mail(" REQUIRETLS=1", client: tls) == "501 5.5.4")
        #expect(mail(" REQUIRETLS", policy: policy { $0.extensions.remove(.requireTLS) }, client: tls) == "555 5.5.4")
    }

    @Test(arguments: [
        ("", "250 2.1.5"), (" NOTIFY=NEVER", "250 2.1.5"), (" NOTIFY=success,FAILURE,delay", "250 2.1.5"),
        (" NOTIFY=NEVER,SUCCESS", "501 5.5.4"), (" NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"), (" NOTIFY=", "501 5.5.4"),
        (" NOTIFY=SOMETIMES", "501 5.5.4"), (" ORCPT=rfc822;b+40example.org", "250 2.1.5"),
        (" ORCPT=rfc822;b@example.org", "250 2.1.5"), (" ORCPT=rfc822;a+0Db", "501 5.5.4"),
        (" ORCPT=rfc822;a+00b", "501 5.5.4"), (" ORCPT=rfc822;\u{e9}", "501 5.5.4"), (" ORCPT=rfc822", "501 5.5.4"),
        (" ORCPT=;x", "501 5.5.4"), (" ORCPT=rfc822;", "501 5.5.4"), (" SIZE=10", "555 5.5.4"),
        (" NOTIFY=NEVER NOTIFY=NEVER", "501 5.5.4"),
    ])
    func recipientParameters(_ params: String, _ expected: String) {
        #expect(rcpt(params) == expected, "RCPT TO:<b@example.org>\(params)")
    }

    @Test func dsnReachesTheEnvelope() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net> RET=HDRS ENVID=QQ+2B1 SIZE=20 BODY=8BITMIME\r\n")
        d.send("RCPT TO:<b@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bx@example.org\r\nDATA\r\nx\r\n.\r\n")
        let env = d.envelopes[0]
        #expect(env.parameters.ret == .headers)
        #expect(env.parameters.envid == "QQ+1")
        #expect(env.parameters.size == 20)
        #expect(env.parameters.body == .eightBitMIME)
        #expect(env.recipients[0].parameters.notify?.description == "FAILURE,DELAY")
        #expect(env.recipients[0].parameters.orcpt?.description == "rfc822;b+x@example.org")
    }

    @Test func mailSyntax() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL TO:<a@example.net>\r\nMAIL FROM:a@example.net\r\nMAIL FROM:<a@@example.net>\r\nMAIL FROM: <a@example.net>\r\n")
        #expect(d.codes == ["220", "250", "501 5.5.4", "501 5.1.7", "501 5.1.7", "250 2.1.0"])
        d.send("RCPT TO:<>\r\nRCPT TO:b@example.org\r\nRCPT FROM:<b@example.org>\r\nRCPT TO:<b@example.org>x\r\nRCPT TO:<postmaster>\r\n")
        #expect(d.codes.dropFirst(6) == ["501 5.1.3", "501 5.1.3", "501 5.5.4", "501 5.5.4", "250 2.1.5"])
    }

    @Test func nullSenderAndSourceRoute() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<>\r\nRCPT TO:<@mx.example.org:b@example.org>\r\nDATA\r\nx\r\n.\r\n")
        #expect(d.codes == ["220", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"])
        #expect(d.envelopes[0].sender.address == "")
        #expect(d.envelopes[0].recipients[0].address == "b@example.org")
    }

    @Test func smtputf8Addresses() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<jörg@example.net>\r\nMAIL FROM:<jörg@example.net> SMTPUTF8\r\nRCPT TO:<bø@example.org>\r\nDATA\r\n")
        d.send("Subject: grüße\r\n\r\nx\r\n.\r\n")
        #expect(d.codes == ["220", "250", "553 5.6.7", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"])
        #expect(d.envelopes[0].protocolName == "UTF8SMTP")
        #expect(d.envelopes[0].parameters.smtputf8)
        var e = Driver()
        e.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<bø@example.org>\r\n")
        #expect(e.codes.last == "553 5.6.7")
    }
}

@Suite struct Limits {
    @Test func tooManyRecipients() {
        var d = Driver(policy { $0.maxRecipients = 2 })
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nRCPT TO:<d@example.org>\r\nDATA\r\nx\r\n.\r\n")
        #expect(d.codes == ["220", "250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "354", "250 2.0.0"])
        #expect(d.envelopes[0].recipients.count == 2)
    }

    @Test func submissionRequiresAuthentication() {
        var d = Driver(policy { $0.isSubmission = true; $0.auth = .always })
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
        #expect(d.codes.last == "530 5.7.0")
        d.send("AUTH PLAIN \(Base64.encode(Array("\0alice\0secret".utf8)))\r\nMAIL FROM:<a@example.org>\r\n")
        #expect(d.codes.suffix(2) == ["235 2.7.0", "250 2.1.0"])
    }

    @Test(arguments: [(SMTPQueueFailure.unavailable, "451 4.3.0"), (.full, "452 4.3.1"),
                      (.refused(SMTPReply(554, "5.7.0", "No")), "554 5.7.0")])
    func queueFailures(_ failure: SMTPQueueFailure, _ code: String) {
        var d = Driver()
        d.queueAnswer = failure
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\nMAIL FROM:<a@example.net>\r\n")
        #expect(d.codes == ["220", "250", "250 2.1.0", "250 2.1.5", "354", code, "250 2.1.0"])
        #expect(d.session.errorCount == 0)
    }

    @Test func inputWaitsForTheQueue() {
        var s = SMTPServerSession(policy: policy(), client: outsider)
        _ = s.start()
        let a = s.receive(Array("EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\nRSET\r\nQUIT\r\n".utf8))
        #expect(a.last == .endMessage)
        #expect(s.receive(Array("NOOP\r\n".utf8)).isEmpty)
        let b = s.messageCommitted(queueID: "Q1")
        let replies = b.compactMap { if case .reply(let r) = $0 { return r.description } else { return nil } }
        #expect(replies == ["250 2.0.0 Ok: queued as Q1", "250 2.0.0 Ok", "221 2.0.0 Bye"])
        #expect(b.last == .close)
    }

    @Test func pendingInputIsBounded() {
        var s = SMTPServerSession(policy: policy { $0.maxPendingInput = 100 }, client: outsider)
        _ = s.start()
        _ = s.receive(Array("EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n".utf8))
        #expect(s.wantsInput)
        _ = s.receive([UInt8](repeating: 65, count: 150))
        #expect(!s.wantsInput)
        _ = s.receive([UInt8](repeating: 65, count: 300))
        let b = s.messageCommitted(queueID: "Q1")
        let codes = b.compactMap { if case .reply(let r) = $0 { return r.code } else { return nil } }
        #expect(codes == [250, 421])
        #expect(b.last == .close)
    }
}

@Suite struct StartTLS {
    @Test func pipelinedCommandsAfterSTARTTLSAreDiscarded() {
        var d = Driver(policy { $0.tlsAvailable = true })
        d.completeTLS = false
        d.send("EHLO c.example\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.net>\r\n")
        #expect(d.codes == ["220", "250", "220 2.0.0"])
        #expect(d.events.last == .startTLS)
        #expect(d.logs.contains(.discardedAfterSTARTTLS(bytes: 36)))
        // Bytes arriving before the hand-off completes are dropped too.
        d.send("NOOP\r\n")
        #expect(d.codes.count == 3)
        d.absorb(d.session.tlsEstablished())
        // The session is reset to before EHLO.
        d.send("MAIL FROM:<a@example.net>\r\nEHLO c.example\r\nMAIL FROM:<a@example.net> REQUIRETLS\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n")
        #expect(d.codes.dropFirst(3) == ["503 5.5.1", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"])
        #expect(!d.replies[4].contains("STARTTLS"))
        #expect(d.replies[4].contains("REQUIRETLS"))
        #expect(d.envelopes[0].protocolName == "ESMTPS")
        #expect(d.envelopes[0].parameters.requireTLS)
        #expect(d.envelopes[0].client.tlsActive)
    }

    @Test func startTLSRefusals() {
        var no = Driver()
        no.send("EHLO c.example\r\nSTARTTLS\r\n")
        #expect(no.codes.last == "502 5.5.1")
        var d = Driver(policy { $0.tlsAvailable = true })
        d.send("STARTTLS\r\nEHLO c.example\r\nSTARTTLS now\r\nMAIL FROM:<a@example.net>\r\nSTARTTLS\r\nRSET\r\nSTARTTLS\r\nEHLO c.example\r\nSTARTTLS\r\n")
        // What followed the successful STARTTLS in the same flight is gone.
        #expect(d.codes == ["220", "503 5.5.1", "250", "501 5.5.4", "250 2.1.0", "503 5.5.1", "250 2.0.0", "220 2.0.0"])
        d.send("EHLO c.example\r\nSTARTTLS\r\n")
        #expect(d.codes.suffix(2) == ["250", "503 5.5.1"])
    }

    @Test func tlsFailureCloses() {
        var d = Driver(policy { $0.tlsAvailable = true })
        d.completeTLS = false
        d.send("EHLO c.example\r\nSTARTTLS\r\n")
        d.absorb(d.session.tlsFailed())
        #expect(d.events.last == .close)
    }
}
