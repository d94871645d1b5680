import StageProtocol
import Testing
import Synchronization
@testable import LocalDelivery

/// Collects log lines.
final class LogRecorder: Sendable {
    let lines = Mutex<[String]>([])
    var log: DeliveryLog {
        DeliveryLog(info: { line in self.lines.withLock { $0.append(line) } },
                    warning: { line in self.lines.withLock { $0.append("warning: " + line) } })
    }
    var all: [String] { lines.withLock { $0 } }
}

/// Stands in for the queue's inject socket in these unit tests (the protocol
/// test exercises the real InjectForwarder against a socket).
final class RecordingForwarder: MessageForwarder {
    struct Forwarded: Sendable { var sender: String; var address: String; var message: [UInt8] }
    let forwarded = Mutex<[Forwarded]>([])
    let failure: DeliveryError?
    init(failure: DeliveryError? = nil) { self.failure = failure }

    func forward(_ job: DeliveryJob, to address: String, for recipient: DeliveryJob.Recipient,
                 prepending header: [UInt8]) throws(DeliveryError) -> String {
        if let failure { throw failure }
        let message = header + job.body.flatMap { $0 }
        forwarded.withLock { $0.append(Forwarded(sender: job.sender, address: address, message: message)) }
        return "0123456789AB"
    }
}

@Suite struct AgentTests {
    let dir = TemporaryDirectory()
    let logs = LogRecorder()
    let forwarder: RecordingForwarder

    init() {
        forwarder = RecordingForwarder()
    }

    func agent(aliases: String = "", forwarder: RecordingForwarder? = nil) throws -> LocalDeliveryAgent {
        let table = try AliasTable.parse(aliases, file: "aliases", localDomains: ["localhost"])
        let resolver = RecipientResolver(users: LocalUsers(names: ["alice", "bob"]), aliases: table,
                                         localDomains: ["localhost"])
        return LocalDeliveryAgent(resolver: resolver, dataDirectory: dir.path, mailboxTemplate: "mail/{user}/Maildir",
                                  namer: MaildirNamer(hostname: "test"), forwarder: forwarder ?? self.forwarder,
                                  log: logs.log)
    }

    func job(_ recipients: [String], message: String = "From: s@example.net\r\nSubject: hi\r\n\r\nbody\r\n") -> DeliveryJob {
        var job = DeliveryJob(job: 1, queueID: "4F3A2B1C5D6E", sender: "s@example.net", arrival: 1_700_000_000)
        job.recipients = recipients.enumerated().map { DeliveryJob.Recipient(index: UInt64($0.offset), address: $0.element) }
        job.body = chunked(message, size: 7)
        return job
    }

    func mailbox(_ user: String) -> [String] {
        let new = dir.file("mail/\(user)/Maildir/new")
        return listDirectory(new).map { readText(new + "/" + $0) }
    }

