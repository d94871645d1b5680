// The sendmail command line as queue-inject understands it:
//
//   queue-inject [-t] [-i|-oi] [-f SENDER|-fSENDER|-r SENDER] [-F NAME]
//                [-N DSN] [-R RET] [-V ENVID] [-B TYPE] [-C FILE] [-bm]
//                [-oXXX] [-v] [-U] [--] [RECIPIENT...]
//   queue-inject -bs [-C FILE]   (an SMTP session on stdin and stdout)
//
// Options are parsed as getopt(3) does (clusters such as "-ti", attached or
// separate arguments), and, like GNU getopt, may follow recipients until
// "--". Programs call sendmail with many historical flags; harmless ones are
// accepted with a note, modes Sealpost does not offer are usage errors that
// say what to use instead.

/// sysexits.h codes used by queue-inject (the same numbers as StageRuntime's
/// ExitCode; MailMessage depends on no other module).
public enum SysExit: Int32, Sendable {
    case ok = 0, usage = 64, dataErr = 65, noUser = 67, unavailable = 69,
         software = 70, osErr = 71, ioErr = 74, tempFail = 75, config = 78
}

public struct SubmissionError: Error, Sendable, Equatable, CustomStringConvertible {
    public var exit: SysExit
    public var message: String
    public init(_ exit: SysExit, _ message: String) { self.exit = exit; self.message = message }
    public var description: String { message }
}

public struct SendmailOptions: Sendable, Equatable {
    /// -t: recipients from To, Cc, Bcc (Resent-* when present) minus those
    /// on the command line.
    public var extractRecipients = false
    /// -i / -oi: a line with a single "." is ordinary text.
    public var ignoreDots = false
    /// -f / -r, with angle brackets removed: "" is the null sender; nil when
    /// not given (the invoking user's address is used).
    public var sender: String?
    /// -F: the full name for a From: header we add.
    public var fullName: String?
    /// -N: RFC 3461 NOTIFY for every recipient ("NEVER" or a list of
    /// SUCCESS, FAILURE, DELAY), upper-cased.
    public var notify: String?
    /// -R: RET, "FULL" or "HDRS".
    public var ret: String?
    /// -V: ENVID.
    public var envid: String?
    /// -B: body type, "7BIT" or "8BITMIME".
    public var bodyType: String?
    /// -C: another configuration file.
    public var configFile: String?
    /// Command-line recipients, as given (each may be an address list).
    public var recipients: [String] = []
    /// Options accepted but without effect, for a note on stderr.
    public var ignored: [String] = []
    /// -bs: an SMTP session on standard input and output instead of one
    /// message; the envelope comes from MAIL and RCPT.
    public var standaloneSMTP = false

    public init() {}

