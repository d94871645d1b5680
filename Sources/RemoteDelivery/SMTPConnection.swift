// One outbound SMTP connection: a SwiftNIO TCP channel driving the pure
// client state machine (`SMTPClientSession`). The machine decides what to
// send and what every reply means; this layer moves bytes, keeps the
// RFC 5321 timer of the current phase (`phase.timeoutSeconds`), streams
// the body, hands the socket to crypto-negotiate on STARTTLS and gathers
// the per-recipient results of each transaction.
//
// Everything here runs on one event loop (the agent's): the class is
// confined to it, which is why it is `@unchecked Sendable`.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MailMessage
import NIOCore
import NIOPosix
import SMTP

/// Why an attempt on one address ended without deciding every recipient.
public struct AttemptFailure: Sendable, Hashable, CustomStringConvertible {
    /// Class 4 always: the recipients left undecided are deferred, or tried
    /// at the next address.
    public var status: EnhancedStatus
    /// "connect to mx.example.net[192.0.2.1]:25: Connection refused",
    /// "host mx.example.net[192.0.2.1] refused to talk to me: 554 ...".
    public var text: String
    public var reply: SMTPReply?
    /// The peer's reply quoted, or `text` (for the DSN's Diagnostic-Code).
    public var diagnostic: String
    /// A TLS handshake failed under an opportunistic policy: the same
    /// address in clear text may work (RFC 7435).
    public var plaintextRetryMayWork = false
    /// The failure came from the peer (it answered): remote-mta is set.
    public var peerAnswered: Bool

    public var description: String { "\(status) \(text)" }
}

/// What one transaction on a connection decided.
struct TransactionOutcome: Sendable {
    /// Results by job recipient index.
    var results: [Int: SMTPDeliveryResult] = [:]
    /// Set when the session failed before every recipient had a result.
    var failure: AttemptFailure?
    var message: SMTPMessageResult?
}

/// Knobs of one connection, from `RemoteSettings`.
struct ConnectionOptions: Sendable {
    var connectTimeout: Int
    /// Caps every phase timeout (tests; nil: the RFC's values).
    var maximumPhaseTimeout: Int?
    var sourceIPv4: String?
    var sourceIPv6: String?
}

final class SMTPConnection: @unchecked Sendable {
    let eventLoop: EventLoop
    let candidate: DeliveryCandidate
    /// The connection cache's key (destination, policy).
    let cacheKey: String
    private(set) var session: SMTPClientSession
    private(set) var tls: TLSOutcome = .none
    private(set) var closed = false
    /// Called once, when the connection is gone (the cache forgets it).
    var onClosed: ((SMTPConnection) -> Void)?

    private let options: ConnectionOptions
    private let handOff: (any TLSClientHandOff)?
    private let tlsRequest: TLSClientRequest
    private let taskExecutor: EventLoopTaskExecutor
    private var channel: Channel?
    /// Incremented when a channel is given up (TLS hand-off, close): events
    /// from an older channel are ignored.
    private var generation = 0
    private var body: [[UInt8]] = []
    /// Whether the current transaction's job has been given up (the queue
    /// connection it came on closed): asked before the message content
    /// goes out, so that the end of data is not sent for a job the queue
    /// has already taken back and will hand out again.
    private var abandoned: (() -> Bool)?
    private var outcome = TransactionOutcome()
    private var promise: EventLoopPromise<TransactionOutcome>?
    private var timer: Scheduled<Void>?
    private var lastWrite: EventLoopFuture<Void>?
    /// Bytes written to the channel and not yet flushed: every write of one
    /// batch of actions goes out in one flush (one writev), so that a
    /// pipelined MAIL/RCPT/DATA group, or a body and its terminating dot,
    /// cost one system call rather than one per command or chunk.
    /// Writes of the message body not yet completed (see `rearm`).
    private var bodyWritesPending = 0
    private var countingBodyWrites = false
    private var unflushed = false
    /// Nesting of `run` (the body is sent from inside it).
    private var running = 0

    private init(eventLoop: EventLoop, candidate: DeliveryCandidate, cacheKey: String, policy: SMTPClientPolicy,
                 message: SMTPClientMessage, options: ConnectionOptions, handOff: (any TLSClientHandOff)?,
                 tlsRequest: TLSClientRequest, taskExecutor: EventLoopTaskExecutor) {
        self.eventLoop = eventLoop
        self.taskExecutor = taskExecutor
        self.candidate = candidate
        self.cacheKey = cacheKey
        self.session = SMTPClientSession(policy: policy, message: message)
        self.options = options
        self.handOff = handOff
        self.tlsRequest = tlsRequest
    }

    /// The session is between messages and the connection open: it may
    /// take `send(_:)` (connection reuse).
    var isIdle: Bool { !closed && session.isIdle }

