// The server over real TCP with a real inject peer: sessions, what reaches
// the queue, and the log lines.

import Foundation
import SMTP
import SMTPInjection
@testable import SMTPService
import StageProtocol
import Testing

@Suite struct Sessions {
    @Test func fullSessionQueuesOneMessageWithItsEnvelope() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        let ehlo = try greet(c)
        #expect(ehlo.lines.contains("250-PIPELINING"))
        #expect(ehlo.lines.contains("250-SIZE 10240000"))
        #expect(!ehlo.description.contains("STARTTLS"), "no TLS process: STARTTLS must not be offered")
        #expect(c.command("MAIL FROM:<alice@example.org> SIZE=100 RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME")?.code == 250)
        #expect(c.command("RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.test")?.code == 250)
        #expect(c.command("RCPT TO:<carol@Example.Test>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        let done = try #require(c.command("Subject: hi\r\n\r\nHello.\r\n..dot\r\n."))
        #expect(done.code == 250)
        #expect(done.last.hasPrefix("250 2.0.0 Ok: queued as "))
        #expect(c.command("QUIT")?.code == 221)
        #expect(c.readToEOF().isEmpty)

        let messages = h.queue.accepted
        try #require(messages.count == 1)
        let m = messages[0]
        #expect(m.sender == "alice@example.org")
        #expect(m.recipients == ["bob@example.test", "carol@Example.Test"])
        #expect(try m.rcpts[0].optionalText("notify") == "SUCCESS,FAILURE")
        #expect(try m.rcpts[0].optionalText("orcpt") == "rfc822;bob@example.test")
        #expect(try m.rcpts[1].optionalText("notify") == nil)
        #expect(try m.mail.text("client-address") == "127.0.0.1")
        #expect(try m.mail.text("client-name") == "unknown")
        #expect(try m.mail.text("helo") == "client.example.org")
        #expect(try m.mail.text("protocol") == "ESMTP")
        #expect(try m.mail.optionalText("ret") == "HDRS")
        #expect(try m.mail.optionalText("envid") == "abc+def")
        #expect(try m.mail.optionalText("body-type") == "8BITMIME")
        #expect(try m.mail.optionalUInt("size") == 100)
        #expect(try m.mail.bool("smtputf8", default: false) == false)
        // A fresh inject connection: the queue's HELLO reserved the ID.
        #expect(try m.mail.bool("announce-id", default: false) == false)
        // The Received line comes first, with the queue ID the queue
        // reserved (the one of the 250 and of the MAIL), then the message,
        // dot-unstuffed.
        let id = String(done.last.dropFirst("250 2.0.0 Ok: queued as ".count))
        #expect(id.count == 12)
        #expect(try m.mail.optionalText("queue-id") == id)
        #expect(m.text.hasPrefix("Received: from client.example.org (unknown [127.0.0.1])\r\n\tby mx.example.test (Sealpost) with ESMTP id \(id);\r\n\t"))
        #expect(m.text.hasSuffix("\r\nSubject: hi\r\n\r\nHello.\r\n.dot\r\n"))

