import Testing
@testable import SMTP

// Test support for the SMTP client: a scripted receiving server (`Peer`)
// that answers the client's actual bytes line by line like a real MTA
// (pipelined commands each get their reply, DATA content is collected
// until the lone "."), and a driver that plays the I/O layer
// (`drive`): it feeds the peer's replies to the session whole or one byte
// at a time, performs the TLS hand-off, streams the body, reuses the
// connection for further messages and records everything.

/// The receiving side. Replies come from one-shot rules (first rule whose
/// prefix matches the command line, case-insensitive, is used and
/// removed), else from sensible defaults. A reply string ending in "\n" is
/// sent byte for byte; otherwise "\r\n" is appended.
struct Peer {
    var greeting = "220 mx.example.net ESMTP ready"
    var ehlo = ["mx.example.net", "PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8",
                "ENHANCEDSTATUSCODES", "DSN", "STARTTLS", "REQUIRETLS"]
    /// EHLO keywords after STARTTLS; nil: `ehlo` without STARTTLS.
    var ehloAfterTLS: [String]?
    var rules: [(prefix: String, reply: String)] = []

    private(set) var commands: [String] = []
    /// Both directions, line by line: "C: MAIL FROM:<a@b>", "S: 250 2.1.0 Ok".
    private(set) var transcript: [String] = []
    /// Each message's content as it arrived on the wire (still dot-stuffed),
    /// without the terminating ".\r\n".
    private(set) var messages: [[UInt8]] = []
    var tlsActive = false
    private var input: [UInt8] = []
    private var inData = false
    private var content: [UInt8] = []
    private var mailOK = false
    private var rcptOK = 0

    init(_ rules: [(String, String)] = []) {
        self.rules = rules.map { (prefix: $0.0, reply: $0.1) }
    }

    var greetingBytes: [UInt8] { Self.bytes(greeting) }

    mutating func logServer(_ bytes: [UInt8]) {
        for line in bytes.split(separator: 10) {
            transcript.append("S: " + String(decoding: line.last == 13 ? line.dropLast() : line, as: UTF8.self))
        }
    }

    static func bytes(_ reply: String) -> [UInt8] {
        reply.hasSuffix("\n") ? Array(reply.utf8) : Array((reply + "\r\n").utf8)
    }

    mutating func rule(_ line: String) -> String? {
        guard let i = rules.firstIndex(where: { line.uppercased().hasPrefix($0.prefix.uppercased()) }) else { return nil }
        return rules.remove(at: i).reply
    }

    mutating func consume(_ bytes: [UInt8]) -> [UInt8] {
        input += bytes
        var out: [UInt8] = []
        while let lf = input.firstIndex(of: 10) {
            let raw = Array(input[...lf])
            input.removeSubrange(...lf)
            transcript.append("C: " + String(decoding: raw.dropLast(raw.count >= 2 && raw[raw.count - 2] == 13 ? 2 : 1), as: UTF8.self))
            if inData {
                if raw == [46, 13, 10] {
                    inData = false
                    messages.append(content)
                    let reply = Self.bytes(rule("<END-OF-DATA>") ?? "250 2.0.0 Ok: queued as 4F2A9C")
                    logServer(reply)
                    out += reply
                    mailOK = false
                    rcptOK = 0
                } else {
                    content += raw
                }
                continue
            }
            var line = raw.dropLast()
            if line.last == 13 { line = line.dropLast() }
            let text = String(decoding: line, as: UTF8.self)
            commands.append(text)
            let verb = text.split(separator: " ").first.map { String($0).uppercased() } ?? ""
            let reply = rule(text) ?? defaultReply(verb, text)
            if verb == "DATA" && reply.hasPrefix("354") {
                inData = true
                content = []
            }
            if verb.hasPrefix("MAIL") && reply.hasPrefix("2") { mailOK = true }
            if verb.hasPrefix("RCPT") && reply.hasPrefix("2") { rcptOK += 1 }
            if verb == "RSET" { mailOK = false; rcptOK = 0 }
            logServer(Self.bytes(reply))
            out += Self.bytes(reply)
        }
        return out
    }

