// The smtp-listen server: listening sockets (bound here or inherited), one
// SMTPSessionHandler per accepted connection, the per-client connection
// count, and an orderly shutdown.
//
//   let server = SMTPServer(settings: settings, group: group, logger: logger)
//   let bound = try server.open(listeners).wait()   // before dropping privileges
//   ... drop privileges ...
//   server.startAccepting()                          // now connections are taken
//   ... on SIGTERM: try server.shutdown(grace: .seconds(30)).wait()
//
// Listeners are opened before accepting starts so that no session starts
// before the process has dropped root and chrooted: every session then
// runs with the final privileges and paths. Connections are accepted by a
// thread of our own (Acceptor) and adopted into NIO, so that the TCP
// descriptor is known when STARTTLS (or port 465) hands it to
// crypto-negotiate (TLSHandoff).

import StageRuntime
import CSystemShims
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import SMTP

/// State shared by every session of a server (all event loops): settings,
/// logger, the sessions per client address.
final class SMTPServerCore: Sendable {
    let settings: SMTPServiceSettings
    let logger: Logger
    private let state = NIOLockedValueBox(State())
    private let pendingAuthentications = NIOLockedValueBox(0)

    /// Where AUTH password checks run (Argon2id takes tens of milliseconds
    /// and 64 MiB each: never on an event loop). One pool per process,
    /// started on first use and never stopped: stopping a NIOThreadPool
    /// goes through libdispatch, which traps inside smtp-listen's chroot.
    /// At most 4 threads, so at most 4 checks hold their memory at once.
    static let verificationPool: NIOThreadPool = {
        let pool = NIOThreadPool(numberOfThreads: max(1, min(4, System.coreCount)))
        pool.start()
        return pool
    }()

    /// Reserves a place for a password check; false when
    /// `maxPendingAuthentications` are already waiting or running.
    func beginAuthentication() -> Bool {
        pendingAuthentications.withLockedValue { n in
            guard n < settings.maxPendingAuthentications else { return false }
            n += 1
            return true
        }
    }

    func endAuthentication() {
        pendingAuthentications.withLockedValue { $0 -= 1 }
    }

    struct State {
        var perClient: [String: Int] = [:]
        var channels: [ObjectIdentifier: Channel] = [:]
        var stopping = false
    }

    /// Asks a session to end at its next quiet moment (421 4.3.2).
    struct ShutdownEvent: Sendable {}

    /// nil: no TLS (no certificate configured).
    let handoff: TLSHandoff?

    /// Idle inject connections per event loop (InjectPool.swift).
    let injectPools = InjectPools(capacity: 32)

    init(settings: SMTPServiceSettings, logger: Logger, handoff: TLSHandoff? = nil) {
        self.settings = settings
        self.logger = logger
        self.handoff = handoff
    }

    /// A session's channel was replaced by the plaintext socket of its TLS
    /// session: the count per client stays, shutdown reaches the new one.
    func replace(_ old: Channel, with new: Channel) {
        state.withLockedValue { s in
            s.channels[ObjectIdentifier(old)] = nil
            s.channels[ObjectIdentifier(new)] = new
        }
    }

    enum Admission: Equatable {
        case admitted
        /// The client would have this many sessions, over the limit.
        case tooMany(Int)
        case stopping
    }

    /// A connection the accepting thread counted (`admit`) before its
    /// channel existed.
    struct Admitted {
        let address: String
        let admission: Admission
    }

    /// Counts a new session and says whether it may proceed. Every call is
    /// balanced by `unregister`, admitted or not.
    /// Trusted clients are exempt from the limit (as Postfix exempts
    /// $mynetworks with smtpd_client_event_limit_exceptions): a local
    /// relay or load generator may open as many sessions as it needs.
    func register(address: String, channel: Channel) -> Admission {
        attach(channel, admitted: admit(address: address))
    }

