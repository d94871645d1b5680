// One SMTP transaction streamed into the queue over the inject protocol
// (Pipeline/PROTOCOL.md section 4.2): a connection to the queue's inject
// socket of its own while it runs, taken from the event loop's pool of idle
// connections (InjectPool) or opened, when the client's DATA (or first BDAT)
// is accepted, on the session's own event loop (no locks, no thread hops).
// A pooled connection has had its HELLOs: the transaction starts at MAIL.
//
//   HELLO protocol=inject version=1 reserve-ids=true ->
//                                         <- HELLO next-queue-id=ID
//   MAIL sender=... queue-id=ID ...      ->
//   RCPT address=... (one per recipient) ->
//   BODY data=<Received: ... id ID>      ->
//   BODY data=<message, <= 64 KiB each>  ->   (as the client sends it)
//   END                                  ->
//                                         <- ACCEPTED queue-id=ID next-queue-id=ID2
//                                            | REFUSED code= status= text= next-queue-id=ID2
//
// The Received header names the queue ID (RFC 5321 4.4, as Postfix does),
// and it is the first line of the message, so no BODY goes out before the
// ID is known. The queue reserves the ID of a connection's next message in
// its HELLO and in each answer to END (PROTOCOL.md 4.2), so on a pooled
// connection the whole transaction goes out in the writes that carry the
// message, and the answer to END is the one round trip to the queue. A
// queue that names no reservation is asked with `announce-id` and answers
// MAIL with QUEUE-ID; what arrives before that is held here (the wait is
// usually hidden: the client needs a round trip, 354 then its first bytes,
// before there is anything to send). The ID is also the one of the
// "ID: client=" log line, and ACCEPTED must repeat it.
//
// The frames are written as the message arrives; nothing holds a whole
// message. While the inject socket's send buffer is full (the channel is
// not writable), or the ID is not known yet, the session stops reading from
// the SMTP client: the queue's pace is the client's pace.
//
// Why one connection per transaction at a time rather than a shared one:
// the inject protocol answers transactions in order on a connection, so a
// shared connection would make every session wait behind the slowest
// message, and a protocol error would fail all of them. A connection goes
// back to the pool only after a clean ACCEPTED or REFUSED.
//
// Outcomes: ACCEPTED -> 250 with the queue ID; REFUSED -> the queue's own
// reply; anything else (no socket, connection lost, ERROR, a protocol
// violation, no answer within the timeout) -> 451 4.3.0. Never 250 without
// ACCEPTED. A refused connection (a queue restarting) is tried again for
// `queueAway` first (`connectsAgain`).

import NIOCore
import NIOPosix
import SMTP
import SMTPInjection
import StageProtocol
import StageProtocolNIO
import Synchronization

/// What a server's transactions learned about its queue, for all of them.
final class QueueCapabilities: Sendable {
    /// The queue answered `reserve-ids` with ERROR (a queue from before
    /// reservations, or another program that speaks protocol version 1
    /// without them): the transactions ask for each ID instead.
    let refusesReservations = Atomic<Bool>(false)
}

/// What became of a message handed to the queue.
enum InjectOutcome: Equatable {
    case accepted(queueID: String)
    case refused(SMTPReply)
    /// The queue could not be reached or failed; the reason is for the log.
    case unavailable(reason: String)
}

final class InjectTransaction {
    typealias Completion = (InjectOutcome) -> Void

