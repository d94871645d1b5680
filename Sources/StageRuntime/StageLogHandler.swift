#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging

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
        let line = StageLogHandler.format(stage: stage, pid: getpid(), level: event.level,
                                          message: event.message.description, metadata: merged)
        StageLogHandler.writeLine(line)
    }

    /// The line for one event, newline included. Pure.
    ///
    /// `stage[pid]: [severity: ]message[ key=value...]`; metadata sorted by
    /// key. Control characters are escaped (`\n`, `\u{1b}`) so that text from
    /// the network cannot forge or split log lines. Cut to
    /// `maximumLineLength` bytes on a character boundary, marked with "...".
    public static func format(stage: String, pid: Int32, level: Logger.Level,
                              message: String, metadata: Logger.Metadata = [:]) -> String {
        var line = "\(stage)[\(pid)]: "
        switch level {
        case .trace: line += "trace: "
        case .debug: line += "debug: "
        case .info, .notice: break
        case .warning: line += "warning: "
        case .error: line += "error: "
        case .critical: line += "fatal: "
        }
        appendEscaped(message, to: &line)
        for key in metadata.keys.sorted() {
            line += " "
            appendEscaped(key, to: &line)
            line += "="
            appendEscaped(render(metadata[key]!), to: &line)
        }
        let limit = maximumLineLength - 1
        if line.utf8.count > limit {
            var cut = line.utf8.index(line.utf8.startIndex, offsetBy: limit - 3)
            // Back off to the start of a scalar so the output stays UTF-8.
            while cut > line.utf8.startIndex, !line.unicodeScalars.indices.contains(cut) {
                cut = line.utf8.index(before: cut)
            }
            line = String(line[..<cut]) + "..."
        }
        return line + "\n"
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

    static func appendEscaped(_ text: String, to line: inout String) {
        for scalar in text.unicodeScalars {
            switch scalar.value {
            case 0x0A: line += "\\n"
            case 0x0D: line += "\\r"
            case 0x09: line += "\\t"
            case 0..<0x20, 0x7F: line += "\\u{\(String(scalar.value, radix: 16))}"
            default: line.unicodeScalars.append(scalar)
            }
        }
    }

    /// One write(2) to fd 2; retried on EINTR. A short write to a pipe of a
    /// line under PIPE_BUF does not happen; to a file it is continued.
    static func writeLine(_ line: String) {
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { buffer in
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
