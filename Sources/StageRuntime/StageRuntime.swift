// StageRuntime: what every stage's main does first.
//
//   let config = StageRuntime.bootstrap(stage: "queue")   // logging, SIGPIPE, descriptor limit, config
//   ... open what needs privileges (sockets, files) ...
//   let paths: RuntimePaths
//   do { paths = try StageRuntime.dropPrivileges(config, chroot: true) }
//   catch { StageRuntime.fatal("\(error)", exit: .noPerm) }

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import SealpostConfig
import CSystemShims

public enum StageRuntime {
    /// Sets up logging ("name[pid]: ..." lines on stderr), ignores SIGPIPE,
    /// loads the configuration (exit 78 with the ConfigError on stderr).
    public static func bootstrap(stage: String) -> SealpostConfiguration {
        let parent = getppid()
        state.withLock { $0.parentAtStart = parent }
        setUpLogging(stage: stage)
        // A peer that goes away must be an EPIPE error, not a dead process.
        signal(SIGPIPE, SIG_IGN)
        // A descriptor per session or connection: past 1024 under load
        // (DescriptorLimit.swift).
        raiseDescriptorLimit()
        let path = SealpostConfiguration.locate()
        do {
            return try SealpostConfiguration.load(path: path)
        } catch {
            if getenv("SEALPOST_RELOAD") != nil { notReloaded(error.description) }
            fatal(error.description, exit: .config)
        }
    }

    /// A new instance started to replace a running one (local-deliver's
    /// reload, Pipeline/PROTOCOL.md section 7; the supervisor sets
    /// SEALPOST_RELOAD for that alone and removes it from every other
    /// stage's environment, Supervision/Process.swift) cannot read the
    /// configuration: the running one goes on with the one it has, so this
    /// is a warning, not a fatal error, and the exit status (78) tells the
    /// supervisor not to stop the old instance.
    static func notReloaded(_ reason: String) -> Never {
        logAndExit(.warning, "configuration not reloaded: \(reason) (the running \(stageName) keeps the one it has)",
                   exit: .config)
    }

    /// Bootstraps swift-log with `StageLogHandler` for `stage`; only the
    /// first call in a process has an effect (LoggingSystem allows one).
    public static func setUpLogging(stage: String) {
        let first = state.withLock { state -> Bool in
            if state.stage == nil { state.stage = stage }
            defer { state.loggingBootstrapped = true }
            return !state.loggingBootstrapped
        }
        guard first else { return }
        LoggingSystem.bootstrap { _ in StageLogHandler(stage: stage) }
    }

    /// The stage name given to `bootstrap`, else the program's name.
    public static var stageName: String {
        if let stage = state.withLock({ $0.stage }) { return stage }
        let program = CommandLine.arguments.first ?? "sealpost"
        return program.split(separator: "/").last.map(String.init) ?? program
    }

    /// Logs "stage[pid]: fatal: message" and exits with `exit`. Writes the
    /// line itself, so it works before (or without) `bootstrap`.
    /// The descriptor an environment variable's value names (the
    /// supervisor's SEALPOST_CERTIFICATE_FD, SEALPOST_READY_FD): a number
    /// above 2, open, of file `type` (S_IFSOCK, S_IFIFO), made close-on-exec
    /// so that nothing started later inherits it; nil when it is not one.
    public static func inheritedDescriptor(_ text: String, type: mode_t) -> Int32? {
        var info = stat()
        guard let fd = Int32(text), fd > 2, fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == type else { return nil }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return fd
    }

    public static func fatal(_ message: String, exit code: ExitCode) -> Never {
        logAndExit(.critical, message, exit: code)
    }

    /// Writes the line itself (before or without `bootstrap`), then exits.
    private static func logAndExit(_ level: Logger.Level, _ message: String, exit code: ExitCode) -> Never {
        StageLogHandler.writeLine(StageLogHandler.format(stage: stageName, pid: getpid(), level: level, message: message),
                                  urgent: true)
        exit(code.rawValue)
    }

