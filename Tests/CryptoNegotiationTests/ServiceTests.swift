// The service over its Unix socket: in-process (a loop thread), then the
// real crypto-negotiate executable, with sockets handed over by the `tls`
// protocol from the test.

import TLSTestSupport
import Foundation
import Glibc
import StageProtocol
import Testing
@testable import CryptoNegotiation
@testable import TLS

/// Both roles through one service: a TCP connection whose two ends are
/// handed over, one as server, one as client; returns the two plaintext
/// sockets after checking the reports.
/// `subject` nil: any (`seen` gets the one presented).
/// `serverReportsClose` false: session 1 asks for no CLOSED frame.
/// `first`: the server session's number, the client's is the next one
/// (numbers must differ from those of sessions still running).
func negotiatePair(_ connection: StageConnection, pkix: Bool = true, subject: String? = "CN=mx.example.test",
                   serverReportsClose: Bool = true, first: UInt64 = 1,
                   seen: ((String) -> Void)? = nil) throws -> (server: Int32, client: Int32) {
    let listener = try Listener()
    let clientFD = try connectTCP(listener.port)
    let serverFD = listener.accept()
    var server = Frame(.negotiate, ["session": .uint(first), "socket": .fd(serverFD), "role": .text("server"),
                                    "peer": .text("[127.0.0.1]:test")])
    if !serverReportsClose { server.set("report-close", .bool(false)) }
    try connection.send(server)
    try connection.send(Frame(.negotiate, ["session": .uint(first + 1), "socket": .fd(clientFD), "role": .text("client"),
                                           "server-name": .text("mx.example.test"),
                                           "policy": .text(pkix ? "pkix" : "none")]))
    // Ours are duplicates now: the service holds its own.
    close(serverFD)
    close(clientFD)
    var plain: [UInt64: Int32] = [:]
    while plain.count < 2 {
        let f = try #require(try connection.receive())
        #expect(f.type == .negotiated, "\(f)")
        guard f.type == .negotiated else { throw TestFailure("\(f)") }
        plain[try f.uint("session")] = try f.fd("plaintext")
        #expect(try f.text("protocol") == "TLSv1.3")
        #expect(try f.text("server-name") == "mx.example.test")
        if try f.uint("session") == first + 1 {
            #expect(try f.text("authentication") == (pkix ? "pkix" : "encrypted"))
            if let subject { #expect(try f.text("peer-subject") == subject) }
            seen?(try f.text("peer-subject"))
            #expect(try f.text("peer-spki").count == 64)
        }
    }
    return (plain[first]!, plain[first + 1]!)
}

/// Exchanges a line each way and closes both; expects a CLOSED frame for
/// each session in `sessions`.
func exchangeAndClose(_ connection: StageConnection, _ p: (server: Int32, client: Int32),
                      sessions: Set<UInt64> = [1, 2]) throws {
    try writeAll(p.client, Array("EHLO client.example\r\n".utf8))
    shutdown(p.client, Int32(SHUT_WR))
    #expect(try readToEOF(p.server) == Array("EHLO client.example\r\n".utf8))
    try writeAll(p.server, Array("250 mx.example.test\r\n".utf8))
    close(p.server)
    #expect(try readToEOF(p.client) == Array("250 mx.example.test\r\n".utf8))
    close(p.client)
    var closed: Set<UInt64> = []
    while closed.count < sessions.count {
        let f = try #require(try connection.receive())
        #expect(f.type == .closed, "\(f)")
        guard f.type == .closed else { throw TestFailure("\(f)") }
        #expect(sessions.contains(try f.uint("session")), "\(f)")
        closed.insert(try f.uint("session"))
        #expect(try f.bool("close-notify", default: false))
        #expect(try f.text("reason") == "closed")
    }
}

/// Hands over a loopback TCP socket for the client role with a CA bundle
/// the service does not know; returns the next frame received and the
/// other end of that socket (the caller closes it).
func requestWithUnknownCABundle(_ connection: StageConnection, session: UInt64) throws -> (Frame, Int32) {
    let listener = try Listener()
    let fd = try connectTCP(listener.port)
    let accepted = listener.accept()
    try connection.send(Frame(.negotiate, ["session": .uint(session), "socket": .fd(fd), "role": .text("client"),
                                           "ca": .text("nonexistent")]))
    close(fd)
    guard let frame = try connection.receive() else {
        close(accepted)
        throw TestFailure("the service closed the connection")
    }
    return (frame, accepted)
}

func tlsConfigText(_ pki: TestPKI) -> String {
    """
    [tls]
    ca_file = "\(pki.path("ca.pem"))"
    handshake_timeout = 30
    [[tls.certificates]]
    cert = "\(pki.path("leaf-ec.pem"))"
    key = "\(pki.path("leaf-ec.key"))"
    [[tls.certificates]]
    cert = "\(pki.path("other.pem"))"
    key = "\(pki.path("other.key"))"
    names = ["other.example.test"]
    """
}

/// A service on a loop thread of its own, serving one certificate pair
/// copied to r-TAG.pem / r-TAG.key (which a test may replace), and a
/// control connection after the HELLOs. `prepare` runs before the loop.
final class ReloadableService {
    let pki: TestPKI
    let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let service: NegotiationService
    let connection: StageConnection
    private let path: String
    private let done = DispatchSemaphore(value: 0)

    init(prepare: (NegotiationService) throws -> Void = { _ in }) throws {
        pki = try TestPKI.get()
        try shell("cp leaf-ec.pem r-\(tag).pem && cp leaf-ec.key r-\(tag).key", in: pki.dir)
        let config = try tlsConfiguration("""
            [tls]
            ca_file = "ca.pem"
            [[tls.certificates]]
            cert = "r-\(tag).pem"
            key = "r-\(tag).key"
            """, file: pki.path("sealpost.toml"))
        service = try NegotiationService(configuration: config)
        path = pki.path("tls-\(tag).sock")
        try service.listen(path: path)
        try prepare(service)
        let (service, done) = (self.service, self.done)
        Thread.detachNewThread { service.run(); done.signal() }
        do {
            connection = try StageConnection.connect(path: path)
            try connection.clientHello(.tls)
        } catch {
            service.stop()
            done.wait()
            throw error
        }
    }

    deinit {
        service.stop()
        done.wait()
        unlink(path)
    }
}

@Suite struct InProcessServiceTests {
    @Test func bothRolesThroughTheSocket() throws {
        let pki = try TestPKI.get()
        let config = try tlsConfiguration(tlsConfigText(pki), file: pki.path("sealpost.toml"))
        let service = try NegotiationService(configuration: config)
        let path = pki.path("tls-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock")
        try service.listen(path: path)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread { service.run(); done.signal() }
        defer { service.stop(); done.wait(); unlink(path) }

        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_mode & 0o777 == 0o660)
        let c = try StageConnection.connect(path: path)
        let hello = try c.clientHello(.tls, extra: [("software", .text("sealpost-test"))])
        #expect(try hello.text("protocol") == "tls")
        try exchangeAndClose(c, try negotiatePair(c))

        // Unknown CA bundle: FAILED 4.3.5, the socket is closed by the service.
        let (f, accepted) = try requestWithUnknownCABundle(c, session: 3)
        defer { close(accepted) }
        #expect(f.type == .failed)
        #expect(try f.text("status") == "4.3.5")
        #expect(try f.text("text").contains("no CA bundle named \"nonexistent\""))
        var b: UInt8 = 0
        #expect(read(accepted, &b, 1) == 0)
    }

    /// As root, only the uids of smtp-listen, remote-deliver and root may
    /// connect (the socket's group is every stage's): anyone else is closed
    /// at once, before any frame, and the service goes on.
    @Test func onlyAllowedUIDsMayConnect() throws {
        let pki = try TestPKI.get()
        let config = try tlsConfiguration(tlsConfigText(pki), file: pki.path("sealpost.toml"))
        for (allowed, admitted) in [([getuid() &+ 1], false), ([0, getuid()], true)] as [(Set<UInt32>, Bool)] {
            let service = try NegotiationService(configuration: config)
            let path = pki.path("tls-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock")
            try service.listen(path: path)
            service.allowedPeerUIDs = allowed
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread { service.run(); done.signal() }
            defer { service.stop(); done.wait(); unlink(path) }
            for _ in 0..<2 {   // the listener goes on after a refusal
                let c = try StageConnection.connect(path: path, timeout: 15)
                defer { c.close() }
                if admitted {
                    #expect(try c.clientHello(.tls).text("protocol") == "tls")
                } else {
                    #expect(throws: (any Error).self) { try c.clientHello(.tls) }
                }
            }
        }
    }

    @Test func reloadServesNewCertificatesAndKeepsSessions() throws {
        let running = try ReloadableService()
        defer { withExtendedLifetime(running) {} }   // the service runs until the test ends
        let (pki, tag, service, c) = (running.pki, running.tag, running.service, running.connection)
        let old = try negotiatePair(c)
        // New files, reload: the session made before goes on...
        try shell("cp other.pem r-\(tag).pem && cp other.key r-\(tag).key", in: pki.dir)
        let reloaded = Box<Bool>()
        service.reload { reloaded.put($0) }
        #expect(try reloaded.take())
        try exchangeAndClose(c, old)
        // ... and new handshakes get the new certificate.
        try exchangeAndClose(c, try negotiatePair(c, pkix: false, subject: "CN=other.example.test"))
    }

    /// smtp-listen asks for no CLOSED (report-close=false): none comes,
    /// while the other session still gets its own.
    @Test func noClosedFrameWhenNotAsked() throws {
        let running = try ReloadableService()
        defer { withExtendedLifetime(running) {} }
        let c = running.connection
        try exchangeAndClose(c, try negotiatePair(c, serverReportsClose: false), sessions: [2])
        // A later answer comes next, with no CLOSED for session 1 before it.
        let (f, accepted) = try requestWithUnknownCABundle(c, session: 3)
        defer { close(accepted) }
        #expect(f.type == .failed, "\(f)")
        #expect(try f.uint("session") == 3)
    }

    /// remote-deliver's request for an older MX (TLS 1.2 with one suite,
    /// RSA key exchange): FAILED without `opportunistic` (level "encrypt"
    /// asks so), NEGOTIATED with that suite with it (level "may").
    @Test func opportunisticRequestReachesAnOlderServer() throws {
        let running = try ReloadableService()
        defer { withExtendedLifetime(running) {} }
        let pki = running.pki
        let server = try OpenSSLServer(["-cert", pki.path("leaf-rsa.pem"), "-key", pki.path("leaf-rsa.key"),
                                        "-tls1_2", "-cipher", "AES128-GCM-SHA256"], accepts: 2)
        defer { server.stop() }
        func negotiate(session: UInt64, opportunistic: Bool?) throws -> Frame {
            let fd = try connectTCP(server.port)
            var request = Frame(.negotiate, ["session": .uint(session), "socket": .fd(fd), "role": .text("client"),
                                             "server-name": .text("mx.example.test")])
            if let opportunistic { request.set("opportunistic", .bool(opportunistic)) }
            try running.connection.send(request)
            close(fd)
            return try #require(try running.connection.receive())
        }
        let strict = try negotiate(session: 1, opportunistic: nil)
        #expect(strict.type == .failed, "\(strict)")
        #expect(try strict.text("status") == "4.7.5")
        let wide = try negotiate(session: 2, opportunistic: true)
        #expect(wide.type == .negotiated, "\(wide)")
        guard wide.type == .negotiated else { return }
        #expect(try wide.text("protocol") == "TLSv1.2")
        #expect(try wide.text("cipher") == "AES128-GCM-SHA256")
        #expect(try wide.text("authentication") == "encrypted")
        close(try wide.fd("plaintext"))
    }

    @Test func protocolViolationGetsAnError() throws {
        // A NEGOTIATE with an fd attribute but no descriptor: refused.
        try withRawClient { fd in
            var hello: [UInt8] = []
            FrameEncoder.encode(Frame(.hello, ["protocol": .text("tls"), "version": .uint(1)]), into: &hello)
            FrameEncoder.encode(Frame(.negotiate, ["session": .uint(1), "socket": .fd(0), "role": .text("server")]), into: &hello)
            try writeAll(fd, hello)
            let frames = try answers(fd)
            #expect(frames.first?.type == .hello)
            let error = try #require(frames.dropFirst().first)
            #expect(error.type == .error)
            #expect(try error.text("text").contains("descriptor"))
        }
    }
}

