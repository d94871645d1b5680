#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Runs this test binary again with only the test `filter` selected, in a
/// child process with exactly `environment`; returns its exit status and
/// what it wrote to stderr. Tests that exit, bootstrap swift-log or change
/// their credentials run there, not in the shared test process.
func runTestInChild(_ filter: String, environment: [String]) throws -> (exit: Int32, signal: Int32, stderr: String) {
    let executable = try #require(ConfigPathProbe.realPath("/proc/self/exe"))
    let arguments = [executable, "--testing-library", "swift-testing", "--filter", filter]
    var ends: [Int32] = [-1, -1]
    #expect(pipe(&ends) == 0)
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, ends[1], 2)
    posix_spawn_file_actions_addclose(&actions, ends[0])
    var cArguments = arguments.map { strdup($0) } + [nil]
    var cEnvironment = (environment + ["PATH=/usr/bin:/bin"]).map { strdup($0) } + [nil]
    defer { (cArguments + cEnvironment).forEach { free($0) } }
    var pid: pid_t = 0
    let spawned = posix_spawn(&pid, executable, &actions, nil, &cArguments, &cEnvironment)
    close(ends[1])
    defer { close(ends[0]) }
    #expect(spawned == 0)
    var output: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = read(ends[0], &buffer, buffer.count)
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { break }
        output += buffer[..<count]
    }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    // WIFEXITED/WEXITSTATUS/WTERMSIG spelled out: the macros do not import.
    return ((status >> 8) & 0xff, status & 0x7f, String(decoding: output, as: UTF8.self))
}
