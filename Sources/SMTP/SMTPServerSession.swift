/// The ESMTP server protocol (RFC 5321) as a state machine with no I/O.
///
/// The I/O layer (smtp-listen) feeds it bytes and performs the actions it
/// returns, in order:
///
///     var session = SMTPServerSession(policy: policy, client: client)
///     write(session.start())                        // 220 greeting
///     on bytes:    perform(session.receive(bytes))
///     .endMessage: commit; perform(session.messageCommitted(queueID:))
///                  or perform(session.messageFailed(.full))
///     .authenticate(c): check; perform(session.authResult(.success))
///     .startTLS:   hand the socket to TLS; perform(session.tlsEstablished())
///     on EOF:      perform(session.disconnected()); log session.counters
///
/// Input discipline (issue item 4): only CRLF ends a line; a command line
/// with a bare CR or LF, or a NUL, is refused with 500 5.5.2 (a bare LF ends
/// the bad line, so the next command is read in sync); over-long lines
/// (512 octets, 12288 for AUTH) get 500 5.5.2 after being skipped to their
/// end. DATA ends only at <CRLF>.<CRLF> (see SMTPMessageDecoder.swift).
///
/// Pipelining (RFC 2920): commands are handled strictly in order, one reply
/// each, in order. While the machine waits for the queue (end of data) or
/// for a password check, further input is buffered, not interpreted, and is
/// processed when the answer arrives. After STARTTLS, everything the client
/// sent in the same flight is discarded (CVE-2011-0411) and the session
/// returns to the state before EHLO (RFC 3207 section 4.2).
public struct SMTPServerSession: Sendable {
    public let policy: SMTPServerPolicy
    public private(set) var client: SMTPClientInfo
    public private(set) var counters = SMTPCommandCounters()
    public private(set) var authenticatedUser: String?
    public private(set) var tlsActive: Bool
    /// The EHLO/HELO argument, nil before EHLO/HELO (and after STARTTLS).
    public private(set) var heloName: String?
    /// EHLO (true) or HELO (false) was used.
    public private(set) var extended = false
    /// Error replies so far (the session closes at `policy.maxErrors`).
    public private(set) var errorCount = 0
    /// NOOP, RSET, VRFY and HELP since the session began or since the last
    /// message was queued (see `SMTPServerPolicy.maxJunkCommands`).
    private var junkCommands = 0

    enum AuthStep: Sendable, Equatable {
        case plain
        case loginUser
        case loginPassword(user: String)
    }

    enum ChunkDisposition: Sendable, Equatable {
        case accept
        case discard(SMTPReply)
    }

    enum Phase: Sendable, Equatable {
        case beforeGreeting
        case command
        case authResponse(AuthStep)
        case data
        case bdat(remaining: UInt64, size: UInt64, last: Bool, disposition: ChunkDisposition)
        case waitingForQueue
        case waitingForAuth(user: String, mechanism: String)
        case tlsHandshake
        case closed
    }

    struct Transaction: Sendable {
        var sender: SMTPPath
        var parameters: SMTPMailParameters
        var recipients: [SMTPRecipient] = []
        var mode: SMTPTransferMode?
        /// `.beginMessage` was emitted and neither `.endMessage` nor
        /// `.abortMessage` yet.
        var messageOpen = false
        var dot: DotDecoder?
        var chunk: ChunkDecoder?
    }

    private(set) var phase: Phase = .beforeGreeting {
        didSet {
            isClosed = phase == .closed
            switch phase {
            case .data, .bdat: readsMessageData = true
            default: readsMessageData = false
            }
        }
    }
    private var transaction: Transaction?
    private var input: [UInt8] = []
    private var output: [SMTPAction] = []
    private var dataBuffer: [UInt8] = []
    private var spokeEarly = false
    private var discardingLongLine = false
    /// How far `nextLine` scanned the partial line that starts `input`
    /// when it last needed more input, and what it saw there: the next
    /// read goes on from there instead of scanning the line again from its
    /// start (a 12 KiB AUTH line sent a byte at a time cost a quadratic
    /// scan). Only ever for the line at index 0, where `run` leaves it.
    private var partialLine: (scanned: Int, bareCR: Bool, nul: Bool)?
    private var inputOverflow = false

    public init(policy: SMTPServerPolicy, client: SMTPClientInfo) {
        self.policy = policy
        self.client = client
        self.tlsActive = client.tlsActive
    }

    // MARK: - Public interface

    /// True while the I/O layer should keep reading: false once closed, during
    /// the TLS hand-off, or when too much input is buffered while a decision
    /// is pending (back-pressure instead of unbounded buffering).
    public var wantsInput: Bool {
        switch phase {
        case .closed, .tlsHandshake: return false
        case .waitingForQueue, .waitingForAuth: return input.count < policy.maxPendingInput
        default: return true
        }
    }

    /// `phase == .closed`, stored: the I/O layer asks after every batch of
    /// input, and a stored property is read in place, where a computed one
    /// across the module boundary costs a copy of the whole session.
    public private(set) var isClosed = false
    /// Whether the bytes awaited are message data (after DATA, or inside a
    /// BDAT chunk), for the data block timeout; between BDAT chunks the
    /// client owes a command. Stored, as `isClosed` is.
    public private(set) var readsMessageData = false