    @Test func deliversToTheUsersMaildir() throws {
        let results = try agent().deliver(job(["Alice+news@localhost"]))
        #expect(results == [RecipientResult(index: 0, status: .sent, dsn: "2.0.0",
                                            text: "delivered to maildir", relay: "maildir")])
        #expect(mailbox("alice") == ["Return-Path: <s@example.net>\nDelivered-To: alice+news@localhost\nFrom: s@example.net\nSubject: hi\n\nbody\n"])
        #expect(listDirectory(dir.file("mail/alice/Maildir/tmp")).isEmpty)
        let line = try #require(logs.all.first)
        #expect(line.hasPrefix("4F3A2B1C5D6E: to=<alice+news@localhost>, relay=local, delay="))
        #expect(line.hasSuffix(", dsn=2.0.0, status=sent (delivered to maildir)"))
    }

    @Test func aliasExpandsToMailboxesAndForwards() throws {
        let results = try agent(aliases: "team: alice, bob, carol@remote.test\n").deliver(job(["team@localhost"]))
        #expect(results.count == 1)
        #expect(results[0].status == .sent)
        #expect(results[0].relay == "maildir+forwarded")
        #expect(mailbox("alice").count == 1)
        #expect(mailbox("bob").first?.contains("Delivered-To: bob@localhost\n") == true)
        let sent = forwarder.forwarded.withLock { $0 }
        #expect(sent.count == 1)
        #expect(sent.first?.address == "carol@remote.test")
        #expect(sent.first?.sender == "s@example.net")
        // The forwarded copy keeps CRLF and carries the loop marker.
        #expect(sent.first.map { String(decoding: $0.message, as: UTF8.self) }
                == "Delivered-To: team@localhost\r\nFrom: s@example.net\r\nSubject: hi\r\n\r\nbody\r\n")
        #expect(logs.all.count == 3)
        #expect(logs.all.contains { $0.contains("to=<carol@remote.test>, orig_to=<team@localhost>") && $0.hasSuffix("status=sent (forwarded as 0123456789AB)") })
    }

    @Test func unknownUserBounces() throws {
        let results = try agent().deliver(job(["zed@localhost", "alice@localhost"]))
        #expect(results[0] == RecipientResult(index: 0, status: .bounced, dsn: "5.1.1", text: "unknown user: \"zed\""))
        #expect(results[1].status == .sent)
        #expect(logs.all.first?.hasSuffix("dsn=5.1.1, status=bounced (unknown user: \"zed\")") == true)
    }

    @Test func deliveredToLoopBounces() throws {
        let message = "Delivered-To: alice@localhost\r\nSubject: loop\r\n\r\nx\r\n"
        let results = try agent().deliver(job(["alice@localhost", "bob@localhost"], message: message))
        #expect(results[0].status == .bounced)
        #expect(results[0].dsn == "5.4.6")
        #expect(results[1].status == .sent)
        #expect(mailbox("alice").isEmpty)
    }

    /// Alice redirected a message she had received to her team's alias:
    /// she is left out, the other members still get it (it bounced for all).
    @Test func aLoopingAliasMemberIsLeftOutAlone() throws {
        let message = "Delivered-To: alice@localhost\r\nSubject: redirected\r\n\r\nx\r\n"
        let results = try agent(aliases: "team: alice, bob\n").deliver(job(["team@localhost"], message: message))
        #expect(results.map(\.status) == [.sent])
        #expect(mailbox("alice").isEmpty)
        #expect(mailbox("bob").count == 1)
        #expect(logs.all.contains { $0.contains("to=<alice@localhost>") && $0.contains("dsn=5.4.6, status=bounced") })
        // Every member looping: the alias bounces.
        let all = try agent(aliases: "solo: alice\n").deliver(job(["solo@localhost"], message: message))
        #expect(all.map(\.status) == [.bounced] && all.first?.dsn == "5.4.6")
    }

    @Test func eachMailboxGetsOneCopyPerJob() throws {
        let results = try agent(aliases: "admins: alice\n").deliver(job(["alice@localhost", "ALICE+x@localhost", "admins@localhost"]))
        #expect(results.map(\.status) == [.sent, .sent, .sent])
        #expect(mailbox("alice").count == 1)
    }

    @Test func unwritableMaildirDefers() throws {
        try dir.write("mail", "a file where the directory should be")
        let results = try agent().deliver(job(["alice@localhost"]))
        #expect(results[0].status == .deferred)
        #expect(results[0].dsn == "4.2.0")
        #expect(results[0].text.contains("Not a directory"))
        #expect(logs.all.first?.contains("status=deferred (cannot ") == true)
    }

    @Test func forwardingFailureIsReportedAsIs() throws {
        let refusing = RecordingForwarder(failure: DeliveryError(status: "4.3.1", text: "queue full"))
        let results = try agent(aliases: "ext: alice, x@remote.test\n", forwarder: refusing).deliver(job(["ext@localhost"]))
        #expect(results == [RecipientResult(index: 0, status: .deferred, dsn: "4.3.1", text: "queue full")])
    }

    @Test func delayIsInWholeSecondsAsTheArrival() {
        let job = DeliveryJob(job: 1, queueID: "4F3A2B1C5D6E", sender: "", arrival: 1_700_000_000)
        #expect(job.delay(now: 1_700_000_000) == 0)
        #expect(job.delay(now: 1_700_000_042) == 42)
        // A clock stepped back shows no negative delay.
        #expect(job.delay(now: 1_699_999_000) == 0)
    }
}
