#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Logging
import Synchronization
import Testing
import SealpostConfig
@testable import StageRuntime

@Suite struct LogFormatTests {
    @Test func levels() {
        #expect(StageLogHandler.format(stage: "queue", pid: 42, level: .info, message: "started")
                == "queue[42]: started\n")
        #expect(StageLogHandler.format(stage: "queue", pid: 42, level: .notice, message: "n") == "queue[42]: n\n")
        #expect(StageLogHandler.format(stage: "queue", pid: 42, level: .warning, message: "spool 91% full")
                == "queue[42]: warning: spool 91% full\n")
        #expect(StageLogHandler.format(stage: "local-deliver", pid: 7, level: .error, message: "x")
                == "local-deliver[7]: error: x\n")
        #expect(StageLogHandler.format(stage: "queue", pid: 1, level: .critical, message: "cannot open the spool")
                == "queue[1]: fatal: cannot open the spool\n")
        #expect(StageLogHandler.format(stage: "queue", pid: 1, level: .debug, message: "d") == "queue[1]: debug: d\n")
        #expect(StageLogHandler.format(stage: "queue", pid: 1, level: .trace, message: "t") == "queue[1]: trace: t\n")
    }

    @Test func metadataIsAppendedSortedByKey() {
        let line = StageLogHandler.format(stage: "queue", pid: 9, level: .info, message: "0123456789AB: queued",
                                          metadata: ["size": "1234", "from": "<a@example.org>", "nrcpt": .stringConvertible(2)])
        #expect(line == "queue[9]: 0123456789AB: queued from=<a@example.org> nrcpt=2 size=1234\n")
        let nested = StageLogHandler.format(stage: "q", pid: 1, level: .info, message: "m",
                                            metadata: ["a": ["x", "y"], "b": ["k": "v"]])
        #expect(nested == "q[1]: m a=[x, y] b=[k: v]\n")
    }

    @Test func controlCharactersCannotSplitOrForgeLines() {
        let line = StageLogHandler.format(stage: "smtp-listen", pid: 3, level: .info,
                                          message: "HELO evil\nqueue[1]: fatal: forged\r\u{1b}[31m\t",
                                          metadata: ["helo": "a\nb"])
        #expect(line == "smtp-listen[3]: HELO evil\\nqueue[1]: fatal: forged\\r\\u{1b}[31m\\t helo=a\\nb\n")
        #expect(line.utf8.filter { $0 == UInt8(ascii: "\n") }.count == 1)
    }

    /// NEL, the other C1 controls and U+2028/U+2029 are line breaks to some
    /// readers of a log (Python's splitlines): escaped like the C0 ones,
    /// while other UTF-8 (an SMTPUTF8 address, é, €) stays as it is.
    @Test func unicodeLineSeparatorsCannotSplitLines() {
        let line = StageLogHandler.format(stage: "smtp-listen", pid: 3, level: .info,
                                          message: "from=<\"x\u{85}y\u{2028}z\u{2029}\u{9b}\"@b.example> é€ \u{2027}")
        #expect(line == "smtp-listen[3]: from=<\"x\\u{85}y\\u{2028}z\\u{2029}\\u{9b}\"@b.example> é€ \u{2027}\n")
        #expect(line.split(whereSeparator: \.isNewline).count == 1)
    }

    @Test func longLinesAreCutToPipeBufOnACharacterBoundary() {
        let message = String(repeating: "é", count: 5000)   // 2 bytes each
        let line = StageLogHandler.format(stage: "queue", pid: 12, level: .info, message: message)
        #expect(line.utf8.count <= StageLogHandler.maximumLineLength)
        #expect(line.utf8.count >= StageLogHandler.maximumLineLength - 2)
        #expect(line.hasSuffix("...\n"))
        #expect(line.hasPrefix("queue[12]: éé"))
        #expect(String(validating: Array(line.utf8), as: UTF8.self) != nil)
        let short = StageLogHandler.format(stage: "q", pid: 1, level: .info, message: String(repeating: "a", count: 100))
        #expect(!short.hasSuffix("...\n"))
    }

    @Test func handlerMetadataIsValueTypedAndMergedWithEventMetadata() {
        var handler = StageLogHandler(stage: "queue", logLevel: .info)
        handler[metadataKey: "queue_id"] = "0123456789AB"
        var copy = handler
        copy[metadataKey: "queue_id"] = nil
        #expect(handler.metadata == ["queue_id": "0123456789AB"])
        #expect(copy.metadata.isEmpty)
        #expect(handler.logLevel == .info)
    }

    @Test func debugFollowsSealpostDebug() {
        // Read, not set: the environment is process-wide.
        let debug = getenv("SEALPOST_DEBUG").map { String(cString: $0) } == "1"
        #expect(StageLogHandler.defaultLevel() == (debug ? .trace : .info))
    }
}

