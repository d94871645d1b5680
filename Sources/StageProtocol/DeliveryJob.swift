// The `deliver` protocol's job (PROTOCOL.md 4.3) as one value, and the
// assembler that builds it from its frames: JOB, JOB-RCPT..., BODY...,
// JOB-END. The schema checks each frame; the assembler checks what a schema
// cannot: the order of the frames, recipient indexes used once, and the
// body size. Every delivery stage (local-deliver, remote-deliver, a
// replacement written from PROTOCOL.md) receives jobs the same way.

/// A job as the queue sent it.
public struct DeliveryJob: Sendable {
    /// The largest JOB-RCPT index a job may carry (PROTOCOL.md 4.3).
    public static let maximumRecipientIndex: UInt64 = UInt64(Int32.max)

    public struct Recipient: Sendable, Equatable {
        public var index: UInt64
        public var address: String
        public var notify: String?
        public var orcpt: String?
        public init(index: UInt64, address: String, notify: String? = nil, orcpt: String? = nil) {
            self.index = index
            self.address = address
            self.notify = notify
            self.orcpt = orcpt
        }
    }

    public var job: UInt64
    public var queueID: String
    public var sender: String
    public var arrival: UInt64
    public var size: UInt64
    public var attempt: UInt64
    public var ret: String?
    public var envid: String?
    public var requireTLS = false
    public var smtputf8 = false
    public var bodyType: String?
    /// The transport table's next hop (remote jobs).
    public var nexthop: String?
    public var recipients: [Recipient] = []
    /// The message as received: CRLF line ends, not dot-stuffed, in the
    /// chunks it came in.
    public var body: [[UInt8]] = []
    /// The body went over the stage's size limit and was not kept.
    public var oversized = false

    /// Whole seconds from arrival to `now` (Unix time), for the `delay=`
    /// of a delivery's log line, as the queue's own lines print it. The
    /// arrival is in whole seconds, so a fraction would be noise: a message
    /// taken at 12:00:00.9 and delivered at 12:00:01.0 would show 1.00 for
    /// a delivery of a tenth of a second.
    public func delay(now: UInt64) -> UInt64 {
        now > arrival ? now - arrival : 0
    }

    public init(job: UInt64, queueID: String, sender: String, arrival: UInt64,
                size: UInt64 = 0, attempt: UInt64 = 1) {
        self.job = job
        self.queueID = queueID
        self.sender = sender
        self.arrival = arrival
        self.size = size
        self.attempt = attempt
    }
}

/// Builds jobs from the frames of a `deliver` connection, one at a time.
public struct DeliveryJobAssembler: Sendable {
    /// Bodies larger than this are not kept (the job is `oversized`); the
    /// frames are still read to JOB-END, since a job comes whole.
    public let maximumMessageSize: Int
    private var job: DeliveryJob?
    private var indexes = Set<UInt64>()
    private var bodySize = 0
    private var inBody = false

    public init(maximumMessageSize: Int) {
        self.maximumMessageSize = maximumMessageSize
    }

    /// Between JOB and JOB-END.
    public var isAssembling: Bool { job != nil }

    /// Takes one frame of a job (JOB, JOB-RCPT, BODY or JOB-END); returns
    /// the job when the frame was its JOB-END. Any other frame, or one out
    /// of order, is a protocol error.
    public mutating func add(_ frame: Frame) throws(ProtocolError) -> DeliveryJob? {
        if frame.type == .job {
            if let job { throw ProtocolError("JOB inside job \(job.job)") }
            var started = DeliveryJob(job: try frame.uint("job"), queueID: try frame.text("queue-id"),
                                      sender: try frame.text("sender"), arrival: try frame.uint("arrival"),
                                      size: try frame.uint("size"), attempt: try frame.uint("attempt"))
            started.ret = try frame.optionalText("ret")
            started.envid = try frame.optionalText("envid")
            started.requireTLS = try frame.bool("requiretls", default: false)
            started.smtputf8 = try frame.bool("smtputf8", default: false)
            started.bodyType = try frame.optionalText("body-type")
            started.nexthop = try frame.optionalText("nexthop")
            job = started
            indexes = []
            bodySize = 0
            inBody = false
            return nil
        }
        guard var current = job else { throw ProtocolError("\(frame.type.name) outside a job") }
        switch frame.type {
        case .jobRcpt:
            guard !inBody else { throw ProtocolError("JOB-RCPT after BODY in job \(current.job)") }
            let index = try frame.uint("index")
            // An index names a recipient of one message: far below this,
            // and a delivery stage may hold it in an Int or an Int32.
            guard index <= DeliveryJob.maximumRecipientIndex else {
                throw ProtocolError("JOB-RCPT: index \(index) over \(DeliveryJob.maximumRecipientIndex) in job \(current.job)")
            }
            guard indexes.insert(index).inserted else {
                throw ProtocolError("JOB-RCPT: index \(index) twice in job \(current.job)")
            }
            current.recipients.append(DeliveryJob.Recipient(index: index, address: try frame.text("address"),
                                                            notify: try frame.optionalText("notify"),
                                                            orcpt: try frame.optionalText("orcpt")))
        case .body:
            guard !current.recipients.isEmpty else { throw ProtocolError("BODY before any JOB-RCPT in job \(current.job)") }
            inBody = true
            let data = try frame.bytes("data")
            bodySize += data.count
            if bodySize > maximumMessageSize {
                current.oversized = true
                current.body = []   // let the memory go
            } else {
                current.body.append(data)
            }
        case .jobEnd:
            let id = try frame.uint("job")
            guard id == current.job else { throw ProtocolError("JOB-END for job \(id) inside job \(current.job)") }
            guard !current.recipients.isEmpty else { throw ProtocolError("job \(current.job) has no JOB-RCPT") }
            job = nil
            return current
        default:
            throw ProtocolError("\(frame.type.name) inside job \(current.job)")
        }
        job = current
        return nil
    }
}
