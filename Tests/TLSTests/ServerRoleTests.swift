// Server role against the openssl s_client command.

import TLSTestSupport
import Foundation
import Glibc
import Testing
@testable import TLS

@Suite(.serialized) struct ServerRoleTests {
    static func contexts(tickets: Bool = true) throws -> TLSServerContexts {
        let pki = try TestPKI.get()
        var settings = TLSServerSettings(certificates: [
            CertificateKeyPair(certificateFile: pki.path("leaf-ec.pem"), keyFile: pki.path("leaf-ec.key")),
            CertificateKeyPair(certificateFile: pki.path("leaf-rsa.pem"), keyFile: pki.path("leaf-rsa.key")),
            CertificateKeyPair(certificateFile: pki.path("other.pem"), keyFile: pki.path("other.key"),
                               names: ["other.example.test"]),
        ])
        settings.sessionTickets = tickets
        return try TLSServerContexts(settings)
    }

    /// s_client connects to a listener, the accepted socket goes to the
    /// engine; returns the handshake outcome and s_client's output.
    static func handshake(_ clientArgs: [String], serverName: String? = "mx.example.test",
                          environment: [String: String] = [:], send: String? = nil,
                          contexts given: TLSServerContexts? = nil)
        throws -> (Result<HandshakeResult, TLSError>, String, RelaySummary?) {
        let pki = try TestPKI.get()
        let engine = try EngineThread()
        defer { engine.stop() }
        let listener = try Listener()
        var args = ["openssl", "s_client", "-connect", "127.0.0.1:\(listener.port)", "-brief",
                    "-CAfile", pki.path("ca.pem")]
        if let serverName { args += ["-servername", serverName, "-verify_hostname", serverName] }
        let client = try Child(args + clientArgs, environment: environment)
        let fd = listener.accept()
        #expect(fd >= 0)
        let session = engine.server(try given ?? contexts(), socket: fd)
        let result = try session.handshake.take()
        var summary: RelaySummary?
        if case .success(let h) = result {
            if let send { try writeAll(h.plaintext, Array(send.utf8)) }
            client.waitFor("CONNECTION ESTABLISHED")
            if let send { client.waitFor(send) }
            close(h.plaintext)   // EOF: the engine sends close_notify
            summary = try session.closed.take()
        }
        client.closeStdin()
        client.finish()
        return (result, client.output, summary)
    }

    @Test func tls13WithECDSAByDefault() throws {
        let (result, out, summary) = try Self.handshake(["-tls1_3"], send: "hello from sealpost\n")
        let h = try result.get()
        #expect(h.report.protocolVersion == "TLSv1.3")
        #expect(h.report.cipher.hasPrefix("TLS_"))
        #expect(h.report.group == "x25519")
        #expect(h.report.serverName == "mx.example.test")
        #expect(h.report.authentication == .encrypted)
        #expect(h.report.peerSubject == nil)
        #expect(out.contains("Protocol version: TLSv1.3"))
        #expect(out.contains("Verification: OK"))
        #expect(out.contains("Signature type: ECDSA"))
        #expect(out.contains("hello from sealpost"))
        #expect(summary?.sent == 20)
    }

    @Test func tls12WithAnAEADCipher() throws {
        let (result, out, _) = try Self.handshake(["-tls1_2"])
        let h = try result.get()
        #expect(h.report.protocolVersion == "TLSv1.2")
        #expect(h.report.cipher.hasPrefix("ECDHE-"))
        #expect(h.report.cipher.contains("GCM") || h.report.cipher.contains("CHACHA20"))
        #expect(out.contains("Protocol version: TLSv1.2"))
    }

    @Test func rsaCertificateForAnRSAOnlyClient() throws {
        let (result, out, _) = try Self.handshake(["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"])
        _ = try result.get()
        #expect(out.contains("Signature type: RSA-PSS"))
        #expect(out.contains("Verification: OK"))
    }

    @Test func p256WhenTheClientOffersOnlyP256() throws {
        let (result, _, _) = try Self.handshake(["-tls1_3", "-groups", "P-256"])
        #expect(try result.get().report.group == "secp256r1")
    }

    @Test func sniSelectsTheCertificate() throws {
        let (result, out, _) = try Self.handshake(["-tls1_3"], serverName: "other.example.test")
        #expect(try result.get().report.serverName == "other.example.test")
        #expect(out.contains("Peer certificate: CN = other.example.test"))
        #expect(out.contains("Verification: OK"))
    }

