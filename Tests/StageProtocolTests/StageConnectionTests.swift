import CSystemShims
import Foundation
import Synchronization
import Testing
@testable import StageProtocol

/// Runs `body` on a real thread (blocking socket I/O must not sit on the
/// cooperative pool) and gives back its result on `join()`.
final class PeerThread<T: Sendable>: Sendable {
    private let result = Mutex<Result<T, any Error>?>(nil)
    private let done = DispatchSemaphore(value: 0)

    init(_ body: @escaping @Sendable () throws -> T) {
        let thread = Thread { [self] in
            let r = Result { try body() }
            result.withLock { $0 = r }
            done.signal()
        }
        thread.start()
    }

    func join() throws -> T {
        done.wait()
        return try result.withLock { $0! }.get()
    }
}

func socketPair() throws -> (Int32, Int32) {
    var fds: [Int32] = [-1, -1]
    guard sealpost_socketpair_cloexec(&fds) == 0 else { throw StageIOError("socketpair", code: errno) }
    return (fds[0], fds[1])
}

func pipePair() throws -> (read: Int32, write: Int32) {
    var fds: [Int32] = [-1, -1]
    guard sealpost_pipe_cloexec(&fds) == 0 else { throw StageIOError("pipe", code: errno) }
    return (fds[0], fds[1])
}

/// A schema with descriptor-carrying frames, as the future TLS channel will
/// have: version 1 defines none.
let fdSchema = ProtocolSchema(
    name: "fdtest",
    clientToServer: [
        .body: FrameRule([AttributeRule("socket", .fd, required: true), AttributeRule("extra", .fd),
                          AttributeRule("note", .text)]),
        .end: FrameRule([]),
    ],
    serverToClient: [:])

func fdConnections() throws -> (client: StageConnection, server: StageConnection) {
    let (a, b) = try socketPair()
    let client = StageConnection(fd: a, decoder: FrameDecoder(schema: fdSchema, direction: .serverToClient, afterHello: true))
    let server = StageConnection(fd: b, decoder: FrameDecoder(schema: fdSchema, direction: .clientToServer, afterHello: true))
    return (client, server)
}

func writeAll(_ fd: Int32, _ s: String) {
    let bytes = Array(s.utf8)
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}

func readSome(_ fd: Int32) -> String {
    var buf = [UInt8](repeating: 0, count: 256)
    let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    return n > 0 ? String(decoding: buf[0..<n], as: UTF8.self) : ""
}

@Suite struct DescriptorPassing {
    @Test func passAPipeWriteEnd() throws {
        let (client, server) = try fdConnections()
        let pipe = try pipePair()
        defer { close(pipe.read) }
        try client.send(Frame(.body, ["note": .text("here"), "socket": .fd(pipe.write)]))
        close(pipe.write)   // the sender keeps its own copy; drop it
        let frame = try #require(try server.receive())
        let passed = try frame.fd("socket")
        #expect(passed >= 0)
        #expect(try frame.text("note") == "here")
        // The received descriptor is close-on-exec (MSG_CMSG_CLOEXEC).
        #expect(fcntl(passed, F_GETFD) & FD_CLOEXEC != 0)
        writeAll(passed, "through the passed descriptor")
        close(passed)
        #expect(readSome(pipe.read) == "through the passed descriptor")
        // Every copy of the write end is closed: EOF.
        #expect(readSome(pipe.read) == "")
    }

    @Test func severalDescriptorsAndFramesInOneRead() throws {
        let (client, server) = try fdConnections()
        let p1 = try pipePair(), p2 = try pipePair(), p3 = try pipePair()
        defer { for fd in [p1.read, p2.read, p3.read] { close(fd) } }
        // Sent before the receiver reads: the reads may merge frames; the
        // descriptors must still go to the right frames, in order.
        try client.send(Frame(.body, ["socket": .fd(p1.write), "extra": .fd(p2.write)]))
        try client.send(Frame(.end))
        try client.send(Frame(.body, ["socket": .fd(p3.write)]))
        for fd in [p1.write, p2.write, p3.write] { close(fd) }

        let f1 = try #require(try server.receive())
        let f2 = try #require(try server.receive())
        let f3 = try #require(try server.receive())
        #expect(f2 == Frame(.end))
        for (frame, name, pipe, text) in [(f1, "socket", p1, "one"), (f1, "extra", p2, "two"), (f3, "socket", p3, "three")] {
            let fd = try frame.fd(name)
            writeAll(fd, text)
            close(fd)
            #expect(readSome(pipe.read) == text)
        }
        client.close()
        #expect(try server.receive() == nil)
    }

