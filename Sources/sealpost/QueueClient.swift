// The admin side of the `control` protocol (PROTOCOL.md section 4.4) and
// the text the `sealpost queue` commands print. No configuration here: the
// commands find the socket and hand it to `QueueClient`.

#if canImport(Glibc)
import Glibc
#endif
import StageProtocol

/// Exit codes of sysexits.h that the CLI uses.
enum SysExit {
    static let usage: Int32 = 64
    static let dataErr: Int32 = 65
    static let noUser: Int32 = 67
    static let unavailable: Int32 = 69
    static let software: Int32 = 70
    static let canTCreat: Int32 = 73
    static let ioErr: Int32 = 74
    static let tempFail: Int32 = 75
    static let protocolErr: Int32 = 76
    static let config: Int32 = 78
}

/// A failure the CLI reports on stderr ("sealpost: MESSAGE") before exiting
/// with `exitCode`.
struct AdminFailure: Error, CustomStringConvertible {
    var message: String
    var exitCode: Int32
    var description: String { message }
}

/// One message as the queue lists it.
struct QueueEntry {
    struct Recipient {
        var address: String
        var state: String
        var attempts: UInt64
        var nextAttempt: UInt64
        var error: String?
    }
    var queueID: String
    var size: UInt64
    var arrival: UInt64
    var sender: String
    var held: Bool
    var envid: String?
    var ret: String?
    var recipients: [Recipient] = []
    var body: [UInt8] = []
}

/// The answer to one REQUEST: the entries, then DONE's `ok` and `text`.
struct QueueReply {
    var entries: [QueueEntry]
    var ok: Bool
    var text: String
}

/// A connection to the queue's control socket.
final class QueueClient {
    let path: String
    private let connection: StageConnection

    /// Connects and exchanges HELLOs. Unreachable queue: exit 75.
    init(path: String) throws(AdminFailure) {
        self.path = path
        do {
            // A queue that is alive but stuck must not hang the command.
            connection = try StageConnection.connect(path: path, timeout: 120)
        } catch let e as StageIOError {
            throw AdminFailure(message: "cannot reach the queue at \(path): \(e.reason)", exitCode: SysExit.tempFail)
        } catch {
            throw AdminFailure(message: "cannot reach the queue at \(path): \(error)", exitCode: SysExit.tempFail)
        }
        do {
            try connection.clientHello(.control, extra: [("software", .text("sealpost-admin 0.1"))])
        } catch {
            throw failure(error, while: "greeting the queue")
        }
    }

    deinit { connection.close() }

    /// Sends one REQUEST and collects the answer up to DONE, checking the
    /// order of section 4.4: ENTRY, its ENTRY-RCPTs, its BODYs, ..., DONE.
    func request(_ verb: String, queueID: String? = nil, bounce: Bool = false, all: Bool = false) throws(AdminFailure) -> QueueReply {
        var frame = Frame(.request, ["verb": .text(verb)])
        frame.set("queue-id", queueID.map { .text($0) })
        if bounce { frame.set("bounce", .bool(true)) }
        if all { frame.set("all", .bool(true)) }
        do {
            try connection.send(frame)
            var entries: [QueueEntry] = []
            while true {
                guard let f = try connection.receive() else {
                    throw AdminFailure(message: "the queue at \(path) closed the connection before answering \(verb)",
                                       exitCode: SysExit.tempFail)
                }
                switch f.type {
                case .entry:
                    entries.append(QueueEntry(
                        queueID: try f.text("queue-id"), size: try f.uint("size"), arrival: try f.uint("arrival"),
                        sender: try f.text("sender"), held: try f.bool("held", default: false),
                        envid: try f.optionalText("envid"), ret: try f.optionalText("ret")))
                case .entryRcpt:
                    guard !entries.isEmpty, entries[entries.count - 1].body.isEmpty else {
                        throw ProtocolError("ENTRY-RCPT: not after an ENTRY and before its BODY")
                    }
                    entries[entries.count - 1].recipients.append(QueueEntry.Recipient(
                        address: try f.text("address"), state: try f.text("state"), attempts: try f.uint("attempts"),
                        nextAttempt: try f.uint("next-attempt"), error: try f.optionalText("error")))
                case .body:
                    guard !entries.isEmpty else { throw ProtocolError("BODY: not after an ENTRY") }
                    entries[entries.count - 1].body += try f.bytes("data")
                case .done:
                    return QueueReply(entries: entries, ok: try f.bool("ok", default: false), text: try f.text("text"))
                case .error:
                    throw AdminFailure(message: "the queue reported an error: \(try f.text("status")) \(try f.text("text"))",
                                       exitCode: SysExit.tempFail)
                default:
                    throw ProtocolError("\(f.type.name): unexpected in answer to REQUEST")
                }
            }
        } catch let e as AdminFailure {
            throw e
        } catch {
            throw failure(error, while: "asking the queue to \(verb)")
        }
    }

