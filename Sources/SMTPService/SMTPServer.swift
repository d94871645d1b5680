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
// runs with the final privileges and paths. Connections are accepted on
// an event loop (NIO's ServerBootstrap on each listening descriptor), and
// each session runs on the next loop of the group: with one loop (the
// default up to three cores) a connection is accepted, set up and greeted
// in one go, on one thread. Its TCP descriptor, which STARTTLS (or port
// 465) hands to crypto-negotiate (TLSHandoff), comes from NIO's channel.

import DNS
import StageRuntime
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import SMTP

/// State shared by every session of a server (all event loops): settings,
/// logger, the sessions per client address.
final class SMTPServerCore: Sendable {
    let settings: SMTPServiceSettings
    /// "by HOST (SOFTWARE)" of every Received header, made once.
    let receivedBy: ReceivedHeader.By
    /// Each kind of listener's session policy, made once (see
    /// `policy(for:client:)`).
    private let listenerPolicies: [ListenerKind: SMTPServerPolicy]
    let logger: Logger
    private let state = NIOLockedValueBox(State())
    /// Password checks waiting or running: in all, and per counted client.
    private let pendingAuthentications = NIOLockedValueBox((total: 0, perClient: [String: Int]()))

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

    /// Reserves a place for a password check of the client at `address`;
    /// false when `maxPendingAuthentications` are already waiting or
    /// running, or an eighth of them (at least one) for this client (its
    /// address, or its IPv6 prefix, as the session limit counts it): a
    /// few addresses guessing passwords must not take every place from
    /// the users who submit mail.
    func beginAuthentication(address: String) -> Bool {
        let client = Self.countedClient(address, ipv6PrefixLength: settings.limits.ipv6PrefixLength)
        let share = max(1, settings.maxPendingAuthentications / 8)
        return pendingAuthentications.withLockedValue { p in
            let mine = p.perClient[client, default: 0]
            guard p.total < settings.maxPendingAuthentications, mine < share else { return false }
            p.total += 1
            p.perClient[client] = mine + 1
            return true
        }
    }

    func endAuthentication(address: String) {
        let client = Self.countedClient(address, ipv6PrefixLength: settings.limits.ipv6PrefixLength)
        pendingAuthentications.withLockedValue { p in
            p.total -= 1
            let left = p.perClient[client, default: 1] - 1
            p.perClient[client] = left > 0 ? left : nil
        }
    }

    struct State {
        var perClient: [String: Int] = [:]
        var channels: [ObjectIdentifier: Channel] = [:]
        /// smtps connections with crypto-negotiate (see `beginHandshake`),
        /// per counted client and in all.
        var handshakes: [String: Int] = [:]
        var handshakeCount = 0
        var stopping = false
        /// Told once no session is left (see `whenNoSessions`).
        var noSessions: [EventLoopPromise<Void>] = []
    }

    /// Asks a session to end at its next quiet moment (421 4.3.2).
    struct ShutdownEvent: Sendable {}

    /// nil: no TLS (no certificate configured).
    let handoff: TLSHandoff?

    /// Idle inject connections per event loop (InjectPool.swift).
    let injectPools: InjectPools
    /// The sessions' timeouts per event loop (SessionClock.swift).
    let sessionClocks = SessionClocks()

    init(settings: SMTPServiceSettings, logger: Logger, handoff: TLSHandoff? = nil) {
        self.settings = settings
        injectPools = InjectPools(capacity: 32, idleTime: .seconds(settings.timeouts.injectPoolIdle))
        receivedBy = ReceivedHeader.By(hostname: settings.hostname, softwareName: settings.softwareName)
        listenerPolicies = Dictionary(uniqueKeysWithValues: ListenerKind.allCases.map { ($0, settings.policy(for: $0)) })
        self.logger = logger
        self.handoff = handoff
    }

