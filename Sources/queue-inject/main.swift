// NAME
//      queue-inject - Sealpost's sendmail-compatible mail injector
//
// SYNOPSIS
//      queue-inject [-t] [-i|-oi] [-f sender] [-F full-name] [-N dsn]
//                   [-R ret] [-V envid] [-B 7BIT|8BITMIME] [-C config]
//                   [-bm] [-oX...] [--] [recipient ...]
//      queue-inject -bs [-C config]
//
// DESCRIPTION
//      Reads one message from standard input and hands it to the Sealpost
//      queue, as sendmail(8) does. Line ends are normalized to CRLF; unless
//      -i (or -oi) is given, a line holding a single "." ends the input.
//      The header gets a Received: line, and Date:, Message-ID: and From:
//      when they are missing; Bcc: is removed. With -t the recipients come
//      from To:, Cc: and Bcc: (Resent-* when present), minus those named on
//      the command line. The envelope sender is -f/-r, "" or "<>" for the
//      null sender, else LOGIN@hostname. A message with UTF-8 in an address
//      or in its header section (RFC 6532) is marked for SMTPUTF8, so that
//      it never goes to a server without it. Command-line parsing and header
//      completion live in MailMessage (SendmailOptions, MessageSubmission).
//
//      The header section is read first (bounded to 1 MiB); the rest is
//      streamed to the queue in BODY frames of at most 64 KiB as it is read.
//
//      -bs: an SMTP session (RFC 5321, the extensions smtp-listen offers
//      but STARTTLS and AUTH) on standard input and output, for programs
//      that submit mail that way (Symfony Mailer's and Laravel's sendmail
//      transport by default). The invoking user may send anywhere; each
//      message gets smtp-listen's Received field ("from HELO (localhost
//      [127.0.0.1])", as Postfix's stand-alone smtpd names the client),
//      and From: (the MAIL FROM address, MAILER-DAEMON for <>), Date: and
//      Message-ID: when the header has none, as above; nothing is removed
//      (Bcc: stays, as with SMTP); the 250 with the queue ID comes after the
//      queue's commit; the queue away: 451 4.3.0 for that message, and no
//      retry (the SMTP client's business). SMTPInjection.StandaloneSMTP.
//
// DESCRIPTORS
//      0: the message (-bs: the SMTP commands). 1: nothing (-bs: the SMTP
//      replies). 2: errors and notes ("queue-inject: ...").
//
// SOCKET AND PROTOCOL
//      The configuration's inject socket (data/run/inject), protocol
//      "inject" of Pipeline/PROTOCOL.md: HELLO, MAIL (protocol "local",
//      client-name the login name), RCPT..., BODY..., END; then ACCEPTED or
//      REFUSED. The queue records the uid from SO_PEERCRED.
//
//      When the queue cannot be reached (no socket, connection refused) or
//      the connection breaks before ACCEPTED, queue-inject tries again from
//      the start, with pauses growing from 0.1 s to 5 s, for 30 s in all
//      (SEALPOST_INJECT_WAIT=seconds changes that), replaying what it has
//      already read (kept in memory up to 1 MiB, beyond that in an unlinked
//      file in $TMPDIR or /tmp). A connection lost after END but before
//      ACCEPTED is retried too: the queue may have committed the message,
//      so this can deliver it twice, but ACCEPTED is the only proof the
//      queue owns it, and a duplicate is better than a message lost (the
//      same trade-off SMTP makes, RFC 1047). A queue that is alive but
//      does not answer (stopped, a hung disk) counts as unreachable once a
//      step (the connect, a write, the answer to END) has waited 300 s
//      (SEALPOST_INJECT_TIMEOUT=seconds changes that).
//
// PRIVILEGES
//      Runs as the invoking user, with no privileges: the inject socket is
//      mode 0666. Nothing is set-uid.
//
// CONFIGURATION
//      SEALPOST_CONFIG, or -C FILE, else the file SealpostConfiguration
//      .locate() finds.
//
// EXIT STATUS (sysexits.h)
//      0 the queue accepted the message. 64 (EX_USAGE) bad command line, no
//      recipients. 65 (EX_DATAERR) bad address syntax, message too large
//      (found while reading: it stops there), a header section over 1 MiB,
//      more recipients than the queue takes in one message, an envelope
//      value the inject protocol refuses (checked before connecting).
//      67 (EX_NOUSER) no account for the invoking uid (or, without a passwd
//      entry, a LOGNAME that is not a plain user name). 69 (EX_UNAVAILABLE)
//      permanently refused. 74 (EX_IOERR) reading stdin failed.
//      75 (EX_TEMPFAIL) temporarily refused, or the queue not reachable:
//      try again later. 78 (EX_CONFIG) configuration error.
//      -bs: 0 once the session ended (QUIT, end of input, or the client
//      silent past smtp.command_timeout or data_timeout: 421), whatever
//      the replies said; 74 (EX_IOERR) when the input could not be read or
//      the replies could not be written.

