// What queue-inject does to a message between stdin and the queue, without
// any I/O: normalize line ends (and stop at a "." line unless -i), find the
// header section, complete it, work out the envelope.
//
// The header section is collected first (bounded by `headerLimit`), because
// recipients under -t and the fields to add are only known once it is
// complete; the body then streams through untouched apart from line ends.
//
// Header completion, as sendmail and Postfix do it:
// - prepend "Received: by HOST (Sealpost queue-inject, from userid UID); DATE"
//   (no queue ID: the queue assigns it after this was written);
// - add Date, Message-ID and From when missing, and for a message being
//   re-sent (it has Resent- fields) Resent-Date, Resent-From and
//   Resent-Message-ID when missing; From (and Resent-From) is
//   "Full Name <sender>" with -F, else the account's GECOS name, else bare;
// - remove Bcc and Resent-Bcc, always: they exist to be hidden from the
//   other recipients, with or without -t;
// - a leading "From " line (mbox envelope line) is dropped;
// - a header section that ends without an empty line (a line that is not a
//   field) gets one, so the message stays well-formed; header fields past
//   the size limit are refused (EX_DATAERR), and input that reaches it
//   before any field is all body.

public struct SubmissionContext: Sendable {
    /// This host (Received, Message-ID, default sender domain).
    public var hostname: String
    /// Domain given to addresses without one ("root" -> "root@DOMAIN").
    public var qualifyDomain: String
    /// The invoking user's login name and uid.
    public var loginName: String
    public var uid: UInt32
    /// The account's GECOS full name, if any (raw pw_gecos).
    public var gecos: String?
    /// The time of submission.
    public var unixTime: Int

    public init(hostname: String, qualifyDomain: String, loginName: String, uid: UInt32,
                gecos: String?, unixTime: Int) {
        self.hostname = hostname; self.qualifyDomain = qualifyDomain; self.loginName = loginName
        self.uid = uid; self.gecos = gecos; self.unixTime = unixTime
    }
}

public struct MessageSubmission: Sendable {
    public let options: SendmailOptions
    public let context: SubmissionContext
    /// Most bytes collected as the header section; beyond it the rest is
    /// treated as body (after the last complete line).
    public let headerLimit: Int

    /// The envelope sender ("" for the null sender).
    public let sender: String
    /// Recipients from the command line, parsed and qualified.
    public let commandLineRecipients: [String]
    /// The envelope recipients: known once `isHeaderComplete`.
    public private(set) var recipients: [String] = []
    /// Names of the fields added to the header (for logs and tests).
    public private(set) var addedFields: [String] = []

    public private(set) var isHeaderComplete = false
    /// True after `finish()` or once the "." line was seen.
    public private(set) var isInputComplete = false

    private var normalizer: CRLFNormalizer
    private var headerBuffer: [UInt8] = []
    private var scanPosition = 0
    private var sawField = false
    private var output: [UInt8] = []

    public init(options: SendmailOptions, context: SubmissionContext,
                headerLimit: Int = 1_048_576) throws(SubmissionError) {
        self.options = options
        self.context = context
        self.headerLimit = headerLimit
        self.normalizer = CRLFNormalizer(dotTerminates: !options.ignoreDots)

        if let s = options.sender, !s.isEmpty {
            let spec: String
            do { spec = try AddressList.parseSingle(s) }
            catch { throw SubmissionError(.dataErr, "bad sender address syntax: \(error)") }
            sender = MessageSubmission.qualify(spec, context.hostname)
            if let problem = MessageSubmission.envelopeProblem(sender) {
                throw SubmissionError(.dataErr, "bad sender address: \(problem)")
            }
        } else if let s = options.sender {
            sender = s   // "": the null sender
        } else {
            sender = MessageSubmission.qualify(context.loginName, context.hostname)
        }

        var rcpts: [String] = []
        for arg in options.recipients {
            let list: [String]
            do { list = try AddressList.parse(arg) }
            catch { throw SubmissionError(.dataErr, "bad recipient address syntax: \(error)") }
            rcpts.append(contentsOf: list.map { MessageSubmission.qualify($0, context.qualifyDomain) })
        }
        for r in rcpts {
            if let problem = MessageSubmission.envelopeProblem(r) {
                throw SubmissionError(.dataErr, "bad recipient address: \(problem)")
            }
        }
        commandLineRecipients = MessageSubmission.unique(rcpts)
        if commandLineRecipients.isEmpty && !options.extractRecipients {
            throw SubmissionError(.usage, "no recipients")
        }
    }

    /// The completed header section (Bcc removed) holds bytes above 127:
    /// UTF-8 header fields (RFC 6532). Known once `isHeaderComplete`.
    public private(set) var headerHasEightBit = false

