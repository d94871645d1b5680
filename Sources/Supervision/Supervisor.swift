// The supervisor: starts every stage of Pipeline/stages, collects their
// stderr into the log, restarts them when they die, stops them in reverse
// order on SIGTERM/SIGINT, forwards SIGHUP. Single-threaded: one poll(2) loop
// over a signalfd and the stages' output pipes.

#if canImport(Glibc)
import Glibc
#endif
import CSystemShims
import CSystemSpawn
import SealpostConfig
import StageProtocol
import StageRuntime

public struct SupervisorSettings: Sendable {
    /// Absolute path of the configuration file, passed to stages as SEALPOST_CONFIG.
    public var configFile: String
    public var hostname: String
    public var layout: DirectoryLayout
    public var stages: [StageDefinition]
    /// Also echo log lines to standard output.
    public var foreground: Bool
    /// How long a stage may take to exit after SIGTERM before SIGKILL.
    public var stopTimeout: Double = 10
    /// smtp-listen's listening sockets, which the supervisor binds and
    /// passes to the stage named `listenerStage` (socket activation).
    public var listeners: [ListenerDefinition] = []
    public var listenerStage = "smtp-listen"
    /// The [tls] certificate and key files, which the supervisor opens for
    /// the stage named `certificateStage` on SIGHUP and when they change
    /// (the certificate channel), checking them every
    /// `certificateCheckInterval` seconds.
    public var certificates: [TLSCertificateSettings] = []
    public var certificateStage = "crypto-negotiate"
    public var certificateCheckInterval: Double = 5

    public init(configFile: String, hostname: String, layout: DirectoryLayout,
                stages: [StageDefinition], foreground: Bool) {
        self.configFile = configFile
        self.hostname = hostname
        self.layout = layout
        self.stages = stages
        self.foreground = foreground
    }
}

/// One stage and its life so far.
final class StageSlot {
    enum State: String { case running, restarting, stopped }

    let definition: StageDefinition
    var state: State = .stopped
    var pid: pid_t = 0
    var startedAt: Double = 0          // monotonic, for the uptime
    var since: time_t = time(nil)      // wall clock, for the status file
    var restartAt: Double = 0          // monotonic, when restarting
    var restarts = 0
    var backoff = Backoff()
    /// Our end of the stage's certificate channel, -1 when none.
    var certificateChannel: Int32 = -1

    init(_ definition: StageDefinition) { self.definition = definition }
}

/// The read end of a stage's stderr pipe. It outlives the process until EOF,
/// so nothing the stage wrote before dying is lost.
final class OutputPipe {
    let fd: Int32
    let stage: String
    let pid: pid_t
    var assembler = LineAssembler()

    init(fd: Int32, stage: String, pid: pid_t) {
        self.fd = fd
        self.stage = stage
        self.pid = pid
    }
}

public final class Supervisor {
    private let settings: SupervisorSettings
    private let log: LogSink
    private let asRoot: Bool
    private let ownPID = getpid()
    private var slots: [StageSlot]
    private var pipes: [OutputPipe] = []
    private var signalFD: Int32 = -1
    private var devNull: Int32 = -1
    private var stopping = false
    private var readBuffer = [UInt8](repeating: 0, count: 65536)
    /// When stage output was last drained (monotonic seconds).
    private var lastDrain = 0.0
    /// The shortest time between two rounds of draining stage output: log
    /// lines wait at most this long (timestamps have whole seconds).
    static let logGatherInterval = 0.005
    private let listening: ListeningSockets
    private let certificateWatcher: CertificateWatcher?

    public init(settings: SupervisorSettings, log: LogSink) {
        self.settings = settings
        self.log = log
        self.asRoot = geteuid() == 0
        self.slots = settings.stages.map(StageSlot.init)
        let served = settings.stages.contains { $0.name == settings.listenerStage }
        self.listening = ListeningSockets(definitions: served ? settings.listeners : [])
        let tlsStage = settings.stages.contains { $0.name == settings.certificateStage }
        if tlsStage && !settings.certificates.isEmpty && settings.certificates.count <= ProtocolSchema.maximumCertificatePairs {
            certificateWatcher = CertificateWatcher(pairs: settings.certificates, interval: settings.certificateCheckInterval)
        } else {
            certificateWatcher = nil
        }
    }