@Suite struct ExitCodeTests {
    @Test func sysexitsValues() {
        #expect(ExitCode.ok.rawValue == 0)
        #expect(ExitCode.usage.rawValue == 64)
        #expect(ExitCode.dataErr.rawValue == 65)
        #expect(ExitCode.noInput.rawValue == 66)
        #expect(ExitCode.noUser.rawValue == 67)
        #expect(ExitCode.noHost.rawValue == 68)
        #expect(ExitCode.unavailable.rawValue == 69)
        #expect(ExitCode.software.rawValue == 70)
        #expect(ExitCode.osErr.rawValue == 71)
        #expect(ExitCode.canTCreat.rawValue == 73)
        #expect(ExitCode.ioErr.rawValue == 74)
        #expect(ExitCode.tempFail.rawValue == 75)
        #expect(ExitCode.protocolErr.rawValue == 76)
        #expect(ExitCode.noPerm.rawValue == 77)
        #expect(ExitCode.config.rawValue == 78)
    }
}

@Suite struct RuntimePathsTests {
    func configuration() throws -> SealpostConfiguration {
        try SealpostConfiguration.parse(text: "[sealpost]\ndata_directory = \"/srv/sealpost\"\n", file: "/etc/sealpost/sealpost.toml")
    }

    @Test func pathsFromTheConfiguration() throws {
        let paths = RuntimePaths(try configuration())
        #expect(paths.dataDirectory == "/srv/sealpost")
        #expect(paths.runtimeDirectory == "/srv/sealpost/run")
        #expect(paths.injectSocket == "/srv/sealpost/run/inject")
        #expect(paths.deliverSocket == "/srv/sealpost/run/deliver")
        #expect(paths.controlSocket == "/srv/sealpost/run/control")
        #expect(paths.spoolDirectory == "/srv/sealpost/queue")
        #expect(paths.mailbox(user: "alice", template: "mail/{user}/Maildir") == "/srv/sealpost/mail/alice/Maildir")
    }

    @Test func rebasedToTheChrootRoot() throws {
        let paths = RuntimePaths(try configuration()).rebased(to: "/")
        #expect(paths.dataDirectory == "/")
        #expect(paths.runtimeDirectory == "/run")
        #expect(paths.injectSocket == "/run/inject")
        #expect(paths.deliverSocket == "/run/deliver")
        #expect(paths.controlSocket == "/run/control")
        #expect(paths.spoolDirectory == "/queue")
        #expect(paths.mailbox(user: "bob", template: "mail/{user}/Maildir") == "/mail/bob/Maildir")
    }

    @Test func dropPrivilegesIsANoOpWhenNotRoot() throws {
        let config = try configuration()
        let before = ConfigPathProbe.currentDirectory()
        let uid = getuid()
        // As the process is (the public entry point), when it is not root.
        if geteuid() != 0 {
            #expect(try StageRuntime.dropPrivileges(config, chroot: true) == RuntimePaths(config))
        }
        // As a non-root user whatever the process is: nothing is touched,
        // even with SEALPOST_USER set.
        let paths = try StageRuntime.dropPrivileges(config, chroot: true, effectiveUser: 1000, user: "nobody")
        #expect(paths == RuntimePaths(config))
        #expect(ConfigPathProbe.currentDirectory() == before)
        #expect(getuid() == uid)
    }

