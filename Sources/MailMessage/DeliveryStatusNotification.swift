// Delivery status notifications (RFC 3464 in an RFC 6522 multipart/report):
// bounces, delay notices and success notices, built by the queue.
//
// Structure of the result (all line ends CRLF):
//   header: From MAILER-DAEMON, To the original sender, Subject, Date,
//           Message-ID, Auto-Submitted, MIME-Version, Content-Type
//   part 1: text/plain, a human-readable explanation per recipient
//   part 2: message/delivery-status, per-message then per-recipient fields
//   part 3: message/rfc822 (the whole original) or text/rfc822-headers
//
// The machine-readable part is ASCII (message/delivery-status is 7-bit):
// any other byte in a diagnostic becomes "?". When an address in the
// notice is not ASCII (a recipient, its ORCPT, the sender) or the returned
// header section holds UTF-8 fields, the notice takes RFC 6533's global
// form instead, which keeps them: part 2 message/global-delivery-status
// with utf-8 address types, part 3 message/global or
// message/global-headers (RFC 6532 section 3.7), part 1 in UTF-8. The
// returned original keeps its bytes untouched and the parts are labelled
// 8bit when they need that.

public struct DeliveryStatusNotification: Sendable {
    public enum Kind: Sendable, Equatable {
        case failure   // "Undelivered Mail Returned to Sender"
        case delay     // "Delayed Mail (still being retried)"
        case success   // "Successful Mail Delivery Report"
    }

    public enum Action: String, Sendable, Equatable {
        case failed, delayed, delivered, relayed, expanded
    }

    public struct Recipient: Sendable, Equatable {
        public var address: String
        /// ORCPT as received: "rfc822;user@example.org".
        public var orcpt: String?
        public var action: Action
        /// RFC 3463 code, e.g. "5.1.1".
        public var status: String
        /// The peer's reply, or what went wrong locally.
        public var diagnostic: String?
        /// The peer's host name, when one answered.
        public var remoteMTA: String?
        /// Unix time of the last attempt.
        public var lastAttempt: Int?
        /// For delayed recipients: when the queue gives up (Unix time).
        public var willRetryUntil: Int?

        public init(address: String, orcpt: String? = nil, action: Action, status: String,
                    diagnostic: String? = nil, remoteMTA: String? = nil,
                    lastAttempt: Int? = nil, willRetryUntil: Int? = nil) {
            self.address = address; self.orcpt = orcpt; self.action = action; self.status = status
            self.diagnostic = diagnostic; self.remoteMTA = remoteMTA
            self.lastAttempt = lastAttempt; self.willRetryUntil = willRetryUntil
        }
    }

    public var kind: Kind
    /// This host's name: Reporting-MTA and the MAILER-DAEMON address.
    public var reportingMTA: String
    /// The original envelope sender: the notice goes to it.
    public var sender: String
    /// RFC 3461 ENVID of the original message.
    public var envid: String?
    /// RFC 3461 RET: "FULL", "HDRS" or nil (not given). Failures return the
    /// full message unless HDRS; success notices only with FULL; delay
    /// notices always return the headers alone.
    public var ret: String?
    /// Unix time the original arrived.
    public var arrival: Int
    public var recipients: [Recipient]
    /// The original message, CRLF line ends.
    public var originalMessage: [UInt8]
    /// An original larger than this is returned as headers only.
    public var fullMessageLimit: Int

    public init(kind: Kind, reportingMTA: String, sender: String, envid: String? = nil,
                ret: String? = nil, arrival: Int, recipients: [Recipient],
                originalMessage: [UInt8], fullMessageLimit: Int = 1_048_576) {
        self.kind = kind; self.reportingMTA = reportingMTA; self.sender = sender
        self.envid = envid; self.ret = ret; self.arrival = arrival; self.recipients = recipients
        self.originalMessage = originalMessage; self.fullMessageLimit = fullMessageLimit
    }

    public var subject: String {
        switch kind {
        case .failure: return "Undelivered Mail Returned to Sender"
        case .delay: return "Delayed Mail (still being retried)"
        case .success: return "Successful Mail Delivery Report"
        }
    }

