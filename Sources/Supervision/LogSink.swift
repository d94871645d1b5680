// The log: <data>/log/sealpost.log, written with O_APPEND in whole lines
// only (one write(2) per line, or per batch of lines a drain of the stages'
// pipes produced), so lines from the supervisor and its stages never
// interleave mid-line.

#if canImport(Glibc)
import Glibc
#endif

public final class LogSink {
    public let path: String
    private let host: String
    private let echo: Bool
    private var fd: Int32 = -1
    /// Lines queued by `append`, timestamped, not yet written.
    private var pending: [UInt8] = []
    /// "Nov 29 16:13:43 host " for `stampSecond`: formatting the time
    /// (localtime_r, strftime) once a second rather than once a line.
    private var stampSecond: time_t = -1
    private var stampPrefix: [UInt8] = []
    /// Past this many bytes queued, `append` writes at once.
    static let batchLimit = 32 * 1024

    /// `echo`: also write every line to standard output (--foreground).
    public init(path: String, hostname: String, echo: Bool) {
        self.path = path
        self.host = LogFormat.shortHostname(hostname)
        self.echo = echo
    }

    /// Opens (or, after SIGHUP, reopens: log rotation) the log file.
    public func open() throws {
        let newFD = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0o640)
        guard newFD >= 0 else { throw SystemError("open", path: path) }
        // The log names every sender and recipient: never readable by all,
        // also when an older version (0644) or a rotation tool made it.
        var info = stat()
        if fstat(newFD, &info) == 0, info.st_mode & 0o007 != 0 {
            _ = fchmod(newFD, info.st_mode & 0o770)
        }
        flush()   // queued lines belong to the file being rotated away
        if fd >= 0 { Glibc.close(fd) }
        fd = newFD
    }

    /// Writes one attributed line ("queue[812]: ...") with its timestamp,
    /// after any lines `append` queued. Before the file is open, lines go
    /// to standard error.
    public func write(_ line: String) {
        guard fd >= 0 else {
            writeAll(2, Array("\(line)\n".utf8))
            return
        }
        addStamped(line)
        flush()
    }

    /// Queues one attributed line; `flush()` writes all queued lines in one
    /// write(2) per destination. For a burst of lines (a drain of the
    /// stages' pipes): the log stays line-atomic and costs far fewer calls.
    public func append(_ line: String) {
        guard fd >= 0 else {
            write(line)
            return
        }
        addStamped(line)
        if pending.count >= Self.batchLimit { flush() }
    }

    /// Writes the lines `append` queued.
    public func flush() {
        guard !pending.isEmpty else { return }
        if fd >= 0 {
            if !writeAll(fd, pending) && !echo { writeAll(2, pending) }
            if echo { writeAll(1, pending) }
        } else {
            writeAll(2, pending)
        }
        pending.removeAll(keepingCapacity: true)
    }

    private func addStamped(_ line: String) {
        let now = time(nil)
        if now != stampSecond {
            stampSecond = now
            stampPrefix = Array("\(LogFormat.timestamp(now)) \(host) ".utf8)
        }
        pending.append(contentsOf: stampPrefix)
        pending.append(contentsOf: line.utf8)
        pending.append(UInt8(ascii: "\n"))
    }

    public func close() {
        flush()
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }
}