    /// The 220 greeting of a server named `hostname` (`start` sends it).
    public static func greeting(hostname: String, softwareName: String) -> SMTPReply {
        SMTPReply(220, nil, "\(hostname) ESMTP \(softwareName)")
    }

    /// The greeting delay ended without a word from the client: send 220.
    /// If the client spoke first (`clientSpokeEarly()` or bytes passed to
    /// `receive` before this call), answer 554 5.5.0 and close.
    public mutating func start() -> [SMTPAction] {
        guard phase == .beforeGreeting else { return [] }
        if spokeEarly {
            let reply = SMTPReply(554, "5.5.0", "\(policy.hostname) Protocol error: client spoke before the greeting")
            output.append(.log(.rejected(command: "CONNECT", reply: reply, detail: "")))
            output.append(.reply(reply))
            close()
        } else {
            output.append(.reply(Self.greeting(hostname: policy.hostname, softwareName: policy.softwareName)))
            phase = .command
        }
        return take()
    }

    /// The client's verified name (forward-confirmed reverse DNS), known
    /// during the greeting delay; it goes into the Received header. Ignored
    /// after the greeting.
    public mutating func clientNameResolved(_ hostname: String?) {
        if phase == .beforeGreeting { client.hostname = hostname }
    }

    /// The I/O layer saw client bytes during the greeting delay.
    public mutating func clientSpokeEarly() {
        if phase == .beforeGreeting { spokeEarly = true }
    }

    /// Feeds bytes from the client.
    public mutating func receive<C: Collection<UInt8>>(_ bytes: C) -> [SMTPAction] {
        feed(bytes)
    }

    /// Feeds bytes from the client: what the I/O layer calls with the
    /// bytes of each read. Not generic, so that the code that appends them
    /// is specialized here: called across the module boundary, the generic
    /// form runs the unspecialized `Array.append(contentsOf:)` (about 1,200
    /// instructions a call, a quarter of the work of a short command).
    public mutating func receive(_ bytes: UnsafeRawBufferPointer) -> [SMTPAction] {
        feed(bytes)
    }

    @inline(__always)
    private mutating func feed<C: Collection<UInt8>>(_ bytes: C) -> [SMTPAction] {
        switch phase {
        case .closed:
            return []
        case .beforeGreeting:
            if !bytes.isEmpty { spokeEarly = true }
            return []
        case .tlsHandshake:
            if !bytes.isEmpty { output.append(.log(.discardedAfterSTARTTLS(bytes: bytes.count))) }
            return take()
        case .waitingForQueue, .waitingForAuth:
            if input.count + bytes.count > policy.maxPendingInput * 4 {
                inputOverflow = true
            } else {
                input.append(contentsOf: bytes)
            }
            return []
        default:
            input.append(contentsOf: bytes)
            run()
            return take()
        }
    }

    /// The queue committed the message: 250 with the queue ID.
    public mutating func messageCommitted(queueID: String) -> [SMTPAction] {
        guard phase == .waitingForQueue else { return [] }
        let command = transaction?.mode == .bdat ? "BDAT" : "DATA"
        transaction = nil
        phase = .command
        junkCommands = 0
        respond(command, SMTPReply(250, "2.0.0", "Ok: queued as \(queueID)"))
        return resume()
    }

    /// The queue did not take the message: 451 4.3.0, 452 4.3.1 or its reply.
    public mutating func messageFailed(_ failure: SMTPQueueFailure) -> [SMTPAction] {
        guard phase == .waitingForQueue else { return [] }
        let command = transaction?.mode == .bdat ? "BDAT" : "DATA"
        let detail = envelopeDetail()
        transaction = nil
        phase = .command
        respond(command, failure.reply, countsAsError: false, detail: detail)
        return resume()
    }

    /// The answer to `.authenticate`.
    public mutating func authResult(_ result: SMTPAuthResult) -> [SMTPAction] {
        guard case .waitingForAuth(let user, let mechanism) = phase else { return [] }
        phase = .command
        switch result {
        case .success:
            authenticatedUser = user
            output.append(.log(.authenticated(user: user, mechanism: mechanism)))
            respond("AUTH", SMTPReply(235, "2.7.0", "Authentication successful"))
        case .failure:
            output.append(.log(.authenticationFailed(user: user, mechanism: mechanism)))
            respond("AUTH", SMTPReply(535, "5.7.8", "Authentication credentials invalid"))
        case .temporaryFailure:
            respond("AUTH", SMTPReply(454, "4.7.0", "Temporary authentication failure"), countsAsError: false)
        }
        return resume()
    }

    /// The TLS hand-off succeeded. The session forgets everything learned
    /// before (RFC 3207 4.2): the client must send EHLO again.
    public mutating func tlsEstablished() -> [SMTPAction] {
        guard phase == .tlsHandshake else { return [] }
        tlsActive = true
        client.tlsActive = true
        heloName = nil
        extended = false
        authenticatedUser = nil
        transaction = nil
        input.removeAll()
        partialLine = nil
        discardingLongLine = false
        phase = .command
        return take()
    }

    /// The TLS handshake failed: nothing more can be said in clear text.
    public mutating func tlsFailed() -> [SMTPAction] {
        guard phase == .tlsHandshake else { return [] }
        close()
        return take()
    }