    @Test func unknownSNIGetsTheDefault() throws {
        let (result, out, _) = try Self.handshake(["-tls1_3"], serverName: "unknown.example.test")
        _ = try result.get()
        #expect(out.contains("Peer certificate: CN = mx.example.test"))
    }

    @Test func tls11IsRefused() throws {
        // The client must be allowed to try TLS 1.1: no system openssl.cnf,
        // security level 0.
        let pki = try TestPKI.get()
        let conf = pki.path("empty.cnf")
        #expect(FileManager.default.createFile(atPath: conf, contents: Data()))
        let (result, _, _) = try Self.handshake(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
                                                environment: ["OPENSSL_CONF": conf])
        let error = try #require(result.failure)
        #expect(error.kind == .handshake)
        #expect(error.message.contains("unsupported protocol"))
        #expect(error.enhancedStatus == "4.7.5")
    }

    @Test func nonForwardSecretCipherIsRefused() throws {
        let (result, _, _) = try Self.handshake(["-tls1_2", "-cipher", "AES128-GCM-SHA256"])
        let error = try #require(result.failure)
        #expect(error.message.contains("no shared cipher"))
    }

    @Test func sessionTicketsResume() throws {
        let pki = try TestPKI.get()
        let contexts = try Self.contexts(tickets: true)
        let file = pki.path("session-\(UInt32.random(in: 0...UInt32.max)).pem")
        // s_client stores the ticket it received with the data.
        let (first, _, _) = try Self.handshake(["-tls1_3", "-sess_out", file], send: "one\n", contexts: contexts)
        #expect(try !first.get().report.resumed)
        let (second, _, _) = try Self.handshake(["-tls1_3", "-sess_in", file], send: "two\n", contexts: contexts)
        #expect(try second.get().report.resumed)
    }

    /// After the ticket keys rotate, a ticket from before does not resume.
    @Test func rotatedTicketKeysEndResumptionOfOlderTickets() throws {
        let pki = try TestPKI.get()
        let contexts = try Self.contexts(tickets: true)
        let file = pki.path("session-\(UInt32.random(in: 0...UInt32.max)).pem")
        let (first, _, _) = try Self.handshake(["-tls1_3", "-sess_out", file], send: "one\n", contexts: contexts)
        #expect(try !first.get().report.resumed)
        try contexts.rotateTicketKeys()
        let (second, _, _) = try Self.handshake(["-tls1_3", "-sess_in", file], send: "two\n", contexts: contexts)
        #expect(try !second.get().report.resumed)
    }

    @Test func noResumptionWithoutTickets() throws {
        let pki = try TestPKI.get()
        let contexts = try Self.contexts(tickets: false)
        let file = pki.path("session-\(UInt32.random(in: 0...UInt32.max)).pem")
        _ = try Self.handshake(["-tls1_3", "-sess_out", file], send: "one\n", contexts: contexts)
        guard access(file, F_OK) == 0 else { return }   // no ticket at all: nothing to resume
        let (second, _, _) = try Self.handshake(["-tls1_3", "-sess_in", file], send: "two\n", contexts: contexts)
        #expect(try !second.get().report.resumed)
    }

    @Test func missingKeyFileIsAConfigurationError() throws {
        let pki = try TestPKI.get()
        #expect(throws: TLSError.self) {
            try TLSServerContexts(TLSServerSettings(certificates: [
                CertificateKeyPair(certificateFile: pki.path("leaf-ec.pem"), keyFile: pki.path("nonexistent.key"))]))
        }
        do {
            _ = try TLSServerContexts(TLSServerSettings(certificates: [
                CertificateKeyPair(certificateFile: pki.path("leaf-ec.pem"), keyFile: pki.path("other.key"))]))
            Issue.record("a key that does not match its certificate was accepted")
        } catch {
            #expect(error.kind == .configuration)
            #expect(error.message.contains("mismatch"))
        }
    }

    @Test func changedFilesAreNoticed() throws {
        let pki = try TestPKI.get()
        try shell("cp leaf-ec.pem reload.pem && cp leaf-ec.key reload.key", in: pki.dir)
        let c = try TLSServerContexts(TLSServerSettings(certificates: [
            CertificateKeyPair(certificateFile: pki.path("reload.pem"), keyFile: pki.path("reload.key"))]))
        #expect(!c.filesChanged())
        try shell("cp other.pem reload.pem && cp other.key reload.key && touch -d '+1 minute' reload.pem", in: pki.dir)
        #expect(c.filesChanged())
    }
}
