// What the supervisor prepares before it starts stages: the Unix users and
// group (as root) and the directories under the data directory. It is done
// here, in one place, and nowhere else (Pipeline/start only calls supervise).

#if canImport(Glibc)
import Glibc
#endif

public struct SetupError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

public enum Setup {
    public static let groupName = "sealpost"

    /// As root: creates the group "sealpost" and a system user
    /// "sealpost-NAME" per stage (no login shell, home /nonexistent, primary
    /// group sealpost) when they are missing. Returns log lines saying what
    /// it created.
    public static func ensureUsers(for stages: [StageDefinition]) throws(SetupError) -> [String] {
        var created: [String] = []
        if getgrnam(groupName) == nil {
            try runTool("/usr/sbin/groupadd", ["--system", groupName])
            created.append("created group \(groupName)")
        }
        for stage in stages where getpwnam(stage.userName) == nil {
            try runTool("/usr/sbin/useradd", [
                "--system", "--gid", groupName, "--home-dir", "/nonexistent", "--no-create-home",
                "--shell", "/usr/sbin/nologin", "--comment", "Sealpost stage \(stage.name)",
                stage.userName,
            ])
            created.append("created user \(stage.userName)")
        }
        return created
    }

    /// The directories under the data directory, with owner and mode. As
    /// root: data 0755 root, run/ the queue's user, group sealpost, 0755,
    /// queue/ the queue's user 0700, mail/ local-deliver's user 0700, log/
    /// root 0750 (LogSink creates the log file 0640), local/ local-deliver's
    /// user 0755; existing ones are put right. Not root: the same directories and modes, owned by the
    /// invoking user.
    ///
    /// Why run/ belongs to the queue: the queue binds its sockets there
    /// after it dropped root, and nothing else but root (the supervisor's
    /// pid and status files, crypto-negotiate's socket, bound before it
    /// drops root) creates anything there. No other stage may: a stage
    /// that talks to the network (smtp-listen, remote-deliver), if taken
    /// over, could otherwise squat a socket name while the queue restarts
    /// (run/inject, and smtp-listen's mail would go to it). The group
    /// (sealpost, which every stage's user is in) is what the queue gives
    /// its deliver socket and crypto-negotiate its socket.
    /// Returns warnings for the log.
    @discardableResult
    public static func ensureDirectories(_ layout: DirectoryLayout, stages: [StageDefinition],
                                         asRoot: Bool) throws(SetupError) -> [String] {
        var warnings: [String] = []
        let names = Set(stages.map(\.name))
        func user(_ stage: String) throws(SetupError) -> (uid_t, gid_t) {
            guard asRoot, names.contains(stage) else { return (0, 0) }
            guard let entry = getpwnam("sealpost-\(stage)") else {
                throw SetupError(message: "no user sealpost-\(stage)")
            }
            return (entry.pointee.pw_uid, entry.pointee.pw_gid)
        }
        var group: gid_t = 0
        if asRoot {
            guard let entry = getgrnam(groupName) else { throw SetupError(message: "no group \(groupName)") }
            group = entry.pointee.gr_gid
        }
        try makeParents(of: layout.dataDirectory)
        try ensure(layout.dataDirectory, mode: 0o755, owner: asRoot ? (0, 0) : nil)
        try ensure(layout.superviseDirectory, mode: 0o755, owner: asRoot ? (0, 0) : nil)
        let queueOwner = try user("queue")
        try ensure(layout.runtimeDirectory, mode: 0o755, owner: asRoot ? (queueOwner.0, group) : nil)
        // The log names every sender and recipient: no stage's user (smtp-listen
        // and the queue are chrooted into the data directory) may read it.
        try ensure(layout.logDirectory, mode: 0o750, owner: asRoot ? (0, 0) : nil)
        try ensure(layout.spoolDirectory, mode: 0o700, owner: asRoot ? queueOwner : nil)
        if let mail = layout.mailDirectory {
            let mailOwner = try user("local-deliver")
            try ensure(mail, mode: 0o700, owner: asRoot ? mailOwner : nil)
        }
        // local/: the local recipient table, written by local-deliver alone
        // and read by smtp-listen. Each start begins without one: a table
        // of an earlier run would refuse at RCPT a user or alias added
        // since (a permanent 550) until local-deliver, which may be slow
        // to start or not start at all, writes the new one. smtp-listen's
        // first start waits for that (Supervisor's listenerStartWait);
        // without a table it accepts every local part. Without a
        // local-deliver stage nothing writes it again.
        if names.contains("local-deliver") {
            try ensure(layout.localDirectory, mode: 0o755, owner: asRoot ? try user("local-deliver") : nil)
        }
        if unlink(layout.localRecipientTable) != 0, case let error = errno, error != ENOENT {
            warnings.append("warning: cannot remove \(layout.localRecipientTable) left by an earlier run: "
                            + "\(String(cString: strerror(error))) (smtp-listen uses it until local-deliver writes a new one)")
        }
        if names.contains("crypto-negotiate") {
            try ensureTLSDirectory(layout.tlsDirectory, owner: asRoot ? try user("crypto-negotiate") : nil)
        }
        return warnings
    }