    /// The connection is gone (EOF, error, timeout): abort a message in
    /// progress. The counters are then final.
    public mutating func disconnected() -> [SMTPAction] {
        if phase != .closed { close() }
        return take()
    }

    /// For the I/O layer's own replies (e.g. 421 on timeout or shutdown):
    /// sends the reply, aborts a message in progress and closes.
    public mutating func shutdown(_ reply: SMTPReply) -> [SMTPAction] {
        guard phase != .closed else { return [] }
        output.append(.reply(reply))
        close()
        return take()
    }

    /// The extensions the EHLO reply advertises now.
    public var offeredExtensions: SMTPExtensions {
        guard extended else { return [] }
        var e = policy.extensions
        if !(policy.tlsAvailable && !tlsActive) { e.remove(.startTLS) }
        if !authAvailableNow { e.remove(.auth) }
        if !tlsActive { e.remove(.requireTLS) }
        return e
    }

    /// RFC 3848 / RFC 6531 protocol name for Received and the queue.
    public var protocolName: String {
        guard extended else { return "SMTP" }
        var name = transaction?.parameters.smtputf8 == true ? "UTF8SMTP" : "ESMTP"
        if tlsActive { name += "S" }
        if authenticatedUser != nil { name += "A" }
        return name
    }

    // MARK: - Engine

    private var authAvailableNow: Bool {
        guard policy.extensions.contains(.auth) else { return false }
        switch policy.auth {
        case .never: return false
        case .always: return true
        case .afterTLS: return tlsActive
        }
    }

    private mutating func take() -> [SMTPAction] {
        defer { output = [] }
        return output
    }

    private mutating func resume() -> [SMTPAction] {
        if inputOverflow {
            inputOverflow = false
            let reply = SMTPReply(421, "4.7.0", "\(policy.hostname) Too much pipelined input, closing connection")
            output.append(.log(.rejected(command: "PIPELINING", reply: reply, detail: "")))
            output.append(.reply(reply))
            close()
            return take()
        }
        run()
        return take()
    }

    private mutating func run() {
        var pos = 0
        loop: while true {
            switch phase {
            case .command, .authResponse:
                guard let line = nextLine(&pos) else { break loop }
                handle(line)
            case .data:
                let limit = min(input.count, pos + max(1, policy.messageChunkSize))
                guard pos < input.count else { break loop }
                let (next, ended) = transaction!.dot!.decode(input, from: pos, upTo: limit, into: &dataBuffer)
                pos = next
                noteViolation()
                // At most messageChunkSize input octets were decoded, so the
                // chunk handed out is never larger than that.
                flushData(force: true)
                if ended { finishData() }
            case .bdat(let remaining, let size, let last, let disposition):
                let available = UInt64(input.count - pos)
                let n = Int(min(available, remaining, UInt64(max(1, policy.messageChunkSize))))
                if n > 0, disposition == .accept {
                    transaction!.chunk!.decode(input[pos..<(pos + n)], into: &dataBuffer)
                    noteViolation()
                    flushData(force: true)
                }
                pos += n
                let left = remaining - UInt64(n)
                if left == 0 {
                    finishChunk(size: size, last: last, disposition: disposition)
                } else {
                    phase = .bdat(remaining: left, size: size, last: last, disposition: disposition)
                    if pos == input.count { break loop }
                }
            case .beforeGreeting, .waitingForQueue, .waitingForAuth, .tlsHandshake, .closed:
                break loop
            }
        }
        switch phase {
        case .tlsHandshake:
            let left = input.count - pos
            if left > 0 { output.append(.log(.discardedAfterSTARTTLS(bytes: left))) }
            input.removeAll()
            partialLine = nil
        case .closed:
            input.removeAll()
            partialLine = nil
        default:
            input.removeFirst(pos)
        }
        flushData(force: true)
    }

    enum LineResult {
        case line(ArraySlice<UInt8>)
        case bad(SMTPReply)
    }

    static let lineTooLong = SMTPReply(500, "5.5.2", "Line too long")
    static let bareLineEnd = SMTPReply(500, "5.5.2", "Bare CR or LF in command line")
    static let nulInLine = SMTPReply(500, "5.5.2", "NUL in command line")
    static let nulInArguments = SMTPReply(501, "5.5.4", "NUL in command arguments")

