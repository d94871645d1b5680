// The deliver protocol end to end: a fake queue on a real Unix socket
// (StageConnection on the queue's side) sends jobs to QueueClient, which
// delivers them to a loopback sink and answers with RESULT and JOB-DONE.

import Testing
import CSystemShims
import StageProtocol
@testable import RemoteDelivery
#if canImport(Glibc)
import Glibc
#endif

/// The queue's listening deliver socket.
final class FakeQueue: Sendable {
    let fd: Int32
    let path: String

    init() throws {
        var template = Array("/tmp/sealpost-remote-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        path = dir + "/deliver"
        fd = sealpost_unix_listen(path, 8)
        if fd < 0 { throw SinkError("listen on \(path): \(String(cString: strerror(errno)))") }
    }

    deinit {
        close(fd)
        unlink(path)
        rmdir(String(path.dropLast("/deliver".count)))
    }

    /// The next connection, server side. The poll bound keeps a broken
    /// client from hanging the run.
    func accept() throws -> StageConnection {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 60_000) == 1 else { throw SinkError("no connection within 60 s") }
        let c = sealpost_accept_cloexec(fd)
        if c < 0 { throw SinkError("accept: \(String(cString: strerror(errno)))") }
        return StageConnection(adopting: c, protocol: .deliver, direction: .clientToServer)
    }
}

private func sendJob(_ c: StageConnection, job: UInt64, recipients: [String], body: [String], nexthop: String) throws {
    try c.send(Frame(.job, attributes: [
        ("job", .uint(job)), ("queue-id", .text("0A1B2C3D4E5F")), ("sender", .text("s@origin.test")),
        ("arrival", .uint(UInt64(time(nil)))), ("size", .uint(UInt64(body.joined().utf8.count))),
        ("attempt", .uint(1)), ("nexthop", .text(nexthop)), ("body-type", .text("8BITMIME")),
    ]))
    for (i, r) in recipients.enumerated() {
        try c.send(Frame(.jobRcpt, attributes: [("index", .uint(UInt64(i))), ("address", .text(r)), ("notify", .text("FAILURE,DELAY"))]))
    }
    for piece in body { try c.send(Frame(.body, ["data": .bytes(Array(piece.utf8))])) }
    try c.send(Frame(.jobEnd, ["job": .uint(job)]))
}

/// Frames up to and including JOB-DONE of one job.
private func receiveUntilDone(_ c: StageConnection) throws -> (results: [UInt64: Frame], done: UInt64) {
    var results: [UInt64: Frame] = [:]
    while true {
        guard let frame = try c.receive() else { throw SinkError("client closed the connection") }
        switch frame.type {
        case .result: results[try frame.uint("index")] = frame
        case .jobDone: return (results, try frame.uint("job"))
        default: throw SinkError("unexpected \(frame.type.name)")
        }
    }
}

/// A fake queue, and a started QueueClient whose agent sends dest.test's
/// mail to `sink`.
private func startClient(deliveringTo sink: TestSink) throws -> (FakeQueue, AgentFixture, QueueClient) {
    let queue = try FakeQueue()
    let table = TransportTable(entries: [TransportEntry(key: "dest.test", nextHop: .host("127.0.0.1", port: sink.port))])
    let f = AgentFixture(transports: table)
    let client = QueueClient(socketPath: queue.path, agent: f.agent)
    client.start()
    return (queue, f, client)
}

@Suite struct QueueProtocolTests {
    @Test func jobsInResultsOut() async throws {
        var script = SinkScript()
        script.rcpt = { $0.hasPrefix("unknown") ? "550 5.1.1 <\($0)>: User unknown" : "250 2.1.5 Ok" }
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let (queue, f, client) = try startClient(deliveringTo: sink)

        let (hello, first, second) = try await onThread { () throws -> (Frame, (results: [UInt64: Frame], done: UInt64), (results: [UInt64: Frame], done: UInt64)) in
            let c = try queue.accept()
            defer { c.close() }
            guard let hello = try c.receive() else { throw SinkError("no HELLO") }
            try c.send(Frame(.hello, ["protocol": .text("deliver"), "version": .uint(1)]))
            try sendJob(c, job: 7, recipients: ["a@dest.test", "unknown@dest.test"],
                        body: ["Subject: x\r\n\r\n", ".dot\r\n"], nexthop: "dest.test")
            let first = try receiveUntilDone(c)
            try sendJob(c, job: 8, recipients: ["b@dest.test"], body: ["Subject: y\r\n\r\nbody\r\n"], nexthop: "dest.test")
            let second = try receiveUntilDone(c)
            return (hello, first, second)
        }
        try await client.stop().get()
        await f.shutdown()

        #expect(try hello.text("protocol") == "deliver")
        #expect(try hello.text("transport") == "remote")
        #expect(try hello.uint("max-jobs") == 100)

        #expect(first.done == 7)
        #expect(first.results.count == 2)
        let sent = try #require(first.results[0])
        #expect(try sent.uint("job") == 7)
        #expect(try sent.text("status") == "sent")
        #expect(try sent.text("dsn") == "2.0.0")
        #expect(try sent.text("relay") == "127.0.0.1[127.0.0.1]:\(sink.port)")
        let bounced = try #require(first.results[1])
        #expect(try bounced.text("status") == "bounced")
        #expect(try bounced.text("dsn") == "5.1.1")
        #expect(try bounced.text("remote-mta") == "127.0.0.1")
        #expect(try bounced.text("diagnostic") == "550 5.1.1 <unknown@dest.test>: User unknown")

        #expect(second.done == 8)
        #expect(try second.results[0]?.text("status") == "sent")

        #expect(sink.messages.count == 2)
        #expect(sink.messages.first.map { String(decoding: $0.raw, as: UTF8.self) } == "Subject: x\r\n\r\n..dot\r\n.\r\n")
        // NOTIFY went out (the sink offers DSN), BODY=8BITMIME too.
        #expect(sink.commands.contains("RCPT TO:<a@dest.test> NOTIFY=FAILURE,DELAY"))
        #expect(sink.commands.contains { $0.hasPrefix("MAIL FROM:<s@origin.test>") && $0.contains("BODY=8BITMIME") })
    }

