// Starting and waiting for processes, with raw posix_spawn (see
// CSystemSpawn): Foundation's Process cannot place descriptors, leaks its own
// into the child and moves it to another process group.

#if canImport(Glibc)
import Glibc
#endif
import CSystemSpawn

enum Spawner {
    /// Starts `executable` with argv[0] = `argumentZero`. Descriptor 0 is
    /// `stdinFD`, 1 and 2 are `outputFD`, then the `passing` descriptors
    /// as 3, 4, ...; nothing else is inherited. When `pidVariable` is
    /// given (e.g. "LISTEN_PID"), the environment also holds NAME=<the
    /// child's own pid>, which the child writes itself between fork and
    /// exec (socket activation needs it; posix_spawn cannot do it).
    static func spawn(executable: String, argumentZero: String, arguments: [String],
                      environment: [String], stdinFD: Int32, outputFD: Int32,
                      newProcessGroup: Bool, passing: [Int32] = [], pidVariable: String? = nil) throws -> pid_t {
        var argv = ([argumentZero] + arguments).map { strdup($0) }
        argv.append(nil)
        var envp = environment.map { strdup($0) }
        // The slot the child fills: "NAME=" and room for the digits of any
        // pid_t and the NUL (the placeholder is overwritten, never seen).
        let digitsRoom = 12
        var slot: UnsafeMutablePointer<CChar>? = nil
        if let pidVariable {
            let entry = strdup(pidVariable + "=" + String(repeating: "0", count: digitsRoom - 1))
            slot = entry.map { $0 + pidVariable.utf8.count + 1 }
            envp.append(entry)
        }
        envp.append(nil)
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let error: Int32
        if passing.isEmpty && pidVariable == nil {
            error = sealpost_spawn(&pid, executable, argv, envp, stdinFD, outputFD, newProcessGroup ? 1 : 0)
        } else {
            error = sealpost_spawn_passing(&pid, executable, argv, envp, stdinFD, outputFD, newProcessGroup ? 1 : 0,
                                           passing, Int32(passing.count), slot, slot == nil ? 0 : digitsRoom)
        }
        if error != 0 { throw SystemError(passing.isEmpty && pidVariable == nil ? "posix_spawn" : "fork/exec",
                                          path: executable, code: error) }
        return pid
    }

    /// Runs a helper program to completion (groupadd, useradd) with our own
    /// stderr as its output; returns a description of how it ended, nil when
    /// it exited 0.
    static func run(_ executable: String, _ arguments: [String]) throws -> String? {
        let devNull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        guard devNull >= 0 else { throw SystemError("open", path: "/dev/null") }
        defer { close(devNull) }
        let pid = try spawn(executable: executable, argumentZero: executable, arguments: arguments,
                            environment: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                            stdinFD: devNull, outputFD: 2, newProcessGroup: false)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { throw SystemError("waitpid") }
        }
        if sealpost_spawn_wifexited(status) != 0 && sealpost_spawn_wexitstatus(status) == 0 { return nil }
        return describe(status: status)
    }

    /// "exited with status 1", "killed by signal 9" (and "(core dumped)").
    static func describe(status: Int32) -> String {
        if sealpost_spawn_wifexited(status) != 0 {
            return "exited with status \(sealpost_spawn_wexitstatus(status))"
        }
        if sealpost_spawn_wifsignaled(status) != 0 {
            let core = sealpost_spawn_wcoredump(status) != 0 ? " (core dumped)" : ""
            return "killed by signal \(sealpost_spawn_wtermsig(status))\(core)"
        }
        return "ended with wait status \(status)"
    }
}

/// The environment a stage gets: nothing of ours but a few variables that
/// are about the machine (PATH, locale, time zone) and the SEALPOST_*
/// settings (test knobs), plus the three the stage protocol defines.
func stageEnvironment(stage: StageDefinition, configFile: String, asRoot: Bool) -> [String] {
    let kept: Set<String> = ["PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR",
                             "HOME", "USER", "LOGNAME"]
    let rootDropped: Set<String> = ["HOME", "USER", "LOGNAME"]
    let overridden: Set<String> = ["SEALPOST_CONFIG", "SEALPOST_STAGE", "SEALPOST_USER", "SEALPOST_CERTIFICATE_FD",
                                   "SEALPOST_SUPERVISOR_PID", "SEALPOST_RELOAD", "SEALPOST_READY_FD"]
    var result: [String] = []
    var havePath = false
    if var pointer = sealpost_spawn_environ() {
        while let entry = pointer.pointee {
            let text = String(cString: entry)
            let name = String(text.prefix(while: { $0 != "=" }))
            if overridden.contains(name) || (asRoot && rootDropped.contains(name)) {
                // set below, or meaningless for a stage that runs as another user
            } else if kept.contains(name) || name.hasPrefix("SEALPOST_") || name.hasPrefix("SWIFT_BACKTRACE") {
                result.append(text)
                if name == "PATH" { havePath = true }
            }
            pointer += 1
        }
    }
    if !havePath { result.append("PATH=/usr/local/bin:/usr/bin:/bin") }
    result.append("SEALPOST_CONFIG=\(configFile)")
    result.append("SEALPOST_STAGE=\(stage.name)")
    // The stage ends with the supervisor (StageRuntime.endWithSupervisor).
    result.append("SEALPOST_SUPERVISOR_PID=\(getpid())")
    if asRoot { result.append("SEALPOST_USER=\(stage.userName)") }
    return result
}

/// Monotonic seconds, for timers and uptimes.
func monotonicNow() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}
