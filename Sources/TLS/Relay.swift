// The relay engine: TLS sessions on an EventLoop. Each session owns a
// network socket (ciphertext) and, once the handshake is complete, one end
// of a socketpair (plaintext); the other end goes to the caller. Nothing
// can be relayed before the handshake completes: the plaintext socket does
// not exist until then.
//
// Closing, per direction:
//   caller -> peer: EOF on the plaintext socket (the caller's shutdown(SHUT_WR)
//     or close) sends close_notify once the bytes before it are out;
//   peer -> caller: the peer's close_notify becomes shutdown(SHUT_WR) of the
//     plaintext socket (the caller reads EOF) once the bytes before it are in.
// A session ends when both directions are closed, when either side fails
// (a reset, an EOF without close_notify: truncation), or at a timeout.
// Buffers are bounded (16 KiB each way): a slow reader slows the writer.

#if canImport(Glibc)
import Glibc
#endif
import COpenSSL
import CSystemShims

/// What the caller gets when the handshake completes.
public struct HandshakeResult: Sendable {
    public var report: TLSReport
    /// The caller's end of the plaintext socketpair (owned by the caller).
    public var plaintext: Int32
}

/// How a relayed session ended.
public struct RelaySummary: Sendable, Equatable {
    /// Plaintext bytes from the peer to the caller.
    public var received: UInt64
    /// Plaintext bytes from the caller to the peer.
    public var sent: UInt64
    /// Whether the peer ended its side with close_notify.
    public var closeNotify: Bool
    /// "closed", or why the session was cut ("idle timeout", "peer closed
    /// without close_notify", a system error).
    public var reason: String
}

public struct RelayTimeouts: Sendable, Equatable {
    public var handshake: Double
    public var idle: Double
    public init(handshake: Double = 60, idle: Double = 300) {
        self.handshake = handshake
        self.idle = idle
    }
}

/// A fixed-size byte buffer with a read and a write position.
struct RelayBuffer {
    static let capacity = 16_384
    var bytes = [UInt8](repeating: 0, count: RelayBuffer.capacity)
    var start = 0
    var end = 0
    var isEmpty: Bool { start == end }
    mutating func reset() { start = 0; end = 0 }
}

public final class RelaySession: EventHandler {
    enum State { case handshaking, relaying, finished }

    private unowned let engine: RelayEngine
    private let tls: TLSConnection
    private let net: Int32
    private var plain: Int32 = -1
    private var state = State.handshaking
    private let timeouts: RelayTimeouts
    private let started = monotonicNow()
    private var lastActivity = monotonicNow()
    private var onHandshake: ((Result<HandshakeResult, TLSError>) -> Void)?
    private var onClose: ((RelaySummary) -> Void)?

    private var toPeer = RelayBuffer()     // plaintext read from the caller, not yet written to TLS
    private var toCaller = RelayBuffer()   // decrypted, not yet written to the caller
    private var callerEOF = false          // read EOF from the plaintext socket
    private var closeNotifySent = false
    private var peerEOF = false            // close_notify received
    private var callerWriteShut = false
    private var received: UInt64 = 0
    private var sent: UInt64 = 0
    // Readiness, for the edge-triggered loop: a read is tried only when the
    // descriptor may have bytes, so that relaying a record costs one read(2)
    // and not one more that gets EAGAIN. Set by readiness events; cleared by
    // EAGAIN or a short read (the queue was empty then, and any later byte is
    // a new event). `netDrained` is set by OpenSSL's reads (watchReads).
    // Except after a hang-up event (RDHUP/HUP/ERR): the EOF or error behind
    // the last bytes is no new edge, so a short read proves nothing then and
    // reads go on until they report it.
    private var plainReadable = false   // nothing can be there before the caller has the other end
    private let netDrained = UnsafeMutablePointer<Bool>.allocate(capacity: 1)
    private var plainHangup = false
    private var netHangup = false

    init(engine: RelayEngine, tls: TLSConnection, socket: Int32, timeouts: RelayTimeouts,
         onHandshake: @escaping (Result<HandshakeResult, TLSError>) -> Void,
         onClose: @escaping (RelaySummary) -> Void) {
        self.engine = engine
        self.tls = tls
        self.net = socket
        self.timeouts = timeouts
        self.onHandshake = onHandshake
        self.onClose = onClose
        netDrained.initialize(to: false)
        tls.watchReads(netDrained)
    }

    deinit { netDrained.deallocate() }

