// Completing the header section of a locally submitted message: the
// originator fields RFC 5322 section 3.6 requires (From, Date; Message-ID,
// which it recommends and every receiver's spam filter expects), added
// when missing, as Postfix's cleanup adds them for local submissions
// (sendmail, and sendmail -bs). queue-inject's normal mode completes the
// whole header at once (MessageSubmission); `sendmail -bs` streams an SMTP
// session's message data through `StreamingHeaderCompletion`.

public enum OriginatorFields {
    /// Adds From, Date and Message-ID when `block` has none, and for a
    /// message being re-sent (`resent`: it has Resent- fields, RFC 5322
    /// section 3.6.6) Resent-From, Resent-Date and Resent-Message-ID too.
    /// Returns the names added, in order.
    @discardableResult
    public static func addMissing(to block: inout HeaderBlock, resent: Bool, from: () -> String,
                                  hostname: String, unixTime: Int) -> [String] {
        var added: [String] = []
        let date = RFC5322Date.format(unixTime: unixTime)
        func addIfMissing(_ name: String, _ value: () -> String) {
            guard !block.contains(name) else { return }
            block.append(name, value())
            added.append(name)
        }
        for prefix in resent ? ["", "Resent-"] : [""] {
            addIfMissing(prefix + "From", from)
            addIfMissing(prefix + "Date") { date }
            addIfMissing(prefix + "Message-ID") {
                var rng = SystemRandomNumberGenerator()
                return MessageID.generate(hostname: hostname, unixTime: unixTime, using: &rng)
            }
        }
        return added
    }

    /// Whether `block` has Resent- fields: the message is being re-sent.
    public static func isResent(_ block: HeaderBlock) -> Bool {
        block.fields.contains { $0.name.lowercased().hasPrefix("resent-") }
    }
}

/// The header section of message data that streams through in CRLF lines
/// (SMTP message content, dot-unstuffed), completed by `complete` once its
/// end is seen: the empty line, a line that is no header field (the
/// completed header then gets the empty line the message lacked), or the
/// end of the data. The bytes before that are held; past `limit` bytes of
/// header fields they go on unchanged (a header that large is left as the
/// client wrote it rather than refused).
public struct StreamingHeaderCompletion {
    public let limit: Int
    private let complete: (inout HeaderBlock) -> Void
    private var held: [UInt8] = []
    private var scanned = 0
    private var sawField = false
    /// The header's end was found (or given up on): the rest streams through.
    public private(set) var isDone = false

    public init(limit: Int = 262_144, complete: @escaping (inout HeaderBlock) -> Void) {
        self.limit = limit
        self.complete = complete
    }

    /// The bytes that may go on now.
    public mutating func feed(_ bytes: some Collection<UInt8>) -> [UInt8] {
        if isDone { return Array(bytes) }
        held.append(contentsOf: bytes)
        while !isDone {
            guard let lf = held[scanned...].firstIndex(of: 10) else {
                if held.count > limit { return passThrough() }
                return []
            }
            let line = held[scanned...lf]
            switch HeaderBlock.classify(line: line, afterField: sawField) {
            case .empty:
                return completed(headerEnd: scanned, bodyStart: lf + 1)
            case .other:
                return completed(headerEnd: scanned, bodyStart: scanned)
            case .field, .continuation:
                sawField = true
                scanned = lf + 1
                if scanned > limit { return passThrough() }
            }
        }
        return []
    }

    /// The end of the data: what is still held, completed (a message of
    /// header fields alone, or nothing).
    public mutating func finish() -> [UInt8] {
        if isDone { return [] }
        // A last line without its CRLF (BDAT content may end so) is a
        // field or the start of a body.
        if scanned < held.count {
            let rest = held[scanned...]
            if case .field = HeaderBlock.classify(line: rest, afterField: sawField) {
                held += [13, 10]
                scanned = held.count
            } else if case .continuation = HeaderBlock.classify(line: rest, afterField: sawField) {
                held += [13, 10]
                scanned = held.count
            }
        }
        return completed(headerEnd: scanned, bodyStart: scanned)
    }

    private mutating func completed(headerEnd: Int, bodyStart: Int) -> [UInt8] {
        var (block, _, _) = HeaderBlock.parse(held[0..<headerEnd])
        complete(&block)
        var out = block.serialized()
        out += [13, 10]
        out.append(contentsOf: held[bodyStart...])
        held = []
        isDone = true
        return out
    }

    private mutating func passThrough() -> [UInt8] {
        let out = held
        held = []
        isDone = true
        return out
    }
}
