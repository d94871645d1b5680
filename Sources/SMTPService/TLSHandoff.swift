// smtp-listen's side of the `tls` protocol (PROTOCOL.md section 4.5): hands
// a client's TCP socket to crypto-negotiate (after STARTTLS, or at accept on
// port 465) and gets back a plaintext socket once the handshake is done.
//
// One persistent control connection, and no event loop ever waits on it:
// - a NEGOTIATE frame (with its socket, SCM_RIGHTS) is sent at once from
//   the event loop that asks, with MSG_DONTWAIT: on a 2-core machine the
//   wake-up of another thread costs more than the send itself;
// - the writer thread sends what could not go at once (a full socket
//   buffer: the rest of a frame, and every frame after it until the
//   backlog is gone, so frames never interleave);
// - the reader thread connects (again, every second, while crypto-negotiate
//   is away; every 100 ms before the first connection), exchanges the
//   HELLOs and then blocks in receive(): NEGOTIATED and FAILED complete the
//   request of their session. We ask for no CLOSED frames
//   (`report-close=false`): the session's own channel sees the end, and
//   crypto-negotiate logs it.
// Completions run on the reader (or writer) thread: callers hop back to
// their event loop. When the connection is down, `isAvailable` is false
// (smtp-listen then does not offer STARTTLS) and requests fail at once;
// requests in flight when it drops fail with 4.4.2.

import StageRuntime
import Logging
import NIOConcurrencyHelpers
import SMTP
import StageProtocol
import CSystemShims

#if canImport(Glibc)
import Glibc
#endif

/// A completed server-role handshake: the plaintext socket (ours) and what
/// crypto-negotiate reported.
public struct TLSEstablished: Sendable {
    public var plaintext: Int32
    public var protocolVersion: String
    public var cipher: String
    public var group: String?
    public var serverName: String?

    public init(plaintext: Int32, protocolVersion: String, cipher: String, group: String? = nil, serverName: String? = nil) {
        self.plaintext = plaintext
        self.protocolVersion = protocolVersion
        self.cipher = cipher
        self.group = group
        self.serverName = serverName
    }

    /// For the Received header's "(using ...)" comment and the log, in
    /// Postfix's words: "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384
    /// key-exchange x25519".
    public var summary: String {
        var text = "\(protocolVersion) with cipher \(cipher)"
        if let group { text += " key-exchange \(group)" }
        return text
    }
}

/// Why no plaintext socket came back.
public struct TLSHandoffFailure: Error, Sendable, CustomStringConvertible {
    /// RFC 3463, from crypto-negotiate's FAILED or our own.
    public var status: String
    public var text: String
    public init(status: String, text: String) {
        self.status = status
        self.text = text
    }
    public var description: String { "\(status) \(text)" }
}

public final class TLSHandoff: Sendable {
    public typealias Completion = @Sendable (Result<TLSEstablished, TLSHandoffFailure>) -> Void

    private struct Request {
        /// The NEGOTIATE's session number, given by `negotiate`.
        var session: UInt64
        var socket: Int32
        var peer: String
        var completion: Completion
    }

    private struct State {
        var connection: Int32 = -1
        var available = false
        var stopped = false
        var queue: [Request] = []
        /// The writer owns the stream: frames are queued for it, or
        /// `partial` is not yet sent. Callers then queue too.
        var writerActive = false
        /// The unsent end of a frame whose beginning (and descriptor) went
        /// out from an event loop; the writer sends it before anything else.
        var partial: [UInt8] = []
        var pending: [UInt64: Completion] = [:]
        /// Requests the writer has taken from `queue` and not yet
        /// registered (or failed), and those of them `abandon` gave up.
        var writing: Set<UInt64> = []
        var abandoned: Set<UInt64> = []
        var nextSession: UInt64 = 1
        var warnedUnavailable = false
    }

    private let socketPath: String
    private let logger: Logger
    /// Seconds between connection attempts while crypto-negotiate is away.
    private let retryInterval: Int32
    private let state = NIOLockedValueBox(State())
    /// Held while the writer uses the connection's descriptor, and by the
    /// reader to close it: the number is never reused under the writer.
    private let sendLock = NIOLock()
    /// 1: the writer has work (or must stop).
    private let work = ConditionLock(value: 0)

    /// The uids crypto-negotiate may listen as (see
    /// StageConnection.requireServer); nil: not checked.
    private let serverUIDs: Set<UInt32>?

    public init(socketPath: String, logger: Logger, retryInterval: Int32 = 1, serverUIDs: Set<UInt32>? = nil) {
        self.serverUIDs = serverUIDs
        self.socketPath = socketPath
        self.logger = logger
        self.retryInterval = retryInterval
    }