    public func ready(fd: Int32, events: UInt32) {
        // EPOLLIN, and also RDHUP/HUP/ERR: a read then reports EOF or the error.
        if events & (EPOLLIN.rawValue | EPOLLRDHUP.rawValue | EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
            if fd == net { netDrained.pointee = false }
            if fd == plain { plainReadable = true }
        }
        if events & (EPOLLRDHUP.rawValue | EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
            if fd == net { netHangup = true }
            if fd == plain { plainHangup = true }
        }
        pump()
    }

    /// Makes every step possible until each descriptor would block.
    func pump() {
        if state == .handshaking {
            switch tls.handshake() {
            case .wantRead:
                return
            case .wantWrite:
                engine.loop.watchWritable(net)
                return
            case .failed(let error):
                fail(error)
                return
            case .closeNotify:
                fail(TLSError(.handshake, "handshake: the peer closed the connection"))
                return
            case .done:
                var pair: [Int32] = [-1, -1]
                guard sealpost_socketpair_cloexec(&pair) == 0 else {
                    fail(TLSError(.connection, "socketpair: \(String(cString: strerror(errno)))"))
                    return
                }
                plain = pair[0]
                setNonBlocking(plain)
                do {
                    try engine.loop.register(plain, self, writable: false)
                } catch {
                    close(pair[1])
                    close(plain)
                    plain = -1
                    fail(error)
                    return
                }
                state = .relaying
                lastActivity = monotonicNow()
                let report = tls.report()
                let callback = onHandshake
                onHandshake = nil
                callback?(.success(HandshakeResult(report: report, plaintext: pair[1])))
            }
        }
        var progress = true
        while progress && state == .relaying {
            progress = false
            // Caller -> peer.
            if toPeer.isEmpty && !callerEOF && (plainReadable || plainHangup) {
                toPeer.reset()
                let n = toPeer.bytes.withUnsafeMutableBytes { read(plain, $0.baseAddress, $0.count) }
                if n > 0 {
                    toPeer.end = n
                    // Short: the socket was empty (see plainReadable).
                    if n < RelayBuffer.capacity { plainReadable = false }
                    progress = true
                } else if n == 0 {
                    callerEOF = true
                    progress = true
                } else if errno == EAGAIN {
                    plainReadable = false
                } else if errno != EINTR {
                    finish(reason: "plaintext socket: \(String(cString: strerror(errno)))")
                    return
                }
            }
            if !toPeer.isEmpty {
                let r = toPeer.bytes.withUnsafeBytes { raw in
                    tls.write(UnsafeRawBufferPointer(rebasing: raw[toPeer.start..<toPeer.end]))
                }
                switch r {
                case .done(let n):
                    toPeer.start += n
                    sent += UInt64(n)
                    progress = true
                case .wantRead:
                    break
                case .wantWrite:
                    engine.loop.watchWritable(net)
                case .closeNotify:
                    finish(reason: "peer closed the connection")
                    return
                case .failed(let e):
                    finish(reason: e.message)
                    return
                }
            }
            if toPeer.isEmpty && callerEOF && !closeNotifySent {
                switch tls.shutdown() {
                case .done:
                    closeNotifySent = true
                    progress = true
                case .wantRead:
                    break
                case .wantWrite:
                    engine.loop.watchWritable(net)
                case .closeNotify, .failed:
                    // The peer is gone: nothing more can be sent.
                    closeNotifySent = true
                    progress = true
                }
            }
            // Peer -> caller.
            if toCaller.isEmpty && !peerEOF && (!netDrained.pointee || netHangup || tls.hasBufferedInput) {
                toCaller.reset()
                let r = toCaller.bytes.withUnsafeMutableBytes { tls.read(into: $0) }
                switch r {
                case .done(let n):
                    toCaller.end = n
                    received += UInt64(n)
                    progress = true
                case .wantRead:
                    break
                case .wantWrite:   // e.g. answering a key update
                    engine.loop.watchWritable(net)
                case .closeNotify:
                    peerEOF = true
                    progress = true
                case .failed(let e):
                    // A reset, or an EOF without close_notify: the data may
                    // have been cut (truncation), and OpenSSL refuses any
                    // further I/O on the connection.
                    finish(reason: e.message)
                    return
                }
            }
            if !toCaller.isEmpty {
                let n = toCaller.bytes.withUnsafeBytes { raw in
                    send(plain, raw.baseAddress! + toCaller.start, toCaller.end - toCaller.start, Int32(MSG_NOSIGNAL))
                }
                if n > 0 {
                    toCaller.start += n
                    progress = true
                } else if n < 0 && errno == EAGAIN {
                    engine.loop.watchWritable(plain)
                } else if n < 0 && errno != EINTR {
                    finish(reason: "plaintext socket: \(String(cString: strerror(errno)))")
                    return
                }
            }
            if toCaller.isEmpty && peerEOF && !callerWriteShut {
                shutdown(plain, Int32(SHUT_WR))
                callerWriteShut = true
                progress = true
            }
            if closeNotifySent && callerWriteShut {
                finish(reason: "closed")
                return
            }
            if progress { lastActivity = monotonicNow() }
        }
    }