    /// The first half of `register`, on the accepting thread before the
    /// channel exists: counts the connection and decides. `attach` adds
    /// the channel (and says `.stopping` if a shutdown began meanwhile);
    /// `release` undoes the count when no channel came to be.
    func admit(address: String) -> Admission {
        let exempt = settings.isTrusted(address)
        return state.withLockedValue { s in
            let n = s.perClient[address, default: 0] + 1
            s.perClient[address] = n
            if s.stopping { return .stopping }
            return exempt || n <= settings.limits.sessionsPerClient ? .admitted : .tooMany(n)
        }
    }

    func attach(_ channel: Channel, admitted: Admission) -> Admission {
        state.withLockedValue { s in
            s.channels[ObjectIdentifier(channel)] = channel
            return s.stopping ? .stopping : admitted
        }
    }

    func release(address: String) {
        state.withLockedValue { Self.uncount(address, in: &$0) }
    }

    func unregister(address: String, channel: Channel) {
        state.withLockedValue { s in
            Self.uncount(address, in: &s)
            s.channels[ObjectIdentifier(channel)] = nil
        }
    }

    private static func uncount(_ address: String, in s: inout State) {
        let n = s.perClient[address, default: 1] - 1
        s.perClient[address] = n > 0 ? n : nil
    }

    var sessionCount: Int { state.withLockedValue { $0.channels.count } }

    /// Marks the server stopping and returns the open sessions.
    func beginStopping() -> [Channel] {
        state.withLockedValue { s in
            s.stopping = true
            return Array(s.channels.values)
        }
    }
}

/// A listening socket that is open.
public struct BoundListener: Sendable {
    public var kind: ListenerKind
    /// The local address (with the real port when port 0 was asked for).
    public var address: SocketAddress?
    let fd: Int32
}

public final class SMTPServer: Sendable {
    private let core: SMTPServerCore
    private let group: EventLoopGroup
    private let listeners = NIOLockedValueBox<[BoundListener]>([])
    private let acceptor: Acceptor

    public init(settings: SMTPServiceSettings, group: EventLoopGroup, logger: Logger) {
        let handoff = settings.tlsSocket.map { TLSHandoff(socketPath: $0, logger: logger) }
        self.core = SMTPServerCore(settings: settings, logger: logger, handoff: handoff)
        self.group = group
        self.acceptor = Acceptor(logger: logger)
    }

    public var settings: SMTPServiceSettings { core.settings }

    /// Open sessions right now.
    public var sessionCount: Int { core.sessionCount }

    /// Opens (binds, or adopts) the listeners, not yet accepting. Without
    /// a TLS socket in the settings (no certificate configured), smtps
    /// listeners are skipped (logged once) and an inherited smtps
    /// descriptor is closed so that clients are refused instead of left
    /// waiting.
    public func open(_ specs: [ListenerSpec]) -> EventLoopFuture<[BoundListener]> {
        let loop = group.next()
        var bound: [BoundListener] = []
        var warnedSMTPS = false
        for spec in specs {
            if spec.kind == .smtps && core.handoff == nil {
                if !warnedSMTPS {
                    core.logger.warning("smtps (implicit TLS, RFC 8314) is not served: no TLS certificate is configured ([tls] certificates)")
                    warnedSMTPS = true
                }
                if case .inherited(let fd) = spec.source { _ = closeDescriptor(fd) }
                continue
            }
            do {
                bound.append(try Self.open(spec))
            } catch {
                for b in bound { _ = closeDescriptor(b.fd) }
                return loop.makeFailedFuture(error)
            }
        }
        listeners.withLockedValue { $0.append(contentsOf: bound) }
        return loop.makeSucceededFuture(bound)
    }

    /// Binds (or adopts) one listening socket. Sealpost accepts on it
    /// itself rather than through NIO's ServerBootstrap: STARTTLS and port
    /// 465 hand the connection's descriptor to crypto-negotiate, and NIO
    /// does not reveal the descriptors of the channels it accepts.
    private static func open(_ spec: ListenerSpec) throws -> BoundListener {
        let fd: Int32
        switch spec.source {
        case .inherited(let inherited):
            fd = inherited
        case .bind(let listenAddress):
            do {
                fd = try bindListeningSocket(host: listenAddress.host, port: listenAddress.port)
            } catch {
                throw ListenerError("\(spec): \(error)")
            }
        }
        // The acceptor polls; accepted sockets are made non-blocking by NIO.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return BoundListener(kind: spec.kind, address: localAddress(fd), fd: fd)
    }

