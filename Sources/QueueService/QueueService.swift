// The queue service: the three Unix-socket servers (inject, deliver,
// control) around one QueueEngine, on one NIO event loop.

#if canImport(Glibc)
import Glibc
#endif
import CSystemShims
import Logging
import NIOCore
import NIOPosix
import SealpostConfig
import Spool
import StageProtocol
import StageProtocolNIO
import StageRuntime

/// Knobs that tests turn; the defaults are for production.
public struct QueueServiceOptions: Sendable {
    /// Unix time in seconds. Tests pass a clock they move by hand, so that
    /// backoff, expiry and delay notices are tested without waiting.
    public var clock: @Sendable () -> UInt64 = { UInt64(time(nil)) }
    /// Uniform in 0..<1, for the backoff jitter.
    public var random: @Sendable () -> Double = { Double.random(in: 0..<1) }
    public var jitter: Double = 0.1
    /// How often due messages are looked for (they are also dispatched at
    /// once on every event that can make one due).
    public var tick: TimeAmount = .seconds(1)
    /// Whole-queue scan (expiry, delay notices) every queue_run_delay, at
    /// most every `maximumMaintenanceInterval` seconds.
    public var maximumMaintenanceInterval: UInt64 = 60
    /// Seconds a transport may go without a delivery stage before its due
    /// messages are reported as suspended ("delivery temporarily
    /// suspended", recipients shown deferred). The delivery stages start
    /// after the queue and a dead one is restarted within seconds: without
    /// the grace every start with a backlog logged each message as
    /// deferred, and so did a message that came in before the stages
    /// connected.
    public var suspensionGrace: UInt64 = 10
    /// Jobs lost in a row (stage died) before a loss counts as an attempt.
    public var lostJobLimit = 3
    /// Postfix's default_destination_recipient_limit.
    public var maxRecipientsPerJob = 50
    /// Log the statistics every this many seconds (0: only on demand).
    public var statisticsInterval: Int64 = 3600
    /// Peers the deliver socket refuses, by uid (the users of stages that
    /// face the network and deliver nothing), with the stage's name.
    public var refusedDeliveryPeers: [UInt32: String] = [:]
    /// smtp-listen's uid, known when the stages run as their own users:
    /// the one peer whose client address the queue takes at its word.
    public var smtpListenUID: UInt32?
    /// Bytes of message bodies the inject connections may hold before END
    /// (see PendingBodies); one peer uid at most half of it.
    public var pendingBodyLimit = PendingBodies.defaultLimit()
    /// Inject connections one local user may hold open at once, and the
    /// uids not bounded (see QueueEngine.admitInjectConnection). nil: no
    /// bound (when the stages share one user, the queue cannot tell
    /// smtp-listen from the others); the queue sets it when it runs as root.
    public var injectConnectionLimit: (perUser: Int, unbounded: Set<UInt32>)?
    /// An inject connection idle this long (no transaction open, no answer
    /// due, nothing received) is closed: each holds a descriptor, and the
    /// socket is open to every local user. Never inside a transaction
    /// (PROTOCOL.md 4.2 says why). 300 s, as Postfix's ipc_idle and
    /// smtpd_timeout; smtp-listen's pool lets its idle connections go
    /// sooner (SMTPTimeouts.injectPoolIdle).
    public var injectIdleTimeout: TimeAmount = .seconds(300)

    public init() {}

    func maintenanceInterval(_ settings: QueueSettings) -> UInt64 {
        max(1, min(UInt64(max(1, settings.queueRunDelay)), maximumMaintenanceInterval))
    }
}

public struct QueueServiceError: Error, CustomStringConvertible {
    public var message: String
    /// 73 (cannot create) for sockets, 71 (OS error) for the spool.
    public var exitCode: ExitCode
    public var description: String { message }
}

public final class QueueService: @unchecked Sendable {
    public static let software = "sealpost-queue 0.1"

    private let group: MultiThreadedEventLoopGroup
    private let engine: QueueEngine
    private let paths: RuntimePaths
    private var servers: [Channel] = []
    private let children: ChannelSet
    private var timers: [RepeatedTask] = []

    /// `paths`: where the sockets go (StageRuntime.dropPrivileges's answer).
    /// The spool is opened by the caller and belongs to the service from now
    /// on (it closes it in `stop`).
    public init(configuration: SealpostConfiguration, paths: RuntimePaths, spool: Spool,
                options: QueueServiceOptions = QueueServiceOptions(), logger: Logger = Logger(label: "queue")) {
        // One loop: the engine's state is confined to it (no locks); the
        // expensive work (fsync) happens on the spool's committer thread.
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        engine = QueueEngine(loop: group.next(), spool: spool, config: configuration, options: options, logger: logger)
        self.paths = paths
        children = ChannelSet(loop: engine.loop)
        // The lines of a tick (a commit's accepted messages, say) go out
        // in one write.
        let loop = engine.loop
        loop.execute { StageLogHandler.holdLinesOnThisThread { flush in loop.execute(flush) } }
    }

