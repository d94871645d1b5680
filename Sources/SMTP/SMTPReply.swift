/// SMTP replies (RFC 5321 section 4.2) with RFC 3463 enhanced status codes
/// (RFC 2034), and their wire rendering, single- and multi-line.
///
/// Every reply the server sends carries an enhanced status code except where
/// the RFCs forbid one: the 220 greeting and the EHLO/HELO reply (RFC 2034
/// section 3: the EHLO reply lists keywords, a code there would be read as
/// one), and the intermediate 3xx replies (354, 334): RFC 3463 defines only
/// the classes 2, 4 and 5.

/// An RFC 3463 enhanced status code, `class.subject.detail`.
public struct EnhancedStatus: Sendable, Hashable, CustomStringConvertible {
    public var codeClass: Int
    public var subject: Int
    public var detail: Int

    public init(_ codeClass: Int, _ subject: Int, _ detail: Int) {
        precondition(codeClass == 2 || codeClass == 4 || codeClass == 5, "RFC 3463 classes are 2, 4 and 5")
        precondition((0...999).contains(subject) && (0...999).contains(detail))
        self.codeClass = codeClass
        self.subject = subject
        self.detail = detail
    }

    /// Parses "4.3.1"; nil when malformed. Every reply the server builds
    /// passes here, so it reads the bytes without splitting strings.
    public init?(parsing text: String) {
        // The two numbers before the dots (-1: not yet), then the third.
        var codeClass = -1, subject = -1
        var value = 0
        var digits = 0
        for byte in text.utf8 {
            if byte == UInt8(ascii: ".") {
                guard digits > 0, subject < 0 else { return nil }
                if codeClass < 0 { codeClass = value } else { subject = value }
                value = 0
                digits = 0
            } else {
                guard (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte), digits < 3 else { return nil }
                value = value * 10 + Int(byte - UInt8(ascii: "0"))
                digits += 1
            }
        }
        guard subject >= 0, digits > 0, codeClass == 2 || codeClass == 4 || codeClass == 5 else { return nil }
        self.init(codeClass, subject, value)
    }

    /// "4.3.1" onto `out`.
    func render(into out: inout [UInt8]) {
        SMTPReply.appendDecimal(codeClass, to: &out)
        out.append(UInt8(ascii: "."))
        SMTPReply.appendDecimal(subject, to: &out)
        out.append(UInt8(ascii: "."))
        SMTPReply.appendDecimal(detail, to: &out)
    }

    public var description: String { "\(codeClass).\(subject).\(detail)" }
}

/// One reply: a three-digit code, an optional enhanced status code and one or
/// more text lines. Text is sanitized on construction: anything but printable
/// ASCII becomes "?", so an echoed client string can never break the framing.
public struct SMTPReply: Sendable, Hashable, CustomStringConvertible {
    public var code: Int
    public var status: EnhancedStatus?
    public var lines: [String]

    public init(_ code: Int, _ status: EnhancedStatus?, _ lines: [String]) {
        precondition((200...599).contains(code), "SMTP reply codes are 2xx-5xx")
        if let status { precondition(status.codeClass == code / 100, "status class must match the reply code") }
        self.code = code
        self.status = status
        let given = lines.isEmpty ? [""] : lines
        // Most replies are the server's own text, clean already: the array
        // is kept rather than copied line by line.
        self.lines = given.allSatisfy(SMTPReply.isClean) ? given : given.map(SMTPReply.sanitize)
    }

    public init(_ code: Int, _ status: EnhancedStatus?, _ text: String) {
        self.init(code, status, [text])
    }

    /// Convenience: `SMTPReply(250, "2.1.0", "Ok")`.
    public init(_ code: Int, _ status: String, _ text: String) {
        guard let parsed = EnhancedStatus(parsing: status) else { preconditionFailure("bad status \(status)") }
        self.init(code, parsed, [text])
    }

    public var isPositive: Bool { code < 400 }
    public var isTemporaryFailure: Bool { (400..<500).contains(code) }
    public var isPermanentFailure: Bool { code >= 500 }

    /// The wire form: "250-first\r\n250 last\r\n", each line prefixed with
    /// the enhanced status code when there is one.
    public var rendered: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(lines.reduce(0) { $0 + $1.utf8.count + 16 })
        for (i, line) in lines.enumerated() {
            Self.appendDecimal(code, to: &out)
            out.append(i == lines.count - 1 ? UInt8(ascii: " ") : UInt8(ascii: "-"))
            if let status {
                status.render(into: &out)
                if !line.isEmpty { out.append(UInt8(ascii: " ")) }
            }
            out.append(contentsOf: line.utf8)
            out.append(13)
            out.append(10)
        }
        return out
    }

    /// A number in decimal (codes and status parts are 0-999: the fast
    /// path; anything else, set on the public fields after `init`, the
    /// slow one).
    static func appendDecimal(_ value: Int, to out: inout [UInt8]) {
        guard (0...999).contains(value) else {
            out.append(contentsOf: String(value).utf8)
            return
        }
        if value >= 100 { out.append(UInt8(ascii: "0") + UInt8(value / 100 % 10)) }
        if value >= 10 { out.append(UInt8(ascii: "0") + UInt8(value / 10 % 10)) }
        out.append(UInt8(ascii: "0") + UInt8(value % 10))
    }

    /// One line for logs: "554 5.7.1 Relay access denied" (lines joined by " / ").
    public var description: String {
        var s = String(code)
        if let status { s += " \(status)" }
        return s + " " + lines.joined(separator: " / ")
    }

    /// What `sanitize` keeps as it is: at most 490 bytes of printable ASCII.
    static func isClean(_ text: String) -> Bool {
        text.utf8.count <= 490 && text.utf8.allSatisfy({ (0x20...0x7E).contains($0) })
    }

    /// Printable ASCII only; at most 500 characters per line (RFC 5321
    /// 4.5.3.1.5 allows 512 octets per reply line including code and CRLF).
    static func sanitize(_ text: String) -> String {
        // Most text is the server's own: already clean, kept as it is.
        if isClean(text) { return text }
        var out = String.UnicodeScalarView()
        for scalar in text.unicodeScalars.prefix(490) {
            out.append((0x20...0x7E).contains(scalar.value) ? scalar : "?")
        }
        return String(out)
    }
}

/// A refusal travels as the reply that states it.
extension SMTPReply: Error {}
