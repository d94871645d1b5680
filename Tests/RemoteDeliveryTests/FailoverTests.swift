// A host's 4xx sends the recipients it refused to the next MX, as Postfix's
// smtp(8) does for every server but the last (RFC 5321 section 5.1): the
// agent against real SMTP servers on loopback (TestSink), one per MX host.

import StageProtocol
import Testing
import SMTP
@testable import RemoteDelivery

/// A sink per address, all on the first one's port, each with its script
/// (the last script for the rest).
private func mxSinks(_ addresses: [String], _ scripts: [SinkScript]) throws -> [TestSink] {
    var sinks: [TestSink] = []
    do {
        for (i, address) in addresses.enumerated() {
            sinks.append(try TestSink(address: address, port: sinks.first?.port ?? 0, script: scripts[min(i, scripts.count - 1)]))
        }
    } catch {
        sinks.forEach { $0.stop() }
        throw error
    }
    return sinks
}

/// MX hosts of `domain` in the order of `sinks` (preference 10, 20, ...),
/// mx1.DOMAIN at the first sink's address and so on; every sink listens
/// on the first one's port, which the transport table gives the domain.
private func mxFixture(_ domain: String, _ sinks: [TestSink], configure: (inout RemoteSettings) -> Void = { _ in }) -> AgentFixture {
    let exchangers = sinks.indices.map { MailExchanger(preference: 10 * ($0 + 1), host: "mx\($0 + 1).\(domain)") }
    var hosts: [String: AddressLookupResult] = [:]
    for (i, sink) in sinks.enumerated() { hosts["mx\(i + 1).\(domain)"] = .addresses([sink.address], secure: false) }
    let resolver = StaticMailExchangerResolver(mx: [domain: .exchangers(exchangers, secure: false)], hosts: hosts)
    let table = TransportTable(entries: [TransportEntry(key: domain, nextHop: .mailExchangers(domain, port: sinks[0].port))])
    return AgentFixture(resolver: resolver, transports: table, configure: configure)
}

/// A sink answering 4xx at one stage of the transaction.
struct RefusingStage: Sendable, CustomStringConvertible {
    var name: String
    var reply: String
    var phase: SMTPClientPhase
    var description: String { name }

    func script(_ reply: String? = nil) -> SinkScript {
        var s = SinkScript()
        let r = reply ?? self.reply
        switch name {
        case "MAIL": s.mail = r
        case "RCPT": s.rcpt = { _ in r }
        case "DATA": s.data = r
        default: s.dataEnd = r
        }
        return s
    }

    static let all = [
        RefusingStage(name: "MAIL", reply: "451 4.3.0 mx1 is busy", phase: .mailFrom),
        RefusingStage(name: "RCPT", reply: "450 4.2.1 mx1 greylists you", phase: .rcptTo),
        RefusingStage(name: "DATA", reply: "451 4.3.0 mx1 not now", phase: .dataInit),
        RefusingStage(name: "end of data", reply: "452 4.3.1 mx1 is out of space", phase: .dataTermination),
    ]
}

