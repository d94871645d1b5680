/// The ESMTP client (RFC 5321 and extensions) as a state machine with no
/// I/O: fed the server's bytes, it returns `SMTPClientAction`s. remote-deliver
/// wraps it with sockets, timeouts (`phase.timeoutSeconds`), the TLS
/// hand-off to crypto-negotiate and the job stream from the queue.
///
/// Conversation:
///
///     220 greeting -> EHLO (HELO when EHLO gets 5xx, never after TLS)
///       -> STARTTLS when offered and wanted -> [TLS] -> EHLO again
///       -> AUTH PLAIN (smarthost credentials, after TLS)
///       -> per message: [RSET] MAIL FROM, RCPT TO..., DATA, body, "."
///       -> nextMessage(...) again, or QUIT
///
/// With PIPELINING (RFC 2920) [RSET,] MAIL, every RCPT and DATA leave in
/// one write (DATA last, as RFC 2920 section 3.1 requires) and the replies
/// are matched in order. Recipients are refused individually; when all are,
/// no data is sent (a 354 to the pipelined DATA is answered with a lone
/// "." so the server stays in sync). The reply to the end of the data is
/// every accepted recipient's result.
///
/// Results: each recipient gets exactly one `.recipientResult` per message
/// (2xx sent, 4xx deferred, 5xx bounced, with the phase and the sanitized
/// reply), then `.messageResult`. A 4xx result is this host's answer only
/// (`mayTryAnotherHost`): the I/O layer keeps the recipient for the next
/// MX, and the session stays usable for another message (an RSET first
/// when the refused transaction was left open). When the session fails
/// instead (`.sessionFailed` or `.protocolError`), the recipients without
/// a result are undecided: `pendingRecipients` lists them, and the I/O
/// layer tries the next MX or defers them with the failure's `deferral`.
///
/// Per-message checks before MAIL, each a bounce for this host
/// (`hostSpecific`: another MX may do better): REQUIRETLS without
/// authenticated TLS or without the REQUIRETLS keyword (5.7.30, RFC 8689
/// section 4.2.1), a size over the host's SIZE limit (5.3.4, RFC 1870),
/// SMTPUTF8 needed but not offered (5.6.7, RFC 6531 section 3.4), an
/// 8-bit message to a host without 8BITMIME when it cannot be converted to
/// 7 bit or the policy says bounce (5.6.3, RFC 6152 section 3).
///
/// 8-bit to a host without 8BITMIME, policy `.convert` (the default): the
/// machine asks its I/O layer for a 7-bit body (`.downgradeBody`) before
/// MAIL; SIZE= and the host's limit then apply to the converted size, and
/// no BODY= goes out (the host does not know the parameter).
public struct SMTPClientSession: Sendable {
    public let policy: SMTPClientPolicy
    /// What the server offered in its last EHLO reply (empty after HELO).
    public private(set) var capabilities = SMTPServerCapabilities()
    /// Set once TLS is active.
    public private(set) var tlsReport: SMTPClientTLSReport?
    /// EHLO was refused and HELO used: no extensions.
    public private(set) var usedHELO = false
    public private(set) var authenticated = false
    /// The message being (or last) delivered.
    public private(set) var message: SMTPClientMessage
    /// Messages begun on this connection (connection reuse counter).
    public private(set) var messageCount = 0
    /// Whole replies read from the server so far. The I/O layer renews a
    /// reply's timeout only when this moves: RFC 5321's timeouts (4.5.3.2)
    /// bound the wait for a reply, and a reply that arrives a byte every
    /// few minutes must not hold the connection (and a delivery slot) for
    /// months.
    public private(set) var repliesReceived = 0

    private enum State: Equatable {
        case greeting, ehlo, helo, startTLS, tlsHandshake, auth, transaction, body, ready, quit, closed
        /// Waiting for `bodyDowngraded(_:)` or `bodyDowngradeFailed(_:)`.
        case downgrade
    }
    private enum Expect: Equatable {
        case rset, mail, rcpt(Int), data, dataEnd, dataEndIgnored
    }

    private var state: State = .greeting
    private var parser: SMTPClientReplyParser
    /// Commands sent whose replies have not arrived, oldest first.
    private var awaiting: [Expect] = []
    /// Commands not sent yet (without PIPELINING, one at a time).
    private var unsent: [(Expect, [UInt8])] = []
    private var pipelinedTransaction = false
    private var results: [SMTPDeliveryResult?] = []
    /// Positions (in `message.recipients`) of the recipients RCPT accepted.
    private var accepted: [Int] = []
    private var mailRefusal: SMTPReply?
    /// MAIL was accepted and no end of data or RSET closed the transaction.
    private var transactionOpen = false
    private var encoder = SMTPDataEncoder()
    private var bodyStarted = false
    private var current = SMTPMessageResult(phase: .mailFrom)
    /// The current message's body was converted to 7 bit, to this size.
    private var downgradedSize: UInt64?
    /// Why the current message's body could not be converted.
    private var downgradeFailure: String?

