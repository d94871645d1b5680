/// A libFuzzer-compatible driver for `SMTPClientSession`: arbitrary bytes
/// choose the policy and the message, play the server (its bytes, split at
/// arbitrary points), the TLS hand-off's outcome, the body's chunks, the
/// 8-bit body's conversion and the I/O layer's choices (next message, QUIT,
/// lost connection, timeout).
/// Invariants are checked with `precondition`, so a violation crashes the
/// fuzzer with a finding:
///
/// - nothing after `.close`; nothing is sent before the greeting;
/// - every command line the client writes ends in CRLF and holds no other
///   CR or LF;
/// - the body on the wire is exactly the reference encoding of the chunks
///   (line ends repaired, dot-stuffed, "\r\n.\r\n" once, at the end);
/// - each recipient gets at most one result per message, and all of them
///   before `.messageResult`; counts add up; a result's class matches its
///   status; texts are printable and bounded;
/// - `.protocolError` is followed by `.close`; memory held for replies
///   stays within the limits;
/// - SIZE= is the size of the body that goes out (the converted one after
///   `.downgradeBody`), and no BODY= goes to a host without 8BITMIME.
///
///     @_cdecl("LLVMFuzzerTestOneInput")
///     func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
///         SMTPClientFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size)); return 0
///     }
public enum SMTPClientFuzz {
    /// What one run observed (for tests).
    public struct Outcome: Sendable, Equatable {
        public var recipientResults = 0
        public var messageResults = 0
        public var sessionFailures = 0
        public var protocolErrors = 0
        public var bodiesSent = 0
        public var tlsStarted = 0
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
        let more = reader.byte() ?? 0
        var policy = SMTPClientPolicy(hostname: "client.example")
        policy.pipelining = flags & 1 != 0
        policy.tls = [.none, .opportunistic, .required, .opportunistic][Int(flags >> 1 & 3)]
        if flags & 8 != 0 { policy.credentials = SMTPClientCredentials(username: "u", password: "p") }
        policy.allowAuthenticationWithoutTLS = flags & 16 != 0
        // 8-bit to a host without 8BITMIME: bit 6 bounces, bit 7 sends
        // unchanged, neither converts; the conversion's answer is flags'
        // bits 6-7 (no input byte, so that older seeds keep their meaning).
        policy.eightBitWithout8BITMIME = more & 64 != 0 ? .bounce : more & 128 != 0 ? .send : .convert
        let downgradeAnswer = Int(flags >> 6)
        if flags & 32 != 0 {
            policy.limits.maxLines = 4
            policy.limits.maxBytes = 200
            policy.limits.maxLineLength = 40
        }
        var checker = Checker(limits: policy.limits)
        var session = SMTPClientSession(policy: policy, message: makeMessage(more, flags))
        checker.begin(session.message)