    /// Whether the whole original is returned (otherwise its header only).
    public var returnsFullMessage: Bool {
        guard originalMessage.count <= fullMessageLimit else { return false }
        let r = ret?.uppercased()
        switch kind {
        case .failure: return r != "HDRS"
        case .delay: return false
        case .success: return r == "FULL"
        }
    }

    /// The returned original as part 3 carries it: the whole message when
    /// `returnsFullMessage`, else its header section, with the encoding it
    /// needs. The notice goes out through SMTP DATA, which carries 8-bit
    /// lines (with 8BITMIME, or converted to 7 bit for a host without it)
    /// but never binary (a bare CR or LF, NUL, a line over 998 octets: RFC
    /// 3030's BINARYMIME, which Sealpost does not use): a binary original
    /// is returned as its header section, and a binary header section not
    /// at all. nil: nothing is returned.
    var returnedPart: (bytes: [UInt8], full: Bool, encoding: TransferEncoding)? {
        if returnsFullMessage {
            let whole = DeliveryStatusNotification.withFinalLineEnd(originalMessage)
            let encoding = TransferEncoding.of(whole)
            if encoding != .binary { return (whole, true, encoding) }
        }
        let (block, _, _) = HeaderBlock.parse(originalMessage)
        let header = block.serialized()
        let encoding = TransferEncoding.of(header)
        if encoding != .binary { return (header, false, encoding) }
        return nil
    }

    /// The BODY= type (RFC 6152) the notice needs: "8BITMIME" when the
    /// returned original or an address it reports holds 8-bit bytes, else
    /// nil (7 bit).
    public var bodyType: String? {
        returnedPart?.encoding == .eightBit || hasInternationalAddress ? "8BITMIME" : nil
    }

    /// An address the notice reports (a recipient, an ORCPT, the sender)
    /// that is not ASCII.
    var hasInternationalAddress: Bool {
        func international(_ s: String?) -> Bool { s?.utf8.contains { $0 >= 0x80 } ?? false }
        return international(sender) || recipients.contains { international($0.address) || international($0.orcpt) }
    }

    /// Whether the notice takes RFC 6533's global form (see the top of
    /// this file): an international address, or UTF-8 header fields in the
    /// returned original.
    public var isGlobal: Bool {
        if hasInternationalAddress { return true }
        guard let part = returnedPart, part.encoding == .eightBit else { return false }
        let (block, _, _) = HeaderBlock.parse(part.bytes)
        return block.serialized().contains { $0 >= 0x80 }
    }

