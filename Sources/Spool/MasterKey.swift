// The spool master key: `spool.key` in the spool directory, 32 random bytes,
// readable by the queue user alone. Every per-message body key is stored
// wrapped (crypto_secretbox) under it, so the LMDB files alone reveal no
// message body.

import FileAccess
import Sodium
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

enum MasterKey {
    static let fileName = "spool.key"

    /// Reads `directory/spool.key`, creating it when absent and `mayCreate`.
    /// Refuses a key file that is not a regular file, has the wrong size, or
    /// grants any permission to group or others.
    static func load(directory: String, mayCreate: Bool) throws(SpoolError) -> SecretKey {
        let path = directory + "/" + fileName
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 {
            let e = errno
            guard e == ENOENT else { throw .io("\(path): cannot open: \(errnoText(e))") }
            guard mayCreate else {
                // A spool with queued mail but no key: a new key could not
                // decrypt anything, and would silently orphan the bodies.
                throw .io("\(path) is missing but the spool already holds data; restore the key file (refusing to create a new key that cannot decrypt queued mail)")
            }
            return try create(directory: directory, path: path)
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .io("\(path): fstat: \(errnoText(errno))") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw .io("\(path) is not a regular file") }
        guard st.st_uid == geteuid() else {
            throw .io("\(path) is owned by uid \(st.st_uid), but the queue runs as uid \(geteuid())")
        }
        guard st.st_mode & 0o077 == 0 else {
            throw .io("\(path) is accessible by group or others (mode \(String(st.st_mode & 0o777, radix: 8))); it must be 0600 (chmod 600 \(path))")
        }
        guard st.st_size == off_t(SecretKey.byteCount) else {
            throw .corrupt("\(path) has \(st.st_size) bytes, a spool key has \(SecretKey.byteCount)")
        }
        var bytes = [UInt8](repeating: 0, count: SecretKey.byteCount)
        defer { Sodium.memzero(&bytes) }
        let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n == SecretKey.byteCount else { throw .io("\(path): short read (\(n))") }
        do { return try SecretKey(bytes: bytes, guarded: true) } catch { throw .corrupt("\(path): \(error)") }
    }

    /// Creates the key file atomically: written and synced under a temporary
    /// name, then linked to its final name (link fails if another process
    /// won the race), then the directory is synced. A crash leaves either no
    /// key or a complete one, never a short file.
    private static func create(directory: String, path: String) throws(SpoolError) -> SecretKey {
        let key = SecretKey()
        let temporary = path + ".new"
        unlink(temporary)   // leftover of a crash before the link: never used
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw .io("\(temporary): cannot create: \(errnoText(errno))") }
        var ok = false
        defer {
            if !ok { unlink(temporary) }
        }
        let written = key.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        let syncErrno = errno
        close(fd)
        guard written == SecretKey.byteCount else { throw .io("\(temporary): write failed: \(errnoText(errno))") }
        guard synced else { throw .io("\(temporary): fsync: \(errnoText(syncErrno))") }
        guard link(temporary, path) == 0 else { throw .io("\(path): cannot create: \(errnoText(errno))") }
        unlink(temporary)
        ok = true
        try syncDirectory(directory)
        // Kept as a loaded key is: in guarded memory.
        do {
            return try key.withUnsafeBytes { bytes throws(SodiumError) in try SecretKey(bytes: bytes, guarded: true) }
        } catch {
            throw .corrupt("\(path): \(error)")
        }
    }
}

func errnoText(_ e: Int32) -> String { String(cString: strerror(e)) }

/// fsync on a directory makes the creation (or removal) of its entries durable.
func syncDirectory(_ path: String) throws(SpoolError) {
    do {
        try WholeFile.syncDirectory(path)
    } catch {
        throw .io(error.description)
    }
}

/// close(2), reachable from types that have their own `close()`.
func closeDescriptor(_ fd: Int32) { _ = close(fd) }
