import Foundation
import Glibc
import SealpostConfig
import StageProtocol
import Testing
@testable import CryptoNegotiation
@testable import TLS

/// The [tls] section of the main configuration, as crypto-negotiate reads it.
func tlsConfiguration(_ text: String, file: String) throws -> TLSConfiguration {
    TLSConfiguration(try SealpostConfiguration.parse(text: text, file: file).tls)
}

@Suite struct ConfigurationTests {
    @Test func fullSection() throws {
        let c = try tlsConfiguration("""
            [sealpost]
            data_directory = "/var/lib/sealpost"
            [tls]
            ca_file = "ca.pem"
            protocols = ["TLSv1.3"]
            session_tickets = false
            handshake_timeout = "30s"
            idle_timeout = "5m"
            [tls.ca_bundles]
            mta-sts = "/etc/sealpost/sts.pem"
            [[tls.certificates]]
            cert = "ec.pem"
            key = "$data_directory/tls/ec.key"
            [[tls.certificates]]
            cert = "/abs/rsa.pem"
            key = "/abs/rsa.key"
            names = ["MX.Example.org", "*.example.org"]
            """, file: "/etc/sealpost/sealpost.toml")
        #expect(c.server.certificates == [
            CertificateKeyPair(certificateFile: "/etc/sealpost/ec.pem", keyFile: "/var/lib/sealpost/tls/ec.key"),
            CertificateKeyPair(certificateFile: "/abs/rsa.pem", keyFile: "/abs/rsa.key", names: ["mx.example.org", "*.example.org"]),
        ])
        #expect(c.server.common.protocols == [.tls13])
        #expect(c.common.protocols == [.tls13])
        #expect(!c.server.sessionTickets)
        #expect(c.caBundles == ["default": "/etc/sealpost/ca.pem", "mta-sts": "/etc/sealpost/sts.pem"])
        #expect(c.timeouts == RelayTimeouts(handshake: 30, idle: 300))
    }

    @Test func defaultsAreTheSelfSignedPairInTheDataDirectory() throws {
        let c = try tlsConfiguration("[sealpost]\ndata_directory = \"/d\"\n", file: "/x/sealpost.toml")
        #expect(c.server.certificates == [
            CertificateKeyPair(certificateFile: "/d/tls/self-signed-ecdsa.crt", keyFile: "/d/tls/self-signed-ecdsa.key"),
            CertificateKeyPair(certificateFile: "/d/tls/self-signed-rsa.crt", keyFile: "/d/tls/self-signed-rsa.key"),
        ])
        #expect(c.server.common.protocols == [.tls12, .tls13])
        #expect(c.server.sessionTickets)
        #expect(c.caBundles == ["default": "/etc/ssl/certs/ca-certificates.crt"])
        #expect(c.timeouts == RelayTimeouts())
    }

    @Test func opportunisticCipherList() throws {
        #expect(try tlsConfiguration("[tls]\n", file: "/x/sealpost.toml").opportunisticCipherList
                == TLSClientCiphers.opportunisticDefault)
        let c = try tlsConfiguration("[tls]\nclient_opportunistic_ciphers = \"ECDHE+AESGCM:RSA+AESGCM\"\n", file: "/x/sealpost.toml")
        #expect(c.opportunisticCipherList == "ECDHE+AESGCM:RSA+AESGCM")
        #expect(c.common.cipherList == TLSClientCiphers.strictDefault)
    }

    /// The shipped file shows the default list (commented out: the key's
    /// absence means the TLS module's default), and it is that list.
    @Test func shippedFileShowsTheDefaultOpportunisticList() throws {
        let checkout = String(#filePath).split(separator: "/").dropLast(3).joined(separator: "/")
        let text = try String(contentsOfFile: "/\(checkout)/Config/sealpost.toml", encoding: .utf8)
        #expect(text.contains("# client_opportunistic_ciphers = \"\(TLSClientCiphers.opportunisticDefault)\"\n"))
    }

    @Test func noCertificatesNoServerRole() throws {
        let c = try tlsConfiguration("[tls]\ncertificates = []\nca_file = \"\"\n", file: "/x/sealpost.toml")
        #expect(c.server.certificates.isEmpty)
        #expect(c.caBundles.isEmpty)
    }
}

@Suite struct RequestTests {
    static func decode(_ frame: Frame) throws -> Frame {
        var d = FrameDecoder(protocol: .tls, direction: .clientToServer, afterHello: true)
        d.append(FrameEncoder.encode(frame))
        var f = try #require(try d.next())
        f.set("socket", .fd(9))
        return f
    }

    @Test func serverRole() throws {
        let r = try NegotiationRequest(try Self.decode(Frame(.negotiate, ["session": .uint(5), "socket": .fd(0),
                                                                          "role": .text("server"), "idle-timeout": .uint(60)])))
        #expect(r.session == 5)
        #expect(r.socket == 9)
        #expect(r.role == .server)
        #expect(r.idleTimeout == 60)
        #expect(r.handshakeTimeout == nil)
    }

