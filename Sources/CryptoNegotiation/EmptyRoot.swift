// The directory crypto-negotiate chroots into when started as root: empty,
// root's, 0755. The stage opens everything it needs (certificates, keys, CA
// bundles, its listening socket) before it drops privileges; afterwards its
// whole file system is this one directory, where its user owns nothing and
// may write nothing. The data directory would not do: run/ is writable by
// every stage's group (the stages create their sockets there) and the key
// files belong to crypto-negotiate's user (an owner may always chmod).

#if canImport(Glibc)
import Glibc
#endif

public struct EmptyRootError: Error, CustomStringConvertible, Equatable {
    public var path: String
    public var message: String
    public var description: String { "chroot directory \(path): \(message)" }
}

public enum EmptyRoot {
    /// `<data directory>/empty`.
    public static func path(dataDirectory: String) -> String {
        dataDirectory.hasSuffix("/") ? dataDirectory + "empty" : dataDirectory + "/empty"
    }

    /// Creates `path` if missing; as root, makes it root:root 0755. Refuses
    /// a symbolic link or anything but a directory, and a directory with
    /// entries (someone put them there: they are not removed). Not root:
    /// creates and checks only (the stage does not chroot then).
    public static func prepare(_ path: String) throws(EmptyRootError) {
        func failure(_ what: String) -> EmptyRootError {
            EmptyRootError(path: path, message: "\(what): \(String(cString: strerror(errno)))")
        }
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw failure("mkdir") }
        // O_NOFOLLOW | O_DIRECTORY: a symbolic link planted in its place is
        // refused rather than followed.
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ELOOP || errno == ENOTDIR {
                throw EmptyRootError(path: path, message: "not a directory (a symbolic link or a file)")
            }
            throw failure("open")
        }
        guard let directory = fdopendir(fd) else {
            close(fd)
            throw failure("fdopendir")
        }
        defer { closedir(directory) }
        if geteuid() == 0 {
            guard fchown(fd, 0, 0) == 0 else { throw failure("chown root:root") }
        }
        guard fchmod(fd, 0o755) == 0 else { throw failure("chmod 0755") }
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." {
                throw EmptyRootError(path: path, message: "not empty (holds \"\(name)\"); remove what is in it")
            }
        }
    }
}