    /// True when the message needs SMTPUTF8: non-ASCII in an address, or
    /// in the header section (RFC 6532: such a message is message/global,
    /// which only an SMTPUTF8 transaction may carry, RFC 6531 section 3.1).
    /// smtp-listen refuses 8-bit header fields without SMTPUTF8; here the
    /// flag is set instead, as Postfix's sendmail does
    /// (smtputf8_autodetect_classes), so that remote-deliver never hands
    /// such a header to a server without SMTPUTF8. Complete with the header.
    public var needsSMTPUTF8: Bool {
        headerHasEightBit || ([sender] + recipients).contains { $0.utf8.contains { $0 >= 0x80 } }
    }

    // MARK: input

    public mutating func feed<C: Collection<UInt8>>(_ chunk: C) throws(SubmissionError) {
        guard !isInputComplete else { return }
        if isHeaderComplete {
            normalizer.feed(chunk, into: &output)
        } else {
            normalizer.feed(chunk, into: &headerBuffer)
            try scanHeader(atEnd: false)
        }
        if normalizer.isTerminated { try finish() }
    }

    /// End of input (EOF on stdin).
    public mutating func finish() throws(SubmissionError) {
        guard !isInputComplete else { return }
        if isHeaderComplete {
            normalizer.finish(into: &output)
        } else {
            normalizer.finish(into: &headerBuffer)
            try scanHeader(atEnd: true)
        }
        isInputComplete = true
    }

    /// The bytes ready to be sent (the completed header once known, then
    /// the body as it arrives); the internal buffer is emptied.
    public mutating func takeOutput() -> [UInt8] {
        let out = output
        output = []
        return out
    }

    /// Bytes held and not yet returned by `takeOutput()`.
    public var bufferedCount: Int { headerBuffer.count + output.count }

    private mutating func scanHeader(atEnd: Bool) throws(SubmissionError) {
        while !isHeaderComplete {
            // A complete line in the normalized buffer ends with LF.
            var lineEnd = scanPosition
            while lineEnd < headerBuffer.count && headerBuffer[lineEnd] != 10 { lineEnd += 1 }
            guard lineEnd < headerBuffer.count else { break }
            lineEnd += 1
            let line = headerBuffer[scanPosition..<lineEnd]
            if scanPosition == 0 && !sawField && line.starts(with: "From ".utf8) {
                headerBuffer.removeSubrange(0..<lineEnd)
                continue
            }
            switch HeaderBlock.classify(line: line, afterField: sawField) {
            case .empty:
                try completeHeader(headerEnd: scanPosition, bodyStart: lineEnd)
            case .other:
                try completeHeader(headerEnd: scanPosition, bodyStart: scanPosition)
            case .field, .continuation:
                sawField = true
                scanPosition = lineEnd
            }
        }
        if !isHeaderComplete {
            if atEnd {
                // Only header fields (or nothing at all): no body.
                try completeHeader(headerEnd: scanPosition, bodyStart: headerBuffer.count)
            } else if headerBuffer.count > headerLimit {
                // Past the limit inside header fields: refused. Ending the
                // header section here would move the fields after the limit
                // into the body, a Bcc: field where every recipient reads
                // it, and -t would not see their recipients.
                guard !sawField else {
                    throw SubmissionError(.dataErr, "the header section is over \(headerLimit) bytes")
                }
                try completeHeader(headerEnd: scanPosition, bodyStart: scanPosition)
            }
        }
    }

    private mutating func completeHeader(headerEnd: Int, bodyStart: Int) throws(SubmissionError) {
        var (block, _, _) = HeaderBlock.parse(headerBuffer[0..<headerEnd])

        if options.extractRecipients {
            recipients = try extractRecipients(block)
            if recipients.isEmpty {
                throw SubmissionError(.usage, "no recipients: none in the message header (To, Cc, Bcc) beyond those on the command line")
            }
        } else {
            recipients = commandLineRecipients
        }

        // Decided before the Bcc fields go: a message re-sent to
        // Resent-Bcc alone is re-sent all the same.
        let resent = OriginatorFields.isResent(block)
        block.removeAll("Bcc")
        block.removeAll("Resent-Bcc")
        let date = RFC5322Date.format(unixTime: context.unixTime)
        // The originator fields when missing, and for a message being
        // re-sent the resent ones too, as Postfix's cleanup adds them.
        addedFields += OriginatorFields.addMissing(to: &block, resent: resent, from: { fromValue() },
                                                   hostname: context.hostname, unixTime: context.unixTime)
        block.prepend("Received", "by \(MessageID.domainPart(context.hostname)) (Sealpost queue-inject, from userid \(context.uid)); \(date)")

        let header = block.serialized()
        // The header that leaves: a UTF-8 name in a Bcc field, removed
        // above, asks for nothing.
        headerHasEightBit = header.contains { $0 >= 0x80 }
        output.append(contentsOf: header)
        output.append(contentsOf: [13, 10])
        output.append(contentsOf: headerBuffer[bodyStart...])
        headerBuffer = []
        isHeaderComplete = true
    }