    /// The session policy for a client of a listener of `kind`.
    func policy(for kind: ListenerKind, client address: String) -> SMTPServerPolicy {
        // Every kind is in the table (made from ListenerKind.allCases).
        settings.policy(from: listenerPolicies[kind]!, client: address)
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
        /// The client (`countedClient`: an IPv6 client's network) would
        /// have this many sessions, over the limit.
        case tooMany(Int, client: String)
        /// The server holds `limits.sessions` sessions already.
        case full(Int)
        case stopping
    }

    /// Counts a new session and says whether it may proceed. Every call is
    /// balanced by `unregister`, admitted or not.
    /// Trusted clients (`trusted`: the caller's `settings.isTrusted`, which
    /// it needs anyway) are exempt from the limit (as Postfix exempts
    /// $mynetworks with smtpd_client_event_limit_exceptions): a local
    /// relay or load generator may open as many sessions as it needs.
    /// The limit of sessions in all applies to every client: it bounds
    /// what the process holds (sessions being refused count too, until
    /// they are closed: they hold a descriptor).
    /// `fromHandshake`: the session of an smtps handshake that
    /// `beginHandshake` counted, which becomes the session's count here, in
    /// the same step (no other connection can take its place meanwhile).
    func register(address: String, trusted exempt: Bool, channel: Channel, fromHandshake: Bool = false) -> Admission {
        let client = Self.countedClient(address, ipv6PrefixLength: settings.limits.ipv6PrefixLength)
        return state.withLockedValue { s in
            if fromHandshake { Self.endHandshake(client, in: &s) }
            let n = s.perClient[client, default: 0] + 1
            s.perClient[client] = n
            s.channels[ObjectIdentifier(channel)] = channel
            if s.stopping { return .stopping }
            return admission(in: s, client: client, exempt: exempt, sessions: n + s.handshakes[client, default: 0])
        }
    }

    /// Whether a session (or handshake) just counted in `s` may proceed,
    /// its client having `sessions` (handshakes included).
    private func admission(in s: State, client: String, exempt: Bool, sessions: Int) -> Admission {
        if s.channels.count + s.handshakeCount > settings.limits.sessions { return .full(settings.limits.sessions) }
        return exempt || sessions <= settings.limits.sessionsPerClient ? .admitted : .tooMany(sessions, client: client)
    }

    /// A connection to an smtps listener, about to be handed to
    /// crypto-negotiate: its session is registered only once the plaintext
    /// socket comes back, so until then (`endHandshake`) the handshake
    /// counts, for its client and in all, and is refused past the limits
    /// as a session would be. Not admitted: nothing is counted.
    func beginHandshake(address: String, trusted exempt: Bool) -> Admission {
        let client = Self.countedClient(address, ipv6PrefixLength: settings.limits.ipv6PrefixLength)
        return state.withLockedValue { s in
            if s.stopping { return .stopping }
            s.handshakes[client, default: 0] += 1
            s.handshakeCount += 1
            let sessions = s.perClient[client, default: 0] + s.handshakes[client, default: 0]
            let admission = admission(in: s, client: client, exempt: exempt, sessions: sessions)
            if admission != .admitted { Self.endHandshake(client, in: &s) }
            return admission
        }
    }

    /// The handshake `beginHandshake` admitted has ended without a session
    /// (failed, given up, or its plaintext socket could not be adopted).
    func endHandshake(address: String) {
        let client = Self.countedClient(address, ipv6PrefixLength: settings.limits.ipv6PrefixLength)
        state.withLockedValue { Self.endHandshake(client, in: &$0) }
    }

    private static func endHandshake(_ client: String, in s: inout State) {
        let n = s.handshakes[client, default: 0] - 1
        assert(n >= 0 && s.handshakeCount > 0, "a handshake of \(client) uncounted twice")
        s.handshakes[client] = n > 0 ? n : nil
        s.handshakeCount = max(0, s.handshakeCount - 1)
    }

    /// smtps handshakes in progress (for tests).
    var handshakeCount: Int { state.withLockedValue { $0.handshakeCount } }

