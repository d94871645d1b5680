import Glibc
import SealpostConfig
import StageProtocol
import Testing
@testable import CryptoNegotiation
@testable import TLS

@Suite struct ConfigurationTests {
    @Test func fullFile() throws {
        let c = try TLSConfiguration.parse(text: """
            [tls]
            ca_file = "ca.pem"
            protocols = ["TLSv1.3"]
            session_tickets = false
            handshake_timeout = "30s"
            idle_timeout = "5m"
            [tls.ca_bundles]
            mta-sts = "/etc/sealpost/sts.pem"
            [[tls.certificate]]
            cert = "ec.pem"
            key = "ec.key"
            [[tls.certificate]]
            cert = "/abs/rsa.pem"
            key = "/abs/rsa.key"
            names = ["MX.Example.org", "*.example.org"]
            """, file: "/etc/sealpost/tls.toml")
        #expect(c.server.certificates == [
            CertificateKeyPair(certificateFile: "/etc/sealpost/ec.pem", keyFile: "/etc/sealpost/ec.key"),
            CertificateKeyPair(certificateFile: "/abs/rsa.pem", keyFile: "/abs/rsa.key", names: ["mx.example.org", "*.example.org"]),
        ])
        #expect(c.server.common.protocols == [.tls13])
        #expect(c.common.protocols == [.tls13])
        #expect(!c.server.sessionTickets)
        #expect(c.caBundles == ["default": "/etc/sealpost/ca.pem", "mta-sts": "/etc/sealpost/sts.pem"])
        #expect(c.timeouts == RelayTimeouts(handshake: 30, idle: 300))
    }

    @Test func defaults() throws {
        let c = try TLSConfiguration.parse(text: "[tls]\n", file: "/x/tls.toml")
        #expect(c.server.certificates.isEmpty)
        #expect(c.server.common.protocols == [.tls12, .tls13])
        #expect(c.server.sessionTickets)
        #expect(c.timeouts == RelayTimeouts())
    }

    @Test(arguments: [
        ("[tls]\nprotocol = []", "tls.protocol: unknown key"),
        ("[tls]\nprotocols = [\"TLSv1.1\"]", "tls.protocols: unknown protocol TLSv1.1"),
        ("[tls]\n[[tls.certificate]]\ncert = \"a\"", "tls.certificate[0].key: missing"),
        ("[tls]\n[[tls.certificate]]\ncert = \"a\"\nkey = \"b\"\nnames = [\"bad name\"]", "tls.certificate[0].names: not a host name"),
        ("[tls]\nidle_timeout = \"5x\"", "tls.idle_timeout: not a duration"),
        ("[smtp]\n", "smtp: unknown section"),
        ("", "tls: missing section [tls]"),
    ])
    func rejected(_ text: String, _ message: String) {
        do {
            _ = try TLSConfiguration.parse(text: text, file: "tls.toml")
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.description.contains(message), "\(error.description)")
        }
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
                                  caBundle: "default"))
    }

    @Test func clientPKIXWithNamesAndPins() throws {
        let r = try NegotiationRequest(try Self.decode(Frame(.negotiate, [
            "session": .uint(1), "socket": .fd(0), "role": .text("client"), "server-name": .text("mx.example.net"),
            "policy": .text("pkix"), "match-names": .text("example.net,mx.example.net"), "ca": .text("mta-sts")])))
        #expect(r.role == .client(serverName: "mx.example.net", policy: .pkix(names: ["example.net", "mx.example.net"]),
                                  caBundle: "mta-sts"))
        let pin = String(repeating: "ab", count: 32)
        let p = try NegotiationRequest(try Self.decode(Frame(.negotiate, [
            "session": .uint(1), "socket": .fd(0), "role": .text("client"), "policy": .text("pin"), "pins": .text(pin)])))
        #expect(p.role == .client(serverName: nil, policy: .pin(spkiSHA256: [Array(repeating: 0xab, count: 32)]), caBundle: "default"))
    }

    @Test(arguments: [
        (["role": .text("server"), "policy": .text("pkix")], "attribute \"policy\" is only for role \"client\""),
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
