// The `sealpost` command line (swift-argument-parser). The work is done by
// QueueClient / QueueFormat; this file maps commands to requests, finds the
// control socket from the configuration and turns failures into a line on
// stderr and a sysexits.h exit code.

import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif
import SealpostConfig

struct SealpostCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sealpost",
        abstract: "Administer a Sealpost mail system.",
        subcommands: [QueueCommand.self, UserCommand.self])
}

struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Configuration file (default: $SEALPOST_CONFIG, the checkout's Config/sealpost.toml, /etc/sealpost/sealpost.toml).", valueName: "file"))
    var config: String?

    @Option(name: .long, help: ArgumentHelp("The queue's control socket (default: from the configuration).", valueName: "path"))
    var socket: String?

    func controlSocket() throws(AdminFailure) -> String {
        if let socket { return socket }
        let file = config ?? SealpostConfiguration.locate()
        do {
            return try SealpostConfiguration.load(path: file).controlSocket
        } catch {
            throw AdminFailure(message: error.description, exitCode: SysExit.config)
        }
    }

    func connect() throws(AdminFailure) -> QueueClient {
        try QueueClient(path: controlSocket())
    }
}

/// Runs `body`; an AdminFailure becomes "sealpost: MESSAGE" on stderr and
/// its exit code.
func reporting(_ body: () throws(AdminFailure) -> Void) throws {
    do {
        try body()
    } catch {
        Output.err("sealpost: \(error.message)\n")
        throw ExitCode(error.exitCode)
    }
}

/// A request that answers only DONE: its text on stdout, or on stderr with
/// exit 69 when the queue did not do it.
func simpleRequest(_ options: GlobalOptions, _ verb: String, queueID: String? = nil, bounce: Bool = false) throws {
    try reporting { () throws(AdminFailure) in
        let id = try queueID.map { (raw: String) throws(AdminFailure) in try QueueFormat.normalizeID(raw) }
        let reply = try options.connect().request(verb, queueID: id, bounce: bounce)
        guard reply.ok else { throw AdminFailure(message: "queue \(verb): \(reply.text)", exitCode: SysExit.unavailable) }
        Output.out(reply.text.isEmpty ? "" : reply.text + "\n")
    }
}

/// delete, hold or release of the messages `arguments` name, as Postfix's
/// postsuper takes them: queue IDs, "ALL" (every message, one request the
/// queue answers once all are committed), or "-" (IDs on standard input, one
/// per line, as `postsuper -d -` reads them). One line
/// per message on stdout; a message the queue could not change is reported
/// on stderr and the exit code is 69, after the others were done.
func requestForEach(_ options: GlobalOptions, _ verb: String, _ arguments: [String], bounce: Bool = false) throws {
    try reporting { () throws(AdminFailure) in
        if arguments == ["ALL"] {
            let reply = try options.connect().request(verb, bounce: bounce, all: true)
            guard reply.ok else { throw AdminFailure(message: "queue \(verb) ALL: \(reply.text)", exitCode: SysExit.unavailable) }
            Output.out(reply.text + "\n")
            return
        }
        guard !arguments.contains("ALL") else {
            throw AdminFailure(message: "ALL stands alone: no queue IDs beside it", exitCode: SysExit.usage)
        }
        var ids: [String] = []
        for argument in arguments {
            if argument == "-" {
                while let line = Input.line(fd: 0) {
                    let id = line.trimmingCharacters(in: .whitespaces)
                    if !id.isEmpty { ids.append(try QueueFormat.normalizeID(id)) }
                }
            } else {
                ids.append(try QueueFormat.normalizeID(argument))
            }
        }
        guard !ids.isEmpty else { throw AdminFailure(message: "no queue ID given", exitCode: SysExit.usage) }
        let client = try options.connect()
        var failures = 0
        for id in ids {
            let reply = try client.request(verb, queueID: id, bounce: bounce)
            if reply.ok {
                Output.out(reply.text + "\n")
            } else {
                Output.err("sealpost: queue \(verb) \(id): \(reply.text)\n")
                failures += 1
            }
        }
        if failures > 0 {
            throw AdminFailure(message: "queue \(verb): \(failures) of \(ids.count) messages not changed", exitCode: SysExit.unavailable)
        }
    }
}

