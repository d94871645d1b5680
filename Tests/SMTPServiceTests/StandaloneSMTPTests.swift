// `sendmail -bs` (queue-inject's stand-alone SMTP session) against the
// real queue: messages committed before their 250, the Received field with
// the queue ID, the queue away answered 451 and the session going on.

import Foundation
import SMTP
import SMTPInjection
import StageProtocol
import Testing

@Suite struct StandaloneSMTPTests {
    /// Runs a session fed `input` (all of it, then end of input); returns
    /// what it wrote and the accepted queue IDs. Both sides fit in a pipe's
    /// buffer (64 KiB): written before, read after, no threads.
    func session(_ input: String, injectSocket: String, hostname: String = "mx.example.test",
                 keepInputOpen: Bool = false, commandTimeout: Int = 300) -> (String, [String]) {
        var toSession: [Int32] = [-1, -1], fromSession: [Int32] = [-1, -1]
        guard pipe(&toSession) == 0, pipe(&fromSession) == 0 else {
            Issue.record("pipe: \(errno)")
            return ("", [])
        }
        let bytes = Array(input.utf8)
        #expect(bytes.withUnsafeBytes { write(toSession[1], $0.baseAddress!, $0.count) } == bytes.count)
        if !keepInputOpen { close(toSession[1]) }
        defer { if keepInputOpen { close(toSession[1]) } }
        var policy = SMTPServerPolicy(hostname: hostname)
        policy.relay = RelayPolicy(localDomains: ["example.test"], relayDomains: [])
        let smtp = StandaloneSMTP(policy: policy, injectSocket: injectSocket, timeout: 15, commandTimeout: commandTimeout)
        #expect(smtp.run(input: toSession[0], output: fromSession[1]))
        close(fromSession[1])
        close(toSession[0])
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while case let n = read(fromSession[0], &buffer, buffer.count), n > 0 { output += buffer[0..<n] }
        close(fromSession[0])
        return (String(decoding: output, as: UTF8.self), smtp.accepted)
    }

