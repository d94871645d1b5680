// STARTTLS through crypto-negotiate: the real NegotiationService in this
// process, listening on a Unix socket, serves both ends — the client role
// for remote-deliver (CryptoNegotiateHandOff) and the server role for the
// sink — so the SMTP conversation after STARTTLS really runs over TLS.

import StageRuntime
import Testing
import SealpostConfig
import CryptoNegotiation
import TLS
import StageProtocol
import SMTP
@testable import RemoteDelivery
#if canImport(Glibc)
import Glibc
#endif

/// A self-signed certificate and a running NegotiationService.
final class TLSService: @unchecked Sendable {
    let dir: String
    let socketPath: String
    let service: NegotiationService
    private let stopped = Mutex(false)

    /// `olderServerSuite`: the server role (the sink's side) is an older
    /// MX: TLS 1.2 with only this suite, an RSA certificate. The client
    /// role (remote-deliver's side) keeps the configured lists.
    init(listening: Bool = true, olderServerSuite: String? = nil) throws {
        var template = Array("/tmp/sealpost-rtls-XXXXXX".utf8CString)
        dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        let key = olderServerSuite == nil ? "ec -pkeyopt ec_paramgen_curve:P-256" : "rsa:2048"
        let rc = system("cd \(dir) && openssl req -x509 -newkey \(key) -nodes -keyout mx.key -out mx.pem -days 2 -subj /CN=mx.dest.test -addext subjectAltName=DNS:mx.dest.test >/dev/null 2>&1")
        guard rc == 0 else { throw SinkError("openssl req failed: \(rc)") }
        let text = """
            [tls]
            ca_file = "\(dir)/mx.pem"
            handshake_timeout = 30
            [[tls.certificates]]
            cert = "\(dir)/mx.pem"
            key = "\(dir)/mx.key"
            """
        var configuration = TLSConfiguration(try SealpostConfiguration.parse(text: text, file: dir + "/sealpost.toml").tls)
        if let olderServerSuite {
            configuration.server.common.protocols = [.tls12]
            configuration.server.common.cipherList = olderServerSuite
        }
        service = try NegotiationService(configuration: configuration)
        socketPath = dir + "/tls"
        if listening { try startListening() }
    }

    /// Binds the socket and serves (as crypto-negotiate does once started).
    func startListening() throws {
        try service.listen(path: socketPath)
        let s = service
        StageRuntime.detachThread { s.run() }
    }

    func stop() {
        service.stop()
        _ = system("rm -rf \(dir)")
    }

    /// The sink's side: server role.
    func serverHandOff(_ socket: Int32) -> Int32 {
        do {
            let c = try StageConnection.connect(path: socketPath)
            defer { c.close() }
            _ = try c.clientHello(.tls)
            try c.send(Frame(.negotiate, attributes: [("session", .uint(1)), ("socket", .fd(socket)), ("role", .text("server"))]))
            close(socket)
            while let f = try c.receive() {
                if f.type == .negotiated, case .fd(let p)? = f["plaintext"] { return p }
                if f.type == .failed || f.type == .error { return -1 }
            }
        } catch {}
        return -1
    }
}

import Synchronization

@Suite(.serialized) struct TLSHandOffTests {
    @Test func startTLSThroughCryptoNegotiate() async throws {
        let tls = try TLSService()
        defer { tls.stop() }
        var script = SinkScript()
        script.startTLS = { tls.serverHandOff($0) }
        let sink = try TestSink(address: "127.0.0.7", script: script)
        defer { sink.stop() }
        let (agent, group, logs) = mxAgent(sink: sink, tls: tls, host: "mx.dest.test", dnssec: false)
        let results = await withCheckedContinuation { c in agent.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test")) { c.resume(returning: $0) } }
        try? await agent.eventLoop.submit { agent.closeIdleConnections() }.get()
        await group.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .sent)
        guard case .encrypted(let proto, let cipher) = r.tls else {
            Issue.record("expected an unauthenticated TLS session, got \(r.tls)")
            return
        }
        #expect(proto == "TLSv1.3")
        #expect(!cipher.isEmpty)
        // EHLO, STARTTLS, (TLS), EHLO again, then the transaction.
        let commands = sink.commands
        #expect(commands.prefix(4) == ["EHLO client.test", "STARTTLS", "(TLS)", "EHLO client.test"])
        #expect(sink.messages.count == 1)
        #expect(logs.all.contains { $0.hasSuffix("tls=\(proto) \(cipher) unauthenticated") })
    }