    private let eventLoop: EventLoop
    private let socketPath: String
    private let replyTimeout: TimeAmount
    private let pool: InjectPool?
    private var channel: Channel?
    private var handler: InjectResponseHandler?
    /// MAIL and RCPT frames, kept for a retry on a fresh connection.
    private var envelopeFrames: [Frame] = []
    /// The connection came from the pool (and may have died unnoticed).
    /// Cleared when the transaction starts over on a fresh connection:
    /// it does so at most once.
    private(set) var reused = false
    /// A frame came from the queue on this transaction's connection: what
    /// went out was read, so a failure now is never retried (it could
    /// queue the message twice).
    private var heardFromQueue = false
    /// The SMTP client left while the queue's answer was due: nobody
    /// would see the outcome of a retry, only a second copy if it had
    /// been queued already.
    private var clientGone = false
    /// This connection's HELLO asked for reserved IDs.
    private var askedForReservations = false
    /// What the server's transactions learned about the queue.
    private let queue: QueueCapabilities
    /// BODY (and END) frames produced before the queue announced the ID.
    private var held: [Frame] = []
    private var helloReceived = false
    /// From QUEUE-ID; nil until then.
    private(set) var queueID: String?
    /// The first body bytes (the Received header) for the announced ID.
    private var prefix: ((String) -> [UInt8])?
    /// Told the ID as soon as the queue announces it (for the log line).
    private var announced: ((String) -> Void)?
    /// What a pooled connection carried under a reserved ID, none of it
    /// answered yet (at most `holdLimit` bytes; nil past that): if that
    /// connection turns out dead (the queue restarted), the message goes
    /// again on a fresh one, under the ID that one names.
    private var replay: [Frame]?
    private var replayBytes = 0
    /// Told what deserves a warning in the log that no outcome carries (a
    /// message sent again under a new ID, a queue without reservations).
    var warn: ((String) -> Void)?
    /// Set once the transaction cannot succeed any more; later data is dropped.
    private(set) var failure: String?
    private var completion: Completion?
    private var outcome: InjectOutcome?
    private var ended = false
    /// Whether `body` was given any of the client's bytes (see `flush`).
    private var bodyWritten = false
    /// When the queue's awaited answer is overdue (`replyTimeout`); nil
    /// while none is awaited. The session's SessionClock checks it
    /// (`clockTicked`), or `ownTimer` once the session has ended.
    private var answerDeadline: NIODeadline?
    private var ownTimer: LoopTimer?
    /// Called when `isWritable` may have changed (connected, failed,
    /// channel writability changed).
    var writabilityChanged: (() -> Void)?

    static let software = "sealpost-smtp-listen 1"

    /// See SMTPTimeouts.queueAway: refused connections are tried again
    /// every `reconnectInterval` until `queueAway` after the first.
    private let queueAway: TimeAmount
    static let reconnectInterval = TimeAmount.milliseconds(200)
    /// When the first refused connection of this transaction was.
    private var refusedSince: NIODeadline?
    /// The queue refused until `queueAway` ran out (see `refusedFor`).
    private var waitRanOut = false
    private var reconnectTimer: LoopTimer?

    init(eventLoop: EventLoop, socketPath: String, replyTimeout: TimeAmount, queueAway: TimeAmount = .zero,
         pool: InjectPool? = nil, queue: QueueCapabilities = QueueCapabilities()) {
        self.eventLoop = eventLoop
        self.socketPath = socketPath
        self.replyTimeout = replyTimeout
        self.queueAway = queueAway
        self.pool = pool
        self.queue = queue
    }

    /// False while the inject socket cannot take more (its send buffer is
    /// full, or the ID is not known yet and `holdLimit` bytes are held):
    /// the session should stop reading its client. True once failed (data
    /// is then dropped).
    var isWritable: Bool {
        if failure != nil || outcome != nil { return true }
        guard helloReceived, queueID != nil, let channel else { return heldBytes < Self.holdLimit }
        return channel.isWritable
    }

    /// Body bytes kept while waiting for the ID: a small message is read
    /// whole meanwhile (pausing and resuming the client's reads costs two
    /// epoll_ctl and a wake-up), a big one waits with at most this much.
    static let holdLimit = 64 * 1024
    private var heldBytes = 0

    // MARK: - Frames

    /// A frame of this sort can only fail to encode through a bug in the
    /// SMTP layer's guarantees (e.g. a CR in a path); the write then fails
    /// and the message is refused with 451, never half-injected.

    // MARK: - Life cycle