struct QueueCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "queue",
        abstract: "List, show and act on the messages in the queue.",
        subcommands: [List.self, Show.self, Flush.self, Delete.self, Hold.self, Release.self, Stats.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the queue like mailq: ID (\"!\" when held), size, arrival, sender, recipients with their state.")
        @OptionGroup var options: GlobalOptions

        func run() throws {
            try reporting { () throws(AdminFailure) in
                let reply = try options.connect().request("list")
                guard reply.ok else { throw AdminFailure(message: "queue list: \(reply.text)", exitCode: SysExit.unavailable) }
                Output.out(QueueFormat.list(reply.entries))
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a message: its envelope and recipients, then the message.")
        @OptionGroup var options: GlobalOptions
        @Flag(help: "Print the message exactly as queued (CRLF line ends, control characters unescaped: not for a terminal).") var raw = false
        @Argument(help: "The queue ID.") var queueID: String

        func run() throws {
            try reporting { () throws(AdminFailure) in
                let id = try QueueFormat.normalizeID(queueID)
                let reply = try options.connect().request("show", queueID: id)
                guard reply.ok else { throw AdminFailure(message: "queue show \(id): \(reply.text)", exitCode: SysExit.unavailable) }
                guard let entry = reply.entries.first else {
                    throw AdminFailure(message: "queue show \(id): the queue sent no entry (\(reply.text))", exitCode: SysExit.protocolErr)
                }
                Output.out(QueueFormat.envelope(entry))
                Output.out(bytes: QueueFormat.message(entry.body, raw: raw))
            }
        }
    }

    struct Flush: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Try to deliver now: one message, or every deferred message.")
        @OptionGroup var options: GlobalOptions
        @Argument(help: "The queue ID (default: all messages).") var queueID: String?
        func run() throws { try simpleRequest(options, "flush", queueID: queueID) }
    }

    static let idsHelp = ArgumentHelp("Queue IDs; ALL for every message; - to read IDs from standard input, one per line.",
                                      valueName: "queue-id")

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete messages from the queue.")
        @OptionGroup var options: GlobalOptions
        @Flag(help: "Return each message to its sender with a delivery status notification.") var bounce = false
        @Argument(help: QueueCommand.idsHelp) var queueIDs: [String]
        func run() throws { try requestForEach(options, "delete", queueIDs, bounce: bounce) }
    }

    struct Hold: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Put messages on hold: no delivery until released.")
        @OptionGroup var options: GlobalOptions
        @Argument(help: QueueCommand.idsHelp) var queueIDs: [String]
        func run() throws { try requestForEach(options, "hold", queueIDs) }
    }

    struct Release: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Release held messages.")
        @OptionGroup var options: GlobalOptions
        @Argument(help: QueueCommand.idsHelp) var queueIDs: [String]
        func run() throws { try requestForEach(options, "release", queueIDs) }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the queue's statistics.")
        @OptionGroup var options: GlobalOptions
        func run() throws { try simpleRequest(options, "stats") }
    }
}

/// Standard input for the prompts and `-`, through read(2).
enum Input {
    /// One line (without its LF, or CRLF) read byte by byte, so nothing
    /// after it is consumed (a password prompt's input, or the IDs of `-`);
    /// nil at end of input before any byte.
    static func line(fd: Int32) -> String? {
        lineBytes(fd: fd).map { String(decoding: $0, as: UTF8.self) }
    }

    /// The same line as bytes (CR of a CRLF removed), for input that must
    /// be valid UTF-8 rather than repaired (a password).
    static func lineBytes(fd: Int32) -> [UInt8]? {
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            let n = Glibc.read(fd, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            if byte == 10 { return withoutCR(bytes) }
            bytes.append(byte)
            if bytes.count > 4096 { break }
        }
        return bytes.isEmpty ? nil : withoutCR(bytes)
    }

    private static func withoutCR(_ bytes: [UInt8]) -> [UInt8] {
        bytes.last == 13 ? Array(bytes.dropLast()) : bytes
    }
}

/// stdout and stderr through write(2) (the C globals are not
/// concurrency-safe in Swift 6), with partial writes and EINTR handled.
enum Output {
    static func out(_ s: String) { write(1, Array(s.utf8)) }
    static func out(bytes: [UInt8]) { write(1, bytes) }
    static func err(_ s: String) { write(2, Array(s.utf8)) }

    private static func write(_ fd: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                return   // stdout closed (e.g. a pager quit): nothing better to do
            }
            offset += n
        }
    }
}
