import Testing
@testable import SMTP

@Suite struct SMTPClientSessionTests {
    // MARK: Full sessions

    @Test(arguments: Feed.allCases)
    func pipelinedSessionWithSTARTTLS(feed: Feed) throws {
        let run = drive(clientPolicy(), message(["bob@example.net", "carol@example.net"]), peer: Peer(), feed: feed)
        #expect(run.commands == [
            "EHLO client.example.org", "STARTTLS", "EHLO client.example.org",
            "MAIL FROM:<alice@example.org> SIZE=1000", "RCPT TO:<bob@example.net>", "RCPT TO:<carol@example.net>",
            "DATA", "QUIT",
        ])
        // MAIL, both RCPTs and DATA travel in one write (RFC 2920).
        #expect(run.writes.contains("MAIL FROM:<alice@example.org> SIZE=1000\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n"))
        #expect(run.tlsStarts == 1)
        #expect(run.session.tlsReport?.peerAuthenticated == true)
        #expect(run.peer.messages == [Array("Subject: test\r\n\r\nHello.\r\n".utf8)])
        #expect(run.status(1) == .sent && run.status(2) == .sent)
        let r = try #require(run.results[1])
        #expect(r.dsn == EnhancedStatus(2, 0, 0))
        #expect(r.phase == .dataTermination)
        #expect(r.text == "250 2.0.0 Ok: queued as 4F2A9C (in reply to end of DATA command)")
        #expect(r.diagnostic == "250 2.0.0 Ok: queued as 4F2A9C")
        #expect(run.messageResults.count == 1)
        #expect(run.messageResults[0].sent == 2)
        #expect(run.messageResults[0].bytesSent == UInt64("Subject: test\r\n\r\nHello.\r\n.\r\n".utf8.count))
        #expect(run.failures.isEmpty && run.protocolErrors.isEmpty)
        #expect(run.closed && run.session.isClosed)
        #expect(run.actions.last == .close)
    }

    /// The whole conversation, both directions, as a golden transcript.
    @Test(arguments: Feed.allCases)
    func goldenTranscript(feed: Feed) {
        var peer = Peer([("RCPT TO:<bob@", "550-5.1.1 <bob@example.net>: no such user\r\n550 5.1.1 try another")])
        peer.ehlo = ["mx.example.net", "SIZE 5000", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"]
        var m = message(["bob@example.net", "carol@example.net"], bodyType: .eightBitMIME)
        m.recipients[1].notify = .never
        m.envid = "E1"
        m.ret = .full
        let run = drive(clientPolicy(), m, peer: peer, feed: feed, bodies: [[Array(".dot\nend".utf8)]])
        #expect(run.peer.transcript == [
            "S: 220 mx.example.net ESMTP ready",
            "C: EHLO client.example.org",
            "S: 250-mx.example.net", "S: 250-SIZE 5000", "S: 250-8BITMIME", "S: 250-ENHANCEDSTATUSCODES", "S: 250 DSN",
            "C: MAIL FROM:<alice@example.org> SIZE=1000 BODY=8BITMIME RET=FULL ENVID=E1",
            "S: 250 2.1.0 Ok",
            "C: RCPT TO:<bob@example.net>",
            "S: 550-5.1.1 <bob@example.net>: no such user", "S: 550 5.1.1 try another",
            "C: RCPT TO:<carol@example.net> NOTIFY=NEVER",
            "S: 250 2.1.5 Ok",
            "C: DATA",
            "S: 354 End data with <CR><LF>.<CR><LF>",
            "C: ..dot", "C: end", "C: .",
            "S: 250 2.0.0 Ok: queued as 4F2A9C",
            "C: QUIT",
            "S: 221 2.0.0 Bye",
        ])
        #expect(run.results[1]?.text == "550 5.1.1 <bob@example.net>: no such user / try another (in reply to RCPT TO command)")
        #expect(run.results[2]?.status == .sent)
    }

    @Test(arguments: Feed.allCases)
    func sessionWithoutPipeliningSendsOneCommandAtATime(feed: Feed) {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "SIZE", "8BITMIME"]
        let run = drive(clientPolicy(.opportunistic, pipelining: true), message(["bob@example.net", "carol@example.net"]), peer: peer, feed: feed)
        #expect(run.commands == [
            "EHLO client.example.org", "MAIL FROM:<alice@example.org> SIZE=1000", "RCPT TO:<bob@example.net>",
            "RCPT TO:<carol@example.net>", "DATA", "QUIT",
        ])
        #expect(run.writes == ["EHLO client.example.org\r\n", "MAIL FROM:<alice@example.org> SIZE=1000\r\n",
                               "RCPT TO:<bob@example.net>\r\n", "RCPT TO:<carol@example.net>\r\n", "DATA\r\n",
                               "Subject: test\r\n\r\nHello.\r\n", ".\r\n", "QUIT\r\n"])
        #expect(run.status(1) == .sent && run.status(2) == .sent)
        #expect(run.tlsStarts == 0)
    }

    @Test func policyCanDisablePipelining() {
        let run = drive(clientPolicy(.none, pipelining: false), message(["bob@example.net"]), peer: Peer())
        #expect(run.writes.contains("MAIL FROM:<alice@example.org> SIZE=1000\r\n"))
        #expect(run.tlsStarts == 0)
        #expect(!run.commands.contains("STARTTLS"))
        #expect(run.status(1) == .sent)
    }

    @Test func phasesFollowTheConversation() {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "SIZE"]
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: peer, feed: .whole)
        #expect(run.phases == [.greeting, .ehlo, .mailFrom, .rcptTo, .dataInit, .dataBlock, .dataTermination, .dataTermination, .quit])
        #expect(SMTPClientPhase.greeting.timeoutSeconds == 300)
        #expect(SMTPClientPhase.dataInit.timeoutSeconds == 120)
        #expect(SMTPClientPhase.dataBlock.timeoutSeconds == 180)
        #expect(SMTPClientPhase.dataTermination.timeoutSeconds == 600)
        #expect(SMTPClientPhase.idle.timeoutSeconds == nil)
    }

    // MARK: EHLO, HELO, STARTTLS, AUTH

    @Test(arguments: ["500 5.5.1 Command unrecognized", "502 Not implemented"])
    func ehloRefusedFallsBackToHELO(reply: String) {
        let run = drive(clientPolicy(), message(["bob@example.net"], bodyType: .eightBitMIME), peer: Peer([("EHLO", reply)]))
        #expect(run.commands == ["EHLO client.example.org", "HELO client.example.org",
                                 "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.net>", "DATA", "QUIT"])
        #expect(run.session.usedHELO)
        #expect(run.status(1) == .sent)
        // 8-bit content to a host without 8BITMIME (HELO: no extensions):
        // converted to 7 bit first, noted.
        #expect(run.actions.contains(.downgradeBody))
        #expect(run.messageResults.first?.notes == ["8-bit content converted to quoted-printable for a host without 8BITMIME"])
    }

    @Test func ehloTemporaryFailureFailsTheSession() throws {
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: Peer([("EHLO", "451 4.3.0 Try later")]))
        #expect(run.commands == ["EHLO client.example.org", "QUIT"])
        let f = try #require(run.failures.first)
        #expect(f.kind == .hello && f.status == EnhancedStatus(4, 3, 0))
        #expect(run.results.isEmpty)
        #expect(run.session.pendingRecipients == [1])
        #expect(f.deferral.status == .deferred)
        #expect(run.closed)
    }

    @Test func heloRefusedFailsTheSession() throws {
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: Peer([("EHLO", "502 no"), ("HELO", "550 5.7.1 Go away")]))
        let f = try #require(run.failures.first)
        #expect(f.kind == .hello)
        #expect(f.status == EnhancedStatus(4, 7, 1))  // a session failure defers
        #expect(f.reply?.code == 550)
    }

    @Test func secondEHLOAfterTLSNeverFallsBackToHELO() throws {
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: Peer([("EHLO", "250-mx\r\n250 STARTTLS"), ("EHLO", "500 what")]))
        #expect(false == run.commands.contains("HELO client.example.org"))
        let f = try #require(run.failures.first)
        #expect(f.kind == .hello)
    }

    @Test func startTLSNotOfferedButRequired() throws {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "PIPELINING"]
        let run = drive(clientPolicy(.required), message(["bob@example.net"]), peer: peer)
        #expect(run.commands == ["EHLO client.example.org", "QUIT"])
        let f = try #require(run.failures.first)
        #expect(f.kind == .tlsRequired)
        #expect(f.status == EnhancedStatus(4, 7, 4))
        #expect(f.text == "TLS is required, but was not offered by host")
        #expect(run.results.isEmpty)
    }

    @Test func startTLSRefusedOpportunisticContinuesInClear() {
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: Peer([("STARTTLS", "454 4.7.0 TLS not available")]))
        #expect(run.commands == ["EHLO client.example.org", "STARTTLS", "MAIL FROM:<alice@example.org> SIZE=1000",
                                 "RCPT TO:<bob@example.net>", "DATA", "QUIT"])
        #expect(run.session.tlsReport == nil)
        #expect(run.status(1) == .sent)
    }

    @Test func startTLSRefusedRequiredFails() throws {
        let run = drive(clientPolicy(.required), message(["bob@example.net"]), peer: Peer([("STARTTLS", "454 4.7.0 TLS not available")]))
        let f = try #require(run.failures.first)
        #expect(f.kind == .tlsRequired && f.status == EnhancedStatus(4, 7, 4))
        #expect(run.commands.last == "QUIT")
    }

    @Test func tlsHandshakeFailure() throws {
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: Peer(), tls: .failed)
        let f = try #require(run.failures.first)
        #expect(f.kind == .tlsHandshake && f.status == EnhancedStatus(4, 7, 5))
        #expect(f.plaintextRetryMayWork)
        #expect(f.text == "TLS handshake failed: certificate verify failed")
        #expect(run.commands == ["EHLO client.example.org", "STARTTLS"])
        #expect(run.closed)
        let strict = drive(clientPolicy(.required), message(["bob@example.net"]), peer: Peer(), tls: .failed)
        #expect(strict.failures.first?.plaintextRetryMayWork == false)
    }

    @Test(arguments: Feed.allCases)
    func bytesAfterSTARTTLSReplyAreAProtocolError(feed: Feed) throws {
        // CVE-2011-0411 on the client side: a reply pipelined by the server
        // (or a man in the middle) after 220 must not be read as if it came
        // through TLS.
        let run = drive(clientPolicy(), message(["bob@example.net"]),
                        peer: Peer([("STARTTLS", "220 2.0.0 Ready\r\n250-mx\r\n250 AUTH PLAIN\r\n")]), feed: feed)
        let e = try #require(run.protocolErrors.first)
        #expect(e.kind == .protocolError && e.status == EnhancedStatus(4, 5, 0))
        #expect(run.session.tlsReport == nil)
        #expect(run.commands == ["EHLO client.example.org", "STARTTLS"])
        #expect(run.actions.last == .close)
        #expect(run.results.isEmpty)
    }

    @Test func authPlainAfterTLS() throws {
        var p = clientPolicy(.required)
        p.credentials = SMTPClientCredentials(username: "user", password: "pa ss")
        var peer = Peer()
        peer.ehloAfterTLS = ["smarthost", "PIPELINING", "AUTH LOGIN PLAIN"]
        let run = drive(p, message(["bob@example.net"]), peer: peer)
        // base64("\0user\0pa ss")
        #expect(run.commands.contains("AUTH PLAIN AHVzZXIAcGEgc3M="))
        #expect(run.session.authenticated)
        #expect(run.status(1) == .sent)
        #expect(p.credentials?.description == "PLAIN user=user")
    }

    @Test func authOldStyleKeywordAndAuthorizationIdentity() {
        var p = clientPolicy(.none)
        p.credentials = SMTPClientCredentials(username: "u", password: "p", authorizationIdentity: "z")
        p.allowAuthenticationWithoutTLS = true
        var peer = Peer()
        peer.ehlo = ["smarthost", "AUTH=PLAIN"]
        let run = drive(p, message(["bob@example.net"]), peer: peer)
        #expect(run.commands.contains("AUTH PLAIN " + String(decoding: SMTPClientBase64.encode(Array("z\0u\0p".utf8)), as: UTF8.self)))
        #expect(run.status(1) == .sent)
    }

    @Test func authFailuresDefer() throws {
        var p = clientPolicy()
        p.credentials = SMTPClientCredentials(username: "u", password: "p")
        var peer = Peer([("AUTH", "535 5.7.8 Authentication credentials invalid")])
        peer.ehloAfterTLS = ["smarthost", "AUTH PLAIN"]
        let refused = drive(p, message(["bob@example.net"]), peer: peer)
        let f = try #require(refused.failures.first)
        #expect(f.kind == .authentication && f.status == EnhancedStatus(4, 7, 8))
        #expect(!f.text.contains("p\u{0}"))

        var noAuth = Peer()
        noAuth.ehloAfterTLS = ["smarthost", "AUTH LOGIN"]
        let notOffered = drive(p, message(["bob@example.net"]), peer: noAuth)
        #expect(notOffered.failures.first?.kind == .authentication)
        #expect(notOffered.failures.first?.text.contains("offered: LOGIN") == true)

        var clear = Peer()
        clear.ehlo = ["smarthost", "AUTH PLAIN"]
        let noTLS = drive(p, message(["bob@example.net"]), peer: clear)
        #expect(noTLS.failures.first?.text == "refusing to send credentials without TLS")
        #expect(!noTLS.commands.contains { $0.hasPrefix("AUTH") })
    }

    // MARK: Greeting

    @Test(arguments: [("554 5.7.1 No service", EnhancedStatus(4, 7, 1), true),
                      ("450 busy", EnhancedStatus(4, 0, 0), true),
                      ("421 4.3.2 Too many connections", EnhancedStatus(4, 3, 2), false)])
    func greetingRefusals(greeting: String, status: EnhancedStatus, sendsQuit: Bool) throws {
        var peer = Peer()
        peer.greeting = greeting
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: peer)
        let f = try #require(run.failures.first)
        #expect(f.kind == (greeting.hasPrefix("421") ? .serviceClosing : .greeting))
        #expect(f.status == status)
        #expect(f.phase == .greeting)
        #expect(run.commands == (sendsQuit ? ["QUIT"] : []))
        #expect(run.results.isEmpty && run.session.pendingRecipients == [1])
        #expect(run.closed)
    }

    @Test func multiLineGreeting() {
        var peer = Peer()
        peer.greeting = "220-mx.example.net ESMTP\r\n220-second line\r\n220 last"
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: peer, feed: .byteAtATime)
        #expect(run.status(1) == .sent)
    }

    // MARK: Recipients

    @Test(arguments: Feed.allCases)
    func partialRecipientRefusal(feed: Feed) throws {
        let peer = Peer([("RCPT TO:<bob@", "550 5.1.1 <bob@example.net>: Recipient address rejected"),
                         ("RCPT TO:<dave@", "452 4.2.2 Mailbox full")])
        let run = drive(clientPolicy(), message(["bob@example.net", "carol@example.net", "dave@example.net"]), peer: peer, feed: feed)
        let bob = try #require(run.results[1])
        #expect(bob.status == .bounced && bob.dsn == EnhancedStatus(5, 1, 1) && bob.phase == .rcptTo)
        #expect(bob.text == "550 5.1.1 <bob@example.net>: Recipient address rejected (in reply to RCPT TO command)")
        #expect(run.status(2) == .sent)
        let dave = try #require(run.results[3])
        #expect(dave.status == .deferred && dave.dsn == EnhancedStatus(4, 2, 2))
        #expect(run.messageResults.first.map { ($0.sent, $0.deferred, $0.bounced) } ?? (0, 0, 0) == (1, 1, 1))
        #expect(run.peer.messages.count == 1)
    }

    @Test(arguments: [true, false])
    func allRecipientsRefusedSendsNoData(pipelining: Bool) throws {
        let peer = Peer([("RCPT", "550 5.1.1 no"), ("RCPT", "550 5.1.1 no")])
        let run = drive(clientPolicy(.none, pipelining: pipelining), message(["a@x.net", "b@x.net"]), peer: peer,
                        more: [message(["c@x.net"], first: 10)])
        #expect(run.peer.messages.count == 1)  // only the second message
        #expect(run.results[1]?.status == .bounced)
        #expect(run.messageResults.count == 2)
        #expect(run.messageResults[0].bounced == 2 && run.messageResults[0].bytesSent == 0)
        // The open transaction is reset before the next MAIL.
        let mails = run.commands.filter { $0.hasPrefix("MAIL") || $0 == "RSET" }
        #expect(mails == ["MAIL FROM:<alice@example.org> SIZE=1000", "RSET", "MAIL FROM:<alice@example.org> SIZE=1000"])
        #expect(run.commands.filter { $0 == "DATA" }.count == (pipelining ? 2 : 1))
    }

    @Test func pipelinedDATAAcceptedWithoutRecipientsGetsALoneDot() {
        // A broken server says 354 although it refused every recipient.
        let peer = Peer([("RCPT", "550 5.1.1 no"), ("DATA", "354 go ahead")])
        let run = drive(clientPolicy(.none), message(["a@x.net"]), peer: peer)
        #expect(run.peer.messages == [[]])
        #expect(run.results[1]?.status == .bounced)
        #expect(run.messageResults.count == 1 && run.protocolErrors.isEmpty)
        #expect(run.commands.last == "QUIT")
    }

    // MARK: 4xx and 5xx at every stage

    struct StageCase: Sendable, CustomStringConvertible {
        var rule: String
        var reply: String
        var expected: SMTPDeliveryResult.Status
        var phase: SMTPClientPhase
        /// `mayTryAnotherHost`: a 4xx is this host's answer only.
        var anotherHost: Bool
        var description: String { "\(rule) -> \(reply)" }
    }

    static let stageCases: [StageCase] = [
        StageCase(rule: "MAIL", reply: "451 4.3.0 Try later", expected: .deferred, phase: .mailFrom, anotherHost: true),
        StageCase(rule: "MAIL", reply: "553 5.1.8 Sender rejected", expected: .bounced, phase: .mailFrom, anotherHost: false),
        StageCase(rule: "RCPT", reply: "450 4.2.1 Greylisted", expected: .deferred, phase: .rcptTo, anotherHost: true),
        StageCase(rule: "RCPT", reply: "550 5.1.1 Unknown", expected: .bounced, phase: .rcptTo, anotherHost: false),
        StageCase(rule: "DATA", reply: "451 4.3.0 Not now", expected: .deferred, phase: .dataInit, anotherHost: true),
        StageCase(rule: "DATA", reply: "554 5.7.1 No", expected: .bounced, phase: .dataInit, anotherHost: false),
        StageCase(rule: "<END-OF-DATA>", reply: "452 4.3.1 Insufficient storage", expected: .deferred, phase: .dataTermination,
                  anotherHost: true),
        StageCase(rule: "<END-OF-DATA>", reply: "554 5.7.1 Spam", expected: .bounced, phase: .dataTermination, anotherHost: false),
        StageCase(rule: "<END-OF-DATA>", reply: "550 Rejected", expected: .bounced, phase: .dataTermination, anotherHost: false),
    ]

    @Test(arguments: stageCases, [true, false])
    func failuresAtEveryTransactionStage(c: StageCase, pipelining: Bool) throws {
        let run = drive(clientPolicy(.none, pipelining: pipelining), message(["bob@example.net"]), peer: Peer([(c.rule, c.reply)]))
        let r = try #require(run.results[1])
        #expect(r.status == c.expected)
        #expect(r.phase == c.phase)
        #expect(r.mayTryAnotherHost == c.anotherHost)
        #expect(r.reply?.code == Int(c.reply.prefix(3)))
        #expect(r.dsn.codeClass == c.reply.first!.wholeNumberValue!)
        if !c.reply.contains(".") { #expect(r.dsn == EnhancedStatus(5, 0, 0)) }
        #expect(r.text.hasSuffix("(\(c.phase))"))
        #expect(run.messageResults.count == 1)
        #expect(run.failures.isEmpty && run.protocolErrors.isEmpty)
        #expect(run.commands.last == "QUIT")
        #expect(run.peer.messages.count == (c.rule == "<END-OF-DATA>" ? 1 : 0))
    }

    /// After a 4xx the I/O layer takes the recipients to the next MX and
    /// may cache this connection for the next job: the session must be
    /// in step for another message, with RSET first where the refused
    /// transaction was left open (accepted MAIL, no end of data).
    @Test(arguments: stageCases.filter(\.anotherHost), [true, false])
    func theSessionStaysUsableAfterATemporaryRefusal(c: StageCase, pipelining: Bool) throws {
        let run = drive(clientPolicy(.none, pipelining: pipelining), message(["bob@example.net"]), peer: Peer([(c.rule, c.reply)]),
                        more: [message(["carol@example.net"], first: 10)])
        #expect(run.status(1) == .deferred)
        #expect(run.status(10) == .sent)
        #expect(run.failures.isEmpty && run.protocolErrors.isEmpty)
        let transactionLeftOpen = c.rule == "RCPT" || c.rule == "DATA"
        #expect(run.commands.filter { $0.hasPrefix("MAIL") || $0 == "RSET" }
                == ["MAIL FROM:<alice@example.org> SIZE=1000"] + (transactionLeftOpen ? ["RSET"] : [])
                   + ["MAIL FROM:<alice@example.org> SIZE=1000"])
        #expect(run.peer.messages.count == (c.rule == "<END-OF-DATA>" ? 2 : 1))
        #expect(run.commands.last == "QUIT")
    }

    struct HostCase: Sendable, CustomStringConvertible {
        var result: SMTPDeliveryResult
        var anotherHost: Bool
        var description: String { "\(result.status) \(result.dsn) reply=\(result.reply != nil) hostSpecific=\(result.hostSpecific)" }
    }

    /// Which results another MX may improve on: a peer's 4xx and a
    /// refusal for this host's abilities; never a sent recipient, a
    /// peer's 5xx or a local refusal of the address itself.
    static let hostCases: [HostCase] = [
        HostCase(result: SMTPDeliveryResult(reply: SMTPReply(250, EnhancedStatus(2, 0, 0), "Ok"), phase: .dataTermination),
                 anotherHost: false),
        HostCase(result: SMTPDeliveryResult(reply: SMTPReply(451, EnhancedStatus(4, 3, 0), "Later"), phase: .mailFrom),
                 anotherHost: true),
        HostCase(result: SMTPDeliveryResult(reply: SMTPReply(450, nil, "Greylisted"), phase: .rcptTo), anotherHost: true),
        HostCase(result: SMTPDeliveryResult(reply: SMTPReply(550, EnhancedStatus(5, 1, 1), "Unknown"), phase: .rcptTo),
                 anotherHost: false),
        HostCase(result: SMTPDeliveryResult(local: .bounced, EnhancedStatus(5, 3, 4), "too large", phase: .mailFrom, hostSpecific: true),
                 anotherHost: true),
        HostCase(result: SMTPDeliveryResult(local: .bounced, EnhancedStatus(5, 1, 3), "bad address", phase: .rcptTo, hostSpecific: false),
                 anotherHost: false),
    ]

    @Test(arguments: hostCases)
    func whichResultsAnotherHostMayImprove(c: HostCase) {
        #expect(c.result.mayTryAnotherHost == c.anotherHost)
    }

    @Test(arguments: ["MAIL", "RCPT", "DATA", "<END-OF-DATA>"])
    func serviceClosingMidTransaction(rule: String) throws {
        let run = drive(clientPolicy(.none), message(["bob@example.net"]),
                        peer: Peer([(rule, "421 4.4.2 mx.example.net Error: timeout exceeded")]))
        let f = try #require(run.failures.first)
        #expect(f.kind == .serviceClosing && f.status == EnhancedStatus(4, 4, 2))
        #expect(run.results.isEmpty)
        #expect(run.session.pendingRecipients == [1])
        #expect(run.closed)
        #expect(run.commands.last != "QUIT")
    }

    // MARK: Per-message checks against the host's abilities

    @Test func sizeOverTheHostLimitBounces() throws {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "PIPELINING", "SIZE 1000"]
        let run = drive(clientPolicy(.none), message(["bob@example.net"], size: 1001), peer: peer,
                        more: [message(["carol@example.net"], first: 10, size: 1000)])
        let r = try #require(run.results[1])
        #expect(r.status == .bounced && r.dsn == EnhancedStatus(5, 3, 4) && r.hostSpecific && r.reply == nil)
        #expect(r.text == "message size 1001 exceeds size limit 1000 of host")
        // Nothing was sent for it; the next message goes through.
        #expect(run.commands.filter { $0.hasPrefix("MAIL") } == ["MAIL FROM:<alice@example.org> SIZE=1000"])
        #expect(run.peer.messages.count == 1)
        #expect(!run.commands.contains("RSET"))
    }

    @Test func sizeZeroMeansNoLimit() {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "SIZE 0"]
        let run = drive(clientPolicy(.none), message(["bob@example.net"], size: 99_999_999), peer: peer)
        #expect(run.status(1) == .sent)
        #expect(run.session.capabilities.sizeLimit == nil)
    }

    @Test func smtputf8NeededButNotOfferedBounces() throws {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "8BITMIME"]
        let flagged = drive(clientPolicy(.none), message(["bob@example.net"], smtputf8: true), peer: peer)
        let r = try #require(flagged.results[1])
        #expect(r.status == .bounced && r.dsn == EnhancedStatus(5, 6, 7) && r.hostSpecific)
        #expect(!flagged.commands.contains { $0.hasPrefix("MAIL") })

        let implied = drive(clientPolicy(.none), message(["jürgen@example.net"]), peer: peer)
        #expect(implied.results[1]?.dsn == EnhancedStatus(5, 6, 7))

        let offered = drive(clientPolicy(.none), message(["jürgen@example.net"], bodyType: .eightBitMIME), peer: Peer())
        #expect(offered.commands.contains("MAIL FROM:<alice@example.org> SIZE=1000 BODY=8BITMIME SMTPUTF8"))
        #expect(offered.commands.contains("RCPT TO:<jürgen@example.net>"))
        #expect(offered.status(1) == .sent)
    }

    @Test func eightBitWithout8BITMIMECanBounceByPolicy() {
        var p = clientPolicy(.none)
        p.eightBitWithout8BITMIME = .bounce
        var peer = Peer()
        peer.ehlo = ["mx.example.net"]
        let run = drive(p, message(["bob@example.net"], bodyType: .eightBitMIME), peer: peer)
        #expect(run.results[1]?.dsn == EnhancedStatus(5, 6, 3))
        #expect(run.results[1]?.hostSpecific == true)
        #expect(!run.actions.contains(.downgradeBody))
    }

    /// RFC 6152 section 3, by default: the I/O layer converts the body
    /// before MAIL; SIZE= is the converted size and no BODY= goes out.
    @Test func eightBitWithout8BITMIMEIsConvertedByDefault() throws {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "PIPELINING", "SIZE 10240000"]
        let converted = SMTPBodyDowngrade(size: 1234, convertedParts: 2, remarks: ["8-bit header fields sent unchanged"])
        let run = drive(clientPolicy(.none), message(["bob@example.net"], bodyType: .eightBitMIME), peer: peer,
                        downgrade: .converted(converted))
        let downgrade = try #require(run.actions.firstIndex(of: .downgradeBody))
        let mail = try #require(run.actions.firstIndex { if case .send(let b) = $0 { b.starts(with: Array("MAIL".utf8)) } else { false } })
        #expect(downgrade < mail)
        #expect(run.commands.contains("MAIL FROM:<alice@example.org> SIZE=1234"))
        #expect(run.session.transferSize == 1234)
        #expect(run.status(1) == .sent)
        #expect(run.messageResults.first?.notes == ["8-bit content converted to quoted-printable for a host without 8BITMIME",
                                                    "8-bit header fields sent unchanged"])
    }

    @Test func convertedSizeIsCheckedAgainstTheHostsLimit() {
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "SIZE 1100"]
        let run = drive(clientPolicy(.none), message(["bob@example.net"], size: 1000, bodyType: .eightBitMIME), peer: peer,
                        downgrade: .converted(SMTPBodyDowngrade(size: 1200, convertedParts: 1)))
        #expect(run.results[1]?.dsn == EnhancedStatus(5, 3, 4))
        #expect(run.results[1]?.text == "message size 1200 exceeds size limit 1100 of host")
        #expect(!run.commands.contains { $0.hasPrefix("MAIL") })
    }

    @Test func unconvertibleBodyBouncesForThisHost() {
        var peer = Peer()
        peer.ehlo = ["mx.example.net"]
        let run = drive(clientPolicy(.none), message(["bob@example.net"], bodyType: .eightBitMIME), peer: peer,
                        downgrade: .failed("8-bit data in a application/octet-stream part with Content-Transfer-Encoding: binary cannot be converted to 7 bit"))
        #expect(run.results[1]?.status == .bounced)
        #expect(run.results[1]?.dsn == EnhancedStatus(5, 6, 3))
        #expect(run.results[1]?.hostSpecific == true)
        #expect(run.results[1]?.text.hasSuffix("binary cannot be converted to 7 bit (host does not offer 8BITMIME)") == true)
        #expect(!run.commands.contains { $0.hasPrefix("MAIL") })
    }

    @Test func eightBitSentUnchangedByPolicy() {
        var p = clientPolicy(.none)
        p.eightBitWithout8BITMIME = .send
        var peer = Peer()
        peer.ehlo = ["mx.example.net", "SIZE 10240000"]
        let run = drive(p, message(["bob@example.net"], bodyType: .eightBitMIME), peer: peer)
        #expect(!run.actions.contains(.downgradeBody))
        #expect(run.commands.contains("MAIL FROM:<alice@example.org> SIZE=1000"))
        #expect(run.status(1) == .sent)
        #expect(run.messageResults.first?.notes == ["8-bit content sent unchanged to a host that does not offer 8BITMIME"])
    }

    @Test func noConversionForAHostWith8BITMIMEOrA7BitMessage() {
        let offered = drive(clientPolicy(.none), message(["bob@example.net"], bodyType: .eightBitMIME), peer: Peer())
        #expect(!offered.actions.contains(.downgradeBody))
        #expect(offered.commands.contains("MAIL FROM:<alice@example.org> SIZE=1000 BODY=8BITMIME"))
        var peer = Peer()
        peer.ehlo = ["mx.example.net"]
        let sevenBit = drive(clientPolicy(.none), message(["bob@example.net"], bodyType: .sevenBit), peer: peer)
        #expect(!sevenBit.actions.contains(.downgradeBody))
        #expect(sevenBit.status(1) == .sent)
    }

    @Test func requireTLSDelivered() {
        let run = drive(clientPolicy(.none), message(["bob@example.net"], requireTLS: true), peer: Peer())
        // REQUIRETLS forces STARTTLS even under policy "none".
        #expect(run.commands.contains("STARTTLS"))
        #expect(run.commands.contains("MAIL FROM:<alice@example.org> SIZE=1000 REQUIRETLS"))
        #expect(run.status(1) == .sent)
    }

    @Test func requireTLSRefusals() throws {
        var noKeyword = Peer()
        noKeyword.ehloAfterTLS = ["mx.example.net", "PIPELINING"]
        let a = drive(clientPolicy(), message(["bob@example.net"], requireTLS: true), peer: noKeyword)
        let ra = try #require(a.results[1])
        #expect(ra.status == .bounced && ra.dsn == EnhancedStatus(5, 7, 30) && ra.hostSpecific)
        #expect(ra.text == "REQUIRETLS support required, but host does not offer REQUIRETLS")
        #expect(!a.commands.contains { $0.hasPrefix("MAIL") })

        let b = drive(clientPolicy(), message(["bob@example.net"], requireTLS: true), peer: Peer(), tls: .established(authenticated: false))
        #expect(b.results[1]?.dsn == EnhancedStatus(5, 7, 30))
        #expect(b.results[1]?.text.contains("not authenticated") == true)

        var noTLS = Peer()
        noTLS.ehlo = ["mx.example.net", "REQUIRETLS"]
        let c = drive(clientPolicy(), message(["bob@example.net"], requireTLS: true), peer: noTLS)
        #expect(c.results[1]?.dsn == EnhancedStatus(5, 7, 30))
        #expect(c.results[1]?.text.contains("not encrypted") == true)
    }

    // MARK: Parameters

    @Test func dsnParametersAreXtextEncoded() {
        let m = SMTPClientMessage(
            sender: "", recipients: [SMTPClientRecipient(index: 7, address: "bob@example.net",
                                                         notify: DSNNotify(success: true, failure: true),
                                                         orcpt: DSNOriginalRecipient(addressType: "rfc822", address: "Bob+x=y@example.net"))],
            size: 42, bodyType: .sevenBit, ret: .headers, envid: "QQ 1+2=3")
        let run = drive(clientPolicy(.none), m, peer: Peer())
        #expect(run.commands.contains("MAIL FROM:<> SIZE=42 BODY=7BIT RET=HDRS ENVID=QQ+201+2B2+3D3"))
        #expect(run.commands.contains("RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx+3Dy@example.net"))
        #expect(run.results[7]?.status == .sent)

        // A UTF-8 original recipient (a forwarded copy of mail to a UTF-8
        // alias) goes as RFC 6533's utf-8 type, ASCII on the wire.
        let utf8 = SMTPClientMessage(
            sender: "", recipients: [SMTPClientRecipient(index: 1, address: "bob@example.net",
                                                         orcpt: DSNOriginalRecipient(addressType: "rfc822", address: "\u{7528}+=\\@example.net"))],
            size: 42, bodyType: .sevenBit)
        let u = drive(clientPolicy(.none), utf8, peer: Peer())
        #expect(u.commands.contains("RCPT TO:<bob@example.net> ORCPT=utf-8;\\x{7528}\\x{2B}\\x{3D}\\x{5C}@example.net"), "\(u.commands)")
        #expect(SMTPClientSession.utf8AddressXText("a\tb \u{1F600}") == "a\\x{09}b\\x{20}\\x{1F600}")   // HEXPOINT: 2 digits at least

        var plain = Peer()
        plain.ehlo = ["mx.example.net"]
        let without = drive(clientPolicy(.none), m, peer: plain)
        #expect(without.commands.contains("MAIL FROM:<>"))
        #expect(without.commands.contains("RCPT TO:<bob@example.net>"))
    }

    @Test func addressesThatWouldBreakTheCommandLineAreNotSent() throws {
        let run = drive(clientPolicy(.none), message(["ok@example.net", "evil@x>\r\nRSET"]), peer: Peer())
        #expect(run.results[2]?.dsn == EnhancedStatus(5, 1, 3))
        #expect(run.status(1) == .sent)
        #expect(!run.commands.contains("RSET"))
        let badSender = drive(clientPolicy(.none), message(["ok@example.net"], sender: "a\r\nb@x"), peer: Peer())
        #expect(badSender.results[1]?.dsn == EnhancedStatus(5, 1, 7))
        #expect(!badSender.commands.contains { $0.hasPrefix("MAIL") })
    }

    // MARK: Connection reuse

    @Test(arguments: Feed.allCases)
    func connectionReuse(feed: Feed) {
        let second = SMTPClientMessage(sender: "x@example.org", recipients: [SMTPClientRecipient(index: 20, address: "e@example.net")], size: 5)
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: Peer([("<END-OF-DATA>", "250 2.0.0 first")]), feed: feed,
                        bodies: [[Array("one\r\n".utf8)], [Array("two".utf8)]], more: [second])
        #expect(run.messageResults.count == 2)
        #expect(run.session.messageCount == 2)
        #expect(run.peer.messages == [Array("one\r\n".utf8), Array("two\r\n".utf8)])
        #expect(run.results[1]?.text.hasPrefix("250 2.0.0 first") == true)
        #expect(run.results[20]?.status == .sent)
        // A completed transaction needs no RSET; one TLS handshake for both.
        #expect(!run.commands.contains("RSET"))
        #expect(run.tlsStarts == 1)
        #expect(run.commands.filter { $0.hasPrefix("EHLO") }.count == 2)
    }

    @Test func rsetAfterAFailedTransactionAndRefusedRSET() throws {
        let peer = Peer([("DATA", "451 4.3.0 no"), ("RSET", "500 5.5.1 what")])
        let run = drive(clientPolicy(.none), message(["bob@example.net"]), peer: peer, more: [message(["c@example.net"], first: 10)])
        #expect(run.results[1]?.status == .deferred)
        let f = try #require(run.failures.first)
        #expect(f.kind == .reset && f.status == EnhancedStatus(4, 5, 1))
        #expect(run.session.pendingRecipients == [10])  // the second message's recipient
        // RSET travels alone, so its refusal leaves nothing in flight.
        #expect(run.writes.contains("RSET\r\n"))
        #expect(run.commands.suffix(2) == ["RSET", "QUIT"])
    }

    // MARK: Lost connections and timeouts

    @Test func lostConnectionAndTimeoutDefer() throws {
        var s = SMTPClientSession(policy: clientPolicy(.none), message: message(["bob@example.net"]))
        #expect(s.phase == .greeting)
        let lost = s.connectionLost()
        guard case .sessionFailed(let f) = lost.first else { Issue.record("no failure"); return }
        #expect(f.kind == .connectionLost && f.status == EnhancedStatus(4, 4, 2))
        #expect(f.text == "lost connection while receiving the initial server greeting")
        #expect(lost.last == .close)
        #expect(s.connectionLost().isEmpty)

        var t = SMTPClientSession(policy: clientPolicy(.none), message: message(["bob@example.net"]))
        _ = t.receive(Array("220 hi\r\n".utf8))
        let timeout = t.timedOut()
        guard case .sessionFailed(let g) = timeout.first else { Issue.record("no failure"); return }
        #expect(g.kind == .timeout && g.phase == .ehlo)

        // Idle cached connection dropped: nothing to report.
        let run = drive(clientPolicy(.none), message(["bob@example.net"]), peer: Peer([("QUIT", "")]))
        #expect(run.failures.isEmpty)
        var idle = SMTPClientSession(policy: clientPolicy(.none), message: message([]))
        _ = idle.receive(Array("220 hi\r\n".utf8))
        let r = idle.receive(Array("250 mx\r\n".utf8))
        #expect(r.contains { if case .messageResult = $0 { true } else { false } })
        #expect(idle.isIdle)
        #expect(idle.connectionLost() == [.close])
    }

    @Test func idleConnectionTimedOutByTheServer() {
        var s = SMTPClientSession(policy: clientPolicy(.none), message: message([]))
        _ = s.receive(Array("220 hi\r\n".utf8))
        _ = s.receive(Array("250 mx\r\n".utf8))
        #expect(s.isIdle)
        #expect(s.receive(Array("421 4.4.2 mx Error: ".utf8)).isEmpty)
        #expect(s.receive(Array("timeout exceeded\r\n".utf8)) == [.close])
        #expect(s.isClosed)

        var t = SMTPClientSession(policy: clientPolicy(.none), message: message([]))
        _ = t.receive(Array("220 hi\r\n".utf8))
        _ = t.receive(Array("250 mx\r\n".utf8))
        let a = t.receive(Array("250 what\r\n".utf8))
        guard case .protocolError(let f) = a.first else { Issue.record("expected a protocol error"); return }
        #expect(f.phase == .idle)
        #expect(a.last == .close)
    }

    @Test func quitDuringBodyOnlyCloses() {
        var s = SMTPClientSession(policy: clientPolicy(.none), message: message(["bob@example.net"]))
        _ = s.receive(Array("220 hi\r\n".utf8))
        _ = s.receive(Array("250 mx\r\n".utf8))
        _ = s.receive(Array("250 ok\r\n".utf8))
        _ = s.receive(Array("250 ok\r\n".utf8))
        let a = s.receive(Array("354 go\r\n".utf8))
        #expect(a == [.sendBody])
        #expect(s.quit() == [.close])
    }
}
