// Test support, a library target of its own shared by TLSTests and
// CryptoNegotiationTests: a PKI made with the openssl command at test time, child
// processes (openssl s_client / s_server) with pipes, loopback TCP, and an
// EventLoop running on its own thread.

import Foundation
import Glibc
import CSystemShims
import TLS

public struct TestFailure: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A child process with stdin and (stdout+stderr) pipes, started with
/// posix_spawn (fds 0-2 placed, everything else closed).
public final class Child: @unchecked Sendable {
    public let pid: pid_t
    public private(set) var stdinFD: Int32
    public let outFD: Int32
    public private(set) var output = ""

    public init(_ args: [String], environment: [String: String] = [:]) throws {
        var inPipe: [Int32] = [-1, -1]
        var outPipe: [Int32] = [-1, -1]
        guard sealpost_pipe_cloexec(&inPipe) == 0, sealpost_pipe_cloexec(&outPipe) == 0 else { throw TestFailure("pipe") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 2)
        sealpost_spawn_addclosefrom(&actions, 3)
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        let argv = args.map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        // The test runner's threads may block signals, and the mask is
        // inherited: start the child with an empty mask and default actions.
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        var empty = sigset_t()
        sigemptyset(&empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var p: pid_t = 0
        let rc = posix_spawnp(&p, args[0], &actions, &attr, argv, envp)
        posix_spawn_file_actions_destroy(&actions)
        posix_spawnattr_destroy(&attr)
        for a in argv { free(a) }
        for e in envp { free(e) }
        close(inPipe[0])
        close(outPipe[1])
        guard rc == 0 else { throw TestFailure("spawn \(args[0]): \(rc)") }
        pid = p
        stdinFD = inPipe[1]
        outFD = outPipe[0]
    }

    deinit {
        closeStdin()
        close(outFD)
    }

    public func write(_ s: String) {
        var bytes = Array(s.utf8)
        _ = Glibc.write(stdinFD, &bytes, bytes.count)
    }

    public func closeStdin() {
        if stdinFD >= 0 { close(stdinFD); stdinFD = -1 }
    }

    /// Reads until `needle` appears in the output (true) or EOF (false).
    @discardableResult
    public func waitFor(_ needle: String) -> Bool {
        while !output.contains(needle) {
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = read(outFD, &buf, buf.count)
            if n <= 0 { return output.contains(needle) }
            output += String(decoding: buf[0..<n], as: UTF8.self)
        }
        return true
    }

    /// Reads to EOF and waits for the exit; returns the exit status.
    @discardableResult
    public func finish() -> Int32 {
        closeStdin()
        _ = waitFor("\u{0}never\u{0}")
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return sealpost_wifexited(status) != 0 ? sealpost_wexitstatus(status) : 128 + sealpost_wtermsig(status)
    }

    /// SIGKILL: no close_notify, no clean-up.
    public func kill() { _ = Glibc.kill(pid, SIGKILL) }
}

/// `openssl s_server` on 127.0.0.1, an ephemeral port, for `accepts`
/// connections; `options` as on its command line (certificate, versions,
/// ciphers). Stopped (SIGKILL) by `stop()`.
public final class OpenSSLServer {
    public let child: Child
    public let port: UInt16

    public init(_ options: [String], accepts: Int = 1) throws {
        child = try Child(["openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", String(accepts)] + options)
        guard child.waitFor("ACCEPT 127.0.0.1:"), child.waitFor("\n"),
              let line = child.output.split(separator: "\n").first(where: { $0.hasPrefix("ACCEPT 127.0.0.1:") }),
              let port = UInt16(line.split(separator: ":").last!) else {
            child.kill()
            child.finish()
            throw TestFailure("s_server did not start: \(child.output)")
        }
        self.port = port
    }

