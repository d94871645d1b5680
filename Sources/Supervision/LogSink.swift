// The log: <data>/log/sealpost.log, one write(2) per line (O_APPEND), so
// lines from the supervisor and its stages never interleave mid-line.

#if canImport(Glibc)
import Glibc
#endif

public final class LogSink {
    public let path: String
    private let host: String
    private let echo: Bool
    private var fd: Int32 = -1

    /// `echo`: also write every line to standard output (--foreground).
    public init(path: String, hostname: String, echo: Bool) {
        self.path = path
        self.host = LogFormat.shortHostname(hostname)
        self.echo = echo
    }

    /// Opens (or, after SIGHUP, reopens: log rotation) the log file.
    public func open() throws {
        let newFD = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0o644)
        guard newFD >= 0 else { throw SystemError("open", path: path) }
        if fd >= 0 { Glibc.close(fd) }
        fd = newFD
    }

    /// Writes one attributed line ("queue[812]: ...") with its timestamp.
    /// Before the file is open, lines go to standard error.
    public func write(_ line: String) {
        var bytes = Array("\(LogFormat.timestamp(time(nil))) \(host) \(line)\n".utf8)
        if fd >= 0 {
            if !writeAll(fd, bytes) && !echo { writeAll(2, bytes) }
            if echo { writeAll(1, bytes) }
        } else {
            bytes = Array("\(line)\n".utf8)
            writeAll(2, bytes)
        }
    }

    public func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }
}
