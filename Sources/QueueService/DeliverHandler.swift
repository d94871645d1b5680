// The `deliver` server (PROTOCOL.md 4.3): jobs out to a delivery stage,
// RESULT and JOB-DONE back.

import Logging
import NIOCore
import Spool
import StageProtocol

/// A job sent and not yet done, with the results received so far (keyed by
/// recipient index in the envelope, which is also the JOB-RCPT `index`).
struct OutstandingJob {
    var number: UInt64
    var plan: JobPlan
    var results: [Int: DeliveryResult] = [:]
    /// The results are the queue's own (no stage saw the job): the queue
    /// logs them, as no stage did.
    var resultsFromQueue = false
}

final class DeliverHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private let engine: QueueEngine
    private var context: ChannelHandlerContext?
    private(set) var transport: Transport?
    private(set) var maxJobs = 1
    private var outstanding: [UInt64: OutstandingJob] = [:]
    private var nextJobNumber: UInt64 = 1
    private var registered = false
    /// Jobs written and not yet flushed (see `send`).
    private var flushScheduled = false

    init(engine: QueueEngine) { self.engine = engine }

    var outstandingCount: Int { outstanding.count }
    var freeCapacity: Int { context == nil ? 0 : maxJobs - outstanding.count }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// A stage that must not take jobs (see QueueServiceOptions) is turned
    /// away before it can say anything. The credentials are read on the
    /// loop, so the check completes before the first frame.
    func channelActive(context: ChannelHandlerContext) {
        let refused = engine.options.refusedDeliveryPeers
        guard !refused.isEmpty else { return context.fireChannelActive() }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        peerCredentials(of: context.channel).whenComplete { result in
            let handler = bound.value
            guard let context = handler.context else { return }
            let why: String
            switch result {
            case .success(let cred?):
                guard let stage = refused[cred.uid] else { return context.fireChannelActive() }
                why = "from uid \(cred.uid) (\(stage)): not a delivery stage"
            default:
                // Who it is cannot be told: refused, as the check is on.
                why = "whose peer credentials cannot be read"
            }
            handler.engine.logger.warning("deliver: refused a connection \(why)")
            handler.context = nil
            context.close(promise: nil)
        }
    }

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
        if let error = error as? ProtocolError {
            fail(context: context, text: error.message)
        } else {
            context.close(promise: nil)
        }
    }

    /// The stage went away (or was closed): every job it still had comes
    /// back to the queue; results already received count.
    func channelInactive(context: ChannelHandlerContext) {
        self.context = nil
        let lost = outstanding.values.sorted { $0.number < $1.number }
        outstanding = [:]
        if registered {
            registered = false
            engine.stageDisconnected(self, lost: lost)
        }
        context.fireChannelInactive()
    }

    private func fail(context: ChannelHandlerContext, text: String) {
        engine.logger.warning("deliver: protocol error from \(transport?.stageName ?? "delivery stage"): \(text)")
        let error = Frame(.error, ["status": .text("5.5.0"), "text": AttributeValue.sanitizedText(text)])
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(error)).whenComplete { _ in channel.close(promise: nil) }
    }

    private func handle(_ frame: Frame, context: ChannelHandlerContext) throws {
        guard registered else {
            guard transport == nil, frame.type == .hello,
                  try frame.text("protocol") == ProtocolName.deliver.rawValue, try frame.uint("version") == 1 else {
                throw ProtocolError("expected HELLO protocol=deliver version=1")
            }
            guard let t = Transport(rawValue: try frame.text("transport")) else {
                throw ProtocolError("unknown transport")
            }
            let jobs = try frame.optionalUInt("max-jobs") ?? 1
            guard (1...256).contains(jobs) else { throw ProtocolError("max-jobs out of range 1..256") }
            transport = t
            maxJobs = Int(jobs)
            context.writeAndFlush(wrapOutboundOut(Frame(.hello, ["protocol": .text("deliver"), "version": .uint(1),
                                                              "software": .text(QueueService.software)])),
                                  promise: nil)
            registered = true
            engine.stageConnected(self)
            return
        }
        switch frame.type {
        case .result:
            let number = try frame.uint("job")
            let index = try frame.uint("index")
            guard var job = outstanding[number] else { throw ProtocolError("RESULT for unknown job \(number)") }
            guard index < UInt64(Int.max), job.plan.recipients.contains(Int(index)) else {
                throw ProtocolError("RESULT for unknown index \(index) of job \(number)")
            }
            guard job.results[Int(index)] == nil else {
                throw ProtocolError("second RESULT for index \(index) of job \(number)")
            }
            guard let status = DeliveryStatus(rawValue: try frame.text("status")) else {
                throw ProtocolError("RESULT status must be sent, deferred or bounced")
            }
            let dsn = try frame.text("dsn")
            guard Self.dsnMatches(status, dsn) else {
                throw ProtocolError("RESULT dsn \(dsn) does not match status \(status.rawValue)")
            }
            job.results[Int(index)] = DeliveryResult(
                status: status, dsn: dsn, text: try frame.text("text"), relay: try frame.optionalText("relay"),
                remoteMTA: try frame.optionalText("remote-mta"), diagnostic: try frame.optionalText("diagnostic"))
            outstanding[number] = job
        case .jobDone:
            let number = try frame.uint("job")
            guard let job = outstanding.removeValue(forKey: number) else {
                throw ProtocolError("JOB-DONE for unknown job \(number)")
            }
            engine.jobDone(job)
            engine.dispatch()
        default:
            throw ProtocolError("\(frame.type.name) is not allowed here")
        }
    }

    /// RFC 3463 class must agree with the status: 2 sent, 4 deferred, 5
    /// bounced. A stage that says "sent" with 5.1.1 is broken; trusting
    /// either half could lose mail or bounce delivered mail.
    static func dsnMatches(_ status: DeliveryStatus, _ dsn: String) -> Bool {
        let parts = dsn.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, parts.allSatisfy({ !$0.isEmpty && $0.count <= 3 && $0.allSatisfy(\.isNumber) }) else {
            return false
        }
        switch status {
        case .sent: return parts[0] == "2"
        case .deferred: return parts[0] == "4"
        case .bounced: return parts[0] == "5"
        }
    }

    /// Writes one job whole: JOB, JOB-RCPT..., BODY..., JOB-END.
    func send(plan: JobPlan, envelope env: EnvelopeRecord, body: [[UInt8]]) {
        guard let context else { return }
        let number = nextJobNumber
        nextJobNumber += 1
        outstanding[number] = OutstandingJob(number: number, plan: plan)
        var job = Frame(.job, ["job": .uint(number), "queue-id": .text(env.queueID.rawValue),
                               "sender": .text(env.sender), "arrival": .uint(env.arrival),
                               "size": .uint(env.size), "attempt": .uint(UInt64(plan.attempt))])
        job.set("ret", env.ret.map { .text($0) })
        job.set("envid", env.envid.map { .text($0) })
        if env.requireTLS { job.set("requiretls", .bool(true)) }
        if env.smtputf8 { job.set("smtputf8", .bool(true)) }
        job.set("body-type", env.bodyType.map { .text($0) })
        job.set("nexthop", plan.destination.nexthop.map { .text($0) })
        context.write(wrapOutboundOut(job), promise: nil)
        for i in plan.recipients {
            let r = env.recipients[i]
            var rcpt = Frame(.jobRcpt, ["index": .uint(UInt64(i)), "address": .text(r.address)])
            rcpt.set("notify", r.notify.map { .text($0) })
            rcpt.set("orcpt", r.orcpt.map { .text($0) })
            context.write(wrapOutboundOut(rcpt), promise: nil)
        }
        for chunk in body where !chunk.isEmpty {
            context.write(wrapOutboundOut(Frame(.body, ["data": .bytes(chunk)])), promise: nil)
        }
        context.write(wrapOutboundOut(Frame(.jobEnd, ["job": .uint(number)])), promise: nil)
        // One flush for all the jobs sent in this turn of the event loop:
        // a group commit accepts several messages at once, and each
        // dispatches a job; they reach the stage in one write (and one read
        // there) instead of one each.
        if !flushScheduled {
            flushScheduled = true
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            context.eventLoop.execute {
                let handler = bound.value
                handler.flushScheduled = false
                handler.context?.flush()
            }
        }
        engine.logger.debug("\(env.queueID): job \(number) to \(transport?.stageName ?? "?"): \(plan.destination), \(plan.recipients.count) recipients, attempt \(plan.attempt)")
    }
}

@available(*, unavailable)
extension DeliverHandler: Sendable {}