    @Test func descriptorWithoutAnFdAttributeIsAnError() throws {
        let (client, server) = try fdConnections()
        let pipe = try pipePair()
        // pipe.write is closed below, once: a second close in the defer
        // would close whatever number a concurrent test got meanwhile.
        defer { close(pipe.read) }
        // END with a descriptor attached, by hand.
        let bytes = FrameEncoder.encode(Frame(.end))
        var fds = [pipe.write]
        let n = bytes.withUnsafeBytes { sealpost_sendmsg_fds(client.fileDescriptor, $0.baseAddress, $0.count, &fds, 1) }
        #expect(n == bytes.count)
        #expect(throws: ProtocolError("1 descriptor(s) arrived with no fd attribute to take them")) { try server.receive() }
        // The stray descriptor was closed by the receiver: only our copy of
        // the write end is left, so closing it gives EOF on the read end.
        close(pipe.write)
        #expect(readSome(pipe.read) == "")
        _ = client
    }

    @Test func fdAttributeWithoutADescriptorIsAnError() throws {
        let (client, server) = try fdConnections()
        let bytes = FrameEncoder.encode(Frame(.body, ["socket": .fd(0)]))
        let n = bytes.withUnsafeBytes { write(client.fileDescriptor, $0.baseAddress, $0.count) }
        #expect(n == bytes.count)
        #expect(throws: ProtocolError("BODY: 1 fd attribute(s) but 0 descriptor(s) received with the frame")) { try server.receive() }
    }

    @Test func tooManyDescriptorsAreRefusedBeforeSending() throws {
        let schema = ProtocolSchema(name: "many", clientToServer: [.body: FrameRule((0..<20).map { AttributeRule("f\($0)", .fd) })],
                                    serverToClient: [:])
        let (a, b) = try socketPair()
        defer { close(b) }
        let c = StageConnection(fd: a, decoder: FrameDecoder(schema: schema, direction: .serverToClient, afterHello: true))
        let frame = Frame(.body, attributes: (0..<17).map { ("f\($0)", .fd(0)) })
        #expect(throws: ProtocolError("BODY: 17 descriptors exceed the limit of 16 per frame")) { try c.send(frame) }
    }
}

@Suite struct Connections {
    /// A tiny inject server on a thread: HELLO, then transactions.
    static func injectServer(_ fd: Int32) -> PeerThread<[Frame]> {
        PeerThread {
            let c = StageConnection(adopting: fd, protocol: .inject, direction: .clientToServer)
            var seen: [Frame] = []
            guard let hello = try c.receive() else { return seen }
            seen.append(hello)
            try c.send(Frame(.hello, ["protocol": .text("inject"), "version": .uint(1)]))
            var body: [UInt8] = []
            while let f = try c.receive() {
                seen.append(f)
                switch f.type {
                case .body: body += try f.bytes("data")
                case .end:
                    try c.send(Frame(.accepted, ["queue-id": .text("Q\(body.count)")]))
                    body = []
                default: break
                }
            }
            c.close()
            return seen
        }
    }

