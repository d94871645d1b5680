// The queue service with a real LMDB spool in a temporary directory and real
// Unix sockets; the tests play the clients (queue-inject, a delivery stage,
// the admin CLI) with StageConnection. The clock is a manual one, so that
// backoff, expiry and delay notices need no waiting. Waiting for the queue to
// act on a frame uses `eventually` (polling the control socket), never a
// timing assertion.

import Foundation
import Testing
@testable import QueueService
import LMDB
import SealpostConfig
@testable import Spool
import StageProtocol
import StageRuntime

final class ManualClock: @unchecked Sendable {
    private let lock = NSLock()
    private var value: UInt64
    init(_ start: UInt64 = 1_800_000_000) { value = start }
    var now: UInt64 { lock.withLock { value } }
    func advance(_ seconds: UInt64) { lock.withLock { value += seconds } }
}

struct Received {
    var number: UInt64
    var queueID: String
    var sender: String
    var attempt: UInt64
    var nexthop: String?
    var recipients: [(index: UInt64, address: String)]
    var body: [UInt8]
    var bodyType: String? = nil
}

struct Listing {
    struct Message { var id: String; var sender: String; var held: Bool; var rcpts: [(address: String, state: String, attempts: UInt64, error: String?)] }
    var messages: [Message] = []
    var body: [UInt8] = []
    var ok = false
    var text = ""
}

final class TestQueue {
    let directory: String
    var config: SealpostConfiguration
    let clock = ManualClock()
    var service: QueueService?
    /// The running service's spool, for its statistics.
    var spool: Spool?
    var spoolOptions: SpoolOptions?
    var pendingBodyLimit: Int?
    var injectConnectionLimit: (perUser: Int, unbounded: Set<UInt32>)?
    /// 0: a transport without a stage suspends its messages at once (most
    /// tests look at that state); the production default is 10 s.
    var suspensionGrace: UInt64 = 0
    var injectIdleSeconds: Int64?