    public func stop() {
        child.kill()
        child.finish()
    }
}

/// Runs a shell command, returns its output (trimmed); throws on failure.
@discardableResult
public func shell(_ command: String, in dir: String) throws -> String {
    let c = try Child(["/bin/sh", "-c", "cd '\(dir)' && \(command)"])
    c.closeStdin()
    let status = c.finish()
    guard status == 0 else { throw TestFailure("`\(command)` exited \(status): \(c.output)") }
    return c.output.trimmingCharacters(in: .whitespacesAndNewlines)
}

/// Certificates and keys made at test time:
/// - ca: test CA (P-256); leafEC / leafRSA: mx.example.test + example.test, signed by ca;
/// - other: other.example.test (P-256), signed by ca;
/// - leafIP: mx.example.test and the addresses 192.0.2.1 and 2001:db8::1 (P-256), signed by ca;
/// - selfSigned: CN wrong.name (P-256), self-signed (for DANE-EE);
/// - rogueCA / rogueLeaf: an untrusted CA and its leaf for mx.example.test.
public final class TestPKI: Sendable {
    public let dir: String

    public static let shared: Result<TestPKI, Error> = Result { try TestPKI() }
    public static func get() throws -> TestPKI { try shared.get() }

    public init() throws {
        var template = Array("/tmp/sealpost-tls-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw TestFailure("mkdtemp") }
        let dir = String(cString: p)
        self.dir = dir
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256"
        func ca(_ name: String, _ cn: String) throws {
            try shell("openssl req -x509 \(ec) -nodes -keyout \(name).key -out \(name).pem -days 30 -subj '/CN=\(cn)' "
                      + "-addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign 2>&1", in: dir)
        }
        func leaf(_ name: String, _ cn: String, _ sans: [String], key: String, ca: String) throws {
            let ext = "subjectAltName=" + sans.map { $0.hasPrefix("IP:") ? $0 : "DNS:\($0)" }.joined(separator: ",")
            try ext.write(toFile: "\(dir)/\(name).ext", atomically: true, encoding: .utf8)
            try shell("openssl req \(key) -nodes -keyout \(name).key -out \(name).csr -subj '/CN=\(cn)' 2>&1 && "
                      + "openssl x509 -req -in \(name).csr -CA \(ca).pem -CAkey \(ca).key -CAcreateserial "
                      + "-out \(name).pem -days 30 -extfile \(name).ext 2>&1", in: dir)
        }
        try ca("ca", "Sealpost Test CA")
        try ca("rogue", "Rogue CA")
        try leaf("leaf-ec", "mx.example.test", ["mx.example.test", "example.test"], key: ec, ca: "ca")
        try leaf("leaf-rsa", "mx.example.test", ["mx.example.test", "example.test"], key: "-newkey rsa:2048", ca: "ca")
        try leaf("other", "other.example.test", ["other.example.test"], key: ec, ca: "ca")
        try leaf("leaf-ip", "mx.example.test", ["mx.example.test", "IP:192.0.2.1", "IP:2001:db8::1"], key: ec, ca: "ca")
        try leaf("rogue-leaf", "mx.example.test", ["mx.example.test"], key: ec, ca: "rogue")
        try shell("openssl req -x509 \(ec) -nodes -keyout self.key -out self.pem -days 30 -subj '/CN=wrong.name' 2>&1", in: dir)
        // Signed by the CA, its name only in the CN (no subjectAltName).
        try shell("openssl req \(ec) -nodes -keyout cn-only.key -out cn-only.csr -subj '/CN=cnonly.example.test' 2>&1 && "
                  + "openssl x509 -req -in cn-only.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cn-only.pem -days 30 2>&1",
                  in: dir)
    }

    public func path(_ name: String) -> String { "\(dir)/\(name)" }

    /// SHA-256 of a certificate's SubjectPublicKeyInfo, by the openssl command.
    public func spkiSHA256(_ cert: String) throws -> String {
        let out = try shell("openssl x509 -in \(cert) -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -r", in: dir)
        return String(out.prefix(64))
    }
}

/// A listening TCP socket on 127.0.0.1 with an ephemeral port.
public final class Listener {
    public let fd: Int32
    public let port: UInt16