    private var output: [UInt8] = []
    private var actions: [SMTPClientAction] = []

    /// A session for one connection, and its first message. Nothing is
    /// sent before the server's greeting arrives through `receive(_:)`.
    public init(policy: SMTPClientPolicy, message: SMTPClientMessage) {
        self.policy = policy
        self.message = message
        parser = SMTPClientReplyParser(limits: policy.limits)
    }

    public var isClosed: Bool { state == .closed }

    /// The session waits for `nextMessage(_:)` or `quit()`.
    public var isIdle: Bool { state == .ready }

    /// The I/O layer must stream the body (after `.sendBody`).
    public var wantsBody: Bool { state == .body }

    /// Waiting for `tlsEstablished(_:)` or `tlsFailed(_:)` (after `.startTLS`).
    public var awaitingTLS: Bool { state == .tlsHandshake }

    /// Waiting for `bodyDowngraded(_:)` or `bodyDowngradeFailed(_:)`
    /// (after `.downgradeBody`).
    public var awaitingDowngrade: Bool { state == .downgrade }

    /// The size of the body as it goes out: the converted size after a
    /// downgrade, else the message's.
    public var transferSize: UInt64 { downgradedSize ?? message.size }

    /// Server bytes held by the reply parser (bounded by the reply limits
    /// plus the last piece handed to `receive(_:)`).
    public var bufferedInputBytes: Int { parser.bufferedByteCount }

    /// The job indices of the current message's recipients without a result.
    public var pendingRecipients: [Int] {
        guard results.count == message.recipients.count else { return message.recipients.map(\.index) }
        return zip(message.recipients, results).filter { $0.1 == nil }.map { $0.0.index }
    }

    /// Where the conversation is; with several replies outstanding, the
    /// phase of the oldest.
    public var phase: SMTPClientPhase {
        switch state {
        case .greeting: return .greeting
        case .ehlo: return .ehlo
        case .helo: return .helo
        case .startTLS: return .startTLS
        case .tlsHandshake: return .tlsHandshake
        case .auth: return .auth
        case .body: return .dataBlock
        case .ready: return .idle
        case .downgrade: return .mailFrom
        case .quit: return .quit
        case .closed: return .closed
        case .transaction:
            switch awaiting.first ?? unsent.first?.0 {
            case .rset: return .rset
            case .mail, nil: return .mailFrom
            case .rcpt: return .rcptTo
            case .data: return .dataInit
            case .dataEnd, .dataEndIgnored: return .dataTermination
            }
        }
    }

    // MARK: - Inputs

    /// Bytes from the server.
    public mutating func receive<C: Collection<UInt8>>(_ bytes: C) -> [SMTPClientAction] {
        actions = []
        guard !bytes.isEmpty else { return [] }
        switch state {
        case .closed:
            return []
        case .tlsHandshake:
            protocolError("server sent data during the TLS hand-off")
            return take()
        case .body:
            protocolError("server sent data while the message content was being sent: \(SMTPClientReplyParser.show(Array(bytes.prefix(80))))")
            return take()
        case .downgrade:
            protocolError("server sent data when no reply was expected: \(SMTPClientReplyParser.show(Array(bytes.prefix(80))))")
            return take()
        case .ready:
            idleInput(bytes)
            return take()
        default:
            break
        }
        parser.append(bytes)
        while expectsReply {
            let reply: SMTPReply?
            do {
                reply = try parser.next()
            } catch {
                if state == .quit { close() } else { protocolError(error.reason) }
                break
            }
            guard let reply else { break }
            repliesReceived += 1
            handle(reply)
        }
        // Replies after the last one expected (e.g. after the final reply
        // to the data): the server is out of step with us.
        if state == .ready && parser.hasBufferedInput {
            protocolError("server sent data when no reply was expected")
        }
        return take()
    }

    /// crypto-negotiate completed the handshake: EHLO again (RFC 3207
    /// section 4.2: forget everything learned before TLS).
    public mutating func tlsEstablished(_ report: SMTPClientTLSReport) -> [SMTPClientAction] {
        actions = []
        guard state == .tlsHandshake else {
            precondition(state == .closed, "tlsEstablished without .startTLS")
            return []
        }
        tlsReport = report
        capabilities = SMTPServerCapabilities()
        parser = SMTPClientReplyParser(limits: policy.limits)
        sendHello()
        return take()
    }