    // The refusals happen before anything changes, so they run in-process
    // even as root.
    @Test func rootWithoutSealpostUserIsRefused() throws {
        let config = try configuration()
        for user in [nil, ""] as [String?] {
            #expect {
                try StageRuntime.dropPrivileges(config, chroot: true, effectiveUser: 0, user: user)
            } throws: { error in
                let error = try #require(error as? PrivilegeError)
                return error.description == "refusing to run as root without SEALPOST_USER" && error.exitCode == .noPerm
            }
        }
    }

    @Test func rootWithAnUnknownUserIsRefused() throws {
        let config = try configuration()
        #expect {
            try StageRuntime.dropPrivileges(config, chroot: true, effectiveUser: 0, user: "sealpost-no-such-user")
        } throws: { error in
            let error = try #require(error as? PrivilegeError)
            return error.description == "SEALPOST_USER sealpost-no-such-user: no such user" && error.exitCode == .noUser
        }
    }

    @Test func rootAsSealpostUserIsRefused() throws {
        let config = try configuration()
        #expect {
            try StageRuntime.dropPrivileges(config, chroot: true, effectiveUser: 0, user: "root")
        } throws: { error in
            let error = try #require(error as? PrivilegeError)
            return error.description == "SEALPOST_USER root has uid or gid 0: refusing to run as root"
        }
    }

    /// The real drop, as root: this test binary runs itself again with only
    /// `privilegeDropChild` selected, in a child process that chroots and
    /// becomes "nobody", checks the result and reports it in its exit status.
    @Test func privilegeDropInAChildProcess() throws {
        guard geteuid() == 0, let (uid, gid) = try? StageRuntime.lookUpUser("nobody") else { return }   // covered by the pipeline tests
        var template = Array("/tmp/sealpost-drop-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        let directory = String(cString: try #require(made))
        defer { rmdir(directory) }

        let child = try runTestInChild("privilegeDropChild", environment: [
            "SEALPOST_USER=nobody", "SEALPOST_TEST_DROP_DIRECTORY=\(directory)", "SEALPOST_TEST_DROP_IDS=\(uid):\(gid)",
        ])
        #expect(child.signal == 0, "child killed by signal \(child.signal)")
        #expect(child.exit == 0, "child check \(child.exit) failed (see privilegeDropChild)")
    }

    @Test func privilegeDropChild() throws {
        guard let directory = getenv("SEALPOST_TEST_DROP_DIRECTORY").map({ String(cString: $0) }),
              let ids = getenv("SEALPOST_TEST_DROP_IDS").map({ String(cString: $0) })
        else { return }   // only in the child of privilegeDropInAChildProcess
        let parts = ids.split(separator: ":").compactMap { UInt32($0) }
        guard parts.count == 2 else { _exit(10) }
        let config: SealpostConfiguration
        do {
            config = try SealpostConfiguration.parse(text: "[sealpost]\ndata_directory = \"\(directory)\"\n",
                                                     file: "/etc/sealpost/sealpost.toml")
        } catch { _exit(11) }
        guard let paths = try? StageRuntime.dropPrivileges(config, chroot: true) else { _exit(12) }
        guard paths == RuntimePaths(config).rebased(to: "/") else { _exit(13) }
        guard getuid() == parts[0], geteuid() == parts[0] else { _exit(14) }
        guard getgid() == parts[1], getegid() == parts[1] else { _exit(15) }
        guard getgroups(0, nil) == 0 else { _exit(16) }
        guard setuid(0) != 0, seteuid(0) != 0 else { _exit(17) }
        guard ConfigPathProbe.currentDirectory() == "/" else { _exit(18) }
        guard access("/etc/passwd", F_OK) != 0 else { _exit(19) }   // chrooted into the empty directory
        _exit(0)
    }
}

enum ConfigPathProbe {
    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    static func currentDirectory() -> String {
        var buffer = [CChar](repeating: 0, count: 4097)
        return getcwd(&buffer, buffer.count) != nil ? buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) } : ""
    }
}

@Suite struct SignalEventsTests {
    @Test func raisedSignalReachesTheCallback() {
        let events = SignalEvents()
        let semaphore = DispatchSemaphore(value: 0)
        events.on(SIGUSR2) { semaphore.signal() }
        // kill, not raise: raise targets this thread, a dispatch worker that
        // blocks signals; a process-directed signal (what the supervisor
        // sends) goes to a thread that accepts it.
        kill(getpid(), SIGUSR2)
        // Not a timing assertion: the bound only keeps a broken build from hanging.
        #expect(semaphore.wait(timeout: .now() + 60) == .success)
        // Every delivery calls back again.
        kill(getpid(), SIGUSR2)
        #expect(semaphore.wait(timeout: .now() + 60) == .success)
        events.cancel()
        var action = sigaction()
        sigaction(SIGUSR2, nil, &action)
        let handler = unsafeBitCast(action.__sigaction_handler.sa_handler, to: Int.self)
        #expect(handler == unsafeBitCast(SIG_DFL, to: Int.self))
    }

    @Test func severalListenersForOneSignal() {
        let first = SignalEvents()
        let second = SignalEvents(queue: DispatchQueue(label: "second"))
        let semaphore = DispatchSemaphore(value: 0)
        first.on(SIGUSR1) { semaphore.signal() }
        second.on(SIGUSR1) { semaphore.signal() }
        kill(getpid(), SIGUSR1)
        #expect(semaphore.wait(timeout: .now() + 60) == .success)
        #expect(semaphore.wait(timeout: .now() + 60) == .success)
        first.cancel()
        // Still ours (second listens): raising it must not kill the process.
        kill(getpid(), SIGUSR1)
        #expect(semaphore.wait(timeout: .now() + 60) == .success)
        second.cancel()
    }
}