    /// REQUIRETLS to a destination at the default level ("may", which
    /// verifies nothing): the MX host, from a DNSSEC-validated answer, is
    /// still authenticated by PKIX (RFC 8689 section 4.2.1). Its
    /// certificate names it and is trusted (the service's ca_file): the
    /// message goes, REQUIRETLS on MAIL. Named otherwise: not delivered,
    /// not retried in clear text, deferred. Without the verification
    /// both handshakes would have been unauthenticated and the message
    /// refused by the session (5.7.30, "host was not authenticated").
    @Test(arguments: [("mx.dest.test", true), ("other.dest.test", false)])
    func requireTLSAuthenticatesTheMXAtTheDefaultLevel(host: String, named: Bool) async throws {
        let tls = try TLSService()
        defer { tls.stop() }
        var script = SinkScript()
        script.startTLS = { tls.serverHandOff($0) }
        script.ehlo = ["250-sink.test", "250-PIPELINING", "250-REQUIRETLS", "250 8BITMIME"]
        let sink = try TestSink(address: "127.0.0.7", script: script)
        defer { sink.stop() }
        let (agent, group, _) = mxAgent(sink: sink, tls: tls, host: host, dnssec: true)
        var job = makeJob(to: ["b@dest.test"], nexthop: "dest.test")
        job.requireTLS = true
        let results = await withCheckedContinuation { c in agent.deliver(job) { c.resume(returning: $0) } }
        try? await agent.eventLoop.submit { agent.closeIdleConnections() }.get()
        await group.shutdown()

        let r = try #require(results.first)
        #expect(sink.connections == 1)
        if named {
            #expect(r.status == .sent, "\(r)")
            guard case .authenticated(_, _, let method) = r.tls else {
                Issue.record("expected an authenticated TLS session, got \(r.tls)")
                return
            }
            #expect(method == "pkix")
            #expect(sink.commands.contains { $0.hasPrefix("MAIL FROM:<sender@origin.test>") && $0.hasSuffix(" REQUIRETLS") })
            #expect(sink.messages.count == 1)
        } else {
            #expect(r.status == .deferred, "\(r)")
            #expect(r.dsn.hasPrefix("4."), "\(r)")
            #expect(sink.messages.isEmpty)
            #expect(!sink.commands.contains { $0.hasPrefix("MAIL") })
        }
    }

    @Test func failedHandshakeIsRetriedInClearText() async throws {
        let tls = try TLSService()
        defer { tls.stop() }
        var script = SinkScript()
        // The "server" drops the connection instead of doing TLS.
        script.startTLS = { close($0); return -1 }
        let sink = try TestSink(address: "127.0.0.8", script: script)
        defer { sink.stop() }
        let f = HandOffAgent(sink: sink, tlsSocket: tls.socketPath)
        let results = await f.deliver()
        await f.shutdown()

        #expect(results.first?.status == .sent)
        #expect(results.first?.tls == TLSOutcome.none)
        #expect(sink.connections == 2)
        #expect(sink.commands.filter { $0 == "STARTTLS" }.count == 1)
        // The retry is the same address: nothing was passed on.
        #expect(!f.logs.all.contains { $0.contains("kept for the next address") })
    }

    /// One delivery with TLS level `level` to a sink at `address` whose
    /// STARTTLS is an older MX's: TLS 1.2 with RSA key exchange only
    /// (AES128-GCM-SHA256, not in the strict list).
    private func deliverToAnOlderServer(at address: String, level: TLSRequirement?) async throws
        -> (result: RemoteResult?, sink: TestSink, log: [String]) {
        let tls = try TLSService(olderServerSuite: "AES128-GCM-SHA256")
        defer { tls.stop() }
        var script = SinkScript()
        script.startTLS = { tls.serverHandOff($0) }
        let sink = try TestSink(address: address, script: script)
        defer { sink.stop() }
        let f = HandOffAgent(sink: sink, tlsSocket: tls.socketPath, tls: level)
        let results = await f.deliver()
        await f.shutdown()
        return (results.first, sink, f.logs.all)
    }