    /// A line from the supervisor itself.
    public func note(_ message: String) { log.write("supervise[\(ownPID)]: \(message)") }

    /// Runs until SIGTERM or SIGINT, then stops every stage; returns the exit
    /// status for the process. The caller has set up users and directories
    /// and opened the log.
    public func run() throws -> Int32 {
        devNull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        guard devNull >= 0 else { throw SystemError("open", path: "/dev/null") }
        signalFD = sealpost_spawn_signalfd()
        guard signalFD >= 0 else { throw SystemError("signalfd") }
        try writePIDFile()
        note("starting \(slots.count) stages from configuration \(settings.configFile)" + (asRoot ? "" : " (not root: no privilege separation)"))
        if settings.certificates.count > ProtocolSchema.maximumCertificatePairs {
            note("warning: more than \(ProtocolSchema.maximumCertificatePairs) certificate pairs: \(settings.certificateStage) can reload them only where it can reopen the files (not chrooted)")
        }
        for slot in slots { start(slot) }
        writeStatus()

        while !stopping {
            pollOnce(timeout: nextTimeout())
            startDueStages()
            checkCertificates()
        }
        shutdown()
        return 0
    }

    // MARK: - The loop

    /// Milliseconds until the next restart is due, -1 for none.
    private func nextTimeout() -> Int32 {
        let now = monotonicNow()
        var earliest: Double? = nil
        for slot in slots where slot.state == .restarting {
            earliest = min(earliest ?? slot.restartAt, slot.restartAt)
        }
        if let watcher = certificateWatcher, slots.contains(where: { $0.certificateChannel >= 0 }) {
            earliest = min(earliest ?? watcher.nextCheck, watcher.nextCheck)
        }
        guard let earliest else { return -1 }
        return Int32(max(0, min(60_000, ((earliest - now) * 1000).rounded(.up))))
    }

