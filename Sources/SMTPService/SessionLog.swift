// Log lines in the form mail administrators know from Postfix's smtpd, so
// that their habits and tools (pflogsumm, grep for "reject:") keep working:
//
//   connect from unknown[192.0.2.1]
//   0123456789AB: client=unknown[192.0.2.1]
//   NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 554 5.7.1 Relay access denied; from=<a@b> to=<x@y> proto=ESMTP helo=<h>
//   lost connection after DATA from unknown[192.0.2.1]
//   timeout after RCPT from unknown[192.0.2.1]
//   disconnect from unknown[192.0.2.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5
//
// The client is "name[address]"; with no DNS yet the name is always
// "unknown", as Postfix writes for a client without a verified name.

import SMTP

enum SessionLog {
    static func client(name: String, address: String) -> String { "\(name)[\(address)]" }

    static func connect(_ client: String) -> String { "connect from \(client)" }

    static func disconnect(_ client: String, counters: SMTPCommandCounters) -> String {
        "disconnect from \(client) \(counters)"
    }

    static func queued(_ queueID: String, client: String, authUser: String?) -> String {
        var line = "\(queueID): client=\(client)"
        if let authUser { line += ", sasl_username=\(printable(authUser))" }
        return line
    }

    /// A refusal. `detail` is the SMTP layer's "from=<a> to=<b> helo=<h>":
    /// proto= goes before helo= as in Postfix: the last "helo=", the
    /// session's own (a quoted local part may hold spaces and "helo=").
    static func reject(command: String, client: String, reply: SMTPReply, detail: String,
                       protocolName: String, queueID: String? = nil) -> String {
        var parts = detail.split(separator: " ").map(String.init)
        let heloIndex = parts.lastIndex { $0.hasPrefix("helo=") }
        let proto = "proto=\(protocolName)"
        if let heloIndex { parts.insert(proto, at: heloIndex) } else if !parts.isEmpty || command != "CONNECT" { parts.append(proto) }
        var line = "\(queueID ?? "NOQUEUE"): reject: \(command) from \(client): \(reply)"
        if !parts.isEmpty { line += "; " + parts.joined(separator: " ") }
        return line
    }

    static func lostConnection(after: String, client: String) -> String {
        "lost connection after \(after) from \(client)"
    }

    static func timeout(after: String, client: String) -> String {
        "timeout after \(after) from \(client)"
    }

    /// The client did not take the session's last reply (or the 220 to
    /// STARTTLS) in time: it stopped reading.
    static func writeTimeout(after: String, client: String) -> String {
        "timeout writing to \(client) after \(after)"
    }

    static func tooManyConnections(_ count: Int, client: String, service: ListenerKind) -> String {
        "Connection concurrency limit exceeded: \(count) from \(client) for service \(service.rawValue)"
    }

    static func tooManySessions(_ limit: Int, client: String, service: ListenerKind) -> String {
        "Session limit \(limit) reached: refused \(client) for service \(service.rawValue)"
    }

    /// Log text from the network: printable ASCII only, bounded.
    static func printable(_ text: String) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.prefix(200).map { (0x20...0x7E).contains($0.value) ? $0 : "?" }))
    }
}
