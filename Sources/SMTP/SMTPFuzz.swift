/// A libFuzzer-compatible driver for `SMTPServerSession`: arbitrary bytes
/// choose a policy, how the input is split, and how the queue, the password
/// check and the TLS hand-off answer; invariants are checked with
/// `precondition`, so a violation crashes the fuzzer with a finding.
///
/// A fuzz executable only needs:
///
///     @_cdecl("LLVMFuzzerTestOneInput")
///     func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
///         SMTPFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size)); return 0
///     }
public enum SMTPFuzz {
    /// What one run observed (for tests).
    public struct Outcome: Sendable, Equatable {
        public var replies = 0
        public var messagesCommitted = 0
        public var messagesAborted = 0
        public var closed = false
    }

    @discardableResult
    public static func run(data: UnsafeRawBufferPointer) -> Outcome {
        run(Array(data))
    }

    @discardableResult
    public static func run(_ bytes: [UInt8]) -> Outcome {
        var reader = Reader(bytes: bytes)
        let flags = reader.byte() ?? 0
        var policy = SMTPServerPolicy(hostname: "mx.example.org")
        policy.tlsAvailable = flags & 1 != 0
        policy.auth = [.never, .always, .afterTLS, .always][Int(flags >> 1 & 3)]
        policy.isSubmission = flags & 8 != 0
        if flags & 16 != 0 {
            policy.maxMessageSize = 64
            policy.maxRecipients = 2
            policy.textLineLimit = 20
            policy.messageChunkSize = 7
            policy.maxPendingInput = 32
            policy.maxJunkCommands = 2
        }
        policy.maxErrors = flags & 32 != 0 ? 3 : 50
        policy.relay = RelayPolicy(localDomains: ["example.org"], relayDomains: ["relay.example"])
        // The unknown-recipient refusal (no seed sends to such a name).
        policy.isKnownLocalPart = { !$0.lowercased().hasPrefix("unknown") }
        let client = SMTPClientInfo(address: "192.0.2.1", isTrusted: flags & 64 != 0)
        var session = SMTPServerSession(policy: policy, client: client)
        var checker = InvariantChecker(maxMessageSize: policy.maxMessageSize)

        // The early-talker byte: its low 3 bits are how many bytes arrive
        // before the greeting; bit 3 reports them via clientSpokeEarly()
        // instead; bit 4 ends the session with the I/O layer's shutdown
        // (a timeout's 421) instead of a disconnect.
        var endWithShutdown = false
        if flags & 128 != 0, let n = reader.byte() {
            if n & 8 != 0 && n % 8 != 0 {
                session.clientSpokeEarly()
            } else {
                _ = session.receive(reader.take(Int(n % 8)))
            }
            endWithShutdown = n & 16 != 0
        }
        checker.check(session.start(), session: session)
        while !reader.atEnd && !session.isClosed {
            let n = Int(reader.byte() ?? 1) % 64 + 1
            var actions = session.receive(reader.take(n))
            // Answer pending decisions, as the I/O layer would.
            while true {
                checker.check(actions, session: session)
                if checker.awaitingQueue {
                    let choice = reader.byte() ?? 0
                    if choice & 0x80 != 0 { pipelinedWhileWaiting(&reader, &session, &checker) }
                    if choice & 0x40 != 0 {
                        // The I/O layer gives up (timeout, stage shutdown) while the
                        // queue commits; the queue's late answer must be ignored.
                        shutdownWhileWaiting(&session, &checker)
                        precondition(session.messageCommitted(queueID: "0123456789AB").isEmpty,
                                     "queue answer after close must produce nothing")
                        break
                    }
                    switch choice % 4 {
                    case 0: actions = session.messageFailed(.unavailable)
                    case 1: actions = session.messageFailed(.full)
                    default: actions = session.messageCommitted(queueID: "0123456789AB")
                    }
                    checker.awaitingQueue = false
                    if choice % 4 >= 2 { checker.outcome.messagesCommitted += 1 }
                    precondition(!actions.isEmpty, "queue answer must produce a reply")
                } else if checker.awaitingAuth {
                    let choice = reader.byte() ?? 0
                    if choice & 0x80 != 0 { pipelinedWhileWaiting(&reader, &session, &checker) }
                    if choice & 0x40 != 0 {
                        shutdownWhileWaiting(&session, &checker)
                        precondition(session.authResult(.success).isEmpty, "auth answer after close must produce nothing")
                        break
                    }
                    actions = session.authResult([.success, .failure, .temporaryFailure][Int(choice % 3)])
                    checker.awaitingAuth = false
                    precondition(!actions.isEmpty, "auth answer must produce a reply")
                } else if checker.awaitingTLS {
                    let choice = reader.byte() ?? 0
                    // Plain text sent during the hand-off never reaches the parser.
                    let stray = session.receive(Array("RSET\r\n".utf8))
                    precondition(!stray.contains { if case .reply = $0 { return true } else { return false } },
                                 "input during TLS hand-off must not be answered")
                    actions = choice % 5 == 0 ? session.tlsFailed() : session.tlsEstablished()
                    checker.awaitingTLS = false
                } else {
                    break
                }
            }
        }
        if endWithShutdown && !session.isClosed {
            let actions = session.shutdown(SMTPReply(421, "4.4.2", "mx.example.org Error: timeout exceeded"))
            precondition(actions.contains { if case .close = $0 { return true } else { return false } },
                         "shutdown() must close")
            checker.check(actions, session: session)
        }
        checker.check(session.disconnected(), session: session)
        checker.outcome.closed = session.isClosed
        precondition(session.isClosed, "disconnected() must close")
        return checker.outcome
    }

