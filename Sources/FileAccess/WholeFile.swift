// Reading a small file whole and replacing one atomically, with plain POSIX
// calls, once for every module that reads a configuration file, a table or
// a key-less secret (aliases, passwords, transport, PEM, the local
// recipient table, the supervisor's own files): each of them bounds what
// it reads, refuses what is not a regular file and retries after EINTR,
// and a reader must never block on a FIFO put where a file was expected.
// Callers turn a FileError into their own typed error; its text names the
// step and the system's reason.

#if canImport(Glibc)
import Glibc
#endif

/// Why a file could not be read or replaced.
public struct FileError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Reason: Equatable, Sendable {
        /// `step` failed with this errno.
        case system(Int32)
        case notRegularFile
        /// More than `limit` bytes.
        case tooLarge(limit: Int)
    }

    /// The system call's role: "open", "stat", "read", "create", "write",
    /// "sync", "rename".
    public var step: String
    public var path: String
    public var reason: Reason

    public init(step: String, path: String, reason: Reason) {
        self.step = step
        self.path = path
        self.reason = reason
    }

    /// `step` failed with the current errno.
    static func system(_ step: String, _ path: String, _ code: Int32 = errno) -> FileError {
        FileError(step: step, path: path, reason: .system(code))
    }

    /// The file does not exist (or a directory on its path does not).
    public var isMissing: Bool { reason == .system(ENOENT) }

    /// Without the path, for errors that name the file on their own:
    /// "cannot open: No such file or directory", "not a regular file",
    /// "larger than 1048576 bytes".
    public var withoutPath: String {
        switch reason {
        case .system(let code): "cannot \(step): \(String(cString: strerror(code)))"
        case .notRegularFile: "not a regular file"
        case .tooLarge(let limit): "larger than \(limit) bytes"
        }
    }

    /// "cannot open /etc/x: No such file or directory", "/etc/x: not a
    /// regular file".
    public var description: String {
        switch reason {
        case .system(let code): "cannot \(step) \(path): \(String(cString: strerror(code)))"
        case .notRegularFile, .tooLarge: "\(path): \(withoutPath)"
        }
    }
}

public enum WholeFile {
    /// How to open the file.
    public struct Options: OptionSet, Sendable {
        public let rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        /// Refuse a symbolic link as the last component (O_NOFOLLOW): for
        /// files in a directory another user may write.
        public static let noFollow = Options(rawValue: 1)
        /// Also read a character device, bounded as a file is: /dev/null
        /// as an empty file, the way an administrator turns a table off.
        public static let characterDevices = Options(rawValue: 2)
    }

    /// The content of the regular file at `path`, at most `maximumSize`
    /// bytes, and its status (fstat of what was read).
    public static func read(_ path: String, maximumSize: Int,
                            options: Options = []) throws(FileError) -> (bytes: [UInt8], status: stat) {
        // O_NONBLOCK: a FIFO where the file should be must not hang the
        // reader before fstat refuses it. Regular files ignore the flag.
        let flags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (options.contains(.noFollow) ? O_NOFOLLOW : 0)
        let fd = open(path, flags)
        guard fd >= 0 else { throw .system("open", path) }
        defer { close(fd) }
        return try read(descriptor: fd, path: path, maximumSize: maximumSize, options: options)
    }

    /// `read`, or nil when the file does not exist.
    public static func readIfPresent(_ path: String, maximumSize: Int,
                                     options: Options = []) throws(FileError) -> (bytes: [UInt8], status: stat)? {
        do {
            return try read(path, maximumSize: maximumSize, options: options)
        } catch where error.isMissing && error.step == "open" {
            return nil
        }
    }

    /// The whole content of the regular file open on `descriptor`, from
    /// offset 0 (pread: the offset may be shared with whoever opened it),
    /// at most `maximumSize` bytes; `path` names it in errors. Of the
    /// options, only `.characterDevices` applies. Does not close
    /// `descriptor`.
    public static func read(descriptor fd: Int32, path: String, maximumSize: Int,
                            options: Options = []) throws(FileError) -> (bytes: [UInt8], status: stat) {
        precondition(maximumSize < Int.max, "a bound, one byte more than which is read")
        var status = stat()
        guard fstat(fd, &status) == 0 else { throw .system("stat", path) }
        let type = status.st_mode & S_IFMT
        guard type == S_IFREG || (type == S_IFCHR && options.contains(.characterDevices)) else {
            throw FileError(step: "stat", path: path, reason: .notRegularFile)
        }
        guard status.st_size <= maximumSize else {
            throw FileError(step: "stat", path: path, reason: .tooLarge(limit: maximumSize))
        }
        // One byte more than the size: the end is seen in one pass when the
        // file did not grow meanwhile.
        // (At least a page: files of /proc say they have no size.)
        var bytes = [UInt8](repeating: 0, count: min(max(Int(status.st_size), 4095), maximumSize) + 1)
        var filled = 0
        while true {
            if filled == bytes.count {
                // It grew while being read: read on, within the bound.
                guard bytes.count <= maximumSize else {
                    throw FileError(step: "read", path: path, reason: .tooLarge(limit: maximumSize))
                }
                bytes += [UInt8](repeating: 0, count: min(bytes.count, maximumSize + 1 - bytes.count))
            }
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + filled, $0.count - filled, off_t(filled)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .system("read", path)
            }
            if n == 0 { break }
            filled += n
        }
        bytes.removeLast(bytes.count - filled)
        return (bytes, status)
    }

    /// Writes all of `bytes` to `fd`, after short writes and EINTR; 0 or
    /// the errno of the failed write.
    public static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32 {
        var offset = 0
        while offset < bytes.count {
            let n = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if n == 0 { return EIO }   // not for a non-empty write; never spin
            offset += n
        }
        return 0
    }

    /// `writeAll` of an array.
    public static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Int32 {
        bytes.withUnsafeBytes { writeAll(fd, $0) }
    }

    /// Replaces the file at `path` with `bytes`: written to `temporary`
    /// (in the same directory; one left by a writer that died is removed
    /// first), given `mode` whatever the umask, then renamed over `path`,
    /// so a reader sees the old file or the new one, never a part. With
    /// `durable`, the new file is synced before the rename and the
    /// directory after it, so the replacement survives a crash.
    public static func replace(_ path: String, with bytes: [UInt8], mode: mode_t, temporary: String,
                               durable: Bool = false) throws(FileError) {
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode)
        guard fd >= 0 else { throw .system("create", temporary) }
        var failure: FileError?
        if fchmod(fd, mode) != 0 {
            failure = .system("create", temporary)
        } else if case let code = writeAll(fd, bytes), code != 0 {
            failure = .system("write", temporary, code)
        } else if durable && fsync(fd) != 0 {
            failure = .system("sync", temporary)
        }
        if close(fd) != 0 && failure == nil { failure = .system("write", temporary) }
        if failure == nil && rename(temporary, path) != 0 { failure = .system("rename", path) }
        if let failure {
            unlink(temporary)
            throw failure
        }
        if durable { try syncDirectory(directory(of: path)) }
    }

    /// fsync of `directory`: makes the creation, renaming or removal of
    /// its entries durable. A file system that cannot sync a directory
    /// (EINVAL, EROFS) makes them as durable as it does: not an error.
    public static func syncDirectory(_ directory: String) throws(FileError) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .system("open", directory) }
        defer { close(fd) }
        if fsync(fd) != 0, case let code = errno, code != EINVAL && code != EROFS {
            throw .system("sync", directory, code)
        }
    }

    /// The directory part of `path` ("/a/b" -> "/a", "/a" -> "/", "b" -> ".").
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