    /// Parses the arguments after the program name.
    public static func parse(_ args: [String]) throws(SubmissionError) -> SendmailOptions {
        var o = SendmailOptions()
        var i = 0
        func usage(_ m: String) -> SubmissionError { SubmissionError(.usage, m) }
        while i < args.count {
            let arg = args[i]
            i += 1
            if arg == "--" {
                o.recipients.append(contentsOf: args[i...])
                break
            }
            guard arg.hasPrefix("-"), arg.count > 1 else {
                o.recipients.append(arg)
                continue
            }
            var rest = Substring(arg.dropFirst())
            while let flag = rest.first {
                rest = rest.dropFirst()
                // Options with an argument take the rest of this word, or the next word.
                func argument() throws(SubmissionError) -> String {
                    if !rest.isEmpty { let v = String(rest); rest = ""; return v }
                    guard i < args.count else { throw usage("option -\(flag) requires an argument") }
                    i += 1
                    return args[i - 1]
                }
                switch flag {
                case "t": o.extractRecipients = true
                case "i": o.ignoreDots = true
                case "v", "U", "n", "m":
                    // -v verbose, -U initial submission, -n no aliasing, -m me too:
                    // nothing to do in Sealpost.
                    o.ignored.append("-\(flag)")
                case "f", "r":
                    o.sender = try stripAngles(argument())
                case "F":
                    o.fullName = try argument()
                case "N":
                    let v = try argument().uppercased()
                    let items = v.split(separator: ",").map { $0.trimmingSpaces() }
                    let valid = items == ["NEVER"] || (!items.isEmpty && items.allSatisfy { ["SUCCESS", "FAILURE", "DELAY"].contains($0) })
                    guard valid else { throw usage("-N: expected NEVER or a list of SUCCESS, FAILURE, DELAY, not \"\(v)\"") }
                    // RFC 3461 4.1: each keyword once (the queue refuses
                    // NOTIFY=SUCCESS,SUCCESS as any SMTP server would).
                    guard Set(items).count == items.count else { throw usage("-N: \"\(v)\" names a keyword twice") }
                    o.notify = items.joined(separator: ",")
                case "R":
                    let v = try argument().uppercased()
                    guard v == "FULL" || v == "HDRS" else { throw usage("-R: expected full or hdrs, not \"\(v)\"") }
                    o.ret = v
                case "V":
                    let v = try argument()
                    guard !v.isEmpty, v.count <= 100, v.unicodeScalars.allSatisfy({ $0.value > 32 && $0.value < 127 }) else {
                        throw usage("-V: an envelope id is 1 to 100 printable ASCII characters")
                    }
                    o.envid = v
                case "B":
                    let v = try argument().uppercased()
                    guard v == "7BIT" || v == "8BITMIME" else { throw usage("-B: expected 7BIT or 8BITMIME, not \"\(v)\"") }
                    o.bodyType = v
                case "C":
                    o.configFile = try argument()
                case "o":
                    let v = try argument()
                    if v == "i" { o.ignoreDots = true }
                    else { o.ignored.append("-o\(v)") }
                case "e", "h", "L", "X", "O":
                    // -e error mode, -h hop count, -L log label, -X traffic
                    // log, -O long option: accepted and ignored as by Postfix.
                    let v = try argument()
                    o.ignored.append("-\(flag) \(v)")
                case "b":
                    let mode = try argument()
                    switch mode {
                    case "m": break
                    case "p": throw usage("-bp (mailq) is not supported; use sealpost queue list")
                    case "s": o.standaloneSMTP = true
                    case "i": throw usage("-bi (newaliases) is not supported; local-deliver reads the aliases file (and the accounts) when it starts: after a change, stop its process and the supervisor starts it again")
                    case "d", "D": throw usage("-b\(mode) (daemon mode) is not supported; use Pipeline/start")
                    default: throw usage("-b\(mode) is not supported; only -bm (read a message from stdin) and -bs (SMTP on stdin)")
                    }
                case "q":
                    throw usage("-q is not supported; use sealpost queue flush")
                case "I":
                    throw usage("-I (newaliases) is not supported; local-deliver reads the aliases file (and the accounts) when it starts: after a change, stop its process and the supervisor starts it again")
                default:
                    throw usage("unknown option -\(flag)")
                }
            }
        }
        if o.standaloneSMTP {
            // Postfix ignores the envelope options with -bs (MAIL and RCPT
            // give the envelope); a recipient or -t, though, means a
            // caller that expects the other mode.
            if !o.recipients.isEmpty { throw usage("-bs takes no recipients: they come from RCPT TO") }
            if o.extractRecipients { throw usage("-bs and -t do not go together: the recipients come from RCPT TO") }
        }
        return o
    }

    /// "<a@b>" -> "a@b", "<>" -> "" (the null sender).
    static func stripAngles(_ s: String) -> String {
        let t = Substring(s).trimmingSpaces()
        if t.hasPrefix("<") && t.hasSuffix(">") && t.count >= 2 {
            return String(t.dropFirst().dropLast())
        }
        return t
    }

    public static let usageText = """
        usage: queue-inject [-t] [-i|-oi] [-f sender] [-F full-name] [-N dsn] [-R ret] \
        [-V envid] [-B 7BIT|8BITMIME] [-C config] [--] [recipient ...]
        """
}
