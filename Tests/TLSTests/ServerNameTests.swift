// SNI and address literals: a client-role session sends no SNI for an IPv4
// or IPv6 literal (RFC 6066 section 3), and the literal is still the
// reference identity, matched against the certificate's iPAddress names.
// Both ends are ours, over loopback TCP: the server-role session reports
// the SNI it received (SSL_get_servername).

import TLSTestSupport
import Glibc
import Testing
@testable import TLS

@Suite struct ServerNameTests {
    /// The handshake of a client asking for `serverName` with `policy`
    /// against a server holding leaf-ip (mx.example.test, 192.0.2.1,
    /// 2001:db8::1): the client's result, and the server's when it completed.
    static func handshake(serverName: String?, policy: VerificationPolicy)
        throws -> (client: Result<HandshakeResult, TLSError>, server: HandshakeResult?) {
        let pki = try TestPKI.get()
        let engine = try EngineThread()
        defer { engine.stop() }
        let listener = try Listener()
        let contexts = try TLSServerContexts(TLSServerSettings(certificates: [
            CertificateKeyPair(certificateFile: pki.path("leaf-ip.pem"), keyFile: pki.path("leaf-ip.key")),
        ]))
        let clientFD = try connectTCP(listener.port)
        let server = engine.server(contexts, socket: listener.accept())
        let client = engine.client(try TLSClientContext(caFile: pki.path("ca.pem")), socket: clientFD,
                                   serverName: serverName, policy: policy)
        let clientResult = try client.handshake.take()
        let c = try? clientResult.get()
        // A client that fails verification aborts the handshake: the
        // server's fails too, and is not looked at.
        let s = c == nil ? nil : try server.handshake.take().get()
        for fd in [c?.plaintext, s?.plaintext].compactMap({ $0 }) { close(fd) }
        return (clientResult, s)
    }

    @Test func aHostNameIsSentAsSNI() throws {
        let (client, server) = try Self.handshake(serverName: "mx.example.test", policy: .pkix(names: ["mx.example.test"]))
        let c = try client.get()
        #expect(c.report.authentication == .pkix)
        #expect(c.report.serverName == "mx.example.test")
        #expect(server?.report.serverName == "mx.example.test")
    }

    @Test(arguments: ["192.0.2.1", "2001:db8::1"])
    func anAddressLiteralIsNotSentButIsTheReferenceIdentity(address: String) throws {
        let (client, server) = try Self.handshake(serverName: address, policy: .pkix(names: [address]))
        let c = try client.get()
        #expect(c.report.authentication == .pkix)
        #expect(c.report.serverName == nil)
        let s = try #require(server)
        #expect(s.report.serverName == nil)
    }

    /// Policy none: the literal is still what the reported verify result
    /// was checked against.
    @Test func anAddressLiteralUnderPolicyNone() throws {
        let (client, server) = try Self.handshake(serverName: "192.0.2.1", policy: .none)
        let c = try client.get()
        #expect(c.report.verifyError == nil)
        #expect(server?.report.serverName == nil)
        let (other, _) = try Self.handshake(serverName: "198.51.100.7", policy: .none)
        #expect(try other.get().report.verifyError == "IP address mismatch")
    }

    @Test func anAddressTheCertificateDoesNotNameFails() throws {
        let (client, _) = try Self.handshake(serverName: "198.51.100.7", policy: .pkix(names: ["198.51.100.7"]))
        let e = try #require(client.failure)
        #expect(e.kind == .verification)
        #expect(e.verifyError == "IP address mismatch")
    }

    /// TLSA records hang under names; SSL_dane_enable would also make an
    /// address its SNI.
    @Test func daneRefusesAnAddressAsItsBaseDomain() throws {
        let record = TLSARecord(usage: 3, selector: 1, matchingType: 1, data: [UInt8](repeating: 1, count: 32))
        let (client, _) = try Self.handshake(serverName: "192.0.2.1", policy: .dane(records: [record], names: []))
        let e = try #require(client.failure)
        #expect(e.kind == .configuration)
        #expect(e.message.contains("DANE needs a host name"))
    }

    /// OpenSSL reads names as C strings: a NUL would cut the name the
    /// certificate is checked against (and the SNI) short, so a name with
    /// one is refused before the handshake, in every policy, and is never
    /// taken for an address literal.
    @Test func aNameWithANULByteIsRefused() throws {
        let record = TLSARecord(usage: 3, selector: 1, matchingType: 1, data: [UInt8](repeating: 1, count: 32))
        let cut = "mx.example.test\u{0}.evil.example"
        for (serverName, policy) in [(cut, VerificationPolicy.none), (cut, .pkix(names: ["mx.example.test"])),
                                     ("mx.example.test", .pkix(names: [cut])), (cut, .pin(spkiSHA256: [])),
                                     ("mx.example.test", .dane(records: [record], names: ["mx.example.test", cut]))] {
            let (client, _) = try Self.handshake(serverName: serverName, policy: policy)
            let e = try #require(client.failure, "\(policy)")
            #expect(e.kind == .configuration)
            #expect(e.message.contains("holds a NUL byte"), "\(e.message)")
        }
        #expect(!TLSConnection.isAddressLiteral("192.0.2.1\u{0}.evil.example"))
        #expect(TLSConnection.isAddressLiteral("192.0.2.1"))
    }
}