    /// The complete notification message.
    public func build(unixTime: Int? = nil, messageID: String? = nil, boundary: String? = nil) -> [UInt8] {
        var rng = SystemRandomNumberGenerator()
        let now = unixTime ?? Int(RFC5322Date.currentUnixTime())
        let host = MessageID.domainPart(reportingMTA)
        let mid = messageID ?? MessageID.generate(hostname: host, unixTime: now, using: &rng)

        let part = returnedPart
        let returned = part?.bytes ?? []
        let global = isGlobal
        // 8bit for the whole when a part holds 8-bit bytes: the returned
        // original, or (global) the addresses in parts 1 and 2.
        let encoding: TransferEncoding = part?.encoding == .eightBit || hasInternationalAddress ? .eightBit : .sevenBit
        let address: (String) -> String = { global ? DeliveryStatusNotification.unicode($0) : DeliveryStatusNotification.ascii($0) }

        var sep = boundary ?? DeliveryStatusNotification.newBoundary(host: host, using: &rng)
        while DeliveryStatusNotification.occurs(Array(("--" + sep).utf8), in: returned) {
            sep = DeliveryStatusNotification.newBoundary(host: host, using: &rng)
        }

        var out = ""
        func line(_ s: String) { out += s; out += "\r\n" }
        line("From: MAILER-DAEMON@\(host) (Mail Delivery System)")
        line("To: " + (sender.isEmpty ? "undisclosed-recipients:;" : address(sender)))
        line("Subject: \(subject)")
        line("Date: \(RFC5322Date.format(unixTime: now))")
        line("Message-ID: \(mid)")
        line("Auto-Submitted: auto-replied")
        line("MIME-Version: 1.0")
        // RFC 6522 section 3: report-type names the second part's subtype.
        line("Content-Type: multipart/report; report-type=\(global ? "global-delivery-status" : "delivery-status");")
        line("\tboundary=\"\(sep)\"")
        if encoding != .sevenBit { line("Content-Transfer-Encoding: \(encoding.rawValue)") }
        line("")
        line("This is a MIME-encapsulated message.")
        line("")

        // Part 1: for humans.
        line("--\(sep)")
        line("Content-Description: Notification")
        line("Content-Type: text/plain; charset=\(global ? "utf-8" : "us-ascii")")
        if hasInternationalAddress { line("Content-Transfer-Encoding: 8bit") }
        line("")
        for l in humanText(returned: part.map { $0.full }, address: address) { line(l) }
        line("")

        // Part 2: for machines.
        line("--\(sep)")
        line("Content-Description: Delivery report")
        line("Content-Type: message/\(global ? "global-delivery-status" : "delivery-status")")
        if hasInternationalAddress { line("Content-Transfer-Encoding: 8bit") }
        line("")
        line("Reporting-MTA: dns; \(host)")
        if let envid, !envid.isEmpty { line("Original-Envelope-Id: \(DeliveryStatusNotification.ascii(envid))") }
        line("Arrival-Date: \(RFC5322Date.format(unixTime: arrival))")
        for r in recipients {
            line("")
            if let o = r.orcpt, !o.isEmpty {
                line("Original-Recipient: \(global ? DeliveryStatusNotification.typedGlobal(o) : DeliveryStatusNotification.typed(o))")
            }
            // RFC 6533 section 3: an address that is not ASCII is of type utf-8.
            let international = r.address.utf8.contains { $0 >= 0x80 }
            line("Final-Recipient: \(global && international ? "utf-8" : "rfc822"); \(address(r.address))")
            line("Action: \(r.action.rawValue)")
            line("Status: \(DeliveryStatusNotification.validStatus(r.status, action: r.action))")
            if let m = r.remoteMTA, !m.isEmpty { line("Remote-MTA: dns; \(DeliveryStatusNotification.ascii(m))") }
            if let d = r.diagnostic, !d.isEmpty {
                let type = DeliveryStatusNotification.diagnosticType(d)
                for l in DeliveryStatusNotification.fold("Diagnostic-Code: \(type); " + DeliveryStatusNotification.ascii(d)) { line(l) }
            }
            if let t = r.lastAttempt { line("Last-Attempt-Date: \(RFC5322Date.format(unixTime: t))") }
            if r.action == .delayed, let t = r.willRetryUntil {
                line("Will-Retry-Until: \(RFC5322Date.format(unixTime: t))")
            }
        }
        line("")

        // Part 3: the original, unless not even its header section is
        // fit for mail (see returnedPart).
        var bytes: [UInt8]
        if let part {
            line("--\(sep)")
            if part.full {
                line("Content-Description: Undelivered Message")
                line("Content-Type: message/\(global ? "global" : "rfc822")")
            } else {
                line("Content-Description: Message Headers")
                line("Content-Type: \(global ? "message/global-headers" : "text/rfc822-headers")")
            }
            if part.encoding != .sevenBit { line("Content-Transfer-Encoding: \(part.encoding.rawValue)") }
            line("")
            bytes = Array(out.utf8)
            bytes.append(contentsOf: returned)
        } else {
            bytes = Array(out.utf8)
            bytes.removeLast(2)   // the part before ends at the close delimiter
        }
        // The CRLF before a boundary belongs to the boundary (RFC 2046).
        bytes.append(contentsOf: Array("\r\n--\(sep)--\r\n".utf8))
        return bytes
    }

