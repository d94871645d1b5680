// The log: <data>/log/sealpost.log, written with O_APPEND in whole lines
// only (one write(2) per line, or per batch of lines a drain of the stages'
// pipes produced), so lines from the supervisor and its stages never
// interleave mid-line.
//
// A disk that is full (or failing) never stops the mail: the supervisor goes
// on draining the stages' pipes, and the lines it cannot write are counted,
// not queued. A line that a write cut short is ended, at the next write that
// succeeds, with " [cut: log write failed]" (the file never shrinks: log
// followers such as tail -F or a shipper would take a shrink for a rotation
// and read it all again), and the first line written afterwards says how
// many lines did not reach the log, since when and why.

#if canImport(Glibc)
import Glibc
#endif
import FileAccess

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
    /// Lines not written since the last write that succeeded, the time of
    /// the first of them and the last error.
    private var lostLines = 0
    private var lostSince: time_t = 0
    private var lostReason = ""
    /// The file ends inside a line (a write cut short): the next write
    /// starts by ending it.
    private var torn = false
    static let tornEnding = Array(" [cut: log write failed]\n".utf8)

    /// Lines lost to failed writes and not reported yet (for tests).
    var unreportedLostLines: Int { lostLines }

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
        if fstat(newFD, &info) == 0, info.st_mode & S_IFMT == S_IFREG, info.st_mode & 0o007 != 0 {
            _ = fchmod(newFD, info.st_mode & 0o770)
        }
        flush()   // queued lines belong to the file being rotated away
        // A line cut short is ended in its own file, not at the top of
        // the next one.
        if torn && fd >= 0 { _ = writeWholeLines(Self.tornEnding) }
        torn = false
        if fd >= 0 { Glibc.close(fd) }
        fd = newFD
    }

    /// Writes one attributed line ("queue[812]: ...") with its timestamp,
    /// after any lines `append` queued. Before the file is open, lines go
    /// to standard error.
    public func write(_ line: String) {
        guard fd >= 0 else {
            _ = WholeFile.writeAll(2, Array("\(line)\n".utf8))
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
        writePending(evenIfNone: false)
    }

    /// `flush`; with `evenIfNone`, also the notice of lines not written
    /// (and the ending of a line cut short) when no line is queued.
    private func writePending(evenIfNone: Bool) {
        guard !pending.isEmpty || (evenIfNone && lostLines > 0) else { return }
        defer { pending.removeAll(keepingCapacity: true) }
        guard fd >= 0 else {
            _ = WholeFile.writeAll(2, pending)
            return
        }
        // The ending of a line cut short, then the notice: neither is one
        // more lost line when it cannot be written either.
        var batch: [UInt8] = torn ? Self.tornEnding : []
        let ending = batch.count
        var notice = ending
        if lostLines > 0 {
            addStamped(lostNotice(), to: &batch)
            notice = batch.count
        }
        batch.append(contentsOf: pending)
        let (written, cut, error) = writeWholeLines(batch)
        if written >= ending { torn = cut > 0 }
        if let error {
            // A notice that made it into the file reported what was lost so far.
            if notice > ending && written >= notice { lostLines = 0 }
            // The queued lines not in the file, not even in part (a line
            // cut short is there in part, and ended later).
            let unwritten = batch[max(notice, written + cut)...]
            let lost = unwritten.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) } - (cut > 0 && written >= notice ? 1 : 0)
            if lostLines == 0 && lost > 0 { lostSince = time(nil) }
            lostLines += lost
            lostReason = String(cString: strerror(error))
            if !echo { _ = WholeFile.writeAll(2, Array(unwritten)) }
        } else {
            lostLines = 0
        }
        if echo { _ = WholeFile.writeAll(1, pending) }
    }

    private func lostNotice() -> String {
        "supervise[\(getpid())]: warning: \(lostLines) log line\(lostLines == 1 ? "" : "s") not written since "
            + "\(LogFormat.timestamp(lostSince)): \(lostReason)"
    }

    /// Writes `bytes` (whole lines) to the log; returns how many bytes are
    /// in the file as whole lines, how many more of a line cut short, and
    /// the error that stopped the rest.
    private func writeWholeLines(_ bytes: [UInt8]) -> (written: Int, cut: Int, error: Int32?) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n > 0 {
                offset += n
                continue
            }
            // write(2) of a regular file returns 0 only when it cannot go on.
            let error = n == 0 ? EIO : errno
            if error == EINTR { continue }
            let whole = (bytes[..<offset].lastIndex(of: UInt8(ascii: "\n")) ?? -1) + 1
            return (whole, offset - whole, error)
        }
        return (offset, 0, nil)
    }

    private func addStamped(_ line: String) {
        addStamped(line, to: &pending)
    }

    private func addStamped(_ line: String, to buffer: inout [UInt8]) {
        let now = time(nil)
        if now != stampSecond {
            stampSecond = now
            stampPrefix = Array("\(LogFormat.timestamp(now)) \(host) ".utf8)
        }
        buffer.append(contentsOf: stampPrefix)
        buffer.append(contentsOf: line.utf8)
        buffer.append(UInt8(ascii: "\n"))
    }

    public func close() {
        // Lines lost at the end are reported still, when the disk allows.
        writePending(evenIfNone: true)
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }
}
