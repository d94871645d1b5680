// Real peers for the SMTP server under test:
// - FakeQueue: the queue's side of the inject protocol on a temporary Unix
//   socket, one thread per connection, StageConnection framing (real
//   socket, real frames), answering ACCEPTED or REFUSED as told;
// - SMTPTestClient: a blocking TCP client that writes raw bytes and reads
//   whole replies;
// - Harness: an SMTPServer on 127.0.0.1, port 0, in this process.

import CSystemShims
import Foundation
import Logging
import NIOCore
import NIOPosix
import SMTP
@testable import SMTPService
import StageProtocol
import StageRuntime
import Synchronization
import Testing

// MARK: - Fake queue

/// One message as the queue received it.
struct InjectedMessage: Sendable {
    var mail: Frame
    var rcpts: [Frame]
    var body: [UInt8]
    var text: String { String(decoding: body, as: UTF8.self) }
    var sender: String { (try? mail.text("sender")) ?? "?" }
    var recipients: [String] { rcpts.map { (try? $0.text("address")) ?? "?" } }
}

@dynamicMemberLookup
final class FakeQueue: Sendable {
    enum Answer: Sendable {
        case accept
        case refuse(code: UInt64, status: String, text: String)
        /// Close the connection instead of answering END.
        case hangUp
    }

    let path: String
    private let directory: String
    private let listenFD: Int32
    private let state = Mutex(State())

    struct Knobs {
        var answer: Answer = .accept
        /// While true, a connection that got its MAIL stops reading.
        var stallBodies = false
        /// While true, MAIL with announce-id gets no QUEUE-ID (a broken queue).
        var withholdID = false
        /// While true, a connection that gets a second MAIL is closed
        /// instead (as by a queue restarting while smtp-listen holds it idle).
        var hangUpOnSecondMail = false
        /// How long QUEUE-ID takes (a busy queue): the client's body arrives first.
        var idDelayMicroseconds: UInt32 = 0
        /// As the queue does: IDs reserved for a client whose HELLO asks
        /// (`next-queue-id`, PROTOCOL.md 4.2). False: a queue that does
        /// not, so smtp-listen asks with announce-id.
        var reserveIDs = true
        /// A strict queue from before reservations: a HELLO with
        /// reserve-ids gets ERROR (an attribute it does not know).
        var refuseReservations = false
        /// How long `.hangUp` waits after END before it closes.
        var hangUpDelayMicroseconds: UInt32 = 0
        /// ACCEPTED names an ID other than the message's (a broken queue).
        var wrongAcceptedID = false
    }

    struct State {
        var knobs = Knobs()
        var accepted: [InjectedMessage] = []
        var refused: [InjectedMessage] = []
        var connections = 0
        /// MAIL frames received, stalled or not.
        var mails = 0
        var aborted = 0
        var incomplete = 0
        /// Connections the client closed between transactions.
        var closedIdle = 0
        var protocolErrors: [String] = []
        var nextID = 0x10000
        var stopped = false
    }

    init(answer: Answer = .accept) throws {
        let dir = NSTemporaryDirectory() + "smtpsvc-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        directory = dir
        path = dir + "/inject"
        listenFD = sealpost_unix_listen(path, 64)
        guard listenFD >= 0 else { throw StageIOError("listen \(path)", code: errno) }
        state.withLock { $0.knobs.answer = answer }
        let fd = listenFD
        Thread { [self] in acceptLoop(fd) }.start()
    }

    /// How the queue behaves (`q.stallBodies = true`, ...): see `Knobs`.
    subscript<T: Sendable>(dynamicMember knob: WritableKeyPath<Knobs, T>) -> T {
        get { state.withLock { $0.knobs[keyPath: knob] } }
        set { state.withLock { $0.knobs[keyPath: knob] = newValue } }
    }
    var accepted: [InjectedMessage] { state.withLock { $0.accepted } }
    var refused: [InjectedMessage] { state.withLock { $0.refused } }
    var connections: Int { state.withLock { $0.connections } }
    var mails: Int { state.withLock { $0.mails } }
    var aborted: Int { state.withLock { $0.aborted } }
    var closedIdle: Int { state.withLock { $0.closedIdle } }
    var protocolErrors: [String] { state.withLock { $0.protocolErrors } }

