// What an attacker or a broken client tries: relaying, smuggling a second
// message inside the first, over-long lines, oversized messages, too many
// connections, silence.

import Foundation
import SMTP
@testable import SMTPService
import StageProtocol
import Testing

@Suite struct Relay {
    /// The test client is 127.0.0.1: make it an ordinary Internet client.
    static func untrusted() throws -> Harness {
        try Harness { $0.trustedNetworks = [] }
    }

    @Test(arguments: [
        "<victim@elsewhere.example>",
        "<victim%elsewhere.example@example.test>",
        "<elsewhere.example!victim@example.test>",
        "<\"victim@elsewhere.example\"@example.test>",
        "<@example.test:victim@elsewhere.example>",
        "<@example.test,@relay.example:victim@elsewhere.example>",
    ])
    func openRelayFormsAreRefused(_ path: String) throws {
        let h = try Self.untrusted()
        defer { h.stop() }
        let c = try h.client()
        try greet(c, helo: "spammer.example")
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        let r = try #require(c.command("RCPT TO:\(path)"))
        #expect(r.code == 554)
        #expect(r.last.hasPrefix("554 5.7.1 "))
        #expect(c.command("DATA")?.code == 554, "no valid recipients")
        #expect(h.queue.connections == 0)
    }

    @Test func relayDeniedIsLoggedLikePostfix() throws {
        let h = try Self.untrusted()
        defer { h.stop() }
        let c = try h.client()
        try greet(c, helo: "h.example")
        #expect(c.command("MAIL FROM:<a@b.example>")?.code == 250)
        #expect(c.command("RCPT TO:<x@y.example>")?.code == 554)
        #expect(h.logs.contains("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 Relay access denied; from=<a@b.example> to=<x@y.example> proto=ESMTP helo=<h.example>"))
    }

    @Test func localDomainsAndRelayDomainsAreOpenToAnyone() throws {
        let h = try Harness {
            $0.trustedNetworks = []
            $0.relayDomains = ["relayed.example", ".sub.example"]
        }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<u@EXAMPLE.test>")?.code == 250)
        #expect(c.command("RCPT TO:<postmaster>")?.code == 250)
        #expect(c.command("RCPT TO:<u@relayed.example>")?.code == 250)
        #expect(c.command("RCPT TO:<u@a.sub.example>")?.code == 250)
        #expect(c.command("RCPT TO:<u@sub.example>")?.code == 554)
        #expect(c.command("RCPT TO:<u@other.example>")?.code == 554)
    }

    @Test func trustedNetworksMayRelay() throws {
        let h = try Harness { $0.trustedNetworks = [NetworkPrefix("127.0.0.0/8")!] }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<u@elsewhere.example>")?.code == 250)
    }
}

@Suite struct Smuggling {
    /// Each variant tries to end DATA with something that is not
    /// <CRLF>.<CRLF> and start a second transaction inside the first
    /// message. Whatever the server answers, the queue must never get a
    /// message from the smuggled MAIL FROM.
    @Test(arguments: [
        "\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r", "\r\n\r.\r\n", "\r\n.\u{0}\r\n",
    ])
    func smuggledMessageIsNeverQueued(_ end: String) throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        c.send("MAIL FROM:<honest@example.org>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n")
        #expect(c.replies(3).map(\.code) == [250, 250, 354])
        c.send("Subject: first\r\n\r\nbody" + end
               + "MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<y@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n")
        // The real end of the message, then a probe.
        c.send("\r\n.\r\nNOOP\r\n")
        var replies: [SMTPReplyText] = []
        while let r = c.reply() {
            replies.append(r)
            if r.last.hasPrefix("250 2.0.0 Ok") && !r.last.contains("queued") { break }   // the NOOP
        }
        #expect(h.queue.accepted.allSatisfy { $0.sender == "honest@example.org" })
        #expect(h.queue.accepted.count <= 1)
        #expect(!replies.contains { $0.code == 354 }, "a second DATA was started: \(replies)")
    }
}