        var steps = 0
        while !reader.atEnd && !session.isClosed && steps < 10_000 {
            steps += 1
            if session.awaitingTLS {
                let choice = reader.byte() ?? 0
                // Bit 7: the server speaks during the hand-off (a protocol
                // error); bit 6: the I/O layer quits then (no QUIT may go out).
                if choice & 0x80 != 0 {
                    checker.check(session.receive(reader.take(Int(reader.byte() ?? 0) % 16 + 1)), &session)
                    continue
                }
                if choice & 0x40 != 0 {
                    checker.check(session.quit(), &session)
                    precondition(session.isClosed, "quit() during the TLS hand-off closes at once")
                    continue
                }
                let actions = choice % 7 == 0 ? session.tlsFailed("handshake failure \u{1}")
                    : session.tlsEstablished(SMTPClientTLSReport(protocolVersion: "TLSv1.3", cipher: "X",
                                                                 peerAuthenticated: choice & 1 == 0))
                checker.check(actions, &session)
                continue
            }
            if session.awaitingDowngrade {
                let size = session.message.size
                let actions: [SMTPClientAction]
                switch downgradeAnswer {
                case 0: actions = session.bodyDowngraded(SMTPBodyDowngrade(size: size + size / 10, convertedParts: 1))
                case 1: actions = session.bodyDowngraded(SMTPBodyDowngrade(size: size, convertedParts: 0,
                                                                           remarks: ["8-bit header fields sent unchanged\u{7}"]))
                case 2: actions = session.bodyDowngradeFailed("binary \r\n content")
                default: actions = session.bodyDowngraded(SMTPBodyDowngrade(size: size * 3, convertedParts: 2))
                }
                checker.check(actions, &session)
                continue
            }
            if session.wantsBody {
                let control = reader.byte() ?? 0
                for _ in 0..<(Int(control) % 5) {
                    let n = Int(reader.byte() ?? 0) % 12
                    let chunk = reader.take(n)
                    checker.bodyInput += chunk
                    checker.check(session.bodyChunk(chunk), &session)
                }
                // Bit 7: the server speaks in the middle of the body (a
                // protocol error); bit 6: the I/O layer quits then.
                if control & 0x80 != 0 {
                    checker.check(session.receive(reader.take(Int(reader.byte() ?? 0) % 16 + 1)), &session)
                    if session.isClosed { continue }
                }
                if control & 0x40 != 0 {
                    checker.check(session.quit(), &session)
                    precondition(session.isClosed, "quit() during the body closes at once")
                    continue
                }
                checker.check(session.bodyEnd(), &session)
                continue
            }
            if session.isIdle {
                let choice = reader.byte() ?? 0
                switch choice % 5 {
                case 0: checker.check(session.quit(), &session)
                case 4:
                    // The server speaks while the connection is idle.
                    let chunk = reader.take(Int(reader.byte() ?? 0) % 16 + 1)
                    checker.check(session.receive(chunk), &session)
                default:
                    let m = makeMessage(choice, reader.byte() ?? 0)
                    checker.begin(m)
                    checker.check(session.nextMessage(m), &session)
                }
                continue
            }
            let control = reader.byte() ?? 0
            switch control {
            case 0xFF: checker.check(session.connectionLost(), &session)
            case 0xFE: checker.check(session.timedOut(), &session)
            default:
                let n = Int(control) % 96 + 1
                let chunk = reader.take(n)
                checker.serverSpoke = true
                checker.check(session.receive(chunk), &session)
                precondition(session.bufferedInputBytes <= policy.limits.maxBytes + policy.limits.maxLineLength + 2 + chunk.count,
                             "reply buffer exceeds its bound")
            }
        }
        if !session.isClosed { checker.check(session.connectionLost(), &session) }
        precondition(session.isClosed, "connectionLost() must close")
        checker.outcome.closed = true
        return checker.outcome
    }

    static func makeMessage(_ a: UInt8, _ b: UInt8) -> SMTPClientMessage {
        let count = Int(a & 3) + 1
        var recipients: [SMTPClientRecipient] = []
        for i in 0..<count {
            let address = i == 3 && b & 128 != 0 ? "bad\r\naddress@x" : i == 2 && b & 2 != 0 ? "ü@example.net" : "r\(i)@example.net"
            recipients.append(SMTPClientRecipient(index: 10 + i, address: address,
                                                  notify: b & 4 != 0 ? DSNNotify(success: true, failure: true) : nil,
                                                  orcpt: b & 8 != 0 ? DSNOriginalRecipient(addressType: "rfc822", address: "o+=\(i)@x") : nil))
        }
        return SMTPClientMessage(sender: b & 16 != 0 ? "" : "s@example.org", recipients: recipients,
                                 size: a & 4 != 0 ? 5_000_000 : 1000,
                                 bodyType: a & 8 != 0 ? .eightBitMIME : nil, smtputf8: a & 16 != 0,
                                 ret: b & 32 != 0 ? .headers : nil, envid: b & 64 != 0 ? "env id+=" : nil,
                                 requireTLS: a & 32 != 0)
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
        mutating func take(_ n: Int) -> [UInt8] {
            let end = min(bytes.count, index + n)
            defer { index = end }
            return Array(bytes[index..<end])
        }
    }

    struct Checker {
        let limits: SMTPClientReplyLimits
        var outcome = Outcome()
        var closed = false
        var serverSpoke = false
        var message: SMTPClientMessage?
        var resultFor: Set<Int> = []
        var inBody = false
        var bodyInput: [UInt8] = []
        var bodyWire: [UInt8] = []

        mutating func begin(_ m: SMTPClientMessage) {
            message = m
            resultFor = []
        }