    func stop() {
        state.withLock { $0.stopped = true }
        shutdown(listenFD, Int32(SHUT_RDWR))
        unlink(path)
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func acceptLoop(_ fd: Int32) {
        while true {
            let c = sealpost_accept_cloexec(fd)
            if c < 0 {
                if state.withLock({ $0.stopped }) { close(fd); return }
                if errno == EINTR { continue }
                close(fd)
                return
            }
            state.withLock { $0.connections += 1 }
            Thread { [self] in serve(c) }.start()
        }
    }

    private func nextQueueID() -> String {
        state.withLock { s -> String in
            s.nextID += 1
            return String(format: "%012X", s.nextID)
        }
    }

    private func serve(_ fd: Int32) {
        let c = StageConnection(adopting: fd, protocol: .inject, direction: .clientToServer)
        defer { c.close() }
        do {
            guard let hello = try c.receive(), hello.type == .hello else { return }
            if hello["reserve-ids"] != nil, self.refuseReservations {
                try c.send(Frame(.error, ["status": .text("5.5.0"), "text": .text("HELLO: unknown attribute reserve-ids")]))
                return
            }
            let reserving = try hello.bool("reserve-ids", default: false) && self.reserveIDs
            var reserved: String?
            func reservation(_ frame: Frame) -> Frame {
                guard reserving else { return frame }
                var frame = frame
                let id = reserved ?? nextQueueID()
                reserved = id
                frame.set("next-queue-id", .text(id))
                return frame
            }
            try c.send(reservation(Frame(.hello, ["protocol": .text("inject"), "version": .uint(1)])))
            var mail: Frame?
            var mails = 0
            var announcedID: String?
            var rcpts: [Frame] = []
            var body: [UInt8] = []
            while true {
                while mail != nil && self.stallBodies { usleep(5_000) }
                guard let f = try c.receive() else {
                    state.withLock { if mail != nil { $0.incomplete += 1 } else { $0.closedIdle += 1 } }
                    return
                }
                switch f.type {
                case .mail:
                    guard mail == nil else { throw ProtocolError("MAIL inside a transaction") }
                    mails += 1
                    state.withLock { $0.mails += 1 }
                    if mails == 2, state.withLock({ $0.knobs.hangUpOnSecondMail }) { return }
                    mail = f; rcpts = []; body = []; announcedID = nil
                    if let named = try f.optionalText("queue-id") {
                        guard named == reserved else { throw ProtocolError("MAIL queue-id \(named) is not reserved") }
                        reserved = nil
                        announcedID = named
                    } else if try f.bool("announce-id", default: false) {
                        // As the queue does: the ID is drawn at MAIL.
                        let id = nextQueueID()
                        announcedID = id
                        if !state.withLock({ $0.knobs.withholdID }) {
                            let delay = state.withLock { $0.knobs.idDelayMicroseconds }
                            if delay > 0 { usleep(delay) }
                            try c.send(Frame(.queueID, ["queue-id": .text(id)]))
                        }
                    }
                case .rcpt:
                    guard mail != nil, body.isEmpty else { throw ProtocolError("RCPT out of place") }
                    rcpts.append(f)
                case .body:
                    guard mail != nil, !rcpts.isEmpty else { throw ProtocolError("BODY out of place") }
                    body += try f.bytes("data")
                case .abort:
                    guard mail != nil else { throw ProtocolError("ABORT without MAIL") }
                    state.withLock { $0.aborted += 1 }
                    mail = nil
                case .end:
                    guard let m = mail else { throw ProtocolError("END without MAIL") }
                    let message = InjectedMessage(mail: m, rcpts: rcpts, body: body)
                    mail = nil
                    switch self.answer {
                    case .accept:
                        let id = self.wrongAcceptedID ? "FFFFFFFFFFFF" : announcedID ?? nextQueueID()
                        state.withLock { $0.accepted.append(message) }
                        try c.send(reservation(Frame(.accepted, ["queue-id": .text(id)])))
                    case .refuse(let code, let status, let text):
                        state.withLock { $0.refused.append(message) }
                        try c.send(reservation(Frame(.refused, ["code": .uint(code), "status": .text(status), "text": .text(text)])))
                    case .hangUp:
                        let delay = state.withLock { $0.knobs.hangUpDelayMicroseconds }
                        if delay > 0 { usleep(delay) }
                        return
                    }
                default:
                    throw ProtocolError("unexpected \(f.type.name)")
                }
            }
        } catch is StageIOError {
            // The client may close at any moment (a vanished SMTP client);
            // a reset or a broken pipe is not a protocol violation.
        } catch {
            state.withLock { $0.protocolErrors.append("\(error)") }
        }
    }
}

// MARK: - Logs

final class LogCapture: Sendable {
    private let lines = Mutex<[String]>([])
    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [String] { lines.withLock { $0 } }
    func contains(_ text: String) -> Bool { all.contains { $0.contains(text) } }
    /// Whether a line containing `text` appears (within 10 s: lines such as
    /// "disconnect from" are written after the client already saw EOF).
    func eventually(_ text: String) -> Bool {
        becomesTrue { contains(text) }
    }
}

/// Whether `condition` becomes true, looked at every 10 ms for 10 s at
/// most: for what a peer does after the client saw its effect, or on its
/// own (the bound only keeps a broken build from hanging).
func becomesTrue(_ condition: () -> Bool) -> Bool {
    for _ in 0..<1000 {
        if condition() { return true }
        usleep(10_000)
    }
    return false
}

struct CapturingLogHandler: LogHandler {
    let capture: LogCapture
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        let prefix = event.level == .warning ? "warning: " : ""
        capture.append(prefix + event.message.description)
    }
}