    private func failure(_ error: any Error, while doing: String) -> AdminFailure {
        switch error {
        case let e as PeerError:
            return AdminFailure(message: "the queue at \(path) refused the connection: \(e.status) \(e.text)",
                                exitCode: SysExit.tempFail)
        case let e as ProtocolError:
            return AdminFailure(message: "protocol error from the queue at \(path) while \(doing): \(e.message)",
                                exitCode: SysExit.protocolErr)
        case let e as StageIOError:
            return AdminFailure(message: "lost the connection to the queue at \(path) while \(doing): \(e.reason)",
                                exitCode: SysExit.tempFail)
        default:
            return AdminFailure(message: "\(doing): \(error)", exitCode: SysExit.software)
        }
    }
}

// MARK: - Output

enum QueueFormat {
    /// A queue ID as typed by the administrator: 12 hex digits, any case.
    static func normalizeID(_ raw: String) throws(AdminFailure) -> String {
        let id = raw.uppercased()
        guard id.utf8.count == 12, id.utf8.allSatisfy({ (48...57).contains($0) || (65...70).contains($0) }) else {
            throw AdminFailure(message: "not a queue ID (12 hex digits): \(raw)", exitCode: SysExit.usage)
        }
        return id
    }

    /// "Sun Nov 29 16:28:33" in local time, as mailq prints arrival times.
    static func shortTime(_ unix: UInt64) -> String {
        strftime(unix, "%a %b %e %H:%M:%S")
    }

    /// "Sun, 29 Nov 2026 16:28:33 +0000" (RFC 5322 style), local time.
    static func longTime(_ unix: UInt64) -> String {
        strftime(unix, "%a, %d %b %Y %H:%M:%S %z")
    }

    private static func strftime(_ unix: UInt64, _ format: String) -> String {
        var t = time_t(clamping: unix)
        var tm = Glibc.tm()
        guard localtime_r(&t, &tm) != nil else { return "\(unix)" }
        var buf = [CChar](repeating: 0, count: 64)
        let n = Glibc.strftime(&buf, buf.count, format, &tm)
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func sender(_ s: String) -> String { s.isEmpty ? "MAILER-DAEMON" : Printable.text(s) }

    static func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
        let n = s.count
        guard n < width else { return s }
        let fill = String(repeating: " ", count: width - n)
        return right ? fill + s : s + fill
    }

    /// mailq-like listing: a held message has "!" after its ID, as Postfix
    /// shows it; each recipient with its state, attempts and last error.
    static func list(_ entries: [QueueEntry]) -> String {
        guard !entries.isEmpty else { return "Mail queue is empty\n" }
        var out = "-Queue ID-   --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        let indent = String(repeating: " ", count: 43)
        var total: UInt64 = 0
        for e in entries {
            total += e.size
            out += pad(e.queueID + (e.held ? "!" : ""), 13) + pad(String(e.size), 8, right: true) + " "
                + pad(shortTime(e.arrival), 20) + " " + sender(e.sender) + "\n"
            for r in e.recipients {
                if let error = r.error, r.state != "sent" {
                    out += indent + "(" + Printable.text(error) + ")\n"
                }
                var state = r.state
                if r.attempts > 0 { state += ", \(r.attempts) attempt\(r.attempts == 1 ? "" : "s")" }
                if r.state == "deferred" && r.nextAttempt > 0 { state += ", next " + shortTime(r.nextAttempt) }
                out += indent + Printable.text(r.address) + "  [" + state + "]\n"
            }
            out += "\n"
        }
        let kbytes = (total + 1023) / 1024
        out += "-- \(kbytes) Kbytes in \(entries.count) Request\(entries.count == 1 ? "" : "s").\n"
        return out
    }

    /// The envelope of one message, then a blank line; the message follows.
    static func envelope(_ e: QueueEntry) -> String {
        var out = ""
        out += "Queue ID:   \(e.queueID)\(e.held ? " (held)" : "")\n"
        out += "Arrival:    \(longTime(e.arrival))\n"
        out += "Size:       \(e.size)\n"
        out += "Sender:     <\(Printable.text(e.sender))>\n"
        if let envid = e.envid { out += "ENVID:      \(Printable.text(envid))\n" }
        if let ret = e.ret { out += "RET:        \(Printable.text(ret))\n" }
        for r in e.recipients {
            var line = "Recipient:  <\(Printable.text(r.address))> \(Printable.text(r.state))"
            if r.attempts > 0 { line += ", \(r.attempts) attempt\(r.attempts == 1 ? "" : "s")" }
            if r.state == "deferred" && r.nextAttempt > 0 { line += ", next attempt \(longTime(r.nextAttempt))" }
            if let error = r.error { line += ": \(Printable.text(error))" }
            out += line + "\n"
        }
        return out + "\n"
    }

    /// The message with CRLF line ends turned into the local LF and every
    /// control character escaped (Printable), unless raw.
    static func message(_ body: [UInt8], raw: Bool) -> [UInt8] {
        guard !raw else { return body }
        return Printable.message(lineFeeds(body))
    }

    private static func lineFeeds(_ body: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(body.count)
        var i = 0
        while i < body.count {
            if body[i] == 13 && i + 1 < body.count && body[i + 1] == 10 {
                out.append(10)
                i += 2
            } else {
                out.append(body[i])
                i += 1
            }
        }
        return out
    }
}
