// The deliver protocol end to end: a fake queue in the test (real Unix
// sockets, StageConnection on the queue's side) against DeliveryWorker, with
// a fake inject socket receiving forwarded copies.

import StageRuntime
import Testing
import Dispatch
import Synchronization
import CSystemShims
import StageProtocol
@testable import LocalDelivery
#if canImport(Glibc)
import Glibc
#endif

/// A listening socket standing in for one of the queue's.
final class Listener: Sendable {
    let fd: Int32
    let path: String

    init(path: String) throws {
        self.path = path
        fd = sealpost_unix_listen(path, 8)
        if fd < 0 { throw StageIOError("listen on \(path)", code: errno) }
    }

    deinit {
        close(fd)
        unlink(path)
    }

    /// The next connection as the server side of `proto`. The poll bound
    /// only keeps a broken worker from hanging the test run.
    func accept(_ proto: ProtocolName) throws -> StageConnection {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 60_000) == 1 else { throw StageIOError("no connection within 60 s", code: ETIMEDOUT) }
        let client = sealpost_accept_cloexec(fd)
        if client < 0 { throw StageIOError("accept", code: errno) }
        return StageConnection(adopting: client, protocol: proto, direction: .clientToServer)
    }
}

/// Runs `body` on its own thread; `wait()` returns its result.
final class Background<T: Sendable>: Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let result = Mutex<Result<T, any Error>?>(nil)

    init(_ body: @escaping @Sendable () throws -> T) {
        StageRuntime.detachThread { [self] in
            let r = Result { try body() }
            result.withLock { $0 = r }
            done.signal()
        }
    }

    func wait() throws -> T {
        done.wait()
        return try result.withLock { $0! }.get()
    }
}

private func serverHello(_ connection: StageConnection) throws -> Frame {
    let hello = try #require(try connection.receive())
    #expect(hello.type == .hello)
    try connection.send(Frame(.hello, ["protocol": .text(connection.protocolName!.rawValue), "version": .uint(1)]))
    return hello
}

private func sendJob(_ c: StageConnection, job: UInt64, recipients: [String], body: [String],
                     extra: [(String, AttributeValue)] = [], notify: [String: String] = [:]) throws {
    try c.send(Frame(.job, attributes: [
        ("job", .uint(job)), ("queue-id", .text("4F3A2B1C5D6E")), ("sender", .text("s@example.net")),
        ("arrival", .uint(UInt64(time(nil)))), ("size", .uint(UInt64(body.joined().utf8.count))),
        ("attempt", .uint(1)),
    ] + extra))
    for (i, r) in recipients.enumerated() {
        var rcpt = Frame(.jobRcpt, ["index": .uint(UInt64(i)), "address": .text(r)])
        rcpt.set("notify", notify[r].map { .text($0) })
        try c.send(rcpt)
    }
    for piece in body {
        try c.send(Frame(.body, ["data": .bytes(Array(piece.utf8))]))
    }
    try c.send(Frame(.jobEnd, ["job": .uint(job)]))
}

/// RESULT frames by index, and the JOB-DONE's job.
private func receiveResults(_ c: StageConnection, count: Int) throws -> (results: [UInt64: Frame], done: UInt64) {
    var results: [UInt64: Frame] = [:]
    while true {
        let frame = try #require(try c.receive(), "the worker closed the connection")
        switch frame.type {
        case .result:
            results[try frame.uint("index")] = frame
        case .jobDone:
            #expect(results.count == count)
            return (results, try frame.uint("job"))
        default:
            Issue.record("unexpected \(frame)")
        }
    }
}

@Suite struct DeliverProtocolTests {
    let dir = TemporaryDirectory()
    let logs = LogRecorder()

    func makeWorker(aliases: String = "") throws -> DeliveryWorker {
        mkdir(dir.file("run"), 0o700)
        let table = try AliasTable.parse(aliases, file: "aliases", localDomains: ["localhost"])
        let resolver = RecipientResolver(users: LocalUsers(names: ["alice", "bob"]), aliases: table,
                                         localDomains: ["localhost"])
        let agent = LocalDeliveryAgent(resolver: resolver, dataDirectory: dir.path, mailboxTemplate: "mail/{user}/Maildir",
                                       namer: MaildirNamer(hostname: "test"),
                                       forwarder: InjectForwarder(socketPath: dir.file("run/inject")), log: logs.log)
        return DeliveryWorker(socketPath: dir.file("run/deliver"), agent: agent, maximumMessageSize: 1 << 20)
    }