        mutating func check(_ actions: [SMTPClientAction], _ session: inout SMTPClientSession) {
            var lastWasProtocolError = false
            for action in actions {
                precondition(!closed, "no action after close")
                if lastWasProtocolError { precondition(action == .close, ".protocolError must be followed by .close") }
                lastWasProtocolError = false
                switch action {
                case .send(let bytes):
                    precondition(serverSpoke, "nothing is sent before the greeting")
                    precondition(!bytes.isEmpty, "empty send")
                    if inBody {
                        bodyWire += bytes
                        if !session.wantsBody { finishBody() }
                    } else {
                        Self.checkLines(bytes)
                        Self.checkMail(bytes, session)
                    }
                case .startTLS:
                    outcome.tlsStarted += 1
                    precondition(session.awaitingTLS)
                case .downgradeBody:
                    precondition(session.awaitingDowngrade)
                    guard let message else { preconditionFailure("conversion without a message") }
                    precondition(message.bodyType == .eightBitMIME && !session.capabilities.extensions.contains(.eightBitMIME),
                                 "conversion only for 8-bit to a host without 8BITMIME")
                case .sendBody:
                    precondition(session.wantsBody)
                    inBody = true
                    bodyInput = []
                    bodyWire = []
                case .recipientResult(let index, let result):
                    guard let message else { preconditionFailure("result without a message") }
                    precondition(message.recipients.contains { $0.index == index }, "result for an unknown recipient")
                    precondition(resultFor.insert(index).inserted, "two results for one recipient")
                    let cls = ["sent": 2, "deferred": 4, "bounced": 5][result.status.rawValue]!
                    precondition(result.dsn.codeClass == cls, "status and DSN class disagree")
                    if let r = result.reply { precondition(r.code / 100 == cls, "status and reply disagree") }
                    Self.checkText(result.text)
                    Self.checkText(result.diagnostic)
                    outcome.recipientResults += 1
                case .messageResult(let r):
                    guard let message else { preconditionFailure("message result without a message") }
                    precondition(resultFor.count == message.recipients.count, "message result before every recipient's")
                    precondition(r.sent + r.deferred + r.bounced == message.recipients.count, "counts add up")
                    precondition(session.isIdle || session.isClosed)
                    outcome.messageResults += 1
                case .sessionFailed(let f):
                    precondition(f.status.codeClass == 4, "session failures defer")
                    Self.checkText(f.text)
                    outcome.sessionFailures += 1
                case .protocolError(let f):
                    precondition(f.status.codeClass == 4, "protocol errors defer")
                    Self.checkText(f.text)
                    outcome.protocolErrors += 1
                    lastWasProtocolError = true
                case .close:
                    closed = true
                    precondition(session.isClosed)
                }
            }
            precondition(!lastWasProtocolError, ".protocolError must be followed by .close")
        }

        /// After bodyEnd: the wire bytes are the reference encoding.
        mutating func finishBody() {
            inBody = false
            precondition(bodyWire == Self.referenceEncoding(bodyInput), "body encoding differs from the reference")
            outcome.bodiesSent += 1
        }

        static func checkLines(_ bytes: [UInt8]) {
            precondition(bytes.count >= 2 && bytes[bytes.count - 2] == 13 && bytes.last == 10, "commands end with CRLF")
            for (i, b) in bytes.enumerated() {
                if b == 13 { precondition(i + 1 < bytes.count && bytes[i + 1] == 10, "bare CR in a command") }
                if b == 10 { precondition(i > 0 && bytes[i - 1] == 13, "bare LF in a command") }
            }
        }

        /// MAIL: SIZE= the size that goes out; BODY= only to a host that
        /// offers 8BITMIME.
        static func checkMail(_ bytes: [UInt8], _ session: SMTPClientSession) {
            for line in bytes.split(separator: 10) where line.starts(with: Array("MAIL FROM:".utf8)) {
                let text = String(decoding: line.dropLast(), as: UTF8.self)
                if !session.capabilities.extensions.contains(.eightBitMIME) {
                    precondition(!text.contains(" BODY="), "BODY= to a host without 8BITMIME")
                }
                for word in text.split(separator: " ") where word.hasPrefix("SIZE=") {
                    precondition(UInt64(word.dropFirst(5)) == session.transferSize, "SIZE= is not the size sent")
                }
            }
        }

        static func checkText(_ s: String) {
            precondition(s.unicodeScalars.allSatisfy { (0x20...0x7E).contains($0.value) }, "unprintable result text")
            precondition(s.utf8.count <= 1600, "result text unbounded")
        }

        /// An independent statement of RFC 5321 4.5.2 plus line-end repair.
        static func referenceEncoding(_ input: [UInt8]) -> [UInt8] {
            var lines: [[UInt8]] = []
            var line: [UInt8] = []
            var i = 0
            var terminated = true
            while i < input.count {
                let b = input[i]
                if b == 13 || b == 10 {
                    lines.append(line)
                    line = []
                    terminated = true
                    i += (b == 13 && i + 1 < input.count && input[i + 1] == 10) ? 2 : 1
                } else {
                    line.append(b)
                    terminated = false
                    i += 1
                }
            }
            if !terminated { lines.append(line) }
            var out: [UInt8] = []
            for l in lines {
                if l.first == UInt8(ascii: ".") { out.append(UInt8(ascii: ".")) }
                out += l
                out += [13, 10]
            }
            return out + [UInt8(ascii: "."), 13, 10]
        }
    }
}