    @Test func clientDANE() throws {
        let records = [TLSARecord(usage: 3, selector: 1, matchingType: 1, data: Array(repeating: 7, count: 32)),
                       TLSARecord(usage: 2, selector: 0, matchingType: 0, data: [1, 2, 3])]
        let r = try NegotiationRequest(try Self.decode(Frame(.negotiate, [
            "session": .uint(1), "socket": .fd(0), "role": .text("client"), "server-name": .text("MX1.example.net"),
            "policy": .text("dane"), "tlsa": .bytes(NegotiationRequest.encodeTLSA(records))])))
        #expect(r.role == .client(serverName: "MX1.example.net", policy: .dane(records: records, names: ["mx1.example.net"]),
                                  caBundle: "default", ciphers: .strict))
    }

    @Test func clientPKIXWithNamesAndPins() throws {
        let r = try NegotiationRequest(try Self.decode(Frame(.negotiate, [
            "session": .uint(1), "socket": .fd(0), "role": .text("client"), "server-name": .text("mx.example.net"),
            "policy": .text("pkix"), "match-names": .text("example.net,mx.example.net"), "ca": .text("mta-sts")])))
        #expect(r.role == .client(serverName: "mx.example.net", policy: .pkix(names: ["example.net", "mx.example.net"]),
                                  caBundle: "mta-sts", ciphers: .strict))
        let pin = String(repeating: "ab", count: 32)
        let p = try NegotiationRequest(try Self.decode(Frame(.negotiate, [
            "session": .uint(1), "socket": .fd(0), "role": .text("client"), "policy": .text("pin"), "pins": .text(pin)])))
        #expect(p.role == .client(serverName: nil, policy: .pin(spkiSHA256: [Array(repeating: 0xab, count: 32)]), caBundle: "default",
                                  ciphers: .strict))
    }

    /// remote-deliver's opportunistic request (level "may") gets the wider
    /// list; without the attribute, or with false, the strict one.
    @Test func clientOpportunistic() throws {
        let r = try NegotiationRequest(try Self.decode(Frame(.negotiate, [
            "session": .uint(1), "socket": .fd(0), "role": .text("client"), "server-name": .text("mx.example.net"),
            "opportunistic": .bool(true)])))
        #expect(r.role == .client(serverName: "mx.example.net", policy: .none, caBundle: "default", ciphers: .opportunistic))
        let plain = try NegotiationRequest(try Self.decode(Frame(.negotiate, [
            "session": .uint(1), "socket": .fd(0), "role": .text("client"), "opportunistic": .bool(false)])))
        #expect(plain.role == .client(serverName: nil, policy: .none, caBundle: "default", ciphers: .strict))
    }

    @Test(arguments: [
        (["role": .text("server"), "policy": .text("pkix")], "attribute \"policy\" is only for role \"client\""),
        (["role": .text("server"), "opportunistic": .bool(true)], "attribute \"opportunistic\" is only for role \"client\""),
        (["role": .text("client"), "policy": .text("pkix"), "server-name": .text("mx.example.net"), "opportunistic": .bool(true)],
         "attribute \"opportunistic\" needs policy \"none\""),
        (["role": .text("client"), "policy": .text("pin"), "pins": .text(String(repeating: "ab", count: 32)),
          "opportunistic": .bool(true)], "attribute \"opportunistic\" needs policy \"none\""),
        (["role": .text("client"), "opportunistic": .text("yes")], "opportunistic"),
        (["role": .text("client"), "policy": .text("dane")], "attribute \"tlsa\" is required for policy \"dane\""),
        (["role": .text("client"), "policy": .text("pkix")], "policy \"pkix\" needs \"server-name\" or \"match-names\""),
        (["role": .text("client"), "policy": .text("pin"), "pins": .text("ABCD")], "attribute \"pins\": must be a comma-separated list"),
        (["role": .text("client"), "tlsa": .bytes([3, 1, 1, 0, 2, 1])], "attribute \"tlsa\": TLSA record 1 runs past the end"),
        (["role": .text("client"), "server-name": .text("mx example")], "not a DNS host name"),
        (["role": .text("peer")], "must be server or client"),
        (["role": .text("server"), "handshake-timeout": .uint(0)], "must be 1..3600"),
    ] as [([String: AttributeValue], String)])
    func rejected(_ extra: [String: AttributeValue], _ message: String) {
        var frame = Frame(.negotiate, ["session": .uint(1), "socket": .fd(0)])
        for (k, v) in extra.sorted(by: { $0.key < $1.key }) { frame.set(k, v) }
        do {
            _ = try Self.decode(frame)
            Issue.record("accepted: \(frame)")
        } catch {
            #expect("\(error)".contains(message), "\(error)")
        }
    }
}