    func unregister(address: String, channel: Channel) {
        let waiting = state.withLockedValue { s -> [EventLoopPromise<Void>] in
            Self.uncount(Self.countedClient(address, ipv6PrefixLength: settings.limits.ipv6PrefixLength), in: &s)
            s.channels[ObjectIdentifier(channel)] = nil
            guard s.channels.isEmpty else { return [] }
            defer { s.noSessions = [] }
            return s.noSessions
        }
        for promise in waiting { promise.succeed(()) }
    }

    /// Succeeds once every session has ended: a session lives on after
    /// STARTTLS in another channel (`replace`), so the channels a stop
    /// found may all be closed while sessions still run.
    func whenNoSessions(on loop: EventLoop) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        let done = state.withLockedValue { s -> Bool in
            if s.channels.isEmpty { return true }
            s.noSessions.append(promise)
            return false
        }
        if done { promise.succeed(()) }
        return promise.futureResult
    }

    /// The sessions' channels now (after STARTTLS, the plaintext ones).
    var sessionChannels: [Channel] { state.withLockedValue { Array($0.channels.values) } }

    var isStopping: Bool { state.withLockedValue { $0.stopping } }

    private static func uncount(_ client: String, in s: inout State) {
        let n = s.perClient[client, default: 1] - 1
        s.perClient[client] = n > 0 ? n : nil
    }

    /// What the sessions-per-client limit counts: an IPv4 address, or an
    /// IPv6 address's first `ipv6PrefixLength` bits (a /64 is one network,
    /// and its owner can use every address in it). As "2001:db8::/64"
    /// (masked, RFC 5952 text); anything else (no address) as it is.
    static func countedClient(_ address: String, ipv6PrefixLength: Int) -> String {
        guard ipv6PrefixLength < 128, address.utf8.contains(UInt8(ascii: ":")),
              case .v6(let v6)? = IPAddress(text: address) else { return address }
        let masked = NetworkPrefix.masked(v6.bytes, ipv6PrefixLength)
        guard let prefix = IPv6Address(bytes: masked) else { return address }
        return "\(prefix)/\(ipv6PrefixLength)"
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

    /// Where accepting stands. Once `serving`, NIO owns the listening
    /// descriptors (closing a server channel closes its descriptor).
    private enum Accepting {
        case notYet
        /// The server channels, as their registrations complete.
        case serving([EventLoopFuture<Channel>])
        case stopped
    }
    private let accepting = NIOLockedValueBox(Accepting.notYet)

    /// Whether a shutdown has begun to stop the sessions.
    var isStopping: Bool { core.isStopping }

    /// The connection to crypto-negotiate (for tests).
    var tlsHandoff: TLSHandoff? { core.handoff }
    /// smtps handshakes counted (for tests).
    var handshakeCount: Int { core.handshakeCount }

    /// Told when a listener stops taking connections while the server is
    /// not stopping (NIO closes a server channel on an accept error it
    /// cannot wait out, or could not register it): smtp-listen exits then,
    /// so that the supervisor starts it again on its listening sockets.
    private let listenerLost: (@Sendable (String) -> Void)?

    public init(settings: SMTPServiceSettings, group: EventLoopGroup, logger: Logger,
                listenerLost: (@Sendable (String) -> Void)? = nil) {
        let handoff = settings.tlsSocket.map { TLSHandoff(socketPath: $0, logger: logger, serverUIDs: settings.tlsServerUIDs) }
        self.core = SMTPServerCore(settings: settings, logger: logger, handoff: handoff)
        self.group = group
        self.listenerLost = listenerLost
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

    /// Binds (or adopts) one listening socket; NIO takes it over when
    /// accepting starts (`serve`).
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
        // NIO's server channel expects a non-blocking listener.
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
        guard let handoff = core.handoff else { return serve(bound) }
        // The first clients are offered STARTTLS too: accepting waits (they
        // wait in the listen backlog) until crypto-negotiate, started just
        // before smtp-listen, has answered, for tlsStartWait at most.
        let core = self.core
        StageRuntime.detachThread { [self] in
            let wait = core.settings.tlsStartWait
            let stopped = { [self] in if case .stopped = accepting.withLockedValue({ $0 }) { true } else { false } }
            if !handoff.waitUntilAvailable(seconds: wait, cancelled: stopped) && !stopped() {
                core.logger.warning("crypto-negotiate did not answer within \(wait) s of the start: accepting without STARTTLS until it does")
            }
            serve(bound)
        }
    }

    /// Hands the listening descriptors to NIO, unless the server stopped
    /// meanwhile (`shutdown` then closed them). (One server channel per
    /// listener: NIO does not expect several event loops to wait on one
    /// socket, where all but one find nothing to accept.)
    private func serve(_ bound: [BoundListener]) {
        accepting.withLockedValue { state in
            guard case .notYet = state else { return }
            state = .serving(bound.map(serverChannel))
        }
    }

    /// One listener's server channel: every connection accepted on it
    /// becomes a session (`SMTPSessionHandler`) on the group's next event
    /// loop, or (465) goes to crypto-negotiate first.
    private func serverChannel(_ listener: BoundListener) -> EventLoopFuture<Channel> {
        let kind = listener.kind
        let name = "\(kind.rawValue) listener on \(listener.address.map(Self.describe) ?? "?")"
        let core = self.core
        let logger = core.logger
        // TCP_NODELAY (set on the listener by ServerBootstrap, inherited by
        // each connection): replies are whole, and each is awaited.
        let served = ServerBootstrap(group: group)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let operations = channel.pipeline.syncOperations
                    // NIO listens again with a backlog of 128 on a socket it
                    // adopts; the socket keeps the system's maximum, as the
                    // supervisor set it, for the clients that wait while
                    // smtp-listen restarts or descriptors run out.
                    _ = try operations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
                        listen($0, SOMAXCONN)
                    }
                    try operations.addHandler(ListenerErrors(listener: name, logger: logger))
                }
            }
            // The options are set here, before the channel is registered,
            // rather than as childChannelOptions, which NIO applies one
            // future at a time for every connection.
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard let options = channel.syncOptions else { throw ChannelError.operationUnsupported }
                    try options.setOption(.allowRemoteHalfClosure, value: true)
                    // One read per read request: after STARTTLS not a byte
                    // more is read here; what follows belongs to
                    // crypto-negotiate. On 465 nothing is read at all.
                    try options.setOption(.maxMessagesPerRead, value: 1)
                    // NIO reads by itself unless told not to (autoRead is on
                    // by default): only 465 turns it off. Each option set
                    // costs a chain of dynamic casts in NIO, per connection.
                    if kind == .smtps { try options.setOption(.autoRead, value: false) }
                    let operations = channel.pipeline.syncOperations
                    if kind == .smtps {
                        try operations.addHandler(ImplicitTLSHandoff(core: core))
                    } else {
                        try operations.addHandler(SMTPSessionHandler(server: core, kind: kind, tcp: true))
                    }
                }
            }
            .withBoundSocket(listener.fd)
        let lost: @Sendable (String) -> Void = { [self] why in
            if case .stopped = accepting.withLockedValue({ $0 }) { return }
            logger.error("\(name): \(why)")
            listenerLost?("\(name): \(why)")
        }
        served.whenComplete { result in
            switch result {
            case .success(let channel):
                channel.closeFuture.whenComplete { _ in lost("no longer accepts connections") }
            case .failure(let error):
                lost("cannot accept: \(error)")
            }
        }
        return served
    }

    /// A duplicate (close-on-exec) of a TCP channel's descriptor, for
    /// crypto-negotiate; NIO keeps its own, valid only inside the closure.
    static func duplicateDescriptor(of channel: ChannelPipeline.SynchronousOperations) -> Result<Int32, TLSHandoffFailure> {
        let copy: Int32?
        do {
            copy = try channel.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
                fcntl($0, F_DUPFD_CLOEXEC, 0)
            }
        } catch let error as IOError {
            return .failure(TLSHandoffFailure(status: "4.4.2", text: "the connection is gone: \(String(cString: strerror(error.errnoCode)))"))
        } catch {
            return .failure(TLSHandoffFailure(status: "4.4.2", text: "the connection is gone: \(error)"))
        }
        guard let copy else { return .failure(TLSHandoffFailure(status: "4.3.0", text: "not a TCP connection")) }
        guard copy >= 0 else { return .failure(TLSHandoffFailure(status: "4.3.0", text: "dup: \(String(cString: strerror(errno)))")) }
        return .success(copy)
    }

    /// A connection to an smtps listener (port 465): TLS from the first
    /// byte, so its descriptor goes to crypto-negotiate before anything is
    /// read (the child channel does not read), and the session runs on the
    /// plaintext socket that comes back.
    final class ImplicitTLSHandoff: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        private let core: SMTPServerCore

        init(core: SMTPServerCore) {
            self.core = core
        }

        func channelActive(context: ChannelHandlerContext) {
            let address = context.channel.remoteAddress?.ipAddress.map(NetworkPrefix.canonicalClientAddress)
            let peer = address.map { "[\($0)]" } ?? "unknown"
            let counted = address ?? "unknown"
            defer { context.close(promise: nil) }
            guard let handoff = core.handoff, handoff.isAvailable else {
                core.logger.warning("smtps connection from \(peer) refused: crypto-negotiate is not available")
                return
            }
            // No reply is possible before TLS: a refused connection is closed.
            switch core.beginHandshake(address: counted, trusted: core.settings.isTrusted(counted)) {
            case .admitted:
                break
            case .tooMany(let count, _):
                core.logger.warning("\(SessionLog.tooManyConnections(count, client: "unknown\(peer)", service: .smtps))")
                return
            case .full(let limit):
                core.logger.warning("\(SessionLog.tooManySessions(limit, client: "unknown\(peer)", service: .smtps))")
                return
            case .stopping:
                return
            }
            // crypto-negotiate gets a copy: closing this channel then
            // closes only NIO's descriptor, not the connection.
            let copy: Int32
            switch SMTPServer.duplicateDescriptor(of: context.pipeline.syncOperations) {
            case .success(let fd): copy = fd
            case .failure(let failure):
                core.endHandshake(address: counted)
                core.logger.warning("smtps connection from \(peer) refused: \(failure.text)")
                return
            }
            let core = self.core
            let loop = context.eventLoop
            // crypto-negotiate's handshake timeout answers every request; if
            // it stops answering, the request is given up after the hand-off
            // timeout (as a STARTTLS session does), not kept until the
            // control connection drops. Set below, before the task can run.
            let request = NIOLoopBoundBox(UInt64(0), eventLoop: loop)
            let expiry = loop.scheduleTask(in: .seconds(core.settings.tlsHandoffTimeout)) {
                // Else the answer came meanwhile: its completion counts down.
                guard handoff.abandon(request.value) else { return }
                core.endHandshake(address: counted)
                core.logger.info("TLS handshake failed on smtps with \(peer): no answer from crypto-negotiate")
            }
            request.value = handoff.negotiate(socket: copy, peer: peer) { result in
                expiry.cancel()
                switch result {
                case .success(let established):
                    // The handshake's count becomes the session's (register).
                    SMTPServer.adoptPlaintext(established, kind: .smtps, peer: counted, core: core, loop: loop)
                case .failure(let failure):
                    core.endHandshake(address: counted)
                    core.logger.info("TLS handshake failed on smtps with \(peer): \(failure.text)")
                }
            }
        }
    }

    /// What goes wrong on a listener. Out of descriptors or memory, it
    /// stops accepting for a second: the connections wait in the backlog,
    /// and the event loop does not spin on a listener that stays readable
    /// (NIO's AcceptBackoffHandler does not prevent that: after a failed
    /// accept NIO keeps its read pending, and the socket registered). Each
    /// error is logged once a minute at most; a client that gave up before
    /// its connection was accepted (ECONNABORTED) is not logged. Any other
    /// error closes the listener (NIO), which `listenerLost` reports.
    final class ListenerErrors: ChannelInboundHandler {
        typealias InboundIn = Channel
        private let listener: String
        private let logger: Logger
        private var logged: [String: NIODeadline] = [:]
        static let pause = TimeAmount.seconds(1)

        init(listener: String, logger: Logger) {
            self.listener = listener
            self.logger = logger
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            let code = (error as? IOError)?.errnoCode
            if code != ECONNABORTED {
                let text = code.map { String(cString: strerror($0)) } ?? "\(error)"
                let now = NIODeadline.now()
                if logged[text].map({ now - $0 > .minutes(1) }) ?? true {
                    logger.warning("\(listener): accept: \(text)")
                    logged[text] = now
                }
            }
            // Paused: autoRead is off until the scheduled task turns it on.
            if let code, [EMFILE, ENFILE, ENOBUFS, ENOMEM].contains(code), let options = context.channel.syncOptions,
               (try? options.getOption(.autoRead)) == true, (try? options.setOption(.autoRead, value: false)) != nil {
                context.eventLoop.assumeIsolated().scheduleTask(in: Self.pause) {
                    try? options.setOption(.autoRead, value: true)
                }
            }
            context.fireErrorCaught(error)
        }
    }

    /// Runs an SMTP session on a plaintext socket from crypto-negotiate
    /// (implicit TLS): the session starts with TLS active. `peer`: the
    /// client's address, as its handshake was counted (the count ends
    /// here if the socket cannot be adopted).
    static func adoptPlaintext(_ established: TLSEstablished, kind: ListenerKind, peer: String,
                               core: SMTPServerCore, loop: EventLoop) {
        ClientBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        SMTPSessionHandler(server: core, kind: kind, peer: peer, tls: established))
                }
            }
            .withConnectedSocket(established.plaintext)
            .whenFailure { error in
                core.endHandshake(address: peer)
                core.logger.warning("\(kind.rawValue) plaintext socket from crypto-negotiate: \(error)")
            }
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
        let before = accepting.withLockedValue { state -> Accepting in defer { state = .stopped }; return state }
        let closed: EventLoopFuture<Void>
        switch before {
        case .notYet, .stopped:
            for listener in bound { _ = closeDescriptor(listener.fd) }
            closed = loop.makeSucceededVoidFuture()
        case .serving(let servers):
            // A listener whose registration failed is closed already.
            let closing = servers.map { server in
                server.flatMap { $0.close() }.recover { _ in }
            }
            closed = EventLoopFuture.andAllComplete(closing, on: loop)
        }
        // The sessions are asked to stop once no listener takes more. One
        // accepted just before, whose channel becomes active only later
        // (on another event loop), is told 421 by `register`.
        return closed.flatMap { self.stopSessions(grace: grace, on: loop) }
    }

    private func stopSessions(grace: TimeAmount, on loop: EventLoop) -> EventLoopFuture<Void> {
        let sessions = core.beginStopping()
        for channel in sessions {
            channel.pipeline.fireUserInboundEventTriggered(SMTPServerCore.ShutdownEvent())
        }
        let all = core.whenNoSessions(on: loop)
        let core = self.core
        let deadline = loop.scheduleTask(in: grace) {
            for channel in core.sessionChannels { channel.close(promise: nil) }
        }
        let handoff = core.handoff
        let pools = core.injectPools
        return all.always { _ in
            deadline.cancel()
            handoff?.stop()
        }.flatMap { pools.closeAll(on: loop) }
    }
}

#if canImport(Glibc)
import Glibc
private func closeDescriptor(_ fd: Int32) -> Int32 { Glibc.close(fd) }
#elseif canImport(Darwin)
import Darwin
private func closeDescriptor(_ fd: Int32) -> Int32 { Darwin.close(fd) }
#endif