    /// tls/ (the self-signed certificates Pipeline/start creates): the
    /// directory root's, 0755, so that no stage can place links in it; as
    /// root, its regular files are given to crypto-negotiate's user (the
    /// keys are 0600: no other stage can read them).
    static func ensureTLSDirectory(_ path: String, owner: (uid_t, gid_t)?) throws(SetupError) {
        try ensure(path, mode: 0o755, owner: owner.map { _ in (0, 0) })
        guard let (uid, gid) = owner, let directory = opendir(path) else { return }
        defer { closedir(directory) }
        let dirfd = Glibc.dirfd(directory)
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name == "." || name == ".." { continue }
            var info = stat()
            guard fstatat(dirfd, name, &info, AT_SYMLINK_NOFOLLOW) == 0, (info.st_mode & S_IFMT) == S_IFREG else { continue }
            if info.st_uid != uid || info.st_gid != gid {
                guard fchownat(dirfd, name, uid, gid, AT_SYMLINK_NOFOLLOW) == 0 else {
                    throw SetupError(message: "\(SystemError("chown", path: path + "/" + name))")
                }
            }
        }
    }

    private static func runTool(_ tool: String, _ arguments: [String]) throws(SetupError) {
        do {
            if let failure = try Spawner.run(tool, arguments) {
                throw SetupError(message: "\(tool) \(arguments.joined(separator: " ")): \(failure)")
            }
        } catch let error as SetupError {
            throw error
        } catch {
            throw SetupError(message: "\(tool): \(error)")
        }
    }

    /// The data directory and supervise/ alone, root's when run as root (as
    /// ensureDirectories makes them): where the supervisor takes its
    /// instance lock before it changes anything else.
    public static func ensureSuperviseDirectory(_ layout: DirectoryLayout, asRoot: Bool) throws(SetupError) {
        try makeParents(of: layout.dataDirectory)
        try ensure(layout.dataDirectory, mode: 0o755, owner: asRoot ? (0, 0) : nil)
        try ensure(layout.superviseDirectory, mode: 0o755, owner: asRoot ? (0, 0) : nil)
    }

    private static func makeParents(of path: String) throws(SetupError) {
        var prefix = ""
        let components = path.split(separator: "/")
        for component in components.dropLast() {
            prefix += "/" + component
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                throw SetupError(message: "\(SystemError("mkdir", path: prefix))")
            }
        }
    }

    private static func ensure(_ path: String, mode: mode_t, owner: (uid_t, gid_t)?) throws(SetupError) {
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            throw SetupError(message: "\(SystemError("mkdir", path: path))")
        }
        var info = stat()
        guard lstat(path, &info) == 0 else { throw SetupError(message: "\(SystemError("stat", path: path))") }
        guard (info.st_mode & S_IFMT) == S_IFDIR else {
            throw SetupError(message: "\(path) exists and is not a directory")
        }
        if let (uid, gid) = owner, info.st_uid != uid || info.st_gid != gid {
            guard chown(path, uid, gid) == 0 else { throw SetupError(message: "\(SystemError("chown", path: path))") }
        }
        if owner == nil && info.st_uid != geteuid() { return }  // not ours: leave it as it is
        if (info.st_mode & 0o7777) != mode {
            guard chmod(path, mode) == 0 else { throw SetupError(message: "\(SystemError("chmod", path: path))") }
        }
    }
}

/// Where things live under the data directory (absolute paths).
public struct DirectoryLayout: Sendable, Equatable {
    public var dataDirectory: String
    public var runtimeDirectory: String
    public var spoolDirectory: String
    public var logDirectory: String
    /// The local recipient table local-deliver writes for smtp-listen.
    public var localRecipientTable: String
    /// The directory that holds the users' mailboxes (the mailbox template up
    /// to "{user}"), nil when the template starts with "{user}" or is
    /// absolute (mailboxes outside the data directory, such as
    /// /home/{user}/Maildir, are not the supervisor's to create or chown).
    public var mailDirectory: String?

    public init(dataDirectory: String, runtimeDirectory: String, spoolDirectory: String,
                logDirectory: String, localRecipientTable: String, mailboxTemplate: String) {
        self.dataDirectory = dataDirectory
        self.runtimeDirectory = runtimeDirectory
        self.spoolDirectory = spoolDirectory
        self.logDirectory = logDirectory
        self.localRecipientTable = localRecipientTable
        self.mailDirectory = DirectoryLayout.mailDirectory(dataDirectory: dataDirectory, template: mailboxTemplate)
    }

    public var logFile: String { joinPath(logDirectory, "sealpost.log") }
    /// local-deliver's directory for what it publishes to the other
    /// stages: the one that holds the local recipient table.
    public var localDirectory: String {
        String(localRecipientTable[..<(localRecipientTable.lastIndex(of: "/") ?? localRecipientTable.startIndex)])
    }
    /// Certificates and keys for crypto-negotiate (self-signed by default).
    public var tlsDirectory: String { joinPath(dataDirectory, "tls") }
    /// The supervisor's own files, in a directory of root's when it runs as
    /// root: run/ belongs to the queue's user, and a stage must not be able
    /// to replace a file root writes or that root's scripts read
    /// (Pipeline/status, Pipeline/stop).
    public var superviseDirectory: String { joinPath(dataDirectory, "supervise") }
    public var pidFile: String { joinPath(superviseDirectory, "supervise.pid") }
    public var statusFile: String { joinPath(superviseDirectory, "supervise.status") }

    static func mailDirectory(dataDirectory: String, template: String) -> String? {
        if template.hasPrefix("/") { return nil }
        var kept: [Substring] = []
        for component in template.split(separator: "/") {
            if component.contains("{user}") { break }
            kept.append(component)
        }
        guard !kept.isEmpty else { return nil }
        let relative = kept.joined(separator: "/")
        return joinPath(dataDirectory, relative)
    }
}