    /// Connects and sends the envelope; once the queue announced the ID,
    /// `announced` is told it and `prefix(ID)` (the Received header) goes
    /// out as the first body bytes.
    func start(envelope: SMTPEnvelope, clientName: String, prefix: @escaping (String) -> [UInt8],
               announced: @escaping (String) -> Void) {
        self.prefix = prefix
        self.announced = announced
        envelopeFrames.append(InjectFrames.mail(envelope, clientName: clientName))
        for r in envelope.recipients { envelopeFrames.append(InjectFrames.rcpt(r)) }
        if let (channel, handler) = pool?.take() {
            reused = true
            self.channel = channel
            self.handler = handler
            handler.transaction = self
            helloReceived = true
            // Under a reserved ID nothing is flushed here (see `flush`):
            // the session flushes after each read of client input (the
            // body follows the 354 this transaction starts with), and END
            // flushes.
            if !sendEnvelope(on: channel) {
                // The ID is asked for: its answer is timed.
                armTimer()
                channel.flush()
            } else if !channel.isWritable {
                channel.flush()
            }
        } else {
            // The connection, both HELLOs and the ID are timed together.
            armTimer()
            connect()
        }
    }

    /// MAIL (under the connection's reserved ID if there is one, else
    /// asking for QUEUE-ID) and the RCPTs. True if the ID is known now.
    private func sendEnvelope(on channel: Channel) -> Bool {
        guard var mail = envelopeFrames.first else { return false }
        let reserved = handler?.takeReservedID()
        if let reserved {
            mail.set("queue-id", .text(reserved))
        } else {
            mail.set("announce-id", .bool(true))
        }
        send(mail, on: channel)
        for frame in envelopeFrames.dropFirst() { send(frame, on: channel) }
        guard let reserved else { return false }
        if reused { replay = [] }
        idAnnounced(reserved, flush: false)
        return true
    }

    /// Leaves the current connection for a fresh one (the transaction's
    /// frames go out again from `envelopeFrames` and `held`).
    private func reconnect() {
        handler?.transaction = nil
        channel?.close(promise: nil)
        channel = nil
        handler = nil
        helloReceived = false
        connect()
    }