#if canImport(Glibc)
import Glibc
#endif
import MailMessage
import SMTPInjection
import SealpostConfig
import StageProtocol

let chunkSize = 65_536

func say(_ message: String) {
    let line = Array("queue-inject: \(message)\n".utf8)
    var off = 0
    while off < line.count {
        let n = line.withUnsafeBytes { write(2, $0.baseAddress! + off, $0.count - off) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        off += n
    }
}

func die(_ exit: SysExit, _ message: String) -> Never {
    say(message)
    Glibc.exit(exit.rawValue)
}

/// Reads up to 64 KiB from stdin; empty at EOF.
func readInput() -> [UInt8] {
    var buffer = [UInt8](repeating: 0, count: chunkSize)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
        if n >= 0 { return Array(buffer[0..<n]) }
        if errno != EINTR { die(.ioErr, "cannot read the message from standard input: \(String(cString: strerror(errno)))") }
    }
}

// MARK: setup

signal(SIGPIPE, SIG_IGN)
tzset()   // Date: and Received: in local time (localtime_r)
let options: SendmailOptions
do {
    options = try SendmailOptions.parse(Array(CommandLine.arguments.dropFirst()))
} catch {
    if error.message.hasPrefix("unknown option") || error.message.contains("requires an argument") {
        say(error.message)
        die(error.exit, SendmailOptions.usageText)
    }
    die(error.exit, error.message)
}
for note in options.ignored { say("note: option \(note) ignored") }

let configPath = options.configFile ?? SealpostConfiguration.locate()
let config: SealpostConfiguration
do {
    config = try SealpostConfiguration.load(path: configPath)
} catch {
    die(.config, "fatal: \(error)")
}

if options.standaloneSMTP {
    let session = StandaloneSMTP(policy: StandaloneSMTP.policy(config), injectSocket: config.injectSocket,
                                 timeout: InjectionPolicy.timeout(environment: getenv("SEALPOST_INJECT_TIMEOUT").map { String(cString: $0) }),
                                 commandTimeout: config.smtp.commandTimeout, dataTimeout: config.smtp.dataTimeout)
    guard session.run(input: 0, output: 1) else { die(.ioErr, "the SMTP session on standard input and output failed (a read or write error)") }
    exit(SysExit.ok.rawValue)
}