    private func pollOnce(timeout: Int32) {
        var fds = [pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0)]
        for pipe in pipes { fds.append(pollfd(fd: pipe.fd, events: Int16(POLLIN), revents: 0)) }
        var ready = poll(&fds, nfds_t(fds.count), timeout)
        if ready < 0 {
            if errno == EINTR { return }
            note("warning: poll: \(String(cString: strerror(errno)))")
            usleep(100_000)
            return
        }
        if ready == 0 { return }
        if fds[0].revents == 0 {
            // Only stage output: let it gather for up to logGatherInterval
            // after the previous round, then take all of it at once. Under
            // load (several lines per accepted message) this is one wake-up,
            // read and write per round instead of one per line, and fewer
            // preemptions of the stages on a busy machine. A pipe holds
            // 64 KiB, hundreds of lines: a stage never waits on it for that.
            let wait = lastDrain + Self.logGatherInterval - monotonicNow()
            if wait > 0 {
                usleep(useconds_t(wait * 1_000_000))
                ready = poll(&fds, nfds_t(fds.count), 0)
                if ready <= 0 { return }
            }
        }
        lastDrain = monotonicNow()
        // Output first, so that the lines a dying stage wrote precede the
        // supervisor's line about its death.
        let readyPipes = zip(fds.dropFirst(), pipes).filter { $0.0.revents != 0 }.map(\.1)
        for pipe in readyPipes { drain(pipe) }
        log.flush()
        if fds[0].revents != 0 { handleSignals() }
    }

    private func handleSignals() {
        while true {
            let signal = sealpost_spawn_read_signal(signalFD)
            if signal <= 0 { return }
            switch signal {
            case SIGCHLD:
                reap()
            case SIGTERM, SIGINT:
                if !stopping {
                    note("received signal \(signal) (\(signal == SIGTERM ? "SIGTERM" : "SIGINT")); stopping")
                }
                stopping = true
            case SIGHUP:
                do {
                    try log.open()
                } catch {
                    note("warning: cannot reopen the log: \(error)")
                }
                // Only to stages that handle it: for the others SIGHUP's
                // default action is to terminate, which would drop every
                // session and delivery in progress (a log rotation must
                // not restart the pipeline).
                var sent: [String] = []
                var spared: [String] = []
                for slot in slots where slot.state == .running {
                    if handlesSignal(pid: slot.pid, SIGHUP) {
                        kill(slot.pid, SIGHUP)
                        sent.append(slot.definition.name)
                    } else {
                        spared.append(slot.definition.name)
                    }
                }
                note("received SIGHUP: log reopened, forwarded to " + (sent.isEmpty ? "no stage" : sent.joined(separator: ", "))
                     + (spared.isEmpty ? "" : " (not to \(spared.joined(separator: ", ")): SIGHUP would terminate them)"))
                sendCertificates(reason: "SIGHUP")
            default:
                break
            }
        }
    }

    /// Reads what a pipe has (non-blocking) and logs its complete lines.
    /// The lines are queued (LogSink.append): callers flush the log once
    /// they drained every ready pipe, one write for the whole round.
    private func drain(_ pipe: OutputPipe) {
        while true {
            let n = readBuffer.withUnsafeMutableBytes { read(pipe.fd, $0.baseAddress, $0.count) }
            if n > 0 {
                // Blank lines (a crash report's spacing) carry nothing.
                for line in pipe.assembler.append(readBuffer[0..<n]) where !isBlank(line) {
                    log.append(LogFormat.stageLine(line, stage: pipe.stage, pid: pipe.pid))
                }
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            // EOF (or an error): the stage and everything it forked are gone.
            if let rest = pipe.assembler.finish() {
                log.write(LogFormat.stageLine(rest, stage: pipe.stage, pid: pipe.pid))
            }
            close(pipe.fd)
            pipes.removeAll { $0 === pipe }
            return
        }
    }

    private func reap() {
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            if pid <= 0 { return }
            guard let slot = slots.first(where: { $0.state == .running && $0.pid == pid }) else { continue }
            // Log what it wrote before it died first.
            for pipe in pipes where pipe.pid == pid { drain(pipe) }
            log.flush()
            exited(slot, status: status)
        }
    }

    private func exited(_ slot: StageSlot, status: Int32) {
        let name = slot.definition.name
        let how = Spawner.describe(status: status)
        let uptime = monotonicNow() - slot.startedAt
        let pid = slot.pid
        slot.pid = 0
        slot.since = time(nil)
        if slot.certificateChannel >= 0 {
            close(slot.certificateChannel)
            slot.certificateChannel = -1
        }
        if stopping {
            slot.state = .stopped
            note("stage \(name) (pid \(pid)) \(how)")
        } else {
            let delay = slot.backoff.delayAfterExit(uptime: uptime)
            slot.state = .restarting
            slot.restartAt = monotonicNow() + Double(delay)
            note("warning: stage \(name) (pid \(pid)) \(how); restarting in \(delay) s")
        }
        writeStatus()
    }

    private func startDueStages() {
        guard !stopping else { return }
        let now = monotonicNow()
        var changed = false
        for slot in slots where slot.state == .restarting && slot.restartAt <= now {
            slot.restarts += 1
            start(slot)
            changed = true
        }
        if changed { writeStatus() }
    }

    /// Starts a stage; a failure to spawn counts as an exit (with backoff).
    private func start(_ slot: StageSlot) {
        let definition = slot.definition
        var fds: [Int32] = [-1, -1]
        guard sealpost_spawn_pipe(&fds, 1) == 0 else {
            note("warning: stage \(definition.name): pipe: \(String(cString: strerror(errno)))")
            scheduleRetry(slot)
            return
        }
        var environment = stageEnvironment(stage: definition, configFile: settings.configFile, asRoot: asRoot)
        var passing: [Int32] = []
        var pidVariable: String? = nil
        var channel: [Int32] = [-1, -1]
        defer { if channel[1] >= 0 { close(channel[1]) } }   // the child's end: its copy is at 3
        do {
            if definition.name == settings.certificateStage, certificateWatcher != nil {
                // A fresh channel per instance: nothing sent to a dead one
                // (descriptors of files since replaced) reaches the next.
                guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &channel) == 0 else {
                    throw SystemError("socketpair")
                }
                _ = fcntl(channel[0], F_SETFL, fcntl(channel[0], F_GETFL) | O_NONBLOCK)
                environment.append("SEALPOST_CERTIFICATE_FD=3")
                passing = [channel[1]]
            }
            if definition.name == settings.listenerStage && !listening.definitions.isEmpty {
                // Bound once, before the first start, then kept: every
                // restart gets the same sockets (and their backlog).
                for line in try listening.bindAll() { note(line) }
                environment += listening.environment
                passing = listening.descriptors
                pidVariable = "LISTEN_PID"
            }
            let pid = try Spawner.spawn(executable: definition.executable, argumentZero: definition.executable,
                                        arguments: definition.arguments, environment: environment,
                                        stdinFD: devNull, outputFD: fds[1], newProcessGroup: true,
                                        passing: passing, pidVariable: pidVariable)
            close(fds[1])
            pipes.append(OutputPipe(fd: fds[0], stage: definition.name, pid: pid))
            if channel[0] >= 0 {
                slot.certificateChannel = channel[0]
                certificateWatcher?.started(now: monotonicNow())
            }
            slot.pid = pid
            slot.state = .running
            slot.startedAt = monotonicNow()
            slot.since = time(nil)
            note("started stage \(definition.name) (pid \(pid)): \(([definition.executable] + definition.arguments).joined(separator: " "))")
        } catch {
            close(fds[0])
            close(fds[1])
            if channel[0] >= 0 { close(channel[0]) }
            note("warning: stage \(definition.name): \(error)")
            scheduleRetry(slot)
        }
    }

    // MARK: - Certificates

    /// Sends the certificate files when they changed (and the change is
    /// stable); called after every poll.
    private func checkCertificates() {
        guard let watcher = certificateWatcher, !stopping,
              slots.contains(where: { $0.certificateChannel >= 0 }),
              let changed = watcher.dueChange(now: monotonicNow()) else { return }
        sendCertificates(reason: "changed: " + changed.joined(separator: ", "))
    }

    private func sendCertificates(reason: String) {
        guard let watcher = certificateWatcher else { return }
        for slot in slots where slot.certificateChannel >= 0 {
            note(watcher.send(on: slot.certificateChannel, reason: reason))
        }
    }

    private func scheduleRetry(_ slot: StageSlot) {
        let delay = slot.backoff.delayAfterExit(uptime: 0)
        slot.state = .restarting
        slot.restartAt = monotonicNow() + Double(delay)
        slot.since = time(nil)
        note("warning: stage \(slot.definition.name): restarting in \(delay) s")
    }

    // MARK: - Stopping

    /// Stops the stages one by one, last defined first: SIGTERM, up to
    /// `stopTimeout` seconds, then SIGKILL to its process group.
    private func shutdown() {
        for slot in slots.reversed() {
            guard slot.state == .running else {
                slot.state = .stopped
                continue
            }
            let name = slot.definition.name
            let pid = slot.pid
            kill(pid, SIGTERM)
            if !wait(for: slot, seconds: settings.stopTimeout) {
                note("warning: stage \(name) (pid \(pid)) did not stop within \(Int(settings.stopTimeout)) s; killing it")
                kill(-pid, SIGKILL)
                kill(pid, SIGKILL)
                _ = wait(for: slot, seconds: 5)
            }
            writeStatus()
        }
        // Whatever the stages left in their pipes (bounded: a descendant that
        // kept the pipe open must not hold the supervisor forever).
        let deadline = monotonicNow() + 2
        while !pipes.isEmpty && monotonicNow() < deadline {
            pollOnce(timeout: 100)
        }
        for pipe in pipes {
            if let rest = pipe.assembler.finish() {
                log.write(LogFormat.stageLine(rest, stage: pipe.stage, pid: pipe.pid))
            }
            close(pipe.fd)
        }
        pipes.removeAll()
        listening.closeAll()
        writeStatus()
        unlink(settings.layout.pidFile)
        note("stopped")
    }

    /// Runs the loop until the slot's process was reaped or time is up.
    private func wait(for slot: StageSlot, seconds: Double) -> Bool {
        let deadline = monotonicNow() + seconds
        while slot.state == .running {
            let left = deadline - monotonicNow()
            if left <= 0 { return false }
            pollOnce(timeout: Int32(min(left * 1000, 1000).rounded(.up)))
        }
        return true
    }

    // MARK: - Files for Pipeline/status and Pipeline/stop

    private func writePIDFile() throws {
        try writeFileAtomically(settings.layout.pidFile, "\(ownPID)\n")
    }

    /// One line per stage: name, state, pid (0 if none), since (Unix time),
    /// restarts. Replaced atomically, so a reader never sees half of it.
    private func writeStatus() {
        var text = "# supervise \(ownPID): name state pid since restarts\n"
        for slot in slots {
            text += "\(slot.definition.name) \(slot.state.rawValue) \(slot.pid) \(slot.since) \(slot.restarts)\n"
        }
        do {
            try writeFileAtomically(settings.layout.statusFile, text)
        } catch {
            note("warning: cannot write \(settings.layout.statusFile): \(error)")
        }
    }
}