/// A service on a socket of its own, for a raw client.
private func withRawClient(_ body: (Int32) throws -> Void) throws {
    let pki = try TestPKI.get()
    let service = try NegotiationService(configuration: try tlsConfiguration(tlsConfigText(pki), file: pki.path("sealpost.toml")))
    let path = pki.path("tls-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock")
    try service.listen(path: path)
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread { service.run(); done.signal() }
    defer { service.stop(); done.wait(); unlink(path) }
    let fd = sealpost_unix_connect_for_test(path)
    defer { close(fd) }
    // A service that never answers fails the test instead of hanging it.
    var tv = timeval(tv_sec: 15, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    try body(fd)
}

/// Sends one frame with these descriptors attached (as one sendmsg).
private func sendFrame(_ fd: Int32, _ frame: Frame, descriptors: [Int32]) throws {
    var bytes: [UInt8] = []
    FrameEncoder.encode(frame, into: &bytes)
    let sent = bytes.withUnsafeBytes { raw in
        descriptors.withUnsafeBufferPointer { sealpost_sendmsg_fds(fd, raw.baseAddress!, raw.count, $0.baseAddress, $0.count) }
    }
    guard sent == bytes.count else { throw TestFailure("sendmsg sent \(sent) of \(bytes.count)") }
}

/// The frames the service sent until it closed the connection.
private func answers(_ fd: Int32) throws -> [Frame] {
    var d = FrameDecoder(protocol: .tls, direction: .serverToClient)
    d.append(try readToEOF(fd))
    var frames: [Frame] = []
    while let f = try d.next() { frames.append(f) }
    return frames
}

@Suite struct DescriptorDisciplineTests {
    /// A NEGOTIATE with two descriptors for its one fd attribute: the
    /// second must not become the next session's socket.
    @Test func extraDescriptorsAreAProtocolError() throws {
        try withRawClient { fd in
            try sendFrame(fd, Frame(.hello, ["protocol": .text("tls"), "version": .uint(1)]), descriptors: [])
            let a = open("/dev/null", O_RDONLY | O_CLOEXEC), b = open("/dev/null", O_RDONLY | O_CLOEXEC)
            defer { close(a); close(b) }
            try sendFrame(fd, Frame(.negotiate, ["session": .uint(1), "socket": .fd(0), "role": .text("server")]),
                          descriptors: [a, b])
            let frames = try answers(fd)
            #expect(frames.map(\.type) == [.hello, .error])
            #expect(try frames.last?.text("text").contains("more than its 1 fd attribute") == true)
        }
    }

    /// A session number may not be used again while its session runs: the
    /// answers are matched to the requests by it.
    @Test func aSessionNumberInUseIsAProtocolError() throws {
        try withRawClient { fd in
            try sendFrame(fd, Frame(.hello, ["protocol": .text("tls"), "version": .uint(1)]), descriptors: [])
            // Server role on a connection whose client never says a word:
            // the handshake waits (for its timeout).
            let listener = try Listener()
            let silent = try connectTCP(listener.port)
            let accepted = listener.accept()
            defer { close(silent); close(accepted) }
            let negotiate = Frame(.negotiate, ["session": .uint(7), "socket": .fd(0), "role": .text("server")])
            try sendFrame(fd, negotiate, descriptors: [accepted])
            try sendFrame(fd, negotiate, descriptors: [accepted])
            let frames = try answers(fd)
            #expect(frames.map(\.type) == [.hello, .error])
            #expect(try frames.last?.text("text").contains("session 7 is still in progress") == true)
        }
    }
}

import CSystemShims
func sealpost_unix_connect_for_test(_ path: String) -> Int32 { sealpost_unix_connect(path) }

@Suite struct ProcessTests {
    /// The built crypto-negotiate next to the test bundle.
    static func executable() throws -> String {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { throw TestFailure("readlink /proc/self/exe") }
        let exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var dir = String(exe[..<exe.lastIndex(of: "/")!])
        if dir.hasSuffix(".xctest/Contents/MacOS") { dir = String(dir.dropLast(".xctest/Contents/MacOS".count)) }
        let path = dir + "/crypto-negotiate"
        guard access(path, X_OK) == 0 else { throw TestFailure("\(path) not built: run swift build first") }
        return path
    }

    @Test func realProcessServesBothRolesAndStopsOnSIGTERM() throws {
        let pki = try TestPKI.get()
        let data = pki.path("data-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try shell("mkdir -p '\(data)/run'", in: pki.dir)
        let mainConfig = data + "/sealpost.toml"
        try ("[sealpost]\ndata_directory = \"\(data)\"\n" + tlsConfigText(pki)).write(toFile: mainConfig, atomically: true, encoding: .utf8)
        // As root, the stage creates its socket, then drops to "nobody"
        // and chroots into the empty directory data/empty.
        let root = geteuid() == 0
        let child = try Child([try Self.executable()], environment: ["SEALPOST_CONFIG": mainConfig,
                                                                   "SEALPOST_USER": "nobody"])
        #expect(child.waitFor("listening on \(data)/run/tls"), "\(child.output)")
        if root {
            var st = stat(), run = stat()
            #expect(stat(data + "/run/tls", &st) == 0 && stat(data + "/run", &run) == 0)
            #expect(st.st_uid == 0 && st.st_gid == run.st_gid && st.st_mode & 0o777 == 0o660)
            #expect(stat(data + "/empty", &st) == 0 && st.st_uid == 0 && st.st_mode & 0o7777 == 0o755)
            var target = [CChar](repeating: 0, count: 4096)
            let n = readlink("/proc/\(child.pid)/root", &target, target.count - 1)
            #expect(n > 0 && String(decoding: target.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self) == data + "/empty")
        }
        let c = try StageConnection.connect(path: data + "/run/tls")
        try c.clientHello(.tls)
        try exchangeAndClose(c, try negotiatePair(c))
        // A SIGHUP reloads; sessions after it still work. Chrooted, the
        // files are out of reach: the certificates loaded at start stay.
        kill(child.pid, SIGHUP)
        if root {
            #expect(child.waitFor("warning: reload failed, keeping the certificates loaded before"), "\(child.output)")
        } else {
            #expect(child.waitFor("reloaded 2 certificate(s)"))
        }
        try exchangeAndClose(c, try negotiatePair(c, pkix: false))
        c.close()
        kill(child.pid, SIGTERM)
        #expect(child.finish() == 0, "\(child.output)")
        #expect(child.output.contains("crypto-negotiate["))
        #expect(child.output.contains("authentication=pkix"))
        // Not root, it removes its socket; chrooted, it cannot (the next
        // start replaces it).
        #expect((access(data + "/run/tls", F_OK) == 0) == root)
    }

    /// A configured opportunistic list with an anonymous suite stops the
    /// stage at start (exit 78), naming the suite.
    @Test func aWeakOpportunisticCipherListIsAConfigurationError() throws {
        let pki = try TestPKI.get()
        let data = pki.path("data-ciphers-\(getpid())")
        try shell("mkdir -p '\(data)/run'", in: pki.dir)
        try ("[sealpost]\ndata_directory = \"\(data)\"\n"
             + "[tls]\ncertificates = []\nclient_opportunistic_ciphers = \"AES128-SHA:ADH-AES128-SHA\"\n")
            .write(toFile: data + "/sealpost.toml", atomically: true, encoding: .utf8)
        let child = try Child([try Self.executable()], environment: ["SEALPOST_CONFIG": data + "/sealpost.toml"])
        #expect(child.finish() == 78)
        #expect(child.output.contains(
            "fatal: opportunistic cipher list \"AES128-SHA:ADH-AES128-SHA\" enables ADH-AES128-SHA: no authentication (anonymous)"),
            "\(child.output)")
    }

    @Test func unreadableKeyIsAConfigurationError() throws {
        let pki = try TestPKI.get()
        let data = pki.path("data-bad-\(getpid())")
        try shell("mkdir -p '\(data)/run'", in: pki.dir)
        try ("[sealpost]\ndata_directory = \"\(data)\"\n"
             + "[tls]\n[[tls.certificates]]\ncert = \"\(pki.path("leaf-ec.pem"))\"\nkey = \"/nonexistent.key\"\n")
            .write(toFile: data + "/sealpost.toml", atomically: true, encoding: .utf8)
        let child = try Child([try Self.executable()], environment: ["SEALPOST_CONFIG": data + "/sealpost.toml"])
        #expect(child.finish() == 78)
        #expect(child.output.contains("fatal: private key /nonexistent.key"), "\(child.output)")
    }
}