    /// `returned`: whether the whole message (true) or its header section
    /// (false) is returned, nil for nothing.
    func humanText(returned: Bool?, address: (String) -> String = DeliveryStatusNotification.ascii) -> [String] {
        var t: [String] = []
        t.append("This is the mail system at host \(MessageID.domainPart(reportingMTA)).")
        t.append("")
        switch kind {
        case .failure:
            t.append("Your message could not be delivered to one or more recipients;")
            t.append("this is a permanent error and the system gave up. The reason is")
            t.append("given for each recipient below.")
        case .delay:
            t.append("Your message has not yet been delivered to one or more recipients.")
            t.append("The system keeps trying; you need not send it again. You will be")
            t.append("told if it finally fails.")
        case .success:
            t.append("Your message was delivered to the recipients listed below, as")
            t.append("you asked for a notice of successful delivery.")
        }
        t.append("")
        switch returned {
        case true?:
            t.append("If you need help, forward this notice to your postmaster, including")
            t.append("the returned message.")
        case false?:
            t.append("If you need help, forward this notice to your postmaster, including")
            t.append("the returned message headers.")
        case nil:
            t.append("If you need help, forward this notice to your postmaster.")
        }
        t.append("")
        for r in recipients {
            var what = "<\(address(r.address))>: "
            switch r.action {
            case .failed: what += "delivery failed"
            case .delayed: what += "delivery delayed"
            case .delivered: what += "delivered"
            case .relayed: what += "relayed to a system that sends no further notice"
            case .expanded: what += "delivered, and forwarded to further recipients"
            }
            if let m = r.remoteMTA, !m.isEmpty { what += " (host \(DeliveryStatusNotification.ascii(m)))" }
            t.append(contentsOf: DeliveryStatusNotification.wrap(what, indent: ""))
            if let d = r.diagnostic, !d.isEmpty {
                t.append(contentsOf: DeliveryStatusNotification.wrap(DeliveryStatusNotification.ascii(d), indent: "    "))
            }
            t.append("")
        }
        return t
    }

    // MARK: helpers

    enum TransferEncoding: String {
        case sevenBit = "7bit", eightBit = "8bit", binary = "binary"

        /// 7bit: short lines of ASCII; 8bit: short lines with bytes >= 0x80;
        /// binary: NUL, bare CR or LF, or lines over 998 octets (RFC 2045 2.7-2.9).
        static func of(_ data: [UInt8]) -> TransferEncoding {
            var high = false
            var lineLength = 0
            var i = 0
            while i < data.count {
                let b = data[i]
                if b == 13 {
                    guard i + 1 < data.count, data[i + 1] == 10 else { return .binary }
                    i += 2; lineLength = 0; continue
                }
                if b == 10 || b == 0 { return .binary }
                if b >= 0x80 { high = true }
                lineLength += 1
                if lineLength > 998 { return .binary }
                i += 1
            }
            return high ? .eightBit : .sevenBit
        }
    }

    static func withFinalLineEnd(_ m: [UInt8]) -> [UInt8] {
        if m.isEmpty || m.last == 10 { return m }
        return m + [13, 10]
    }

    static func newBoundary<R: RandomNumberGenerator>(host: String, using rng: inout R) -> String {
        // "=_" cannot occur in base64 or quoted-printable text, and 128
        // random bits make a collision with 8-bit content negligible; the
        // caller still checks.
        let a = String(rng.next() as UInt64, radix: 16, uppercase: true)
        let b = String(rng.next() as UInt64, radix: 16, uppercase: true)
        return "=_sealpost_\(a)\(b)"
    }

    static func occurs(_ needle: [UInt8], in haystack: [UInt8]) -> Bool {
        guard !needle.isEmpty, haystack.count >= needle.count else { return false }
        let first = needle[0]
        var i = 0
        let last = haystack.count - needle.count
        while i <= last {
            if haystack[i] == first {
                var j = 1
                while j < needle.count && haystack[i + j] == needle[j] { j += 1 }
                if j == needle.count { return true }
            }
            i += 1
        }
        return false
    }

    /// ASCII without controls: anything else becomes "?", so that no value
    /// can break a line or smuggle a field into the report.
    static func ascii(_ s: String) -> String {
        var out = ""
        out.unicodeScalars.reserveCapacity(s.unicodeScalars.count)
        for u in s.unicodeScalars {
            if u == "\t" { out += " " } else if u.value >= 32 && u.value < 127 { out.unicodeScalars.append(u) } else { out += "?" }
        }
        return out
    }

    /// RFC 3464 diagnostic-type: "smtp" for a reply from an SMTP/LMTP peer
    /// ("550 5.1.1 ..."), "X-Sealpost" for what went wrong here (a timeout,
    /// a full mailbox), as the registry has no type for local text.
    static func diagnosticType(_ d: String) -> String {
        let u = Array(d.utf8.prefix(4))
        let isReply = u.count >= 3 && u[0] >= 50 && u[0] <= 53 && u[1] >= 48 && u[1] <= 57 && u[2] >= 48 && u[2] <= 57
            && (u.count == 3 || u[3] == 32 || u[3] == 45)
        return isReply ? "smtp" : "X-Sealpost"
    }

