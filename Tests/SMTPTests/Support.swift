/// Test support: a driver that plays the I/O layer around SMTPServerSession
/// (commits messages, answers password checks, completes TLS) and records a
/// normalized transcript, so that different ways of feeding the same bytes
/// can be compared.
@testable import SMTP

enum Event: Equatable, CustomStringConvertible {
    case reply(String)
    case begin(SMTPEnvelope)
    case data([UInt8])
    case end
    case abort(SMTPReply)
    case authenticate(SMTPCredentials)
    case startTLS
    case close

    var description: String {
        switch self {
        case .reply(let s): return "reply(\(s.debugDescription))"
        case .begin(let e): return "begin(from=\(e.sender) rcpts=\(e.recipients.map(\.address)))"
        case .data(let d): return "data(\(String(decoding: d, as: UTF8.self).debugDescription))"
        case .end: return "end"
        case .abort(let r): return "abort(\(r))"
        case .authenticate(let c): return "authenticate(\(c))"
        case .startTLS: return "startTLS"
        case .close: return "close"
        }
    }
}

func policy(_ configure: (inout SMTPServerPolicy) -> Void = { _ in }) -> SMTPServerPolicy {
    var p = SMTPServerPolicy(hostname: "mx.example.org")
    p.relay = RelayPolicy(localDomains: ["example.org", "[192.0.2.25]"], relayDomains: ["relay.example", ".sub.relay.example"])
    configure(&p)
    return p
}

let outsider = SMTPClientInfo(address: "198.51.100.7", hostname: "client.example.net")
let loopback = SMTPClientInfo(address: "127.0.0.1", hostname: "localhost", isTrusted: true)

struct Driver {
    var session: SMTPServerSession
    var events: [Event] = []
    var logs: [SMTPEvent] = []
    var queueIDs = 0
    /// How the queue answers; nil commits.
    var queueAnswer: SMTPQueueFailure? = nil
    var authAnswer: @Sendable (SMTPCredentials) -> SMTPAuthResult = { $0.password == "secret" ? .success : .failure }
    /// Complete the TLS hand-off automatically.
    var completeTLS = true

    init(_ policy: SMTPServerPolicy = policy(), client: SMTPClientInfo = outsider, start: Bool = true) {
        session = SMTPServerSession(policy: policy, client: client)
        if start { absorb(session.start()) }
    }

    mutating func absorb(_ actions: [SMTPAction]) {
        var pending = actions
        while !pending.isEmpty {
            var next: [SMTPAction] = []
            for a in pending {
                switch a {
                case .reply(let r): events.append(.reply(String(decoding: r.rendered, as: UTF8.self)))
                case .beginMessage(let e): events.append(.begin(e))
                case .messageData(let d):
                    if case .data(let prev) = events.last {
                        events[events.count - 1] = .data(prev + d)
                    } else {
                        events.append(.data(d))
                    }
                case .endMessage:
                    events.append(.end)
                    if let f = queueAnswer {
                        next += session.messageFailed(f)
                    } else {
                        queueIDs += 1
                        next += session.messageCommitted(queueID: "QID\(queueIDs)")
                    }
                case .abortMessage(let r): events.append(.abort(r))
                case .authenticate(let c):
                    events.append(.authenticate(c))
                    next += session.authResult(authAnswer(c))
                case .startTLS:
                    events.append(.startTLS)
                    if completeTLS { next += session.tlsEstablished() }
                case .close: events.append(.close)
                case .log(let e): logs.append(e)
                }
            }
            pending = next
        }
    }

    mutating func send(_ text: String) { send(Array(text.utf8)) }
    mutating func send(_ bytes: [UInt8]) { absorb(session.receive(bytes)) }
    mutating func sendByteByByte(_ bytes: [UInt8]) { for b in bytes { absorb(session.receive([b])) } }

    var replies: [String] {
        events.compactMap { if case .reply(let s) = $0 { return s } else { return nil } }
    }
    /// "250 2.1.0" (code and enhanced status of the last line), or "354".
    var codes: [String] {
        replies.map { r in
            let lines = r.split(separator: "\r\n")
            let last = lines.last.map(String.init) ?? r
            let parts = last.split(separator: " ", maxSplits: 2)
            if parts.count >= 2, parts[1].contains("."), parts[1].first!.isNumber { return "\(parts[0]) \(parts[1])" }
            return String(last.prefix(3))
        }
    }
    var messages: [[UInt8]] {
        var result: [[UInt8]] = []
        var current: [UInt8]? = nil
        for e in events {
            switch e {
            case .begin: current = []
            case .data(let d): current? += d
            case .end: if let c = current { result.append(c) }; current = nil
            case .abort: current = nil
            default: break
            }
        }
        return result
    }
    var ends: Int { events.filter { $0 == .end }.count }
    var envelopes: [SMTPEnvelope] {
        events.compactMap { if case .begin(let e) = $0 { return e } else { return nil } }
    }
}

extension Array where Element == UInt8 {
    var text: String { String(decoding: self, as: UTF8.self) }
}