// MARK: - Server harness

final class Harness: Sendable {
    let group: MultiThreadedEventLoopGroup
    let server: SMTPServer
    let queue: FakeQueue
    let logs = LogCapture()
    let port: Int
    let submissionPort: Int
    /// With a crypto-negotiate socket (`tlsSocket`) only.
    let smtpsPort: Int?

    /// `configure` adjusts the settings (limits, trusted networks...).
    init(queue: FakeQueue? = nil, injectPath: String? = nil, host: String = "127.0.0.1",
         configure: (inout SMTPServiceSettings) -> Void = { _ in }) throws {
        let q = try queue ?? FakeQueue()
        self.queue = q
        var settings = SMTPServiceSettings(hostname: "mx.example.test", injectSocket: injectPath ?? q.path,
                                           localDomains: ["example.test"])
        configure(&settings)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let capture = logs
        let logger = Logger(label: "smtp-listen") { _ in CapturingLogHandler(capture: capture) }
        server = SMTPServer(settings: settings, group: group, logger: logger)
        var specs = [
            ListenerSpec(kind: .smtp, source: .bind(ListenAddress(host: host, port: 0))),
            ListenerSpec(kind: .submission, source: .bind(ListenAddress(host: host, port: 0))),
        ]
        if settings.tlsSocket != nil {
            specs.append(ListenerSpec(kind: .smtps, source: .bind(ListenAddress(host: host, port: 0))))
        }
        let bound = try server.open(specs).wait()
        port = try #require(bound.first { $0.kind == .smtp }?.address?.port)
        submissionPort = try #require(bound.first { $0.kind == .submission }?.address?.port)
        smtpsPort = bound.first { $0.kind == .smtps }?.address?.port
        server.startAccepting()
    }

    func stop(sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(queue.protocolErrors.isEmpty, "the inject peer saw: \(queue.protocolErrors)", sourceLocation: sourceLocation)
        try? server.shutdown(grace: .seconds(5)).wait()
        try? group.syncShutdownGracefully()
        queue.stop()
    }

    func client(port: Int? = nil) throws -> SMTPTestClient {
        try SMTPTestClient(port: port ?? self.port)
    }
}

// MARK: - Client