/// bootstrap, the log handler and fatal, end to end in child processes (a
/// process bootstraps swift-log once, and these exit).
@Suite struct BootstrapTests {
    @Test func badConfigurationExits78WithTheErrorOnStderr() throws {
        let directory = ConfigTemporaryFile("[queue]\n\nminimal_backoff_time = \"5x\"\n")
        let child = try runTestInChild("bootstrapChild", environment: [
            "SEALPOST_CONFIG=\(directory.file)", "SEALPOST_TEST_BOOTSTRAP=config",
        ])
        #expect(child.signal == 0)
        #expect(child.exit == 78)
        let lines = child.stderr.split(separator: "\n").filter { $0.hasPrefix("test-stage[") }
        #expect(lines.count == 1, "\(child.stderr)")
        let line = try #require(lines.first)
        #expect(line.hasSuffix("]: fatal: \(directory.file):3: queue.minimal_backoff_time: not a duration: \"5x\""), "\(line)")
    }

    @Test func logLinesAndFatalExitCode() throws {
        let directory = ConfigTemporaryFile("")
        let child = try runTestInChild("bootstrapChild", environment: [
            "SEALPOST_CONFIG=\(directory.file)", "SEALPOST_TEST_BOOTSTRAP=log",
        ])
        #expect(child.signal == 0)
        #expect(child.exit == 75)
        let lines = child.stderr.split(separator: "\n").filter { $0.hasPrefix("test-stage[") }
            .map { line in line[line.firstIndex(of: "]")!...] }
        #expect(lines == [
            "]: started hostname=\(try SealpostConfigProbe.hostname(directory.file))",
            "]: warning: spool nearly full percent=91 queue_id=0123456789AB",
            "]: error: oops",
            "]: fatal: giving up",
        ], "\(child.stderr)")
        // The pid in the lines is the child's, not ours.
        #expect(!child.stderr.contains("test-stage[\(getpid())]"))
    }

    /// A thread that holds its lines (an event loop's, in smtp-listen and
    /// the queue) writes them when the flush it scheduled runs, at once for
    /// an error, and at exit what it still holds; never out of order.
    @Test func heldLinesWaitForTheirFlushExceptErrorsAndExit() throws {
        let directory = ConfigTemporaryFile("")
        let child = try runTestInChild("bootstrapChild", environment: [
            "SEALPOST_CONFIG=\(directory.file)", "SEALPOST_TEST_BOOTSTRAP=hold",
        ])
        #expect(child.signal == 0)
        #expect(child.exit == 75)
        let lines = child.stderr.split(separator: "\n").filter { $0.hasPrefix("test-stage[") || $0.hasPrefix("marker") }
            .map { line in line.firstIndex(of: "]").map { line[$0...] } ?? line }
        #expect(lines == [
            "marker 1", "]: one", "]: two", "marker 2", "]: three", "]: error: urgent", "marker 3",
            "]: four",
        ], "\(child.stderr)")
    }

    @Test func bootstrapChild() {
        guard let mode = getenv("SEALPOST_TEST_BOOTSTRAP").map({ String(cString: $0) }) else { return }
        let config = StageRuntime.bootstrap(stage: "test-stage")
        if mode == "hold" { heldLinesChild() }
        guard mode == "log" else { _exit(0) }   // "config" must not get here
        StageRuntime.setUpLogging(stage: "ignored: logging is bootstrapped once")
        var logger = Logger(label: "test")
        logger.info("started", metadata: ["hostname": "\(config.hostname)"])
        logger.debug("not shown without SEALPOST_DEBUG=1")
        logger[metadataKey: "queue_id"] = "0123456789AB"
        logger.warning("spool nearly full", metadata: ["percent": "91"])
        logger[metadataKey: "queue_id"] = nil
        logger.error("oops")
        StageRuntime.fatal("giving up", exit: .tempFail)
    }
}

/// raiseDescriptorLimit in a child process: the child lowers its soft
/// limit first (the test process's may already be its hard limit, and
/// lowering it here would starve the tests running beside this one).
@Suite struct DescriptorLimitTests {
    @Test func softLimitIsRaisedToTheHardLimit() throws {
        let child = try runTestInChild("descriptorLimitChild", environment: ["SEALPOST_TEST_DESCRIPTOR_LIMIT=1"])
        #expect(child.signal == 0, "child killed by signal \(child.signal)")
        #expect(child.exit == 0, "child check \(child.exit) failed (see descriptorLimitChild): \(child.stderr)")
    }