/// Whether `signal` would not terminate process `pid`: it is caught,
/// ignored or blocked (a stage that takes it with sigwait blocks it), by
/// /proc/PID/status. Unknown (no /proc): true, as if it were handled.
func handlesSignal(pid: pid_t, _ signal: Int32) -> Bool {
    guard let text = try? readWholeFile("/proc/\(pid)/status") else { return true }
    let bit = UInt64(1) << UInt64(signal - 1)
    for line in text.split(separator: "\n") {
        for key in ["SigBlk:", "SigIgn:", "SigCgt:"] where line.hasPrefix(key) {
            let hex = line.dropFirst(key.count).trimmingPrefix(while: { $0 == " " || $0 == "\t" })
            if let mask = UInt64(hex, radix: 16), mask & bit != 0 { return true }
        }
    }
    return false
}

func isBlank(_ line: [UInt8]) -> Bool {
    line.allSatisfy { $0 == 0x20 || $0 == 0x09 || $0 == 0x0d }
}

/// Writes `path` through a temporary file and rename(2); mode 0644.
func writeFileAtomically(_ path: String, _ text: String) throws {
    let temporary = path + ".tmp"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o644)
    guard fd >= 0 else { throw SystemError("open", path: temporary) }
    let ok = writeAll(fd, Array(text.utf8))
    close(fd)
    guard ok else { throw SystemError("write", path: temporary) }
    guard rename(temporary, path) == 0 else { throw SystemError("rename", path: path) }
}

/// The pid in a pid file when that process is alive and is a supervisor.
public func runningSupervisor(pidFile: String) -> pid_t? {
    guard let text = try? readWholeFile(pidFile),
          let pid = pid_t(text.trimmingCharacters(in: " \n")), pid > 0 else { return nil }
    guard kill(pid, 0) == 0 || errno == EPERM else { return nil }
    // A recycled pid that belongs to something else is not a supervisor.
    guard let comm = try? readWholeFile("/proc/\(pid)/comm") else { return pid }
    return comm.hasPrefix("supervise") ? pid : nil
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        let characters = Set(set)
        var slice = Substring(self)
        while let first = slice.first, characters.contains(first) { slice = slice.dropFirst() }
        while let last = slice.last, characters.contains(last) { slice = slice.dropLast() }
        return String(slice)
    }
}