struct SMTPReplyText: CustomStringConvertible {
    var code: Int
    var lines: [String]
    var last: String { lines.last ?? "" }
    var description: String { lines.joined(separator: "\n") }
}

final class SMTPTestClient {
    let fd: Int32
    private var buffer: [UInt8] = []
    private(set) var eof = false

    /// A client over IPv6 loopback.
    init(ipv6Port port: Int) throws {
        fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in6()
        addr.sin6_family = sa_family_t(AF_INET6)
        addr.sin6_port = in_port_t(UInt16(port).bigEndian)
        _ = inet_pton(AF_INET6, "::1", &addr.sin6_addr)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        }
        guard r == 0 else { throw StageIOError("connect [::1]:\(port)", code: errno) }
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard r == 0 else { throw StageIOError("connect 127.0.0.1:\(port)", code: errno) }
        // A guard against a hung test, not a timing assertion.
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    /// Leaves abruptly: the connection is reset (RST, as by a client that
    /// crashed), not closed. /dev/null takes the descriptor's place, so
    /// deinit never closes a number another test may have been given.
    func reset() {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        dup2(null, fd)
        close(null)
    }

    func send(_ text: String) { send(Array(text.utf8)) }

    func send(_ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            offset += n
        }
    }

    /// Sends without blocking until the peer stops taking bytes for
    /// `patienceMilliseconds`; returns how many bytes went out.
    func sendUntilBlocked(_ bytes: [UInt8], patienceMilliseconds: Int32) -> Int {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
        defer { _ = fcntl(fd, F_SETFL, flags) }
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset..<min(bytes.count, offset + 65536)].withUnsafeBytes {
                Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
            }
            if n > 0 { offset += n; continue }
            guard errno == EAGAIN || errno == EWOULDBLOCK else { return offset }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            if poll(&p, 1, patienceMilliseconds) == 0 { return offset }
        }
        return offset
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    private func fill() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n <= 0 { eof = true; return false }
        buffer += chunk[0..<n]
        return true
    }

    func readLine() -> String? {
        while true {
            if let i = buffer.firstIndex(of: 10) {
                let line = buffer[..<i]
                buffer.removeFirst(i + 1)
                return String(decoding: line.last == 13 ? line.dropLast() : line, as: UTF8.self)
            }
            if !fill() { return nil }
        }
    }

    /// One whole reply (continuation lines included), nil at EOF.
    func reply() -> SMTPReplyText? {
        var lines: [String] = []
        while let line = readLine() {
            lines.append(line)
            let bytes = Array(line.utf8)
            if bytes.count == 3 || (bytes.count >= 4 && bytes[3] == UInt8(ascii: " ")) {
                return SMTPReplyText(code: Int(line.prefix(3)) ?? 0, lines: lines)
            }
        }
        return nil
    }

    func replies(_ n: Int) -> [SMTPReplyText] {
        (0..<n).compactMap { _ in reply() }
    }

    /// Sends `line` + CRLF and reads its reply.
    @discardableResult
    func command(_ line: String) -> SMTPReplyText? {
        send(line + "\r\n")
        return reply()
    }

    /// Everything until the server closes.
    func readToEOF() -> [SMTPReplyText] {
        var all: [SMTPReplyText] = []
        while let r = reply() { all.append(r) }
        return all
    }
}

/// MAIL FROM:<a@example.org>, RCPT TO:<x@example.test> and DATA, each
/// expected to succeed: what the client sends next is the message.
func openData(_ c: SMTPTestClient, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250, sourceLocation: sourceLocation)
    #expect(c.command("RCPT TO:<x@example.test>")?.code == 250, sourceLocation: sourceLocation)
    #expect(c.command("DATA")?.code == 354, sourceLocation: sourceLocation)
}

/// The greeting, EHLO; returns the EHLO reply.
@discardableResult
func greet(_ c: SMTPTestClient, helo: String = "client.example.org") throws -> SMTPReplyText {
    let greeting = try #require(c.reply())
    #expect(greeting.code == 220)
    let ehlo = try #require(c.command("EHLO \(helo)"))
    #expect(ehlo.code == 250)
    return ehlo
}