    /// -t: To, Cc, Bcc (or Resent-To, Resent-Cc, Resent-Bcc when any Resent-
    /// recipient field is present: the message is being re-sent), minus the
    /// command-line recipients.
    func extractRecipients(_ block: HeaderBlock) throws(SubmissionError) -> [String] {
        let resent = ["Resent-To", "Resent-Cc", "Resent-Bcc"]
        let names = resent.contains(where: { block.contains($0) }) ? resent : ["To", "Cc", "Bcc"]
        var found: [String] = []
        for f in block.fields where names.contains(where: { f.hasName($0) }) {
            do {
                found.append(contentsOf: try AddressList.parse(f.value).map {
                    MessageSubmission.qualify($0, context.qualifyDomain)
                })
            } catch {
                throw SubmissionError(.dataErr, "bad address syntax in \(f.name): header: \(error)")
            }
        }
        for r in found {
            if let problem = MessageSubmission.envelopeProblem(r) {
                throw SubmissionError(.dataErr, "bad address in the message header: \(problem)")
            }
        }
        let excluded = Set(commandLineRecipients.map(MessageSubmission.key))
        return MessageSubmission.unique(found).filter { !excluded.contains(MessageSubmission.key($0)) }
    }

    func fromValue() -> String {
        let address = sender.isEmpty ? MessageSubmission.qualify(context.loginName, context.hostname) : sender
        let name = options.fullName ?? context.gecos.map { MessageSubmission.gecosName($0, login: context.loginName) }
        guard let name, !name.isEmpty else { return address }
        return "\(Phrase.encode(name)) <\(address)>"
    }

    // MARK: helpers

    /// Why an address cannot go into an envelope, or nil. The parser lets
    /// control characters through quoted strings (obs-qtext) and has no
    /// length limit; an envelope must have neither (RFC 5321 4.5.3.1.3:
    /// 256 octets for a path; we allow a little slack, not megabytes).
    static func envelopeProblem(_ address: String) -> String? {
        if address.utf8.count > 320 { return "longer than 320 bytes" }
        if address.utf8.contains(where: { $0 < 32 || $0 == 127 }) {
            return "control character in \"\(DeliveryStatusNotification.ascii(address))\""
        }
        return nil
    }

    static func qualify(_ address: String, _ domain: String) -> String {
        AddressList.split(address).domain == nil ? address + "@" + domain : address
    }

    /// Comparison key: the local part as is (it may be case-sensitive), the
    /// domain lower-cased.
    static func key(_ address: String) -> String {
        let (local, domain) = AddressList.split(address)
        return local + "@" + (domain ?? "").lowercased()
    }

    static func unique(_ list: [String]) -> [String] {
        var seen = Set<String>()
        return list.filter { seen.insert(key($0)).inserted }
    }

    /// The full name in a GECOS field: up to the first comma, "&" standing
    /// for the capitalized login name (the BSD convention).
    static func gecosName(_ gecos: String, login: String) -> String {
        let first = gecos.split(separator: ",", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        let cap = login.prefix(1).uppercased() + login.dropFirst()
        return Substring(first.replacingAll("&", with: cap)).trimmingSpaces()
    }
}

extension String {
    func replacingAll(_ c: Character, with s: String) -> String {
        var out = ""
        for ch in self { if ch == c { out += s } else { out.append(ch) } }
        return out
    }
}

/// A display name as an RFC 5322 phrase: atoms as they are, a quoted string
/// when specials occur, an RFC 2047 encoded word when non-ASCII occurs.
enum Phrase {
    static func encode(_ name: String) -> String {
        let clean = name.unicodeScalars.filter { $0.value >= 32 && $0.value != 127 }
        let text = String(String.UnicodeScalarView(clean))
        if text.unicodeScalars.contains(where: { $0.value >= 128 }) {
            // encoded-words are at most 75 characters: split the UTF-8 at
            // character boundaries into pieces of up to 45 bytes (60 base64).
            var words: [String] = []
            var piece: [UInt8] = []
            for ch in text {
                let bytes = Array(String(ch).utf8)
                if piece.count + bytes.count > 45 { words.append(word(piece)); piece = [] }
                piece.append(contentsOf: bytes)
            }
            if !piece.isEmpty { words.append(word(piece)) }
            return words.joined(separator: " ")
        }
        let isAtomText = text.utf8.allSatisfy { Lexer.isAtext($0) || $0 == 32 }
        if isAtomText && !text.isEmpty && !text.hasPrefix(" ") && !text.hasSuffix(" ") { return text }
        var out = "\""
        for u in text.unicodeScalars {
            if u == "\"" || u == "\\" { out += "\\" }
            out.unicodeScalars.append(u)
        }
        return out + "\""
    }

    static func word(_ bytes: [UInt8]) -> String { "=?UTF-8?B?" + base64(bytes) + "?=" }

    static func base64(_ bytes: [UInt8]) -> String {
        let table = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let b0 = UInt32(bytes[i])
            let b1 = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0
            let b2 = i + 2 < bytes.count ? UInt32(bytes[i + 2]) : 0
            let v = b0 << 16 | b1 << 8 | b2
            out.append(table[Int(v >> 18 & 63)])
            out.append(table[Int(v >> 12 & 63)])
            out.append(i + 1 < bytes.count ? table[Int(v >> 6 & 63)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? table[Int(v & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
}