    func mailbox(_ user: String) -> [String] {
        let new = dir.file("mail/\(user)/Maildir/new")
        return listDirectory(new).map { readText(new + "/" + $0) }
    }

    @Test func aJobIsDeliveredForwardedAndAnswered() throws {
        let worker = try makeWorker(aliases: "fwd: bob, carol@remote.test\n")
        let deliver = try Listener(path: dir.file("run/deliver"))
        let inject = try Listener(path: dir.file("run/inject"))

        // The queue's inject side: one forwarded message.
        let injected = Background { () throws -> [Frame] in
            let c = try inject.accept(.inject)
            let hello = try serverHello(c)
            #expect(try hello.text("protocol") == "inject")
            var frames: [Frame] = []
            while let f = try c.receive() {
                frames.append(f)
                if f.type == .end {
                    try c.send(Frame(.accepted, ["queue-id": .text("0A1B2C3D4E5F")]))
                }
            }
            return frames
        }
        let session = Background { try worker.session() }

        let c = try deliver.accept(.deliver)
        let hello = try serverHello(c)
        #expect(try hello.text("protocol") == "deliver")
        #expect(try hello.text("transport") == "local")
        #expect(try hello.uint("max-jobs") == 1)

        try sendJob(c, job: 7, recipients: ["Alice+tag@localhost", "zed@localhost", "fwd@localhost"],
                    body: ["Subject: t\r", "\nX-Other: y\r\n\r\nline one\r", "\nline two\r\n"],
                    extra: [("requiretls", .bool(true))], notify: ["fwd@localhost": "NEVER"])
        let (results, done) = try receiveResults(c, count: 3)
        #expect(done == 7)
        #expect(try results[0]?.text("status") == "sent")
        #expect(try results[0]?.text("dsn") == "2.0.0")
        #expect(try results[0]?.optionalText("relay") == "maildir")
        #expect(try results[0]?.uint("job") == 7)
        #expect(try results[1]?.text("status") == "bounced")
        #expect(try results[1]?.text("dsn") == "5.1.1")
        #expect(try results[1]?.text("text") == "unknown user: \"zed\"")
        #expect(try results[2]?.text("status") == "sent")
        #expect(try results[2]?.optionalText("relay") == "maildir+forwarded")

        #expect(mailbox("alice") == ["Return-Path: <s@example.net>\nDelivered-To: alice+tag@localhost\nSubject: t\nX-Other: y\n\nline one\nline two\n"])
        #expect(listDirectory(dir.file("mail/alice/Maildir/tmp")).isEmpty)
        #expect(mailbox("bob").count == 1)

        c.close()
        #expect(try session.wait() == 1)

        let frames = try injected.wait()
        #expect(frames.map(\.type) == [.mail, .rcpt, .body, .body, .body, .body, .end])
        #expect(try frames[0].text("sender") == "s@example.net")
        #expect(try frames[0].bool("requiretls", default: false))
        #expect(try frames[1].text("address") == "carol@remote.test")
        // The sender's NOTIFY=NEVER holds for the forwarded copy, whose
        // notices would name the address the sender used.
        #expect(try frames[1].optionalText("notify") == "NEVER")
        #expect(try frames[1].optionalText("orcpt") == "rfc822;fwd@localhost")
        let forwarded = try frames.filter { $0.type == .body }.flatMap { try $0.bytes("data") }
        #expect(String(decoding: forwarded, as: UTF8.self)
                == "Delivered-To: fwd@localhost\r\nSubject: t\r\nX-Other: y\r\n\r\nline one\r\nline two\r\n")
        #expect(logs.all.contains { $0.contains("to=<carol@remote.test>, orig_to=<fwd@localhost>") && $0.hasSuffix("(forwarded as 0A1B2C3D4E5F)") })
    }

    @Test func theWorkerWaitsForTheQueueAndReconnectsAfterRestartsAndErrors() throws {
        let worker = try makeWorker()
        // The worker starts first: the queue is not there yet.
        let running = Background { worker.run() }
        let deliver = try Listener(path: dir.file("run/deliver"))

        // First connection: one job, then the queue "restarts" (closes).
        var c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        try sendJob(c, job: 1, recipients: ["bob@localhost"], body: ["Subject: one\r\n\r\n"])
        #expect(try receiveResults(c, count: 1).done == 1)
        c.close()

        // Second connection: a job breaking the sequence (BODY before any
        // JOB-RCPT); the worker must drop the connection, not deliver.
        c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        try c.send(Frame(.job, attributes: [("job", .uint(2)), ("queue-id", .text("AAAAAAAAAAAA")),
                                            ("sender", .text("")), ("arrival", .uint(0)), ("size", .uint(1)),
                                            ("attempt", .uint(1))]))
        try c.send(Frame(.body, ["data": .bytes([0x41])]))
        #expect(try c.receive() == nil)
        c.close()

        // Third connection: back to normal, and the stage is told to stop.
        c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        try sendJob(c, job: 3, recipients: ["bob@localhost"], body: ["Subject: three\r\n\r\n"])
        #expect(try receiveResults(c, count: 1).done == 3)
        worker.stop()
        c.close()
        try running.wait()

        #expect(mailbox("bob").count == 2)
        #expect(logs.all.contains { $0.hasPrefix("warning: worker: ") && $0.contains("reconnecting") })
    }

    @Test func aRefusedHelloIsAnError() throws {
        let worker = try makeWorker()
        let deliver = try Listener(path: dir.file("run/deliver"))
        let session = Background { try worker.session() }
        let c = try deliver.accept(.deliver)
        _ = try #require(try c.receive())
        try c.send(Frame(.error, ["status": .text("4.3.0"), "text": .text("shutting down")]))
        c.close()
        #expect(throws: PeerError(status: "4.3.0", text: "shutting down")) { try session.wait() }
    }

    @Test func anOversizedMessageBouncesWithoutBeingKept() throws {
        mkdir(dir.file("run"), 0o700)
        let resolver = RecipientResolver(users: LocalUsers(names: ["bob"]), aliases: AliasTable(), localDomains: ["localhost"])
        let agent = LocalDeliveryAgent(resolver: resolver, dataDirectory: dir.path, mailboxTemplate: "mail/{user}/Maildir",
                                       forwarder: nil, log: logs.log)
        let worker = DeliveryWorker(socketPath: dir.file("run/deliver"), agent: agent, maximumMessageSize: 10)
        let deliver = try Listener(path: dir.file("run/deliver"))
        let session = Background { try worker.session() }
        let c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        try sendJob(c, job: 9, recipients: ["bob@localhost"], body: ["Subject: x\r\n", "\r\nmore than ten bytes\r\n"])
        let (results, _) = try receiveResults(c, count: 1)
        #expect(try results[0]?.text("status") == "bounced")
        #expect(try results[0]?.text("dsn") == "5.3.4")
        c.close()
        _ = try session.wait()
        #expect(mailbox("bob").isEmpty)
        // The stage logs what it reports (the queue does not repeat it).
        #expect(logs.all.contains { $0.contains("to=<bob@localhost>, relay=local, delay=") &&
                                    $0.hasSuffix("dsn=5.3.4, status=bounced (message larger than the local delivery limit of 10 bytes)") })
    }

    @Test func aRefusedForwardBouncesOrDefersAsTheQueueSays() throws {
        let worker = try makeWorker(aliases: "out: dave@remote.test\n")
        let deliver = try Listener(path: dir.file("run/deliver"))
        let inject = try Listener(path: dir.file("run/inject"))
        let injected = Background { () throws -> Void in
            let c = try inject.accept(.inject)
            _ = try serverHello(c)
            while let f = try c.receive() {
                if f.type == .end {
                    try c.send(Frame(.refused, ["code": .uint(552), "status": .text("5.3.4"), "text": .text("message too big")]))
                }
            }
        }
        let session = Background { try worker.session() }
        let c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        try sendJob(c, job: 1, recipients: ["out@localhost"], body: ["Subject: x\r\n\r\n"])
        let (results, _) = try receiveResults(c, count: 1)
        #expect(try results[0]?.text("status") == "bounced")
        #expect(try results[0]?.text("dsn") == "5.3.4")
        #expect(try results[0]?.text("text").contains("message too big") == true)
        c.close()
        _ = try session.wait()
        try injected.wait()
    }

    @Test func aMissingInjectSocketDefersTheForward() throws {
        let worker = try makeWorker(aliases: "out: dave@remote.test\n")
        let deliver = try Listener(path: dir.file("run/deliver"))
        let session = Background { try worker.session() }
        let c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        try sendJob(c, job: 1, recipients: ["out@localhost"], body: ["Subject: x\r\n\r\n"])
        let (results, _) = try receiveResults(c, count: 1)
        #expect(try results[0]?.text("status") == "deferred")
        #expect(try results[0]?.text("dsn") == "4.3.0")
        c.close()
        _ = try session.wait()
    }
}

