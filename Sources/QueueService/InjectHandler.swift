// The `inject` server (PROTOCOL.md 4.2): MAIL (-> QUEUE-ID when the client
// asks with announce-id), RCPT, BODY..., END -> ACCEPTED only once the
// message is committed with sync. A connection idle between transactions
// for QueueServiceOptions.injectIdleTimeout is closed.

#if canImport(Glibc)
import Glibc
#endif
import Logging
import MailMessage
import NIOCore
import Spool
import StageProtocol
import StageRuntime

/// `struct ucred` of <sys/socket.h> (Linux), which Swift does not import
/// because glibc hides it behind _GNU_SOURCE. Same layout: pid, uid, gid.
struct PeerCredentials: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}

/// SO_PEERCRED through NIO's socket option provider: the channel's own fd
/// is not exposed, but `unsafeGetSocketOption` runs getsockopt(2) on it
/// with a value type of our choosing (PeerCredentials, 12 bytes like ucred).
func peerCredentials(of channel: Channel) -> EventLoopFuture<PeerCredentials?> {
    guard let provider = channel as? SocketOptionProvider else {
        return channel.eventLoop.makeSucceededFuture(nil)
    }
    let future: EventLoopFuture<PeerCredentials> = provider.unsafeGetSocketOption(
        level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
    return future.map { Optional($0) }.recover { _ in nil }
}

/// A refusal: the REFUSED frame of an END.
struct Refusal: Error, Sendable {
    var code: UInt64
    var status: String
    var text: String

    var frame: Frame {
        Frame(.refused, ["code": .uint(code), "status": .text(status), "text": AttributeValue.sanitizedText(text)])
    }
    static func spool(_ error: SpoolError) -> Refusal {
        switch error {
        case .full: return Refusal(code: 452, status: "4.3.1", text: "insufficient system storage")
        default: return Refusal(code: 451, status: "4.3.0", text: "queue file write error")
        }
    }
}

final class InjectHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private struct Transaction {
        var envelope: EnvelopeRecord
        var writer: BodyWriter?
        var size = 0
        var recipientCount = 0
        var refusal: Refusal?
        /// The start of the message, for the Message-ID of the log line.
        var head: [UInt8] = []
        /// Body bytes counted in the engine's PendingBodies, and for whom.
        var reserved = 0
        var reservedPeer: UInt32?
        /// An 8-bit byte arrived in a body whose MAIL named no body type.
        var undeclaredEightBit = false
    }

    /// How much of a message is kept to find its Message-ID.
    static let headLimit = 16384

    private let engine: QueueEngine
    private var greeted = false
    /// The client's HELLO asked for reserved IDs (PROTOCOL.md 4.2).
    private var reserveIDs = false
    /// The ID announced as `next-queue-id` and not used by a MAIL yet.
    private var reservedID: QueueID?
    private var peerUID: UInt32?
    /// The uid this connection is counted against (admitInjectConnection).
    private var countedUID: UInt32?
    /// Refused for too many connections: what it sends is ignored.
    private var refusedConnection = false
    private var transaction: Transaction?
    /// Answers in END order, whatever order the commits complete in.
    private var replies: [Int: Frame] = [:]
    private var nextReply = 0
    private var repliesIssued = 0
    private var context: ChannelHandlerContext?
    /// This connection as a submitter to the spool (whose commits wait a
    /// little for the other connections active lately, see Spool.submit).
    private var submitter: Int { Int(bitPattern: UInt(bitPattern: ObjectIdentifier(self))) }
    private var submitted = false
    /// Since when nothing was received with no transaction open and no
    /// answer due; nil while a transaction or its answer is outstanding.
    private var idleSince: NIODeadline?
    /// Looks at `idleSince` every injectIdleTimeout at least (one task per
    /// connection, not one set and cancelled per frame or transaction).
    private var idleCheck: Scheduled<Void>?

    init(engine: QueueEngine) { self.engine = engine }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) {
        idleCheck?.cancel()
        idleCheck = nil
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        idleSince = .now()
        scheduleIdleCheck(in: engine.options.injectIdleTimeout)
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        peerCredentials(of: context.channel).whenSuccess { cred in
            guard let cred else { return }
            let handler = bound.value
            handler.peerUID = cred.uid
            guard handler.engine.admitInjectConnection(uid: cred.uid) else {
                handler.refusedConnection = true
                handler.engine.logger.warning("inject: connection from uid=\(cred.uid) refused: it has \(handler.engine.options.injectConnectionLimit?.perUser ?? 0) open already")
                let error = Frame(.error, ["status": .text("4.3.2"),
                                           "text": .text("too many connections from uid \(cred.uid)")])
                if let context = handler.context {
                    let channel = context.channel
                    context.writeAndFlush(handler.wrapOutboundOut(error)).whenComplete { _ in channel.close(promise: nil) }
                }
                return
            }
            handler.countedUID = cred.uid
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refusedConnection else { return }
        let frame = unwrapInboundIn(data)
        do {
            try handle(frame, context: context)
        } catch let error as ProtocolError {
            fail(context: context, status: "5.5.0", text: error.message)
        } catch {
            fail(context: context, status: "4.3.0", text: "\(error)")
        }
        // A HELLO, an ABORT: idle from now; a MAIL: busy until its answer.
        idleSince = isIdle ? .now() : nil
    }

    /// No transaction open, no answer to an END still due.
    private var isIdle: Bool { transaction == nil && nextReply == repliesIssued }

    private func scheduleIdleCheck(in delay: TimeAmount) {
        idleCheck = context?.eventLoop.assumeIsolated().scheduleTask(in: delay) { [self] in checkIdle() }
    }

    /// Closes the connection if it has been idle for injectIdleTimeout,
    /// else looks again when it could have been. Only between
    /// transactions: inside one the client's pace is its SMTP client's
    /// (PROTOCOL.md 4.2). No ERROR is sent: smtp-listen retries a pooled
    /// connection that closes before the queue said anything (a MAIL that
    /// crossed the close), never one that got an ERROR.
    private func checkIdle() {
        idleCheck = nil
        guard let context else { return }
        let timeout = engine.options.injectIdleTimeout
        guard let since = idleSince else { return scheduleIdleCheck(in: timeout) }
        let idle = NIODeadline.now() - since
        guard idle >= timeout else { return scheduleIdleCheck(in: timeout - idle) }
        engine.logger.info("inject: connection from uid=\(peerUID.map(String.init) ?? "?") closed: idle for \(timeout.nanoseconds / 1_000_000_000) s")
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let error = error as? ProtocolError {
            fail(context: context, status: "5.5.0", text: error.message)
        } else {
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        idleCheck?.cancel()
        idleCheck = nil
        forgetTransaction()   // an unfinished message is forgotten
        if let uid = countedUID {
            engine.releaseInjectConnection(uid: uid)
            countedUID = nil
        }
        if submitted { engine.spool.submitterLeft(submitter) }
        context.fireChannelInactive()
    }

    private func fail(context: ChannelHandlerContext, status: String, text: String) {
        engine.logger.warning("inject: protocol error from uid=\(peerUID.map(String.init) ?? "?"): \(text)")
        forgetTransaction()
        let error = Frame(.error, ["status": .text(status), "text": AttributeValue.sanitizedText(text)])
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(error)).whenComplete { _ in channel.close(promise: nil) }
    }

    private func handle(_ frame: Frame, context: ChannelHandlerContext) throws {
        guard greeted else {
            guard frame.type == .hello, try frame.text("protocol") == ProtocolName.inject.rawValue,
                  try frame.uint("version") == 1 else {
                throw ProtocolError("expected HELLO protocol=inject version=1")
            }
            greeted = true
            reserveIDs = try frame.bool("reserve-ids", default: false)
            var hello = Frame(.hello, ["protocol": .text("inject"), "version": .uint(1),
                                       "software": .text(QueueService.software)])
            announceReservation(in: &hello)
            context.writeAndFlush(wrapOutboundOut(hello), promise: nil)
            return
        }
        switch frame.type {
        case .mail:
            guard transaction == nil else { throw ProtocolError("MAIL inside a transaction") }
            let id: QueueID
            if let named = try frame.optionalText("queue-id") {
                guard let reserved = reservedID, reserved.rawValue == named else {
                    throw ProtocolError("MAIL queue-id \(named) is not the ID reserved for this connection")
                }
                reservedID = nil
                id = reserved
            } else {
                id = engine.spool.newQueueID()
            }
            let t = Transaction(envelope: try envelope(from: frame, queueID: id))
            transaction = t
            // The ID is the spool key the message will be committed under
            // (it is drawn here, at MAIL): a client that asks learns it now,
            // e.g. smtp-listen for its Received header and log line, and
            // ACCEPTED repeats it. Sent at once, ahead of the answers to
            // earlier ENDs that are still being committed.
            if try frame.bool("announce-id", default: false) {
                context.writeAndFlush(wrapOutboundOut(Frame(.queueID, ["queue-id": .text(t.envelope.queueID.rawValue)])),
                                      promise: nil)
            }
        case .rcpt:
            guard var t = transaction else { throw ProtocolError("RCPT without MAIL") }
            t.recipientCount += 1
            if t.recipientCount > engine.config.queue.recipientLimit {
                if t.refusal == nil { t.refusal = Refusal(code: 452, status: "4.5.3", text: "too many recipients") }
            } else {
                let address = try frame.text("address")
                guard !address.isEmpty else { throw ProtocolError("RCPT with an empty address") }
                t.envelope.recipients.append(RecipientRecord(
                    address: address, notify: try frame.optionalText("notify"),
                    orcpt: try frame.optionalText("orcpt"), state: .pending, attempts: 0, nextAttempt: 0,
                    lastError: nil, dsnStatus: nil, remoteMTA: nil, diagnostic: nil, delayNotified: false))
            }
            transaction = t
        case .body:
            guard transaction != nil else { throw ProtocolError("BODY without MAIL") }
            let data = try frame.bytes("data")
            appendBody(data)
        case .end:
            guard let t = transaction else { throw ProtocolError("END without MAIL") }
            transaction = nil
            // The body stays counted until its commit is done: a client
            // that sends message after message without reading the answers
            // would otherwise pile sealed bodies up in the committer's
            // queue, past PendingBodies' bound, while the disk lags.
            finish(t)
        case .abort:
            guard transaction != nil else { throw ProtocolError("ABORT without MAIL") }
            forgetTransaction()
        default:
            throw ProtocolError("\(frame.type.name) is not allowed here")
        }
    }

    private func envelope(from mail: Frame, queueID: QueueID) throws -> EnvelopeRecord {
        EnvelopeRecord(
            queueID: queueID, sender: try mail.text("sender"), arrival: 0, size: 0,
            ret: try mail.optionalText("ret")?.uppercased(), envid: try mail.optionalText("envid"),
            requireTLS: try mail.bool("requiretls", default: false), smtputf8: try mail.bool("smtputf8", default: false),
            bodyType: try mail.optionalText("body-type"), clientAddress: try mail.optionalText("client-address"),
            clientName: try mail.optionalText("client-name"), helo: try mail.optionalText("helo"),
            protocolName: try mail.optionalText("protocol"), authUser: try mail.optionalText("auth-user"),
            peerUID: peerUID, held: false, kind: .normal, recipients: [])
    }

    /// Encrypts the piece into the spool's body writer as it arrives; past
    /// the size limit the rest is only counted.
    private func appendBody(_ data: [UInt8]) {
        guard var t = transaction else { return }
        transaction = nil   // no copy-on-write of the writer reference dance
        t.size += data.count
        if t.envelope.bodyType == nil, !t.undeclaredEightBit, EightBit.occurs(in: data) {
            t.undeclaredEightBit = true
        }
        if t.head.count < Self.headLimit { t.head += data.prefix(Self.headLimit - t.head.count) }
        if t.refusal == nil {
            if t.size > engine.config.queue.acceptedSizeLimit {
                t.refusal = Refusal(code: 552, status: "5.3.4", text: "message size exceeds fixed limit")
                t.writer = nil
                releaseBody(&t)
            } else if !reserveBody(data.count, in: &t) {
                let pending = engine.pendingBodies
                engine.logger.warning("\(t.envelope.queueID): refused: unfinished messages hold \(pending.total) bytes in memory (limit \(pending.limit), \(pending.perPeerLimit) per peer uid), uid=\(peerUID.map(String.init) ?? "?")")
                t.refusal = Refusal(code: 452, status: "4.3.1", text: "insufficient system storage: too many messages in transfer")
                t.writer = nil
                releaseBody(&t)
            } else {
                do {
                    if t.writer == nil { t.writer = try engine.spool.makeBodyWriter() }
                    try t.writer!.append(data)
                } catch {
                    engine.logger.warning("\(t.envelope.queueID): cannot write the message body: \(error)")
                    t.refusal = (error as? SpoolError).map(Refusal.spool)
                        ?? Refusal(code: 451, status: "4.3.0", text: "queue file write error")
                    t.writer = nil
                    releaseBody(&t)
                }
            }
        }
        transaction = t
    }

    /// Counts `bytes` more of the body against PendingBodies.
    private func reserveBody(_ bytes: Int, in t: inout Transaction) -> Bool {
        if t.reserved == 0 { t.reservedPeer = peerUID }
        guard engine.pendingBodies.reserve(bytes, peer: t.reservedPeer) else { return false }
        t.reserved += bytes
        return true
    }

    private func releaseBody(_ t: inout Transaction) {
        engine.pendingBodies.release(t.reserved, peer: t.reservedPeer)
        t.reserved = 0
    }

    /// Drops the open transaction, if any, and what its body held.
    private func forgetTransaction() {
        guard var t = transaction else { return }
        transaction = nil
        releaseBody(&t)
    }

    private func finish(_ t: Transaction) {
        let slot = repliesIssued
        repliesIssued += 1
        var t = t
        if t.refusal == nil && t.envelope.recipients.isEmpty {
            t.refusal = Refusal(code: 554, status: "5.5.1", text: "no valid recipients")
        }
        if let refusal = t.refusal {
            releaseBody(&t)
            refuse(t, refusal, slot: slot)
            return
        }
        let sealed: SealedBody
        do {
            if t.writer == nil { t.writer = try engine.spool.makeBodyWriter() }
            sealed = try t.writer!.finish()
        } catch {
            engine.logger.warning("\(t.envelope.queueID): cannot seal the message body: \(error)")
            releaseBody(&t)
            refuse(t, (error as? SpoolError).map(Refusal.spool) ?? Refusal(code: 451, status: "4.3.0", text: "queue file write error"), slot: slot)
            return
        }
        let (reserved, reservedPeer) = (t.reserved, t.reservedPeer)
        let arrival = engine.now
        var env = t.envelope
        env.arrival = arrival
        env.size = UInt64(t.size)
        env.held = engine.config.queue.holdIncoming
        // No body type named (sendmail without -B, most often; an SMTP
        // client sending 8-bit without BODY=8BITMIME, against RFC 6152) but
        // 8-bit bytes came: stored as 8BITMIME, so that remote-deliver
        // declares it, or converts it for a host without 8BITMIME, rather
        // than send 8-bit bytes as 7 bit.
        if t.undeclaredEightBit { env.bodyType = "8BITMIME" }
        for i in env.recipients.indices { env.recipients[i].nextAttempt = arrival }
        let messageID = HeaderBlock.firstValue("Message-ID", in: t.head[...])
        // The client's address and name are the injecting peer's claim, and
        // the inject socket is open to every local user: unless the peer is
        // smtp-listen (known by its uid when the stages run as their own
        // users), the line names the uid too, so that a local user cannot
        // pass a message off as one from the network without a trace.
        let uid = env.peerUID.map(String.init) ?? "unknown"
        let vouched = engine.options.smtpListenUID.map { $0 == env.peerUID } ?? true
        let client = env.clientAddress.map { "client=\(env.clientName ?? "unknown")[\($0)]" + (vouched ? "" : " uid=\(uid)") }
            ?? "uid=\(uid)"
        let engine = self.engine
        let bound = NIOLoopBound(self, eventLoop: engine.loop)
        let accepted = env
        let (recipientCount, size) = (t.recipientCount, t.size)
        submitted = true
        engine.spool.submit([.insert(env, sealed)], submitter: submitter) { result in
            engine.loop.execute {
                engine.pendingBodies.release(reserved, peer: reservedPeer)
                switch result {
                case .success:
                    // Two to four lines at once (client, message-id, queue
                    // active, maybe a deferral): one write to the log pipe.
                    StageLogHandler.batchingLines {
                        engine.logger.info("\(accepted.queueID): \(client) from=<\(accepted.sender)>")
                        if let messageID {
                            engine.logger.info("\(accepted.queueID): message-id=\(messageID)")
                        }
                        engine.accepted(accepted)
                    }
                    bound.value.reply(Frame(.accepted, ["queue-id": .text(accepted.queueID.rawValue)]), slot: slot)
                case .failure(let error):
                    engine.logger.warning("\(accepted.queueID): cannot queue the message: \(error)")
                    bound.value.refuse(sender: accepted.sender, recipients: recipientCount, size: size, .spool(error), slot: slot)
                }
            }
        }
    }

    private func refuse(_ t: Transaction, _ refusal: Refusal, slot: Int) {
        refuse(sender: t.envelope.sender, recipients: t.recipientCount, size: t.size, refusal, slot: slot)
    }

    private func refuse(sender: String, recipients: Int, size: Int, _ refusal: Refusal, slot: Int) {
        engine.refused += 1
        engine.logger.info("reject: from=<\(sender)>, nrcpt=\(recipients), size=\(size): \(refusal.code) \(refusal.status) \(refusal.text)")
        reply(refusal.frame, slot: slot)
    }

    /// Names the connection's reserved ID (drawing one if the last was
    /// used) in a HELLO, ACCEPTED or REFUSED, if the client asked for them.
    private func announceReservation(in frame: inout Frame) {
        guard reserveIDs else { return }
        let id = reservedID ?? engine.spool.newQueueID()
        reservedID = id
        frame.set("next-queue-id", .text(id.rawValue))
    }

    private func reply(_ frame: Frame, slot: Int) {
        replies[slot] = frame
        guard let context else { return }   // the client went away; the message stays queued
        var wrote = false
        while var next = replies.removeValue(forKey: nextReply) {
            announceReservation(in: &next)
            context.write(wrapOutboundOut(next), promise: nil)
            nextReply += 1
            wrote = true
        }
        if wrote { context.flush() }
        if isIdle { idleSince = .now() }
    }
}

@available(*, unavailable)
extension InjectHandler: Sendable {}

