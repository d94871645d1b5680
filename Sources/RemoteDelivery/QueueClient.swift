// The `deliver` side of the stage protocol for transport "remote"
// (Pipeline/PROTOCOL.md 4.3), on the agent's event loop: connect to the
// queue's deliver socket, HELLO with `max-jobs` (many jobs at once: the
// deliveries are event-driven), assemble each job (JOB, JOB-RCPT...,
// BODY..., JOB-END), hand it to the agent, and send its RESULTs and
// JOB-DONE when it is done.
//
// The queue may restart at any time: the client reconnects with a pause
// growing from 0.1 s to 5 s. Jobs received on a connection that has closed
// are given up: no further host is tried for them and no transaction sends
// its end of data (the queue already took those jobs back and will hand
// them out again); their results are dropped.

import NIOCore
import NIOPosix
import StageProtocol
import StageProtocolNIO

public final class QueueClient: @unchecked Sendable {
    public static let software = "sealpost-remote-deliver 0.1"

    public let socketPath: String
    public let agent: RemoteDeliveryAgent
    private var eventLoop: EventLoop { agent.eventLoop }
    private var channel: Channel?
    private var generation = 0
    private var helloReceived = false
    private var assembling: DeliveryJobAssembler
    private var pause = 0.1
    private var stopped = false
    private var failing = false
    /// RESULT and JOB-DONE frames written and not yet flushed (see report).
    private var flushPending = false
    /// Jobs received and not yet done on the current connection.
    public private(set) var jobsInFlight = 0
    /// Called after each HELLO from the queue (tests wait on it).
    public var onConnected: (@Sendable () -> Void)?

    public init(socketPath: String, agent: RemoteDeliveryAgent) {
        self.socketPath = socketPath
        self.agent = agent
        self.assembling = DeliveryJobAssembler(maximumMessageSize: agent.settings.maximumMessageSize)
    }

    /// Connects, and reconnects whenever the connection ends, until `stop()`.
    public func start() {
        eventLoop.execute { [self] in connect() }
    }

    /// Closes the connection and stops reconnecting.
    public func stop() -> EventLoopFuture<Void> {
        eventLoop.flatSubmit { [self] in
            stopped = true
            generation += 1
            let ch = channel
            channel = nil
            return ch?.close() ?? eventLoop.makeSucceededVoidFuture()
        }.recover { _ in }
    }