    /// The handshake failed: the connection is unusable.
    public mutating func tlsFailed(_ reason: String) -> [SMTPClientAction] {
        actions = []
        guard state == .tlsHandshake else {
            precondition(state == .closed, "tlsFailed without .startTLS")
            return []
        }
        var failure = SMTPClientFailure(.tlsHandshake, EnhancedStatus(4, 7, 5),
                                        "TLS handshake failed: \(Self.printable(reason, max: 300))", phase: .tlsHandshake)
        failure.plaintextRetryMayWork = policy.tls == .opportunistic && !message.requireTLS
        emit(.sessionFailed(failure))
        close()
        return take()
    }

    /// The body is converted (after `.downgradeBody`): the transaction
    /// begins, with SIZE= the converted size.
    public mutating func bodyDowngraded(_ result: SMTPBodyDowngrade) -> [SMTPClientAction] {
        var notes = result.convertedParts > 0 ? ["8-bit content converted to quoted-printable for a host without 8BITMIME"] : []
        notes += result.remarks.map { Self.printable($0, max: 200) }
        return downgradeAnswered(size: result.size, notes: notes, failure: nil)
    }

    /// The body cannot be converted (after `.downgradeBody`): every
    /// recipient bounces with 5.6.3 for this host (another MX may offer
    /// 8BITMIME).
    public mutating func bodyDowngradeFailed(_ reason: String) -> [SMTPClientAction] {
        downgradeAnswered(size: nil, notes: [], failure: Self.printable(reason, max: 300))
    }

    private mutating func downgradeAnswered(size: UInt64?, notes: [String], failure: String?) -> [SMTPClientAction] {
        actions = []
        guard state == .downgrade else {
            precondition(state == .closed, "a conversion's answer without .downgradeBody")
            return []
        }
        downgradedSize = size
        downgradeFailure = failure
        current.notes += notes
        state = .transaction
        sendEnvelope()
        return take()
    }

    /// The next piece of the body (after `.sendBody`): returns the bytes to
    /// write, dot-stuffed with CRLF line ends (nothing when the piece was a
    /// lone CR, held back until the next byte).
    public mutating func bodyChunk<C: Collection<UInt8>>(_ bytes: C) -> [SMTPClientAction] {
        encodeBody(bytes)
    }

    /// The same for a byte array (remote-deliver's chunks): a generic
    /// function called from another module runs unspecialized, element by
    /// element through protocol witnesses; this one is specialized here.
    public mutating func bodyChunk(_ bytes: [UInt8]) -> [SMTPClientAction] {
        encodeBody(bytes)
    }

    private mutating func encodeBody<C: Collection<UInt8>>(_ bytes: C) -> [SMTPClientAction] {
        guard state == .body else {
            precondition(state == .closed, "bodyChunk outside the body")
            return []
        }
        let encoded = encoder.encode(bytes)
        return encoded.isEmpty ? [] : [.send(encoded)]
    }

    /// The body is complete: the terminator goes out, the final reply is
    /// awaited (`phase` becomes `.dataTermination`).
    public mutating func bodyEnd() -> [SMTPClientAction] {
        actions = []
        guard state == .body else {
            precondition(state == .closed, "bodyEnd outside the body")
            return []
        }
        write(encoder.finish())
        state = .transaction
        awaiting = [.dataEnd]
        return take()
    }

    /// Another message on the same connection (after `.messageResult`).
    public mutating func nextMessage(_ message: SMTPClientMessage) -> [SMTPClientAction] {
        actions = []
        guard state == .ready else {
            precondition(state == .closed, "nextMessage while a message is in progress")
            return []
        }
        self.message = message
        beginMessage()
        return take()
    }

    /// End the session politely: QUIT, then `.close` on its reply.
    public mutating func quit() -> [SMTPClientAction] {
        actions = []
        switch state {
        case .closed, .quit:
            return []
        case .body, .tlsHandshake:
            // QUIT would become message content or go to a socket we gave away.
            close()
        default:
            write(Array("QUIT\r\n".utf8))
            state = .quit
        }
        return take()
    }

    /// The server closed the connection (or a read failed).
    public mutating func connectionLost() -> [SMTPClientAction] {
        end(.connectionLost, EnhancedStatus(4, 4, 2)) { "lost connection \(Self.during($0))" }
    }