/// A forwarder that holds the delivery in progress until the test lets it
/// go: a worker caught in the middle of a job.
final class HeldForwarder: MessageForwarder {
    let entered = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)
    func forward(_ job: DeliveryJob, to address: String, for recipient: DeliveryJob.Recipient,
                 prepending header: [UInt8]) throws(DeliveryError) -> String {
        entered.signal()
        release.wait()
        return "0A1B2C3D4E5F"
    }
}

/// Whether the peer closed `connection` within 30 s (a bound against
/// hanging, not a timing assertion): readable, and nothing more to read.
private func closedByPeer(_ connection: StageConnection) throws -> Bool {
    var p = pollfd(fd: connection.fileDescriptor, events: Int16(POLLIN), revents: 0)
    guard poll(&p, 1, 30_000) == 1 else { return false }
    return try connection.receive() == nil
}

/// Stopping (SIGTERM: shutdown, or the instance a reload replaced) drains:
/// no delivery is cut short, and an idle worker lets go of the queue at once.
@Suite struct DrainTests {
    let dir = TemporaryDirectory()
    let logs = LogRecorder()

    func makeWorker(forwarder: any MessageForwarder) throws -> DeliveryWorker {
        mkdir(dir.file("run"), 0o700)
        let table = try AliasTable.parse("fwd: carol@remote.test\n", file: "aliases", localDomains: ["localhost"])
        let resolver = RecipientResolver(users: LocalUsers(names: ["bob"]), aliases: table, localDomains: ["localhost"])
        let agent = LocalDeliveryAgent(resolver: resolver, dataDirectory: dir.path, mailboxTemplate: "mail/{user}/Maildir",
                                       namer: MaildirNamer(hostname: "test"), forwarder: forwarder, log: logs.log)
        return DeliveryWorker(socketPath: dir.file("run/deliver"), agent: agent, maximumMessageSize: 1 << 20)
    }