    /// Handshake failure: the caller is told, the socket closed.
    private func fail(_ error: TLSError) {
        guard state == .handshaking else { return }
        state = .finished
        engine.loop.unregister(net)
        close(net)
        engine.remove(self)
        let callback = onHandshake
        onHandshake = nil
        onClose = nil
        callback?(.failure(error))
    }

    /// End of a relayed session.
    private func finish(reason: String) {
        guard state == .relaying else { return }
        state = .finished
        if !closeNotifySent { _ = tls.shutdown() }   // best effort, e.g. at a timeout
        engine.loop.unregister(net)
        engine.loop.forget(plain)   // ours alone: close removes it from the epoll set
        close(net)
        close(plain)
        engine.remove(self)
        let callback = onClose
        onClose = nil
        callback?(RelaySummary(received: received, sent: sent, closeNotify: peerEOF, reason: reason))
    }

    func checkTimeout(_ now: Double) {
        switch state {
        case .handshaking where now - started > timeouts.handshake:
            fail(TLSError(.connection, "handshake timed out after \(Int(timeouts.handshake))s"))
        case .relaying where now - lastActivity > timeouts.idle:
            finish(reason: "idle timeout after \(Int(timeouts.idle))s")
        default:
            break
        }
    }

    func start() {
        do {
            try engine.loop.register(net, self, writable: false)
        } catch {
            fail(error)
            return
        }
        pump()
    }
}

/// The sessions of one EventLoop. Loop thread only: it may be handed to
/// other threads (Sendable) only to be used from `loop.execute` closures.
public final class RelayEngine: @unchecked Sendable {
    public let loop: EventLoop
    private var sessions: [ObjectIdentifier: RelaySession] = [:]

    public init(loop: EventLoop) {
        self.loop = loop
        loop.every(1) { [weak self] in
            guard let self else { return }
            let now = monotonicNow()
            for s in Array(self.sessions.values) { s.checkTimeout(now) }
        }
    }

    /// Sessions in handshake or relaying.
    public var activeSessions: Int { sessions.count }

    func remove(_ s: RelaySession) { sessions[ObjectIdentifier(s)] = nil }

    /// Takes ownership of `socket` (a connected TCP socket) and runs the
    /// server role on it. `onHandshake` is called once: with the report and
    /// the caller's plaintext socket, or with the failure (the socket is
    /// then closed). `onClose` follows a successful handshake, once.
    public func startServer(contexts: TLSServerContexts, socket: Int32, timeouts: RelayTimeouts = RelayTimeouts(),
                            onHandshake: @escaping (Result<HandshakeResult, TLSError>) -> Void,
                            onClose: @escaping (RelaySummary) -> Void) {
        setNonBlocking(socket)
        let tls: TLSConnection
        do {
            tls = try TLSConnection(server: contexts, fd: socket)
        } catch {
            close(socket)
            onHandshake(.failure(error))
            return
        }
        start(tls, socket, timeouts, onHandshake, onClose)
    }

    /// As `startServer`, for the client role with a verification policy
    /// and the cipher list for it (TLSConnection.init(client:...)).
    public func startClient(context: TLSClientContext, socket: Int32, serverName: String?,
                            policy: VerificationPolicy, ciphers: TLSClientCiphers = .strict,
                            timeouts: RelayTimeouts = RelayTimeouts(),
                            onHandshake: @escaping (Result<HandshakeResult, TLSError>) -> Void,
                            onClose: @escaping (RelaySummary) -> Void) {
        setNonBlocking(socket)
        let tls: TLSConnection
        do {
            tls = try TLSConnection(client: context, fd: socket, serverName: serverName, policy: policy, ciphers: ciphers)
        } catch {
            close(socket)
            onHandshake(.failure(error))
            return
        }
        start(tls, socket, timeouts, onHandshake, onClose)
    }

    private func start(_ tls: TLSConnection, _ socket: Int32, _ timeouts: RelayTimeouts,
                       _ onHandshake: @escaping (Result<HandshakeResult, TLSError>) -> Void,
                       _ onClose: @escaping (RelaySummary) -> Void) {
        let s = RelaySession(engine: self, tls: tls, socket: socket, timeouts: timeouts,
                             onHandshake: onHandshake, onClose: onClose)
        sessions[ObjectIdentifier(s)] = s
        s.start()
    }
}
