// Maildir delivery, as specified in https://cr.yp.to/proto/maildir.html:
//
//   1. the message is written to tmp/ under a name unique to this host,
//      this process and this moment;
//   2. the file is flushed to disk (fsync) and closed;
//   3. it is hard-linked into new/ under the same name (link(2) never
//      overwrites: an existing name fails with EEXIST), then the tmp/ name is
//      removed; the new/ directory is fsync'ed so that the link itself is
//      durable;
//   4. only then is success reported.
//
// Costs per delivery, which decide how many messages a second a disk takes:
// the file's fsync is the message's own, but the fsync of new/ is shared
// (DirectorySync): deliveries into one Maildir that link their files while
// another worker's fsync of new/ is under way wait for the next one, which
// covers all of them. And a Maildir known to exist is not checked again
// (three mkdir(2) and four stat(2) per message otherwise); if it vanishes,
// the failed open finds out and it is made again.
//
// A reader (an IMAP server, a mail client) therefore never sees a partial
// file in new/, and a crash at any point leaves at worst a stale file in
// tmp/, which readers clean up after 36 hours.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import FileAccess
import Synchronization

/// Generates Maildir unique names, `SECONDS.M<usec>P<pid>Q<counter>.<host>`:
/// the modern form of the specification. The counter makes names unique
/// between deliveries of one process in the same microsecond (several worker
/// threads deliver at once); the pid between processes; the host name between
/// machines sharing the Maildir over NFS.
public final class MaildirNamer: Sendable {
    public let hostname: String
    private let counter = Mutex<UInt64>(0)
    /// getpid(2) is a system call each time (glibc caches nothing); the
    /// stage never forks.
    private let pid = getpid()

    /// `hostname` nil: the system's name (gethostname), which works after
    /// chroot too (it is a system call, not a file lookup).
    public init(hostname: String? = nil) {
        self.hostname = MaildirNamer.escape(hostname: hostname ?? MaildirNamer.systemHostname())
    }

    public func next() -> String {
        var tv = timeval()
        gettimeofday(&tv, nil)
        let n = counter.withLock { value -> UInt64 in
            value += 1
            return value
        }
        return "\(tv.tv_sec).M\(tv.tv_usec)P\(pid)Q\(n).\(hostname)"
    }

    /// The specification: "/" becomes "\057" and ":" becomes "\072", since
    /// "/" cannot be in a file name and ":" starts the info part of names in
    /// cur/.
    public static func escape(hostname: String) -> String {
        var out = ""
        for ch in hostname {
            switch ch {
            case "/": out += "\\057"
            case ":": out += "\\072"
            default: out.append(ch)
            }
        }
        return out.isEmpty ? "localhost" : out
    }

    static func systemHostname() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// One Maildir (the directory holding tmp/, new/ and cur/).
public struct Maildir: Sendable {
    public let path: String

    /// Maildirs this process made or found complete.
    static let prepared = Mutex<Set<String>>([])

    public init(path: String) {
        self.path = path
    }

    public var tmpDirectory: String { path + "/tmp" }
    public var newDirectory: String { path + "/new" }
    public var curDirectory: String { path + "/cur" }

    /// Creates the Maildir (and its missing parents) with mode 0700 when it
    /// does not exist yet. Existing directories are left as they are: their
    /// owner chose their mode.
    public func prepare() throws(DeliveryError) {
        try Maildir.makeDirectories(path)
        for sub in [tmpDirectory, newDirectory, curDirectory] {
            try Maildir.makeDirectory(sub)
        }
    }