    @Test func anIdleWorkerClosesItsConnectionAndReturnsWhenStopped() throws {
        let worker = try makeWorker(forwarder: HeldForwarder())
        let deliver = try Listener(path: dir.file("run/deliver"))
        let running = Background { worker.run() }
        let c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        worker.stop()
        try #require(try closedByPeer(c), "the idle worker kept its connection after stop()")
        try running.wait()
        #expect(!logs.all.contains { $0.hasPrefix("warning: ") }, "a stop is no outage: \(logs.all)")
    }

    @Test func aDeliveryInProgressIsFinishedAndAnsweredBeforeTheWorkerStops() throws {
        let held = HeldForwarder()
        let worker = try makeWorker(forwarder: held)
        let deliver = try Listener(path: dir.file("run/deliver"))
        let running = Background { worker.run() }
        let c = try deliver.accept(.deliver)
        _ = try serverHello(c)
        try sendJob(c, job: 4, recipients: ["bob@localhost", "fwd@localhost"], body: ["Subject: drain\r\n\r\nx\r\n"])
        held.entered.wait()      // bob's copy is written; the forward is under way
        worker.stop()
        held.release.signal()
        let (results, done) = try receiveResults(c, count: 2)
        #expect(done == 4)
        #expect(try results[0]?.text("status") == "sent")
        #expect(try results[1]?.text("status") == "sent")
        // Then it lets go instead of waiting for the next job.
        try #require(try closedByPeer(c), "the worker took more jobs after stop()")
        try running.wait()
        #expect(listDirectory(dir.file("mail/bob/Maildir/new")).count == 1)
    }
}