    /// When running as root: requires SEALPOST_USER (set by the supervisor),
    /// calls tzset(), chdir()s into the data directory, optionally chroot()s
    /// there, then setgroups/setgid/setuid to that user. Returns the paths to
    /// use from now on (rebased to "/" when chrooted). Not root: no change.
    ///
    /// `chrootDirectory`: chroot there instead of the data directory (a
    /// stage that needs nothing from the file system after the drop, such as
    /// crypto-negotiate, goes into an empty directory); the paths returned
    /// are then those of the data directory rebased to "/", which do not
    /// exist inside: the stage must have opened what it needs before.
    ///
    /// Throws `PrivilegeError` (with the exit code to use) when any step
    /// fails; the caller cannot continue and should `fatal` with it.
    public static func dropPrivileges(_ config: SealpostConfiguration, chroot: Bool,
                                      chrootDirectory: String? = nil) throws -> RuntimePaths {
        try dropPrivileges(config, chroot: chroot, chrootDirectory: chrootDirectory, effectiveUser: geteuid(),
                           user: getenv("SEALPOST_USER").map { String(cString: $0) })
    }

    /// The body of `dropPrivileges`, with the process's inputs as arguments
    /// so that tests can reach the refusals without being someone else.
    static func dropPrivileges(_ config: SealpostConfiguration, chroot: Bool, chrootDirectory: String? = nil,
                               effectiveUser: uid_t, user: String?) throws -> RuntimePaths {
        let paths = RuntimePaths(config)
        guard effectiveUser == 0 else {
            endWithSupervisor()
            return paths
        }

        guard let user, !user.isEmpty else {
            throw PrivilegeError(message: "refusing to run as root without SEALPOST_USER", exitCode: .noPerm)
        }
        // Look the user up while /etc/passwd is still visible.
        let (uid, gid) = try lookUpUser(user)
        guard uid != 0, gid != 0 else {
            throw PrivilegeError(message: "SEALPOST_USER \(user) has uid or gid 0: refusing to run as root", exitCode: .noPerm)
        }
        // Load the time zone now: /etc/localtime and zoneinfo vanish in a chroot.
        tzset()
        let data = config.dataDirectory
        guard chdir(data) == 0 else {
            throw PrivilegeError(message: "chdir \(data): \(String(cString: strerror(errno)))", exitCode: .osErr)
        }
        var result = paths
        if chroot {
            let root = chrootDirectory ?? data
            guard Glibc.chroot(root) == 0 else {
                throw PrivilegeError(message: "chroot \(root): \(String(cString: strerror(errno)))", exitCode: .osErr)
            }
            guard chdir("/") == 0 else {
                throw PrivilegeError(message: "chdir / after chroot: \(String(cString: strerror(errno)))", exitCode: .osErr)
            }
            result = paths.rebased(to: "/")
        }
        // Supplementary groups first (needs root), then the group, then the
        // user (after which nothing else can be changed).
        guard setgroups(0, nil) == 0 else {
            throw PrivilegeError(message: "setgroups: \(String(cString: strerror(errno)))", exitCode: .osErr)
        }
        guard setgid(gid) == 0 else {
            throw PrivilegeError(message: "setgid \(gid): \(String(cString: strerror(errno)))", exitCode: .osErr)
        }
        guard setuid(uid) == 0 else {
            throw PrivilegeError(message: "setuid \(uid): \(String(cString: strerror(errno)))", exitCode: .osErr)
        }
        // Trust but verify: real and effective ids changed, and root cannot
        // be regained.
        guard getuid() == uid, geteuid() == uid, getgid() == gid, getegid() == gid,
              getgroups(0, nil) == 0, setuid(0) != 0 else {
            throw PrivilegeError(message: "privileges were not dropped to \(user) (uid \(uid), gid \(gid))", exitCode: .software)
        }
        // After setuid: a change of credentials clears the parent-death signal.
        endWithSupervisor()
        return result
    }

    /// A stage started by the supervisor (SEALPOST_SUPERVISOR_PID set) gets
    /// SIGTERM when its parent dies, even by SIGKILL, and stops as on any
    /// SIGTERM: orphaned stages would run unsupervised and keep the spool
    /// lock and the ports from the next supervisor. The supervisor's main
    /// thread spawns every stage and lives as long as it, so no ending
    /// thread sends it. The parent is the one at `bootstrap`: the
    /// supervisor, or a wrapper in the stages file that forks (timeout,
    /// strace -f), which the signal then follows. A parent already gone
    /// since then gets the same SIGTERM now.
    static func endWithSupervisor() {
        guard getenv("SEALPOST_SUPERVISOR_PID") != nil,
              let parent = state.withLock({ $0.parentAtStart }) else { return }
        guard sealpost_set_parent_death_signal(SIGTERM) == 0 else {
            Logger(label: "stage").warning("prctl(PR_SET_PDEATHSIG): \(String(cString: strerror(errno))); the stage will outlive a killed supervisor")
            return
        }
        if getppid() != parent { kill(getpid(), SIGTERM) }
    }