    @Test func descriptorLimitChild() {
        guard getenv("SEALPOST_TEST_DESCRIPTOR_LIMIT") != nil else { return }   // only in the child
        var limit = rlimit()
        guard getrlimit(StageRuntime.resourceNoFile, &limit) == 0 else { _exit(10) }
        let hard = UInt64(limit.rlim_max)
        guard hard > 64 else { _exit(0) }   // nothing to raise to
        limit.rlim_cur = 64
        guard setrlimit(StageRuntime.resourceNoFile, &limit) == 0 else { _exit(11) }
        guard StageRuntime.raiseDescriptorLimit() == .raised(from: 64, to: hard) else { _exit(12) }
        guard getrlimit(StageRuntime.resourceNoFile, &limit) == 0 else { _exit(13) }
        guard UInt64(limit.rlim_cur) == hard, UInt64(limit.rlim_max) == hard else { _exit(14) }
        // At the hard limit already, it has nothing to do.
        guard StageRuntime.raiseDescriptorLimit() == .unchanged(limit: hard) else { _exit(15) }
        _exit(0)
    }
}

/// The child of heldLinesWaitForTheirFlushExceptErrorsAndExit: markers
/// go straight to fd 2, beside the held lines.
private func heldLinesChild() -> Never {
    let flushes = Mutex<[@Sendable () -> Void]>([])
    StageLogHandler.holdLinesOnThisThread { flush in flushes.withLock { $0.append(flush) } }
    func marker(_ text: String) { _ = Array("\(text)\n".utf8).withUnsafeBytes { write(2, $0.baseAddress, $0.count) } }
    let logger = Logger(label: "test")
    logger.info("one")
    logger.info("two")
    marker("marker 1")
    let scheduled = flushes.withLock { queued in defer { queued = [] }; return queued }
    if scheduled.count != 1 { marker("scheduled \(scheduled.count) flushes, not 1") }
    scheduled.forEach { $0() }
    marker("marker 2")
    logger.info("three")
    logger.error("urgent")
    marker("marker 3")
    logger.info("four")   // held until exit
    exit(ExitCode.tempFail.rawValue)
}

/// A configuration file in a fresh directory, removed at the end.
final class ConfigTemporaryFile {
    let directory: String
    let file: String
    init(_ text: String) {
        var template = Array("/tmp/sealpost-runtime-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil)
        directory = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        file = directory + "/sealpost.toml"
        let descriptor = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        close(descriptor)
    }
    deinit {
        unlink(file)
        rmdir(directory)
    }
}

enum SealpostConfigProbe {
    static func hostname(_ file: String) throws -> String {
        try SealpostConfiguration.load(path: file).hostname
    }
}

@Suite struct ListenerDefinitions {
    @Test func servedListenersInOrderWithKindDashPortNames() throws {
        let config = try SealpostConfiguration.parse(text: """
            [sealpost]
            data_directory = "/srv/sealpost"
            [smtp]
            listen = ["0.0.0.0:25", "[::]:25"]
            submission = ["192.0.2.1:587"]
            smtps = ["127.0.0.1:465"]
            [[tls.certificates]]
            cert = "/etc/ssl/mx.crt"
            key = "/etc/ssl/mx.key"
            """, file: "/etc/sealpost/sealpost.toml")
        let served = ListenerDefinition.served(by: config)
        #expect(served.map(\.socketName) == ["smtp-25", "smtp-25", "submission-587", "smtps-465"])
        #expect(served.map(\.host) == ["0.0.0.0", "::", "192.0.2.1", "127.0.0.1"])
        #expect(served.map(\.address) == ["0.0.0.0:25", "[::]:25", "192.0.2.1:587", "127.0.0.1:465"])
    }

    @Test func noSMTPSWithoutACertificate() throws {
        let config = try SealpostConfiguration.parse(text: """
            [sealpost]
            data_directory = "/srv/sealpost"
            [smtp]
            listen = ["127.0.0.1:2525"]
            submission = []
            smtps = ["127.0.0.1:2465"]
            [tls]
            certificates = []
            """, file: "/etc/sealpost/sealpost.toml")
        #expect(ListenerDefinition.served(by: config) == [ListenerDefinition(kind: "smtp", host: "127.0.0.1", port: 2525)])
    }
}
