// The relay engine with both ends in-process (a server-role and a
// client-role session connected over loopback TCP): volume, half-close,
// close_notify, truncation, timeouts, nothing relayed before the handshake.

import TLSTestSupport
import Foundation
import Glibc
import Testing
@testable import TLS

@Suite struct RelayTests {
    struct Pair {
        let engine: EngineThread
        let server: EngineThread.Session
        let client: EngineThread.Session
        let serverPlain: Int32
        let clientPlain: Int32
    }

    static func pair() throws -> Pair {
        let pki = try TestPKI.get()
        let engine = try EngineThread()
        let listener = try Listener()
        let contexts = try ServerRoleTests.contexts()
        let clientFD = try connectTCP(listener.port)
        let serverFD = listener.accept()
        let server = engine.server(contexts, socket: serverFD)
        let client = engine.client(try TLSClientContext(caFile: pki.path("ca.pem")), socket: clientFD,
                                   serverName: "mx.example.test", policy: .pkix(names: ["mx.example.test"]))
        let c = try client.handshake.take().get()
        let s = try server.handshake.take().get()
        #expect(c.report.authentication == .pkix)
        return Pair(engine: engine, server: server, client: client, serverPlain: s.plaintext, clientPlain: c.plaintext)
    }

    static func pattern(_ n: Int, seed: UInt8) -> [UInt8] {
        (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &+ $0 >> 9) }
    }

    @Test func oneMegabyteEachWayAtOnce() throws {
        let p = try Self.pair()
        defer { p.engine.stop() }
        let up = Self.pattern(1 << 20, seed: 1)
        let down = Self.pattern(1 << 20, seed: 7)
        let upReceived = Box<[UInt8]>()
        let writers = DispatchGroup()
        // Both callers write and read at the same time (the buffers are
        // bounded, so doing one after the other would also work, but this
        // exercises both directions at once).
        DispatchQueue.global().async(group: writers) {
            try? writeAll(p.clientPlain, up)
            shutdown(p.clientPlain, Int32(SHUT_WR))
        }
        DispatchQueue.global().async(group: writers) {
            try? writeAll(p.serverPlain, down)
            shutdown(p.serverPlain, Int32(SHUT_WR))
        }
        DispatchQueue.global().async { upReceived.put((try? readToEOF(p.serverPlain)) ?? []) }
        let downReceived = try readToEOF(p.clientPlain)
        let upBytes = try upReceived.take()
        writers.wait()
        #expect(downReceived == down)
        #expect(upBytes == up)
        close(p.clientPlain)
        close(p.serverPlain)
        let sc = try p.server.closed.take()
        let cc = try p.client.closed.take()
        #expect(sc == RelaySummary(received: 1 << 20, sent: 1 << 20, closeNotify: true, reason: "closed"))
        #expect(cc == RelaySummary(received: 1 << 20, sent: 1 << 20, closeNotify: true, reason: "closed"))
    }

    @Test func halfCloseKeepsTheOtherDirectionOpen() throws {
        let p = try Self.pair()
        defer { p.engine.stop() }
        // The client's caller says its piece and shuts down writing: the
        // server's caller reads it, then EOF (close_notify went through)...
        try writeAll(p.clientPlain, Array("QUIT\r\n".utf8))
        shutdown(p.clientPlain, Int32(SHUT_WR))
        #expect(try readToEOF(p.serverPlain) == Array("QUIT\r\n".utf8))
        // ... and can still answer.
        try writeAll(p.serverPlain, Array("221 2.0.0 Bye\r\n".utf8))
        close(p.serverPlain)
        #expect(try readToEOF(p.clientPlain) == Array("221 2.0.0 Bye\r\n".utf8))
        close(p.clientPlain)
        #expect(try p.server.closed.take().closeNotify)
        #expect(try p.client.closed.take().closeNotify)
    }

    /// Bytes and the EOF behind them queued while the loop is busy: one
    /// readiness event for both, and the read that gets the bytes is short.
    /// The relay must still see the EOF (no new edge will announce it).
    @Test func bytesAndEOFInOneEventArePassedOn() throws {
        let p = try Self.pair()
        defer { p.engine.stop() }
        let hold = DispatchSemaphore(value: 0)
        let held = DispatchSemaphore(value: 0)
        p.engine.loop.execute { held.signal(); hold.wait() }
        held.wait()
        try writeAll(p.clientPlain, Array("QUIT\r\n".utf8))
        shutdown(p.clientPlain, Int32(SHUT_WR))
        hold.signal()
        #expect(try readToEOF(p.serverPlain) == Array("QUIT\r\n".utf8))
        // The other way, and this time the network side gets a record and
        // then close_notify and the FIN while the loop is held.
        p.engine.loop.execute { held.signal(); hold.wait() }
        held.wait()
        try writeAll(p.serverPlain, Array("221 2.0.0 Bye\r\n".utf8))
        close(p.serverPlain)
        hold.signal()
        #expect(try readToEOF(p.clientPlain) == Array("221 2.0.0 Bye\r\n".utf8))
        close(p.clientPlain)
        #expect(try p.server.closed.take() == RelaySummary(received: 6, sent: 15, closeNotify: true, reason: "closed"))
        #expect(try p.client.closed.take() == RelaySummary(received: 15, sent: 6, closeNotify: true, reason: "closed"))
    }

    @Test func peerGoneWithoutCloseNotifyIsReported() throws {
        let pki = try TestPKI.get()
        let engine = try EngineThread()
        defer { engine.stop() }
        let listener = try Listener()
        // openssl s_client as the peer, killed mid-session: no close_notify.
        let client = try Child(["openssl", "s_client", "-connect", "127.0.0.1:\(listener.port)", "-brief",
                                "-CAfile", pki.path("ca.pem")])
        let session = engine.server(try ServerRoleTests.contexts(), socket: listener.accept())
        let h = try session.handshake.take().get()
        client.waitFor("CONNECTION ESTABLISHED")
        client.kill()
        client.finish()
        #expect(try readToEOF(h.plaintext) == [])
        close(h.plaintext)
        let summary = try session.closed.take()
        #expect(!summary.closeNotify)
        #expect(summary.reason != "closed")
    }

    @Test func plaintextBeforeTheHandshakeIsNeverRelayed() throws {
        let engine = try EngineThread()
        defer { engine.stop() }
        let listener = try Listener()
        let fd = try connectTCP(listener.port)
        defer { close(fd) }
        let session = engine.server(try ServerRoleTests.contexts(), socket: listener.accept())
        // An SMTP command instead of a ClientHello: the handshake fails and
        // no plaintext socket ever exists.
        try writeAll(fd, Array("EHLO attacker.example\r\nMAIL FROM:<a@b>\r\n".utf8))
        let e = try #require(try session.handshake.take().failure)
        #expect(e.kind == .handshake)
    }

    @Test func handshakeTimeout() throws {
        let engine = try EngineThread()
        defer { engine.stop() }
        let listener = try Listener()
        let fd = try connectTCP(listener.port)   // connects and says nothing
        defer { close(fd) }
        let session = engine.server(try ServerRoleTests.contexts(), socket: listener.accept(),
                                    timeouts: RelayTimeouts(handshake: 1, idle: 300))
        let e = try #require(try session.handshake.take().failure)
        #expect(e.message.contains("timed out"))
        #expect(e.enhancedStatus == "4.4.2")
        // The engine closed the socket: the client reads EOF.
        var b: UInt8 = 0
        #expect(read(fd, &b, 1) == 0)
    }

    @Test func idleTimeoutEndsTheSessionWithCloseNotify() throws {
        let pki = try TestPKI.get()
        let engine = try EngineThread()
        defer { engine.stop() }
        let listener = try Listener()
        let clientFD = try connectTCP(listener.port)
        let server = engine.server(try ServerRoleTests.contexts(), socket: listener.accept(),
                                   timeouts: RelayTimeouts(handshake: 60, idle: 1))
        let client = engine.client(try TLSClientContext(caFile: pki.path("ca.pem")), socket: clientFD,
                                   serverName: nil, policy: .none)
        let s = try server.handshake.take().get()
        let c = try client.handshake.take().get()
        let summary = try server.closed.take()
        #expect(summary.reason.contains("idle timeout"))
        // The client side saw a clean end (close_notify), its caller EOF.
        #expect(try readToEOF(c.plaintext) == [])
        close(c.plaintext)
        close(s.plaintext)
        #expect(try client.closed.take().closeNotify)
    }
}