    /// Connects to `candidate` and delivers `message`: the future holds the
    /// outcome of this first transaction. The connection stays open when
    /// the session is idle afterwards (see `isIdle`).
    static func open(on eventLoop: EventLoop, candidate: DeliveryCandidate, cacheKey: String, policy: SMTPClientPolicy,
                     message: SMTPClientMessage, body: [[UInt8]], options: ConnectionOptions,
                     handOff: (any TLSClientHandOff)?, tlsRequest: TLSClientRequest,
                     taskExecutor: EventLoopTaskExecutor,
                     abandoned: (() -> Bool)? = nil) -> (SMTPConnection, EventLoopFuture<TransactionOutcome>) {
        eventLoop.preconditionInEventLoop()
        let connection = SMTPConnection(eventLoop: eventLoop, candidate: candidate, cacheKey: cacheKey, policy: policy,
                                        message: message, options: options, handOff: handOff, tlsRequest: tlsRequest,
                                        taskExecutor: taskExecutor)
        let promise = eventLoop.makePromise(of: TransactionOutcome.self)
        connection.promise = promise
        connection.body = body
        connection.abandoned = abandoned
        connection.connect()
        return (connection, promise.futureResult)
    }

    /// Another message on this idle connection.
    func send(_ message: SMTPClientMessage, body: [[UInt8]],
              abandoned: (() -> Bool)? = nil) -> EventLoopFuture<TransactionOutcome> {
        eventLoop.preconditionInEventLoop()
        precondition(isIdle && promise == nil, "send on a busy connection")
        let promise = eventLoop.makePromise(of: TransactionOutcome.self)
        self.promise = promise
        self.body = body
        self.abandoned = abandoned
        step(session.nextMessage(message))
        return promise.futureResult
    }

    /// QUIT (politely) and close.
    func quit() {
        eventLoop.preconditionInEventLoop()
        guard !closed else { return }
        step(session.quit())
    }

    // MARK: - Connecting

