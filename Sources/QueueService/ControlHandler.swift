// The `control` server (PROTOCOL.md 4.4): the admin CLI's requests.

import Logging
import NIOCore
import Spool
import StageProtocol

final class ControlHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private let engine: QueueEngine
    private var greeted = false
    /// A request whose answer waits for a spool commit; the next REQUEST
    /// is refused until then (the protocol is one request at a time).
    private var busy = false
    private var context: ChannelHandlerContext?

    init(engine: QueueEngine) { self.engine = engine }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            try handle(unwrapInboundIn(data), context: context)
        } catch let error as ProtocolError {
            fail(context: context, text: error.message)
        } catch {
            fail(context: context, text: "\(error)")
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let error = error as? ProtocolError { fail(context: context, text: error.message) } else { context.close(promise: nil) }
    }

    private func fail(context: ChannelHandlerContext, text: String) {
        engine.logger.warning("control: protocol error: \(text)")
        let error = Frame(.error, ["status": .text("5.5.0"), "text": AttributeValue.sanitizedText(text)])
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(error)).whenComplete { _ in channel.close(promise: nil) }
    }

    private func done(_ ok: Bool, _ text: String) {
        busy = false
        context?.writeAndFlush(wrapOutboundOut(Frame(.done, ["ok": .bool(ok), "text": AttributeValue.sanitizedText(text)])),
                               promise: nil)
    }

    private func handle(_ frame: Frame, context: ChannelHandlerContext) throws {
        guard greeted else {
            guard frame.type == .hello, try frame.text("protocol") == ProtocolName.control.rawValue,
                  try frame.uint("version") == 1 else {
                throw ProtocolError("expected HELLO protocol=control version=1")
            }
            greeted = true
            context.writeAndFlush(wrapOutboundOut(Frame(.hello, ["protocol": .text("control"), "version": .uint(1),
                                                              "software": .text(QueueService.software)])),
                                  promise: nil)
            return
        }
        guard frame.type == .request else { throw ProtocolError("\(frame.type.name) is not allowed here") }
        guard !busy else { throw ProtocolError("REQUEST before the DONE of the previous one") }
        let verb = try frame.text("verb")
        let idText = try frame.optionalText("queue-id")
        var id: QueueID?
        if let idText {
            guard let parsed = QueueID(rawValue: idText.uppercased()) else {
                return done(false, "not a queue ID: \(idText)")
            }
            id = parsed
        }
        if try frame.bool("all", default: false) {
            guard id == nil, ControlVerbs.forAll.contains(verb) else {
                throw ProtocolError("REQUEST \(verb) cannot take all")
            }
            return applyToAll(verb, bounce: try frame.bool("bounce", default: false), context: context)
        }
        if ControlVerbs.needingID.contains(verb) && id == nil { throw ProtocolError("REQUEST \(verb) needs a queue-id") }
        if let id, verb != "list", verb != "stats", engine.scheduler.envelope(id) == nil {
            return done(false, "no such message: \(id)")
        }
        switch verb {
        case "list":
            let envelopes = engine.scheduler.envelopes
            for env in envelopes { writeEntry(env) }
            done(true, "\(envelopes.count) messages, \(envelopes.reduce(0) { $0 + $1.recipients.filter { !$0.state.isFinal }.count }) recipients to deliver")
        case "show":
            let env = engine.scheduler.envelope(id!)!
            writeEntry(env)
            do {
                try engine.spool.readBody(id!) { chunk in
                    var offset = 0
                    while offset < chunk.count {
                        let end = min(offset + WireLimits.maxBytes, chunk.count)
                        context.write(wrapOutboundOut(Frame(.body, ["data": .bytes(Array(chunk[offset..<end]))])), promise: nil)
                        offset = end
                    }
                }
                done(true, "\(id!): \(env.size) bytes")
            } catch {
                done(false, "\(id!): cannot read the message body: \(error)")
            }
        case "flush":
            let n = engine.flush(id)
            engine.logger.info("flush: \(id.map { "\($0)" } ?? "all messages") by administrator")
            done(true, "flushed \(n) messages")
        case "hold", "release":
            busy = true
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            let held = verb == "hold"
            engine.setHeld(id!, held) { result in
                switch result {
                case .success: bound.value.done(true, "\(id!): \(held ? "held" : "released")")
                case .failure(let error): bound.value.done(false, "\(id!): \(error)")
                }
            }
        case "delete":
            let bounce = try frame.bool("bounce", default: false)
            if bounce, let why = engine.bounceBlocked(id!) { return done(false, why) }
            busy = true
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            engine.delete(id!, bounce: bounce) { result in
                switch result {
                case .success: bound.value.done(true, "\(id!): deleted\(bounce ? ", sender notified" : "")")
                case .failure(let error): bound.value.done(false, "\(id!): \(error)")
                }
            }
        case "stats":
            done(true, engine.statistics().description)
        default:
            throw ProtocolError("unknown verb \(verb)")
        }
    }

    /// `delete`, `hold` or `release` of every message (`all`), as Postfix's
    /// `postsuper -d ALL`: each change is submitted at once, so the spool's
    /// group commit takes them together, and one DONE answers once every
    /// one is committed, with the count and the first failure. Messages
    /// already held (or not held, for release) are left as they are.
    private func applyToAll(_ verb: String, bounce: Bool, context: ChannelHandlerContext) {
        let ids = engine.scheduler.envelopes.filter { verb == "delete" || $0.held != (verb == "hold") }.map(\.queueID)
        engine.logger.info("\(verb): all \(ids.count) messages by administrator")
        let past = ["delete": "deleted", "hold": "held", "release": "released"][verb]!
        guard !ids.isEmpty else { return done(true, "\(past) 0 messages") }
        busy = true
        let tally = AllTally(count: ids.count)
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        // A failure's text, or nil; one DONE once every message answered.
        let finished: (String?) -> Void = { failure in
            if let failure {
                tally.failed += 1
                if tally.firstFailure == nil { tally.firstFailure = failure }
            }
            tally.remaining -= 1
            guard tally.remaining == 0 else { return }
            let changed = tally.count - tally.failed
            if let first = tally.firstFailure {
                bound.value.done(false, "\(past) \(changed) of \(tally.count) messages; \(tally.failed) failed, first: \(first)")
            } else {
                bound.value.done(true, "\(past) \(changed) messages\(verb == "delete" && bounce ? ", senders notified" : "")")
            }
        }
        func failure(_ id: QueueID, _ result: Result<Void, SpoolError>) -> String? {
            if case .failure(let error) = result { return "\(id): \(error)" }
            return nil
        }
        for id in ids {
            if verb == "delete" {
                if bounce, let why = engine.bounceBlocked(id) {
                    finished(why)
                } else {
                    engine.delete(id, bounce: bounce) { finished(failure(id, $0)) }
                }
            } else {
                engine.setHeld(id, verb == "hold") { finished(failure(id, $0)) }
            }
        }
    }

    private func writeEntry(_ env: EnvelopeRecord) {
        guard let context else { return }
        var entry = Frame(.entry, ["queue-id": .text(env.queueID.rawValue), "size": .uint(env.size),
                                   "arrival": .uint(env.arrival), "sender": .text(env.sender), "held": .bool(env.held)])
        entry.set("envid", env.envid.map { .text($0) })
        entry.set("ret", env.ret.map { .text($0) })
        context.write(wrapOutboundOut(entry), promise: nil)
        let inFlight = engine.scheduler.inFlight(env.queueID)
        for (i, r) in env.recipients.enumerated() {
            var rcpt = Frame(.entryRcpt, ["address": .text(r.address), "state": .text(r.state.rawValue),
                                          "attempts": .uint(UInt64(r.attempts)),
                                          "next-attempt": .uint(r.state.isFinal || inFlight.contains(i) ? 0 : r.nextAttempt)])
            if r.state != .sent, let error = r.lastError { rcpt.set("error", AttributeValue.sanitizedText(error)) }
            context.write(wrapOutboundOut(rcpt), promise: nil)
        }
    }
}

@available(*, unavailable)
extension ControlHandler: Sendable {}

/// What `applyToAll` has heard back, on the event loop only.
private final class AllTally {
    let count: Int
    var remaining: Int
    var failed = 0
    var firstFailure: String?
    init(count: Int) {
        self.count = count
        self.remaining = count
    }
}