    public init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        self.fd = fd
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bind(fd, sa, len) == 0 && listen(fd, 16) == 0 && getsockname(fd, sa, &len) == 0
            }
        }
        guard ok else { throw TestFailure("listen: \(String(cString: strerror(errno)))") }
        port = UInt16(bigEndian: addr.sin_port)
    }

    deinit { close(fd) }

    public func accept() -> Int32 { sealpost_accept_cloexec(fd) }
}

/// A TCP connection to 127.0.0.1:port.
public func connectTCP(_ port: UInt16) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = port.bigEndian
    let rc = withUnsafePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard rc == 0 else { close(fd); throw TestFailure("connect: \(String(cString: strerror(errno)))") }
    return fd
}

/// One value handed from the loop thread to the test.
public final class Box<T>: @unchecked Sendable {
    private let lock = NSLock()
    private let semaphore = DispatchSemaphore(value: 0)
    private var value: T?

    public init() {}

    public func put(_ v: T) {
        lock.lock()
        value = v
        lock.unlock()
        semaphore.signal()
    }

    /// Waits for the value (a generous limit only guards against a hang).
    public func take() throws -> T {
        guard semaphore.wait(timeout: .now() + 120) == .success else { throw TestFailure("no result after 120 s") }
        lock.lock()
        defer { lock.unlock() }
        return value!
    }
}

/// An EventLoop with a RelayEngine on its own thread.
public final class EngineThread: @unchecked Sendable {
    public let loop: EventLoop
    public let engine: RelayEngine
    private let done = DispatchSemaphore(value: 0)

    public init() throws {
        loop = try EventLoop()
        engine = RelayEngine(loop: loop)
        let loop = self.loop
        let done = self.done
        Thread.detachNewThread {
            loop.run()
            done.signal()
        }
    }

    public func stop() {
        loop.stop()
        done.wait()
    }

    public struct Session: Sendable {
        public let handshake = Box<Result<HandshakeResult, TLSError>>()
        public let closed = Box<RelaySummary>()
    }

    public func server(_ contexts: TLSServerContexts, socket: Int32, timeouts: RelayTimeouts = RelayTimeouts()) -> Session {
        let s = Session()
        let engine = self.engine
        loop.execute {
            engine.startServer(contexts: contexts, socket: socket, timeouts: timeouts,
                               onHandshake: { s.handshake.put($0) }, onClose: { s.closed.put($0) })
        }
        return s
    }

    public func client(_ context: TLSClientContext, socket: Int32, serverName: String?, policy: VerificationPolicy,
                       ciphers: TLSClientCiphers = .strict, timeouts: RelayTimeouts = RelayTimeouts()) -> Session {
        let s = Session()
        let engine = self.engine
        loop.execute {
            engine.startClient(context: context, socket: socket, serverName: serverName, policy: policy,
                               ciphers: ciphers, timeouts: timeouts,
                               onHandshake: { s.handshake.put($0) }, onClose: { s.closed.put($0) })
        }
        return s
    }
}

extension Result {
    public var failure: Failure? { if case .failure(let e) = self { return e }; return nil }
}

/// Blocking helpers on the caller's plaintext socket.
public func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
    var off = 0
    while off < bytes.count {
        let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL)) }
        if n < 0 { if errno == EINTR { continue }; throw TestFailure("send: \(String(cString: strerror(errno)))") }
        off += n
    }
}

public func readToEOF(_ fd: Int32) throws -> [UInt8] {
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buf, buf.count)
        if n < 0 { if errno == EINTR { continue }; throw TestFailure("read: \(String(cString: strerror(errno)))") }
        if n == 0 { return out }
        out += buf[0..<n]
    }
}