    private func connect() {
        guard !stopped else { return }
        generation += 1
        let generation = self.generation
        helloReceived = false
        assembling = DeliveryJobAssembler(maximumMessageSize: agent.settings.maximumMessageSize)
        jobsInFlight = 0
        ClientBootstrap(group: eventLoop)
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(ByteToMessageHandler(FrameDecoderHandler(protocol: .deliver, direction: .serverToClient)))
                    try sync.addHandler(MessageToByteHandler(FrameEncoderHandler(protocol: .deliver, direction: .clientToServer)))
                    try sync.addHandler(QueueClientHandler(client: self, generation: generation))
                }
            }
            .connect(unixDomainSocketPath: socketPath)
            .whenComplete { [self] result in
                guard generation == self.generation, !stopped else {
                    if case .success(let ch) = result { ch.close(promise: nil) }
                    return
                }
                switch result {
                case .success(let ch):
                    channel = ch
                    let hello = Frame(.hello, attributes: [
                        ("protocol", .text("deliver")), ("version", .uint(1)),
                        ("software", .text(Self.software)), ("transport", .text("remote")),
                        ("max-jobs", .uint(UInt64(max(1, min(256, agent.settings.maxJobs))))),
                    ])
                    ch.writeAndFlush(hello, promise: nil)
                case .failure(let error):
                    problem("\(socketPath): \(error)")
                    scheduleReconnect()
                }
            }
    }

    private func problem(_ text: String) {
        // Once per outage, not every few seconds.
        if !failing {
            agent.log.warning("\(text); reconnecting")
            failing = true
        }
    }

    private func scheduleReconnect() {
        guard !stopped else { return }
        let delay = pause
        pause = min(pause * 2, 5)
        eventLoop.scheduleTask(in: .milliseconds(Int64(delay * 1000))) { [self] in connect() }
    }

    // MARK: - Frames (from QueueClientHandler)

    func closed(generation: Int) {
        guard generation == self.generation else { return }
        // At once, not at the reconnection: the jobs of this connection
        // are abandoned from now on.
        self.generation += 1
        channel = nil
        if !stopped {
            if helloReceived { agent.log.info("queue closed the connection; reconnecting") }
            scheduleReconnect()
        }
    }

    func failed(generation: Int, _ text: String) {
        guard generation == self.generation, let ch = channel else { return }
        agent.log.warning("queue connection: \(text)")
        let error = Frame(.error, ["status": .text("5.5.0"), "text": AttributeValue.sanitizedText(text)])
        ch.writeAndFlush(error).whenComplete { _ in ch.close(promise: nil) }
    }

    func received(_ frame: Frame, generation: Int) throws {
        guard generation == self.generation else { return }
        guard helloReceived else {
            switch frame.type {
            case .hello:
                guard try frame.text("protocol") == "deliver", try frame.uint("version") == 1 else {
                    throw ProtocolError("HELLO: expected protocol deliver version 1")
                }
                helloReceived = true
                pause = 0.1
                if failing {
                    agent.log.info("connected to \(socketPath)")
                    failing = false
                }
                onConnected?()
            case .error:
                throw ProtocolError("queue refused HELLO: \(try frame.text("status")) \(try frame.text("text"))")
            default:
                throw ProtocolError("\(frame.type.name) before HELLO")
            }
            return
        }
        switch frame.type {
        case .job, .jobRcpt, .body:
            _ = try assembling.add(frame)
        case .jobEnd:
            guard let job = try assembling.add(frame) else { throw ProtocolError("JOB-END did not end a job") }
            jobsInFlight += 1
            // Once this connection is gone the queue has taken the job
            // back (it retries the recipients of a lost job at once): go no
            // further with it.
            agent.deliver(job, abandoned: { [self] in self.generation != generation }) { [self] results in
                if eventLoop.inEventLoop {
                    report(job: job.job, results, generation: generation)
                } else {
                    eventLoop.execute { self.report(job: job.job, results, generation: generation) }
                }
            }
        case .error:
            throw ProtocolError("queue sent ERROR: \(try frame.text("status")) \(try frame.text("text"))")
        default:
            throw ProtocolError("\(frame.type.name) is not allowed here")
        }
    }

    private func report(job: UInt64, _ results: [RemoteResult], generation: Int) {
        guard generation == self.generation, let ch = channel else { return }
        jobsInFlight -= 1
        for r in results {
            var frame = Frame(.result, attributes: [
                ("job", .uint(job)), ("index", .uint(r.index)), ("status", .text(r.status.rawValue)),
                ("dsn", .text(r.dsn)), ("text", AttributeValue.sanitizedText(r.text)),
            ])
            frame.set("relay", r.relay.map { AttributeValue.sanitizedText($0) })
            frame.set("remote-mta", r.remoteMTA.map { AttributeValue.sanitizedText($0) })
            frame.set("diagnostic", r.diagnostic.map { AttributeValue.sanitizedText($0) })
            ch.write(frame, promise: nil)
        }
        ch.write(Frame(.jobDone, ["job": .uint(job)]), promise: nil)
        // One flush for every job that finishes in this turn of the event
        // loop (replies read together complete several jobs at once): the
        // results reach the queue in one write, and the queue decodes them
        // in one read.
        if !flushPending {
            flushPending = true
            eventLoop.execute { [self] in
                flushPending = false
                channel?.flush()
            }
        }
    }
}

final class QueueClientHandler: ChannelInboundHandler {
    typealias InboundIn = Frame

    private let client: QueueClient
    private let generation: Int

    init(client: QueueClient, generation: Int) {
        self.client = client
        self.generation = generation
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            try client.received(unwrapInboundIn(data), generation: generation)
        } catch let error as ProtocolError {
            client.failed(generation: generation, error.message)
        } catch {
            client.failed(generation: generation, "\(error)")
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let error = error as? ProtocolError {
            client.failed(generation: generation, error.message)
        } else {
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        client.closed(generation: generation)
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension QueueClientHandler: Sendable {}
