// supervise - start, watch and restart the Sealpost pipeline
//
// SYNOPSIS
//     supervise [--foreground] [--stages FILE] [--bin DIR]
//     supervise --check [--stages FILE] [--bin DIR]
//     supervise --paths
//
// DESCRIPTION
//     Reads the configuration (SEALPOST_CONFIG, else the checkout's
//     Config/sealpost.toml) and the stages file (Pipeline/stages: one
//     "NAME EXECUTABLE [ARGUMENTS...]" per line), prepares the data
//     directory, then starts every stage with posix_spawn and keeps it
//     running: a stage that exits or dies is started again after 1 s,
//     doubling to 60 s while it keeps failing (back to 1 s after a minute of
//     uptime).
//
//     Every stage gets stdin /dev/null and stdout/stderr on a pipe to the
//     supervisor, no other descriptor, an empty signal mask and default
//     signal dispositions, its own process group, argv[0] = the executable's
//     path followed by the ARGUMENTS of the stages file, and the environment
//     SEALPOST_CONFIG (absolute), SEALPOST_STAGE=NAME and, as root,
//     SEALPOST_USER=sealpost-NAME, plus only PATH, the locale, TZ, TMPDIR
//     and SEALPOST_* variables of its own (and HOME, USER, LOGNAME when not
//     root).
//
//     smtp-listen also gets its listening sockets, socket-activated as
//     systemd does it (sd_listen_fds(3)): before its first start the
//     supervisor binds every [smtp] listen, submission and smtps address
//     (smtps only when [tls] has a certificate), and hands them to every
//     instance as descriptors 3, 4, ... with LISTEN_FDS=N,
//     LISTEN_FDNAMES=KIND-PORT:... (e.g. "smtp-25:submission-587") and
//     LISTEN_PID=<smtp-listen's pid>, which the child writes into its own
//     environment between fork and exec. The supervisor keeps the sockets
//     open, so while smtp-listen restarts connections wait in the backlog
//     instead of being refused; one that no longer listens (the kernel
//     ended it: ss -K) is bound again before the next start, not handed on
//     dead. It binds them whether root or not (as root,
//     port 25 needs no privilege in smtp-listen); an address it cannot
//     bind counts as a failed start of smtp-listen (retried with backoff).
//
//     local-deliver gets a ready pipe at every start: its write end as
//     descriptor 3, SEALPOST_READY_FD=3 (Pipeline/PROTOCOL.md section 7).
//     When the stages file has both local-deliver and smtp-listen and
//     [smtp] reject_unknown_local_recipients is on, smtp-listen's first
//     start waits (state "waiting") until local-deliver reported ready,
//     having written the local recipient table, or exited, or 10 s passed,
//     so that its first RCPT already has the table. The sockets are bound
//     before the wait: the kernel holds the connections of those moments
//     in the backlog.
//
//     crypto-negotiate gets the certificate channel: a SOCK_SEQPACKET
//     socketpair end as descriptor 3 (SEALPOST_CERTIFICATE_FD=3), a new
//     one per instance. Chrooted, crypto-negotiate cannot reopen its
//     certificate and key files, so the supervisor opens them (it parses
//     nothing: crypto-negotiate reads the PEM) and sends the descriptors
//     in one CERTIFICATES frame (Pipeline/PROTOCOL.md section 7) on
//     SIGHUP and when a [tls] certificate or key file changed: every 5 s
//     it stat()s them, following symbolic links (device, inode, size,
//     times), and sends a change once two checks in a row agree.
//
//     The supervisor writes every line they
//     write, and its own, to DATA/log/sealpost.log with a syslog-style
//     timestamp and host name ("Nov 29 16:13:43 host queue[812]: ...").
//
// PRIVILEGES
//     As root it creates the group "sealpost" and a system user
//     "sealpost-NAME" per stage when missing, the directories DATA (0755
//     root), DATA/run (sealpost-queue:sealpost 0755: only the queue and
//     root create sockets there), DATA/queue (sealpost-queue 0700),
//     DATA/mail (sealpost-local-deliver 0700), DATA/local
//     (sealpost-local-deliver 0755: the local recipient table it writes
//     for smtp-listen; a table left there by an earlier run is removed,
//     and local-deliver writes a new one), DATA/log (0750 root: the log names every address, no
//     stage may read it),
//     and starts the stages as root: each drops to its own user (and
//     chroots) itself, after the setup only root can do. Not root, it
//     creates the same directories owned by the invoking user. It parses
//     nothing but its configuration and the stages file.
//
// FILES
//     DATA/supervise/supervise.pid     its pid, while it runs (a directory
//                                      of root's: no stage can touch it)
//     DATA/supervise/supervise.lock    flock(2)ed while it runs: a second
//                                      supervisor for the data directory
//                                      exits 75 ("already running")
//     DATA/supervise/supervise.status  one line per stage: name, state (running,
//                                 restarting, stopped, waiting), pid, since (Unix
//                                 time), restarts; read by Pipeline/status
//     DATA/log/sealpost.log       the log
//
// SIGNALS
//     SIGTERM, SIGINT: stop the stages in reverse order of the stages file
//     (SIGTERM, then SIGKILL after 10 s, 35 s for smtp-listen, which lets
//     a message in progress finish), remove the pid file, exit 0.
//     SIGHUP: reopen the log file, send SIGHUP to every stage that handles
//     it (caught, ignored or blocked, by /proc/PID/status: for the others
//     it would be fatal, and a log rotation must not restart the pipeline),
//     send the certificate files to crypto-negotiate, and reload
//     local-deliver by replacing it: a new instance (SEALPOST_RELOAD,
//     SEALPOST_READY_FD=3: Pipeline/PROTOCOL.md section 7) reads the
//     aliases file and the accounts, and once it reports ready the old one
//     gets SIGTERM and finishes its deliveries; a new instance that cannot
//     load exits and the old one goes on. The same reload happens when the
//     aliases file, the configuration file or /etc/passwd changed (every
//     5 s a stat(), as for the certificates); the supervisor reads none of
//     them.
//
// OPTIONS
//     --foreground  also copy the log to standard output
//     --stages FILE the stages file (default: Pipeline/stages of the checkout)
//     --bin DIR     directory for relative executables (default: the
//                   directory holding supervise, i.e. .build/release)
//     --check       check the configuration and the stages file, then exit
//     --paths       print the paths scripts need as KEY=VALUE lines, then exit
//
// EXIT STATUS
//     0 stopped by a signal; 64 usage; 75 another supervisor runs on this
//     data directory; 78 the configuration or the stages file is bad (the
//     message names file, line and key); 71 the setup failed.