@Suite struct Limits {
    @Test func overLongCommandLineIsRefusedAndTheSessionResyncs() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        // Past 512 + the 662 octets MAIL parameters may add.
        let r = try #require(c.command("MAIL FROM:<" + String(repeating: "a", count: 1200) + "@example.org>"))
        #expect(r.last == "500 5.5.2 Line too long")
        #expect(c.command("NOOP")?.code == 250)
    }

    @Test func overLongTextLineRefusesTheMessage() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        let r = try #require(c.command("Subject: long\r\n\r\n" + String(repeating: "y", count: 1200) + "\r\n."))
        #expect(r.code == 554)
        #expect(r.last.hasPrefix("554 5.6.0"))
        #expect(h.queue.accepted.isEmpty)
        #expect(c.command("NOOP")?.code == 250)
    }

    @Test func declaredSizeOverTheLimitIsRefusedAtMail() throws {
        let h = try Harness { $0.limits.messageSize = 1000 }
        defer { h.stop() }
        let c = try h.client()
        let ehlo = try greet(c)
        #expect(ehlo.lines.contains("250-SIZE 1000"))
        let r = try #require(c.command("MAIL FROM:<a@example.org> SIZE=1001"))
        #expect(r.last.hasPrefix("552 5.3.4"))
    }

    @Test func messageOverTheLimitIsRefusedAndNotQueued() throws {
        let h = try Harness { $0.limits.messageSize = 1000 }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        openData(c)
        var body = "Subject: big\r\n\r\n"
        for _ in 0..<100 { body += String(repeating: "z", count: 70) + "\r\n" }
        let r = try #require(c.command(body + "."))
        #expect(r.last.hasPrefix("552 5.3.4"))
        #expect(h.queue.accepted.isEmpty)
        #expect(h.queue.connections <= 1)
        #expect(c.command("NOOP")?.code == 250)
    }

    @Test func tooManyRecipients() throws {
        let h = try Harness { $0.limits.recipients = 3 }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        for i in 0..<3 { #expect(c.command("RCPT TO:<u\(i)@example.test>")?.code == 250) }
        #expect(c.command("RCPT TO:<u9@example.test>")?.last.hasPrefix("452 4.5.3") == true)
    }

    @Test func tooManyErrorsEndTheSession() throws {
        let h = try Harness { $0.limits.errors = 3 }
        defer { h.stop() }
        let c = try h.client()
        _ = try #require(c.reply())
        c.send("FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        let replies = c.readToEOF()
        #expect(replies.map(\.code) == [500, 500, 500, 421])
    }

    @Test func sessionsPerClientAddressAreLimited() throws {
        let h = try Harness {
            $0.limits.sessionsPerClient = 2
            $0.trustedNetworks = []
        }
        defer { h.stop() }
        let a = try h.client(), b = try h.client()
        #expect(a.reply()?.code == 220)
        #expect(b.reply()?.code == 220)
        let third = try h.client()
        let r = try #require(third.reply())
        #expect(r.last.hasPrefix("421 4.7.0"))
        #expect(third.readToEOF().isEmpty)
        #expect(h.logs.contains("warning: Connection concurrency limit exceeded: 3 from unknown[127.0.0.1] for service smtp"))
        // A slot frees when a session ends.
        #expect(a.command("QUIT")?.code == 221)
        #expect(a.readToEOF().isEmpty)
        #expect(h.logs.eventually("disconnect from unknown[127.0.0.1] quit=1 commands=1"))
        let fourth = try h.client()
        #expect(fourth.reply()?.code == 220)
    }

    /// IPv6 clients count per /64 (client_ipv6_prefix_length): the 421
    /// names the network, and a session's end frees its network's slot.
    @Test func ipv6SessionsAreCountedPerNetwork() throws {
        let h = try Harness(host: "::1") {
            $0.limits.sessionsPerClient = 2
            $0.trustedNetworks = []
        }
        defer { h.stop() }
        let a = try SMTPTestClient(ipv6Port: h.port), b = try SMTPTestClient(ipv6Port: h.port)
        #expect(a.reply()?.code == 220)
        #expect(b.reply()?.code == 220)
        let third = try SMTPTestClient(ipv6Port: h.port)
        let r = try #require(third.reply())
        #expect(r.last == "421 4.7.0 mx.example.test Error: too many connections from ::/64")
        #expect(h.logs.contains("warning: Connection concurrency limit exceeded: 3 from unknown[::1] for service smtp"))
        #expect(a.command("QUIT")?.code == 221)
        #expect(h.logs.eventually("disconnect from unknown[::1] quit=1 commands=1"))
        // The count goes just after the disconnect line (and the refused
        // third's when it closed), maybe on the harness's other loop.
        _ = becomesTrue { h.server.sessionCount <= 1 }
        let fourth = try SMTPTestClient(ipv6Port: h.port)
        #expect(fourth.reply()?.code == 220)
    }

    @Test func trustedClientsAreExemptFromTheSessionLimit() throws {
        let h = try Harness { $0.limits.sessionsPerClient = 1 }
        defer { h.stop() }
        let clients = try (0..<3).map { _ in try h.client() }
        for c in clients { #expect(c.reply()?.code == 220) }
    }

    /// session_limit bounds the sessions of the process, trusted clients'
    /// too (the harness's 127.0.0.1 is trusted): the third gets 421 4.3.2
    /// and is closed, and a session that ends frees its place.
    @Test func theSessionLimitAppliesToEveryClient() throws {
        let h = try Harness { $0.limits.sessions = 2 }
        defer { h.stop() }
        let a = try h.client(), b = try h.client()
        #expect(a.reply()?.code == 220)
        #expect(b.reply()?.code == 220)
        let third = try h.client()
        #expect(third.readToEOF().map(\.last) == ["421 4.3.2 mx.example.test Error: too many sessions, try again later"])
        #expect(h.logs.contains("warning: Session limit 2 reached: refused unknown[127.0.0.1] for service smtp"))
        #expect(b.command("QUIT")?.code == 221)
        #expect(h.logs.eventually("disconnect from unknown[127.0.0.1] quit=1 commands=1"))
        // The count goes just after the disconnect line, maybe on the
        // harness's other event loop.
        _ = becomesTrue { h.server.sessionCount <= 1 }
        let fourth = try h.client()
        #expect(fourth.reply()?.code == 220)
        #expect(a.command("QUIT")?.code == 221)
    }

    @Test func theSessionLimitFollowsTheDescriptorLimit() {
        // Two descriptors per session beyond 256 kept for the rest.
        #expect(SMTPLimits.sessionLimit(configured: 10_000, descriptorLimit: 1_048_576) == 10_000)
        #expect(SMTPLimits.sessionLimit(configured: 10_000, descriptorLimit: 1024) == 384)
        // 0: no limit; EMFILE then pauses accepting.
        #expect(SMTPLimits.sessionLimit(configured: 0, descriptorLimit: 65_536) == Int.max)
        #expect(SMTPLimits.sessionLimit(configured: 0, descriptorLimit: nil) == Int.max)
        #expect(SMTPLimits.sessionLimit(configured: 50, descriptorLimit: nil) == 50)
        // A limit below the reserve still lets one session in.
        #expect(SMTPLimits.sessionLimit(configured: 10_000, descriptorLimit: 100) == 1)
    }

    @Test func silentClientTimesOutWith421() throws {
        let h = try Harness { $0.timeouts.command = 1 }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        let replies = c.readToEOF()
        #expect(replies.map(\.last) == ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        #expect(h.logs.eventually("timeout after EHLO from unknown[127.0.0.1]"))
    }

    /// A client that pipelines commands but never reads their replies
    /// fills the socket buffers both ways, and then smtp-listen's own
    /// output buffer: past its high-water mark the session stops reading
    /// (or the replies would pile up in memory without bound; the client
    /// stays blocked for the whole patience), times out, and its 421
    /// cannot be written either. The write is timed too (as Postfix's
    /// smtpd_timeout times writes): the session is closed, instead of
    /// being held for as long as the client likes.
    @Test func aClientThatStopsReadingIsClosedWhenItsRepliesStayUnwritten() throws {
        let h = try Harness { $0.timeouts.command = 1 }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        // EHLO: not a junk command (NOOP would meet the junk command
        // limit first), and its reply is ten times its size.
        let ehlos = Array(String(repeating: "EHLO client.example\r\n", count: 500_000).utf8)
        let sent = c.sendUntilBlocked(ehlos, patienceMilliseconds: 5000)
        #expect(sent < ehlos.count, "the session never stopped reading: nothing was left unwritten")
        #expect(h.logs.eventually("timeout after EHLO from unknown[127.0.0.1]"), "\(h.logs.all)")
        #expect(h.logs.eventually("timeout writing to unknown[127.0.0.1] after EHLO"), "\(h.logs.all)")
        #expect(h.logs.eventually("disconnect from unknown[127.0.0.1]"), "\(h.logs.all)")
    }

    /// The timeout counts from the last command, not from the first: a
    /// client that talks more slowly than the timeout in total, but never
    /// pauses longer, keeps its session (each command moves the deadline
    /// that the event loop's SessionClock checks).
    @Test func eachCommandRestartsTheTimeout() throws {
        let h = try Harness { $0.timeouts.command = 2 }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        for _ in 0..<2 {
            usleep(1_300_000)
            c.send("NOOP\r\n")
            #expect(c.reply()?.code == 250)
        }
        let replies = c.readToEOF()
        #expect(replies.map(\.last) == ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        #expect(h.logs.eventually("timeout after NOOP from unknown[127.0.0.1]"))
    }

    /// The data timeout is shorter than the command timeout: the session
    /// must not wait for the command timeout (the client's read gives up
    /// after 30 s, the command timeout is 120 s).
    @Test func silenceAfterDATATimesOutWithTheDataTimeout() throws {
        let h = try Harness {
            $0.timeouts.command = 120
            $0.timeouts.dataBlock = 1
        }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@mx.example.test>\r\nDATA\r\n")
        #expect(c.reply()?.code == 250)
        #expect(c.reply()?.code == 250)
        #expect(c.reply()?.code == 354)
        c.send("Subject: slow\r\n")
        let replies = c.readToEOF()
        #expect(replies.map(\.last) == ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        #expect(h.logs.eventually("timeout after DATA from unknown[127.0.0.1]"))
    }

    /// Between BDAT chunks the client owes a command: the command timeout
    /// applies there (RFC 5321 4.5.3.2.7), the data block timeout only
    /// inside a chunk.
    @Test func betweenBDATChunksTheCommandTimeoutApplies() throws {
        let h = try Harness {
            $0.timeouts.command = 6
            $0.timeouts.dataBlock = 1
        }
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        let first = "Subject: chunks\r\n", second = "\r\nhello\r\n"
        c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@mx.example.test>\r\nBDAT \(first.utf8.count)\r\n\(first)")
        #expect(c.reply()?.code == 250)
        #expect(c.reply()?.code == 250)
        #expect(c.reply()?.code == 250)
        usleep(2_500_000)
        c.send("BDAT \(second.utf8.count) LAST\r\n\(second)")
        let last = c.reply()
        #expect(last?.code == 250 && last?.last.contains("queued as") == true, "\(String(describing: last))")
        #expect(h.queue.accepted.count == 1)
        // Inside a chunk the data block timeout still applies.
        c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@mx.example.test>\r\nBDAT 100\r\nSubject: slow\r\n")
        #expect(c.reply()?.code == 250)
        #expect(c.reply()?.code == 250)
        #expect(c.readToEOF().map(\.last) == ["421 4.4.2 mx.example.test Error: timeout exceeded"])
    }

    @Test func shutdownSays421ToIdleSessions() throws {
        let h = try Harness()
        let c = try h.client()
        try greet(c)
        try h.server.shutdown(grace: .seconds(10)).wait()
        #expect(c.readToEOF().map(\.last) == ["421 4.3.2 mx.example.test Service shutting down"])
        h.stop()
    }
}