    func defaultReply(_ verb: String, _ text: String) -> String {
        switch verb {
        case "EHLO":
            let keywords = tlsActive ? (ehloAfterTLS ?? ehlo.filter { $0 != "STARTTLS" }) : ehlo
            return keywords.enumerated().map { "250\($0.offset == keywords.count - 1 ? " " : "-")\($0.element)" }
                .joined(separator: "\r\n")
        case "HELO": return "250 mx.example.net"
        case "STARTTLS": return "220 2.0.0 Ready to start TLS"
        case "AUTH": return "235 2.7.0 Authentication successful"
        case "MAIL": return "250 2.1.0 Ok"
        case "RCPT": return mailOK ? "250 2.1.5 Ok" : "503 5.5.1 Error: need MAIL command"
        case "DATA":
            if !mailOK { return "503 5.5.1 Error: need MAIL command" }
            return rcptOK > 0 ? "354 End data with <CR><LF>.<CR><LF>" : "554 5.5.1 Error: no valid recipients"
        case "RSET": return "250 2.0.0 Ok"
        case "QUIT": return "221 2.0.0 Bye"
        default: return "502 5.5.2 Error: command not recognized"
        }
    }
}

enum Feed: Sendable, CaseIterable { case whole, byteAtATime }

enum TLSOutcome { case established(authenticated: Bool), failed }

struct Run {
    var actions: [SMTPClientAction] = []
    var results: [Int: SMTPDeliveryResult] = [:]
    var messageResults: [SMTPMessageResult] = []
    var failures: [SMTPClientFailure] = []
    var protocolErrors: [SMTPClientFailure] = []
    var tlsStarts = 0
    var closed = false
    var phases: [SMTPClientPhase] = []
    var peer = Peer()
    var session: SMTPClientSession

    var commands: [String] { peer.commands }
    /// Commands reduced to their verb ("MAIL", "RCPT", ...), for flow checks.
    var verbs: [String] { peer.commands.map { String($0.split(separator: " ").first ?? "").uppercased() } }
    /// The client's writes, in order: which commands traveled together.
    var writes: [String] {
        actions.compactMap { if case .send(let b) = $0 { String(decoding: b, as: UTF8.self) } else { nil } }
    }
    func status(_ index: Int) -> SMTPDeliveryResult.Status? { results[index]?.status }
}

let defaultBody: [[UInt8]] = [Array("Subject: test\r\n\r\nHello.\r\n".utf8)]

/// Recipients get job indices from `first` on (distinct across the
/// messages of one connection, so results do not overwrite each other).
func message(_ recipients: [String], first: Int = 1, sender: String = "alice@example.org", size: UInt64 = 1000,
             bodyType: SMTPBodyType? = nil, smtputf8: Bool = false, requireTLS: Bool = false) -> SMTPClientMessage {
    SMTPClientMessage(sender: sender,
                      recipients: recipients.enumerated().map { SMTPClientRecipient(index: $0.offset + first, address: $0.element) },
                      size: size, bodyType: bodyType, smtputf8: smtputf8, requireTLS: requireTLS)
}

func clientPolicy(_ tls: SMTPClientTLSMode = .opportunistic, pipelining: Bool = true) -> SMTPClientPolicy {
    var p = SMTPClientPolicy(hostname: "client.example.org")
    p.tls = tls
    p.pipelining = pipelining
    return p
}

/// The I/O layer's answer to `.downgradeBody`.
enum DowngradeAnswer {
    case converted(SMTPBodyDowngrade)
    case failed(String)
}

