// A local-deliver started by the supervisor, at a first start
// (SEALPOST_READY_FD) and to replace the running one (a reload,
// SEALPOST_RELOAD too): the real executable, in a child process, with real
// files. It reports ready only when its tables loaded and its recipient
// table is written; a malformed aliases file at a reload is one warning
// line and an exit, and no ready report (so the supervisor keeps the
// running instance).

import Testing
import SealpostConfig
@testable import LocalDelivery
#if canImport(Glibc)
import Glibc
#endif

/// Runs the local-deliver built next to this test binary with `environment`
/// and the write end of a pipe as descriptor 3. `whileRunning` gets the pid
/// and the read end of that pipe; returns the exit status and stderr.
private func runLocalDeliver(environment: [String],
                             whileRunning: (pid_t, Int32) throws -> Void = { _, _ in }) throws -> (exit: Int32, stderr: String) {
    let resolved = try #require(realpath("/proc/self/exe", nil))
    let testBinary = String(cString: resolved)
    free(resolved)
    let executable = String(testBinary[..<testBinary.lastIndex(of: "/")!]) + "/local-deliver"
    try #require(access(executable, X_OK) == 0, "\(executable) is not built")
    var output: [Int32] = [-1, -1], ready: [Int32] = [-1, -1]
    try #require(pipe(&output) == 0 && pipe(&ready) == 0)
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, output[1], 2)
    posix_spawn_file_actions_adddup2(&actions, ready[1], 3)
    posix_spawn_file_actions_addclose(&actions, output[0])
    posix_spawn_file_actions_addclose(&actions, ready[0])
    var cArguments = [strdup(executable), nil]
    var cEnvironment = (environment + ["PATH=/usr/bin:/bin"]).map { strdup($0) } + [nil]
    defer { (cArguments + cEnvironment).forEach { free($0) } }
    // As the supervisor starts stages: an empty signal mask and default
    // dispositions (the test's threads block signals).
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var none = sigset_t(), all = sigset_t()
    sigemptyset(&none)
    sigfillset(&all)
    posix_spawnattr_setsigmask(&attributes, &none)
    posix_spawnattr_setsigdefault(&attributes, &all)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
    var pid: pid_t = 0
    let spawned = posix_spawn(&pid, executable, &actions, &attributes, &cArguments, &cEnvironment)
    close(output[1])
    close(ready[1])
    defer { close(output[0]); close(ready[0]) }
    try #require(spawned == 0)
    do {
        try whileRunning(pid, ready[0])
    } catch {
        kill(pid, SIGKILL)
        throw error
    }
    var text: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = read(output[0], &buffer, buffer.count)
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { break }
        text += buffer[..<count]
    }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return ((status >> 8) & 0xff, String(decoding: text, as: UTF8.self))
}

/// One byte from the ready pipe, or nil at its end; bounded at 60 s so that
/// a broken stage fails the test instead of hanging it.
private func readyReport(_ fd: Int32) throws -> UInt8? {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    try #require(poll(&p, 1, 60_000) == 1, "neither a ready report nor the pipe's end within 60 s")
    var byte: UInt8 = 0
    return read(fd, &byte, 1) == 1 ? byte : nil
}

@Suite struct ReloadTests {
    let dir = TemporaryDirectory()

    /// A configuration whose data directory the stage may chroot into and
    /// whose user (as root) is `nobody`.
    func environment() throws -> [String] {
        mkdir(dir.file("data"), 0o755)
        try dir.write("sealpost.toml", """
            [sealpost]
            data_directory = "\(dir.file("data"))"
            [local]
            domains = ["localhost"]
            accounts = "listed"
            users = ["alice", "bob"]
            aliases = "aliases"
            """)
        var environment = ["SEALPOST_CONFIG=\(dir.file("sealpost.toml"))", "SEALPOST_LOCAL_CONCURRENCY=2",
                           "SEALPOST_RELOAD=SIGHUP", "SEALPOST_READY_FD=3"]
        if geteuid() == 0 { environment.append("SEALPOST_USER=nobody") }
        return environment
    }