        let logs = h.logs.all
        #expect(logs.contains("connect from unknown[127.0.0.1]"))
        #expect(logs.contains("\(id): client=unknown[127.0.0.1]"))
        #expect(h.logs.eventually("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6"))
    }

    @Test func queueIDIsLoggedBeforeTheMessageIsCommitted() throws {
        let h = try Harness(queue: FakeQueue(answer: .refuse(code: 452, status: "4.3.1", text: "queue full")))
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        #expect(c.command("MAIL FROM:<alice@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<bob@example.test>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        #expect(c.command("Subject: hi\r\n\r\nHello.\r\n.")?.code == 452)
        // The ID was announced (and logged) although the message was refused.
        let m = try #require(h.queue.refused.first)
        // "\tby mx.example.test (Sealpost) with ESMTP id ID" (then "for <...>; date").
        let by = try #require(m.text.split(separator: "\r\n").dropFirst().first)
        #expect(by.hasPrefix("\tby mx.example.test (Sealpost) with ESMTP id "))
        let id = String(by.split(separator: " ").last ?? "")
        #expect(id.count == 12)
        #expect(h.logs.contains("\(id): client=unknown[127.0.0.1]"))
        #expect(c.command("QUIT")?.code == 221)
    }

    @Test func queueThatNeverAnnouncesTheIDGives451() throws {
        let q = try FakeQueue()
        q.reserveIDs = false
        q.withholdID = true
        let h = try Harness(queue: q) { $0.timeouts.queueReply = 1 }
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        #expect(c.command("MAIL FROM:<alice@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<bob@example.test>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        let reply = try #require(c.command("Subject: hi\r\n\r\nHello.\r\n."))
        #expect(reply.code == 451)
        #expect(h.queue.accepted.isEmpty)
        #expect(h.logs.contains("warning: queue inject failed for unknown[127.0.0.1]: no answer from the queue within 1 s"), "\(h.logs.all)")
        #expect(c.command("QUIT")?.code == 221)
    }

    @Test func aQueueConnectionCarriesTheNextTransactionToo() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        let ids = try sendMessages(c, count: 3)
        #expect(c.command("QUIT")?.code == 221)
        #expect(h.queue.accepted.count == 3)
        #expect(Set(ids).count == 3)
        // One inject connection (and one HELLO) for the three messages.
        #expect(h.queue.connections == 1)
        for (m, id) in zip(h.queue.accepted, ids) {
            #expect(m.text.contains(" with ESMTP id \(id)\r\n"))
        }
    }

    @Test func theQueueIDNeedsNoRoundTripOnAPooledConnection() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        _ = try sendMessages(c, count: 2)
        #expect(c.command("QUIT")?.code == 221)
        // Each MAIL named the ID the queue reserved (in its HELLO, then in
        // the first ACCEPTED) and asked for no QUEUE-ID.
        let mails = h.queue.accepted.map(\.mail)
        #expect(mails.map { $0["announce-id"] } == [nil, nil])
        let ids = mails.compactMap { try? $0.text("queue-id") }
        #expect(ids.count == 2 && ids[0] != ids[1])
        for (m, id) in zip(h.queue.accepted, ids) {
            #expect(m.text.contains(" with ESMTP id \(id)\r\n"))
            #expect(h.logs.contains("\(id): client=unknown[127.0.0.1]"))
        }
    }

    @Test(arguments: [false, true])
    func aPooledConnectionTheQueueDroppedIsReplacedWithoutLoss(reserveIDs: Bool) throws {
        let q = try FakeQueue()
        q.reserveIDs = reserveIDs
        q.hangUpOnSecondMail = true
        let h = try Harness(queue: q)
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        let ids = try sendMessages(c, count: 2)
        #expect(c.command("QUIT")?.code == 221)
        // The second MAIL went out on the pooled connection, which the queue
        // closed; the transaction started over on a new one. Under a
        // reserved ID, the whole message had gone out with it: it went
        // again, with a Received header naming the new ID.
        #expect(h.queue.connections == 2)
        let accepted = h.queue.accepted
        #expect(accepted.map { $0.text.hasSuffix("Subject: 1\r\n\r\nHello.\r\n") } == [false, true])
        #expect(accepted.last.map { $0.text.components(separatedBy: "Received: ").count } == 2)
        #expect(accepted.last?.text.contains(" with ESMTP id \(ids[1])\r\n") == true)
        #expect(h.logs.contains("\(ids[1]): client=unknown[127.0.0.1]"))
        #expect(h.logs.contains("sending the message again under a new ID") == reserveIDs)
    }

    /// A connection idle in the pool for injectPoolIdle is closed (before
    /// the queue's own idle timeout, PROTOCOL.md 4.2), and the next
    /// message goes on a new one.
    @Test func anIdlePooledConnectionIsLetGo() throws {
        let h = try Harness { $0.timeouts.injectPoolIdle = 1 }
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        _ = try sendMessages(c, count: 1)
        #expect(becomesTrue { h.queue.closedIdle == 1 })
        _ = try sendMessages(c, count: 1)
        #expect(c.command("QUIT")?.code == 221)
        #expect(h.queue.connections == 2)
        #expect(h.queue.accepted.count == 2)
    }

    /// The real queue, its idle timeout (1 s) shorter than the pool's
    /// (60 s, the default): it closes the pooled connection, which the
    /// pool drops, and the next message goes on a new one. (A MAIL that
    /// crosses the close is retried on a new connection:
    /// aPooledConnectionTheQueueDroppedIsReplacedWithoutLoss.)
    @Test func aPooledConnectionTheQueueClosedWhenIdleCostsNoMessage() throws {
        let q = try RealQueue(injectIdleTimeout: .seconds(1))
        defer { q.stop() }
        let h = try Harness(injectPath: q.injectSocket)
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        _ = try sendMessages(c, count: 1)
        #expect(q.logs.eventually("closed: idle for 1 s"))
        _ = try sendMessages(c, count: 1)
        #expect(c.command("QUIT")?.code == 221)
        #expect(q.service.statistics().injected == 2)
        #expect(h.logs.all.filter { $0.contains("queue inject failed") }.isEmpty)
    }

    @Test func aQueueWithoutReservationsIsAskedForEachID() throws {
        let q = try FakeQueue()
        q.refuseReservations = true
        let h = try Harness(queue: q)
        defer { h.stop() }
        let c = try h.client()
        _ = try greet(c)
        _ = try sendMessages(c, count: 2)
        #expect(c.command("QUIT")?.code == 221)
        // The HELLO asking for reservations drew an ERROR; the next one did
        // not ask, and that connection carried both messages with QUEUE-ID.
        #expect(h.queue.connections == 2)
        #expect(h.queue.accepted.map { $0.mail["announce-id"] } == [.bool(true), .bool(true)])
        #expect(h.queue.protocolErrors.isEmpty)
        #expect(h.logs.all.filter { $0.contains("the queue refused reserve-ids (ERROR 5.5.0") }.count == 1)
    }

    /// A session whose first message was accepted, so that the next one
    /// goes out on the pooled inject connection under a reserved ID.
    private func sessionWithAPooledConnection(
        configure: (inout SMTPServiceSettings) -> Void = { _ in }
    ) throws -> (FakeQueue, Harness, SMTPTestClient) {
        let q = try FakeQueue()
        let h = try Harness(queue: q, configure: configure)
        let c = try h.client()
        _ = try greet(c)
        _ = try sendMessages(c, count: 1)
        return (q, h, c)
    }

    @Test func noReplayOnceTheQueueAnswered() throws {
        let (q, h, c) = try sessionWithAPooledConnection()
        defer { h.stop() }
        // The queue read the second message and answered, wrongly: it may
        // own the message, so smtp-listen says 451 and sends nothing again.
        q.wrongAcceptedID = true
        #expect(c.command("MAIL FROM:<alice@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<bob@example.test>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        #expect(c.command("Subject: 1\r\n\r\nHello.\r\n.")?.code == 451)
        #expect(c.command("QUIT")?.code == 221)
        #expect(h.queue.connections == 1)
        #expect(h.queue.accepted.count == 2)
        #expect(h.logs.contains("warning: queue inject failed for unknown[127.0.0.1]: ACCEPTED queue-id FFFFFFFFFFFF differs"))
        #expect(!h.logs.contains("sending the message again"))
    }

    @Test func noReplayForAClientThatLeftBeforeTheQueueAnswered() throws {
        let (q, h, c) = try sessionWithAPooledConnection()
        defer { h.stop() }
        // The second message goes out whole on the pooled connection; the
        // client leaves at once, and only then does the queue die without
        // answering. Nobody would see a replay's outcome: there is none.
        q.hangUpDelayMicroseconds = 300_000
        q.answer = .hangUp
        sendAMessageAndLeave(c)
        #expect(h.logs.eventually("queue inject failed for unknown[127.0.0.1]: queue closed the inject connection"), "\(h.logs.all)")
        #expect(h.queue.connections == 1)
        #expect(h.queue.accepted.count == 1)
        #expect(!h.logs.contains("sending the message again"))
    }

    /// The queue's reply timeout is the session's SessionClock's while the
    /// client is there; a client that leaves takes its session (and the
    /// clock's ticks) with it, and the wait is still bounded: by the
    /// transaction's own timer, not by the queue closing much later.
    @Test func theQueueReplyTimeoutOutlivesAClientThatLeft() throws {
        let (q, h, c) = try sessionWithAPooledConnection { $0.timeouts.queueReply = 1 }
        defer { h.stop() }
        q.hangUpDelayMicroseconds = 8_000_000
        q.answer = .hangUp
        sendAMessageAndLeave(c)
        #expect(h.logs.eventually("queue inject failed for unknown[127.0.0.1]: no answer from the queue within 1 s"), "\(h.logs.all)")
        #expect(!h.logs.contains("queue closed the inject connection"))
    }

    /// The envelope waits at DATA for the first body bytes (one write to
    /// the queue per small message), but not when it alone is more than
    /// the inject channel takes before it stops being writable: the
    /// session then stops reading its client, and would wait for body
    /// bytes it no longer reads until the data timeout.
    @Test(arguments: [false, true])
    func aLargeEnvelopeOnAPooledConnectionGoesOutAtOnce(bdat: Bool) throws {
        let (_, h, c) = try sessionWithAPooledConnection { $0.timeouts.dataBlock = 3 }
        defer { h.stop() }
        #expect(c.command("MAIL FROM:<alice@example.org>")?.code == 250)
        let local = String(repeating: "r", count: 60)
        var recipients = ""
        for i in 0..<1000 { recipients += "RCPT TO:<\(local)\(i)@example.test>\r\n" }
        c.send(recipients)
        #expect(c.replies(1000).filter { $0.code == 250 }.count == 1000)
        let reply: SMTPReplyText
        if bdat {
            // The chunk in a read of its own, after the command's.
            c.send("BDAT 14\r\n")
            usleep(200_000)
            c.send("Subject: b\r\n\r\n")
            #expect(c.reply()?.code == 250)
            reply = try #require(c.command("BDAT 0 LAST"))
        } else {
            #expect(c.command("DATA")?.code == 354)
            reply = try #require(c.command("Subject: many\r\n\r\nHello.\r\n."))
        }
        #expect(reply.code == 250, "\(reply)")
        #expect(h.queue.accepted.last?.recipients.count == 1000)
        #expect(!h.logs.contains("timeout after"))
    }

    @Test func aClientStallingAfter354IsLoggedAfterDATA() throws {
        let h = try Harness { $0.timeouts.dataBlock = 1 }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        #expect(c.reply()?.code == 421)
        #expect(h.logs.eventually("timeout after DATA from unknown[127.0.0.1]"), "\(h.logs.all)")
    }

    @Test func ipv6ClientIsNamedAndTrustedByDefault() throws {
        let h = try Harness(host: "::1")
        defer { h.stop() }
        let c = try SMTPTestClient(ipv6Port: h.port)
        try greet(c)
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<x@elsewhere.example>")?.code == 250, "::1 is a trusted network by default")
        #expect(c.command("DATA")?.code == 354)
        #expect(c.command("hi\r\n.")?.code == 250)
        let m = try #require(h.queue.accepted.first)
        #expect(try m.mail.text("client-address") == "::1")
        #expect(m.text.hasPrefix("Received: from client.example.org (unknown [IPv6:::1])\r\n"))
        #expect(h.logs.contains("connect from unknown[::1]"))
    }

    @Test func pipelinedSessionInOneWrite() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        _ = try #require(c.reply())
        c.send("EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.test>\r\n"
               + "RCPT TO:<y@example.test>\r\nDATA\r\nSubject: p\r\n\r\nbody\r\n.\r\n"
               + "MAIL FROM:<b@example.org>\r\nRCPT TO:<z@example.test>\r\nDATA\r\nSubject: q\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        let replies = c.readToEOF()
        #expect(replies.map(\.code) == [250, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221])
        let messages = h.queue.accepted
        #expect(messages.map(\.recipients) == [["x@example.test", "y@example.test"], ["z@example.test"]])
        #expect(messages.last?.text.hasSuffix("Subject: q\r\n\r\nsecond\r\n") == true)
    }

    /// Input the session never reads (sent after QUIT, or after the
    /// command that ends it with 421) makes the close a reset (RST); the
    /// last replies must be on their way before it, or the client loses
    /// them: here the 250 of a queued message with the 221 after it, which
    /// a client that does not get it sends again.
    @Test func lastRepliesArriveDespiteInputLeftUnread() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        _ = try #require(c.reply())
        c.send("EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"
               + "Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n" + unreadInput)
        let replies = c.readToEOF()
        #expect(replies.map(\.code) == [250, 250, 250, 354, 250, 221])
        #expect(h.queue.accepted.count == 1)
    }

    /// More than one read of the session takes: most of it stays unread.
    let unreadInput = String(repeating: "NOOP\r\n", count: 10_000)

    @Test func the421ForTooManyErrorsArrivesDespiteInputLeftUnread() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        _ = try #require(c.reply())
        let errors = SMTPLimits().errors
        c.send(String(repeating: "BOGUS\r\n", count: errors) + unreadInput)
        let replies = c.readToEOF()
        #expect(replies.count == errors + 1)
        #expect(replies.last?.last.hasPrefix("421 4.7.0") == true, "\(replies.last?.description ?? "no reply")")
    }

    @Test func halfClosedClientStillGetsItsReplies() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        c.send("EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
        c.shutdownWrite()
        let replies = c.readToEOF()
        #expect(replies.map(\.code) == [220, 250, 250, 250, 354, 250, 221])
        #expect(h.queue.accepted.count == 1)
    }

    @Test func bdatChunksReachTheQueueInOrder() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<x@example.test>")?.code == 250)
        c.send("BDAT 14\r\nSubject: b\r\n\r\n")
        #expect(c.reply()?.code == 250)
        c.send("BDAT 9 LAST\r\nchunked\r\n")
        let r = try #require(c.reply())
        #expect(r.code == 250)
        #expect(r.last.hasPrefix("250 2.0.0 Ok: queued as "))
        #expect(h.queue.accepted.first?.text.hasSuffix("\r\nSubject: b\r\n\r\nchunked\r\n") == true)
        #expect(c.command("QUIT")?.code == 221)
        #expect(h.logs.eventually("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 bdat=2 quit=1 commands=6"))
    }

    @Test(arguments: [100, 200_000])
    func aMessageThatArrivesBeforeTheQueueIDIsHeldThenSentIntact(lines: Int) throws {
        let q = try FakeQueue()
        q.reserveIDs = false
        q.idDelayMicroseconds = 300_000
        let h = try Harness(queue: q)
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        // Small: read whole while the ID is awaited. Big (over the hold
        // limit): reading pauses, then resumes once the ID is known.
        var message = "Subject: early\r\n\r\n"
        for i in 0..<lines { message += "line \(i)\r\n" }
        c.send(message + ".\r\n")
        let r = try #require(c.reply())
        #expect(r.code == 250)
        let id = String(r.last.split(separator: " ").last ?? "")
        let m = try #require(h.queue.accepted.first)
        #expect(m.text.hasPrefix("Received: "))
        #expect(m.text.contains(" id \(id)\r\n"))
        #expect(m.text.hasSuffix(message))
    }

    @Test func largeMessageStreamsIntactInBoundedFrames() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        var message = "Subject: big\r\n\r\n"
        for i in 0..<40_000 { message += "line \(i) " + String(repeating: "x", count: 60) + "\r\n" }
        c.send(message + ".\r\n")
        let r = try #require(c.reply())
        #expect(r.code == 250)
        let m = try #require(h.queue.accepted.first)
        #expect(m.text.hasSuffix(message))
        #expect(message.utf8.count > 2_500_000)
    }

    @Test func submissionRequiresAuthentication() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client(port: h.submissionPort)
        let ehlo = try greet(c)
        #expect(!ehlo.description.contains("AUTH"), "no password file: AUTH is not offered")
        let r = try #require(c.command("MAIL FROM:<a@example.org>"))
        #expect(r.code == 530)
        #expect(r.last.hasPrefix("530 5.7.0"))
    }
}

