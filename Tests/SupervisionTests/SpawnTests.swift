import Glibc
import Testing
import CSystemSpawn
@testable import Supervision
import StageRuntime

/// The one place where the supervisor forks: what the child really gets.
@Suite struct SpawnTests {
    /// Runs a shell command as a stage would be run and returns its output
    /// and wait status.
    func run(_ script: String, environment: [String] = ["PATH=/usr/bin:/bin"]) throws -> (String, Int32) {
        var fds: [Int32] = [-1, -1]
        #expect(sealpost_spawn_pipe(&fds, 0) == 0)
        // A descriptor the child must not inherit, although not close-on-exec.
        let leak = open("/dev/null", O_RDONLY)
        defer { close(leak) }
        let devNull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(devNull) }
        // A blocked signal in the parent must not stay blocked in the child.
        var blocked = sigset_t()
        sigemptyset(&blocked)
        sigaddset(&blocked, SIGUSR1)
        var previous = sigset_t()
        pthread_sigmask(SIG_BLOCK, &blocked, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        let pid = try Spawner.spawn(executable: "/bin/sh", argumentZero: "stage-test", arguments: ["-c", script],
                                    environment: environment, stdinFD: devNull, outputFD: fds[1],
                                    newProcessGroup: true)
        return collect(pid: pid, pipe: fds)
    }

    /// Reads the child's output to EOF and waits for it.
    func collect(pid: pid_t, pipe fds: [Int32]) -> (String, Int32) {
        close(fds[1])
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n <= 0 { break }
            output += buffer[0..<n]
        }
        close(fds[0])
        var status: Int32 = 0
        _ = waitpid(pid, &status, 0)
        return (String(decoding: output, as: UTF8.self), status)
    }

    @Test func childGetsOnlyStdinStdoutStderr() throws {
        // The shell's own descriptors (dash keeps the script on 10 and up)
        // are excluded by listing from a child process of the shell: exec
        // replaces the shell, so what ls sees is what the stage got (plus
        // ls's own directory handle, the highest one).
        let (output, status) = try run("exec ls /proc/self/fd")
        #expect(sealpost_spawn_wifexited(status) != 0 && sealpost_spawn_wexitstatus(status) == 0)
        let fds = output.split(separator: "\n").compactMap { Int($0) }.sorted()
        #expect(fds.count == 4, "descriptors: \(fds)")
        #expect(Array(fds.prefix(3)) == [0, 1, 2])
    }

    @Test func stderrGoesToThePipeAndStdinIsDevNull() throws {
        let (output, _) = try run("echo out; echo err >&2; readlink /proc/self/fd/0")
        #expect(output == "out\nerr\n/dev/null\n")
    }

    @Test func signalMaskIsEmptyAndTheChildLeadsItsProcessGroup() throws {
        let (output, _) = try run("exec cat /proc/self/status /proc/self/stat")
        let blocked = output.split(separator: "\n").first { $0.hasPrefix("SigBlk:") }
        #expect(blocked == "SigBlk:\t0000000000000000")
        // /proc/self/stat: pid (comm) state ppid pgrp ...
        let stat = output.split(separator: "\n").last.map { $0.split(separator: " ") } ?? []
        #expect(stat.count > 4 && stat[0] == stat[4])
    }

    @Test func environmentIsExactlyWhatWasGiven() throws {
        let (output, _) = try run("exec env", environment: ["PATH=/usr/bin:/bin", "SEALPOST_STAGE=test"])
        // (The shell adds PWD of its own.)
        let variables = output.split(separator: "\n").filter { !$0.hasPrefix("PWD=") }.sorted()
        #expect(variables == ["PATH=/usr/bin:/bin", "SEALPOST_STAGE=test"])
    }

    @Test func aMissingExecutableIsAnError() {
        #expect(throws: (any Error).self) {
            _ = try Spawner.spawn(executable: "/nonexistent/stage", argumentZero: "x", arguments: [],
                                  environment: [], stdinFD: 0, outputFD: 2, newProcessGroup: false)
        }
    }

    /// Socket activation: the child finds LISTEN_PID = its own pid (written
    /// between fork and exec) and the passed sockets at 3 and 4, although
    /// they were other descriptors (and close-on-exec) in the parent.
    @Test func passedDescriptorsAndTheChildsOwnPid() throws {
        // Sockets to pass, opened after some filler so that one of them is
        // likely to sit on a target number (3 or 4) the other must move to.
        var pair: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        defer { close(pair[0]); close(pair[1]) }
        let listener = try ListeningSockets.bind(ListenerDefinition(kind: "smtp", host: "127.0.0.1", port: 0))
        defer { close(listener) }
        func inode(_ fd: Int32) -> UInt64 {
            var info = stat()
            return fstat(fd, &info) == 0 ? UInt64(info.st_ino) : 0
        }
        var fds: [Int32] = [-1, -1]
        #expect(sealpost_spawn_pipe(&fds, 0) == 0)
        let devNull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(devNull) }
        let script = "echo pid=$$ listen=$LISTEN_PID fds=$LISTEN_FDS; readlink /proc/self/fd/3 /proc/self/fd/4; exec ls /proc/self/fd"
        let pid = try Spawner.spawn(executable: "/bin/sh", argumentZero: "listen-test", arguments: ["-c", script],
                                    environment: ["PATH=/usr/bin:/bin", "LISTEN_FDS=2"], stdinFD: devNull,
                                    outputFD: fds[1], newProcessGroup: true, passing: [listener, pair[1]],
                                    pidVariable: "LISTEN_PID")
        let (text, status) = collect(pid: pid, pipe: fds)
        #expect(sealpost_spawn_wifexited(status) != 0 && sealpost_spawn_wexitstatus(status) == 0)
        let lines = text.split(separator: "\n").map(String.init)
        try #require(lines.count >= 3, "\(lines)")
        #expect(lines[0] == "pid=\(pid) listen=\(pid) fds=2")
        #expect(lines[1] == "socket:[\(inode(listener))]")
        #expect(lines[2] == "socket:[\(inode(pair[1]))]")
        // 0, 1, 2, the two sockets, and ls's own directory handle.
        let open = lines.dropFirst(3).compactMap { Int($0) }.sorted()
        #expect(open.count == 6 && Array(open.prefix(5)) == [0, 1, 2, 3, 4], "descriptors: \(open)")
    }

    @Test func aMissingExecutableIsAnErrorOnTheForkPathToo() {
        #expect(throws: (any Error).self) {
            _ = try Spawner.spawn(executable: "/nonexistent/stage", argumentZero: "x", arguments: [],
                                  environment: [], stdinFD: 0, outputFD: 2, newProcessGroup: false,
                                  passing: [0], pidVariable: "LISTEN_PID")
        }
    }

    @Test func waitStatusesAreDescribed() {
        #expect(Spawner.describe(status: 1 << 8) == "exited with status 1")
        #expect(Spawner.describe(status: 9) == "killed by signal 9")
    }

    @Test func stageEnvironmentKeepsOnlyWhatAStageNeeds() {
        let stage = StageDefinition(name: "queue", executable: "/b/queue", arguments: [], line: 1)
        let environment = stageEnvironment(stage: stage, configFile: "/etc/s.toml", asRoot: true)
        #expect(environment.contains("SEALPOST_CONFIG=/etc/s.toml"))
        #expect(environment.contains("SEALPOST_STAGE=queue"))
        #expect(environment.contains("SEALPOST_USER=sealpost-queue"))
        #expect(!environment.contains { $0.hasPrefix("HOME=") })
        #expect(environment.contains { $0.hasPrefix("PATH=") })
    }
}
