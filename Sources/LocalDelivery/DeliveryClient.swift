// The `deliver` side of the stage protocol (Pipeline/PROTOCOL.md section
// 4.3): connect to the queue's deliver socket, say HELLO as transport
// "local", then take jobs (JOB, JOB-RCPT..., BODY..., JOB-END), deliver them,
// and answer with one RESULT per recipient and a JOB-DONE.
//
// Each worker owns one connection and takes one job at a time (max-jobs 1);
// several workers run at once so that one delivery's fsyncs overlap with the
// next one's writes. The queue may restart at any moment (the supervisor
// restarts it): a worker that loses its connection reconnects with a pause
// growing from 0.1 s to 5 s, and jobs that were in flight are given back by
// the queue and retried, so nothing is lost.
//
// Stopping (SIGTERM: a shutdown, or the instance a reload replaced) drains:
// a worker in the middle of a delivery finishes it and reports its results,
// then closes; an idle worker's connection is shut down at once. A job that
// arrives at that very moment is not delivered but dropped with the
// connection, and the queue, which has no result for it, tries it again:
// never a copy written without its result reported (a duplicate), never a
// job lost.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import StageProtocol
import Synchronization

public final class DeliveryWorker: Sendable {
    public let socketPath: String
    public let agent: LocalDeliveryAgent
    /// Largest message body accepted in a job (the body is held in memory).
    public let maximumMessageSize: Int
    public let name: String
    private let state = Mutex(WorkerState())
    public static let software = "sealpost-local-deliver 0.1"

    public init(socketPath: String, agent: LocalDeliveryAgent, maximumMessageSize: Int, name: String = "worker") {
        self.socketPath = socketPath
        self.agent = agent
        self.maximumMessageSize = maximumMessageSize
        self.name = name
    }

    /// What `stop()` must know: whether a delivery is under way, and the
    /// connection to shut down when none is.
    private struct WorkerState {
        var stopRequested = false
        var delivering = false
        var connection: Int32 = -1
    }

    private var stopRequested: Bool { state.withLock { $0.stopRequested } }

    /// Serves the queue: sessions, reconnecting after each, until `stop()`.
    public func run() {
        let minimumPause = 0.1, maximumPause = 5.0
        var pause = minimumPause
        var failing = false
        while !stopRequested {
            do {
                let jobs = try session(onConnected: {
                    if failing {
                        agent.log.info("\(name): connected to \(socketPath)")
                        failing = false
                    }
                })
                // An orderly close by the queue (a restart): come back soon.
                if jobs > 0 { pause = minimumPause }
            } catch {
                // Say it once per outage, not every few seconds; the end of
                // a connection that stop() shut down is no outage.
                if !failing && !stopRequested {
                    agent.log.warning("\(name): \(socketPath): \(error); reconnecting")
                    failing = true
                }
            }
            if stopRequested { break }
            // In steps, so that a stop during a queue outage is not kept
            // waiting for the whole pause.
            var slept = 0.0
            while slept < pause && !stopRequested {
                sleepSeconds(min(minimumPause, pause - slept))
                slept += minimumPause
            }
            pause = min(pause * 2, maximumPause)
        }
    }

    /// Makes `run()` return once the delivery in progress, if any, is done
    /// and answered; an idle connection is shut down now. Safe from any
    /// thread (the stage calls it from its signal thread).
    public func stop() {
        state.withLock { state in
            state.stopRequested = true
            if !state.delivering && state.connection >= 0 {
                // Wakes the receive(2) the worker is blocked in; the queue
                // sees the connection end with nothing outstanding.
                shutdown(state.connection, Int32(SHUT_RDWR))
            }
        }
    }

    /// Marks the start of a delivery; false when the worker is stopping
    /// (the job is dropped unopened and the queue tries it again).
    private func beginDelivery() -> Bool {
        state.withLock { state in
            guard !state.stopRequested else { return false }
            state.delivering = true
            return true
        }
    }

    /// Marks its end (results sent, or the connection failed).
    private func endDelivery() {
        state.withLock { $0.delivering = false }
    }

    private func attach(_ connection: StageConnection?) {
        state.withLock { state in
            state.connection = connection?.fileDescriptor ?? -1
            // Stopped while connecting: nothing to wait for.
            if state.stopRequested, let fd = connection?.fileDescriptor { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// One connection: connect, HELLO, jobs until the queue closes the
    /// connection. Returns the number of jobs handled; throws on connection
    /// and protocol errors (the caller reconnects).
    @discardableResult
    public func session(onConnected: () -> Void = {}) throws -> Int {
        let connection = try StageConnection.connect(path: socketPath)
        attach(connection)
        defer {
            attach(nil)
            connection.close()
        }
        try connection.clientHello(.deliver, extra: [
            ("software", .text(DeliveryWorker.software)),
            ("transport", .text("local")),
            ("max-jobs", .uint(1)),
        ])
        onConnected()
        return try serve(connection)
    }

    /// Handles jobs on a connection whose HELLOs are done, until EOF or
    /// `stop()`.
    public func serve(_ connection: StageConnection) throws -> Int {
        var count = 0
        while !stopRequested, let job = try JobReader.receiveJob(from: connection, maximumMessageSize: maximumMessageSize) {
            guard beginDelivery() else { break }
            defer { endDelivery() }
            let results: [RecipientResult]
            if job.oversized {
                results = agent.refuseOversized(job, limit: maximumMessageSize)
            } else {
                results = agent.deliver(job)
            }
            for result in results {
                try connection.send(JobReader.resultFrame(job: job.job, result))
            }
            try connection.send(Frame(.jobDone, ["job": .uint(job.job)]))
            count += 1
        }
        return count
    }
}

/// Reads jobs from the connection (DeliveryJobAssembler checks the order of
/// their frames), and writes RESULT frames.
public enum JobReader {
    /// The next job, or nil when the queue closed the connection between jobs.
    public static func receiveJob(from connection: StageConnection, maximumMessageSize: Int) throws -> DeliveryJob? {
        var assembler = DeliveryJobAssembler(maximumMessageSize: maximumMessageSize)
        while true {
            guard let frame = try connection.receive() else {
                if assembler.isAssembling { throw ProtocolError("connection closed in the middle of a job") }
                return nil
            }
            switch frame.type {
            case .error:
                throw PeerError(status: try frame.text("status"), text: try frame.text("text"))
            case .job where !assembler.isAssembling, .jobRcpt, .body, .jobEnd:
                if let job = try assembler.add(frame) { return job }
            default:
                throw ProtocolError("\(frame.type.name): expected \(assembler.isAssembling ? "the rest of the job" : "JOB")")
            }
        }
    }

    public static func resultFrame(job: UInt64, _ result: RecipientResult) -> Frame {
        var frame = Frame(.result, attributes: [
            ("job", .uint(job)),
            ("index", .uint(result.index)),
            ("status", .text(result.status.rawValue)),
            ("dsn", .text(result.dsn)),
            ("text", AttributeValue.sanitizedText(result.text)),
        ])
        if let relay = result.relay { frame.set("relay", .text(relay)) }
        return frame
    }
}

func sleepSeconds(_ seconds: Double) {
    var ts = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - Double(Int(seconds))) * 1e9))
    var remaining = timespec()
    while nanosleep(&ts, &remaining) != 0 && errno == EINTR { ts = remaining }
}
