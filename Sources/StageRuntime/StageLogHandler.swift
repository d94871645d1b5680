#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import Synchronization

/// The process ID for log lines, 0 until first asked (see processID()).
private let cachedProcessID = Atomic<Int32>(0)

/// Registered once: a forked child must not log with its parent's pid.
private let registerForkHandler: Void = {
    _ = pthread_atfork(nil, nil, { cachedProcessID.store(0, ordering: .relaxed) })
}()

/// A swift-log handler writing one line per event to stderr:
///
///     queue[1234]: 0123456789AB: from=<a@example.org>, size=1234
///     queue[1234]: warning: spool 91% full
///     queue[1234]: fatal: cannot open the spool: Permission denied
///
/// No timestamps: the supervisor adds them when it collects stderr. Each
/// line goes out in one write(2) and is cut to fit PIPE_BUF, so lines from
/// concurrent threads or processes sharing the pipe never interleave.
public struct StageLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public var logLevel: Logger.Level
    /// The name in front of every line ("queue"); the logger's label is not
    /// shown (a stage is one process; its modules need no names in the log).
    public let stage: String

    /// Longest line written, newline included: PIPE_BUF, the atomic limit.
    public static let maximumLineLength = 4096

    public init(stage: String, logLevel: Logger.Level? = nil, metadataProvider: Logger.MetadataProvider? = nil) {
        self.stage = stage
        self.logLevel = logLevel ?? StageLogHandler.defaultLevel()
        self.metadataProvider = metadataProvider
    }

    /// .debug when SEALPOST_DEBUG=1, else .info (debug and trace suppressed).
    public static func defaultLevel() -> Logger.Level {
        guard let value = getenv("SEALPOST_DEBUG"), String(cString: value) == "1" else { return .info }
        return .trace
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let explicit = event.metadata { merged.merge(explicit) { _, new in new } }
        let line = StageLogHandler.formatBytes(stage: stage, pid: StageLogHandler.processID(), level: event.level,
                                               message: event.message.description, metadata: merged)
        StageLogHandler.writeLine(line, urgent: event.level >= .error)
    }

    /// getpid() without a system call per line: the value is cached, and
    /// forgotten in a forked child (pthread_atfork), which has a pid of its own.
    static func processID() -> Int32 {
        let cached = cachedProcessID.load(ordering: .relaxed)
        if cached != 0 { return cached }
        _ = registerForkHandler
        let pid = getpid()
        cachedProcessID.store(pid, ordering: .relaxed)
        return pid
    }

    /// The line for one event, newline included. Pure.
    ///
    /// `stage[pid]: [severity: ]message[ key=value...]`; metadata sorted by
    /// key. Control characters are escaped (`\n`, `\u{1b}`) so that text from
    /// the network cannot forge or split log lines. Cut to
    /// `maximumLineLength` bytes on a character boundary, marked with "...".
    public static func format(stage: String, pid: Int32, level: Logger.Level,
                              message: String, metadata: Logger.Metadata = [:]) -> String {
        String(decoding: formatBytes(stage: stage, pid: pid, level: level, message: message, metadata: metadata),
               as: UTF8.self)
    }

    /// `format` as UTF-8 bytes, built in one buffer: no intermediate
    /// Strings on the path every log line takes.
    static func formatBytes(stage: String, pid: Int32, level: Logger.Level,
                            message: String, metadata: Logger.Metadata = [:]) -> [UInt8] {
        var line: [UInt8] = []
        line.reserveCapacity(stage.utf8.count + message.utf8.count + 32)
        line.append(contentsOf: stage.utf8)
        line.append(UInt8(ascii: "["))
        line.append(contentsOf: String(pid).utf8)   // a small String: no allocation
        line.append(contentsOf: "]: ".utf8)
        switch level {
        case .trace: line.append(contentsOf: "trace: ".utf8)
        case .debug: line.append(contentsOf: "debug: ".utf8)
        case .info, .notice: break
        case .warning: line.append(contentsOf: "warning: ".utf8)
        case .error: line.append(contentsOf: "error: ".utf8)
        case .critical: line.append(contentsOf: "fatal: ".utf8)
        }
        appendEscaped(message, to: &line)
        if !metadata.isEmpty {
            for key in metadata.keys.sorted() {
                line.append(UInt8(ascii: " "))
                appendEscaped(key, to: &line)
                line.append(UInt8(ascii: "="))
                appendEscaped(render(metadata[key]!), to: &line)
            }
        }
        let limit = maximumLineLength - 1
        if line.count > limit {
            var cut = limit - 3
            // Back off to the start of a scalar (not a continuation byte,
            // 10xxxxxx) so the output stays UTF-8.
            while cut > 0, line[cut] & 0xC0 == 0x80 { cut -= 1 }
            line.removeSubrange(cut...)
            line.append(contentsOf: "...".utf8)
        }
        line.append(UInt8(ascii: "\n"))
        return line
    }

    static func render(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let string): return string
        case .stringConvertible(let convertible): return convertible.description
        case .array(let array): return "[" + array.map(render).joined(separator: ", ") + "]"
        case .dictionary(let dictionary):
            return "[" + dictionary.keys.sorted().map { "\($0): \(render(dictionary[$0]!))" }.joined(separator: ", ") + "]"
        }
    }

    /// Appends `text`'s UTF-8 with control characters escaped. Over bytes:
    /// every control character (C0, DEL) is one byte in UTF-8, and no byte
    /// of a multi-byte scalar is below 0x80, so this equals escaping scalars.
    static func appendEscaped(_ text: String, to line: inout [UInt8]) {
        var text = text
        text.withUTF8 { bytes in
            // The common case: nothing to escape, one bulk copy. 0xC2 and
            // 0xE2 lead the UTF-8 of the C1 controls (NEL among them) and of
            // U+2028/U+2029: line breaks to some readers of the log
            // (Python's splitlines, some viewers), so a client's SMTPUTF8
            // address could start a forged line there.
            guard bytes.contains(where: { $0 < 0x20 || $0 == 0x7F || $0 == 0xC2 || $0 == 0xE2 }) else {
                line.append(contentsOf: bytes)
                return
            }
            var i = 0
            while i < bytes.count {
                let byte = bytes[i]
                switch byte {
                case 0x0A: line.append(contentsOf: "\\n".utf8)
                case 0x0D: line.append(contentsOf: "\\r".utf8)
                case 0x09: line.append(contentsOf: "\\t".utf8)
                case 0..<0x20, 0x7F: line.append(contentsOf: "\\u{\(String(byte, radix: 16))}".utf8)
                case 0xC2 where i + 1 < bytes.count && (0x80...0x9F).contains(bytes[i + 1]):
                    line.append(contentsOf: "\\u{\(String(bytes[i + 1], radix: 16))}".utf8)
                    i += 1
                case 0xE2 where i + 2 < bytes.count && bytes[i + 1] == 0x80 && (bytes[i + 2] == 0xA8 || bytes[i + 2] == 0xA9):
                    line.append(contentsOf: (bytes[i + 2] == 0xA8 ? "\\u{2028}" : "\\u{2029}").utf8)
                    i += 2
                default: line.append(byte)
                }
                i += 1
            }
        }
    }

    /// One write(2) to fd 2; retried on EINTR. A short write to a pipe of a
    /// line under PIPE_BUF does not happen; to a file it is continued.
    static func writeLine(_ line: String, urgent: Bool = false) {
        writeLine(Array(line.utf8), urgent: urgent)
    }

    /// Makes the calling thread hold the lines it logs and write them
    /// together once `schedule` runs the closure it is given, which it
    /// must do soon, on this thread or any other. For an event loop:
    /// `schedule` queues a task on the loop, which runs after the events of
    /// the current tick, so that every line logged in one tick, from every
    /// session it served, goes out in one write(2) instead of one each.
    /// Lines of level error and above are written at once, after those held
    /// before them, as is a fatal line; what is held when the process calls
    /// exit(3) is written then (an atexit handler). A line is never split,
    /// reordered or mixed with another process's; the supervisor's
    /// timestamps come later by at most a tick. Call it once per thread.
    public static func holdLinesOnThisThread(flushingWith schedule: @escaping @Sendable (@escaping @Sendable () -> Void) -> Void) {
        let hold = LineHold(schedule: schedule)
        LineHold.all.withLock { $0.append(hold) }
        _ = registerExitFlush
        pthread_setspecific(lineHoldKey, Unmanaged.passRetained(hold).toOpaque())
    }

    /// Writes what every thread holds (see holdLinesOnThisThread).
    public static func flushHeldLines() {
        for hold in LineHold.all.withLock({ $0 }) { hold.flush() }
    }

    /// Runs `body` collecting the lines this thread logs meanwhile, then
    /// writes them together: one write(2) for lines that fit PIPE_BUF, cut
    /// only between lines otherwise (so no line is ever split or mixed with
    /// another process's). For bursts of events logged at once (the queue's
    /// lines for an accepted message): every line stays its own event, the
    /// supervisor gets one read instead of several. Nested calls join the
    /// outer batch. Keep `body` short: its lines wait until it returns.
    public static func batchingLines<T>(_ body: () throws -> T) rethrows -> T {
        let key = lineBatchKey
        // A thread that holds its lines batches them already.
        if pthread_getspecific(key) != nil || pthread_getspecific(lineHoldKey) != nil { return try body() }
        let batch = LineBatch()
        pthread_setspecific(key, Unmanaged.passUnretained(batch).toOpaque())
        defer {
            pthread_setspecific(key, nil)
            batch.flush()
        }
        return try body()
    }

    static func writeLine(_ bytes: [UInt8], urgent: Bool = false) {
        if let hold = pthread_getspecific(lineHoldKey) {
            Unmanaged<LineHold>.fromOpaque(hold).takeUnretainedValue().add(bytes, urgent: urgent)
            return
        }
        if let batch = pthread_getspecific(lineBatchKey) {
            Unmanaged<LineBatch>.fromOpaque(batch).takeUnretainedValue().add(bytes)
            return
        }
        writeBytes(bytes)
    }

    fileprivate static func writeBytes(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let written = write(2, buffer.baseAddress! + offset, buffer.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    return   // stderr gone: nowhere to report it
                }
                offset += written
            }
        }
    }
}