    /// Level "may": remote-deliver asks for the opportunistic list and the
    /// message goes encrypted with that suite, logged as such, instead of
    /// in clear text after a failed handshake.
    @Test func opportunisticTLSReachesAnOlderServer() async throws {
        let (result, sink, log) = try await deliverToAnOlderServer(at: "127.0.0.11", level: nil)
        #expect(result?.status == .sent)
        #expect(result?.tls == .encrypted(protocol: "TLSv1.2", cipher: "AES128-GCM-SHA256"))
        #expect(sink.connections == 1)
        #expect(sink.commands.prefix(4) == ["EHLO client.test", "STARTTLS", "(TLS)", "EHLO client.test"])
        #expect(log.contains { $0.contains("status=sent") && $0.hasSuffix("tls=TLSv1.2 AES128-GCM-SHA256 unauthenticated") }, "\(log)")
    }

    /// Level "encrypt" (TLS required, a failure defers): the strict list,
    /// so the same older MX gets no message.
    @Test func requiredTLSKeepsTheStrictList() async throws {
        let (result, sink, _) = try await deliverToAnOlderServer(at: "127.0.0.12", level: .encrypt)
        #expect(result?.status == .deferred)
        #expect(result?.dsn.hasPrefix("4.") == true)
        #expect(sink.messages.isEmpty)
        #expect(!sink.commands.contains { $0.hasPrefix("MAIL FROM") })
        #expect(sink.commands.filter { $0 == "STARTTLS" }.count == 1)
    }

    /// crypto-negotiate is a moment late (the supervisor started it just
    /// before remote-deliver, or restarts it): the first delivery waits
    /// for its socket instead of going out in clear text.
    @Test func aDeliveryWaitsForCryptoNegotiateThatIsStarting() async throws {
        let tls = try TLSService(listening: false)
        defer { tls.stop() }
        var script = SinkScript()
        script.startTLS = { tls.serverHandOff($0) }
        let sink = try TestSink(address: "127.0.0.9", script: script)
        defer { sink.stop() }
        let f = HandOffAgent(sink: sink, tlsSocket: tls.socketPath)
        let delivery = Task { await f.deliver() }
        // Started only once the agent noticed the socket missing.
        for _ in 0..<300 where !f.logs.all.contains(where: { $0.contains("crypto-negotiate is not available") }) {
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        try tls.startListening()
        let results = await delivery.value
        await f.shutdown()

        #expect(f.logs.all.contains { $0.contains("crypto-negotiate is not available (no socket): waiting up to 10.0 s") })
        #expect(results.first?.status == .sent)
        guard case .encrypted = results.first?.tls else {
            Issue.record("expected TLS, got \(String(describing: results.first?.tls))")
            return
        }
        #expect(sink.commands.prefix(3) == ["EHLO client.test", "STARTTLS", "(TLS)"])
    }

    /// Not run at all: the wait is paid once, then deliveries go on at
    /// once (clear text under "may") until it is back.
    @Test func aMissingCryptoNegotiateIsWaitedForOnce() async throws {
        var script = SinkScript()
        script.startTLS = { close($0); return -1 }   // offered, never reached
        let sink = try TestSink(address: "127.0.0.10", script: script)
        defer { sink.stop() }
        let f = HandOffAgent(sink: sink, tlsSocket: "/nonexistent/sealpost-tls") {
            $0.connectionCacheTime = 0
            $0.tlsHandOffGrace = 0.3
        }
        let outcomes = await f.deliver(1) + f.deliver(2)
        await f.shutdown()

        #expect(outcomes.map(\.status) == [.sent, .sent])
        #expect(outcomes.allSatisfy { $0.tls == TLSOutcome.none })
        #expect(!sink.commands.contains("STARTTLS"))
        #expect(f.logs.all.filter { $0.contains("crypto-negotiate is not available") }.count == 1)
    }
}

/// An agent that finds `sink` at 127.0.0.7 as dest.test's MX host `host`
/// (from DNSSEC-validated answers when `dnssec`), handing STARTTLS to `tls`.
private func mxAgent(sink: TestSink, tls: TLSService, host: String,
                     dnssec: Bool) -> (RemoteDeliveryAgent, MultiThreadedEventLoopGroupHolder, LogRecorder) {
    let resolver = StaticMailExchangerResolver(
        mx: ["dest.test": .exchangers([MailExchanger(preference: 10, host: host)], secure: dnssec)],
        hosts: [host: .addresses(["127.0.0.7"], secure: dnssec)])
    let logs = LogRecorder()
    let group = MultiThreadedEventLoopGroupHolder()
    var settings = RemoteSettings(hostname: "client.test")
    settings.maximumPhaseTimeout = 30
    let agent = RemoteDeliveryAgent(eventLoop: group.loop, settings: settings,
                                    transports: TransportTable(entries: [TransportEntry(key: "dest.test", nextHop: .mailExchangers("dest.test", port: sink.port))]),
                                    resolver: resolver, tlsHandOff: CryptoNegotiateHandOff(socketPath: tls.socketPath), log: logs.log)
    return (agent, group, logs)
}

/// An agent that sends everything for dest.test to `sink`, handing
/// STARTTLS to the crypto-negotiate socket at `tlsSocket`.
private struct HandOffAgent {
    let logs = LogRecorder()
    let group = MultiThreadedEventLoopGroupHolder()
    let agent: RemoteDeliveryAgent

