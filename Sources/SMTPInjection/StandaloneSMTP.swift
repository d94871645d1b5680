// `sendmail -bs`: one SMTP session on standard input and output, run by
// queue-inject for programs that submit mail that way (Symfony Mailer's
// and Laravel's default sendmail transport, mutt's and others'), as
// Postfix's sendmail runs smtpd in stand-alone mode.
//
// The session is the SMTP library's server state machine, as smtp-listen
// runs it, with the policy of a local user: the client is the invoking
// user, trusted to relay (like the host itself in smtp_trusted_networks),
// named "localhost [127.0.0.1]" in the Received field as Postfix names a
// stand-alone client; no STARTTLS, no AUTH. Each message goes to the
// queue over its own inject connection (Pipeline/PROTOCOL.md section 4.2):
// MAIL with announce-id, the RCPTs, the Received field with the announced
// queue ID, the body as it comes (but for its header section, held until
// its end is seen and completed as queue-inject completes a message it
// reads: From, Date and Message-ID when missing, as Postfix's cleanup
// adds them to mail submitted on the host), END; the 250 with the queue ID is
// written only after the queue's ACCEPTED (its commit), as smtp-listen
// does. The queue unreachable or failing: 451 4.3.0 to that message, and
// the session goes on (the client may try again).
//
// Blocking I/O: one process per session, reading a pipe; replies are
// written before each read, so a client that waits for each reply (or
// pipelines, RFC 2920) gets them in time.

#if canImport(Glibc)
import Glibc
#endif
import MailMessage
import SMTP
import SealpostConfig
import StageProtocol

public final class StandaloneSMTP {
    /// The session policy for a local user's session, from the configuration.
    public static func policy(_ config: SealpostConfiguration) -> SMTPServerPolicy {
        var p = SMTPServerPolicy(hostname: config.hostname)
        p.maxRecipients = config.queue.recipientLimit
        p.maxMessageSize = UInt64(max(0, config.queue.messageSizeLimit))
        p.commandLineLimit = config.smtp.commandLineLimit
        p.textLineLimit = config.smtp.textLineLimit
        p.maxErrors = config.smtp.errorLimit
        p.maxJunkCommands = config.smtp.junkCommandLimit
        p.relay = RelayPolicy(localDomains: Set(config.local.domains.map { $0.lowercased() }),
                              relayDomains: Set(config.smtp.relayDomains))
        p.tlsAvailable = false
        p.auth = .never
        return p
    }

    /// The client as the Received field and the queue's log name it.
    public static let client = SMTPClientInfo(address: "127.0.0.1", hostname: "localhost", isTrusted: true)

    private var session: SMTPServerSession
    private let injectSocket: String
    private let timeout: Double
    private let receivedBy: ReceivedHeader.By
    private var output: [UInt8] = []
    private var closed = false
    private var message: QueueSubmission?

    /// Messages the queue accepted in this session.
    public private(set) var accepted: [String] = []

    private let hostname: String
    private let commandTimeout: Int32
    private let dataTimeout: Int32

    /// `timeout`: the longest wait for the queue in one step (connect, an
    /// answer), seconds. `commandTimeout`, `dataTimeout`: how long the
    /// client may be silent awaiting a command, and inside message data
    /// (RFC 5321 4.5.3.2, smtp.command_timeout and data_timeout); then 421
    /// 4.4.2, and a message in progress is dropped, its queue connection
    /// (and the queue's memory for it) with it.
    public init(policy: SMTPServerPolicy, injectSocket: String, timeout: Double,
                commandTimeout: Int = 300, dataTimeout: Int = 600) {
        session = SMTPServerSession(policy: policy, client: Self.client)
        self.injectSocket = injectSocket
        self.timeout = timeout
        hostname = policy.hostname
        self.commandTimeout = Int32(clamping: max(1, commandTimeout) * 1000)
        self.dataTimeout = Int32(clamping: max(1, dataTimeout) * 1000)
        receivedBy = ReceivedHeader.By(hostname: policy.hostname, softwareName: policy.softwareName)
    }

    /// Runs the session to its end (QUIT, end of input, a timeout, or a
    /// closing error). False when the input could not be read or the
    /// replies could not be written: what the client was told before
    /// stands, and a message in progress is dropped.
    public func run(input: Int32, output out: Int32) -> Bool {
        perform(session.start())
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var healthy = true
        while !closed {
            guard flush(out) else { healthy = false; break }
            var ready = pollfd(fd: input, events: Int16(POLLIN), revents: 0)
            let waited = poll(&ready, 1, session.readsMessageData ? dataTimeout : commandTimeout)
            if waited < 0 {
                if errno == EINTR { continue }
                healthy = false
                perform(session.disconnected())
                break
            }
            if waited == 0 {
                perform(session.shutdown(SMTPReply(421, "4.4.2", "\(hostname) Error: timeout exceeded")))
                break
            }
            let n = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n < 0 {
                // A non-blocking descriptor inherited: poll said readable,
                // so EAGAIN is a spurious wake-up.
                if errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK { continue }
                healthy = false
                perform(session.disconnected())
                break
            }
            if n == 0 {
                perform(session.disconnected())
                break
            }
            perform(buffer.withUnsafeBytes { session.receive(UnsafeRawBufferPointer(rebasing: $0[0..<n])) })
        }
        message?.abandon()
        message = nil
        return flush(out) && healthy
    }