    @Test func aMalformedAliasesFileIsOneWarningAndNoReadyReport() throws {
        let environment = try environment()
        try dir.write("aliases", "info: alice\nsales bob\n")
        var report: UInt8?? = .none
        let (exit, stderr) = try runLocalDeliver(environment: environment) { _, ready in
            report = .some(try readyReport(ready))
        }
        #expect(report == .some(nil), "no ready report: the running instance must stay")
        #expect(exit == 78)
        let lines = stderr.split(separator: "\n")
        #expect(lines.count == 1, "\(stderr)")
        #expect(lines.first.map { $0.wholeMatch(of: #/local-deliver\[\d+\]: warning: aliases not reloaded: (.+):2: expected "name: target, ...", found no ":" \(the running local-deliver keeps the tables it has\)/#) != nil } == true, "\(stderr)")
        #expect(stderr.contains(dir.file("aliases") + ":2: "))
        #expect(!stderr.contains("fatal"))
    }

    @Test func aGoodReloadReportsReadyLogsOneLineAndDrainsOnSIGTERM() throws {
        let environment = try environment()
        try dir.write("aliases", "info: alice\nsales: bob, alice\n")
        let (exit, stderr) = try runLocalDeliver(environment: environment) { pid, ready in
            try #require(try readyReport(ready) != nil, "no ready report")
            // No queue here: the workers wait for it. SIGTERM stops them.
            kill(pid, SIGTERM)
        }
        #expect(exit == 0, "\(stderr)")
        #expect(stderr.contains(#/local-deliver\[\d+\]: reloaded \(SIGHUP\): 2 workers, 2 local users, 2 aliases, domains localhost\n/#))
        #expect(stderr.contains(#/local-deliver\[\d+\]: stopping: finishing the deliveries in progress\n/#))
    }

    @Test func aFirstStartReportsReadyOnceTheRecipientTableIsWritten() throws {
        let environment = try environment().filter { !$0.hasPrefix("SEALPOST_RELOAD=") }
        try dir.write("aliases", "info: alice\n")
        // local/ is the stage's (the supervisor creates it so).
        try #require(mkdir(dir.file("data/local"), 0o755) == 0)
        if geteuid() == 0, let nobody = getpwnam("nobody") {
            try #require(chown(dir.file("data/local"), nobody.pointee.pw_uid, nobody.pointee.pw_gid) == 0)
        }
        var table = ""
        let (exit, stderr) = try runLocalDeliver(environment: environment) { pid, ready in
            try #require(try readyReport(ready) != nil, "no ready report")
            table = readText(dir.file("data/local/recipients"))
            kill(pid, SIGTERM)
        }
        #expect(exit == 0, "\(stderr)")
        #expect(table == "sealpost-local-recipients 1\nalice\nbob\ninfo\n", "the table precedes the report")
        #expect(stderr.contains(#/local-deliver\[\d+\]: starting: 2 workers, 2 local users, 1 aliases, domains localhost\n/#))
    }

    @Test func theReadyPipeMustBeAnInheritedPipeAndAReloadNeedsIt() throws {
        #expect(try ReadyPipe.from(nil) == nil)
        #expect(throws: LocalSetupError.self) { try ReadyPipe.from("1") }   // not a pipe
        #expect(throws: LocalSetupError.self) { try ReadyPipe.from("x") }
        #expect(try ReloadRequest.from(reload: nil, ready: nil) == nil)
        #expect(throws: LocalSetupError.self) { try ReloadRequest.from(reload: "SIGHUP", ready: nil) }
        var ends: [Int32] = [-1, -1]
        try #require(pipe(&ends) == 0)
        defer { close(ends[0]) }
        let ready = try #require(try ReadyPipe.from(String(ends[1])))
        // A first start: a ready pipe, no reload.
        #expect(try ReloadRequest.from(reload: nil, ready: ready) == nil)
        let request = try #require(try ReloadRequest.from(reload: "changed: /etc/aliases", ready: ready))
        #expect(request.reason == "changed: /etc/aliases")
        #expect(try ReloadRequest.from(reload: "", ready: ready)?.reason == "reload")
        try request.ready.report()
        var buffer = [UInt8](repeating: 0, count: 4)
        #expect(read(ends[0], &buffer, 4) == 1)
        #expect(read(ends[0], &buffer, 4) == 0, "the ready pipe is closed after the report")
    }
}