    init(sink: TestSink, tlsSocket: String, tls: TLSRequirement? = nil, configure: (inout RemoteSettings) -> Void = { _ in }) {
        var settings = RemoteSettings(hostname: "client.test")
        settings.maximumPhaseTimeout = 30
        configure(&settings)
        let table = TransportTable(entries: [TransportEntry(key: "dest.test", nextHop: .host(sink.address, port: sink.port), tls: tls)])
        agent = RemoteDeliveryAgent(eventLoop: group.loop, settings: settings, transports: table,
                                    resolver: StaticMailExchangerResolver(),
                                    tlsHandOff: CryptoNegotiateHandOff(socketPath: tlsSocket), log: logs.log)
    }

    func deliver(_ id: UInt64 = 1) async -> [RemoteResult] {
        await withCheckedContinuation { c in
            agent.deliver(makeJob(id, to: ["b@dest.test"], nexthop: "dest.test")) { c.resume(returning: $0) }
        }
    }

    func shutdown() async {
        try? await agent.eventLoop.submit { agent.closeIdleConnections() }.get()
        await group.shutdown()
    }
}

@Suite struct NegotiateFrameServerNameTests {
    /// server-name is a host name, or an IPv4 next hop's address: the TLS
    /// module sends no address as SNI (RFC 6066 section 3) but checks the
    /// reported PKIX result against it. Never a string that is neither.
    @Test func serverNameIsAHostNameOrAnIPv4Address() {
        func serverName(_ host: String) -> AttributeValue? {
            let request = TLSClientRequest(serverName: host, peer: "\(host)[192.0.2.1]:25", verification: TLSVerification())
            return CryptoNegotiateHandOff.negotiateFrame(session: 1, request: request, caBundle: nil)["server-name"]
        }
        #expect(serverName("mx1.example.net") == .text("mx1.example.net"))
        #expect(serverName("192.0.2.1") == .text("192.0.2.1"))
        #expect(serverName("2001:db8::1") == nil)
        #expect(serverName("mx.123") == nil)
    }

    /// tls=verify to a next hop given as an address: the address is the
    /// name to match (an iPAddress name of the certificate), and the frame
    /// carrying it is one crypto-negotiate accepts.
    @Test func anAddressNextHopIsTheNameToVerify() throws {
        for address in ["192.0.2.1", "2001:db8::1"] {
            let candidate = DeliveryCandidate(host: address, address: address, port: 25)
            let security = DestinationSecurity(requirement: .verify, source: "transport table")
            let verification = StaticDestinationPolicy().verification(for: candidate, domain: "example.org", security: security)
            let request = TLSClientRequest(serverName: address, peer: "[\(address)]:25", verification: verification)
            var frame = CryptoNegotiateHandOff.negotiateFrame(session: 1, request: request, caBundle: nil)
            #expect(frame["match-names"] == .text(address))
            frame.set("socket", .fd(0))   // as the hand-off fills it in
            // What crypto-negotiate's decoder checks (PROTOCOL.md 4.5).
            #expect(throws: Never.self) { try ProtocolSchema.standard(.tls).validate(frame, direction: .clientToServer) }
        }
    }
}