let uid = getuid()
var loginName = ""
var gecos: String? = nil
if let pw = getpwuid(uid) {
    loginName = String(cString: pw.pointee.pw_name)
    let g = String(cString: pw.pointee.pw_gecos)
    gecos = g.isEmpty ? nil : g
} else if let env = getenv("LOGNAME") ?? getenv("USER") {
    // A container user without a passwd entry: the environment's word,
    // which becomes the sender's local part and the From: address: only a
    // plain user name (POSIX portable characters) will do.
    loginName = String(cString: env)
    let portable = loginName.utf8.allSatisfy { b in
        (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || (b >= 0x30 && b <= 0x39) || b == 0x2E || b == 0x5F || b == 0x2D
    }
    guard portable, loginName.utf8.count <= 64, !loginName.hasPrefix("-"), !loginName.hasPrefix(".") else {
        die(.noUser, "user ID \(uid) has no passwd entry and LOGNAME/USER \"\(loginName.unicodeScalars.map { $0.isASCII && $0.value >= 32 && $0.value < 127 ? String($0) : "?" }.joined())\" is not a plain user name")
    }
}
if loginName.isEmpty { die(.noUser, "no login name for user ID \(uid)") }

// Unqualified recipients ("root") go to a local domain: this host's name
// when it is one, else the first configured local domain.
let qualifyDomain = config.local.isLocal(domain: config.hostname)
    ? config.hostname : (config.local.domains.first ?? config.hostname)
let context = SubmissionContext(hostname: config.hostname, qualifyDomain: qualifyDomain,
                                loginName: loginName, uid: UInt32(uid), gecos: gecos,
                                unixTime: Int(time(nil)))

var submission: MessageSubmission
do {
    submission = try MessageSubmission(options: options, context: context)
    // The header section first: -t recipients and the fields to add depend on it.
    while !submission.isHeaderComplete && !submission.isInputComplete {
        let chunk = readInput()
        if chunk.isEmpty { try submission.finish() } else { try submission.feed(chunk) }
    }
} catch {
    die(error.exit, error.message)
}
let store = ReplayStore()
store.append(submission.takeOutput())
let sizeLimit = config.queue.acceptedSizeLimit

// MARK: injection

enum Outcome {
    case accepted(String)
    case refused(SubmissionError)
}

/// A failure after which trying again makes sense.
struct Transient: Error, CustomStringConvertible {
    var reason: String
    var description: String { reason }
}

/// MAIL and RCPT, checked against the protocol's schema before the first
/// attempt: a value the queue would refuse (a control character, a
/// parameter too long) is this command's error, not a reason to try again.
let envelope: [Frame] = {
    var mail = Frame(.mail, ["sender": .text(submission.sender), "protocol": .text("local"),
                             "client-name": .text(loginName)])
    mail.set("ret", options.ret.map { .text($0) })
    mail.set("envid", options.envid.map { .text($0) })
    mail.set("body-type", options.bodyType.map { .text($0) })
    if submission.needsSMTPUTF8 { mail.set("smtputf8", .bool(true)) }
    var frames = [mail]
    for r in submission.recipients {
        var rcpt = Frame(.rcpt, ["address": .text(r)])
        rcpt.set("notify", options.notify.map { .text($0) })
        frames.append(rcpt)
    }
    return frames
}()
do {
    let schema = ProtocolSchema.standard(.inject)
    for frame in envelope { try schema.validate(frame, direction: .clientToServer) }
} catch {
    die(.dataErr, "the envelope cannot be submitted: \(error.message)")
}

func sendBody(_ connection: StageConnection, _ bytes: ArraySlice<UInt8>) throws {
    var i = bytes.startIndex
    while i < bytes.endIndex {
        let end = min(i + chunkSize, bytes.endIndex)
        try connection.send(Frame(.body, ["data": .bytes(Array(bytes[i..<end]))]))
        i = end
    }
}

@MainActor
func attempt() throws -> Outcome {
    let connection: StageConnection
    do {
        connection = try StageConnection.connect(path: config.injectSocket, timeout: stepTimeout)
    } catch let e as StageIOError {
        throw Transient(reason: e.reason)
    }
    defer { connection.close() }
    do {
        try connection.clientHello(.inject, extra: [("software", .text("sealpost-queue-inject 0.1"))])

        for frame in envelope { try connection.send(frame) }

        // What was read before (on an earlier attempt too), then the rest of stdin.
        try store.replay(chunk: chunkSize) { try sendBody(connection, $0) }
        while !submission.isInputComplete {
            let chunk = readInput()
            do {
                if chunk.isEmpty { try submission.finish() } else { try submission.feed(chunk) }
            } catch {
                // Header already complete: nothing left to reject; keep the type checker honest.
                die(error.exit, error.message)
            }
            let out = submission.takeOutput()
            store.append(out)
            // The queue would refuse it at END (552 5.3.4); stop reading
            // now rather than spool endless input into $TMPDIR first.
            if store.count > sizeLimit {
                die(.dataErr, "message too large: over \(sizeLimit) bytes (message_size_limit \(config.queue.messageSizeLimit) and room for the header fields added)")
            }
            try sendBody(connection, out[...])
        }
        try connection.send(Frame(.end))

        guard let reply = try connection.receive() else {
            throw Transient(reason: "the queue closed the connection before accepting the message")
        }
        switch reply.type {
        case .accepted:
            return .accepted(try reply.text("queue-id"))
        case .refused:
            return .refused(InjectionPolicy.refusal(code: try reply.uint("code"),
                                                     status: try reply.text("status"),
                                                     text: try reply.text("text")))
        default:
            throw Transient(reason: "unexpected \(reply.type.name) from the queue")
        }
    } catch let e as PeerError {
        // ERROR from the queue: 4.x.x (e.g. shutting down) is worth another
        // try, anything else is final.
        if e.status.hasPrefix("4.") { throw Transient(reason: e.description) }
        return .refused(SubmissionError(.unavailable, "refused: \(e.description)"))
    } catch let e as StageIOError {
        throw Transient(reason: e.description)
    } catch let e as ProtocolError {
        throw Transient(reason: "protocol error: \(e.message)")
    }
}

let stepTimeout = InjectionPolicy.timeout(environment: getenv("SEALPOST_INJECT_TIMEOUT").map { String(cString: $0) })
let pauses = InjectionPolicy.pauses(total: InjectionPolicy.wait(environment: getenv("SEALPOST_INJECT_WAIT").map { String(cString: $0) }))
var attemptNumber = 0
while true {
    do {
        switch try attempt() {
        case .accepted:
            exit(0)
        case .refused(let e):
            die(e.exit, e.message)
        }
    } catch let t as Transient {
        guard store.isComplete else {
            die(.tempFail, "queue not reachable at \(config.injectSocket): \(t.reason) (and the message could not be kept for another try)")
        }
        guard attemptNumber < pauses.count else {
            die(.tempFail, "queue not reachable at \(config.injectSocket): \(t.reason)")
        }
        let pause = pauses[attemptNumber]
        attemptNumber += 1
        var ts = timespec(tv_sec: Int(pause), tv_nsec: Int((pause - Double(Int(pause))) * 1e9))
        var rest = timespec()
        while nanosleep(&ts, &rest) != 0 && errno == EINTR { ts = rest }
    } catch {
        die(.tempFail, "\(error)")
    }
}
