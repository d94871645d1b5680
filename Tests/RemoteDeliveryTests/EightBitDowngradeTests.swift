// RFC 6152 section 3 through the agent: an 8-bit message (BODY=8BITMIME) to
// a real loopback server (TestSink) that does not offer 8BITMIME is
// converted to 7 bit (MailMessage's MIMEDowngrade) by default, sent
// unchanged or bounced by configuration, and left alone for a server that
// offers 8BITMIME.

import StageProtocol
import Testing
import SMTP
@testable import RemoteDelivery

private let eightBitMessage = """
    MIME-Version: 1.0\r
    Subject: downgrade\r
    Content-Type: text/plain; charset=utf-8\r
    Content-Transfer-Encoding: 8bit\r
    \r
    Grüße = Größe\r

    """

private func table(_ sink: TestSink) -> TransportTable {
    TransportTable(entries: [TransportEntry(key: "dest.test", nextHop: .host(sink.address, port: sink.port))])
}

private func eightBitJob(_ body: String = eightBitMessage) -> DeliveryJob {
    var job = makeJob(to: ["b@dest.test"], body: body, nexthop: "dest.test")
    job.bodyType = "8BITMIME"
    return job
}

private func without8BITMIME() -> SinkScript {
    var script = SinkScript()
    script.ehlo = ["250-sink.test", "250-PIPELINING", "250-SIZE 10240000", "250 ENHANCEDSTATUSCODES"]
    return script
}

@Suite struct EightBitDowngradeTests {
    @Test func convertedForAHostWithout8BITMIME() async throws {
        let sink = try TestSink(script: without8BITMIME())
        defer { sink.stop() }
        let f = AgentFixture(transports: table(sink))
        let results = await f.deliver(eightBitJob())
        await f.shutdown()

        #expect(results.map(\.status) == [.sent])
        let m = try #require(sink.messages.first)
        let expected = Array("""
            MIME-Version: 1.0\r
            Subject: downgrade\r
            Content-Type: text/plain; charset=utf-8\r
            Content-Transfer-Encoding: quoted-printable\r
            \r
            Gr=C3=BC=C3=9Fe =3D Gr=C3=B6=C3=9Fe\r
            .\r

            """.utf8)
        #expect(m.raw == expected)
        #expect(m.raw.allSatisfy { $0 < 0x80 })
        // SIZE= is the converted size (without the terminating dot); no BODY=.
        let mail = try #require(sink.commands.first { $0.hasPrefix("MAIL FROM:") })
        #expect(mail == "MAIL FROM:<sender@origin.test> SIZE=\(expected.count - 3)")
        let line = try #require(f.logs.all.first { $0.contains("to=<b@dest.test>") })
        #expect(line.hasSuffix(", status=sent (250 2.0.0 Ok: queued as SINK1), tls=none, notes=(8-bit content converted to quoted-printable for a host without 8BITMIME)"))
    }

    @Test func unchangedForAHostWith8BITMIME() async throws {
        let sink = try TestSink()
        defer { sink.stop() }
        let f = AgentFixture(transports: table(sink))
        let results = await f.deliver(eightBitJob())
        await f.shutdown()

        #expect(results.map(\.status) == [.sent])
        #expect(sink.messages.first?.raw == Array((eightBitMessage + ".\r\n").utf8))
        #expect(sink.commands.contains("MAIL FROM:<sender@origin.test> SIZE=\(eightBitMessage.utf8.count) BODY=8BITMIME"))
        #expect(f.logs.all.first { $0.contains("to=<b@dest.test>") }?.contains("notes=") == false)
    }

    @Test func binaryContentBouncesWith563() async throws {
        let sink = try TestSink(script: without8BITMIME())
        defer { sink.stop() }
        let f = AgentFixture(transports: table(sink))
        let body = "MIME-Version: 1.0\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: binary\r\n\r\n\u{89}PNG\r\n"
        let results = await f.deliver(eightBitJob(body))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .bounced)
        #expect(r.dsn == "5.6.3")
        #expect(r.text == "8-bit data in a image/png part with Content-Transfer-Encoding: binary cannot be converted to 7 bit (host does not offer 8BITMIME)")
        #expect(sink.messages.isEmpty)
        #expect(!sink.commands.contains { $0.hasPrefix("MAIL") })
    }

    @Test(arguments: [SMTPEightBitPolicy.send, .bounce])
    func otherPoliciesByConfiguration(_ policy: SMTPEightBitPolicy) async throws {
        let sink = try TestSink(script: without8BITMIME())
        defer { sink.stop() }
        let f = AgentFixture(transports: table(sink)) { $0.eightBitWithout8BITMIME = policy }
        let results = await f.deliver(eightBitJob())
        await f.shutdown()

        switch policy {
        case .send:
            #expect(results.map(\.status) == [.sent])
            #expect(sink.messages.first?.raw == Array((eightBitMessage + ".\r\n").utf8))
            #expect(f.logs.all.contains { $0.hasSuffix("notes=(8-bit content sent unchanged to a host that does not offer 8BITMIME)") })
        default:
            #expect(results.map(\.dsn) == ["5.6.3"])
            #expect(sink.messages.isEmpty)
        }
    }
}