    /// `s` with what a header field cannot carry made "?" (controls, C1
    /// controls, DEL; a tab a space), its UTF-8 kept: for the global form.
    static func unicode(_ s: String) -> String {
        var out = ""
        out.unicodeScalars.reserveCapacity(s.unicodeScalars.count)
        for u in s.unicodeScalars {
            if u == "\t" { out += " " } else if u.value < 32 || (0x7F...0x9F).contains(u.value) { out += "?" } else { out.unicodeScalars.append(u) }
        }
        return out
    }

    /// `typed` for the global form: a value that is not ASCII keeps its
    /// UTF-8 as type utf-8 (RFC 6533 section 3), whatever type it came with.
    static func typedGlobal(_ orcpt: String) -> String {
        let clean = unicode(orcpt)
        let semi = clean.firstIndex(of: ";")
        let type = semi.map { clean[..<$0].trimmingSpaces() } ?? "rfc822"
        let value = semi.map { clean[clean.index(after: $0)...].trimmingSpaces() } ?? clean[...].trimmingSpaces()
        return value.utf8.contains { $0 >= 0x80 } ? "utf-8; \(value)" : "\(type); \(value)"
    }

    /// "rfc822;a@b" -> "rfc822; a@b"; a value without a type is rfc822.
    static func typed(_ orcpt: String) -> String {
        let clean = ascii(orcpt)
        guard let semi = clean.firstIndex(of: ";") else { return "rfc822; " + clean }
        let type = clean[..<semi].trimmingSpaces()
        let value = clean[clean.index(after: semi)...].trimmingSpaces()
        return "\(type); \(value)"
    }

    /// "d.d.d" with a class that fits the action (RFC 3464 2.3.3-2.3.4):
    /// delayed takes 4, delivered, relayed and expanded take 2, failed 5
    /// or 4 (given up after transient failures, as at expiry). A valid code
    /// of the other class keeps its subject and detail (a delay after one
    /// MX's 5.7.1 is 4.7.1: a parser would take a 5 for a bounce); an
    /// invalid one becomes the generic code of the action.
    static func validStatus(_ s: String, action: Action) -> String {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        let ok = parts.count == 3 && ["2", "4", "5"].contains(parts[0])
            && parts[1].count >= 1 && parts[1].count <= 3 && parts[2].count >= 1 && parts[2].count <= 3
            && parts.allSatisfy { $0.allSatisfy { $0.isASCII && $0.isNumber } }
        let classes: Set<Substring>
        let generic: String
        switch action {
        case .failed: (classes, generic) = (["5", "4"], "5.0.0")
        case .delayed: (classes, generic) = (["4"], "4.0.0")
        default: (classes, generic) = (["2"], "2.0.0")
        }
        guard ok else { return generic }
        if classes.contains(parts[0]) { return s }
        return generic.prefix(1) + "." + parts[1] + "." + parts[2]
    }

    /// Folds a field at spaces so that no line exceeds 78 characters where
    /// possible (and never 998). A run of spaces at a fold point goes with
    /// the fold, so that no continuation line is white space alone (RFC
    /// 5322 section 3.2.2: a reader may take it for the empty line).
    static func fold(_ field: String) -> [String] {
        var lines: [String] = []
        var current = ""
        for word in field.split(separator: " ", omittingEmptySubsequences: false) {
            if current.isEmpty {
                current = String(word)
            } else if current.count + 1 + word.count > 78 {
                if word.isEmpty { continue }
                lines.append(current)
                current = "\t" + word
            } else {
                current += " " + word
            }
            while current.count > 990 {
                let cut = current.index(current.startIndex, offsetBy: 990)
                lines.append(String(current[..<cut]))
                current = "\t" + current[cut...]
            }
        }
        if !current.isEmpty, !current.allSatisfy({ $0 == "\t" || $0 == " " }) { lines.append(current) }
        return lines
    }

    static func wrap(_ text: String, indent: String) -> [String] {
        fold(text).map { l in indent + (l.hasPrefix("\t") ? "    " + l.dropFirst() : l) }
    }
}

extension Substring {
    func trimmingSpaces() -> String {
        var s = self
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}