    /// The I/O layer gives the message up (`reason` says why): a failure,
    /// then the connection closes without QUIT, so that a server already
    /// reading the message content sees no end of data and discards it.
    public mutating func abandon(_ reason: String) -> [SMTPClientAction] {
        end(.abandoned, EnhancedStatus(4, 3, 0)) { "\(reason) \(Self.during($0))" }
    }

    /// The I/O layer's timer for the current phase expired.
    public mutating func timedOut() -> [SMTPClientAction] {
        end(.timeout, EnhancedStatus(4, 4, 2)) { "conversation timed out \(Self.during($0))" }
    }

    /// The conversation ends from the I/O side: nothing to do once closed;
    /// an idle connection (or one saying QUIT) just closes; otherwise a
    /// failure of the phase reached, without QUIT.
    private mutating func end(_ kind: SMTPClientFailure.Kind, _ status: EnhancedStatus,
                              _ text: (SMTPClientPhase) -> String) -> [SMTPClientAction] {
        actions = []
        switch state {
        case .closed: return []
        case .quit, .ready: close()
        default:
            let p = phase
            sessionFailed(kind, status, text(p), phase: p, quit: false)
        }
        return take()
    }

    /// A cached connection between messages may hear "421 ... timeout"
    /// when the server gives up on it: close quietly (no recipient is
    /// pending). Anything else is out of step.
    private mutating func idleInput<C: Collection<UInt8>>(_ bytes: C) {
        parser.append(bytes)
        do {
            guard let reply = try parser.next() else { return }
            if reply.code == 421 && !parser.hasBufferedInput {
                close()
            } else {
                protocolError("server sent a reply when none was expected: \(SMTPClientText.quote(reply))")
            }
        } catch {
            protocolError(error.reason)
        }
    }

    // MARK: - Replies

    private var expectsReply: Bool {
        switch state {
        case .greeting, .ehlo, .helo, .startTLS, .auth, .transaction, .quit: return true
        case .tlsHandshake, .body, .ready, .closed, .downgrade: return false
        }
    }

    private mutating func handle(_ reply: SMTPReply) {
        let phase = self.phase
        if state == .quit {
            close()
            return
        }
        if reply.code / 100 == 3 && !(state == .transaction && awaiting.first == .data && reply.code == 354) {
            protocolError("unexpected reply \(SMTPClientText.quote(reply))", phase: phase)
            return
        }
        if reply.code == 421 {
            // The server is closing the channel (RFC 5321 3.8): no QUIT.
            sessionFailed(.serviceClosing, Self.deferStatus(reply, EnhancedStatus(4, 4, 2)),
                          "service not available: \(SMTPClientText.quote(reply)) (\(phase))", reply: reply,
                          phase: phase, quit: false)
            return
        }
        let positive = reply.code / 100 == 2
        switch state {
        case .greeting:
            if reply.code == 220 {
                sendHello()
            } else {
                sessionFailed(.greeting, Self.deferStatus(reply, EnhancedStatus(4, 0, 0)),
                              "refused to talk to me: \(SMTPClientText.quote(reply)) (\(phase))",
                              reply: reply, phase: phase, quit: true)
            }
        case .ehlo:
            if positive {
                capabilities = SMTPServerCapabilities(ehlo: reply)
                afterHello()
            } else if reply.code / 100 == 5 && tlsReport == nil {
                // RFC 5321 3.2: an old server answers EHLO with 500/502.
                write(Array("HELO \(policy.hostname)\r\n".utf8))
                state = .helo
            } else {
                sessionFailed(.hello, Self.deferStatus(reply, EnhancedStatus(4, 0, 0)),
                              "EHLO refused: \(SMTPClientText.quote(reply)) (\(phase))", reply: reply,
                              phase: phase, quit: true)
            }
        case .helo:
            if positive {
                usedHELO = true
                capabilities = SMTPServerCapabilities()
                afterHello()
            } else {
                sessionFailed(.hello, Self.deferStatus(reply, EnhancedStatus(4, 0, 0)),
                              "HELO refused: \(SMTPClientText.quote(reply)) (\(phase))", reply: reply,
                              phase: phase, quit: true)
            }
        case .startTLS:
            if reply.code == 220 {
                // CVE-2011-0411, client side: whatever the server sent after
                // its 220 in clear text must not be read as if it came
                // through TLS.
                guard !parser.hasBufferedInput else {
                    protocolError("server sent data after its 220 reply to STARTTLS")
                    return
                }
                state = .tlsHandshake
                emit(.startTLS)
            } else if policy.tls == .required {
                sessionFailed(.tlsRequired, EnhancedStatus(4, 7, 4),
                              "TLS is required, but host refused STARTTLS: \(SMTPClientText.quote(reply))",
                              reply: reply, phase: phase, quit: true)
            } else {
                // RFC 3207 section 4: the client may go on in clear text.
                afterTLS()
            }
        case .auth:
            if reply.code == 235 {
                authenticated = true
                beginMessage()
            } else {
                sessionFailed(.authentication, Self.deferStatus(reply, EnhancedStatus(4, 7, 0)),
                              "authentication failed: \(SMTPClientText.quote(reply)) (\(phase))", reply: reply,
                              phase: phase, quit: true)
            }
        case .transaction:
            transactionReply(reply, phase: phase)
        case .tlsHandshake, .body, .ready, .quit, .closed, .downgrade:
            protocolError("unexpected reply \(SMTPClientText.quote(reply))")
        }
    }

