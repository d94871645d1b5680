// The supervisor: starts every stage of Pipeline/stages, collects their
// stderr into the log, restarts them when they die, stops them in reverse
// order on SIGTERM/SIGINT, forwards SIGHUP, reloads local-deliver by
// replacing it. Single-threaded: one poll(2) loop over a signalfd, the
// stages' output pipes and the ready pipes of replacements.

#if canImport(Glibc)
import Glibc
#endif
import CSystemShims
import CSystemSpawn
import FileAccess
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
    /// The same for the listener stage: smtp-listen lets sessions finish a
    /// message in progress for up to 30 s (then 421), which a SIGKILL at
    /// 10 s would cut off with a reset. Pipeline/stop allows for it.
    public var listenerStopTimeout: Double = 35
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
    /// The stage reloaded by replacement (see "Reloads" below): on SIGHUP,
    /// and when one of `reloadFiles` changed (checked every
    /// `reloadCheckInterval` seconds), a new instance starts, and the
    /// running one stops once the new one reported ready, within
    /// `reloadReadyTimeout` seconds.
    public var reloadStage = "local-deliver"
    public var reloadFiles: [String] = []
    public var reloadCheckInterval: Double = 5
    public var reloadReadyTimeout: Double = 60
    /// At the supervisor's start, how long the first start of
    /// `listenerStage` waits for the first instance of `reloadStage` to
    /// report ready on its SEALPOST_READY_FD (local-deliver writes the local
    /// recipient table first, so smtp-listen has it from its first RCPT);
    /// 0: the listener starts with the others. Every instance of the
    /// reload stage gets a ready pipe, not only replacements.
    public var listenerStartWait: Double = 0

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
    enum State: String { case running, restarting, stopped, waiting }

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
    /// Our end of this instance's ready pipe (SEALPOST_READY_FD; the reload
    /// stage), -1 once it reported ready, closed it or died.
    var ready: Int32 = -1
    /// Waiting (the listener stage, at the supervisor's start): until when
    /// (monotonic).
    var waitUntil: Double = 0
    /// A new instance started to replace this one (a reload), until it
    /// reports ready (it becomes `pid`) or exits.
    var replacement: Replacement?
    /// Instances a reload replaced: stopping (SIGTERM sent), finishing
    /// their work.
    var retiring: [pid_t] = []

    struct Replacement {
        var pid: pid_t
        /// Our end of its ready pipe (SEALPOST_READY_FD), -1 once closed.
        var ready: Int32
        var startedAt: Double
        var deadline: Double
        /// Killed for not reporting ready in time (already logged).
        var abandoned = false
    }

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
    /// The files of the reload stage, checked for changes; nil without them.
    private var reloadWatch: FileWatch?

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
        if settings.stages.contains(where: { $0.name == settings.reloadStage }) && !settings.reloadFiles.isEmpty {
            // A missing aliases file is an empty table: its removal is a change.
            reloadWatch = FileWatch(paths: settings.reloadFiles, interval: settings.reloadCheckInterval, missingIsAChange: true)
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
        // The listener first waits, where it waits, so that the reload
        // stage's start (even one that fails at once) can release it.
        let waiting = listenerWaits ? slots.first { $0.definition.name == settings.listenerStage } : nil
        if let waiting {
            // Bound now, so that the kernel queues the connections of the
            // wait in the backlog instead of refusing them; a failure is
            // left to the listener's start, which retries.
            do {
                for line in try listening.bindAll() { note(line) }
            } catch {
                note("warning: \(error) (\(waiting.definition.name)'s start tries again)")
            }
            waiting.state = .waiting
            waiting.waitUntil = monotonicNow() + settings.listenerStartWait
            note("stage \(waiting.definition.name) starts once \(settings.reloadStage) reported ready (it writes the local recipient table first), within \(Int(settings.listenerStartWait)) s")
        }
        for slot in slots where slot !== waiting { start(slot) }
        writeStatus()

        while !stopping {
            pollOnce(timeout: nextTimeout())
            startWaitingListener(reason: nil)
            startDueStages()
            checkCertificates()
            checkReloads()
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
        for slot in slots where slot.state == .waiting {
            earliest = min(earliest ?? slot.waitUntil, slot.waitUntil)
        }
        if let watcher = certificateWatcher, slots.contains(where: { $0.certificateChannel >= 0 }) {
            earliest = min(earliest ?? watcher.nextCheck, watcher.nextCheck)
        }
        // Not while a replacement is pending: checkReloads does not look at
        // the files then (nor move nextCheck on), and a check time in the
        // past would make every poll return at once until the new instance
        // reports or is killed (a busy core for up to reloadReadyTimeout).
        if let watch = reloadWatch,
           slots.contains(where: { $0.definition.name == settings.reloadStage && $0.state == .running && $0.replacement == nil }) {
            earliest = min(earliest ?? watch.nextCheck, watch.nextCheck)
        }
        for slot in slots {
            if let replacement = slot.replacement, !replacement.abandoned {
                earliest = min(earliest ?? replacement.deadline, replacement.deadline)
            }
        }
        guard let earliest else { return -1 }
        return Int32(max(0, min(60_000, ((earliest - now) * 1000).rounded(.up))))
    }

    private func pollOnce(timeout: Int32) {
        var fds = [pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0)]
        for pipe in pipes { fds.append(pollfd(fd: pipe.fd, events: Int16(POLLIN), revents: 0)) }
        let outputs = pipes.count   // drain() below removes the pipes that ended
        let awaited = slots.filter { ($0.replacement?.ready ?? -1) >= 0 }
        for slot in awaited { fds.append(pollfd(fd: slot.replacement!.ready, events: Int16(POLLIN), revents: 0)) }
        let starting = slots.filter { $0.ready >= 0 }
        for slot in starting { fds.append(pollfd(fd: slot.ready, events: Int16(POLLIN), revents: 0)) }
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
        for (slot, fd) in zip(awaited, fds.dropFirst(1 + outputs)) where fd.revents != 0 {
            replacementReported(slot)
        }
        if fds[0].revents != 0 { handleSignals() }
        // After the signals: a stage that died is reaped first, and told
        // apart from one that closed its pipe.
        for (slot, fd) in zip(starting, fds.suffix(starting.count)) where fd.revents != 0 {
            startReported(slot)
        }
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
                var replaced: [StageSlot] = []
                for slot in slots where slot.state == .running {
                    if slot.definition.name == settings.reloadStage {
                        replaced.append(slot)
                    } else if handlesSignal(pid: slot.pid, SIGHUP) {
                        kill(slot.pid, SIGHUP)
                        sent.append(slot.definition.name)
                    } else {
                        spared.append(slot.definition.name)
                    }
                }
                note("received SIGHUP: log reopened, forwarded to " + (sent.isEmpty ? "no stage" : sent.joined(separator: ", "))
                     + (spared.isEmpty ? "" : " (not to \(spared.joined(separator: ", ")): SIGHUP would terminate them)")
                     + replaced.map { "; reloading \($0.definition.name) by replacing it" }.joined())
                sendCertificates(reason: "SIGHUP")
                for slot in replaced { replace(slot, reason: "SIGHUP") }
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
            // Log what it wrote before it died first.
            for pipe in pipes where pipe.pid == pid { drain(pipe) }
            log.flush()
            if let slot = slots.first(where: { $0.state == .running && $0.pid == pid }) {
                exited(slot, status: status)
            } else if let slot = slots.first(where: { $0.replacement?.pid == pid }) {
                replacementExited(slot, status: status)
            } else if let slot = slots.first(where: { $0.retiring.contains(pid) }) {
                slot.retiring.removeAll { $0 == pid }
                note("stage \(slot.definition.name) (pid \(pid)), replaced by a reload, \(Spawner.describe(status: status))")
            }
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
        if slot.ready >= 0 {
            // Reaped before its pipe was read: the byte may be there.
            let reported = takeReadyReport(&slot.ready) == true
            if slot.ready >= 0 {   // nothing there, and a writer left (a child of its)
                close(slot.ready)
                slot.ready = -1
            }
            if name == settings.reloadStage {
                startWaitingListener(reason: "\(name) (pid \(pid)) " + (reported ? "reported ready before it exited" : "exited before it reported ready"))
            }
        }
    }

    /// Whether the listener's first start waits for the reload stage.
    private var listenerWaits: Bool {
        settings.listenerStartWait > 0
            && settings.stages.contains { $0.name == settings.listenerStage }
            && settings.stages.contains { $0.name == settings.reloadStage }
    }

    /// Starts the listener stage if it waits and `reason` (why it waits no
    /// longer) is given or its time is up. Called after every poll.
    private func startWaitingListener(reason: String?) {
        guard !stopping, let slot = slots.first(where: { $0.definition.name == settings.listenerStage }),
              slot.state == .waiting else { return }
        let why: String
        if let reason {
            why = reason
        } else if monotonicNow() >= slot.waitUntil {
            why = "warning: \(settings.reloadStage) did not report ready within \(Int(settings.listenerStartWait)) s"
        } else {
            return
        }
        note("\(why); starting stage \(slot.definition.name)")
        start(slot)
        writeStatus()
    }

    /// A first start's ready pipe is readable: a byte (ready), or its end
    /// (the instance is exiting, or does not report: a program that took
    /// the stage's place).
    private func startReported(_ slot: StageSlot) {
        guard let reported = takeReadyReport(&slot.ready) else { return }
        startWaitingListener(reason: "\(slot.definition.name) (pid \(slot.pid)) "
                             + (reported ? "reported ready" : "closed its ready pipe without reporting ready"))
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
        var environment = stageEnvironment(stage: definition, configFile: settings.configFile, asRoot: asRoot)
        var passing: [Int32] = []
        var pidVariable: String? = nil
        var channel: [Int32] = [-1, -1]
        defer { if channel[1] >= 0 { close(channel[1]) } }   // the child's end: its copy is at 3
        var ready: [Int32] = [-1, -1]
        defer { if ready[1] >= 0 { close(ready[1]) } }       // the same
        do {
            if definition.name == settings.reloadStage {
                guard sealpost_spawn_pipe(&ready, 1) == 0 else { throw SystemError("pipe") }
                environment.append("SEALPOST_READY_FD=3")
                passing = [ready[1]]
            }
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
                // restart gets the same sockets (and their backlog), unless
                // one stopped listening (see renewDead).
                for line in try listening.bindAll() { note(line) }
                let renewed = listening.renewDead()
                for line in renewed.notes + renewed.failures { note("warning: \(line)") }
                environment += listening.environment
                passing = listening.descriptors
                pidVariable = "LISTEN_PID"
            }
            let pid = try spawn(definition, environment: environment, passing: passing, pidVariable: pidVariable)
            if channel[0] >= 0 {
                slot.certificateChannel = channel[0]
                certificateWatcher?.started(now: monotonicNow())
            }
            slot.ready = ready[0]
            if definition.name == settings.reloadStage { reloadWatch?.started(now: monotonicNow()) }
            slot.pid = pid
            slot.state = .running
            slot.startedAt = monotonicNow()
            slot.since = time(nil)
            note("started stage \(definition.name) (pid \(pid)): \(([definition.executable] + definition.arguments).joined(separator: " "))")
        } catch {
            if channel[0] >= 0 { close(channel[0]) }
            if ready[0] >= 0 { close(ready[0]) }
            note("warning: stage \(definition.name): \(error)")
            scheduleRetry(slot)
            if definition.name == settings.reloadStage {
                startWaitingListener(reason: "\(definition.name) did not start")
            }
        }
    }

    /// Spawns an instance of a stage with its output on a new pipe to us.
    private func spawn(_ definition: StageDefinition, environment: [String], passing: [Int32],
                       pidVariable: String?) throws -> pid_t {
        var fds: [Int32] = [-1, -1]
        guard sealpost_spawn_pipe(&fds, 1) == 0 else { throw SystemError("pipe") }
        defer { close(fds[1]) }
        do {
            let pid = try Spawner.spawn(executable: definition.executable, argumentZero: definition.executable,
                                        arguments: definition.arguments, environment: environment,
                                        stdinFD: devNull, outputFD: fds[1], newProcessGroup: true,
                                        passing: passing, pidVariable: pidVariable)
            pipes.append(OutputPipe(fd: fds[0], stage: definition.name, pid: pid))
            return pid
        } catch {
            close(fds[0])
            throw error
        }
    }

    // MARK: - Reloads

    // local-deliver reads the aliases file and the account database at start,
    // as root, then chroots and runs unprivileged: it cannot read them again.
    // So a reload is a new start: the supervisor starts a second instance
    // with SEALPOST_RELOAD (the reason) and a pipe as SEALPOST_READY_FD=3.
    // The new instance loads everything as any start does (the supervisor
    // reads and parses nothing of it: it only stat()s the files to notice a
    // change) and writes one byte once it is ready; then the supervisor
    // sends SIGTERM to the old instance, which finishes the deliveries in
    // progress and exits, and the new one is the stage's from now on. A new
    // instance that cannot load (a malformed aliases file) logs why and
    // exits before that: the old one was never told to stop, so mail goes
    // on with the tables that loaded last. The change counts as handled
    // when the new instance starts, whether it comes up or not: a file that
    // does not load is not tried again every check interval (a failed
    // start and a warning each time), only when it changes again or on
    // SIGHUP, as with Postfix's postalias and postfix reload. Both run for a moment; the queue
    // gives each connection its own jobs, and Maildir delivery is safe from
    // several processes.

    /// Starts an instance to replace the running one (SIGHUP, files changed).
    private func replace(_ slot: StageSlot, reason: String) {
        let definition = slot.definition
        guard !stopping else { return }
        guard slot.replacement == nil else {
            note("\(definition.name): a reload is already under way (pid \(slot.replacement!.pid)); \(reason) not acted on")
            return
        }
        var ready: [Int32] = [-1, -1]
        guard sealpost_spawn_pipe(&ready, 1) == 0 else {
            note("warning: \(definition.name) not reloaded (\(reason)): pipe: \(String(cString: strerror(errno)))")
            return
        }
        defer { close(ready[1]) }   // the child's end: its copy is at 3
        let printable = String(reason.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? "?" : Character($0) })
        let environment = stageEnvironment(stage: definition, configFile: settings.configFile, asRoot: asRoot)
            + ["SEALPOST_RELOAD=\(printable)", "SEALPOST_READY_FD=3"]
        do {
            let pid = try spawn(definition, environment: environment, passing: [ready[1]], pidVariable: nil)
            let now = monotonicNow()
            slot.replacement = StageSlot.Replacement(pid: pid, ready: ready[0], startedAt: now,
                                                     deadline: now + settings.reloadReadyTimeout)
            reloadWatch?.started(now: now)
            note("started stage \(definition.name) (pid \(pid)) to replace pid \(slot.pid) (\(printable)): \(([definition.executable] + definition.arguments).joined(separator: " "))")
        } catch {
            close(ready[0])
            note("warning: \(definition.name) not reloaded (\(reason)): \(error)")
        }
    }

    /// The replacement's ready pipe is readable: a byte (ready), or its end
    /// (it is exiting without being ready; `replacementExited` follows).
    private func replacementReported(_ slot: StageSlot) {
        guard var replacement = slot.replacement, let reported = takeReadyReport(&replacement.ready) else { return }
        slot.replacement = replacement
        guard reported, !stopping else { return }
        slot.replacement = nil
        let old = slot.pid
        if slot.state == .running && old > 0 {
            kill(old, SIGTERM)
            slot.retiring.append(old)
        }
        slot.pid = replacement.pid
        slot.state = .running
        slot.startedAt = replacement.startedAt
        slot.since = time(nil)
        note("reloaded stage \(slot.definition.name): pid \(replacement.pid) replaces pid \(old), which finishes its work and stops")
        writeStatus()
        // A reload before the first instance reported: the new one's report
        // counts (its table is written). The first one's pipe stays open
        // until it ends (closed, its byte would meet EPIPE).
        startWaitingListener(reason: "\(slot.definition.name) (pid \(replacement.pid)) reported ready")
    }

    private func replacementExited(_ slot: StageSlot, status: Int32) {
        guard let replacement = slot.replacement else { return }
        if replacement.ready >= 0 { close(replacement.ready) }
        slot.replacement = nil
        guard !replacement.abandoned, !stopping else { return }
        // Not a warning of ours: the new instance logged why.
        note("\(slot.definition.name) not reloaded: the new instance (pid \(replacement.pid)) \(Spawner.describe(status: status)); pid \(slot.pid) goes on with what it loaded before")
    }

    /// Starts a reload when the stage's files changed; kills a replacement
    /// that did not report ready in time. Called after every poll.
    private func checkReloads() {
        guard !stopping else { return }
        let now = monotonicNow()
        for slot in slots {
            guard var replacement = slot.replacement, !replacement.abandoned, now >= replacement.deadline else { continue }
            replacement.abandoned = true
            slot.replacement = replacement
            kill(-replacement.pid, SIGKILL)
            kill(replacement.pid, SIGKILL)
            note("warning: \(slot.definition.name) not reloaded: the new instance (pid \(replacement.pid)) did not report ready within \(Int(settings.reloadReadyTimeout)) s; killed it; pid \(slot.pid) goes on")
        }
        guard reloadWatch != nil,
              let slot = slots.first(where: { $0.definition.name == settings.reloadStage && $0.state == .running }),
              slot.replacement == nil,
              let changed = reloadWatch!.dueChange(now: now) else { return }
        replace(slot, reason: "changed: " + changed.joined(separator: ", "))
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
            // A replacement not yet ready and instances a reload replaced
            // (already told to stop) end with the stage.
            let others = (slot.replacement.map { [$0.pid] } ?? []) + slot.retiring
            if let replacement = slot.replacement { kill(replacement.pid, SIGTERM) }
            guard slot.state == .running || !others.isEmpty else {
                slot.state = .stopped
                continue
            }
            let name = slot.definition.name
            let pid = slot.pid
            let timeout = name == settings.listenerStage ? settings.listenerStopTimeout : settings.stopTimeout
            if slot.state == .running { kill(pid, SIGTERM) }
            if !wait(for: slot, seconds: timeout) {
                let all = (slot.state == .running ? [pid] : []) + others
                note("warning: stage \(name) (pid \(all.map(String.init).joined(separator: ", "))) did not stop within \(Int(timeout)) s; killing it")
                for target in all {
                    kill(-target, SIGKILL)
                    kill(target, SIGKILL)
                }
                _ = wait(for: slot, seconds: 5)
            }
            slot.state = .stopped
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

    /// Runs the loop until the slot's processes were reaped or time is up.
    private func wait(for slot: StageSlot, seconds: Double) -> Bool {
        let deadline = monotonicNow() + seconds
        while slot.state == .running || slot.replacement != nil || !slot.retiring.isEmpty {
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

/// Reads a ready pipe (non-blocking) and closes it, setting `fd` to -1:
/// true for the ready byte, false for the pipe's end (or an error); nil,
/// and the pipe left open, when nothing is there yet or `fd` is closed.
func takeReadyReport(_ fd: inout Int32) -> Bool? {
    guard fd >= 0 else { return nil }
    var byte: UInt8 = 0
    let n = read(fd, &byte, 1)
    if n < 0 && (errno == EINTR || errno == EAGAIN) { return nil }
    close(fd)
    fd = -1
    return n == 1
}

func isBlank(_ line: [UInt8]) -> Bool {
    line.allSatisfy { $0 == 0x20 || $0 == 0x09 || $0 == 0x0d }
}

/// Writes `path` through a temporary file and rename(2); mode 0644.
func writeFileAtomically(_ path: String, _ text: String) throws(FileError) {
    try WholeFile.replace(path, with: Array(text.utf8), mode: 0o644, temporary: path + ".tmp")
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