    private func connect() {
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        let connect = ClientBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = InjectResponseHandler(transaction: bound.value)
                    bound.value.handler = handler
                    try channel.pipeline.syncOperations.addHandlers([
                        ByteToMessageHandler(FrameDecoderHandler(protocol: .inject, direction: .serverToClient)),
                        CoalescingFrameEncoder(protocol: .inject, direction: .clientToServer),
                        handler,
                    ])
                }
            }
            .connect(unixDomainSocketPath: socketPath)
        connect.assumeIsolated().whenComplete { result in
            switch result {
            case .success(let channel):
                self.refusedSince = nil
                self.connected(channel)
            case .failure(let error):
                if self.connectsAgain(after: error) { return }
                self.fail("connect to \(self.socketPath): \(Self.describe(error))\(self.refusedFor)")
            }
        }
    }

    /// After a refused connection (the queue restarting: ECONNREFUSED on a
    /// stale socket, ENOENT before the new one exists; EAGAIN when its
    /// backlog is full, as when many sessions wait for it to load the
    /// spool), another attempt shortly, while `queueAway` has not run out;
    /// the reply timer runs on. Not for a client that has left: nothing
    /// reached the queue, and the client, which saw no 250, sends the
    /// message again anyway.
    private func connectsAgain(after error: Error) -> Bool {
        guard failure == nil, outcome == nil, !clientGone, let code = (error as? IOError)?.errnoCode,
              code == ECONNREFUSED || code == ENOENT || code == EAGAIN else { return false }
        let now = NIODeadline.now()
        let since = refusedSince ?? now
        refusedSince = since
        guard now + Self.reconnectInterval <= since + queueAway else {
            waitRanOut = queueAway > .zero
            return false
        }
        let timer = reconnectTimer ?? LoopTimer { [weak self] in
            guard let self, self.failure == nil, self.outcome == nil, self.channel == nil else { return }
            if self.clientGone { return self.fail("connect to \(self.socketPath): refused, and the client left") }
            self.connect()
        }
        reconnectTimer = timer
        timer.arm(in: Self.reconnectInterval, on: eventLoop)
        return true
    }

    /// For the log line of the 451: how long the queue was tried again
    /// (`queue_restart_wait`), when that wait is what ended the attempts.
    private var refusedFor: String {
        // Whole seconds: the setting is.
        waitRanOut ? " (tried again for \(queueAway.nanoseconds / 1_000_000_000) s)" : ""
    }

    private func connected(_ channel: Channel) {
        guard failure == nil, outcome == nil, handler?.transaction === self else {
            channel.close(promise: nil)
            return
        }
        self.channel = channel
        // PROTOCOL.md 4.1: nothing but the HELLOs until both are exchanged;
        // the envelope waits for the queue's HELLO (and its reservation).
        var hello = Frame(.hello, ["protocol": .text("inject"), "version": .uint(1), "software": .text(Self.software)])
        askedForReservations = !queue.refusesReservations.load(ordering: .relaxed)
        if askedForReservations { hello.set("reserve-ids", .bool(true)) }
        send(hello, on: channel)
        channel.flush()
    }

    private func helloExchanged() {
        guard let channel else { return }
        helloReceived = true
        _ = sendEnvelope(on: channel)
        channel.flush()
    }

    /// The ID is known (reserved, or QUEUE-ID): the Received header, then
    /// what the client sent meanwhile.
    private func idAnnounced(_ id: String, flush: Bool = true) {
        guard let channel else { return }
        queueID = id
        stopTimer()
        announced?(id)
        if let prefix { for frame in InjectFrames.body(prefix(id)) { send(frame, on: channel) } }
        let frames = held
        held = []
        heldBytes = 0
        for frame in frames { sendRetained(frame, on: channel) }
        if flush { channel.flush() }
        // END already went out with the held frames: its answer is timed.
        if ended { armTimer() }
        writabilityChanged?()
    }

    private func write(_ frame: Frame) {
        guard let channel, helloReceived, queueID != nil else {
            held.append(frame)
            heldBytes += Self.dataCount(frame)
            return
        }
        sendRetained(frame, on: channel)
    }

    /// `send`, keeping a copy for a replay while that is possible.
    private func sendRetained(_ frame: Frame, on channel: Channel) {
        if replay != nil {
            replayBytes += Self.dataCount(frame)
            if replayBytes > Self.holdLimit { replay = nil } else { replay!.append(frame) }
        }
        send(frame, on: channel)
    }

    /// The message bytes a BODY frame carries (0 for any other frame).
    private static func dataCount(_ frame: Frame) -> Int {
        if case .bytes(let data)? = frame["data"] { return data.count }
        return 0
    }

    /// No promise per frame: a frame that does not encode reaches
    /// `channelError` (the encoder fires it down the pipeline), and a write
    /// the socket refuses closes the channel (`channelClosed`); both fail
    /// or retry the transaction as a failed write would.
    private func send(_ frame: Frame, on channel: Channel) {
        channel.write(frame, promise: nil)
    }

    /// Message bytes (dot-unstuffed, CRLF), in pieces as they arrive.
    func body(_ bytes: [UInt8]) {
        guard failure == nil, outcome == nil, !ended else { return }
        bodyWritten = true
        for frame in InjectFrames.body(bytes) { write(frame) }
    }

    /// Flushes what `body` wrote (once per batch of client input). Until
    /// the client's first body bytes nothing goes: the envelope and the
    /// Received header, written at DATA, wait to leave with them, so that
    /// a small message costs one write to the queue (and the queue one
    /// wake-up) instead of two. Except when so much waits that the channel
    /// stopped being writable (an envelope of many recipients): the
    /// session stops reading its client while the queue cannot take more,
    /// so it would never read the body bytes that were to release it.
    func flush() {
        guard let channel, bodyWritten || !channel.isWritable else { return }
        channel.flush()
    }

    /// The message is complete: END, then `completion` with the outcome,
    /// always asynchronously (never from inside this call).
    func end(_ completion: @escaping Completion) {
        self.completion = completion
        ended = true
        if failure == nil, outcome == nil {
            write(Frame(.end))
            channel?.flush()
            // Before the ID is known, the timer of the start still runs.
            armTimer()
        } else {
            deliverOutcome()
        }
    }

    /// The message was refused while streaming, or the client went away
    /// before its end: tell the queue to forget it, and close.
    func abort() {
        guard outcome == nil else { return }
        outcome = .unavailable(reason: "aborted")
        stopTimer()
        // ABORT only where MAIL went out (after the HELLOs); otherwise
        // closing the connection is all the queue needs to forget it.
        if let channel, helloReceived, failure == nil, !ended {
            // The queue may have stopped reading (often why the message
            // stalled): the wait for the ABORT to go out is bounded by the
            // reply timeout, and then the connection is closed anyway,
            // which the queue takes as an ABORT too.
            let warn = self.warn, id = queueID ?? "(no queue ID yet)", seconds = replyTimeout.nanoseconds / 1_000_000_000
            let closer = LoopTimer {
                warn?("\(id): the queue did not take the ABORT within \(seconds) s; inject connection closed")
                channel.close(promise: nil)
            }
            closer.arm(in: replyTimeout, on: eventLoop)
            channel.writeAndFlush(Frame(.abort)).assumeIsolated().whenComplete { _ in
                closer.cancel()
                channel.close(promise: nil)
            }
        } else {
            channel?.close(promise: nil)
        }
        handler?.transaction = nil
        handler = nil
        completion = nil
    }

    private func armTimer() {
        guard answerDeadline == nil else { return }
        let deadline = NIODeadline.now() + replyTimeout
        answerDeadline = deadline
        ownTimer?.arm(at: deadline, on: eventLoop)
    }

    private func stopTimer() {
        answerDeadline = nil
        ownTimer?.cancel()
    }

    /// The time, from the session's clock (or `ownTimer`).
    func clockTicked(now: NIODeadline) {
        guard let deadline = answerDeadline, deadline <= now else { return }
        answerDeadline = nil
        fail("no answer from the queue within \(replyTimeout.nanoseconds / 1_000_000_000) s", retry: false)
    }

    // MARK: - Events from the inject channel

    func received(_ frame: Frame) {
        guard outcome == nil else { return }
        heardFromQueue = true
        switch frame.type {
        case .hello:
            guard !helloReceived else { return fail("second HELLO from the queue") }
            let proto = try? frame.text("protocol"), version = try? frame.uint("version")
            guard proto == "inject", version == 1 else {
                return fail("queue answered HELLO with protocol \(proto ?? "?") version \(version.map(String.init) ?? "?")")
            }
            helloExchanged()
        case .queueID:
            guard helloReceived, queueID == nil, let id = try? frame.text("queue-id"), !id.isEmpty else {
                return fail("unexpected QUEUE-ID from the queue")
            }
            idAnnounced(id)
        case .accepted:
            guard helloReceived, ended, let announced = queueID, let id = try? frame.text("queue-id") else {
                return fail("unexpected ACCEPTED from the queue")
            }
            // The ID of the Received header and of the log must be the one
            // the message is queued under.
            guard id == announced else { return fail("ACCEPTED queue-id \(id) differs from the announced \(announced)") }
            finish(.accepted(queueID: id))
        case .refused:
            guard helloReceived, ended else { return fail("unexpected REFUSED from the queue") }
            finish(.refused(InjectFrames.reply(fromRefused: frame)))
        case .error:
            let status = (try? frame.text("status")) ?? "?"
            let text = (try? frame.text("text")) ?? "?"
            if !helloReceived, askedForReservations {
                // Strict decoders refuse attributes they do not know: a
                // queue without reservations refuses the HELLO that asks.
                if !queue.refusesReservations.exchange(true, ordering: .relaxed) {
                    warn?("the queue refused reserve-ids (ERROR \(status) \(text)); asking it for each queue ID instead")
                }
                return reconnect()
            }
            fail("queue sent ERROR \(status) \(text)")
        default:
            fail("unexpected \(frame.type.name) from the queue")
        }
    }

    func channelWritabilityChanged() {
        writabilityChanged?()
    }

    func channelError(_ error: Error) {
        // A system error (the queue went away) may be retried; a frame that
        // does not decode was sent by a queue that read ours.
        fail(Self.describe(error), retry: error is IOError)
    }

    /// The SMTP client left while the queue's answer was due.
    func clientLeft() {
        clientGone = true
        // The session's clock no longer ticks this transaction.
        let timer = LoopTimer { [weak self] in self?.clockTicked(now: .now()) }
        ownTimer = timer
        if let answerDeadline { timer.arm(at: answerDeadline, on: eventLoop) }
    }

    func channelClosed() {
        if outcome == nil { fail("queue closed the inject connection") }
    }

    // MARK: - Outcome

    private func fail(_ reason: String, retry: Bool = true) {
        guard outcome == nil else { return }
        if retry, reused, !heardFromQueue, !clientGone, failure == nil, queueID == nil || replay != nil {
            // A pooled connection the queue closed (a restart) before this
            // transaction noticed: nothing was answered, and all that went
            // out is still here (no BODY before QUEUE-ID, or the replay of
            // what went under a reserved ID), so start over on a fresh
            // connection, under the ID that one gives.
            reused = false
            if let abandoned = queueID, let frames = replay {
                // Had the old queue read the END and committed before it
                // died, this is a second copy; a 451 instead would make the
                // client send one just the same.
                warn?("\(abandoned): the inject connection closed before the queue answered; sending the message again under a new ID")
                queueID = nil
                held = frames
                heldBytes = replayBytes
                replay = nil
                replayBytes = 0
                armTimer()   // the new connection, its HELLOs and the ID
            }
            return reconnect()
        }
        if failure == nil { failure = reason }
        held = []
        heldBytes = 0
        replay = nil
        prefix = nil
        announced = nil
        // The connection's handler and this transaction point at each
        // other: let go first (closing delivers channelInactive at once),
        // nothing more is wanted from that connection.
        handler?.transaction = nil
        handler = nil
        channel?.close(promise: nil)
        if ended {
            finish(.unavailable(reason: failure ?? reason))
        } else {
            writabilityChanged?()
        }
    }

    private func finish(_ result: InjectOutcome) {
        guard outcome == nil else { return }
        outcome = result
        stopTimer()
        replay = nil
        prefix = nil
        announced = nil
        // ACCEPTED or REFUSED, read in order with nothing outstanding: the
        // connection is clean and can carry the next transaction.
        if let channel, let handler, let pool, failure == nil {
            pool.giveBack(channel, handler)
        } else {
            channel?.close(promise: nil)
        }
        channel = nil
        handler = nil
        deliverOutcome()
    }

    private func deliverOutcome() {
        if outcome == nil { outcome = .unavailable(reason: failure ?? "unknown failure") }
        guard let completion, let result = outcome else { return }
        self.completion = nil
        eventLoop.assumeIsolated().execute { completion(result) }
    }

    static func describe(_ error: Error) -> String {
        if let e = error as? IOError { return "\(e.description)" }
        if let e = error as? ProtocolError { return "protocol error: \(e.message)" }
        return "\(error)"
    }
}

/// Frames from the queue to the transaction using the connection; the end
/// of the pipeline. With no transaction (idle in the pool), any event
/// takes the connection out of the pool.
final class InjectResponseHandler: ChannelInboundHandler {
    typealias InboundIn = Frame

    var transaction: InjectTransaction?
    weak var pool: InjectPool?
    /// The connection's reserved queue ID (`next-queue-id` of the queue's
    /// latest HELLO, ACCEPTED or REFUSED), until a MAIL uses it.
    private var reservedID: String?

    init(transaction: InjectTransaction) {
        self.transaction = transaction
    }

    func takeReservedID() -> String? {
        defer { reservedID = nil }
        return reservedID
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let transaction {
            let frame = unwrapInboundIn(data)
            if case .text(let id)? = frame["next-queue-id"] { reservedID = id }
            transaction.received(frame)
        } else {
            pool?.discard(context.channel)   // nothing is due on an idle connection
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        transaction?.channelWritabilityChanged()
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let transaction { transaction.channelError(error) } else { pool?.discard(context.channel) }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let transaction { transaction.channelClosed() } else { pool?.discard(context.channel) }
        context.fireChannelInactive()
    }
}
