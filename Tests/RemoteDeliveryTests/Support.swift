// Test support: a scriptable SMTP server on loopback (plain sockets, one
// thread per connection) that records what it receives byte for byte, a
// log recorder, and a way to run blocking code off the Swift concurrency
// pool (the agent resolves routes in Tasks: blocking the pool would stall
// it).

import StageProtocol
import StageRuntime
import Synchronization
import Testing
import NIOCore
import NIOPosix
import CSystemShims
@testable import RemoteDelivery
#if canImport(Glibc)
import Glibc
#endif

/// Runs blocking `body` on its own thread and awaits its result.
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
        StageRuntime.detachThread { c.resume(with: Result { try body() }) }
    }
}

/// What a sink connection does; every reply is a full line without CRLF.
struct SinkScript: Sendable {
    var greeting = "220 sink.test ESMTP"
    var ehlo = ["250-sink.test", "250-PIPELINING", "250-SIZE 10240000", "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250 DSN"]
    var mail = "250 2.1.0 Ok"
    /// Reply to RCPT TO for an address.
    var rcpt: @Sendable (String) -> String = { _ in "250 2.1.5 Ok" }
    /// Reply to DATA when a recipient was accepted; only "354" reads data.
    var data = "354 End data with <CR><LF>.<CR><LF>"
    var dataEnd = "250 2.0.0 Ok: queued as SINK1"
    /// Close the connection right after the terminating dot, no reply.
    var hangUpAfterDot = false
    /// A slow receiver: the message data is read in reads of at most this
    /// many bytes, each after this pause (0: at once), with a small
    /// receive buffer (set on the listening socket).
    var dataReadPause: (bytes: Int, microseconds: UInt32)?
    /// A tarpit: the greeting goes out a byte at a time, this many
    /// microseconds apart (until the client hangs up).
    var greetingDrip: UInt32?
    /// STARTTLS support: offered in EHLO, and after "220" the socket goes
    /// to this function, which returns the plaintext socket (or -1).
    var startTLS: (@Sendable (Int32) -> Int32)?
}

/// One message as the sink got it.
struct SinkMessage: Sendable {
    var mailFrom: String
    var rcptTo: [String]
    /// The DATA bytes as they came on the wire, terminating ".\r\n" included.
    var raw: [UInt8]
}

final class TestSink: Sendable {
    let address: String
    let port: Int
    private let fd: Int32
    let script: SinkScript
    private let state = Mutex<(messages: [SinkMessage], connections: Int, commands: [String])>(([], 0, []))