    @Test func injectionOverASocketPair() throws {
        let (a, b) = try socketPair()
        let server = Self.injectServer(b)
        let client = StageConnection(adopting: a, protocol: .inject, direction: .serverToClient)
        let hello = try client.clientHello(.inject, extra: [("software", .text("test 1"))])
        #expect(try hello.text("protocol") == "inject")
        // A message bigger than the socket buffer: the writes must complete
        // while the other thread reads.
        let message = [UInt8]((0..<1_000_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        var sent: [Frame] = [Frame(.mail, ["sender": .text("a@example.org")]), Frame(.rcpt, ["address": .text("b@example.org")])]
        var offset = 0
        while offset < message.count {
            let end = min(message.count, offset + 65_536)
            sent.append(Frame(.body, ["data": .bytes(Array(message[offset..<end]))]))
            offset = end
        }
        sent.append(Frame(.end))
        for f in sent { try client.send(f) }
        let reply = try #require(try client.receive())
        #expect(reply == Frame(.accepted, ["queue-id": .text("Q1000000")]))
        client.close()
        let seen = try server.join()
        #expect(seen.count == sent.count + 1)
        #expect(Array(seen.dropFirst()) == sent)
        #expect(try seen[0].text("software") == "test 1")
    }

    @Test func clientHelloAnsweredWithError() throws {
        let (a, b) = try socketPair()
        let server = PeerThread {
            let c = StageConnection(adopting: b, protocol: .control, direction: .clientToServer)
            _ = try c.receive()
            try c.send(Frame(.error, ["status": .text("4.3.2"), "text": .text("queue is shutting down")]))
            c.close()
        }
        let client = StageConnection(adopting: a, protocol: .control, direction: .serverToClient)
        #expect(throws: PeerError(status: "4.3.2", text: "queue is shutting down")) { try client.clientHello(.control) }
        try server.join()
    }

    /// A server that refuses at accept writes its ERROR and closes before
    /// the client's HELLO is written: the HELLO meets a closed socket
    /// (EPIPE), and the client still reports the server's reason.
    @Test func clientHelloRefusedBeforeItIsSent() throws {
        let (a, b) = try socketPair()
        let server = StageConnection(adopting: b, protocol: .inject, direction: .clientToServer)
        try server.send(Frame(.error, ["status": .text("4.3.2"), "text": .text("too many inject connections")]))
        server.close()
        let client = StageConnection(adopting: a, protocol: .inject, direction: .serverToClient)
        #expect(throws: PeerError(status: "4.3.2", text: "too many inject connections")) { try client.clientHello(.inject) }
        // Closed without a word: the send's own error.
        let (c, d) = try socketPair()
        _ = Glibc.close(d)
        let silent = StageConnection(adopting: c, protocol: .inject, direction: .serverToClient)
        #expect(throws: StageIOError("send", code: EPIPE)) { try silent.clientHello(.inject) }
    }

    @Test func clientHelloWithAnotherVersion() throws {
        let (a, b) = try socketPair()
        let server = PeerThread {
            let c = StageConnection(adopting: b, protocol: .control, direction: .clientToServer)
            _ = try c.receive()
            try c.send(Frame(.hello, ["protocol": .text("control"), "version": .uint(2)]))
            c.close()
        }
        let client = StageConnection(adopting: a, protocol: .control, direction: .serverToClient)
        #expect(throws: ProtocolError("HELLO: attribute \"version\": the server speaks version 2, this client 1")) {
            try client.clientHello(.control)
        }
        try server.join()
    }

    @Test func eofBetweenFramesAndInsideAFrame() throws {
        let (a, b) = try socketPair()
        let server = StageConnection(adopting: b, protocol: .inject, direction: .clientToServer)
        let hello = FrameEncoder.encode(Conversations.hello(.inject))
        let end = FrameEncoder.encode(Frame(.end))
        let bytes = hello + end.prefix(3)
        #expect(bytes.withUnsafeBytes { write(a, $0.baseAddress, $0.count) } == bytes.count)
        close(a)
        #expect(try server.receive()?.type == .hello)
        #expect(throws: ProtocolError("connection closed in the middle of a frame (3 bytes of it received)")) { try server.receive() }

        let (c, d) = try socketPair()
        let s2 = StageConnection(adopting: d, protocol: .inject, direction: .clientToServer)
        #expect(hello.withUnsafeBytes { write(c, $0.baseAddress, $0.count) } == hello.count)
        close(c)
        #expect(try s2.receive()?.type == .hello)
        #expect(try s2.receive() == nil)
    }

    @Test func invalidFramesAreNotSent() throws {
        let (a, b) = try socketPair()
        let client = StageConnection(adopting: a, protocol: .inject, direction: .serverToClient)
        let server = StageConnection(adopting: b, protocol: .inject, direction: .clientToServer)
        #expect(throws: ProtocolError("MAIL: not allowed before HELLO (only HELLO and ERROR are)")) {
            try StageConnection(adopting: dup(a), protocol: .inject, direction: .serverToClient).send(Frame(.mail, ["sender": .text("")]))
        }
        try client.clientHelloRequestOnly()
        #expect(throws: ProtocolError("MAIL: attribute \"sender\": text contains LF")) {
            try client.send(Frame(.mail, ["sender": .text("a\nb")]))
        }
        #expect(throws: ProtocolError("MAIL: required attribute \"sender\" is missing")) { try client.send(Frame(.mail)) }
        #expect(throws: ProtocolError("ACCEPTED: not allowed in protocol inject from client to server")) {
            try client.send(Frame(.accepted, ["queue-id": .text("X")]))
        }
        try client.send(Frame(.abort))
        client.close()
        // Only the valid frames arrived.
        #expect(try server.receive()?.type == .hello)
        #expect(try server.receive() == Frame(.abort))
        #expect(try server.receive() == nil)
    }

    @Test func connectByPath() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/control"
        #expect(throws: StageIOError("connect to \(path)", code: ENOENT)) { try StageConnection.connect(path: path) }
        let listener = sealpost_unix_listen(path, 4)
        #expect(listener >= 0)
        defer { close(listener) }
        let server = PeerThread {
            let fd = sealpost_accept_cloexec(listener)
            let c = StageConnection(adopting: fd, protocol: .control, direction: .clientToServer)
            let hello = try #require(try c.receive())
            try c.send(Frame(.hello, ["protocol": .text("control"), "version": .uint(1), "software": .text("fake queue")]))
            let request = try #require(try c.receive())
            try c.send(Frame(.done, ["ok": .bool(true), "text": .text("verb \(try request.text("verb"))")]))
            return try hello.text("protocol")
        }
        let client = try StageConnection.connect(path: path)
        let hello = try client.clientHello(.control)
        #expect(try hello.text("software") == "fake queue")
        #expect(client.protocolName == .control)
        try client.send(Frame(.request, ["verb": .text("stats")]))
        #expect(try client.receive() == Frame(.done, ["ok": .bool(true), "text": .text("verb stats")]))
        #expect(try server.join() == "control")
        // The listener's uid (SO_PEERCRED), for a client that must know who
        // serves the socket: the connection is made before any frame.
        let checked = try StageConnection.connect(path: path)
        try checked.requireServer(uids: [getuid()], name: "the test listener")
        try checked.requireServer(uids: nil, name: "the test listener")
        #expect(throws: ProtocolError("the test listener listens as uid \(getuid()), not as \(getuid() &+ 1): refused")) {
            try checked.requireServer(uids: [getuid() &+ 1], name: "the test listener")
        }
        checked.close()
        let long = "/" + String(repeating: "x", count: 200)
        #expect(throws: StageIOError("connect to \(long)", code: ENAMETOOLONG)) { try StageConnection.connect(path: long) }
        #expect(StageIOError("connect to /x", code: ENOENT).description == "connect to /x: No such file or directory")
    }
}