    /// The next CRLF-terminated line from `input[pos...]`, or nil when more
    /// input is needed (then an over-long partial line is dropped).
    private mutating func nextLine(_ pos: inout Int) -> LineResult? {
        let limit = lineLimit(at: pos)
        var i = pos
        var bareCR = false
        var nul = false
        let n = input.count
        if pos == 0, let resume = partialLine, resume.scanned <= n {
            (i, bareCR, nul) = resume
        }
        partialLine = nil
        while i < n {
            let b = input[i]
            if b == 10 {
                // A bare LF ends the (bad) line: resynchronise on it.
                let wasDiscarding = discardingLongLine
                discardingLongLine = false
                pos = i + 1
                return .bad(wasDiscarding ? Self.lineTooLong : Self.bareLineEnd)
            }
            if b == 13 {
                guard i + 1 < n else { break }
                if input[i + 1] == 10 {
                    let line = input[pos..<i]
                    pos = i + 2
                    if discardingLongLine || line.count + 2 > limit {
                        discardingLongLine = false
                        return .bad(Self.lineTooLong)
                    }
                    if bareCR { return .bad(Self.bareLineEnd) }
                    if nul {
                        // In MAIL or RCPT the NUL is in an address or a
                        // parameter (ENVID=, ORCPT=, AUTH=): a syntax error
                        // in its arguments, 501, as the xtext forms get.
                        if line.count >= 5, Self.verb(line.prefix(5)).map({ $0 != .auth }) == true {
                            return .bad(Self.nulInArguments)
                        }
                        return .bad(Self.nulInLine)
                    }
                    return .line(line)
                }
                bareCR = true
            } else if b == 0 {
                nul = true
            }
            i += 1
        }
        if n - pos >= limit {
            // Cannot become a valid line: drop it, keeping a final CR that
            // may start the CRLF, and answer once the line ends.
            discardingLongLine = true
            pos = input[n - 1] == 13 ? n - 1 : n
        } else {
            // `run` moves the partial line to the start of `input`.
            partialLine = (i - pos, bareCR, nul)
        }
        return nil
    }

    /// What the service extensions add to the limit of a MAIL command line
    /// (RFC 5321 section 4.5.3.1.4 lets each extension raise it): SIZE 26
    /// (RFC 1870 section 5), RET and ENVID 100 (RFC 3461 section 4), AUTH=
    /// 500 (RFC 4954 section 5), SMTPUTF8 10 (RFC 6531 section 3.4),
    /// BODY=8BITMIME 15 and REQUIRETLS 11, which their RFCs leave uncounted.
    static let mailParameterAllowance = 26 + 100 + 500 + 10 + 15 + 11
    /// And to a RCPT command line: NOTIFY and ORCPT 500 (RFC 3461 section 4).
    static let rcptParameterAllowance = 500

    private func lineLimit(at pos: Int) -> Int {
        if case .authResponse = phase { return policy.authLineLimit }
        if input.count - pos >= 5 {
            switch Self.verb(input[pos..<(pos + 5)]) {
            case .auth: return max(policy.commandLineLimit, policy.authLineLimit)
            case .mail: return policy.commandLineLimit + Self.mailParameterAllowance
            case .rcpt: return policy.commandLineLimit + Self.rcptParameterAllowance
            case nil: break
            }
        }
        return policy.commandLineLimit
    }

    private enum LongVerb { case auth, mail, rcpt }

    /// The verbs whose lines may be longer, by the line's first five bytes.
    private static func verb(_ head: ArraySlice<UInt8>) -> LongVerb? {
        let p = head.map(asciiUpper)
        if p == Array("AUTH ".utf8) { return .auth }
        if p == Array("MAIL ".utf8) { return .mail }
        if p == Array("RCPT ".utf8) { return .rcpt }
        return nil
    }

    private mutating func handle(_ line: LineResult) {
        switch line {
        case .bad(let reply):
            if case .authResponse = phase {
                phase = .command
                respond("AUTH", reply)
            } else {
                respond("UNKNOWN", reply)
            }
        case .line(let bytes):
            if case .authResponse(let step) = phase {
                authResponse(bytes, step)
            } else {
                command(bytes)
            }
        }
    }

    /// Sends a final reply to a command, counts it, logs refusals, and
    /// closes after too many errors.
    private mutating func respond(_ command: String, _ reply: SMTPReply, countsAsError: Bool = true, detail: String? = nil) {
        counters.record(command, success: reply.code < 400)
        if reply.code >= 400 {
            output.append(.log(.rejected(command: command, reply: reply, detail: detail ?? envelopeDetail())))
        }
        output.append(.reply(reply))
        if reply.code >= 400 && countsAsError { countError() }
    }

    private mutating func countError() {
        errorCount += 1
        if errorCount >= policy.maxErrors, phase != .closed {
            let r = SMTPReply(421, "4.7.0", "\(policy.hostname) Error: too many errors")
            output.append(.log(.rejected(command: "SESSION", reply: r, detail: "")))
            output.append(.reply(r))
            close()
        }
    }

    /// A reply to NOOP, RSET, VRFY or HELP: past the junk command limit
    /// each counts as an error too, whatever its reply.
    private mutating func respondToJunk(_ command: String, _ reply: SMTPReply) {
        respond(command, reply)
        junkCommands += 1
        if junkCommands > policy.maxJunkCommands, reply.code < 400 { countError() }
    }

    private mutating func intermediate(_ code: Int, _ text: String) {
        output.append(.reply(SMTPReply(code, nil, text)))
    }

    private func envelopeDetail(recipient: SMTPPath? = nil) -> String {
        var parts: [String] = []
        if let t = transaction { parts.append("from=\(t.sender)") }
        if let recipient { parts.append("to=\(recipient)") }
        if let h = heloName { parts.append("helo=<\(h)>") }
        return parts.joined(separator: " ")
    }

    private mutating func close() {
        abortOpenMessage(SMTPReply(451, "4.3.0", "Connection closed"))
        dataBuffer.removeAll()
        output.append(.close)
        phase = .closed
        input.removeAll()
        partialLine = nil
    }