    private mutating func transactionReply(_ reply: SMTPReply, phase: SMTPClientPhase) {
        guard !awaiting.isEmpty else {
            protocolError("unexpected reply \(SMTPClientText.quote(reply))")
            return
        }
        let expect = awaiting.removeFirst()
        let positive = reply.code / 100 == 2
        switch expect {
        case .rset:
            guard positive else {
                sessionFailed(.reset, Self.deferStatus(reply, EnhancedStatus(4, 0, 0)),
                              "RSET refused: \(SMTPClientText.quote(reply))", reply: reply, phase: phase, quit: true)
                return
            }
            transactionOpen = false
            sendNext()
        case .mail:
            if positive {
                transactionOpen = true
                sendNext()
            } else {
                mailRefusal = reply
                for pos in message.recipients.indices where results[pos] == nil {
                    resolve(pos, SMTPDeliveryResult(reply: reply, phase: .mailFrom))
                }
                if !pipelinedTransaction {
                    unsent = []
                    finishMessage(reply: reply, phase: .mailFrom)
                }
            }
        case .rcpt(let pos):
            if results[pos] == nil {
                if positive { accepted.append(pos) } else { resolve(pos, SMTPDeliveryResult(reply: reply, phase: .rcptTo)) }
            }
            if !pipelinedTransaction {
                if !unsent.isEmpty {
                    sendNext()
                } else if accepted.isEmpty {
                    finishMessage(reply: nil, phase: .rcptTo)
                } else {
                    write(Array("DATA\r\n".utf8))
                    awaiting.append(.data)
                }
            }
        case .data:
            if reply.code == 354 {
                if accepted.isEmpty {
                    // Pipelined DATA after every recipient was refused, and
                    // the server still said 354: end an empty message.
                    write(Array(".\r\n".utf8))
                    awaiting.append(.dataEndIgnored)
                } else {
                    guard !parser.hasBufferedInput else {
                        protocolError("server sent data after its 354 reply to DATA", phase: phase)
                        return
                    }
                    state = .body
                    bodyStarted = true
                    emit(.sendBody)
                }
            } else if positive {
                protocolError("unexpected reply \(SMTPClientText.quote(reply))", phase: phase)
            } else {
                for pos in accepted { resolve(pos, SMTPDeliveryResult(reply: reply, phase: .dataInit)) }
                if let refusal = mailRefusal {
                    finishMessage(reply: refusal, phase: .mailFrom)
                } else {
                    finishMessage(reply: accepted.isEmpty ? nil : reply, phase: accepted.isEmpty ? .rcptTo : .dataInit)
                }
            }
        case .dataEnd:
            transactionOpen = false
            for pos in accepted { resolve(pos, SMTPDeliveryResult(reply: reply, phase: .dataTermination)) }
            finishMessage(reply: reply, phase: .dataTermination)
        case .dataEndIgnored:
            transactionOpen = false
            finishMessage(reply: mailRefusal, phase: mailRefusal == nil ? .rcptTo : .mailFrom)
        }
    }

    // MARK: - Steps

    private mutating func sendHello() {
        write(Array("EHLO \(policy.hostname)\r\n".utf8))
        state = .ehlo
    }

    private mutating func afterHello() {
        if tlsReport == nil {
            let wanted = policy.tls != .none || message.requireTLS
            if wanted && capabilities.extensions.contains(.startTLS) {
                write(Array("STARTTLS\r\n".utf8))
                state = .startTLS
                return
            }
            if policy.tls == .required {
                sessionFailed(.tlsRequired, EnhancedStatus(4, 7, 4),
                              usedHELO ? "TLS is required, but host refused EHLO" : "TLS is required, but was not offered by host",
                              phase: usedHELO ? .helo : .ehlo, quit: true)
                return
            }
        }
        afterTLS()
    }