    /// Delivers one message: `header` (already with LF line ends) followed by
    /// the message `chunks` (CRLF line ends, converted to LF as they are
    /// written). Returns the file name under new/.
    @discardableResult
    public func deliver(header: [UInt8], chunks: [[UInt8]], namer: MaildirNamer) throws(DeliveryError) -> String {
        let known = Maildir.prepared.withLock { $0.contains(path) }
        if !known {
            try prepare()
            Maildir.prepared.withLock { _ = $0.insert(path) }
        }

        // Open a fresh tmp/ file. O_EXCL: never reuse or overwrite a name; a
        // collision (a clock stepping back, a pid reused across hosts with a
        // badly chosen host name) just takes the next name.
        var name = namer.next()
        var tmpPath = tmpDirectory + "/" + name
        var fd: Int32 = -1
        for attempt in 0..<8 {
            fd = open(tmpPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
            if fd >= 0 { break }
            let e = errno
            if e == EINTR { continue }
            if e == ENOENT, known, attempt == 0 {
                // Removed since it was made: make it again, once.
                Maildir.prepared.withLock { _ = $0.remove(path) }
                try prepare()
                Maildir.prepared.withLock { _ = $0.insert(path) }
                continue
            }
            guard e == EEXIST, attempt < 7 else {
                throw .system("create", path: tmpPath, errno: e)
            }
            name = namer.next()
            tmpPath = tmpDirectory + "/" + name
        }

        // From here on a failure removes the tmp/ file: a half-written file
        // must not linger, and the queue will try again.
        do throws(DeliveryError) {
            try Maildir.writeMessage(fd: fd, path: tmpPath, header: header, chunks: chunks)
            if fsync(fd) != 0 {
                throw DeliveryError.system("fsync", path: tmpPath, errno: errno)
            }
            // close(2) can report a deferred write error (NFS): check it.
            let closed = close(fd)
            fd = -1
            if closed != 0 {
                throw DeliveryError.system("close", path: tmpPath, errno: errno)
            }
            let finalName = try linkIntoNew(tmpPath: tmpPath, name: name, namer: namer)
            unlink(tmpPath)
            do throws(DeliveryError) {
                try DirectorySync.shared.sync(newDirectory)
            } catch {
                // The recipient is deferred, so the copy in new/ must go:
                // kept, the next attempt would deliver a second one.
                unlink(newDirectory + "/" + finalName)
                throw error
            }
            return finalName
        } catch {
            if fd >= 0 { close(fd) }
            unlink(tmpPath)
            throw error
        }
    }

    /// link(2) tmp/NAME to new/NAME. link never replaces an existing file;
    /// on EEXIST another unique name is taken. File systems without hard
    /// links fall back to rename(2), after checking that the target name is
    /// free (the name is unique to this process, so nobody else creates it).
    private func linkIntoNew(tmpPath: String, name: String, namer: MaildirNamer) throws(DeliveryError) -> String {
        var candidate = name
        var remade = false
        for _ in 0..<8 {
            let newPath = newDirectory + "/" + candidate
            if link(tmpPath, newPath) == 0 { return candidate }
            let e = errno
            switch e {
            case EEXIST:
                candidate = namer.next()
            case ENOENT where !remade:
                // new/ (or cur/) was removed while tmp/ stayed: make the
                // Maildir whole again, once, rather than fail every
                // delivery until the stage restarts.
                remade = true
                try prepare()
            case EPERM, ENOSYS, EOPNOTSUPP:
                var st = stat()
                if lstat(newPath, &st) == 0 {
                    candidate = namer.next()
                    continue
                }
                if rename(tmpPath, newPath) == 0 { return candidate }
                throw .system("rename to", path: newPath, errno: errno)
            case EINTR:
                continue
            default:
                throw .system("link to", path: newPath, errno: e)
            }
        }
        throw DeliveryError(status: "4.3.0", text: "cannot find a free name in \(newDirectory)")
    }

    /// Writes the header, then the chunks converted from CRLF to LF, in
    /// blocks of about 64 KiB.
    static func writeMessage(fd: Int32, path: String, header: [UInt8], chunks: [[UInt8]]) throws(DeliveryError) {
        var converter = CRLFToLFConverter()
        var buffer = header
        buffer.reserveCapacity(80 * 1024)
        for chunk in chunks {
            converter.convert(chunk, into: &buffer)
            if buffer.count >= 64 * 1024 {
                try writeAll(fd: fd, path: path, buffer)
                buffer.removeAll(keepingCapacity: true)
            }
        }
        converter.finish(into: &buffer)
        try writeAll(fd: fd, path: path, buffer)
    }

    static func writeAll(fd: Int32, path: String, _ bytes: [UInt8]) throws(DeliveryError) {
        let code = WholeFile.writeAll(fd, bytes)
        if code != 0 { throw .system("write", path: path, errno: code) }
    }

    static func syncDirectory(_ path: String) throws(DeliveryError) {
        do {
            try WholeFile.syncDirectory(path)
        } catch {
            guard case .system(let code) = error.reason else { return }
            throw .system(error.step == "sync" ? "fsync" : error.step, path: path, errno: code)
        }
    }

    /// Creates one directory (mode 0700) unless it exists. A new directory
    /// is made durable at once (its parent is fsync'ed): otherwise the first
    /// message delivered into a new Maildir could vanish with its directory
    /// in a crash after success was reported. One that exists has its parent
    /// fsync'ed too: another worker may have just made it and not yet synced
    /// (this runs once per Maildir and process: `prepared`).
    static func makeDirectory(_ path: String) throws(DeliveryError) {
        if mkdir(path, 0o700) == 0 {
            try syncDirectory(parent(of: path))
            return
        }
        let e = errno
        if e == EEXIST {
            var st = stat()
            if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR {
                try syncDirectory(parent(of: path))
                return
            }
            throw .system("create directory", path: path, errno: ENOTDIR)
        }
        throw .system("create directory", path: path, errno: e)
    }

    static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    /// mkdir -p with mode 0700 for every directory it creates.
    static func makeDirectories(_ path: String) throws(DeliveryError) {
        var st = stat()
        if stat(path, &st) == 0 {
            if (st.st_mode & S_IFMT) == S_IFDIR { return }
            throw .system("use", path: path, errno: ENOTDIR)
        }
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            try makeDirectory(prefix)
        }
    }
}

/// fsync(2) of a directory, shared between threads (group commit for
/// directory entries): a caller whose link(2) is done takes a ticket; an
/// fsync that *starts* after the ticket was taken makes its link durable.
/// If one is under way, the caller waits for it to end and then either is
/// covered by a later one or starts the next itself, covering every ticket
/// taken by then. With several workers delivering into one Maildir, one
/// directory flush serves several messages; alone, a caller pays exactly
/// one fsync, as before. A failed fsync is reported to its own caller;
/// callers it was meant to cover try their own.
final class DirectorySync: @unchecked Sendable {
    // @unchecked Sendable: `directories` is guarded by `mutex`.
    static let shared = DirectorySync()

