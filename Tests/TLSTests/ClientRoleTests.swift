// Client role against the openssl s_server command: each verification
// policy, passing and failing.

import TLSTestSupport
import Foundation
import Glibc
import Testing
@testable import TLS

@Suite struct ClientRoleTests {
    /// s_server with `cert`/`key` (and `chain`), the engine connects with
    /// `policy`; on success a line goes through to s_server.
    static func handshake(cert: String, key: String, chain: String? = nil, serverName: String? = "mx.example.test",
                          policy: VerificationPolicy, ciphers: TLSClientCiphers = .strict, caFile: String? = "ca.pem",
                          serverOptions: [String] = []) throws -> Result<HandshakeResult, TLSError> {
        let pki = try TestPKI.get()
        var options = ["-cert", pki.path(cert), "-key", pki.path(key)] + serverOptions
        if let chain { options += ["-cert_chain", pki.path(chain)] }
        let server = try OpenSSLServer(options)
        defer { server.stop() }
        let engine = try EngineThread()
        defer { engine.stop() }
        let context = try TLSClientContext(caFile: caFile.map { pki.path($0) })
        let fd = try connectTCP(server.port)
        let session = engine.client(context, socket: fd, serverName: serverName, policy: policy, ciphers: ciphers)
        let result = try session.handshake.take()
        if case .success(let h) = result {
            try writeAll(h.plaintext, Array("ping through the relay\n".utf8))
            #expect(server.child.waitFor("ping through the relay"))
            close(h.plaintext)
            let summary = try session.closed.take()
            #expect(summary.sent == 23)
        }
        return result
    }

    @Test func noneReportsWhyPKIXWouldFail() throws {
        let pki = try TestPKI.get()
        let h = try Self.handshake(cert: "self.pem", key: "self.key", policy: .none).get()
        #expect(h.report.authentication == .encrypted)
        #expect(h.report.protocolVersion == "TLSv1.3")
        #expect(h.report.group == "x25519")
        #expect(h.report.verifyError == "self-signed certificate")
        #expect(h.report.peerSubject == "CN=wrong.name")
        #expect(h.report.peerSPKISHA256 == (try pki.spkiSHA256(pki.path("self.pem"))))
        #expect(h.report.serverName == "mx.example.test")
    }

    /// Under policy none the verify result is only reported: a handshake
    /// that fails for another reason (here the server demands a client
    /// certificate) says so, not "certificate verification failed".
    @Test func noneReportsTheHandshakesOwnFailure() throws {
        let result = try Self.handshake(cert: "self.pem", key: "self.key", policy: .none,
                                        serverOptions: ["-tls1_2", "-Verify", "1"])
        let e = try #require(result.failure)
        #expect(e.kind == .handshake, "\(e)")
        #expect(e.verifyError == nil)
        #expect(!"\(e)".contains("certificate verification failed"))
    }

    @Test func noneWithAGoodCertificateHasNoVerifyError() throws {
        let h = try Self.handshake(cert: "leaf-ec.pem", key: "leaf-ec.key", policy: .none).get()
        #expect(h.report.authentication == .encrypted)
        #expect(h.report.verifyError == nil)
    }

    @Test func pkixGoodName() throws {
        let h = try Self.handshake(cert: "leaf-ec.pem", key: "leaf-ec.key",
                                   policy: .pkix(names: ["mx.example.test"])).get()
        #expect(h.report.authentication == .pkix)
        #expect(h.report.peerSubject == "CN=mx.example.test")
    }

    @Test func pkixSecondNameOfTheList() throws {
        let h = try Self.handshake(cert: "other.pem", key: "other.key", serverName: "other.example.test",
                                   policy: .pkix(names: ["nomatch.example.test", "other.example.test"])).get()
        #expect(h.report.authentication == .pkix)
    }

    @Test func pkixBadName() throws {
        let result = try Self.handshake(cert: "other.pem", key: "other.key", policy: .pkix(names: ["mx.example.test"]))
        let e = try #require(result.failure)
        #expect(e.kind == .verification)
        #expect(e.verifyError == "hostname mismatch")
        #expect(e.enhancedStatus == "4.7.5")
    }

