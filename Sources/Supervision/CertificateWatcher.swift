// The supervisor's side of the certificate channel (Pipeline/PROTOCOL.md
// section 7): crypto-negotiate runs chrooted and unprivileged and cannot
// reopen its certificate and key files, so the supervisor, still root,
// opens them for it and passes the descriptors. It opens and stats files
// named by its own configuration and parses nothing: the PEM is read by
// crypto-negotiate.
//
// When: on SIGHUP, and when a configured file changed. Every few seconds
// each file is stat()ed (following symbolic links, as certbot's live/
// links are replaced): device, inode, size, modification and change
// times. A change is sent once it has been seen twice in a row, so that a
// file being written is not sent half-written; a version that
// crypto-negotiate refuses (it logs why and keeps the certificates in
// use) is not sent again until the files change again.

#if canImport(Glibc)
import Glibc
#endif
import CSystemShims
import SealpostConfig
import StageProtocol


/// What identifies a version of a file.
struct FileVersion: Equatable {
    var device: UInt64
    var inode: UInt64
    var size: Int64
    var modified: timespec
    var changed: timespec

    init(_ info: stat) {
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
        size = Int64(info.st_size)
        modified = info.st_mtim
        changed = info.st_ctim
    }

    /// stat(2) of a path, following symbolic links; nil when missing.
    static func of(path: String) -> FileVersion? {
        var info = stat()
        return stat(path, &info) == 0 ? FileVersion(info) : nil
    }

    static func == (a: FileVersion, b: FileVersion) -> Bool {
        a.device == b.device && a.inode == b.inode && a.size == b.size
            && a.modified.tv_sec == b.modified.tv_sec && a.modified.tv_nsec == b.modified.tv_nsec
            && a.changed.tv_sec == b.changed.tv_sec && a.changed.tv_nsec == b.changed.tv_nsec
    }
}

/// Which of a set of files changed since a stage read them, once the change
/// is stable: the same versions at two checks in a row, so that a file
/// being written is not taken half-written. The supervisor's file checks
/// for the certificate channel and for local-deliver's reload.
struct FileWatch {
    let paths: [String]
    let interval: Double
    /// Whether a missing file is a version like any other (an aliases file
    /// may be removed), or keeps a change from being due (a certificate
    /// pair must be complete).
    let missingIsAChange: Bool
    /// The versions the stage has: read at its start, or sent.
    private var delivered: [FileVersion?] = []
    /// The versions seen at the previous check.
    private var previous: [FileVersion?] = []
    private(set) var nextCheck: Double = 0

    init(paths: [String], interval: Double, missingIsAChange: Bool) {
        self.paths = paths
        self.interval = interval
        self.missingIsAChange = missingIsAChange
    }

    static func versions(of paths: [String]) -> [FileVersion?] { paths.map(FileVersion.of(path:)) }

    /// The stage (re)started: it reads the files as they are now.
    mutating func started(now: Double) {
        delivered = Self.versions(of: paths)
        previous = delivered
        nextCheck = now + interval
    }

    /// The stage was sent these versions.
    mutating func markDelivered(_ versions: [FileVersion?]) {
        delivered = versions
    }

    /// The changed files once a change is stable and not yet delivered; nil
    /// otherwise (and before `interval` has passed since the last check).
    mutating func dueChange(now: Double) -> [String]? {
        guard now >= nextCheck else { return nil }
        nextCheck = now + interval
        let current = Self.versions(of: paths)
        defer { previous = current }
        guard current != delivered, current == previous,
              missingIsAChange || current.allSatisfy({ $0 != nil }) else { return nil }
        return zip(paths, zip(current, delivered)).filter { $0.1.0 != $0.1.1 }.map(\.0)
    }
}

final class CertificateWatcher {
    let pairs: [TLSCertificateSettings]
    /// The files in frame order: certificate 1, key 1, certificate 2, ...
    var paths: [String] { watch.paths }
    private var watch: FileWatch
    var nextCheck: Double { watch.nextCheck }

    init(pairs: [TLSCertificateSettings], interval: Double) {
        self.pairs = pairs
        watch = FileWatch(paths: pairs.flatMap { [$0.certificateFile, $0.keyFile] }, interval: interval,
                          missingIsAChange: false)
    }

    /// crypto-negotiate (re)started: it reads the files itself now.
    func started(now: Double) { watch.started(now: now) }

    /// The changed files once a change is stable (the same versions as at
    /// the previous check, all present, not yet delivered); nil otherwise.
    func dueChange(now: Double) -> [String]? { watch.dueChange(now: now) }

    /// Opens every file and sends them in one CERTIFICATES frame on
    /// `channel` (non-blocking SOCK_SEQPACKET: all of it or nothing).
    /// Returns a line for the log.
    func send(on channel: Int32, reason: String) -> String {
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }
        var versions: [FileVersion?] = []
        for path in paths {
            let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
            guard fd >= 0 else {
                return "warning: certificates not reloaded (\(reason)): open \(path): \(String(cString: strerror(errno)))"
            }
            opened.append(fd)
            var info = stat()
            guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
                return "warning: certificates not reloaded (\(reason)): \(path) is not a regular file"
            }
            versions.append(FileVersion(info))
        }
        var attributes: [(String, AttributeValue)] = [("count", .uint(UInt64(pairs.count))),
                                                      ("reason", .sanitizedText(reason))]
        for i in pairs.indices {
            attributes.append(("cert-\(i + 1)", .fd(opened[2 * i])))
            attributes.append(("key-\(i + 1)", .fd(opened[2 * i + 1])))
        }
        let frame = Frame(.certificates, attributes: attributes)
        do {
            try ProtocolSchema.certificates.validate(frame, direction: .serverToClient)
        } catch {
            return "warning: certificates not reloaded: \(error)"
        }
        let bytes = FrameEncoder.encode(frame)
        var n: Int
        repeat {
            n = bytes.withUnsafeBytes { raw in
                opened.withUnsafeBufferPointer { sealpost_sendmsg_fds(channel, raw.baseAddress, raw.count, $0.baseAddress, $0.count) }
            }
        } while n < 0 && errno == EINTR
        guard n == bytes.count else {
            let why = n < 0 ? String(cString: strerror(errno)) : "short write"
            return "warning: certificates not reloaded (\(reason)): sending to crypto-negotiate: \(why)"
        }
        watch.markDelivered(versions)
        return "sent \(pairs.count) certificate/key pair(s) to crypto-negotiate (\(reason))"
    }
}
