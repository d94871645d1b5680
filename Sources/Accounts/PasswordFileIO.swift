// Reading and writing the password file with plain POSIX calls (no
// Foundation): the reader checks who may see the file, the writer replaces
// it atomically.
//
// Writing (the sealpost CLI), as vipw does: the new text goes to
// PATH.tmp, created with O_EXCL (so two concurrent edits cannot both
// proceed: the second is told to wait), given the owner, group and mode of
// the file it replaces (a new file: 0600, owned by whoever runs the
// command), written, fsync'd, renamed over PATH, and the directory is
// fsync'd so the rename survives a crash. A reader therefore sees the old
// file or the new one, never a mix.

import FileAccess
import SealpostConfig

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension PasswordFile {
    /// Reads and parses the file at `path`. With `requirePrivate` (what
    /// smtp-listen asks for), refuses a file that is not a regular file,
    /// that others may read, write or search, or that its group may write,
    /// and (when running as root) one not owned by root: each would let
    /// someone else read the hashes or add an account.
    public static func load(path: String, requirePrivate: Bool = true) throws(PasswordFileError) -> PasswordFile {
        let bytes: [UInt8]
        let info: stat
        do {
            (bytes, info) = try WholeFile.read(path, maximumSize: maximumFileSize, options: .noFollow)
        } catch {
            throw PasswordFileError(file: path, message: error.withoutPath)
        }
        if requirePrivate {
            let mode = info.st_mode & 0o7777
            if mode & 0o007 != 0 {
                throw PasswordFileError(file: path, message: "mode \(octal(mode)) lets every user \(mode & 0o004 != 0 ? "read the password hashes" : "at the file"); run: chmod 600 \(path)")
            }
            if mode & 0o020 != 0 {
                throw PasswordFileError(file: path, message: "mode \(octal(mode)) lets the group write it; run: chmod 600 \(path)")
            }
            let euid = geteuid()
            if info.st_uid != 0 && info.st_uid != euid {
                throw PasswordFileError(file: path, message: "owned by uid \(info.st_uid), expected root\(euid == 0 ? "" : " or uid \(euid)")")
            }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            var line = 1
            for content in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
                if String(validating: content, as: UTF8.self) == nil { break }
                line += 1
            }
            throw PasswordFileError(file: path, line: line, message: "not valid UTF-8")
        }
        return try parse(text, file: path)
    }

    /// `load`, or an empty file when `path` does not exist (the CLI's first
    /// `user add`).
    public static func loadOrEmpty(path: String) throws(PasswordFileError) -> PasswordFile {
        var info = stat()
        if lstat(path, &info) != 0 && errno == ENOENT { return PasswordFile() }
        return try load(path: path, requirePrivate: false)
    }

    /// Replaces the file at `path` with `render()`, atomically (see the
    /// header). `newFileMode` applies only when no file exists yet.
    /// `holdingLock`: the caller holds the lock that serializes changes
    /// (the CLI's PATH.lock), so a PATH.tmp found is one a crash left, and
    /// is removed rather than blocking every change until someone does.
    public func write(path: String, newFileMode: mode_t = 0o600, holdingLock: Bool = false) throws(PasswordFileError) {
        let temporary = path + ".tmp"
        var old = stat()
        let exists = stat(path, &old) == 0
        if !exists && errno != ENOENT {
            throw PasswordFileError(file: path, message: "cannot stat: \(Self.errorText(errno))")
        }
        // Never widen access: others get nothing, whatever the old mode was.
        let mode = exists ? (old.st_mode & 0o7770 & ~0o020) : newFileMode
        var fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode)
        if fd < 0 && errno == EEXIST && holdingLock && unlink(temporary) == 0 {
            fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode)
        }
        guard fd >= 0 else {
            if errno == EEXIST {
                throw PasswordFileError(file: temporary, message: "exists: another change to \(path) is in progress (remove \(temporary) if none is)")
            }
            throw PasswordFileError(file: temporary, message: "cannot create: \(Self.errorText(errno))")
        }
        var done = false
        defer {
            if !done { unlink(temporary) }
        }
        do {
            defer { close(fd) }
            if exists {
                // Keep the owner and group an administrator chose (e.g.
                // root:sealpost 0640); as non-root fchown to our own uid and
                // one of our groups works. A file that could not keep them
                // would be refused by smtp-listen at its next start (it
                // checks the owner): no SMTP at all, for a "success" here.
                if fchown(fd, old.st_uid, old.st_gid) != 0 {
                    throw PasswordFileError(file: path, message: "cannot keep its owner \(old.st_uid):\(old.st_gid): \(Self.errorText(errno)) (run this as root or as that user)")
                }
            }
            // The umask may have narrowed the mode given to open.
            guard fchmod(fd, mode) == 0 else {
                throw PasswordFileError(file: temporary, message: "cannot set mode: \(Self.errorText(errno))")
            }
            let code = WholeFile.writeAll(fd, Array(render().utf8))
            guard code == 0 else {
                throw PasswordFileError(file: temporary, message: "cannot write: \(Self.errorText(code))")
            }
            guard fsync(fd) == 0 else { throw PasswordFileError(file: temporary, message: "cannot fsync: \(Self.errorText(errno))") }
        }
        guard rename(temporary, path) == 0 else {
            throw PasswordFileError(file: path, message: "cannot rename \(temporary) over it: \(Self.errorText(errno))")
        }
        done = true
        // Best effort: the new file is in place; only its surviving a crash
        // at this instant is in doubt.
        try? WholeFile.syncDirectory(WholeFile.directory(of: path))
    }

    static func errorText(_ code: Int32) -> String { String(cString: strerror(code)) }

    static func octal(_ mode: mode_t) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }
}