    /// A pipelining client keeps sending while the session waits for the
    /// queue or the password check: the bytes are buffered, never answered
    /// before the decision (the checker's "no action while waiting").
    static func pipelinedWhileWaiting(_ reader: inout Reader, _ session: inout SMTPServerSession,
                                      _ checker: inout InvariantChecker) {
        var fed = 0
        for _ in 0..<(Int(reader.byte() ?? 0) % 4 + 1) {
            let n = Int(reader.byte() ?? 0) % 64 + 1
            let bytes = reader.take(n)
            fed += bytes.count
            checker.check(session.receive(bytes), session: session)
            // Back-pressure: the I/O layer stops reading once a bounded
            // amount is buffered (the overflow path covers its overshoot).
            if fed >= session.policy.maxPendingInput {
                precondition(!session.wantsInput, "wantsInput while maxPendingInput bytes are buffered")
            }
        }
    }

    /// The I/O layer's shutdown while a decision is pending: 421 and close.
    static func shutdownWhileWaiting(_ session: inout SMTPServerSession, _ checker: inout InvariantChecker) {
        checker.awaitingQueue = false
        checker.awaitingAuth = false
        checker.check(session.shutdown(SMTPReply(421, "4.3.2", "mx.example.org Service shutting down")), session: session)
        precondition(session.isClosed, "shutdown() must close")
    }

    struct Reader {
        let bytes: [UInt8]
        var index = 0
        var atEnd: Bool { index >= bytes.count }
        mutating func byte() -> UInt8? {
            guard index < bytes.count else { return nil }
            defer { index += 1 }
            return bytes[index]
        }
        mutating func take(_ n: Int) -> ArraySlice<UInt8> {
            let end = min(bytes.count, index + n)
            defer { index = end }
            return bytes[index..<end]
        }
    }

    struct InvariantChecker {
        let maxMessageSize: UInt64
        var outcome = Outcome()
        var closed = false
        var messageOpen = false
        var messageBytes: UInt64 = 0
        var awaitingQueue = false
        var awaitingAuth = false
        var awaitingTLS = false

        mutating func check(_ actions: [SMTPAction], session: SMTPServerSession) {
            for action in actions {
                if case .log = action { continue }
                precondition(!closed, "no action after close")
                precondition(!awaitingQueue && !awaitingAuth && !awaitingTLS, "no action while waiting")
                switch action {
                case .reply(let reply):
                    outcome.replies += 1
                    let wire = reply.rendered
                    precondition((200...599).contains(reply.code))
                    // Each line ends with CRLF and holds no other CR or LF.
                    var lineStart = 0
                    for (i, b) in wire.enumerated() where b == 10 {
                        precondition(i > lineStart && wire[i - 1] == 13, "LF without CR in reply")
                        precondition(!wire[lineStart..<(i - 1)].contains(13), "CR inside reply line")
                        precondition(i - lineStart + 1 <= 512, "reply line too long")
                        lineStart = i + 1
                    }
                    precondition(lineStart == wire.count, "reply must end with CRLF")
                case .beginMessage:
                    precondition(!messageOpen, "beginMessage while a message is open")
                    messageOpen = true
                    messageBytes = 0
                case .messageData(let d):
                    precondition(messageOpen, "messageData outside a message")
                    precondition(!d.isEmpty, "empty messageData")
                    messageBytes += UInt64(d.count)
                    precondition(messageBytes <= maxMessageSize, "more data than the size limit")
                case .endMessage:
                    precondition(messageOpen, "endMessage without beginMessage")
                    messageOpen = false
                    awaitingQueue = true
                case .abortMessage:
                    precondition(messageOpen, "abortMessage without beginMessage")
                    messageOpen = false
                    outcome.messagesAborted += 1
                case .authenticate:
                    awaitingAuth = true
                case .startTLS:
                    awaitingTLS = true
                case .close:
                    precondition(!messageOpen, "close with a message open")
                    closed = true
                case .log:
                    break
                }
            }
        }
    }
}
