import Glibc
import Testing
import CSystemSpawn
@testable import Supervision

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