    /// The "secure" level's reference names: the domain and, with a
    /// leading dot, any name under it.
    @Test func pkixParentDomainName() throws {
        let h = try Self.handshake(cert: "other.pem", key: "other.key", serverName: "other.example.test",
                                   policy: .pkix(names: ["example.test", ".example.test"])).get()
        #expect(h.report.authentication == .pkix)
    }

    /// A name only in the subject's CN is not a name (RFC 6125, RFC 8461 4.2).
    @Test func pkixIgnoresTheCommonName() throws {
        let result = try Self.handshake(cert: "cn-only.pem", key: "cn-only.key", serverName: "cnonly.example.test",
                                        policy: .pkix(names: ["cnonly.example.test"]))
        let e = try #require(result.failure)
        #expect(e.kind == .verification)
        #expect(e.verifyError == "hostname mismatch")
    }

    @Test func pkixUntrustedCA() throws {
        let result = try Self.handshake(cert: "rogue-leaf.pem", key: "rogue-leaf.key",
                                        policy: .pkix(names: ["mx.example.test"]))
        let e = try #require(result.failure)
        #expect(e.kind == .verification)
        #expect(e.verifyError == "unable to get local issuer certificate")
    }

    @Test func daneEE311MatchesAndIgnoresTheName() throws {
        let pki = try TestPKI.get()
        let hash = try #require(Hex.decode(try pki.spkiSHA256(pki.path("self.pem"))))
        let h = try Self.handshake(cert: "self.pem", key: "self.key", policy: .dane(
            records: [TLSARecord(usage: 3, selector: 1, matchingType: 1, data: hash)], names: ["mx.example.test"])).get()
        #expect(h.report.authentication == .daneEE)
    }

    @Test func daneTA211WithTheCA() throws {
        let pki = try TestPKI.get()
        let hash = try #require(Hex.decode(try pki.spkiSHA256(pki.path("ca.pem"))))
        let h = try Self.handshake(cert: "leaf-ec.pem", key: "leaf-ec.key", chain: "ca.pem", policy: .dane(
            records: [TLSARecord(usage: 2, selector: 1, matchingType: 1, data: hash)], names: ["mx.example.test"]),
            caFile: nil).get()
        #expect(h.report.authentication == .daneTA)
    }

    @Test func daneTA211WrongNameFails() throws {
        let pki = try TestPKI.get()
        let hash = try #require(Hex.decode(try pki.spkiSHA256(pki.path("ca.pem"))))
        let result = try Self.handshake(cert: "other.pem", key: "other.key", chain: "ca.pem", policy: .dane(
            records: [TLSARecord(usage: 2, selector: 1, matchingType: 1, data: hash)], names: ["mx.example.test"]),
            caFile: nil)
        #expect(result.failure?.kind == .verification)
    }

    @Test func daneNoMatchFails() throws {
        let result = try Self.handshake(cert: "self.pem", key: "self.key", policy: .dane(
            records: [TLSARecord(usage: 3, selector: 1, matchingType: 1, data: [UInt8](repeating: 0xab, count: 32))],
            names: ["mx.example.test"]))
        let e = try #require(result.failure)
        #expect(e.kind == .verification)
        #expect(e.verifyError != nil)
    }

    @Test func daneWithOnlyUnusableRecordsFailsBeforeConnecting() throws {
        let result = try Self.handshake(cert: "self.pem", key: "self.key", policy: .dane(
            records: [TLSARecord(usage: 1, selector: 1, matchingType: 1, data: [UInt8](repeating: 1, count: 32))],
            names: ["mx.example.test"]))
        #expect(result.failure?.message.contains("no usable TLSA record") == true)
    }

    @Test func pinMatch() throws {
        let pki = try TestPKI.get()
        let hash = try #require(Hex.decode(try pki.spkiSHA256(pki.path("self.pem"))))
        let h = try Self.handshake(cert: "self.pem", key: "self.key",
                                   policy: .pin(spkiSHA256: [[UInt8](repeating: 0, count: 32), hash])).get()
        #expect(h.report.authentication == .pin)
    }

    @Test func pinMismatch() throws {
        let result = try Self.handshake(cert: "self.pem", key: "self.key",
                                        policy: .pin(spkiSHA256: [[UInt8](repeating: 0, count: 32)]))
        let e = try #require(result.failure)
        #expect(e.kind == .verification)
        #expect(e.message.contains("no pin matched"))
    }
}