    private mutating func afterTLS() {
        if let credentials = policy.credentials, !authenticated {
            if tlsReport == nil && !policy.allowAuthenticationWithoutTLS {
                sessionFailed(.authentication, EnhancedStatus(4, 7, 0),
                              "refusing to send credentials without TLS", phase: phase, quit: true)
                return
            }
            guard capabilities.authMechanisms.contains("PLAIN") else {
                let offered = capabilities.authMechanisms.isEmpty ? "none" : capabilities.authMechanisms.joined(separator: " ")
                sessionFailed(.authentication, EnhancedStatus(4, 7, 0),
                              "authentication required, but host does not offer AUTH PLAIN (offered: \(Self.printable(offered, max: 200)))",
                              phase: phase, quit: true)
                return
            }
            // RFC 4616: [authzid] NUL authcid NUL passwd, as the initial
            // response (RFC 4954 section 4).
            var token = Array((credentials.authorizationIdentity ?? "").utf8)
            token.append(0)
            token += Array(credentials.username.utf8)
            token.append(0)
            token += Array(credentials.password.utf8)
            write(Array("AUTH PLAIN ".utf8) + SMTPClientBase64.encode(token) + [13, 10])
            state = .auth
            return
        }
        beginMessage()
    }

    private mutating func beginMessage() {
        messageCount += 1
        results = Array(repeating: nil, count: message.recipients.count)
        accepted = []
        mailRefusal = nil
        encoder = SMTPDataEncoder()
        bodyStarted = false
        awaiting = []
        unsent = []
        current = SMTPMessageResult(phase: .mailFrom)
        downgradedSize = nil
        downgradeFailure = nil
        state = .transaction
        if message.bodyType == .eightBitMIME && !capabilities.extensions.contains(.eightBitMIME)
            && policy.eightBitWithout8BITMIME == .convert && refusal(checkingSize: false) == nil {
            state = .downgrade
            emit(.downgradeBody)
            return
        }
        sendEnvelope()
    }

    /// The checks before MAIL, then [RSET,] MAIL, RCPT... [DATA].
    private mutating func sendEnvelope() {
        if let (status, reason) = refusal() {
            for pos in message.recipients.indices {
                resolve(pos, SMTPDeliveryResult(local: .bounced, status, reason, phase: .mailFrom, hostSpecific: true))
            }
            finishMessage(reply: nil, phase: .mailFrom)
            return
        }
        if !Self.validAddress(message.sender, allowEmpty: true) {
            for pos in message.recipients.indices {
                resolve(pos, SMTPDeliveryResult(local: .bounced, EnhancedStatus(5, 1, 7),
                                                "invalid sender address syntax", phase: .mailFrom, hostSpecific: false))
            }
            finishMessage(reply: nil, phase: .mailFrom)
            return
        }

        var commands: [(Expect, [UInt8])] = [(.mail, mailCommand())]
        for (pos, r) in message.recipients.enumerated() {
            if Self.validAddress(r.address, allowEmpty: false) {
                commands.append((.rcpt(pos), rcptCommand(r)))
            } else {
                resolve(pos, SMTPDeliveryResult(local: .bounced, EnhancedStatus(5, 1, 3),
                                                "invalid recipient address syntax", phase: .rcptTo, hostSpecific: false))
            }
        }
        guard commands.contains(where: { if case .rcpt = $0.0 { return true } else { return false } }) else {
            finishMessage(reply: nil, phase: .rcptTo)
            return
        }
        pipelinedTransaction = policy.pipelining && capabilities.extensions.contains(.pipelining)
        if pipelinedTransaction { commands.append((.data, Array("DATA\r\n".utf8))) }
        unsent = commands
        if transactionOpen {
            // The last transaction was left open (refused DATA, every
            // recipient refused): RSET alone first, so that a refusal of
            // it leaves nothing else in flight (no QUIT after a DATA the
            // server may have accepted).
            write(Array("RSET\r\n".utf8))
            awaiting.append(.rset)
        } else {
            sendNext()
        }
    }