    /// uid and gid of `user`, with getpwnam_r: the stage may already have
    /// threads, and getpwnam's static buffer is shared between them.
    static func lookUpUser(_ user: String) throws -> (uid_t, gid_t) {
        var entry = passwd()
        var found: UnsafeMutablePointer<passwd>? = nil
        var size = max(Int(sysconf(Int32(_SC_GETPW_R_SIZE_MAX))), 1024)
        while true {
            var buffer = [CChar](repeating: 0, count: size)
            let code = getpwnam_r(user, &entry, &buffer, size, &found)
            if code == ERANGE && size < 1 << 20 { size *= 2; continue }
            guard code == 0 else {
                throw PrivilegeError(message: "SEALPOST_USER \(user): \(String(cString: strerror(code)))", exitCode: .noUser)
            }
            guard found != nil else {
                throw PrivilegeError(message: "SEALPOST_USER \(user): no such user", exitCode: .noUser)
            }
            return (entry.pw_uid, entry.pw_gid)
        }
    }

    // MARK: - Process state

    struct State {
        /// getppid() at bootstrap (see endWithSupervisor).
        var parentAtStart: pid_t?
        var stage: String?
        var loggingBootstrapped = false
    }

    static let state = LockedState(State())
}

/// A failure to drop privileges; `exitCode` is the one to exit with.
public struct PrivilegeError: Error, CustomStringConvertible {
    public var message: String
    public var exitCode: ExitCode
    public init(message: String, exitCode: ExitCode) {
        self.message = message
        self.exitCode = exitCode
    }
    public var description: String { message }
}

/// The paths a stage uses after `dropPrivileges`: the configuration's, or
/// the same rebased to "/" when the stage chrooted into the data directory.
public struct RuntimePaths: Sendable, Equatable {
    public var dataDirectory, runtimeDirectory, injectSocket,
               deliverSocket, controlSocket, spoolDirectory, localRecipientTable: String

    public init(_ config: SealpostConfiguration) {
        dataDirectory = config.dataDirectory
        runtimeDirectory = config.runtimeDirectory
        injectSocket = config.injectSocket
        deliverSocket = config.deliverSocket
        controlSocket = config.controlSocket
        spoolDirectory = config.spoolDirectory
        localRecipientTable = config.localRecipientTable
    }

    /// The same paths with the data directory replaced by `root`.
    public func rebased(to root: String) -> RuntimePaths {
        var copy = self
        func rebase(_ path: String) -> String {
            guard path.hasPrefix(dataDirectory) else { return path }
            let rest = path.dropFirst(dataDirectory.count).drop(while: { $0 == "/" })
            if rest.isEmpty { return root }
            return root.hasSuffix("/") ? root + rest : root + "/" + rest
        }
        copy.dataDirectory = root
        copy.runtimeDirectory = rebase(runtimeDirectory)
        copy.injectSocket = rebase(injectSocket)
        copy.deliverSocket = rebase(deliverSocket)
        copy.controlSocket = rebase(controlSocket)
        copy.spoolDirectory = rebase(spoolDirectory)
        copy.localRecipientTable = rebase(localRecipientTable)
        return copy
    }

    /// The mailbox of `user`: `template` (LocalSettings.mailbox) with every
    /// "{user}" replaced, under the data directory. `user` must already be
    /// a validated user name (no "/" or ".."): this does not check.
    public func mailbox(user: String, template: String) -> String {
        let relative = template.replacing("{user}", with: user)
        return dataDirectory.hasSuffix("/") ? dataDirectory + relative : dataDirectory + "/" + relative
    }
}

/// A value behind a pthread mutex (no Foundation, no macOS 15 Mutex).
final class LockedState<Value>: @unchecked Sendable {
    private var value: Value
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