    private mutating func abortOpenMessage(_ reply: SMTPReply) {
        if transaction?.messageOpen == true {
            dataBuffer.removeAll()
            output.append(.abortMessage(reply))
            transaction?.messageOpen = false
        }
    }

    private mutating func resetTransaction() {
        abortOpenMessage(SMTPReply(451, "4.3.0", "Transaction reset"))
        transaction = nil
    }

    // MARK: - Message content

    private mutating func flushData(force: Bool) {
        guard !dataBuffer.isEmpty, force || dataBuffer.count >= policy.messageChunkSize else { return }
        output.append(.messageData(dataBuffer))
        dataBuffer.removeAll(keepingCapacity: true)
    }

    private var currentChecker: ContentChecker? {
        transaction?.dot?.checker ?? transaction?.chunk?.checker
    }

    /// Emits `.abortMessage` as soon as the content is known to be refused.
    private mutating func noteViolation() {
        guard let v = currentChecker?.violation, transaction?.messageOpen == true else { return }
        abortOpenMessage(v.reply)
    }

    private func makeChecker() -> ContentChecker {
        ContentChecker(textLineLimit: policy.textLineLimit,
                       allow8BitHeaders: !policy.reject8BitHeaders || transaction?.parameters.smtputf8 == true,
                       maxSize: policy.maxMessageSize)
    }

    private mutating func beginMessage(_ mode: SMTPTransferMode) {
        guard let t = transaction else { return }
        let envelope = SMTPEnvelope(sender: t.sender, parameters: t.parameters, recipients: t.recipients,
                                    helo: heloName ?? "", protocolName: protocolName,
                                    authenticatedUser: authenticatedUser, client: client, transfer: mode)
        transaction!.mode = mode
        transaction!.messageOpen = true
        output.append(.beginMessage(envelope))
    }

    private mutating func finishData() {
        flushData(force: true)
        if let v = transaction?.dot?.checker.violation {
            let detail = envelopeDetail()
            transaction = nil
            phase = .command
            respond("DATA", v.reply, detail: detail)
        } else {
            transaction!.messageOpen = false
            output.append(.endMessage)
            phase = .waitingForQueue
        }
    }

    private mutating func finishChunk(size: UInt64, last: Bool, disposition: ChunkDisposition) {
        phase = .command
        switch disposition {
        case .discard(let reply):
            respond("BDAT", reply)
        case .accept:
            if last {
                transaction!.chunk!.finish(into: &dataBuffer)
                noteViolation()
            }
            flushData(force: true)
            if let v = transaction?.chunk?.checker.violation {
                let detail = envelopeDetail()
                transaction = nil
                respond("BDAT", v.reply, detail: detail)
            } else if last {
                transaction!.messageOpen = false
                output.append(.endMessage)
                phase = .waitingForQueue
            } else {
                respond("BDAT", SMTPReply(250, "2.0.0", "\(size) octets received"))
            }
        }
    }

    // MARK: - Commands

    private mutating func command(_ line: ArraySlice<UInt8>) {
        let space = line.firstIndex(of: UInt8(ascii: " ")) ?? line.endIndex
        let verbBytes = line[line.startIndex..<space]
        let verb = verbBytes.count <= 16 && verbBytes.allSatisfy(isASCIIAlpha)
            ? String(decoding: verbBytes.map(asciiUpper), as: UTF8.self) : ""
        let arg: ArraySlice<UInt8> = space < line.endIndex ? line[(space + 1)...] : line[line.endIndex...]
        switch verb {
        case "EHLO": hello(arg, extended: true)
        case "HELO": hello(arg, extended: false)
        case "MAIL": mail(arg)
        case "RCPT": rcpt(arg)
        case "DATA": data(arg)
        case "BDAT": bdat(arg)
        case "RSET":
            guard isBlank(arg) else { return respond("RSET", SMTPReply(501, "5.5.4", "Syntax: RSET")) }
            resetTransaction()
            respondToJunk("RSET", .ok)
        case "NOOP":
            respondToJunk("NOOP", .ok)
        case "QUIT":
            guard isBlank(arg) else { return respond("QUIT", SMTPReply(501, "5.5.4", "Syntax: QUIT")) }
            respond("QUIT", .bye)
            close()
        case "VRFY":
            guard !isBlank(arg) else { return respond("VRFY", SMTPReply(501, "5.5.4", "Syntax: VRFY address")) }
            respondToJunk("VRFY", .cannotVerify)
        case "HELP":
            respondToJunk("HELP", .help)
        case "STARTTLS": startTLS(arg)
        case "AUTH": auth(arg)
        case "EXPN", "ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML":
            respond(verb, SMTPReply(502, "5.5.1", "Command not implemented"))
        default:
            respond("UNKNOWN", SMTPReply(500, "5.5.2", "Command not recognized"))
        }
    }

    private func isBlank(_ arg: ArraySlice<UInt8>) -> Bool { arg.allSatisfy { $0 == UInt8(ascii: " ") } }

    private func trimmed(_ arg: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        var a = arg
        while a.last == UInt8(ascii: " ") { a = a.dropLast() }
        return a
    }