    /// Listens on `address`, port `port` (0: any free port).
    init(address: String = "127.0.0.1", port: Int = 0, script: SinkScript = SinkScript()) throws {
        self.address = address
        self.script = script
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        precondition(s >= 0)
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if script.dataReadPause != nil {
            var small: Int32 = 65536
            setsockopt(s, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        }
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = in_port_t(UInt16(port).bigEndian)
        inet_pton(AF_INET, address, &sin.sin_addr)
        let rc = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0, listen(s, 64) == 0 else {
            let e = errno
            close(s)
            throw SinkError("bind/listen \(address):\(port): \(String(cString: strerror(e)))")
        }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &len) } }
        self.port = Int(UInt16(bigEndian: sin.sin_port))
        fd = s
        StageRuntime.detachThread { [self] in acceptLoop() }
    }

    /// Stops listening. Only the accept thread closes the socket: closed
    /// here, its number could be reused by another test's listener before
    /// the thread's next accept(), and the thread would then take that
    /// test's connections and answer them with this sink's script. After
    /// shutdown() the socket no longer listens (a connect is refused) and
    /// every accept() on it fails at once.
    func stop() {
        shutdown(fd, Int32(SHUT_RDWR))
    }

    var messages: [SinkMessage] { state.withLock { $0.messages } }
    var connections: Int { state.withLock { $0.connections } }
    var commands: [String] { state.withLock { $0.commands } }

    private func acceptLoop() {
        while true {
            let c = sealpost_accept_cloexec(fd)
            if c < 0 {
                if errno == EINTR { continue }
                close(fd)
                return
            }
            state.withLock { $0.connections += 1 }
            StageRuntime.detachThread { [self] in serve(c) }
        }
    }

    private func serve(_ socket: Int32) {
        var c = socket
        var tlsActive = false
        defer { close(c) }
        var buffer: [UInt8] = []
        func send(_ line: String) { let b = Array((line + "\r\n").utf8); _ = b.withUnsafeBytes { write(c, $0.baseAddress, $0.count) } }
        func fill(pause: (bytes: Int, microseconds: UInt32)? = nil) -> Bool {
            if let pause { usleep(pause.microseconds) }
            var chunk = [UInt8](repeating: 0, count: pause?.bytes ?? 65536)
            let n = chunk.withUnsafeMutableBytes { read(c, $0.baseAddress, $0.count) }
            if n <= 0 { return false }
            buffer += chunk[0..<n]
            return true
        }
        func line() -> String? {
            while true {
                if let i = buffer.firstIndex(of: 10) {
                    var l = Array(buffer[...i])
                    buffer.removeFirst(i + 1)
                    l.removeLast()
                    if l.last == 13 { l.removeLast() }
                    return String(decoding: l, as: UTF8.self)
                }
                if !fill() { return nil }
            }
        }
        if let pause = script.greetingDrip {
            for byte in Array((script.greeting + "\r\n").utf8) {
                usleep(pause)
                var b = byte
                guard Glibc.send(c, &b, 1, Int32(MSG_NOSIGNAL)) == 1 else { return }
            }
        } else {
            send(script.greeting)
        }
        guard script.greeting.hasPrefix("220") else { return }
        var from = ""
        var to: [String] = []
        while let command = line() {
            state.withLock { $0.commands.append(command) }
            let upper = command.uppercased()
            if upper.hasPrefix("EHLO") {
                var lines = script.ehlo
                if script.startTLS != nil && !tlsActive {
                    lines[lines.count - 1] = "250-" + lines[lines.count - 1].dropFirst(4)
                    lines.append("250 STARTTLS")
                }
                for l in lines { send(l) }
            } else if upper == "STARTTLS", let handOff = script.startTLS, !tlsActive {
                send("220 2.0.0 Ready to start TLS")
                let plaintext = handOff(c)   // takes the socket
                guard plaintext >= 0 else { c = -1; return }
                c = plaintext
                buffer = []
                tlsActive = true
                state.withLock { $0.commands.append("(TLS)") }
            } else if upper.hasPrefix("HELO") {
                send("250 sink.test")
            } else if upper.hasPrefix("MAIL FROM:") {
                from = Self.address(command)
                to = []
                send(script.mail)
            } else if upper.hasPrefix("RCPT TO:") {
                let a = Self.address(command)
                let reply = script.rcpt(a)
                if reply.hasPrefix("2") { to.append(a) }
                send(reply)
            } else if upper == "DATA" {
                guard !to.isEmpty else { send("554 5.5.1 Error: no valid recipients"); continue }
                send(script.data)
                guard script.data.hasPrefix("354") else { continue }
                let terminator: [UInt8] = [13, 10, 46, 13, 10]
                var raw: [UInt8] = []
                while true {
                    let searched = max(0, raw.count - terminator.count + 1)
                    raw += buffer
                    buffer = []
                    // The terminator is CRLF.CRLF, or ".\r\n" at the very start.
                    if let end = Self.find(terminator, in: raw, from: searched) {
                        buffer = Array(raw[(end + terminator.count)...])
                        raw = Array(raw[..<(end + terminator.count)])
                        break
                    }
                    if raw.starts(with: [46, 13, 10]) {
                        buffer = Array(raw[3...])
                        raw = [46, 13, 10]
                        break
                    }
                    if !fill(pause: script.dataReadPause) { return }
                }
                state.withLock { $0.messages.append(SinkMessage(mailFrom: from, rcptTo: to, raw: raw)) }
                if script.hangUpAfterDot { return }
                send(script.dataEnd)
            } else if upper == "RSET" {
                send("250 2.0.0 Ok")
            } else if upper == "QUIT" {
                send("221 2.0.0 Bye")
                return
            } else if upper == "NOOP" {
                send("250 2.0.0 Ok")
            } else {
                send("502 5.5.2 Error: command not recognized")
            }
        }
    }

    static func address(_ command: String) -> String {
        guard let open = command.firstIndex(of: "<"), let close = command.firstIndex(of: ">") else { return "" }
        return String(command[command.index(after: open)..<close])
    }

    /// The first `needle` in `hay` at or after `from` (a large message is
    /// searched only where new bytes came, not from its start each time).
    static func find(_ needle: [UInt8], in hay: [UInt8], from: Int = 0) -> Int? {
        guard hay.count >= needle.count, from <= hay.count - needle.count else { return nil }
        for i in max(0, from)...(hay.count - needle.count) where hay[i] == needle[0] && hay[i..<(i + needle.count)].elementsEqual(needle) {
            return i
        }
        return nil
    }
}

struct SinkError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Log lines, kept for assertions.
final class LogRecorder: Sendable {
    private let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
    var log: RemoteDeliveryLog {
        RemoteDeliveryLog(info: { [self] l in lines.withLock { $0.append(l) } },
                          warning: { [self] l in lines.withLock { $0.append("warning: " + l) } })
    }
}

/// An agent on its own event loop, for one test.
struct AgentFixture {
    let group: MultiThreadedEventLoopGroup
    let agent: RemoteDeliveryAgent
    let logs: LogRecorder

    init(resolver: any MailExchangerResolver = StaticMailExchangerResolver(), transports: TransportTable = TransportTable(),
         configure: (inout RemoteSettings) -> Void = { _ in }) {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        logs = LogRecorder()
        var settings = RemoteSettings(hostname: "client.test")
        settings.maximumPhaseTimeout = 30   // a broken test fails instead of hanging
        settings.connectTimeout = 10
        configure(&settings)
        agent = RemoteDeliveryAgent(eventLoop: group.next(), settings: settings, transports: transports,
                                    resolver: resolver, log: logs.log)
    }

    func deliver(_ job: DeliveryJob) async -> [RemoteResult] {
        await withCheckedContinuation { c in agent.deliver(job) { c.resume(returning: $0) } }
    }

    func shutdown() async {
        try? await agent.eventLoop.submit { agent.closeIdleConnections() }.get()
        try? await group.shutdownGracefully()
    }
}

/// A job to `domain` with these recipients and body.
func makeJob(_ id: UInt64 = 1, to recipients: [String], body: String = "Subject: test\r\n\r\nHello.\r\n",
             nexthop: String? = nil) -> DeliveryJob {
    var job = DeliveryJob(job: id, queueID: "4F3A2B1C5D6E", sender: "sender@origin.test",
                        arrival: UInt64(time(nil)), size: UInt64(body.utf8.count))
    job.recipients = recipients.enumerated().map { DeliveryJob.Recipient(index: UInt64($0.offset), address: $0.element) }
    job.body = [Array(body.utf8)]
    job.nexthop = nexthop
    return job
}

/// One event loop for a test.
struct MultiThreadedEventLoopGroupHolder {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var loop: EventLoop { group.next() }
    func shutdown() async { try? await group.shutdownGracefully() }
}