    private func connect() {
        let address: SocketAddress
        do {
            address = try SocketAddress(ipAddress: candidate.address, port: candidate.port)
        } catch {
            connectFailed("invalid address: \(error)")
            return
        }
        let generation = self.generation
        var bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(.seconds(Int64(options.connectTimeout)))
            // tcpOption, not socketOption: the latter sets level SOL_SOCKET,
            // where option 1 is SO_DEBUG, which an unprivileged stage may
            // not set (EACCES: every connection failed once the stage ran as
            // its own user).
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(SMTPChannelHandler(connection: self, generation: generation))
                }
            }
        let source = address.protocol == .inet6 ? options.sourceIPv6 : options.sourceIPv4
        if let source, !source.isEmpty {
            do {
                bootstrap = bootstrap.bind(to: try SocketAddress(ipAddress: source, port: 0))
            } catch {
                connectFailed("invalid source address \(source): \(error)")
                return
            }
        }
        bootstrap.connect(to: address).whenComplete { [self] result in
            switch result {
            case .success(let channel):
                if self.generation == generation && !closed {
                    self.channel = channel
                    rearm()
                } else {
                    channel.close(promise: nil)
                }
            case .failure(let error):
                connectFailed(Self.describe(error))
            }
        }
    }

    private func connectFailed(_ reason: String) {
        guard !closed else { return }
        let text = "connect to \(candidate): \(reason)"
        outcome.failure = AttemptFailure(status: EnhancedStatus(4, 4, 1), text: text, reply: nil, diagnostic: text,
                                         peerAnswered: false)
        complete()
        markClosed()
    }

    static func describe(_ error: Error) -> String {
        if let e = error as? IOError { return String(cString: strerror(e.errnoCode)) }
        if case ChannelError.connectTimeout = error { return "Connection timed out" }
        if let e = error as? NIOConnectionError, let first = e.connectionErrors.first {
            return describe(first.error)
        }
        return "\(error)"
    }

    // MARK: - Channel events (from SMTPChannelHandler)

    func attached(_ channel: Channel, generation: Int) {
        guard generation == self.generation, !closed, self.channel == nil else { return }
        self.channel = channel
    }

    func received(_ bytes: ByteBufferView, generation: Int) {
        guard generation == self.generation, !closed else { return }
        let replies = session.repliesReceived
        run(session.receive(bytes))
        // Part of a reply does not renew its timeout: the phase's timer is
        // a deadline for the whole reply (see repliesReceived).
        if session.repliesReceived != replies || timer == nil { rearm() }
    }

    func channelClosed(generation: Int) {
        guard generation == self.generation, !closed else { return }
        channel = nil
        step(session.connectionLost())
    }

    // MARK: - The machine's actions

    /// Runs the actions, then sets the timer for the phase reached.
    private func step(_ actions: [SMTPClientAction]) {
        run(actions)
        rearm()
    }

    private func run(_ actions: [SMTPClientAction]) {
        running += 1
        defer {
            running -= 1
            if running == 0 { flush() }
        }
        for action in actions {
            switch action {
            case .send(let bytes):
                write(bytes)
            case .startTLS:
                startTLS()
            case .downgradeBody:
                run(downgradeBody())
            case .sendBody:
                if abandoned?() == true {
                    body = []
                    run(session.abandon("not sent: the queue's connection closed, and the queue took the job back"))
                    continue
                }
                let chunks = body
                body = []
                countingBodyWrites = true
                for chunk in chunks { run(session.bodyChunk(chunk)) }
                run(session.bodyEnd())
                countingBodyWrites = false
            case .recipientResult(let index, let result):
                outcome.results[index] = result
            case .messageResult(let result):
                outcome.message = result
                complete()
            case .sessionFailed(let failure), .protocolError(let failure):
                outcome.failure = AttemptFailure(
                    status: failure.status,
                    text: failure.reply != nil ? "host \(candidate.host)[\(candidate.address)] said: \(failure.text)"
                                               : "host \(candidate.host)[\(candidate.address)] \(failure.text)",
                    reply: failure.reply, diagnostic: failure.deferral.diagnostic,
                    plaintextRetryMayWork: failure.plaintextRetryMayWork, peerAnswered: true)
                complete()
            case .close:
                closeChannel()
            }
        }
    }

    /// RFC 6152 section 3: the body in 7 bit for a host without 8BITMIME
    /// (MailMessage's MIMEDowngrade). This transaction sends the converted
    /// body; the job keeps the original for the next host. Done on the
    /// event loop: it is rare (nearly every server offers 8BITMIME) and
    /// linear in the size, at most queue.message_size_limit.
    private func downgradeBody() -> [SMTPClientAction] {
        let original = body.count == 1 ? body[0] : Array(body.joined())
        let result: MIMEDowngrade.Result
        do {
            result = try MIMEDowngrade.convert(original)
        } catch {
            return session.bodyDowngradeFailed(error.reason)
        }
        var remarks = result.remarks
        // UTF-8 header fields are what SMTPUTF8 (which the host offers) is for.
        if session.message.needsSMTPUTF8 { remarks.removeAll { $0 == .headerFields } }
        guard result.convertedParts > 0 else {
            return session.bodyDowngraded(SMTPBodyDowngrade(size: session.message.size, convertedParts: 0,
                                                            remarks: remarks.map { $0.description }))
        }
        let converted = result.body
        let piece = 65536
        body = stride(from: 0, to: converted.count, by: piece).map { Array(converted[$0..<min($0 + piece, converted.count)]) }
        return session.bodyDowngraded(SMTPBodyDowngrade(size: UInt64(converted.count), convertedParts: result.convertedParts,
                                                        remarks: remarks.map { $0.description }))
    }

    private func write(_ bytes: [UInt8]) {
        guard let channel else { return }
        let written = channel.write(channel.allocator.buffer(bytes: bytes))
        lastWrite = written
        unflushed = true
        if countingBodyWrites {
            bodyWritesPending += 1
            written.whenComplete { [self] _ in
                bodyWritesPending -= 1
                rearm()   // progress: a new data block period, or the reply's
            }
        }
    }

    private func flush() {
        guard unflushed else { return }
        unflushed = false
        channel?.flush()
    }

    private func complete() {
        guard let promise else { return }
        self.promise = nil
        let result = outcome
        outcome = TransactionOutcome()
        body = []
        abandoned = nil
        promise.succeed(result)
    }

    /// Closes after what was written (QUIT) has gone out, or after
    /// `closeGrace` seconds when it does not go out: a peer that stopped
    /// reading (a zero window, answered probes) would otherwise keep the
    /// socket and the unsent body buffered here for as long as it likes.
    private func closeChannel() {
        flush()
        let channel = self.channel
        self.channel = nil
        generation += 1
        if let channel {
            let grace = channel.eventLoop.scheduleTask(in: .seconds(Int64(Self.closeGrace))) {
                channel.close(promise: nil)
            }
            (lastWrite ?? channel.eventLoop.makeSucceededVoidFuture()).whenComplete { _ in
                grace.cancel()
                channel.close(promise: nil)
            }
        }
        markClosed()
    }

    /// How long a closing connection may take to hand its last writes to
    /// the kernel. They normally complete at once (a write completes when
    /// the socket buffer takes it, not when the peer acknowledges it).
    static let closeGrace = 10


    private func markClosed() {
        guard !closed else { return }
        closed = true
        timer?.cancel()
        timer = nil
        if promise != nil {
            // The machine always reports a failure before it closes; this is
            // a safety net so that no job waits forever.
            let text = "host \(candidate.host)[\(candidate.address)] closed the connection"
            outcome.failure = outcome.failure ?? AttemptFailure(status: EnhancedStatus(4, 4, 2), text: text, reply: nil,
                                                                diagnostic: text, peerAnswered: true)
            complete()
        }
        let callback = onClosed
        onClosed = nil
        callback?(self)
    }

    private func rearm() {
        timer?.cancel()
        timer = nil
        guard !closed, channel != nil || session.awaitingTLS, var seconds = session.phase.timeoutSeconds else { return }
        // The machine awaits the end-of-data reply as soon as it has handed
        // over the body, but the reply's 10 minutes (RFC 5321 4.5.3.2.6)
        // start once the body is on the wire; until then each write has
        // the data block's 3 minutes (4.5.3.2.5), renewed as writes
        // complete: a large message to a slow receiver is not cut off.
        if bodyWritesPending > 0, let block = SMTPClientPhase.dataBlock.timeoutSeconds { seconds = block }
        if let cap = options.maximumPhaseTimeout { seconds = min(seconds, cap) }
        timer = eventLoop.scheduleTask(in: .seconds(Int64(seconds))) { [self] in
            timer = nil
            step(session.timedOut())
        }
    }

    // MARK: - STARTTLS

    /// The server said 220 to STARTTLS: the socket goes to crypto-negotiate
    /// (a duplicate of its descriptor: NIO closes its own), the plaintext
    /// end comes back as a new channel, and the machine says EHLO again.
    private func startTLS() {
        flush()
        guard let handOff else {
            run(session.tlsFailed("no TLS service (crypto-negotiate) is configured"))
            return
        }
        guard let channel else {
            run(session.tlsFailed("connection gone before the TLS hand-off"))
            return
        }
        var fd: Int32 = -1
        do {
            fd = try channel.pipeline.syncOperations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
                dup($0)
            } ?? -1
        } catch {
            fd = -1
        }
        guard fd >= 0 else {
            run(session.tlsFailed("cannot take the socket for the TLS hand-off"))
            return
        }
        // From now on the old channel's events do not count; closing it
        // closes NIO's descriptor only: the TCP connection lives on in `fd`.
        generation += 1
        self.channel = nil
        lastWrite = nil
        channel.close(promise: nil)
        let generation = self.generation
        let request = tlsRequest
        let socket = fd
        eventLoop.runTask(on: taskExecutor) {
            await handOff.negotiate(socket: socket, request: request)
        }.whenSuccess { [self] result in
            tlsDone(result, generation: generation)
        }
    }

    private func tlsDone(_ result: Result<TLSClientHandOffResult, TLSHandOffError>, generation: Int) {
        guard generation == self.generation, !closed else {
            if case .success(let s) = result { Glibc.close(s.plaintext) }
            return
        }
        switch result {
        case .failure(let error):
            step(session.tlsFailed(error.reason))
        case .success(let s):
            let r = s.report
            tls = r.peerAuthenticated ? .authenticated(protocol: r.protocolVersion, cipher: r.cipher, method: s.authentication)
                                      : .encrypted(protocol: r.protocolVersion, cipher: r.cipher)
            ClientBootstrap(group: eventLoop)
                .channelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(SMTPChannelHandler(connection: self, generation: generation))
                    }
                }
                .withConnectedSocket(s.plaintext)
                .whenComplete { [self] adopted in
                    guard generation == self.generation, !closed else {
                        if case .success(let ch) = adopted { ch.close(promise: nil) }
                        return
                    }
                    switch adopted {
                    case .success(let channel):
                        self.channel = channel
                        step(session.tlsEstablished(r))
                    case .failure(let error):
                        // Not closed here: NIO closed it with the channel it
                        // made (a close now could hit a number reused by
                        // another thread); only a channel it could not make
                        // at all, from an invalid descriptor, leaves it.
                        step(session.tlsFailed("cannot use the plaintext socket from crypto-negotiate: \(error)"))
                    }
                }
        }
    }
}

/// Bytes and close events of one channel, forwarded to its connection.
final class SMTPChannelHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let connection: SMTPConnection
    private let generation: Int

    init(connection: SMTPConnection, generation: Int) {
        self.connection = connection
        self.generation = generation
    }

    func channelActive(context: ChannelHandlerContext) {
        connection.attached(context.channel, generation: generation)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        connection.received(buffer.readableBytesView, generation: generation)
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection.channelClosed(generation: generation)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A read error (ECONNRESET...): the close that follows reports it.
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension SMTPChannelHandler: Sendable {}