    init(sizeLimit: Int = 10_240_000, recipientLimit: Int = 1000, _ tweak: (inout SealpostConfiguration) -> Void = { _ in }) throws {
        let template = FileManager.default.temporaryDirectory.path + "/queuesvc-XXXXXX"
        var bytes = Array(template.utf8CString)
        guard mkdtemp(&bytes) != nil else { throw StageIOError("mkdtemp", code: errno) }
        directory = String(decoding: bytes.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        config = SealpostConfiguration(file: directory + "/sealpost.toml")
        config.dataDirectory = directory
        config.deriveDataPaths()
        config.hostname = "mx.example.test"
        config.postmaster = "postmaster@localhost"
        config.local.domains = ["localhost"]
        config.queue.messageSizeLimit = sizeLimit
        config.queue.recipientLimit = recipientLimit
        config.queue.mapSize = 8 << 20
        config.queue.mapSizeLimit = 64 << 20
        tweak(&config)
        mkdir(config.runtimeDirectory, 0o755)
        try start()
    }

    func start() throws {
        let spool = try Spool(directory: config.spoolDirectory,
                              options: spoolOptions ?? SpoolOptions(mapSize: config.queue.mapSize, mapSizeLimit: config.queue.mapSizeLimit))
        self.spool = spool
        var options = QueueServiceOptions()
        let clock = self.clock
        options.clock = { clock.now }
        options.random = { 0.5 }
        options.jitter = 0
        options.suspensionGrace = suspensionGrace
        options.tick = .milliseconds(20)
        options.statisticsInterval = 0
        if let pendingBodyLimit { options.pendingBodyLimit = pendingBodyLimit }
        options.injectConnectionLimit = injectConnectionLimit
        if let injectIdleSeconds { options.injectIdleTimeout = .seconds(injectIdleSeconds) }
        let service = QueueService(configuration: config, paths: RuntimePaths(config), spool: spool, options: options)
        try service.start()
        self.service = service
    }

    func stop() {
        service?.stop()
        service = nil
        spool = nil
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    // MARK: Clients

    static func connect(_ path: String) throws -> StageConnection {
        // A queue that never answers fails the test instead of hanging it:
        // every wait of the connection is bounded (SO_RCVTIMEO was not:
        // receive turns its EAGAIN into a poll without a limit).
        try StageConnection.connect(path: path, timeout: 15)
    }

    func injector() throws -> StageConnection {
        let c = try Self.connect(config.injectSocket)
        _ = try c.clientHello(.inject)
        return c
    }

    func sendMessage(_ c: StageConnection, from sender: String, to rcpts: [String], notify: String? = nil,
                     body: String = "Subject: test\r\n\r\nhello\r\n", ret: String? = nil, bodyType: String? = nil) throws {
        var mail = Frame(.mail, ["sender": .text(sender)])
        mail.set("ret", ret.map { .text($0) })
        mail.set("body-type", bodyType.map { .text($0) })
        try c.send(mail)
        for r in rcpts {
            var rcpt = Frame(.rcpt, ["address": .text(r)])
            rcpt.set("notify", notify.map { .text($0) })
            try c.send(rcpt)
        }
        let bytes = Array(body.utf8)
        var offset = 0
        while offset < bytes.count {
            let end = min(offset + 65536, bytes.count)
            try c.send(Frame(.body, ["data": .bytes(Array(bytes[offset..<end]))]))
            offset = end
        }
        try c.send(Frame(.end))
    }

    /// One message on `c`; the answer's type, or the refusal ("452 4.3.1").
    func sendAndAnswer(_ c: StageConnection) throws -> String {
        try sendMessage(c, from: "s@example.org", to: ["a@localhost"])
        return try refusal(try #require(try c.receive()))
    }

    /// Injects one message; returns its queue ID (throws on REFUSED).
    @discardableResult
    func inject(from sender: String = "sender@example.org", to rcpts: [String], notify: String? = nil,
                body: String = "Subject: test\r\n\r\nhello\r\n", ret: String? = nil, bodyType: String? = nil) throws -> String {
        let c = try injector()
        defer { c.close() }
        try sendMessage(c, from: sender, to: rcpts, notify: notify, body: body, ret: ret, bodyType: bodyType)
        let reply = try #require(try c.receive())
        guard reply.type == .accepted else { throw PeerError(status: try reply.text("status"), text: try reply.text("text")) }
        return try reply.text("queue-id")
    }

    func deliverer(_ transport: String = "local", maxJobs: UInt64 = 1) throws -> StageConnection {
        let c = try Self.connect(config.deliverSocket)
        _ = try c.clientHello(.deliver, extra: [("transport", .text(transport)), ("max-jobs", .uint(maxJobs))])
        return c
    }

    static func receiveJob(_ c: StageConnection) throws -> Received {
        let job = try #require(try c.receive())
        #expect(job.type == .job)
        var received = Received(number: try job.uint("job"), queueID: try job.text("queue-id"),
                                sender: try job.text("sender"), attempt: try job.uint("attempt"),
                                nexthop: try job.optionalText("nexthop"), recipients: [], body: [],
                                bodyType: try job.optionalText("body-type"))
        while let frame = try c.receive() {
            switch frame.type {
            case .jobRcpt: received.recipients.append((try frame.uint("index"), try frame.text("address")))
            case .body: received.body += try frame.bytes("data")
            case .jobEnd:
                #expect(try frame.uint("job") == received.number)
                return received
            default: Issue.record("unexpected \(frame.type)")
            }
        }
        throw StageIOError("job", code: ECONNRESET)
    }

    static func report(_ c: StageConnection, _ job: Received, _ status: String, dsn: String, text: String,
                       only: [UInt64]? = nil) throws {
        for r in job.recipients where only?.contains(r.index) ?? true {
            try c.send(Frame(.result, ["job": .uint(job.number), "index": .uint(r.index), "status": .text(status),
                                       "dsn": .text(dsn), "text": .text(text), "relay": .text("maildir")]))
        }
        try c.send(Frame(.jobDone, ["job": .uint(job.number)]))
    }

    func control(_ verb: String, _ id: String? = nil, bounce: Bool? = nil, all: Bool = false) throws -> Listing {
        let c = try Self.connect(config.controlSocket)
        defer { c.close() }
        _ = try c.clientHello(.control)
        var request = Frame(.request, ["verb": .text(verb)])
        request.set("queue-id", id.map { .text($0) })
        request.set("bounce", bounce.map { .bool($0) })
        if all { request.set("all", .bool(true)) }
        try c.send(request)
        var listing = Listing()
        while let frame = try c.receive() {
            switch frame.type {
            case .entry:
                listing.messages.append(.init(id: try frame.text("queue-id"), sender: try frame.text("sender"),
                                              held: try frame.bool("held", default: false), rcpts: []))
            case .entryRcpt:
                listing.messages[listing.messages.count - 1].rcpts.append(
                    (try frame.text("address"), try frame.text("state"), try frame.uint("attempts"),
                     try frame.optionalText("error")))
            case .body: listing.body += try frame.bytes("data")
            case .done:
                listing.ok = try frame.bool("ok", default: false)
                listing.text = try frame.text("text")
                return listing
            default: Issue.record("unexpected \(frame.type)")
            }
        }
        throw StageIOError("control", code: ECONNRESET)
    }

    /// Polls `list` until the condition holds (the queue acts on frames of
    /// other connections asynchronously). Gives up after ~15 s.
    func eventually(_ what: String, _ condition: (Listing) -> Bool) throws -> Listing {
        var last = Listing()
        for _ in 0..<1500 {
            last = try control("list")
            if condition(last) { return last }
            usleep(10_000)
        }
        Issue.record("never happened: \(what); last listing: \(last.messages.map { "\($0.id) \($0.sender) \($0.rcpts)" })")
        return last
    }
}

func refusal(_ frame: Frame) throws -> String {
    guard frame.type == .refused else { return "\(frame.type)" }
    return "\(try frame.uint("code")) \(try frame.text("status"))"
}


@Suite(.serialized) struct ServiceTests {
    /// With no stage at all, a message's local and remote recipients are
    /// all suspended: each transport that has no stage defers its own.
    @Test func everyTransportWithoutAStageSuspendsItsRecipients() throws {
        let q = try TestQueue()
        let id = try q.inject(to: ["alice@localhost", "bob@remote.example"])
        let listing = try q.eventually("both suspended") {
            $0.messages.first?.rcpts.map(\.state) == ["deferred", "deferred"]
        }
        #expect(listing.messages.map(\.id) == [id])
        let errors = listing.messages.first?.rcpts.map { $0.error ?? "" } ?? []
        #expect(errors.count == 2)
        #expect(errors.first?.contains("no local-deliver stage connected") == true)
        #expect(errors.last?.contains("no remote-deliver stage connected") == true)
    }

    /// The delivery stages start after the queue: a message due before
    /// they connect is not reported suspended (no "deferred" line, no
    /// deferred state) until the transport has had no stage for the grace
    /// period, and a stage that connects within it simply gets the job.
    @Test func suspensionWaitsForTheGracePeriod() throws {
        let q = try TestQueue()
        q.stop()
        q.suspensionGrace = 10
        try q.start()
        // ACCEPTED comes after the message was scheduled and dispatched.
        let early = try q.inject(to: ["alice@localhost"])
        var listing = try q.control("list")
        #expect(listing.messages.first?.rcpts.map(\.state) == ["pending"])
        #expect(listing.messages.first?.rcpts.first?.error == nil)
        q.clock.advance(9)
        listing = try q.control("list")
        #expect(listing.messages.first?.rcpts.map(\.state) == ["pending"])

        // Past the grace: suspended, with the reason.
        q.clock.advance(1)
        listing = try q.eventually("suspended after the grace") { $0.messages.first?.rcpts.first?.state == "deferred" }
        #expect(listing.messages.first?.rcpts.first?.error?.contains("no local-deliver stage connected") == true)

        // A stage connects: the job goes out.
        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        #expect(job.queueID == early)
        try TestQueue.report(stage, job, "sent", dsn: "2.0.0", text: "delivered")
        _ = try q.eventually("delivered and removed") { $0.messages.isEmpty }
    }

    @Test func injectDeliverRemove() throws {
        let q = try TestQueue()
        let id = try q.inject(to: ["alice@localhost", "bob@localhost"], body: "Subject: hi\r\n\r\nbody\r\n")
        #expect(id.count == 12)
        var listing = try q.control("list")
        #expect(listing.messages.map(\.id) == [id])
        #expect(listing.messages.first?.rcpts.map(\.state) == ["deferred", "deferred"])   // no stage yet: suspended

        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        #expect(job.queueID == id && job.attempt == 1 && job.sender == "sender@example.org")
        #expect(job.recipients.map(\.address) == ["alice@localhost", "bob@localhost"])
        #expect(String(decoding: job.body, as: UTF8.self) == "Subject: hi\r\n\r\nbody\r\n")
        try TestQueue.report(stage, job, "sent", dsn: "2.0.0", text: "delivered to maildir")
        listing = try q.eventually("message removed") { $0.messages.isEmpty }
        #expect(listing.messages.isEmpty)
        let stats = try q.control("stats")
        #expect(stats.ok && stats.text.contains("sent=2"))
        stage.close()
    }

    @Test func announceIDAtMailIsTheIDOfTheCommittedMessage() throws {
        let q = try TestQueue()
        let c = try q.injector()
        defer { c.close() }
        // Two transactions pipelined on one connection, the first asking for
        // its ID at MAIL, the second not: one QUEUE-ID (before anything
        // else), then the two ACCEPTED in END order.
        func send(announce: Bool) throws {
            var mail = Frame(.mail, ["sender": .text("s@example.org")])
            if announce { mail.set("announce-id", .bool(true)) }
            try c.send(mail)
            try c.send(Frame(.rcpt, ["address": .text("u@localhost")]))
            try c.send(Frame(.body, ["data": .bytes(Array("Subject: x\r\n\r\nx\r\n".utf8))]))
            try c.send(Frame(.end))
        }
        try send(announce: true)
        try send(announce: false)
        let announced = try #require(try c.receive())
        #expect(announced.type == .queueID)
        let id = try announced.text("queue-id")
        #expect(id.count == 12)
        let first = try #require(try c.receive())
        #expect(first.type == .accepted)
        #expect(try first.text("queue-id") == id)
        let second = try #require(try c.receive())
        #expect(second.type == .accepted)
        #expect(try second.text("queue-id") != id)
        let listing = try q.control("list")
        #expect(Set(listing.messages.map(\.id)) == [id, try second.text("queue-id")])
    }

    @Test func announcedIDOfARefusedMessageIsNotReused() throws {
        let q = try TestQueue()
        let c = try q.injector()
        defer { c.close() }
        try c.send(Frame(.mail, ["sender": .text("s@example.org"), "announce-id": .bool(true)]))
        try c.send(Frame(.end))   // no recipient: refused
        let announced = try #require(try c.receive())
        #expect(announced.type == .queueID)
        let refused = try #require(try c.receive())
        #expect(refused.type == .refused)
        try c.send(Frame(.mail, ["sender": .text("s@example.org"), "announce-id": .bool(true)]))
        try c.send(Frame(.rcpt, ["address": .text("u@localhost")]))
        try c.send(Frame(.end))
        let next = try #require(try c.receive())
        #expect(next.type == .queueID)
        #expect(try next.text("queue-id") != (try announced.text("queue-id")))
        let accepted = try #require(try c.receive())
        #expect(try accepted.text("queue-id") == (try next.text("queue-id")))
    }

    @Test func reservedIDsSaveTheRoundTripOfQueueID() throws {
        let q = try TestQueue()
        // Without reserve-ids, no reservation is named anywhere.
        let plain = try q.injector()
        defer { plain.close() }
        try q.sendMessage(plain, from: "s@example.org", to: ["u@localhost"])
        let plainAnswer = try #require(try plain.receive())
        #expect(plainAnswer.type == .accepted)
        #expect(plainAnswer["next-queue-id"] == nil)

        let c = try TestQueue.connect(q.config.injectSocket)
        defer { c.close() }
        let hello = try c.clientHello(.inject, extra: [("reserve-ids", .bool(true))])
        let first = try hello.text("next-queue-id")
        #expect(first.count == 12)
        func send(queueID: String?, recipient: String = "u@localhost") throws {
            var mail = Frame(.mail, ["sender": .text("s@example.org")])
            mail.set("queue-id", queueID.map { .text($0) })
            try c.send(mail)
            try c.send(Frame(.rcpt, ["address": .text(recipient)]))
            try c.send(Frame(.body, ["data": .bytes(Array("Subject: x\r\n\r\nx\r\n".utf8))]))
            try c.send(Frame(.end))
        }
        // MAIL under the reservation: no QUEUE-ID; ACCEPTED names the
        // reserved ID and reserves the next.
        try send(queueID: first)
        let accepted = try #require(try c.receive())
        #expect(accepted.type == .accepted)
        #expect(try accepted.text("queue-id") == first)
        let second = try accepted.text("next-queue-id")
        #expect(second != first)
        // A MAIL without queue-id gets an ID of its own and leaves the
        // reservation alone; a refusal names it too.
        try send(queueID: nil)
        let own = try #require(try c.receive())
        #expect(try own.text("queue-id") != second)
        #expect(try own.text("next-queue-id") == second)
        try c.send(Frame(.mail, ["sender": .text("s@example.org"), "queue-id": .text(second)]))
        try c.send(Frame(.end))   // no recipient: refused, the ID stays unused
        let refused = try #require(try c.receive())
        #expect(refused.type == .refused)
        let third = try refused.text("next-queue-id")
        #expect(![first, second].contains(third))
        let listing = try q.control("list")
        #expect(Set(listing.messages.map(\.id)) == [try plainAnswer.text("queue-id"), first, try own.text("queue-id")])
        // A used reservation is not a reservation any more: ERROR at the
        // MAIL, and the queue closes the connection (frames sent after it
        // could meet the closed socket, EPIPE, before the ERROR is read).
        try c.send(Frame(.mail, ["sender": .text("s@example.org"), "queue-id": .text(first)]))
        let error = try #require(try c.receive())
        #expect(error.type == .error)
        #expect(try error.text("status") == "5.5.0")
        #expect(try error.text("text").contains("not the ID reserved for this connection"))
    }

    @Test func anotherConnectionsReservationIsRefused() throws {
        let q = try TestQueue()
        let a = try TestQueue.connect(q.config.injectSocket)
        defer { a.close() }
        let reserved = try a.clientHello(.inject, extra: [("reserve-ids", .bool(true))]).text("next-queue-id")
        let b = try TestQueue.connect(q.config.injectSocket)
        defer { b.close() }
        _ = try b.clientHello(.inject, extra: [("reserve-ids", .bool(true))])
        try b.send(Frame(.mail, ["sender": .text("s@example.org"), "queue-id": .text(reserved)]))
        let error = try #require(try b.receive())
        #expect(error.type == .error)
        #expect(try q.control("list").messages.isEmpty)
    }

    @Test func groupCommitSharesCommits() throws {
        let q = try TestQueue()
        let n = 24
        let clients = try (0..<n).map { _ in try q.injector() }
        // Everything but END first, then all ENDs back to back: they wait
        // together for the committer.
        for c in clients {
            try c.send(Frame(.mail, ["sender": .text("s@example.org")]))
            try c.send(Frame(.rcpt, ["address": .text("u@localhost")]))
            try c.send(Frame(.body, ["data": .bytes(Array("Subject: x\r\n\r\nx\r\n".utf8))]))
        }
        for c in clients { try c.send(Frame(.end)) }
        var ids = Set<String>()
        for c in clients {
            let reply = try #require(try c.receive())
            #expect(reply.type == .accepted)
            ids.insert(try reply.text("queue-id"))
            c.close()
        }
        #expect(ids.count == n)
        let stats = try #require(q.service?.statistics())
        #expect(stats.injected == UInt64(n) && stats.messages == UInt64(n))
        #expect(stats.commits < stats.messages, "group commit: \(stats)")
    }

    /// Unfinished messages hold their bodies in memory until END: past the
    /// bound (here 200,000 bytes, so 100,000 per peer uid) a transaction is
    /// refused 452 4.3.1, and what ends one (END, a refusal, ABORT, a
    /// closed connection) gives its bytes back. One connection at a time,
    /// or one after another's answer, so the order is the queue's too.
    @Test func unfinishedBodiesAreBounded() throws {
        let q = try TestQueue(sizeLimit: 1_000_000)
        q.stop()
        q.pendingBodyLimit = 200_000
        try q.start()
        let piece = Array(repeating: UInt8(ascii: "x"), count: 45_000)
        func open(_ c: StageConnection, pieces: Int = 2) throws {
            try c.send(Frame(.mail, ["sender": .text("s@example.org")]))
            try c.send(Frame(.rcpt, ["address": .text("a@localhost")]))
            for _ in 0..<pieces { try c.send(Frame(.body, ["data": .bytes(piece)])) }
        }
        func end(_ c: StageConnection) throws -> String {
            try c.send(Frame(.end))
            return try refusal(try #require(try c.receive()))
        }
        let a = try q.injector()
        try open(a, pieces: 3)   // 135,000: past this uid's 100,000
        #expect(try end(a) == "452 4.3.1")
        try open(a)              // 90,000 fit: the refusal gave its bytes back
        #expect(try end(a) == "accepted")
        try open(a)              // and so did END
        #expect(try end(a) == "accepted")
        try open(a)
        try a.send(Frame(.abort))
        try open(a)              // and ABORT
        #expect(try end(a) == "accepted")
        // A connection that closes mid-message gives its bytes back once
        // the queue sees the close; the next connection's message may come
        // first: a bounded number of tries, no timing.
        try open(a)
        a.close()
        var answer = ""
        for _ in 0..<100 where answer != "accepted" {
            let b = try q.injector()
            try open(b)
            answer = try end(b)
            b.close()
            if answer != "accepted" { usleep(10_000) }
        }
        #expect(answer == "accepted")
    }

    /// One local user may hold only so many inject connections (each is a
    /// descriptor of the queue's); the uids marked unbounded may hold more.
    @Test func injectConnectionsPerUserAreBounded() throws {
        let q = try TestQueue()
        q.stop()
        q.injectConnectionLimit = (perUser: 2, unbounded: [])
        try q.start()
        let a = try q.injector(), b = try q.injector()
        var refused: PeerError?
        do {
            _ = try q.injector()
        } catch let error as PeerError {
            refused = error
        }
        #expect(refused?.status == "4.3.2")
        // The others still work, and a closed one makes room (once the
        // queue has seen the close: a bounded number of tries).
        #expect(try q.sendAndAnswer(b) == "accepted")
        a.close()
        var admitted: StageConnection?
        for _ in 0..<100 where admitted == nil {
            admitted = try? q.injector()
            if admitted == nil { usleep(10_000) }
        }
        let c = try #require(admitted)
        #expect(try q.sendAndAnswer(c) == "accepted")
        // Unbounded uids (root and smtp-listen in an installation).
        q.stop()
        q.injectConnectionLimit = (perUser: 2, unbounded: [getuid()])
        try q.start()
        let many = try (0..<4).map { _ in try q.injector() }
        #expect(try q.sendAndAnswer(many[3]) == "accepted")
    }

    /// An inject connection idle between transactions is closed (EOF at
    /// the client), after its HELLO or without one; inside a transaction
    /// it is not: one that sent MAIL stays silent from before those two
    /// connected until after they were closed, then goes on to ACCEPTED.
    @Test func idleInjectConnectionsAreClosedBetweenTransactionsOnly() throws {
        let q = try TestQueue()
        q.stop()
        q.injectIdleSeconds = 1
        try q.start()
        // Every wait bounded: a connection left open fails the test (a
        // timeout), it does not hang it.
        func connect(hello: Bool = true) throws -> StageConnection {
            let c = try StageConnection.connect(path: q.config.injectSocket, timeout: 20)
            if hello { _ = try c.clientHello(.inject) }
            return c
        }
        let busy = try connect()
        try busy.send(Frame(.mail, ["sender": .text("s@example.org"), "announce-id": .bool(true)]))
        #expect(try busy.receive()?.type == .queueID)   // MAIL was read
        let greeted = try connect()
        let silent = try connect(hello: false)
        #expect(try greeted.receive() == nil)
        #expect(try silent.receive() == nil)
        try busy.send(Frame(.rcpt, ["address": .text("a@localhost")]))
        try busy.send(Frame(.body, ["data": .bytes(Array("Subject: slow\r\n\r\nhello\r\n".utf8))]))
        try busy.send(Frame(.end))
        #expect(try refusal(try #require(try busy.receive())) == "accepted")
        // Its answer sent, it is idle too.
        #expect(try busy.receive() == nil)
    }

    @Test func refusals() throws {
        let q = try TestQueue(sizeLimit: 1000, recipientLimit: 2)
        let c = try q.injector()
        // The limit is the client's content; the injecting stage's own
        // header fields (Received...) have room beyond it.
        let received = "Received: from client.example (unknown [192.0.2.1])\r\n\tby mx.example.test (Sealpost) with ESMTP id 6B0E00BC0009\r\n\tfor <a@localhost>; Mon, 30 Nov 2026 23:18:34 +0000\r\n"
        try q.sendMessage(c, from: "s@example.org", to: ["a@localhost"], body: received + String(repeating: "x", count: 1000))
        var reply = try #require(try c.receive())
        #expect(reply.type == .accepted)
        try q.sendMessage(c, from: "s@example.org", to: ["a@localhost"],
                          body: String(repeating: "x", count: 1000 + QueueSettings.traceAllowance + 1))
        reply = try #require(try c.receive())
        #expect(try refusal(reply) == "552 5.3.4")
        try q.sendMessage(c, from: "s@example.org", to: ["a@localhost", "b@localhost", "c@localhost"])
        reply = try #require(try c.receive())
        #expect(try refusal(reply) == "452 4.5.3")
        try q.sendMessage(c, from: "s@example.org", to: [])
        reply = try #require(try c.receive())
        #expect(try refusal(reply) == "554 5.5.1")
        // ABORT gets no answer; the connection still works afterwards.
        try c.send(Frame(.mail, ["sender": .text("s@example.org")]))
        try c.send(Frame(.abort))
        try q.sendMessage(c, from: "s@example.org", to: ["a@localhost"])
        reply = try #require(try c.receive())
        #expect(reply.type == .accepted)
        // A protocol violation: ERROR, then the connection closes.
        try c.send(Frame(.end))
        reply = try #require(try c.receive())
        #expect(reply.type == .error)
        #expect(try c.receive() == nil)
        c.close()
        #expect(try q.control("list").messages.count == 2)
    }

    @Test func bounceGoesToTheSenderInTheSameBatch() throws {
        let q = try TestQueue()
        let id = try q.inject(from: "sender@example.org", to: ["nobody@localhost", "alice@localhost"])
        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        try stage.send(Frame(.result, ["job": .uint(job.number), "index": .uint(0), "status": .text("bounced"),
                                       "dsn": .text("5.1.1"), "text": .text("unknown user: \"nobody\"")]))
        try stage.send(Frame(.result, ["job": .uint(job.number), "index": .uint(1), "status": .text("sent"),
                                       "dsn": .text("2.0.0"), "text": .text("delivered to maildir")]))
        try stage.send(Frame(.jobDone, ["job": .uint(job.number)]))
        let listing = try q.eventually("bounce queued") { l in l.messages.count == 1 && l.messages[0].id != id }
        let bounce = try #require(listing.messages.first)
        #expect(bounce.sender == "" && bounce.rcpts.map(\.address) == ["sender@example.org"])
        // No remote-deliver: suspended, not failed.
        let waiting = try q.eventually("suspended") { $0.messages.first?.rcpts.first?.state == "deferred" }
        #expect(waiting.messages.first?.rcpts.first?.attempts == 0)
        #expect(waiting.messages.first?.rcpts.first?.error?.contains("no remote-deliver stage connected") == true)
        let shown = try q.control("show", bounce.id)
        let text = String(decoding: shown.body, as: UTF8.self)
        #expect(text.contains("multipart/report") && text.contains("nobody@localhost") && text.contains("5.1.1"))
        #expect(!text.contains("Final-Recipient: rfc822; alice@localhost"))

        // A remote stage connects: the bounce goes out with its nexthop;
        // it bounces too, so the postmaster gets a double bounce.
        let remote = try q.deliverer("remote")
        let bjob = try TestQueue.receiveJob(remote)
        #expect(bjob.queueID == bounce.id && bjob.nexthop == "example.org" && bjob.sender == "")
        try TestQueue.report(remote, bjob, "bounced", dsn: "5.1.2", text: "host not found")
        let double = try q.eventually("double bounce") { l in l.messages.count == 1 && l.messages[0].id != bounce.id }
        #expect(double.messages.first?.rcpts.map(\.address) == ["postmaster@localhost"])
        // From the double-bounce sender, as Postfix's postmaster notices.
        #expect(double.messages.first?.sender == "double-bounce@mx.example.test")
        // The double bounce itself fails: logged and dropped, nothing more.
        let djob = try TestQueue.receiveJob(stage)
        #expect(djob.sender == "double-bounce@mx.example.test")
        try TestQueue.report(stage, djob, "bounced", dsn: "5.1.1", text: "unknown user")
        _ = try q.eventually("double bounce discarded") { $0.messages.isEmpty }
        stage.close(); remote.close()
    }

    /// sendmail without -B names no body type; 8-bit bytes in such a body
    /// make it 8BITMIME in the queue (so remote-deliver declares it, or
    /// converts it for a host without 8BITMIME). A declared type stays as
    /// declared, a 7-bit body stays without one; a bounce that returns
    /// 8-bit bytes is 8BITMIME too.
    @Test func undeclaredEightBitBodiesAreStoredAs8BITMIME() throws {
        let q = try TestQueue()
        let stage = try q.deliverer()
        // The 8-bit byte in the second BODY frame, past the first 64 KiB.
        let late = "Subject: x\r\n\r\n" + String(repeating: "a", count: 70_000) + "\r\nGr\u{fc}\u{df}e\r\n"
        for (body, declared, stored) in [
            ("Subject: caf\u{e9}\r\n\r\nhello\r\n", nil, "8BITMIME"),
            (late, nil, "8BITMIME"),
            ("Subject: x\r\n\r\nhello\r\n", nil, nil),
            ("Subject: x\r\n\r\nGr\u{fc}\u{df}e\r\n", "7BIT", "7BIT"),
            ("Subject: x\r\n\r\nhello\r\n", "8BITMIME", "8BITMIME"),
        ] as [(String, String?, String?)] {
            let id = try q.inject(to: ["alice@localhost"], body: body, bodyType: declared)
            let job = try TestQueue.receiveJob(stage)
            #expect(job.queueID == id && job.bodyType == stored, "\(declared ?? "none") -> \(job.bodyType ?? "none")")
            try TestQueue.report(stage, job, "sent", dsn: "2.0.0", text: "delivered")
        }
        // The bounce of an 8-bit message returns it, and says so.
        _ = try q.eventually("all delivered") { $0.messages.isEmpty }
        try q.inject(from: "sender@localhost", to: ["nobody@localhost"], body: "Subject: caf\u{e9}\r\n\r\nx\r\n")
        let job = try TestQueue.receiveJob(stage)
        try TestQueue.report(stage, job, "bounced", dsn: "5.1.1", text: "unknown user")
        let bounce = try TestQueue.receiveJob(stage)
        #expect(bounce.sender == "" && bounce.bodyType == "8BITMIME")
        #expect(String(decoding: bounce.body, as: UTF8.self).contains("Content-Transfer-Encoding: 8bit"))
        try TestQueue.report(stage, bounce, "sent", dsn: "2.0.0", text: "delivered")
        stage.close()
    }

    @Test func aForwardedDoubleBounceThatFailsIsDroppedNotReportedAgain() throws {
        // local-deliver forwards the postmaster's mail by an alias, keeping
        // the envelope sender: the double bounce comes back to the queue
        // as a normal message from the double-bounce sender. Its failure
        // must end there: another double bounce would be forwarded again,
        // fail again, and so on for ever.
        let q = try TestQueue()
        let copy = try q.inject(from: "double-bounce@mx.example.test", to: ["admin@example.net"])
        let remote = try q.deliverer("remote")
        let job = try TestQueue.receiveJob(remote)
        #expect(job.queueID == copy)
        try TestQueue.report(remote, job, "bounced", dsn: "5.1.1", text: "550 5.1.1 no such user")
        _ = try q.eventually("the copy removed, no notice") { $0.messages.isEmpty }
        #expect(try q.control("list").messages.isEmpty)
        remote.close()
    }

    /// A delivery stage that breaks the deliver protocol (PROTOCOL.md 4.3)
    /// gets ERROR and is cut off, and the recipients of its job without a
    /// valid RESULT come back for the next stage: a "sent" with a 5.x.x
    /// code, a second RESULT for one recipient (the first, well-formed,
    /// counts: that delivery happened), a RESULT for a recipient not in
    /// the job or for a job it does not have.
    @Test(arguments: ["status mismatch", "second result", "unknown index", "unknown job"])
    func aStageThatBreaksTheProtocolIsCutOffAndItsJobComesBack(_ breach: String) throws {
        let q = try TestQueue()
        let id = try q.inject(to: ["alice@localhost", "bob@localhost"])
        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        func result(_ index: UInt64, _ status: String, _ dsn: String, job number: UInt64 = job.number) -> Frame {
            Frame(.result, ["job": .uint(number), "index": .uint(index), "status": .text(status),
                            "dsn": .text(dsn), "text": .text("x")])
        }
        switch breach {
        case "status mismatch":
            try stage.send(result(0, "sent", "5.1.1"))
        case "second result":
            try stage.send(result(0, "sent", "2.0.0"))
            try stage.send(result(0, "bounced", "5.1.1"))
        case "unknown index":
            try stage.send(result(7, "sent", "2.0.0"))
        default:
            try stage.send(result(0, "sent", "2.0.0", job: job.number + 1))
        }
        let error = try #require(try stage.receive())
        #expect(error.type == .error, "\(error)")
        #expect(try stage.receive() == nil)   // closed
        stage.close()
        // The breach itself was not applied: the recipients wait for the
        // next stage (not sent, not bounced), which gets them.
        let firstCounted = breach == "second result"
        let listing = try q.control("list")
        #expect(listing.messages.map(\.id) == [id])
        #expect(listing.messages.first?.rcpts.map { $0.state == "sent" } == [firstCounted, false], "\(listing)")
        #expect(listing.messages.first?.rcpts.allSatisfy { $0.state != "bounced" } == true, "\(listing)")
        let next = try q.deliverer()
        let again = try TestQueue.receiveJob(next)
        #expect(again.queueID == id)
        #expect(again.recipients.map(\.address) == (firstCounted ? ["bob@localhost"] : ["alice@localhost", "bob@localhost"]))
        next.close()
    }

    @Test func notifyNeverMeansNoBounce() throws {
        let q = try TestQueue()
        try q.inject(to: ["nobody@localhost"], notify: "NEVER")
        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        try TestQueue.report(stage, job, "bounced", dsn: "5.1.1", text: "unknown user")
        _ = try q.eventually("removed without a bounce") { $0.messages.isEmpty }
        stage.close()
    }

    @Test func successNoticeForLocalDelivery() throws {
        let q = try TestQueue()
        try q.inject(from: "sender@localhost", to: ["alice@localhost"], notify: "SUCCESS")
        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        try TestQueue.report(stage, job, "sent", dsn: "2.0.0", text: "delivered to maildir")
        let notice = try TestQueue.receiveJob(stage)
        #expect(notice.sender == "" && notice.recipients.map(\.address) == ["sender@localhost"])
        let text = String(decoding: notice.body, as: UTF8.self)
        #expect(text.contains("Action: delivered"))
        try TestQueue.report(stage, notice, "sent", dsn: "2.0.0", text: "delivered to maildir")
        _ = try q.eventually("all gone") { $0.messages.isEmpty }
        stage.close()
    }

    @Test func killedStageLosesNothing() throws {
        let q = try TestQueue()
        let id = try q.inject(to: ["alice@localhost"])
        let first = try q.deliverer()
        let job = try TestQueue.receiveJob(first)
        #expect(job.queueID == id)
        first.close()   // as kill -9 would
        let second = try q.deliverer()
        let again = try TestQueue.receiveJob(second)
        #expect(again.queueID == id && again.attempt == 1 && again.recipients.map(\.address) == ["alice@localhost"])
        // A JOB-DONE without RESULT: the recipient comes back too.
        try second.send(Frame(.jobDone, ["job": .uint(again.number)]))
        let third = try TestQueue.receiveJob(second)
        #expect(third.queueID == id)
        try TestQueue.report(second, third, "sent", dsn: "2.0.0", text: "ok")
        _ = try q.eventually("delivered") { $0.messages.isEmpty }
        second.close()
    }

    /// A delivered message's delete waits briefly to share a spool
    /// submission with others; stopping the queue commits the waiting ones.
    @Test func deliveredMessagesStayRemovedAcrossAStop() throws {
        let q = try TestQueue()
        let ids = try (0..<3).map { _ in try q.inject(to: ["alice@localhost"]) }
        let stage = try q.deliverer(maxJobs: 4)
        for _ in ids {
            let job = try TestQueue.receiveJob(stage)
            try TestQueue.report(stage, job, "sent", dsn: "2.0.0", text: "ok")
        }
        _ = try q.eventually("all delivered") { $0.messages.isEmpty }
        stage.close()
        q.stop()
        try q.start()
        #expect(try q.control("list").messages.isEmpty)
    }

    /// A stop while a message's commit is pending lets the commit finish
    /// and answers it before the connection closes: a queued message
    /// without its ACCEPTED would be sent again by its client, a duplicate.
    @Test func stopAnswersTheCommitsItWaitsFor() throws {
        let q = try TestQueue()
        q.stop()
        // The third connection's message waits for a sibling (group commit)
        // long enough for the stop to come first.
        var options = SpoolOptions(mapSize: q.config.queue.mapSize, mapSizeLimit: q.config.queue.mapSizeLimit,
                                   commitDelay: 30)
        options.siblingWindow = 3600
        q.spoolOptions = options
        try q.start()
        let (a, b, c) = (try q.injector(), try q.injector(), try q.injector())
        defer { a.close(); b.close(); c.close() }
        for connection in [a, b] {
            try q.sendMessage(connection, from: "s@example.org", to: ["alice@localhost"])
            #expect(try #require(try connection.receive()).type == .accepted)
        }
        try q.sendMessage(c, from: "s@example.org", to: ["bob@localhost"])
        let spool = try #require(q.spool)
        let deadline = Date().addingTimeInterval(15)
        while spool.statistics.delayedCommits == 0 && Date() < deadline { usleep(5_000) }
        try #require(spool.statistics.delayedCommits == 1)
        q.stop()
        let answer = try #require(try c.receive())
        #expect(answer.type == .accepted)
        #expect(try c.receive() == nil)
        try q.start()
        let listing = try q.control("list")
        #expect(listing.messages.count == 3)
        #expect(listing.messages.contains { $0.id == (try? answer.text("queue-id")) })
    }

    /// One envelope that cannot be read does not keep the queue from
    /// starting: it is logged and left aside, the others are delivered.
    @Test func aDamagedEnvelopeDoesNotStopTheQueue() throws {
        let q = try TestQueue()
        let good = try q.inject(to: ["alice@localhost"])
        let bad = try q.inject(to: ["bob@localhost"])
        q.stop()
        do {
            let env = try Environment(path: q.config.spoolDirectory, mapSize: q.config.queue.mapSize, maxDatabases: 16)
            try env.write { txn throws in
                try txn.put(try txn.openDatabase("envelopes"), Array(bad.utf8), [0x01, 0x02])
            }
            env.close()
        }
        try q.start()
        #expect(try q.control("list").messages.map(\.id) == [good])
        let stage = try q.deliverer()
        defer { stage.close() }
        let job = try TestQueue.receiveJob(stage)
        #expect(job.queueID == good)
    }

    @Test func restartKeepsEverything() throws {
        let q = try TestQueue()
        let a = try q.inject(to: ["alice@localhost"])
        let b = try q.inject(to: ["bob@localhost", "carol@localhost"])
        // One recipient of b delivered, one deferred, before the restart.
        let stage = try q.deliverer()
        _ = try TestQueue.receiveJob(stage)     // a: left in flight
        stage.close()
        let stage2 = try q.deliverer(maxJobs: 2)
        var jobs = [try TestQueue.receiveJob(stage2), try TestQueue.receiveJob(stage2)]
        jobs.sort { $0.queueID < $1.queueID }
        let jb = try #require(jobs.first { $0.queueID == b })
        try TestQueue.report(stage2, jb, "sent", dsn: "2.0.0", text: "ok", only: [0])
        _ = try q.eventually("b half done") { l in l.messages.first { $0.id == b }?.rcpts.map(\.state) == ["sent", "deferred"] }
        stage2.close()

        q.stop()
        try q.start()
        let listing = try q.control("list")
        #expect(listing.messages.map(\.id).sorted() == [a, b])
        #expect(listing.messages.first { $0.id == b }?.rcpts.map(\.state) == ["sent", "deferred"])
        let stage3 = try q.deliverer(maxJobs: 4)
        let job = try TestQueue.receiveJob(stage3)
        #expect(job.queueID == a)
        try TestQueue.report(stage3, job, "sent", dsn: "2.0.0", text: "ok")
        // b's carol comes back after the retry delay of the lost job.
        q.service?.runMaintenance()
        let jobB = try TestQueue.receiveJob(stage3)
        #expect(jobB.queueID == b && jobB.recipients.map(\.address) == ["carol@localhost"])
        try TestQueue.report(stage3, jobB, "sent", dsn: "2.0.0", text: "ok")
        _ = try q.eventually("all delivered") { $0.messages.isEmpty }
        stage3.close()
    }

    /// [queue] hold_incoming: each message is committed held (so it stays
    /// held across a restart) and none goes to a stage until released.
    @Test func heldOnArrivalUntilReleased() throws {
        let q = try TestQueue { $0.queue.holdIncoming = true }
        let a = try q.inject(to: ["alice@localhost"])
        let b = try q.inject(to: ["bob@localhost"])
        q.stop()
        try q.start()
        let listed = try q.control("list").messages
        #expect(listed.count == 2 && listed.allSatisfy(\.held))
        let stage = try q.deliverer()
        // Both are due; a, the older, would go first were it not held.
        #expect(try q.control("release", b).ok)
        let first = try TestQueue.receiveJob(stage)
        #expect(first.queueID == b)
        try TestQueue.report(stage, first, "sent", dsn: "2.0.0", text: "ok")
        _ = try q.eventually("b delivered") { $0.messages.map(\.id) == [a] }
        #expect(try q.control("list").messages.first?.held == true)
        #expect(try q.control("release", a).ok)
        let second = try TestQueue.receiveJob(stage)
        #expect(second.queueID == a)
        try TestQueue.report(stage, second, "sent", dsn: "2.0.0", text: "ok")
        _ = try q.eventually("all delivered") { $0.messages.isEmpty }
        stage.close()
    }

    @Test func holdReleaseFlushDelete() throws {
        let q = try TestQueue()
        let a = try q.inject(to: ["alice@localhost"])
        let b = try q.inject(to: ["bob@localhost"])
        #expect(try q.control("hold", a).ok)
        #expect(try q.control("list").messages.first { $0.id == a }?.held == true)
        let stage = try q.deliverer()
        let first = try TestQueue.receiveJob(stage)
        #expect(first.queueID == b)
        try TestQueue.report(stage, first, "deferred", dsn: "4.2.2", text: "mailbox full")
        _ = try q.eventually("b deferred") { $0.messages.first { $0.id == b }?.rcpts.first?.attempts == 1 }
        #expect(try q.control("release", a).ok)
        let second = try TestQueue.receiveJob(stage)
        #expect(second.queueID == a)
        try TestQueue.report(stage, second, "sent", dsn: "2.0.0", text: "ok")
        // b waits for its backoff (the clock does not move) until flushed.
        #expect(try q.control("flush", b).ok)
        let third = try TestQueue.receiveJob(stage)
        #expect(third.queueID == b && third.attempt == 2)
        try TestQueue.report(stage, third, "deferred", dsn: "4.2.2", text: "mailbox full")
        _ = try q.eventually("b deferred twice") { $0.messages.first { $0.id == b }?.rcpts.first?.attempts == 2 }

        // Silent delete.
        #expect(try q.control("delete", b).ok)
        #expect(try q.control("list").messages.isEmpty)
        #expect(try q.control("delete", b).ok == false)

        // Delete with a bounce: the sender is notified.
        let c = try q.inject(from: "sender@localhost", to: ["carol@example.net"])
        #expect(try q.control("delete", c, bounce: true).ok)
        let notice = try TestQueue.receiveJob(stage)
        #expect(notice.sender == "" && notice.recipients.map(\.address) == ["sender@localhost"])
        #expect(String(decoding: notice.body, as: UTF8.self).contains("deleted by the administrator"))
        stage.close()
    }

    /// A delete with bounce while a recipient is in a job would tell the
    /// sender it failed though it may yet be delivered: it is refused until
    /// the attempt ends; a delete without bounce is not.
    @Test func deleteWithBounceWaitsForTheAttemptInProgress() throws {
        let q = try TestQueue()
        let a = try q.inject(from: "sender@localhost", to: ["alice@localhost"])
        let stage = try q.deliverer()
        defer { stage.close() }
        let job = try TestQueue.receiveJob(stage)
        #expect(job.queueID == a)
        let refused = try q.control("delete", a, bounce: true)
        #expect(!refused.ok && refused.text.contains("a delivery attempt is in progress"))
        let all = try q.control("delete", bounce: true, all: true)
        #expect(!all.ok && all.text.hasPrefix("deleted 0 of 1 messages; 1 failed"))
        #expect(try q.control("list").messages.map(\.id) == [a])
        try TestQueue.report(stage, job, "deferred", dsn: "4.2.2", text: "mailbox full")
        _ = try q.eventually("a deferred") { $0.messages.first?.rcpts.first?.attempts == 1 }
        #expect(try q.control("delete", a, bounce: true).ok)
        let notice = try TestQueue.receiveJob(stage)
        #expect(notice.sender == "" && notice.recipients.map(\.address) == ["sender@localhost"])
    }

    /// A delete, hold or release whose spool write fails leaves the message
    /// as the spool (and the failed answer) has it: still queued, and held
    /// only if it was.
    @Test func failedDeleteOrHoldLeavesTheMessageAsItWas() throws {
        let q = try TestQueue()
        let a = try q.inject(to: ["alice@localhost"])
        q.spool?.close()   // every later write fails: "spool closed"
        let hold = try q.control("hold", a)
        #expect(!hold.ok)
        #expect(try q.control("list").messages.first?.held == false)
        let delete = try q.control("delete", a)
        #expect(!delete.ok)
        #expect(try q.control("list").messages.map(\.id) == [a])
        let deleteAgain = try q.control("delete", a)
        #expect(!deleteAgain.ok && !deleteAgain.text.contains("no such message"))
        // With bounce too: the recipients stay as they were, not bounced
        // (the next maintenance pass would have finalized the message and
        // sent the notice for a deletion that never happened).
        let bounced = try q.control("delete", a, bounce: true)
        #expect(!bounced.ok)
        let after = try q.control("list").messages
        #expect(after.map(\.id) == [a])
        #expect(after.first?.rcpts.allSatisfy { $0.state != "bounced" } == true, "\(after)")
    }

    /// postsuper's ALL: one request for every message, answered once all
    /// the changes are committed.
    @Test func holdReleaseAndDeleteAll() throws {
        let q = try TestQueue()
        let ids = try (0..<5).map { _ in try q.inject(to: ["alice@localhost"]) }
        #expect(try q.control("hold", ids[0]).ok)
        let held = try q.control("hold", all: true)
        #expect(held.ok && held.text == "held 4 messages")   // the one already held stays as it is
        #expect(try q.control("list").messages.allSatisfy(\.held))
        let released = try q.control("release", all: true)
        #expect(released.ok && released.text == "released 5 messages")
        #expect(try q.control("list").messages.allSatisfy { !$0.held })
        let deleted = try q.control("delete", all: true)
        #expect(deleted.ok && deleted.text == "deleted 5 messages")
        #expect(try q.control("list").messages.isEmpty)
        // After a restart too: the deletions were committed before DONE.
        q.stop()
        try q.start()
        #expect(try q.control("list").messages.isEmpty)
        let none = try q.control("delete", all: true)
        #expect(none.ok && none.text == "deleted 0 messages")
    }

    @Test func expiryBouncesWith447() throws {
        let q = try TestQueue { $0.queue.maximalQueueLifetime = 3600; $0.queue.minimalBackoffTime = 300 }
        let id = try q.inject(from: "sender@localhost", to: ["alice@localhost"])
        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        try TestQueue.report(stage, job, "deferred", dsn: "4.4.1", text: "connection refused")
        _ = try q.eventually("deferred") { $0.messages.first?.rcpts.first?.attempts == 1 }
        q.clock.advance(3600)
        let retry = try TestQueue.receiveJob(stage)
        #expect(retry.queueID == id && retry.attempt == 2)
        try TestQueue.report(stage, retry, "deferred", dsn: "4.4.1", text: "connection refused")
        let bounce = try TestQueue.receiveJob(stage)
        #expect(bounce.sender == "" && bounce.recipients.map(\.address) == ["sender@localhost"])
        let text = String(decoding: bounce.body, as: UTF8.self)
        #expect(text.contains("4.4.7") && text.contains("message expired: connection refused"))
        stage.close()
    }

    /// A message expires when an attempt fails past its lifetime, not
    /// before its attempt: with a lifetime of 0 ("no retries") a restart or
    /// a stage not yet connected must not return mail never tried. Only a
    /// transport without a stage for a whole maintenance interval counts
    /// as a failed attempt.
    @Test func expiryWaitsForAnAttemptOrAStagelessInterval() throws {
        let q = try TestQueue { $0.queue.maximalQueueLifetime = 0; $0.queue.queueRunDelay = 300 }
        let tried = try q.inject(from: "sender@localhost", to: ["alice@localhost"])
        q.service?.runMaintenance()
        #expect(try q.control("list").messages.map(\.id) == [tried])
        q.stop()
        try q.start()
        q.service?.runMaintenance()
        #expect(try q.control("list").messages.map(\.id) == [tried])
        let stage = try q.deliverer()
        let job = try TestQueue.receiveJob(stage)
        #expect(job.queueID == tried)
        try TestQueue.report(stage, job, "deferred", dsn: "4.4.1", text: "connection refused")
        let bounce = try TestQueue.receiveJob(stage)
        #expect(bounce.sender == "" && String(decoding: bounce.body, as: UTF8.self).contains("4.4.7"))
        try TestQueue.report(stage, bounce, "sent", dsn: "2.0.0", text: "ok")
        _ = try q.eventually("the first message and its bounce gone") { $0.messages.isEmpty }
        stage.close()

        // No local stage for a whole interval: the wait is the failure.
        let waited = try q.inject(from: "sender@localhost", to: ["bob@localhost"])
        _ = try q.eventually("the stage gone") { _ in q.service?.statistics().localStages == 0 }
        q.service?.runMaintenance()
        #expect(try q.control("list").messages.map(\.id) == [waited])
        q.clock.advance(300)
        q.service?.runMaintenance()
        _ = try q.eventually("a bounce instead of the message") { listing in
            listing.messages.count == 1 && listing.messages[0].id != waited && listing.messages[0].sender == ""
        }
    }

    @Test func delayNoticeOnce() throws {
        let q = try TestQueue { $0.queue.delayWarningTime = 4 * 3600; $0.queue.maximalBackoffTime = 100_000 }
        let id = try q.inject(from: "sender@localhost", to: ["alice@example.net"])
        // remote-deliver is not connected: suspended; after 4 hours, a notice.
        _ = try q.eventually("suspended") { $0.messages.first?.rcpts.first?.state == "deferred" }
        q.clock.advance(4 * 3600)
        q.service?.runMaintenance()
        let listing = try q.eventually("delay notice") { $0.messages.count == 2 }
        let notice = try #require(listing.messages.first { $0.id != id })
        #expect(notice.sender == "" && notice.rcpts.map(\.address) == ["sender@localhost"])
        let shown = try q.control("show", notice.id)
        #expect(String(decoding: shown.body, as: UTF8.self).contains("Action: delayed"))
        q.clock.advance(3600)
        q.service?.runMaintenance()
        #expect(try q.control("list").messages.count == 2)
    }

    @Test func fullSpoolRefusesWith452() throws {
        let q = try TestQueue { $0.queue.mapSize = 1 << 20; $0.queue.mapSizeLimit = 1 << 20 }
        let c = try q.injector()
        try q.sendMessage(c, from: "s@example.org", to: ["a@localhost"],
                          body: String(repeating: "0123456789abcdef\r\n", count: 200_000))
        let reply = try #require(try c.receive())
        #expect(try refusal(reply) == "452 4.3.1")
        c.close()
        // What is queued stays queued, and small mail still goes in.
        try q.inject(to: ["a@localhost"])
        #expect(try q.control("list").messages.count == 1)
    }

    @Test func peerUIDAndEnvelopeAreRecorded() throws {
        let q = try TestQueue()
        let c = try q.injector()
        try c.send(Frame(.mail, ["sender": .text("s@example.org"), "ret": .text("HDRS"), "envid": .text("env-1"),
                                 "client-address": .text("192.0.2.1"), "client-name": .text("client.example"),
                                 "helo": .text("client.example"), "protocol": .text("ESMTPS")]))
        try c.send(Frame(.rcpt, ["address": .text("a@localhost"), "notify": .text("SUCCESS,FAILURE"),
                                 "orcpt": .text("rfc822;a@localhost")]))
        try c.send(Frame(.body, ["data": .bytes(Array("Subject: x\r\n\r\nx\r\n".utf8))]))
        try c.send(Frame(.end))
        let reply = try #require(try c.receive())
        let id = try #require(QueueID(rawValue: try reply.text("queue-id")))
        c.close()
        q.stop()
        let spool = try Spool(directory: q.config.spoolDirectory, options: SpoolOptions(mapSize: 8 << 20, mapSizeLimit: 64 << 20))
        defer { spool.close() }
        let env = try #require(try spool.envelope(id))
        #expect(env.peerUID == getuid())
        #expect(env.ret == "HDRS" && env.envid == "env-1" && env.clientAddress == "192.0.2.1" && env.protocolName == "ESMTPS")
        #expect(env.size == 17 && env.arrival == q.clock.now && env.kind == .normal)
        #expect(env.recipients.first?.notify == "SUCCESS,FAILURE" && env.recipients.first?.orcpt == "rfc822;a@localhost")
        var body: [UInt8] = []
        try spool.readBody(id) { body += $0 }
        #expect(body == Array("Subject: x\r\n\r\nx\r\n".utf8))
    }
}