@Suite struct FailoverTests {
    /// The first MX refuses for now at one stage, the second takes the
    /// message: delivered there, the first's reply logged on the way.
    /// Without the failover the 4xx deferred the recipients at once.
    @Test(arguments: RefusingStage.all)
    func aTemporaryRefusalGoesOnToTheNextMX(stage: RefusingStage) async throws {
        let sinks = try mxSinks(["127.0.0.31", "127.0.0.32"], [stage.script(), SinkScript()])
        defer { sinks.forEach { $0.stop() } }
        let (first, second) = (sinks[0], sinks[1])
        let f = mxFixture("f1.test", sinks)
        let results = await f.deliver(makeJob(to: ["a@f1.test", "b@f1.test"], nexthop: "f1.test"))
        await f.shutdown()

        #expect(results.map(\.status) == [.sent, .sent], "\(results)")
        #expect(results.allSatisfy { $0.relay == "mx2.f1.test[127.0.0.32]:\(first.port)" })
        #expect(second.messages.map(\.rcptTo) == [["a@f1.test", "b@f1.test"]])
        #expect(first.connections == 1)
        #expect(first.commands.contains { $0.hasPrefix("MAIL FROM:") })
        let kept = f.logs.all.filter { $0.contains("kept for the next address") }
        #expect(kept == ["a@f1.test", "b@f1.test"].map {
            "4F3A2B1C5D6E: to=<\($0)>, relay=mx1.f1.test[127.0.0.31]:\(first.port), dsn=\(stage.reply.split(separator: " ")[1]), "
                + "kept for the next address (host mx1.f1.test[127.0.0.31] said: \(stage.reply) (\(stage.phase)))"
        })
        // One result line per recipient, after the line that kept it.
        let lines = f.logs.all
        #expect(lines.count == 4)
        #expect(lines.suffix(2).allSatisfy { $0.contains("relay=mx2.f1.test[127.0.0.32]") && $0.contains("status=sent") })
    }

    /// Every MX refuses for now: deferred with the last one's reply, as
    /// a failed connection to the last one always was.
    @Test(arguments: RefusingStage.all)
    func everyMXRefusingForNowDefersWithTheLastReply(stage: RefusingStage) async throws {
        let sinks = try mxSinks(["127.0.0.33", "127.0.0.34"], [stage.script(), stage.script("451 4.7.1 mx2 says later")])
        defer { sinks.forEach { $0.stop() } }
        let (first, second) = (sinks[0], sinks[1])
        let f = mxFixture("f2.test", sinks)
        let results = await f.deliver(makeJob(to: ["a@f2.test"], nexthop: "f2.test"))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .deferred)
        #expect(r.dsn == "4.7.1")
        #expect(r.text == "host mx2.f2.test[127.0.0.34] said: 451 4.7.1 mx2 says later (\(stage.phase))")
        #expect(r.relay == "mx2.f2.test[127.0.0.34]:\(first.port)")
        #expect(r.remoteMTA == "mx2.f2.test")
        #expect(first.connections == 1 && second.connections == 1)
        #expect(f.logs.all.count == 2)
        #expect(f.logs.all.first?.contains("relay=mx1.f2.test[127.0.0.33]:\(first.port), dsn=4.") == true)
        #expect(f.logs.all.last?.contains("status=deferred (host mx2.f2.test[127.0.0.34] said: 451 4.7.1 mx2 says later") == true)
    }

    /// A host that takes some recipients and defers others: the message
    /// goes to it for the ones it took, and the others go to the next MX
    /// in a transaction of their own; nobody gets it twice.
    @Test func recipientsAHostDefersGoToTheNextMXInATransactionOfTheirOwn() async throws {
        var partial = SinkScript()
        partial.rcpt = { $0.hasPrefix("later") ? "450 4.2.0 <\($0)>: Mailbox busy" : "250 2.1.5 Ok" }
        let sinks = try mxSinks(["127.0.0.35", "127.0.0.36"], [partial, SinkScript()])
        defer { sinks.forEach { $0.stop() } }
        let (first, second) = (sinks[0], sinks[1])
        let f = mxFixture("f3.test", sinks)
        let results = await f.deliver(makeJob(to: ["now@f3.test", "later@f3.test", "also@f3.test"], nexthop: "f3.test"))
        await f.shutdown()

        #expect(results.map(\.status) == [.sent, .sent, .sent])
        #expect(results.map { $0.relay?.hasPrefix("mx1.") == true } == [true, false, true])
        #expect(first.messages.map(\.rcptTo) == [["now@f3.test", "also@f3.test"]])
        #expect(second.messages.map(\.rcptTo) == [["later@f3.test"]])
        #expect(f.logs.all.filter { $0.contains("kept for the next address") }
                == ["4F3A2B1C5D6E: to=<later@f3.test>, relay=mx1.f3.test[127.0.0.35]:\(first.port), dsn=4.2.0, kept for the next address "
                    + "(host mx1.f3.test[127.0.0.35] said: 450 4.2.0 <later@f3.test>: Mailbox busy (in reply to RCPT TO command))"])
    }

    /// Postfix's smtp_mx_session_limit (2): the third MX is not sent the
    /// message after two that took a whole transaction to refuse it. The
    /// address limit (5) counts connections that failed too.
    @Test func theLimitsBoundTheHostsTried() async throws {
        let sinks = try mxSinks(["127.0.0.37", "127.0.0.38", "127.0.0.39"], [RefusingStage.all[0].script("451 4.3.0 busy")])
        defer { sinks.forEach { $0.stop() } }
        let f = mxFixture("f4.test", sinks)
        let results = await f.deliver(makeJob(to: ["a@f4.test"], nexthop: "f4.test"))
        await f.shutdown()
        #expect(results.first?.status == .deferred)
        #expect(results.first?.relay == "mx2.f4.test[127.0.0.38]:\(sinks[0].port)")
        #expect(sinks.map(\.connections) == [1, 1, 0])

        // Greetings refused: no session, so only the address limit counts.
        var refusing = SinkScript()
        refusing.greeting = "421 4.3.2 Too busy"
        let greeters = try mxSinks(["127.0.0.40", "127.0.0.41", "127.0.0.42"], [refusing])
        defer { greeters.forEach { $0.stop() } }
        let g = mxFixture("f5.test", greeters) { $0.mxAddressLimit = 2 }
        let deferred = await g.deliver(makeJob(to: ["a@f5.test"], nexthop: "f5.test"))
        await g.shutdown()
        #expect(deferred.first?.dsn == "4.3.2")
        #expect(greeters.map(\.connections) == [1, 1, 0])
        let h = mxFixture("f5.test", greeters) { $0.mxAddressLimit = 0 }
        _ = await h.deliver(makeJob(to: ["a@f5.test"], nexthop: "f5.test"))
        await h.shutdown()
        #expect(greeters.map(\.connections) == [2, 2, 1])
    }

    /// A cached connection comes before any lookup; when its host defers,
    /// the other MX hosts are tried, but not that host again on a new
    /// connection (Postfix leaves a cached session's address out too).
    @Test func aCachedConnectionsTemporaryRefusalTriesTheOtherMX() async throws {
        var greylisting = SinkScript()
        greylisting.rcpt = { $0.hasPrefix("grey") ? "450 4.2.1 greylisted" : "250 2.1.5 Ok" }
        let sinks = try mxSinks(["127.0.0.43", "127.0.0.44"], [greylisting, SinkScript()])
        defer { sinks.forEach { $0.stop() } }
        let (first, second) = (sinks[0], sinks[1])
        let f = mxFixture("f6.test", sinks) { $0.connectionCacheTime = 60 }
        let earlier = await f.deliver(makeJob(1, to: ["a@f6.test"], nexthop: "f6.test"))
        let later = await f.deliver(makeJob(2, to: ["grey@f6.test"], nexthop: "f6.test"))
        await f.shutdown()
        #expect(earlier.first?.status == .sent)
        #expect(later.first?.status == .sent, "\(later)")
        #expect(later.first?.relay == "mx2.f6.test[127.0.0.44]:\(first.port)")
        #expect(first.connections == 1 && second.connections == 1)
        #expect(first.commands.filter { $0.hasPrefix("MAIL") }.count == 2)
        #expect(second.messages.map(\.rcptTo) == [["grey@f6.test"]])
    }

    /// A host-specific bounce (here: no SMTPUTF8) from a later host does
    /// not outweigh an earlier host's 4xx: that host may take the message
    /// on the next attempt, so the recipient is deferred, not bounced.
    @Test func aLaterHostSpecificBounceDoesNotOutweighADeferral() async throws {
        var utf8 = SinkScript()
        utf8.ehlo = ["250-sink.test", "250-PIPELINING", "250-8BITMIME", "250-SMTPUTF8", "250 ENHANCEDSTATUSCODES"]
        utf8.mail = "451 4.3.0 mx1 is busy"
        let sinks = try mxSinks(["127.0.0.45", "127.0.0.46"], [utf8, SinkScript()])   // mx2: no SMTPUTF8
        defer { sinks.forEach { $0.stop() } }
        let second = sinks[1]
        let f = mxFixture("f7.test", sinks)
        var job = makeJob(to: ["b@f7.test"], body: "Subject: caf\u{e9}\r\n\r\nHello.\r\n", nexthop: "f7.test")
        job.smtputf8 = true
        let results = await f.deliver(job)
        await f.shutdown()
        let r = try #require(results.first)
        #expect(r.status == .deferred)
        #expect(r.text == "host mx1.f7.test[127.0.0.45] said: 451 4.3.0 mx1 is busy (in reply to MAIL FROM command)")
        #expect(second.connections == 1 && second.messages.isEmpty)
    }
}