import Glibc
import SealpostConfig
import StageRuntime
import Supervision

func fail(_ message: String, _ code: ExitCode) -> Never {
    let line = "supervise: \(message)\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
    exit(code.rawValue)
}

func usage() -> Never {
    fail("usage: supervise [--foreground] [--stages FILE] [--bin DIR] | --check | --paths", .usage)
}

/// The directory holding this executable (resolved through /proc/self/exe).
func executableDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return "." }
    let path = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return slash == path.startIndex ? "/" : String(path[..<slash])
}

/// Pipeline/stages of the checkout the executable was built in, found by
/// walking up from the build directory; /etc/sealpost/stages otherwise.
func defaultStagesFile(from directory: String) -> String {
    var current = directory
    while !current.isEmpty && current != "/" {
        let candidate = current + "/Pipeline/stages"
        if access(candidate, R_OK) == 0 { return candidate }
        guard let slash = current.lastIndex(of: "/") else { break }
        current = String(current[..<slash])
    }
    return "/etc/sealpost/stages"
}

func absolute(_ path: String) -> String {
    if path.hasPrefix("/") { return path }
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&buffer, buffer.count) != nil else { return path }
    let directory = buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }
    return String(decoding: directory, as: UTF8.self) + "/" + path
}

// MARK: - Arguments

var foreground = false
var checkOnly = false
var printPaths = false
var stagesFile: String? = nil
var binDirectory: String? = nil
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    switch argument {
    case "--foreground", "-f": foreground = true
    case "--check": checkOnly = true
    case "--paths": printPaths = true
    case "--stages":
        guard let value = arguments.popFirst() else { usage() }
        stagesFile = absolute(value)
    case "--bin":
        guard let value = arguments.popFirst() else { usage() }
        binDirectory = absolute(value)
    case "--help", "-h":
        print("usage: supervise [--foreground] [--stages FILE] [--bin DIR] | --check | --paths")
        exit(0)
    default:
        fail("unknown argument \"\(argument)\"", .usage)
    }
}

// MARK: - Configuration