    private mutating func hello(_ arg: ArraySlice<UInt8>, extended isEHLO: Bool) {
        let verb = isEHLO ? "EHLO" : "HELO"
        let name = trimmed(arg)
        guard !name.isEmpty else { return respond(verb, SMTPReply(501, "5.5.4", "Syntax: \(verb) hostname")) }
        guard Self.isAcceptableHeloName(name) else {
            return respond(verb, SMTPReply(501, "5.5.4", "Invalid \(verb) hostname"))
        }
        resetTransaction()
        heloName = String(decoding: name, as: UTF8.self)
        extended = isEHLO
        if isEHLO {
            var lines = [policy.hostname]
            let e = offeredExtensions
            if e.contains(.pipelining) { lines.append("PIPELINING") }
            if e.contains(.size) { lines.append("SIZE \(policy.maxMessageSize)") }
            if e.contains(.eightBitMIME) { lines.append("8BITMIME") }
            if e.contains(.smtputf8) { lines.append("SMTPUTF8") }
            if e.contains(.enhancedStatusCodes) { lines.append("ENHANCEDSTATUSCODES") }
            if e.contains(.dsn) { lines.append("DSN") }
            if e.contains(.chunking) { lines.append("CHUNKING") }
            if e.contains(.startTLS) { lines.append("STARTTLS") }
            if e.contains(.auth) { lines.append("AUTH PLAIN LOGIN") }
            if e.contains(.requireTLS) { lines.append("REQUIRETLS") }
            respond(verb, SMTPReply(250, nil, lines))
        } else {
            respond(verb, SMTPReply(250, nil, policy.hostname))
        }
    }

