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
// Listeners are opened with accepting paused (autoRead off) so that no
// session starts before the process has dropped root and chrooted: every
// session then runs with the final privileges and paths.

import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

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

    init(settings: SMTPServiceSettings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    enum Admission: Equatable {
        case admitted
        /// The client would have this many sessions, over the limit.
        case tooMany(Int)
        case stopping
    }

    /// Counts a new session and says whether it may proceed. Every call is
    /// balanced by `unregister`, admitted or not.
    /// Trusted clients are exempt from the limit (as Postfix exempts
    /// $mynetworks with smtpd_client_event_limit_exceptions): a local
    /// relay or load generator may open as many sessions as it needs.
    func register(address: String, channel: Channel) -> Admission {
        let exempt = settings.isTrusted(address)
        return state.withLockedValue { s in
            let n = s.perClient[address, default: 0] + 1
            s.perClient[address] = n
            s.channels[ObjectIdentifier(channel)] = channel
            if s.stopping { return .stopping }
            return exempt || n <= settings.limits.sessionsPerClient ? .admitted : .tooMany(n)
        }
    }

    func unregister(address: String, channel: Channel) {
        state.withLockedValue { s in
            let n = s.perClient[address, default: 1] - 1
            s.perClient[address] = n > 0 ? n : nil
            s.channels[ObjectIdentifier(channel)] = nil
        }
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
    let channel: Channel
}

public final class SMTPServer: Sendable {
    private let core: SMTPServerCore
    private let group: EventLoopGroup
    private let listeners = NIOLockedValueBox<[BoundListener]>([])

    public init(settings: SMTPServiceSettings, group: EventLoopGroup, logger: Logger) {
        self.core = SMTPServerCore(settings: settings, logger: logger)
        self.group = group
    }

    public var settings: SMTPServiceSettings { core.settings }

    /// Open sessions right now.
    public var sessionCount: Int { core.sessionCount }

    /// Opens (binds, or adopts) the listeners, not yet accepting. smtps
    /// listeners are skipped: implicit TLS needs crypto-negotiate, which
    /// does not exist yet (logged once); an inherited smtps descriptor is
    /// closed so that clients are refused instead of left waiting.
    public func open(_ specs: [ListenerSpec]) -> EventLoopFuture<[BoundListener]> {
        var futures: [EventLoopFuture<BoundListener>] = []
        var warnedSMTPS = false
        for spec in specs {
            if spec.kind == .smtps {
                if !warnedSMTPS {
                    core.logger.warning("smtps (implicit TLS, RFC 8314) is not served yet: it waits for crypto-negotiate")
                    warnedSMTPS = true
                }
                if case .inherited(let fd) = spec.source { _ = closeDescriptor(fd) }
                continue
            }
            futures.append(open(spec))
        }
        let loop = group.next()
        return EventLoopFuture.whenAllSucceed(futures, on: loop).map { bound in
            self.listeners.withLockedValue { $0.append(contentsOf: bound) }
            return bound
        }
    }

    private func open(_ spec: ListenerSpec) -> EventLoopFuture<BoundListener> {
        let core = self.core
        let kind = spec.kind
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.autoRead, value: false)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(SMTPSessionHandler(server: core, kind: kind))
                }
            }
        let future: EventLoopFuture<Channel>
        switch spec.source {
        case .bind(let address):
            future = bootstrap.bind(host: address.host, port: address.port)
        case .inherited(let fd):
            future = bootstrap.withBoundSocket(fd)
        }
        return future.flatMap { channel in
            // After NIO's accept handler, where its errors arrive.
            channel.pipeline.addHandler(AcceptErrorLogger(logger: core.logger, kind: kind)).map {
                BoundListener(kind: kind, address: channel.localAddress, channel: channel)
            }
        }.flatMapErrorThrowing { error in
            throw ListenerError("\(spec): \(error)")
        }
    }

    /// Starts taking connections on every open listener.
    public func startAccepting() {
        for listener in listeners.withLockedValue({ $0 }) {
            let addr = listener.address.map(Self.describe) ?? "?"
            core.logger.info("listening for \(listener.kind.rawValue) on \(addr)")
            listener.channel.setOption(.autoRead, value: true).whenComplete { _ in
                listener.channel.read()
            }
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
        let closed = bound.map { $0.channel.close().recover { _ in } }
        return EventLoopFuture.andAllComplete(closed, on: loop).flatMap {
            let sessions = self.core.beginStopping()
            for channel in sessions {
                channel.pipeline.fireUserInboundEventTriggered(SMTPServerCore.ShutdownEvent())
            }
            let done = sessions.map { $0.closeFuture }
            let all = EventLoopFuture.andAllComplete(done, on: loop)
            let deadline = loop.scheduleTask(in: grace) {
                for channel in sessions { channel.close(promise: nil) }
            }
            return all.always { _ in deadline.cancel() }
        }
    }
}

/// Logs what goes wrong on a listening socket (accept failing for lack of
/// descriptors, a child channel that could not be set up); NIO keeps
/// accepting after such errors.
final class AcceptErrorLogger: ChannelInboundHandler, Sendable {
    typealias InboundIn = Any
    private let logger: Logger
    private let kind: ListenerKind

    init(logger: Logger, kind: ListenerKind) {
        self.logger = logger
        self.kind = kind
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.warning("\(kind.rawValue) listener: \(error)")
    }
}

#if canImport(Glibc)
import Glibc
private func closeDescriptor(_ fd: Int32) -> Int32 { Glibc.close(fd) }
#elseif canImport(Darwin)
import Darwin
private func closeDescriptor(_ fd: Int32) -> Int32 { Darwin.close(fd) }
#endif