@Suite struct QueueOutcomes {
    @Test func queueUnreachableGives451AndTheSessionGoesOn() throws {
        // One second of attempts (timeouts.queueAway), then the 451.
        let h = try Harness(injectPath: NSTemporaryDirectory() + "no-such-dir-\(getpid())/inject") {
            $0.timeouts.queueAway = 1
        }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        let r = try #require(c.command("Subject: x\r\n\r\nbody\r\n."))
        #expect(r.last == "451 4.3.0 Queue unavailable, try again later")
        #expect(c.command("RSET")?.code == 250)
        #expect(c.command("QUIT")?.code == 221)
        #expect(h.logs.contains("NOQUEUE: reject: DATA from unknown[127.0.0.1]: 451 4.3.0 Queue unavailable, try again later; from=<a@example.org> proto=ESMTP helo=<client.example.org>"))
        #expect(h.logs.all.contains { $0.contains("queue inject failed for unknown[127.0.0.1]: connect to ") && $0.hasSuffix(" (tried again for 1 s)") },
                "\(h.logs.all)")
    }

    /// A queue that restarts is away for a moment: its socket missing
    /// (ENOENT), or refusing (ECONNREFUSED) while nobody listens on it.
    /// The transaction tries again (for timeouts.queueAway, 10 s by
    /// default) rather than answer 451 at once, and the message goes to the
    /// queue once it is back.
    @Test func aQueueBackWithinTheWaitTakesTheMessage() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        let aside = h.queue.path + ".restarting"
        try #require(rename(h.queue.path, aside) == 0)
        // The transaction's connection, made at DATA, is refused.
        openData(c)
        c.send("Subject: x\r\n\r\nbody\r\n.\r\n")
        #expect(h.queue.connections == 0)
        try #require(rename(aside, h.queue.path) == 0)
        let r = try #require(c.reply())
        #expect(r.code == 250, "\(r)")
        #expect(h.queue.accepted.count == 1)
        #expect(c.command("QUIT")?.code == 221)
    }

    @Test func refused452IsPassedOn() throws {
        let q = try FakeQueue(answer: .refuse(code: 452, status: "4.3.1", text: "Insufficient system storage"))
        let h = try Harness(queue: q)
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        let r = try #require(c.command("hello\r\n."))
        #expect(r.last == "452 4.3.1 Insufficient system storage")
        #expect(h.queue.refused.count == 1)
        #expect(h.queue.accepted.isEmpty)
    }

    @Test func refused554IsPassedOn() throws {
        let q = try FakeQueue(answer: .refuse(code: 554, status: "5.5.1", text: "No recipients"))
        let h = try Harness(queue: q)
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        #expect(c.command("hello\r\n.")?.last == "554 5.5.1 No recipients")
    }

    @Test func queueHangingUpAfterEndGives451() throws {
        let q = try FakeQueue(answer: .hangUp)
        let h = try Harness(queue: q)
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        let r = try #require(c.command("hello\r\n."))
        #expect(r.code == 451)
        #expect(r.last.hasPrefix("451 4.3.0"))
    }

    @Test func malformedRefusalNeverBecomesSuccess() {
        let cases: [Frame] = [
            Frame(.refused, ["code": .uint(250), "status": .text("2.0.0"), "text": .text("fine")]),
            Frame(.refused, ["code": .uint(452), "status": .text("5.3.1"), "text": .text("class mismatch")]),
            Frame(.refused, ["code": .uint(452), "status": .text("4.3"), "text": .text("bad status")]),
            Frame(.refused, ["code": .uint(999), "status": .text("4.3.1"), "text": .text("bad code")]),
        ]
        for f in cases {
            #expect(InjectFrames.reply(fromRefused: f) == SMTPReply(451, "4.3.0", "Queue refused the message"))
        }
        let good = Frame(.refused, ["code": .uint(452), "status": .text("4.3.1"), "text": .text("full")])
        #expect(InjectFrames.reply(fromRefused: good) == SMTPReply(452, "4.3.1", "full"))
    }

    @Test func clientVanishingMidMessageQueuesNothing() throws {
        let h = try Harness()
        defer { h.stop() }
        do {
            let c = try h.client()
            try greet(c)
            openData(c)
            c.send("Subject: cut\r\n\r\nhalf a message")
        }
        #expect(h.logs.eventually("lost connection after DATA from unknown[127.0.0.1]"))
        #expect(h.queue.accepted.isEmpty)
    }
}

/// A message, whole, then a reset before the reply to its end.
func sendAMessageAndLeave(_ c: SMTPTestClient) {
    #expect(c.command("MAIL FROM:<alice@example.org>")?.code == 250)
    #expect(c.command("RCPT TO:<bob@example.test>")?.code == 250)
    #expect(c.command("DATA")?.code == 354)
    c.send("Subject: 1\r\n\r\nHello.\r\n.\r\n")
    c.reset()
}

/// `count` messages from alice to bob ("Subject: 0", "Subject: 1", ...),
/// each expected to get 250; returns the queue IDs of the 250 replies.
func sendMessages(_ c: SMTPTestClient, count: Int) throws -> [String] {
    var ids: [String] = []
    for i in 0..<count {
        #expect(c.command("MAIL FROM:<alice@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<bob@example.test>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        let done = try #require(c.command("Subject: \(i)\r\n\r\nHello.\r\n."))
        #expect(done.code == 250)
        ids.append(String(done.last.split(separator: " ").last ?? ""))
    }
    return ids
}