    static func localAddress(_ fd: Int32) -> SocketAddress? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0 else { return nil }
        return socketAddress(storage)
    }

    static func socketAddress(_ storage: sockaddr_storage) -> SocketAddress? {
        var storage = storage
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafeBytes(of: &storage) { SocketAddress($0.load(as: sockaddr_in.self)) }
        case AF_INET6:
            return withUnsafeBytes(of: &storage) { SocketAddress($0.load(as: sockaddr_in6.self)) }
        default:
            return nil
        }
    }

    /// Starts taking connections on every open listener (and, when TLS is
    /// configured, connecting to crypto-negotiate: after the privileges
    /// were dropped, so the socket path is the chrooted one).
    public func startAccepting() {
        core.handoff?.start()
        let bound = listeners.withLockedValue { $0 }
        for listener in bound {
            let addr = listener.address.map(Self.describe) ?? "?"
            core.logger.info("listening for \(listener.kind.rawValue) on \(addr)")
        }
        let core = self.core
        let group = self.group
        // The first clients are offered STARTTLS too: accepting waits (they
        // wait in the listen backlog) until crypto-negotiate, started just
        // before smtp-listen, has answered, for tlsStartWait at most.
        acceptor.run(bound.map { ($0.fd, $0.kind) }, first: { stopped in
            guard let handoff = core.handoff else { return }
            let wait = core.settings.tlsStartWait
            if !handoff.waitUntilAvailable(seconds: wait, cancelled: stopped) && !stopped() {
                core.logger.warning("crypto-negotiate did not answer within \(wait) s of the start: accepting without STARTTLS until it does")
            }
        }) { fd, kind in
            SMTPServer.adopt(fd, kind: kind, core: core, group: group)
        }
    }

    /// A new TCP connection: an SMTP session on a NIO channel, or (465)
    /// first a TLS handshake by crypto-negotiate, then the session on the
    /// plaintext socket.
    static func adopt(_ fd: Int32, kind: ListenerKind, core: SMTPServerCore, group: EventLoopGroup) {
        if kind == .smtps {
            let peer = peerAddress(fd)
            guard let handoff = core.handoff, handoff.isAvailable else {
                core.logger.warning("smtps connection from \(peer.map { "[\($0)]" } ?? "unknown") refused: crypto-negotiate is not available")
                _ = closeDescriptor(fd)
                return
            }
            let loop = group.next()
            handoff.negotiate(socket: fd, peer: peer.map { "[\($0)]" } ?? "unknown") { result in
                switch result {
                case .success(let established):
                    adoptPlaintext(established, kind: kind, peer: peer ?? "unknown", core: core, loop: loop)
                case .failure(let failure):
                    core.logger.info("TLS handshake failed on smtps with [\(peer ?? "unknown")]: \(failure.text)")
                }
            }
            return
        }
        // The connection is counted against its client's limit here, so
        // that the greeting can go at once (see greetAtOnce).
        let admitted = peerAddress(fd).map { SMTPServerCore.Admitted(address: $0, admission: core.admit(address: $0)) }
        var greeted = false
        if let admitted, admitted.admission == .admitted {
            switch greetAtOnce(fd, address: admitted.address, core: core) {
            case .sent: greeted = true
            case .notNow: break
            case .failed:
                core.release(address: admitted.address)
                return
            }
        }
        let handler = SMTPSessionHandlerFactory(core: core, kind: kind, socket: fd, admitted: admitted, greeted: greeted)
        // No Nagle (replies are whole, and each is awaited by the client):
        // ClientBootstrap sets TCP_NODELAY by default.
        ClientBootstrap(group: group.next())
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard let options = channel.syncOptions else { throw ChannelError.operationUnsupported }
                    try options.setOption(.allowRemoteHalfClosure, value: true)
                    // One read per read request: after STARTTLS not a byte
                    // more is read here; what follows belongs to
                    // crypto-negotiate.
                    try options.setOption(.maxMessagesPerRead, value: 1)
                    try channel.pipeline.syncOperations.addHandler(handler.make())
                }
            }
            .withConnectedSocket(fd)
            .whenFailure { error in
                // No channel became active: no session will release the count.
                if let admitted { core.release(address: admitted.address) }
                core.logger.warning("\(kind.rawValue) connection: \(error)")
            }
    }

    private enum EarlyGreeting { case sent, notNow, failed }

    /// The 220, written by the accepting thread as soon as the connection
    /// is there, for an admitted client when nothing is to come before
    /// the greeting: the client's name is known (cached, or not looked up
    /// at all). The client then sends its first command while the event
    /// loop still sets the channel up, instead of waiting for that too.
    /// Otherwise (`notNow`) the session greets, after the lookup. `failed`:
    /// the client is gone already; the socket is closed.
    private static func greetAtOnce(_ fd: Int32, address: String, core: SMTPServerCore) -> EarlyGreeting {
        if let names = core.settings.clientNames, names.cached(address) == nil { return .notNow }
        let settings = core.settings
        let greeting = SMTPServerSession.greeting(hostname: settings.hostname, softwareName: settings.softwareName).rendered
        // A new socket's send buffer is empty: all of it goes, or the
        // client has reset the connection already.
        let sent = greeting.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
        guard sent == greeting.count else {
            core.logger.info("\(SessionLog.lostConnection(after: "CONNECT", client: "unknown[\(address)]"))")
            _ = closeDescriptor(fd)
            return .failed
        }
        return .sent
    }

    /// Runs an SMTP session on a plaintext socket from crypto-negotiate
    /// (implicit TLS): the session starts with TLS active.
    static func adoptPlaintext(_ established: TLSEstablished, kind: ListenerKind, peer: String,
                               core: SMTPServerCore, loop: EventLoop) {
        let handler = SMTPSessionHandlerFactory(core: core, kind: kind, socket: nil, peer: peer, tls: established)
        ClientBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(handler.make())
                }
            }
            .withConnectedSocket(established.plaintext)
            .whenFailure { error in
                core.logger.warning("\(kind.rawValue) plaintext socket from crypto-negotiate: \(error)")
            }
    }

    /// The numeric address of a connected socket's peer.
    static func peerAddress(_ fd: Int32) -> String? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
        }
        guard rc == 0, let address = socketAddress(storage) else { return nil }
        return address.ipAddress.map(NetworkPrefix.canonicalClientAddress)
    }

    /// "127.0.0.1:25", "[::1]:25".
    static func describe(_ address: SocketAddress) -> String {
        guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    /// Stops listening, asks every session to finish (a message in
    /// progress or waiting for the queue completes; idle sessions get
    /// 421 4.3.2), and after `grace` closes what is left.
    public func shutdown(grace: TimeAmount) -> EventLoopFuture<Void> {
        let loop = group.next()
        let bound = listeners.withLockedValue { l -> [BoundListener] in defer { l = [] }; return l }
        acceptor.stop()
        for listener in bound { _ = closeDescriptor(listener.fd) }
        let sessions = core.beginStopping()
        for channel in sessions {
            channel.pipeline.fireUserInboundEventTriggered(SMTPServerCore.ShutdownEvent())
        }
        let done = sessions.map { $0.closeFuture }
        let all = EventLoopFuture.andAllComplete(done, on: loop)
        let deadline = loop.scheduleTask(in: grace) {
            for channel in sessions { channel.close(promise: nil) }
        }
        let handoff = core.handoff
        let pools = core.injectPools
        return all.always { _ in
            deadline.cancel()
            handoff?.stop()
        }.flatMap { pools.closeAll(on: loop) }
    }
}