    /// The queue goes away while a job's transaction is under way: it has
    /// taken the job back and will hand it out again, so the message must
    /// not go out now. The transaction stops before the end of data (the
    /// sink gets MAIL, RCPT and DATA, then the connection closes without
    /// the final dot; the sink keeps no message).
    @Test func aJobWhoseQueueConnectionClosedSendsNoEndOfData() async throws {
        var script = SinkScript()
        script.greetingDrip = 100_000   // the greeting takes about 2 s
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let (queue, f, client) = try startClient(deliveringTo: sink)
        try await onThread {
            let c = try queue.accept()
            guard let hello = try c.receive(), hello.type == .hello else { throw SinkError("no HELLO") }
            try c.send(Frame(.hello, ["protocol": .text("deliver"), "version": .uint(1)]))
            try sendJob(c, job: 1, recipients: ["a@dest.test"], body: ["Subject: x\r\n\r\nbody\r\n"], nexthop: "dest.test")
            // The sink is still greeting: the transaction has begun.
            while sink.connections == 0 { usleep(10_000) }
            c.close()   // a queue restart
        }
        // Until the job's result is logged (bounded: the phase timeouts
        // are capped at 30 s). Not until the sink sees the connection
        // close: this test process starts DNS servers for other tests, and
        // NIO's sockets are not close-on-exec, so a server started
        // meanwhile can hold the client's socket open. An end of data, had
        // it been sent, reached the sink before its reply, and so before
        // the result.
        let line = "0A1B2C3D4E5F: to=<a@dest.test>"
        for _ in 0..<12_000 where !f.logs.all.contains(where: { $0.hasPrefix(line) }) {
            try await Task.sleep(for: .milliseconds(10))
        }
        try await client.stop().get()
        await f.shutdown()
        #expect(sink.commands.contains("DATA"), "\(sink.commands)")
        #expect(sink.messages.isEmpty)
        #expect(f.logs.all.contains { $0.hasPrefix(line) && $0.contains("status=deferred (not delivered: the queue's connection closed") },
                "\(f.logs.all)")
    }

    @Test func reconnectsAfterTheQueueGoesAway() async throws {
        let queue = try FakeQueue()
        let f = AgentFixture()
        let client = QueueClient(socketPath: queue.path, agent: f.agent)
        client.start()
        let hellos = try await onThread { () throws -> Int in
            var count = 0
            for _ in 0..<2 {
                let c = try queue.accept()
                guard let hello = try c.receive(), hello.type == .hello else { throw SinkError("no HELLO") }
                try c.send(Frame(.hello, ["protocol": .text("deliver"), "version": .uint(1)]))
                count += 1
                c.close()   // a queue restart
            }
            return count
        }
        try await client.stop().get()
        await f.shutdown()
        #expect(hellos == 2)
    }

    @Test func protocolViolationIsAnsweredWithError() async throws {
        let queue = try FakeQueue()
        let f = AgentFixture()
        let client = QueueClient(socketPath: queue.path, agent: f.agent)
        client.start()
        let reply = try await onThread { () throws -> Frame? in
            let c = try queue.accept()
            defer { c.close() }
            _ = try c.receive()
            try c.send(Frame(.hello, ["protocol": .text("deliver"), "version": .uint(1)]))
            // JOB-RCPT outside a job.
            try c.send(Frame(.jobRcpt, ["index": .uint(0), "address": .text("a@dest.test")]))
            return try c.receive()
        }
        try await client.stop().get()
        await f.shutdown()
        let error = try #require(reply)
        #expect(error.type == .error)
        #expect(try error.text("text").contains("JOB-RCPT outside a job"))
    }
}