let configuration: SealpostConfiguration
do {
    configuration = try SealpostConfiguration.load(path: SealpostConfiguration.locate())
} catch {
    fail("\(error)", .config)
}
let layout = DirectoryLayout(dataDirectory: configuration.dataDirectory,
                             runtimeDirectory: configuration.runtimeDirectory,
                             spoolDirectory: configuration.spoolDirectory,
                             logDirectory: configuration.logDirectory,
                             localRecipientTable: configuration.localRecipientTable,
                             mailboxTemplate: configuration.local.mailbox)

if printPaths {
    // For the shell scripts, which must not parse TOML themselves.
    print("""
        config=\(configuration.file)
        data_directory=\(configuration.dataDirectory)
        runtime_directory=\(configuration.runtimeDirectory)
        inject_socket=\(configuration.injectSocket)
        control_socket=\(configuration.controlSocket)
        log_file=\(layout.logFile)
        pid_file=\(layout.pidFile)
        status_file=\(layout.statusFile)
        mail_directory=\(layout.mailDirectory ?? "")
        mailbox=\(configuration.local.mailbox)
        hostname=\(configuration.hostname)
        """)
    exit(0)
}

let bin = binDirectory ?? executableDirectory()
let stagesPath = stagesFile ?? defaultStagesFile(from: bin)
let stages: [StageDefinition]
do {
    stages = try StagesFile.load(path: stagesPath, binDirectory: bin)
} catch {
    fail("\(error)", .config)
}
if checkOnly {
    print("supervise: \(configuration.file) and \(stagesPath) are fine (\(stages.map(\.name).joined(separator: ", ")))")
    exit(0)
}

// MARK: - Setup and run

let asRoot = geteuid() == 0
// A closed standard output (--foreground into a pipe that went away) must not
// kill the supervisor; the stages get default dispositions back at spawn.
signal(SIGPIPE, SIG_IGN)
umask(0o022)
if let pid = runningSupervisor(pidFile: layout.pidFile) {
    fail("already running (pid \(pid)) for \(configuration.dataDirectory)", .tempFail)
}
// One supervisor per data directory, decided by a lock held for the
// process's life (the pid file check above leaves a window between two
// starts; the second would overwrite the pid file, and Pipeline/stop would
// stop only one of them). Taken before anything else changes: a second
// start must not touch the users, the directories (local/recipients is
// removed at each start) or the log of the one running.
do {
    try Setup.ensureSuperviseDirectory(layout, asRoot: asRoot)
} catch {
    fail("\(error)", .osErr)
}
let instanceLock = open(layout.superviseDirectory + "/supervise.lock", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
guard instanceLock >= 0 else {
    fail("cannot open \(layout.superviseDirectory)/supervise.lock: \(String(cString: strerror(errno)))", .osErr)
}
while flock(instanceLock, LOCK_EX | LOCK_NB) != 0 {
    if errno == EINTR { continue }
    guard errno == EWOULDBLOCK else {
        fail("cannot lock \(layout.superviseDirectory)/supervise.lock: \(String(cString: strerror(errno)))", .osErr)
    }
    let other = runningSupervisor(pidFile: layout.pidFile).map { " (pid \($0))" } ?? ""
    fail("already running\(other) for \(configuration.dataDirectory)", .tempFail)
}
let log = LogSink(path: layout.logFile, hostname: configuration.hostname, echo: foreground)
var created: [String] = []
do {
    if asRoot { created = try Setup.ensureUsers(for: stages) }
    created += try Setup.ensureDirectories(layout, stages: stages, asRoot: asRoot)
    try log.open()
} catch {
    fail("\(error)", .osErr)
}
var settings = SupervisorSettings(configFile: configuration.file, hostname: configuration.hostname,
                                  layout: layout, stages: stages, foreground: foreground)
settings.listeners = ListenerDefinition.served(by: configuration)
settings.certificates = configuration.tls.certificates
if configuration.smtp.rejectUnknownLocalRecipients { settings.listenerStartWait = 10 }
// What local-deliver reads at start: a change to any of them reloads it.
// The system's account database is watched where it is a file; other
// sources (NSS: LDAP, sssd) change unseen, and SIGHUP reloads them.
settings.reloadFiles = [configuration.local.aliasesFile, configuration.file]
    + (configuration.local.accounts == .system ? ["/etc/passwd"] : [])
// Every path is absolute by now; hold no directory busy.
_ = chdir("/")
let supervisor = Supervisor(settings: settings, log: log)
for line in created { supervisor.note(line) }
do {
    exit(try supervisor.run())
} catch {
    supervisor.note("fatal: \(error)")
    exit(ExitCode.osErr.rawValue)
}