/// Makes a session handler on the channel's event loop (handlers are not
/// Sendable; this recipe is).
struct SMTPSessionHandlerFactory: Sendable {
    let core: SMTPServerCore
    let kind: ListenerKind
    let socket: Int32?
    var peer: String? = nil
    var tls: TLSEstablished? = nil
    /// The accepting thread's count of the connection.
    var admitted: SMTPServerCore.Admitted? = nil
    /// The accepting thread wrote the 220 already.
    var greeted = false

    func make() -> SMTPSessionHandler {
        SMTPSessionHandler(server: core, kind: kind, socket: socket, peer: peer, tls: tls,
                           admitted: admitted, greeted: greeted)
    }
}

/// The accept loop: one thread polling every listening socket. Accepted
/// sockets go to `adopt` (which hands them to NIO or crypto-negotiate).
/// `stop()` returns once the thread is gone: no socket is adopted after
/// it, so the event loops can be shut down safely (a channel registered on
/// a loop that is shutting down would leave NIO a promise it cannot fulfil).
final class Acceptor: Sendable {
    private let logger: Logger
    private let wake: (read: Int32, write: Int32)
    private let stopped = NIOLockedValueBox(false)
    /// 1 while the thread runs.
    private let running = ConditionLock(value: 0)

    init(logger: Logger) {
        self.logger = logger
        var fds: [Int32] = [-1, -1]
        precondition(sealpost_pipe_cloexec(&fds) == 0, "pipe: \(errno)")
        wake = (fds[0], fds[1])
    }