    /// Why this host cannot take the message at all, checked before MAIL.
    /// Without `checkingSize`: whether converting the body is worth it.
    private func refusal(checkingSize: Bool = true) -> (EnhancedStatus, String)? {
        if message.requireTLS {
            guard let report = tlsReport else {
                return (EnhancedStatus(5, 7, 30), "REQUIRETLS: message requires TLS, but the connection is not encrypted")
            }
            guard report.peerAuthenticated else {
                return (EnhancedStatus(5, 7, 30), "REQUIRETLS: message requires an authenticated TLS peer, but host was not authenticated")
            }
            guard capabilities.extensions.contains(.requireTLS) else {
                return (EnhancedStatus(5, 7, 30), "REQUIRETLS support required, but host does not offer REQUIRETLS")
            }
        }
        if checkingSize, let limit = capabilities.sizeLimit, transferSize > limit {
            return (EnhancedStatus(5, 3, 4), "message size \(transferSize) exceeds size limit \(limit) of host")
        }
        if message.needsSMTPUTF8 && !capabilities.extensions.contains(.smtputf8) {
            return (EnhancedStatus(5, 6, 7), "message requires SMTPUTF8, but host does not offer SMTPUTF8")
        }
        if message.bodyType == .eightBitMIME && !capabilities.extensions.contains(.eightBitMIME) {
            if policy.eightBitWithout8BITMIME == .bounce {
                return (EnhancedStatus(5, 6, 3), "8-bit message content, but host does not offer 8BITMIME")
            }
            if let reason = downgradeFailure {
                return (EnhancedStatus(5, 6, 3), "\(reason) (host does not offer 8BITMIME)")
            }
        }
        return nil
    }

    private mutating func mailCommand() -> [UInt8] {
        let ext = capabilities.extensions
        var s = "MAIL FROM:<\(message.sender)>"
        if ext.contains(.size) { s += " SIZE=\(transferSize)" }
        if let body = message.bodyType {
            if ext.contains(.eightBitMIME) {
                s += " BODY=\(body.rawValue)"
            } else if body == .eightBitMIME && downgradedSize == nil {
                // Policy .send (.convert reaches here converted, .bounce not at all).
                current.notes.append("8-bit content sent unchanged to a host that does not offer 8BITMIME")
            }
        }
        if message.needsSMTPUTF8 { s += " SMTPUTF8" }  // refusal() ensured the host offers it
        if ext.contains(.dsn) {
            if let ret = message.ret { s += " RET=\(ret.rawValue)" }
            if let envid = message.envid, !envid.isEmpty { s += " ENVID=\(XText.encode(Array(envid.utf8)))" }
        }
        if message.requireTLS { s += " REQUIRETLS" }  // refusal() ensured the host offers it
        return Array((s + "\r\n").utf8)
    }

    private func rcptCommand(_ r: SMTPClientRecipient) -> [UInt8] {
        var s = "RCPT TO:<\(r.address)>"
        if capabilities.extensions.contains(.dsn) {
            if let notify = r.notify, !notify.description.isEmpty { s += " NOTIFY=\(notify)" }
            if let orcpt = r.orcpt, Self.validAddressType(orcpt.addressType), !orcpt.address.isEmpty {
                if orcpt.address.utf8.allSatisfy({ $0 < 0x80 }) {
                    s += " ORCPT=\(orcpt.addressType);\(XText.encode(Array(orcpt.address.utf8)))"
                } else {
                    // xtext carries octets of an ASCII address: a UTF-8
                    // one in it decodes to 8-bit bytes, which a server
                    // (Sealpost's among them) refuses with 501, and the
                    // recipient with it. RFC 6533 section 3: type utf-8.
                    s += " ORCPT=utf-8;\(Self.utf8AddressXText(orcpt.address))"
                }
            }
        }
        return Array((s + "\r\n").utf8)
    }

    /// Sends the next command, or with PIPELINING all of them in one write.
    private mutating func sendNext() {
        repeat {
            guard !unsent.isEmpty else { return }
            let (expect, bytes) = unsent.removeFirst()
            write(bytes)
            awaiting.append(expect)
        } while pipelinedTransaction
    }

    private mutating func resolve(_ pos: Int, _ result: SMTPDeliveryResult) {
        precondition(results[pos] == nil, "one result per recipient")
        results[pos] = result
        switch result.status {
        case .sent: current.sent += 1
        case .deferred: current.deferred += 1
        case .bounced: current.bounced += 1
        }
        emit(.recipientResult(index: message.recipients[pos].index, result))
    }

    private mutating func finishMessage(reply: SMTPReply?, phase: SMTPClientPhase) {
        precondition(!results.contains(nil), "every recipient has a result")
        awaiting = []
        unsent = []
        current.reply = reply
        current.phase = phase
        current.bytesSent = bodyStarted ? encoder.bytesOut : 0
        state = .ready
        emit(.messageResult(current))
    }

    // MARK: - Failures and output