/// A client with a timeout gives up on a stage that is alive but does not
/// answer, instead of waiting forever (queue-inject from cron against a
/// stopped queue): the connect when the backlog is full, and a receive.
@Suite struct ConnectionTimeouts {
    @Test func silentPeerAndFullBacklog() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/inject"
        // A listener that never accepts: connections wait in its backlog,
        // where the kernel already lets them write, and nothing answers.
        let listener = sealpost_unix_listen(path, 1)
        #expect(listener >= 0)
        defer { close(listener) }
        let first = try StageConnection.connect(path: path, timeout: 0.05)
        try first.send(Frame(.hello, ["protocol": .text("inject"), "version": .uint(1)]))
        #expect(throws: StageIOError("receive", code: ETIMEDOUT)) { try first.receive() }
        // The backlog fills; the connect that finds no room gives up.
        var refused: StageIOError?
        var held: [StageConnection] = [first]
        for _ in 0..<16 where refused == nil {
            do {
                held.append(try StageConnection.connect(path: path, timeout: 0.05))
            } catch let error as StageIOError {
                refused = error
            }
        }
        #expect(refused == StageIOError("connect to \(path)", code: EAGAIN))
        #expect(held.count >= 2)
    }
}

extension StageConnection {
    /// Sends a client HELLO without waiting for the answer (tests only).
    func clientHelloRequestOnly() throws {
        try send(Frame(.hello, ["protocol": .text("inject"), "version": .uint(1)]))
    }
}