    /// `first` runs on the thread before anything is accepted; it is
    /// told whether `stop()` was called meanwhile.
    func run(_ listeners: [(Int32, ListenerKind)], first: @escaping @Sendable (_ stopped: () -> Bool) -> Void = { _ in },
             adopt: @escaping @Sendable (Int32, ListenerKind) -> Void) {
        let logger = self.logger
        let wake = self.wake
        let stopped = self.stopped
        let running = self.running
        running.lock()
        running.unlock(withValue: 1)
        StageRuntime.detachThread {
            defer {
                running.lock()
                running.unlock(withValue: 0)
            }
            first { stopped.withLockedValue { $0 } }
            var fds = listeners.map { pollfd(fd: $0.0, events: Int16(POLLIN), revents: 0) }
            fds.append(pollfd(fd: wake.read, events: Int16(POLLIN), revents: 0))
            var warned = false
            while !stopped.withLockedValue({ $0 }) {
                let n = poll(&fds, nfds_t(fds.count), -1)
                if n < 0 {
                    if errno == EINTR { continue }
                    logger.error("poll on the listeners: \(String(cString: strerror(errno)))")
                    return
                }
                if fds.last!.revents != 0 { return }
                for i in 0..<listeners.count where fds[i].revents != 0 {
                    // Several per wake-up, as many as are waiting.
                    for _ in 0..<64 {
                        let client = sealpost_accept_cloexec(listeners[i].0)
                        if client >= 0 {
                            warned = false
                            if stopped.withLockedValue({ $0 }) {
                                _ = closeDescriptor(client)
                                return
                            }
                            adopt(client, listeners[i].1)
                            continue
                        }
                        let e = errno
                        if e == EAGAIN || e == EWOULDBLOCK || e == ECONNABORTED || e == EINTR { break }
                        if !warned {
                            logger.warning("\(listeners[i].1.rawValue) listener: accept: \(String(cString: strerror(e)))")
                            warned = true
                        }
                        if e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM {
                            // Out of descriptors: wait a little, do not spin.
                            var none = pollfd()
                            _ = poll(&none, 0, 100)
                        }
                        break
                    }
                }
            }
        }
    }

    /// Stops the thread and waits until it has ended.
    func stop() {
        stopped.withLockedValue { $0 = true }
        var byte: UInt8 = 1
        _ = write(wake.write, &byte, 1)
        running.lock(whenValue: 0)
        running.unlock()
    }
}

#if canImport(Glibc)
import Glibc
private func closeDescriptor(_ fd: Int32) -> Int32 { Glibc.close(fd) }
#elseif canImport(Darwin)
import Darwin
private func closeDescriptor(_ fd: Int32) -> Int32 { Darwin.close(fd) }
#endif