    /// A local submission's header completion (HeaderCompletion.swift):
    /// From (the envelope sender, MAILER-DAEMON for the null sender, as
    /// Postfix's cleanup writes it), Date and Message-ID when missing.
    static func headerCompletion(sender: String, hostname: String,
                                 unixTime: @escaping () -> Int = { Int(time(nil)) }) -> StreamingHeaderCompletion {
        StreamingHeaderCompletion { block in
            OriginatorFields.addMissing(to: &block, resent: OriginatorFields.isResent(block),
                                        from: { sender.isEmpty ? "MAILER-DAEMON" : sender },
                                        hostname: hostname, unixTime: unixTime())
        }
    }

    private func flush(_ fd: Int32) -> Bool {
        var offset = 0
        while offset < output.count {
            let n = output.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            offset += n
        }
        output.removeAll(keepingCapacity: true)
        return true
    }

    private func perform(_ actions: [SMTPAction]) {
        for action in actions {
            switch action {
            case .reply(let reply):
                output.append(contentsOf: reply.rendered)
            case .close, .startTLS:
                closed = true
            case .beginMessage(let envelope):
                message = QueueSubmission(envelope: envelope, socket: injectSocket, timeout: timeout,
                                          received: { [receivedBy] id in
                    ReceivedHeader.bytes(envelope: envelope, by: receivedBy, queueID: id, date: RFC5322Date.now())
                }, header: Self.headerCompletion(sender: envelope.sender.address, hostname: hostname))
            case .messageData(let bytes):
                message?.append(bytes)
            case .endMessage:
                let outcome = message?.end() ?? .failure(.unavailable)
                message = nil
                switch outcome {
                case .success(let id):
                    accepted.append(id)
                    perform(session.messageCommitted(queueID: id))
                case .failure(let failure):
                    perform(session.messageFailed(failure))
                }
            case .abortMessage:
                message?.abandon()
                message = nil
            case .authenticate:
                perform(session.authResult(.failure))   // not offered
            case .log:
                break
            }
        }
    }
}

/// One message on its own inject connection. A failure at any step is
/// kept and answered at the end of the data (451 4.3.0): the client is
/// still sending the body, which is read and dropped.
final class QueueSubmission {
    private var connection: StageConnection?
    private var failed = false
    private var header: StreamingHeaderCompletion

    init(envelope: SMTPEnvelope, socket: String, timeout: Double, received: (String) -> [UInt8],
         header: StreamingHeaderCompletion) {
        self.header = header
        do {
            let c = try StageConnection.connect(path: socket, timeout: timeout)
            connection = c
            _ = try c.clientHello(.inject, extra: [("software", .text("sealpost-queue-inject 0.1 (-bs)"))])
            var mail = InjectFrames.mail(envelope, clientName: "localhost")
            mail.set("announce-id", .bool(true))
            try c.send(mail)
            for r in envelope.recipients { try c.send(InjectFrames.rcpt(r)) }
            guard let answer = try c.receive(), answer.type == .queueID else {
                fail()
                return
            }
            for frame in InjectFrames.body(received(try answer.text("queue-id"))) { try c.send(frame) }
        } catch {
            fail()
        }
    }

    private func fail() {
        failed = true
        connection?.close()
        connection = nil
    }

    func append(_ bytes: [UInt8]) {
        guard !failed else { return }
        send(header.feed(bytes))
    }

    private func send(_ bytes: [UInt8]) {
        guard !bytes.isEmpty, let c = connection else { return }
        do {
            for frame in InjectFrames.body(bytes) { try c.send(frame) }
        } catch {
            fail()
        }
    }

    /// END, and the queue's answer.
    enum Outcome { case success(String), failure(SMTPQueueFailure) }

    func end() -> Outcome {
        if !failed { send(header.finish()) }
        guard !failed, let c = connection else { return .failure(.unavailable) }
        defer { fail() }
        do {
            try c.send(Frame(.end))
            guard let answer = try c.receive() else { return .failure(.unavailable) }
            switch answer.type {
            case .accepted: return .success(try answer.text("queue-id"))
            case .refused: return .failure(.refused(InjectFrames.reply(fromRefused: answer)))
            default: return .failure(.unavailable)
            }
        } catch {
            return .failure(.unavailable)
        }
    }

    /// The message is dropped: closing the connection before END is what
    /// makes the queue forget it.
    func abandon() { fail() }
}