    private mutating func sessionFailed(_ kind: SMTPClientFailure.Kind, _ status: EnhancedStatus, _ text: String,
                                        reply: SMTPReply? = nil, phase: SMTPClientPhase, quit: Bool) {
        emit(.sessionFailed(SMTPClientFailure(kind, status, text, reply: reply, phase: phase)))
        unsent = []
        // QUIT only while in step with the server: with pipelined replies
        // outstanding, a QUIT could land in a DATA the server accepted.
        if quit && awaiting.isEmpty {
            write(Array("QUIT\r\n".utf8))
            state = .quit
        } else {
            close()
        }
        awaiting = []
    }

    private mutating func protocolError(_ reason: String, phase known: SMTPClientPhase? = nil) {
        let p = known ?? phase
        emit(.protocolError(SMTPClientFailure(.protocolError, EnhancedStatus(4, 5, 0),
                                              "protocol error: \(reason) (\(p))", phase: p)))
        close()
    }

    private mutating func close() {
        awaiting = []
        unsent = []
        state = .closed
        emit(.close)
    }

    private mutating func write(_ bytes: [UInt8]) {
        output += bytes
    }

    private mutating func emit(_ action: SMTPClientAction) {
        flush()
        actions.append(action)
    }

    private mutating func flush() {
        if !output.isEmpty {
            actions.append(.send(output))
            output = []
        }
    }

    private mutating func take() -> [SMTPClientAction] {
        flush()
        defer { actions = [] }
        return actions
    }

    // MARK: - Helpers

    /// A peer's 5.x.y becomes 4.x.y: a session failure defers.
    static func deferStatus(_ reply: SMTPReply?, _ fallback: EnhancedStatus) -> EnhancedStatus {
        if let s = reply?.status, s.codeClass != 2 { return EnhancedStatus(4, s.subject, s.detail) }
        return fallback
    }

    /// What can go between angle brackets without breaking the command
    /// line: no control characters, no angle brackets, at most 1000 bytes
    /// (the queue validated the syntax; this only protects the framing).
    static func validAddress(_ address: String, allowEmpty: Bool) -> Bool {
        let u = address.utf8
        if u.isEmpty { return allowEmpty }
        return u.count <= 1000 && !u.contains { $0 < 0x20 || $0 == 0x7F || $0 == UInt8(ascii: "<") || $0 == UInt8(ascii: ">") }
    }

    /// RFC 6533's utf-8-addr-xtext: printable ASCII but the plus sign,
    /// the equals sign and the backslash as it is, every other character as
    /// \x{HEX}, its code point.
    static func utf8AddressXText(_ address: String) -> String {
        var out = ""
        for u in address.unicodeScalars {
            if (0x21...0x7E).contains(u.value) && u != "+" && u != "=" && u != "\\" {
                out.unicodeScalars.append(u)
            } else {
                let hex = String(u.value, radix: 16, uppercase: true)
                out += "\\x{" + (hex.count < 2 ? "0" + hex : hex) + "}"   // HEXPOINT: 2 to 6 digits
            }
        }
        return out
    }

    /// ORCPT addr-type is an atom (RFC 3461 4.2); anything else is dropped.
    static func validAddressType(_ t: String) -> Bool {
        !t.isEmpty && t.utf8.count <= 32 && t.utf8.allSatisfy {
            (48...57).contains($0) || (65...90).contains($0) || (97...122).contains($0) || $0 == UInt8(ascii: "-")
        }
    }

    static func printable(_ s: String, max: Int) -> String {
        var out = String.UnicodeScalarView()
        for u in s.unicodeScalars.prefix(max) { out.append((0x20...0x7E).contains(u.value) ? u : "?") }
        return String(out)
    }

    /// "while receiving the initial server greeting", "while sending RCPT TO".
    static func during(_ p: SMTPClientPhase) -> String {
        switch p {
        case .greeting: return "while receiving the initial server greeting"
        case .ehlo, .helo: return "while performing the EHLO handshake"
        case .startTLS, .tlsHandshake: return "while performing the TLS handshake"
        case .auth: return "while authenticating"
        case .rset: return "while sending RSET"
        case .mailFrom: return "while sending MAIL FROM"
        case .rcptTo: return "while sending RCPT TO"
        case .dataInit: return "while sending DATA command"
        case .dataBlock: return "while sending message body"
        case .dataTermination: return "while waiting for the reply to the end of data (the message may be delivered twice)"
        case .idle: return "while idle"
        case .quit: return "while sending QUIT"
        case .closed: return "after the session ended"
        }
    }
}