/// The thread-specific key under which `batchingLines` keeps its batch.
private let lineBatchKey: pthread_key_t = {
    var key = pthread_key_t()
    precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
    return key
}()

/// The thread-specific key under which a thread that holds its lines
/// keeps its LineHold (retained for the life of the process).
private let lineHoldKey: pthread_key_t = {
    var key = pthread_key_t()
    precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
    return key
}()

/// Registered once: exit(3) writes what the holding threads still hold.
private let registerExitFlush: Void = {
    atexit { StageLogHandler.flushHeldLines() }
}()

/// The lines one thread holds until its scheduled flush runs (see
/// `StageLogHandler.holdLinesOnThisThread`). Locked, because the flush at
/// exit may run on another thread.
private final class LineHold: Sendable {
    static let all = Mutex<[LineHold]>([])

    private struct State {
        var lines = PendingLines()
        var flushScheduled = false
    }
    private let state = Mutex(State())
    private let schedule: @Sendable (@escaping @Sendable () -> Void) -> Void

    init(schedule: @escaping @Sendable (@escaping @Sendable () -> Void) -> Void) {
        self.schedule = schedule
    }

    func add(_ line: [UInt8], urgent: Bool) {
        let scheduleFlush = state.withLock { state in
            state.lines.add(line)
            if urgent {
                state.lines.flush()
                return false
            }
            defer { state.flushScheduled = true }
            return !state.flushScheduled
        }
        if scheduleFlush { schedule { [self] in flush() } }
    }

    func flush() {
        state.withLock { state in
            state.flushScheduled = false
            state.lines.flush()
        }
    }
}

/// Lines waiting to go out together, in writes of at most
/// maximumLineLength (PIPE_BUF): each one atomic, never split between
/// lines of another process.
private struct PendingLines {
    private var pending: [UInt8] = []

    mutating func add(_ line: [UInt8]) {
        // A line is at most maximumLineLength: written with what is
        // pending only if the two still fit one atomic write.
        if pending.count + line.count > StageLogHandler.maximumLineLength { flush() }
        pending.append(contentsOf: line)
    }

    mutating func flush() {
        guard !pending.isEmpty else { return }
        StageLogHandler.writeBytes(pending)
        pending.removeAll(keepingCapacity: true)
    }
}

/// Lines collected by `StageLogHandler.batchingLines` on one thread.
private final class LineBatch {
    private var lines = PendingLines()

    func add(_ line: [UInt8]) { lines.add(line) }

    func flush() { lines.flush() }
}