    /// Listens on the sockets (a stale socket file is removed first), loads
    /// the schedule from the spool, then serves the sockets and starts the
    /// timers. The sockets listen before the load: with a large spool it
    /// takes seconds (about 2-4 s per 100,000 messages), and a client that
    /// connects meanwhile (smtp-listen, right after a restart) waits in the
    /// backlog for it rather than being refused (its clients would get 451).
    public func start() throws {
        let engine = self.engine
        // Until `serve` gives each to NIO, the descriptors are ours to close.
        var listening: [Int32] = []
        var served = 0
        defer { for fd in listening.dropFirst(served) { close(fd) } }
        listening.append(try listen(paths.injectSocket, mode: 0o666, group: nil))
        listening.append(try listen(paths.deliverSocket, mode: 0o660, group: groupOf(paths.runtimeDirectory)))
        listening.append(try listen(paths.controlSocket, mode: 0o600, group: nil))
        let (inject, deliver, control) = (listening[0], listening[1], listening[2])
        do {
            try engine.loop.submit { try engine.load() }.wait()
        } catch {
            throw QueueServiceError(message: "cannot read the spool: \(error)", exitCode: .osErr)
        }
        let children = self.children
        served = 1
        try serve(inject, paths.injectSocket) { channel in
            children.add(channel, inject: true)
            return channel.pipeline.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandlers([
                    ByteToMessageHandler(FrameDecoderHandler(protocol: .inject, direction: .clientToServer)),
                    // The answers of a flush in one send(2) when the socket
                    // takes them (one per message under load), NIO otherwise.
                    CoalescingFrameEncoder(protocol: .inject, direction: .serverToClient),
                    InjectHandler(engine: engine),
                ])
            }
        }
        served = 2
        try serve(deliver, paths.deliverSocket) { channel in
            children.add(channel)
            return channel.pipeline.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandlers([
                    ByteToMessageHandler(FrameDecoderHandler(protocol: .deliver, direction: .clientToServer)),
                    MessageToByteHandler(FrameEncoderHandler(protocol: .deliver, direction: .serverToClient)),
                    DeliverHandler(engine: engine),
                ])
            }
        }
        served = 3
        try serve(control, paths.controlSocket) { channel in
            children.add(channel)
            return channel.pipeline.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandlers([
                    ByteToMessageHandler(FrameDecoderHandler(protocol: .control, direction: .clientToServer)),
                    MessageToByteHandler(FrameEncoderHandler(protocol: .control, direction: .serverToClient)),
                    ControlHandler(engine: engine),
                ])
            }
        }
        let options = engine.options
        timers.append(engine.loop.scheduleRepeatedTask(initialDelay: options.tick, delay: options.tick) { _ in
            engine.tick()
        })
        if options.statisticsInterval > 0 {
            let every = TimeAmount.seconds(options.statisticsInterval)
            timers.append(engine.loop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in
                engine.logStatistics()
            })
        }
        engine.logger.info("daemon started: \(Self.software), inject=\(paths.injectSocket)")
    }

    private func groupOf(_ directory: String) -> gid_t? {
        var st = stat()
        return stat(directory, &st) == 0 ? st.st_gid : nil
    }

    /// Connections that may wait for the queue (while it loads the spool,
    /// and under load).
    static let backlog: Int32 = 256

    /// A listening socket at `path`, with `mode` and `group`: inject 0666
    /// (any local program may submit mail: the queue decides); deliver
    /// 0660 with the group of the runtime directory ("sealpost" in an
    /// installation), since the delivery stages run as their own users,
    /// members of it; control 0600 (the queue's user, and root). It listens
    /// only once its mode is set: before, a connection is refused (which
    /// smtp-listen tries again), not denied. A stale socket file is
    /// replaced; any other file there is an error.
    private func listen(_ path: String, mode: mode_t, group: gid_t?) throws -> Int32 {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw QueueServiceError(message: "cannot listen on \(path): it exists and is not a socket",
                                        exitCode: .canTCreat)
            }
            unlink(path)
        }
        let fd = sealpost_unix_bind(path)
        guard fd >= 0 else {
            throw QueueServiceError(message: "cannot bind \(path): \(String(cString: strerror(errno)))",
                                    exitCode: .canTCreat)
        }
        if let group, chown(path, uid_t.max, group) != 0 {
            engine.logger.warning("cannot give \(path) to group \(group): \(String(cString: strerror(errno)))")
        }
        if chmod(path, mode) != 0 || Glibc.listen(fd, Self.backlog) != 0 {
            let reason = "\(path): \(String(cString: strerror(errno)))"
            close(fd)
            throw QueueServiceError(message: "cannot listen on \(reason)", exitCode: .canTCreat)
        }
        return fd
    }

    /// Serves the listening socket `fd` (made by `listen` for `path`).
    private func serve(_ fd: Int32, _ path: String,
                       initializer: @escaping @Sendable (Channel) -> EventLoopFuture<Void>) throws {
        do {
            let channel = try ServerBootstrap(group: self.group)
                .serverChannelInitializer { channel in
                    // NIO listens again, with a backlog of 128, on a socket
                    // it adopts: the queue's own stays.
                    channel.eventLoop.makeCompletedFuture {
                        _ = try channel.pipeline.syncOperations.withUnsafeTransportIfAvailable(
                            of: NIOBSDSocket.Handle.self) { Glibc.listen($0, Self.backlog) }
                    }
                }
                .childChannelInitializer(initializer)
                .withBoundSocket(fd)
                .wait()
            servers.append(channel)
        } catch {
            throw QueueServiceError(message: "cannot listen on \(path): \(error)", exitCode: .canTCreat)
        }
    }

    /// The counters of the `stats` verb.
    public func statistics() -> QueueStatistics {
        let engine = self.engine
        return (try? engine.loop.submit { engine.statistics() }.wait())
            ?? QueueStatistics(commits: 0, operations: 0, messages: 0, injected: 0, refused: 0, queued: 0,
                               activeJobs: 0, sent: 0, deferred: 0, bounced: 0, localStages: 0, remoteStages: 0)
    }

    /// Logs the counters (SIGUSR1).
    public func logStatistics() {
        let engine = self.engine
        engine.loop.execute { engine.logStatistics() }
    }

    /// Runs the periodic work now: dispatch and the whole-queue scan. For
    /// tests that move their clock.
    public func runMaintenance() {
        let engine = self.engine
        try? engine.loop.submit { engine.maintenance() }.wait()
    }

    /// Stops accepting and dispatching, closes the delivery stages' and
    /// admin connections (a stage's disconnection records the outcomes of
    /// its open jobs; stages take their jobs back by reconnecting later),
    /// lets the spool's committer finish what was submitted and answer it,
    /// then closes the inject connections, logs the statistics, and closes
    /// the spool.
    ///
    /// The inject connections close only after the spool has drained: one
    /// whose message commits must get its ACCEPTED, or its client
    /// (smtp-listen, queue-inject) would report a failure for a queued
    /// message and send it again, a duplicate.
    public func stop() {
        let engine = self.engine
        for timer in timers { timer.cancel() }
        timers = []
        for server in servers { try? server.close().wait() }
        servers = []
        try? engine.loop.submit { engine.stop() }.wait()
        children.closeAll(inject: false)
        // Completions hop onto the loop, so the loop must still run while
        // the spool drains; a submission after this fails ("spool closed")
        // and is refused, never half answered.
        engine.spool.close()
        // The hopped completions were queued on the loop before this task:
        // once it ran, every committed message has had its answer written.
        try? engine.loop.submit {}.wait()
        children.closeAll(inject: true)
        try? engine.loop.submit { engine.logStatistics() }.wait()
        try? group.syncShutdownGracefully()
        for path in [paths.injectSocket, paths.deliverSocket, paths.controlSocket] { unlink(path) }
    }
}

/// The accepted connections, so that `stop` can close them. Confined to
/// the service's single event loop (every child channel lives on it).
final class ChannelSet: @unchecked Sendable {
    private var channels: [ObjectIdentifier: (channel: Channel, inject: Bool)] = [:]
    private let loop: EventLoop

    init(loop: EventLoop) { self.loop = loop }

    func add(_ channel: Channel, inject: Bool = false) {
        loop.preconditionInEventLoop()
        let key = ObjectIdentifier(channel)
        channels[key] = (channel, inject)
        channel.closeFuture.whenComplete { [self] _ in
            loop.execute { [self] in _ = channels.removeValue(forKey: key) }
        }
    }

    /// Closes the inject connections (or all the others) and waits until
    /// they are closed.
    func closeAll(inject: Bool) {
        let futures = (try? loop.submit { [self] in
            channels.values.filter { $0.inject == inject }.map { $0.channel.close() }
        }.wait()) ?? []
        for future in futures { try? future.wait() }
        // The disconnections' own work (a stage's outcomes) ran on the loop
        // as each channel closed; this waits for anything it scheduled there.
        try? loop.submit {}.wait()
    }
}