    private struct Entry {
        var tickets: UInt64 = 0
        var covered: UInt64 = 0
        var syncing = false
    }

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var directories: [String: Entry] = [:]
    /// fsyncs done (for tests: fewer than the deliveries when shared).
    private(set) var flushes: UInt64 = 0

    init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    var flushCount: UInt64 {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return flushes
    }

    func sync(_ path: String) throws(DeliveryError) {
        pthread_mutex_lock(mutex)
        directories[path, default: Entry()].tickets += 1
        let ticket = directories[path]!.tickets
        while true {
            let entry = directories[path]!
            if entry.covered >= ticket {
                // Entries stay (one per Maildir, a few words): removing one
                // would restart its counters under the tickets of waiters.
                pthread_mutex_unlock(mutex)
                return
            }
            if entry.syncing {
                pthread_cond_wait(condition, mutex)
                continue
            }
            directories[path]!.syncing = true
            flushes += 1
            let upTo = entry.tickets
            pthread_mutex_unlock(mutex)
            var failure: DeliveryError?
            do throws(DeliveryError) { try Maildir.syncDirectory(path) } catch { failure = error }
            pthread_mutex_lock(mutex)
            directories[path]!.syncing = false
            if failure == nil { directories[path]!.covered = max(directories[path]!.covered, upTo) }
            pthread_cond_broadcast(condition)
            if let failure {
                pthread_mutex_unlock(mutex)
                throw failure
            }
        }
    }
}