/// Plays the I/O layer until the session closes or nothing more happens.
func drive(_ policy: SMTPClientPolicy, _ first: SMTPClientMessage, peer: Peer, feed: Feed = .whole,
           tls: TLSOutcome = .established(authenticated: true), bodies: [[[UInt8]]] = [defaultBody],
           downgrade: DowngradeAnswer = .converted(SMTPBodyDowngrade(size: 1200, convertedParts: 1)),
           more: [SMTPClientMessage] = [], loseConnectionAtEnd: Bool = true) -> Run {
    var run = Run(peer: peer, session: SMTPClientSession(policy: policy, message: first))
    var pendingServer = peer.greetingBytes
    run.peer.logServer(pendingServer)
    var queue: [SMTPClientAction] = []
    var remaining = more
    var bodyIndex = 0

    func feedOne(_ run: inout Run, _ pendingServer: inout [UInt8]) -> [SMTPClientAction] {
        let n = feed == .whole ? pendingServer.count : 1
        let chunk = Array(pendingServer.prefix(n))
        pendingServer.removeFirst(n)
        return run.session.receive(chunk)
    }

    var guardSteps = 0
    while guardSteps < 100_000 {
        guardSteps += 1
        if !queue.isEmpty {
            let action = queue.removeFirst()
            run.actions.append(action)
            switch action {
            case .send(let bytes):
                pendingServer += run.peer.consume(bytes)
            case .startTLS:
                run.tlsStarts += 1
                // Bytes that arrived before the hand-off reach the session.
                while !pendingServer.isEmpty && run.session.awaitingTLS {
                    queue += feedOne(&run, &pendingServer)
                }
                if run.session.awaitingTLS {
                    run.peer.tlsActive = true
                    switch tls {
                    case .established(let authenticated):
                        queue += run.session.tlsEstablished(SMTPClientTLSReport(protocolVersion: "TLSv1.3",
                                                                               cipher: "TLS_AES_256_GCM_SHA384",
                                                                               peerAuthenticated: authenticated))
                    case .failed:
                        queue += run.session.tlsFailed("certificate verify failed")
                    }
                }
            case .downgradeBody:
                switch downgrade {
                case .converted(let result): queue += run.session.bodyDowngraded(result)
                case .failed(let reason): queue += run.session.bodyDowngradeFailed(reason)
                }
            case .sendBody:
                run.phases.append(run.session.phase)
                let body = bodies[min(bodyIndex, bodies.count - 1)]
                bodyIndex += 1
                for chunk in body { queue += run.session.bodyChunk(chunk) }
                queue += run.session.bodyEnd()
                run.phases.append(run.session.phase)
            case .recipientResult(let index, let result):
                run.results[index] = result
            case .messageResult(let r):
                run.messageResults.append(r)
                if !remaining.isEmpty {
                    let m = remaining.removeFirst()
                    // The results of the next message use fresh indices.
                    queue += run.session.nextMessage(m)
                } else {
                    queue += run.session.quit()
                }
            case .sessionFailed(let f):
                run.failures.append(f)
            case .protocolError(let f):
                run.protocolErrors.append(f)
            case .close:
                run.closed = true
            }
            continue
        }
        if !pendingServer.isEmpty && !run.session.isClosed {
            run.phases.append(run.session.phase)
            queue += feedOne(&run, &pendingServer)
            continue
        }
        break
    }
    if loseConnectionAtEnd && !run.session.isClosed {
        for action in run.session.connectionLost() {
            run.actions.append(action)
            if case .sessionFailed(let f) = action { run.failures.append(f) }
            if case .close = action { run.closed = true }
        }
    }
    return run
}

@Suite struct SMTPClientHarnessTests {
    @Test func peerAnswersPipelinedCommandsInOrder() {
        var peer = Peer([("RCPT TO:<b@", "550 5.1.1 No such user")])
        let out = peer.consume(Array("MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n".utf8))
        #expect(String(decoding: out, as: UTF8.self)
            == "250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        _ = peer.consume(Array("..x\r\n.\r\n".utf8))
        #expect(peer.messages == [Array("..x\r\n".utf8)])
    }
}