    @Test func messagesAreQueuedBeforeTheir250() throws {
        let q = try RealQueue(injectIdleTimeout: .seconds(30))
        defer { q.stop() }
        let (replies, ids) = session("""
            EHLO app.example\r
            MAIL FROM:<www-data@example.test>\r
            RCPT TO:<someone@elsewhere.example>\r
            DATA\r
            Subject: one\r
            \r
            ..leading dot\r
            .\r
            MAIL FROM:<www-data@example.test>\r
            RCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE\r
            BDAT 20 LAST\r
            Subject: two\r\n\r\nhi\r\n\
            QUIT\r\n
            """, injectSocket: q.injectSocket)
        #expect(ids.count == 2, "\(replies)")
        let lines = replies.split(separator: "\r\n").map(String.init)
        #expect(lines.first == "220 mx.example.test ESMTP Sealpost")
        #expect(lines.contains { $0.hasPrefix("250-PIPELINING") })
        #expect(!lines.contains { $0.contains("STARTTLS") || $0.contains("AUTH") })
        for id in ids { #expect(lines.contains("250 2.0.0 Ok: queued as \(id)"), "\(lines)") }
        #expect(lines.last == "221 2.0.0 Bye")
        // Relaying for the local user, recorded as from localhost, by uid.
        // (No uid= here: the test queue knows no smtp-listen uid to tell apart.)
        #expect(q.logs.eventually("\(ids.first ?? "?"): client=localhost[127.0.0.1]"))
    }

    /// A local submission's header gets From (the envelope sender, or
    /// MAILER-DAEMON), Date and Message-ID when it lacks them, at the end
    /// of the header section, as Postfix's cleanup adds them; fields the
    /// client wrote stay as they are, Bcc too; a message without an empty
    /// line after its header (BDAT content ending in a field) gets one.
    @Test func missingOriginatorFieldsAreAdded() throws {
        let q = try RealQueue(injectIdleTimeout: .seconds(30))
        defer { q.stop() }
        let (replies, ids) = session("""
            EHLO app.example\r
            MAIL FROM:<www-data@example.test>\r
            RCPT TO:<alice@example.test>\r
            DATA\r
            Subject: bare\r
            Bcc: hidden@example.test\r
            \r
            From: not a header, body text\r
            .\r
            MAIL FROM:<www-data@example.test>\r
            RCPT TO:<alice@example.test>\r
            DATA\r
            From: App <app@example.test>\r
            Date: Thu, 3 Dec 2026 08:00:00 +0000\r
            Message-ID: <kept@example.test>\r
            \r
            complete\r
            .\r
            MAIL FROM:<>\r
            RCPT TO:<alice@example.test>\r
            BDAT 13 LAST\r
            Subject: only
            """ + "QUIT\r\n", injectSocket: q.injectSocket)
        #expect(ids.count == 3, "\(replies)")
        guard ids.count == 3 else { return }
        let first = try q.body(ids[0])
        let header = first.components(separatedBy: "\r\n\r\n")[0]
        #expect(header.contains("\r\nSubject: bare\r\nBcc: hidden@example.test\r\nFrom: www-data@example.test\r\nDate: "), "\(first)")
        #expect(header.contains("\r\nMessage-ID: <") && header.contains("@mx.example.test>"), "\(first)")
        #expect(first.hasSuffix("\r\n\r\nFrom: not a header, body text\r\n"), "\(first)")
        let second = try q.body(ids[1])
        #expect(second.hasSuffix("\r\nFrom: App <app@example.test>\r\nDate: Thu, 3 Dec 2026 08:00:00 +0000\r\nMessage-ID: <kept@example.test>\r\n\r\ncomplete\r\n"),
                "\(second)")
        let third = try q.body(ids[2])
        #expect(third.contains("\r\nSubject: only\r\nFrom: MAILER-DAEMON\r\nDate: "), "\(third)")
        #expect(third.hasSuffix(">\r\n\r\n"), "\(third)")
    }

    @Test func theQueueAwayIs451AndTheSessionGoesOn() throws {
        let (replies, ids) = session("""
            HELO app.example\r
            MAIL FROM:<a@example.test>\r
            RCPT TO:<b@example.test>\r
            DATA\r
            Subject: x\r
            \r
            body\r
            .\r
            NOOP\r
            QUIT\r\n
            """, injectSocket: NSTemporaryDirectory() + "no-queue-\(getpid())/inject")
        #expect(ids.isEmpty)
        let lines = replies.split(separator: "\r\n").map(String.init)
        #expect(lines.contains { $0.hasPrefix("451 4.3.0") }, "\(lines)")
        #expect(lines.suffix(2) == ["250 2.0.0 Ok", "221 2.0.0 Bye"], "\(lines)")
    }

    /// A client that goes silent (its end of the pipe still open) gets 421
    /// 4.4.2 after smtp.command_timeout, and the session ends: it does not
    /// hold the process (and a message's queue connection) for ever.
    @Test func aSilentClientTimesOut() throws {
        let (replies, ids) = session("EHLO a\r\n", injectSocket: "/nonexistent/inject", keepInputOpen: true, commandTimeout: 1)
        #expect(ids.isEmpty)
        #expect(replies.hasSuffix("421 4.4.2 mx.example.test Error: timeout exceeded\r\n"), "\(replies)")
    }

    /// End of input without QUIT ends the session; a message cut off in
    /// its data is not queued.
    @Test func endOfInputInTheDataQueuesNothing() throws {
        let q = try RealQueue(injectIdleTimeout: .seconds(30))
        defer { q.stop() }
        let (replies, ids) = session("EHLO a\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nSubject: cut\r\n",
                                     injectSocket: q.injectSocket)
        #expect(ids.isEmpty)
        #expect(replies.contains("354 "))
        #expect(!replies.contains("queued as"))
    }
}