    /// A domain or address literal; underscores are tolerated in names
    /// because many hosts are misnamed that way and the name is only used
    /// for logs and Received (where it is escaped anyway).
    static func isAcceptableHeloName(_ name: ArraySlice<UInt8>) -> Bool {
        if SMTPPathParser.parseDomainOrLiteral(name) != nil, name.allSatisfy({ $0 < 0x80 }) { return true }
        guard !name.isEmpty, name.count <= 255 else { return false }
        return name.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false).allSatisfy { label in
            (1...63).contains(label.count) && label.first != UInt8(ascii: "-") && label.last != UInt8(ascii: "-")
                && label.allSatisfy { isASCIIAlnum($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") }
        }
    }

    /// "FROM:" / "TO:" prefix, then optional spaces (not in the RFC grammar,
    /// but sent by many clients and harmless), then the path.
    private func pathArgument(_ arg: ArraySlice<UInt8>, keyword: String) -> ArraySlice<UInt8>? {
        let k = Array(keyword.utf8)
        guard arg.count >= k.count, arg.prefix(k.count).map(asciiUpper) == k else { return nil }
        var rest = arg.dropFirst(k.count)
        while rest.first == UInt8(ascii: " ") { rest = rest.dropFirst() }
        return rest
    }

    private var parameterContext: ParameterContext {
        ParameterContext(offered: offeredExtensions, maxMessageSize: policy.maxMessageSize,
                         requireTLSNeedsEncryption: extended && policy.extensions.contains(.requireTLS) && !tlsActive)
    }

    private mutating func mail(_ arg: ArraySlice<UInt8>) {
        guard heloName != nil else { return respond("MAIL", SMTPReply(503, "5.5.1", "Send EHLO or HELO first")) }
        guard transaction == nil else { return respond("MAIL", SMTPReply(503, "5.5.1", "Nested MAIL command")) }
        if policy.isSubmission && authenticatedUser == nil {
            return respond("MAIL", SMTPReply(530, "5.7.0", "Authentication required"))
        }
        guard let pathBytes = pathArgument(arg, keyword: "FROM:") else {
            return respond("MAIL", SMTPReply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        }
        let path: SMTPPath
        let end: Int
        do {
            (path, end) = try SMTPPathParser.parse(pathBytes, kind: .reversePath)
        } catch {
            return respond("MAIL", SMTPReply(501, "5.1.7", "Bad sender address syntax: \(error.reason)"))
        }
        guard let raw = ESMTPParameters.split(pathBytes[end...]) else {
            return respond("MAIL", ESMTPParameters.badSyntax)
        }
        var params: SMTPMailParameters
        switch ESMTPParameters.mail(raw, parameterContext) {
        case .success(let p): params = p
        case .failure(let reply): return respond("MAIL", reply, detail: "from=\(path)")
        }
        guard path.isASCII || params.smtputf8 else {
            return respond("MAIL", SMTPReply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"), detail: "from=\(path)")
        }
        if let user = authenticatedUser, let allowed = policy.senderAllowed, !allowed(user, path) {
            return respond("MAIL", SMTPReply(553, "5.7.1", "\(path): Sender address rejected: not owned by the authenticated user"),
                           detail: "from=\(path)")
        }
        // RFC 4954 section 5: an AUTH= from an unauthenticated client is not trusted.
        if authenticatedUser == nil { params.auth = nil }
        transaction = Transaction(sender: path, parameters: params)
        respond("MAIL", .senderOk)
    }

    private mutating func rcpt(_ arg: ArraySlice<UInt8>) {
        guard let t = transaction else { return respond("RCPT", SMTPReply(503, "5.5.1", "Need MAIL command")) }
        guard t.mode == nil else { return respond("RCPT", SMTPReply(503, "5.5.1", "RCPT not allowed after BDAT")) }
        guard let pathBytes = pathArgument(arg, keyword: "TO:") else {
            return respond("RCPT", SMTPReply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        }
        let path: SMTPPath
        let end: Int
        do {
            (path, end) = try SMTPPathParser.parse(pathBytes, kind: .forwardPath)
        } catch {
            return respond("RCPT", SMTPReply(501, "5.1.3", "Bad recipient address syntax: \(error.reason)"))
        }
        // Each refusal below logs the envelope (envelopeDetail), built
        // only then: most recipients are accepted.
        guard let raw = ESMTPParameters.split(pathBytes[end...]) else {
            return respond("RCPT", ESMTPParameters.badSyntax, detail: envelopeDetail(recipient: path))
        }
        let params: SMTPRecipientParameters
        switch ESMTPParameters.recipient(raw, parameterContext) {
        case .success(let p): params = p
        case .failure(let reply): return respond("RCPT", reply, detail: envelopeDetail(recipient: path))
        }
        guard path.isASCII || t.parameters.smtputf8 else {
            return respond("RCPT", SMTPReply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"), detail: envelopeDetail(recipient: path))
        }
        guard t.recipients.count < policy.maxRecipients else {
            return respond("RCPT", SMTPReply(452, "4.5.3", "Too many recipients"), countsAsError: false, detail: envelopeDetail(recipient: path))
        }
        let decision = policy.relay.decide(path, clientTrusted: client.isTrusted, authenticated: authenticatedUser != nil)
        if case .denied(let reply) = decision { return respond("RCPT", reply, detail: envelopeDetail(recipient: path)) }
        if case .local = decision, let known = policy.isKnownLocalPart, case .mailbox(let mailbox) = path.target,
           !known(SMTPMailbox.canonicalLocalPart(mailbox.localPart)) {
            return respond("RCPT", RelayPolicy.unknownLocalRecipient(path), detail: envelopeDetail(recipient: path))
        }
        transaction!.recipients.append(SMTPRecipient(path: path, parameters: params, relay: decision))
        respond("RCPT", .recipientOk)
    }

    private mutating func data(_ arg: ArraySlice<UInt8>) {
        guard isBlank(arg) else { return respond("DATA", SMTPReply(501, "5.5.4", "Syntax: DATA")) }
        guard let t = transaction else { return respond("DATA", SMTPReply(503, "5.5.1", "Need MAIL command")) }
        guard t.mode == nil else { return respond("DATA", SMTPReply(503, "5.5.1", "DATA not allowed after BDAT")) }
        guard !t.recipients.isEmpty else { return respond("DATA", SMTPReply(554, "5.5.1", "No valid recipients")) }
        output.append(.reply(.startData))
        transaction!.dot = DotDecoder(checker: makeChecker())
        beginMessage(.data)
        phase = .data
    }

    private mutating func bdat(_ arg: ArraySlice<UInt8>) {
        // BDAT SP chunk-size [ SP end-marker ]; runs of spaces pass.
        let words = arg.split(separator: UInt8(ascii: " "))
        guard let sizeWord = words.first, let size = Self.chunkSize(sizeWord) else {
            // Without its size the chunk's end cannot be found: the bytes
            // that follow would be read as commands, a way to have a second
            // message (or anything) taken from inside the first one's data.
            let reply = SMTPReply(421, "4.5.4", "\(policy.hostname) BDAT without a chunk size, closing connection")
            counters.record("BDAT", success: false)
            output.append(.log(.rejected(command: "BDAT", reply: reply, detail: envelopeDetail())))
            output.append(.reply(reply))
            return close()
        }
        let last = words.count == 2 && String(decoding: words[1].map(asciiUpper), as: UTF8.self) == "LAST"
        // The chunk follows the command whatever the verdict: it is read
        // (and discarded when refused) so the command stream stays in sync.
        var disposition = ChunkDisposition.accept
        if words.count > 2 || (words.count == 2 && !last) {
            disposition = .discard(SMTPReply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
        } else if !offeredExtensions.contains(.chunking) {
            disposition = .discard(SMTPReply(503, "5.5.1", "CHUNKING not offered, send EHLO first"))
        } else if transaction == nil {
            disposition = .discard(SMTPReply(503, "5.5.1", "Need MAIL command"))
        } else if transaction!.recipients.isEmpty {
            disposition = .discard(SMTPReply(554, "5.5.1", "No valid recipients"))
        } else if transaction!.mode == nil {
            transaction!.chunk = ChunkDecoder(checker: makeChecker())
            beginMessage(.bdat)
        }
        phase = .bdat(remaining: size, size: size, last: last, disposition: disposition)
        if size == 0 { finishChunk(size: 0, last: last, disposition: disposition) }
    }

    /// A BDAT chunk size: 1 to 20 digits that fit in 64 bits.
    static func chunkSize(_ word: ArraySlice<UInt8>) -> UInt64? {
        guard (1...20).contains(word.count), word.allSatisfy(isASCIIDigit) else { return nil }
        var size: UInt64 = 0
        for d in word {
            let (m, o1) = size.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(d - 48))
            guard !o1, !o2 else { return nil }
            size = s
        }
        return size
    }

    private mutating func startTLS(_ arg: ArraySlice<UInt8>) {
        guard isBlank(arg) else { return respond("STARTTLS", SMTPReply(501, "5.5.4", "Syntax: STARTTLS")) }
        if tlsActive { return respond("STARTTLS", SMTPReply(503, "5.5.1", "TLS already active")) }
        guard policy.tlsAvailable, policy.extensions.contains(.startTLS) else {
            return respond("STARTTLS", SMTPReply(502, "5.5.1", "STARTTLS not available"))
        }
        guard extended else { return respond("STARTTLS", SMTPReply(503, "5.5.1", "Send EHLO first")) }
        guard transaction == nil else {
            return respond("STARTTLS", SMTPReply(503, "5.5.1", "MAIL transaction in progress"))
        }
        respond("STARTTLS", .readyForTLS)
        guard phase != .closed else { return }
        output.append(.startTLS)
        phase = .tlsHandshake
    }

    private mutating func auth(_ arg: ArraySlice<UInt8>) {
        guard extended else { return respond("AUTH", SMTPReply(503, "5.5.1", "Send EHLO first")) }
        guard policy.extensions.contains(.auth), policy.auth != .never else {
            return respond("AUTH", SMTPReply(503, "5.5.1", "Authentication not enabled"))
        }
        guard authAvailableNow else {
            return respond("AUTH", SMTPReply(538, "5.7.11", "Encryption required for requested authentication mechanism"))
        }
        guard authenticatedUser == nil else { return respond("AUTH", SMTPReply(503, "5.5.1", "Already authenticated")) }
        guard transaction == nil else {
            return respond("AUTH", SMTPReply(503, "5.5.1", "AUTH not allowed during a mail transaction"))
        }
        let words = arg.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        guard (1...2).contains(words.count), !words[0].isEmpty, words.count == 1 || !words[1].isEmpty else {
            return respond("AUTH", SMTPReply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        }
        let mechanism = String(decoding: words[0].map(asciiUpper), as: UTF8.self)
        let initial: [UInt8]?
        if words.count == 2 {
            if words[1].elementsEqual("=".utf8) {
                initial = []
            } else if let d = Base64.decode(words[1]) {
                initial = d
            } else {
                return respond("AUTH", SMTPReply(501, "5.5.2", "Invalid base64 data"))
            }
        } else {
            initial = nil
        }
        switch mechanism {
        case "PLAIN":
            if let initial {
                plain(initial)
            } else {
                intermediate(334, "")
                phase = .authResponse(.plain)
            }
        case "LOGIN":
            if let initial {
                loginUser(initial)
            } else {
                intermediate(334, SASL.usernamePrompt)
                phase = .authResponse(.loginUser)
            }
        default:
            respond("AUTH", SMTPReply(504, "5.5.4", "Unrecognized authentication type"))
        }
    }

    private mutating func authResponse(_ line: ArraySlice<UInt8>, _ step: AuthStep) {
        phase = .command
        if line.elementsEqual("*".utf8) {
            return respond("AUTH", SMTPReply(501, "5.0.0", "Authentication cancelled"))
        }
        guard let decoded = Base64.decode(line) else {
            return respond("AUTH", SMTPReply(501, "5.5.2", "Invalid base64 data"))
        }
        switch step {
        case .plain: plain(decoded)
        case .loginUser: loginUser(decoded)
        case .loginPassword(let user):
            guard let password = SASL.parseLoginField(decoded) else {
                return respond("AUTH", SMTPReply(501, "5.5.2", "Invalid LOGIN response"))
            }
            requestAuthentication(SMTPCredentials(mechanism: .login, authorizationIdentity: nil,
                                                  username: user, password: password))
        }
    }

    private mutating func plain(_ message: [UInt8]) {
        guard let (authzid, user, password) = SASL.parsePlain(message) else {
            phase = .command
            return respond("AUTH", SMTPReply(501, "5.5.2", "Invalid PLAIN response"))
        }
        requestAuthentication(SMTPCredentials(mechanism: .plain, authorizationIdentity: authzid,
                                              username: user, password: password))
    }

    private mutating func loginUser(_ message: [UInt8]) {
        guard let user = SASL.parseLoginField(message) else {
            phase = .command
            return respond("AUTH", SMTPReply(501, "5.5.2", "Invalid LOGIN response"))
        }
        intermediate(334, SASL.passwordPrompt)
        phase = .authResponse(.loginPassword(user: user))
    }

    private mutating func requestAuthentication(_ credentials: SMTPCredentials) {
        output.append(.authenticate(credentials))
        phase = .waitingForAuth(user: credentials.username, mechanism: credentials.mechanism.rawValue)
    }
}

/// The replies that never vary, made once: a reply checks its text and
/// parses its status code when it is made, and MAIL, RCPT, DATA and QUIT
/// answer with these in every session.
extension SMTPReply {
    static let ok = SMTPReply(250, "2.0.0", "Ok")
    static let bye = SMTPReply(221, "2.0.0", "Bye")
    static let senderOk = SMTPReply(250, "2.1.0", "Ok")
    static let recipientOk = SMTPReply(250, "2.1.5", "Ok")
    static let startData = SMTPReply(354, nil, "End data with <CR><LF>.<CR><LF>")
    static let readyForTLS = SMTPReply(220, "2.0.0", "Ready to start TLS")
    static let cannotVerify = SMTPReply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
    static let help = SMTPReply(214, "2.0.0",
                                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH")
}