    /// Starts the reader and writer threads.
    public func start() {
        StageRuntime.detachThread { [self] in readerLoop() }
        StageRuntime.detachThread { [self] in writerLoop() }
    }

    /// Stops both threads (pending requests fail); for tests.
    public func stop() {
        let (pending, unsent) = state.withLockedValue { s -> ([Completion], [Request]) in
            s.stopped = true
            s.available = false
            if s.connection >= 0 { _ = shutdown(s.connection, Int32(SHUT_RDWR)) }
            // Taken here, so that neither the reader (which sees the
            // shutdown) nor `abandon` finds them again.
            defer {
                s.pending = [:]
                s.queue = []
            }
            return (Array(s.pending.values), s.queue)
        }
        work.lock()
        work.unlock(withValue: 1)
        for request in unsent { close(request.socket) }
        for completion in pending + unsent.map(\.completion) { completion(.failure(Self.unavailable)) }
    }

    /// The control connection is up: STARTTLS may be offered.
    public var isAvailable: Bool { state.withLockedValue { $0.available } }

    /// Blocks until the control connection is up, `seconds` have passed
    /// or `cancelled()` says so; true when it is up.
    public func waitUntilAvailable(seconds: Double, cancelled: () -> Bool) -> Bool {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: .milliseconds(Int(seconds * 1000)))
        while !isAvailable {
            if cancelled() || clock.now >= deadline { return false }
            var none = pollfd()
            _ = poll(&none, 0, 20)
        }
        return true
    }

    static let unavailable = TLSHandoffFailure(status: "4.7.0", text: "TLS not available: crypto-negotiate is not running")

    /// Hands `socket` (ours no longer, whatever happens) to crypto-negotiate
    /// for a server-role handshake. Never blocks. Returns the request's
    /// number, for `abandon`.
    @discardableResult
    public func negotiate(socket: Int32, peer: String, completion: @escaping Completion) -> UInt64 {
        enum Route { case unavailable, writer, now }
        let (route, session) = state.withLockedValue { s -> (Route, UInt64) in
            let session = s.nextSession
            s.nextSession += 1
            guard s.available, !s.stopped else { return (.unavailable, session) }
            return (s.writerActive ? .writer : .now, session)
        }
        let request = Request(session: session, socket: socket, peer: peer, completion: completion)
        switch route {
        case .unavailable:
            close(socket)
            completion(.failure(Self.unavailable))
        case .now where sendNow(request):
            break
        case .now, .writer:
            queueForWriter(request)
        }
        return session
    }

    /// The caller no longer waits for request `session` (its own deadline
    /// passed): the completion is dropped without being called, and an
    /// answer that still comes finds nothing (its plaintext socket is
    /// closed). crypto-negotiate's handshake timeout normally answers every
    /// request; one that keeps the connection but stops answering would
    /// otherwise keep each completion, and the session it holds, until the
    /// connection drops. True: the completion was dropped (it will not
    /// run); false: it has run, or is running.
    @discardableResult
    public func abandon(_ session: UInt64) -> Bool {
        enum Found { case pending, unsent(Int32), nothing }
        let found = state.withLockedValue { s -> Found in
            if s.pending.removeValue(forKey: session) != nil { return .pending }
            if let index = s.queue.firstIndex(where: { $0.session == session }) {
                return .unsent(s.queue.remove(at: index).socket)
            }
            // In the writer's hands: it sends the request, but keeps no
            // completion and calls none (`register`, `send`).
            guard s.writing.contains(session) else { return .nothing }
            s.abandoned.insert(session)
            return .pending
        }
        switch found {
        case .pending: return true
        case .unsent(let socket): close(socket); return true
        case .nothing: return false
        }
    }

    /// Requests sent and not yet answered (for tests).
    var pendingCount: Int { state.withLockedValue { $0.pending.count } }

    private func queueForWriter(_ request: Request) {
        let queued = state.withLockedValue { s -> Bool in
            guard s.available, !s.stopped else { return false }
            s.queue.append(request)
            s.writerActive = true
            return true
        }
        guard queued else {
            close(request.socket)
            request.completion(.failure(Self.unavailable))
            return
        }
        wakeWriter()
    }

    private func wakeWriter() {
        work.lock()
        work.unlock(withValue: 1)
    }

    private func frame(_ request: Request, session: UInt64) -> [UInt8] {
        var frame = Frame(.negotiate, ["session": .uint(session), "socket": .fd(request.socket),
                                       "role": .text("server"), "report-close": .bool(false)])
        frame.set("peer", .sanitizedText(request.peer))
        return FrameEncoder.encode(frame)
    }

    /// Registers `request` (its completion, under its session number); nil
    /// (nothing registered) when the connection is down or, with `unlessWriterActive`, the writer owns
    /// the stream.
    private func register(_ request: Request, unlessWriterActive: Bool) -> (fd: Int32, session: UInt64)? {
        state.withLockedValue { s -> (Int32, UInt64)? in
            guard s.available, s.connection >= 0, !(unlessWriterActive && s.writerActive) else { return nil }
            s.writing.remove(request.session)
            if s.abandoned.remove(request.session) == nil { s.pending[request.session] = request.completion }
            return (s.connection, request.session)
        }
    }

    /// The event loop's own send. False: nothing was sent and the request
    /// is still the caller's (the writer must take it).
    private func sendNow(_ request: Request) -> Bool {
        enum Outcome { case writer, sent, partial, failed(Int32), answered }
        var outcome = Outcome.writer
        var session: UInt64 = 0
        sendLock.withLock {
            // Checked under the send lock: nobody is in the middle of a frame.
            guard let (fd, registered) = register(request, unlessWriterActive: true) else { return }
            session = registered
            let bytes = frame(request, session: session)
            var n: Int
            repeat {
                n = bytes.withUnsafeBytes { raw in
                    withUnsafePointer(to: request.socket) { socket in
                        sealpost_sendmsg_fds_flags(fd, raw.baseAddress!, raw.count, socket, 1, Int32(MSG_DONTWAIT))
                    }
                }
            } while n < 0 && errno == EINTR
            if n == bytes.count {
                outcome = .sent
            } else if n > 0 {
                // The descriptor went with the first byte; the writer sends the rest.
                state.withLockedValue {
                    $0.partial = Array(bytes[n...])
                    $0.writerActive = true
                }
                outcome = .partial
            } else {
                let e = errno
                // The reader may have taken every pending request meanwhile
                // (crypto-negotiate gone: it answers them 4.4.2); this one's
                // completion is then called already, and must not be again.
                let stillOurs = state.withLockedValue { $0.pending.removeValue(forKey: session) } != nil
                if !stillOurs {
                    outcome = .answered
                } else if e == EAGAIN || e == EWOULDBLOCK {
                    outcome = .writer
                } else {
                    // A broken connection: the reader sees the shutdown and reconnects.
                    _ = shutdown(fd, Int32(SHUT_RDWR))
                    outcome = .failed(e)
                }
            }
        }
        switch outcome {
        case .writer:
            return false
        case .sent:
            close(request.socket)
        case .partial:
            close(request.socket)
            wakeWriter()
        case .failed(let e):
            close(request.socket)
            request.completion(.failure(Self.unreachable(e)))
        case .answered:
            close(request.socket)
        }
        return true
    }

    static func unreachable(_ e: Int32) -> TLSHandoffFailure {
        TLSHandoffFailure(status: "4.7.0", text: "TLS not available: cannot reach crypto-negotiate: \(String(cString: strerror(e)))")
    }

    // MARK: Writer

    private func writerLoop() {
        while true {
            work.lock(whenValue: 1)
            let (requests, stopped) = state.withLockedValue { s -> ([Request], Bool) in
                defer { s.queue = [] }
                if !s.stopped { s.writing.formUnion(s.queue.map(\.session)) }
                return (s.queue, s.stopped)
            }
            work.unlock(withValue: 0)
            if stopped {
                for r in requests { close(r.socket) }
                return
            }
            sendLock.withLock { sendPartial() }
            for request in requests { send(request) }
            state.withLockedValue { s in
                // More queued meanwhile: `work` is 1 again and the loop goes on.
                if s.queue.isEmpty && s.partial.isEmpty { s.writerActive = false }
            }
        }
    }

    /// Blocking (with the send timeout) writes of `bytes`, `fds` with the
    /// first byte. The caller holds `sendLock`. Returns 0 or an errno.
    private func writeAll(_ fd: Int32, _ bytes: [UInt8], fds first: [Int32]) -> Int32 {
        var offset = 0
        var fds = first
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                fds.withUnsafeBufferPointer { p in
                    sealpost_sendmsg_fds(fd, raw.baseAddress! + offset, raw.count - offset, p.baseAddress, p.count)
                }
            }
            if n < 0 {
                if errno == EINTR { continue }
                let e = errno
                // A stuck peer (send timeout) or a broken connection:
                // the reader sees the shutdown and reconnects.
                _ = shutdown(fd, Int32(SHUT_RDWR))
                return e
            }
            offset += n
            fds = []
        }
        return 0
    }

    /// The caller holds `sendLock`.
    private func sendPartial() {
        let (fd, rest) = state.withLockedValue { s -> (Int32, [UInt8]) in
            defer { s.partial = [] }
            return (s.connection, s.partial)
        }
        guard !rest.isEmpty, fd >= 0 else { return }
        _ = writeAll(fd, rest, fds: [])
    }

    private func send(_ request: Request) {
        defer { close(request.socket) }   // passed or not, our copy goes
        var session: UInt64?
        var failure: Int32 = 0
        sendLock.withLock {
            // The reader may have closed the connection meanwhile. No
            // partial frame can be pending here: sendNow leaves one only
            // while the writer is idle, and writerLoop sends it first.
            guard let (fd, registered) = register(request, unlessWriterActive: false) else { return }
            session = registered
            failure = writeAll(fd, frame(request, session: registered), fds: [request.socket])
        }
        guard let session else {
            let abandoned = state.withLockedValue { s in
                s.writing.remove(request.session)
                return s.abandoned.remove(request.session) != nil
            }
            if !abandoned { request.completion(.failure(Self.unavailable)) }
            return
        }
        if failure != 0, let completion = state.withLockedValue({ $0.pending.removeValue(forKey: session) }) {
            completion(.failure(Self.unreachable(failure)))
        }
    }

    // MARK: Reader

    private func readerLoop() {
        // Until the first connection crypto-negotiate is usually still
        // starting (and smtp-listen's start waits for it, see
        // waitUntilAvailable): attempts come every 100 ms, and the warning
        // only after 2 s of them.
        var connectedOnce = false
        var startingFailures = 0
        while !state.withLockedValue({ $0.stopped }) {
            let connection: StageConnection
            do {
                connection = try StageConnection.connect(path: socketPath)
                try connection.requireServer(uids: serverUIDs, name: "crypto-negotiate")
                try connection.clientHello(.tls, extra: [("software", .text("sealpost-smtp-listen 0.1"))])
            } catch {
                if !connectedOnce { startingFailures += 1 }
                let warn = (connectedOnce || startingFailures >= 20) && state.withLockedValue { s -> Bool in
                    defer { s.warnedUnavailable = true }
                    return !s.warnedUnavailable
                }
                if warn { logger.warning("crypto-negotiate unavailable (\(socketPath): \(error)): STARTTLS is not offered until it is back") }
                var none = pollfd()
                _ = poll(&none, 0, connectedOnce ? retryInterval * 1000 : 100)
                continue
            }
            // Writes must not hang the writer when crypto-negotiate hangs.
            var timeout = timeval(tv_sec: 10, tv_usec: 0)
            _ = setsockopt(connection.fileDescriptor, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let stopped = state.withLockedValue { s -> Bool in
                guard !s.stopped else { return true }
                s.connection = connection.fileDescriptor
                s.available = true
                s.warnedUnavailable = false
                return false
            }
            if stopped { connection.close(); return }
            connectedOnce = true
            logger.info("connected to crypto-negotiate (\(socketPath)): STARTTLS is offered")
            var reason = "connection closed"
            do {
                while let frame = try connection.receive() {
                    handle(frame)
                }
            } catch {
                reason = "\(error)"
            }
            let pending = state.withLockedValue { s -> [Completion] in
                s.available = false
                defer { s.pending = [:] }
                return Array(s.pending.values)
            }
            sendLock.withLock {
                state.withLockedValue {
                    $0.connection = -1
                    $0.partial = []   // the rest of a frame for a stream that is gone
                }
                connection.close()
            }
            if !state.withLockedValue({ $0.stopped }) {
                logger.warning("lost crypto-negotiate (\(reason)); \(pending.count) handshake(s) in progress failed")
            }
            for completion in pending {
                completion(.failure(TLSHandoffFailure(status: "4.4.2", text: "crypto-negotiate went away during the handshake")))
            }
        }
    }

    private func handle(_ frame: Frame) {
        guard let session = try? frame.uint("session") else { return }
        switch frame.type {
        case .negotiated:
            guard let completion = state.withLockedValue({ $0.pending.removeValue(forKey: session) }) else {
                if let fd = try? frame.fd("plaintext") { close(fd) }
                return
            }
            do {
                let established = TLSEstablished(plaintext: try frame.fd("plaintext"),
                                                 protocolVersion: try frame.text("protocol"),
                                                 cipher: try frame.text("cipher"),
                                                 group: try frame.optionalText("group"),
                                                 serverName: try frame.optionalText("server-name"))
                completion(.success(established))
            } catch {
                if let fd = try? frame.fd("plaintext") { close(fd) }
                completion(.failure(TLSHandoffFailure(status: "4.7.0", text: "bad NEGOTIATED frame: \(error)")))
            }
        case .failed:
            guard let completion = state.withLockedValue({ $0.pending.removeValue(forKey: session) }) else { return }
            let status = (try? frame.text("status")) ?? "4.7.5"
            let text = (try? frame.text("text")) ?? "handshake failed"
            completion(.failure(TLSHandoffFailure(status: status, text: text)))
        default:
            // CLOSED: the relayed session ended; its plaintext channel
            // already saw EOF.
            break
        }
    }
}
