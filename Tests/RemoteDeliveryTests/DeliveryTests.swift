// The agent against real SMTP servers on loopback (TestSink): results per
// recipient, MX/address fail-over, deferrals and bounces with the reply
// quoted, bytes on the wire, connection reuse, DNS outcomes.

import StageProtocol
import Synchronization
import Testing
import SMTP
@testable import RemoteDelivery

private func hostTable(_ domain: String, _ sink: TestSink) -> TransportTable {
    TransportTable(entries: [TransportEntry(key: domain, nextHop: .host(sink.address, port: sink.port))])
}

private func mxTable(_ domain: String, port: Int) -> TransportTable {
    TransportTable(entries: [TransportEntry(key: domain, nextHop: .mailExchangers(domain, port: port))])
}

@Suite struct DeliveryTests {
    @Test func delivered() async throws {
        let sink = try TestSink()
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink))
        let results = await f.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(results.count == 1)
        #expect(r.status == .sent)
        #expect(r.dsn == "2.0.0")
        #expect(r.text == "250 2.0.0 Ok: queued as SINK1")
        #expect(r.relay == "127.0.0.1[127.0.0.1]:\(sink.port)")
        #expect(r.tls == .none)
        let m = try #require(sink.messages.first)
        #expect(m.mailFrom == "sender@origin.test")
        #expect(m.rcptTo == ["b@dest.test"])
        #expect(m.raw == Array("Subject: test\r\n\r\nHello.\r\n.\r\n".utf8))
        #expect(sink.commands.first == "EHLO client.test")
        let line = try #require(f.logs.all.first { $0.contains("to=<b@dest.test>") })
        #expect(line.hasPrefix("4F3A2B1C5D6E: to=<b@dest.test>, relay=127.0.0.1[127.0.0.1]:\(sink.port), delay="))
        #expect(line.hasSuffix(", dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as SINK1), tls=none"))
    }

    @Test func firstAddressRefusesSecondWorks() async throws {
        let sink = try TestSink(address: "127.0.0.3")
        defer { sink.stop() }
        // Nothing listens on 127.0.0.2 at that port: connection refused.
        let resolver = StaticMailExchangerResolver(
            mx: ["dest.test": .exchangers([MailExchanger(preference: 10, host: "mx.dest.test")], secure: false)],
            hosts: ["mx.dest.test": .addresses(["127.0.0.2", "127.0.0.3"], secure: false)])
        let f = AgentFixture(resolver: resolver, transports: mxTable("dest.test", port: sink.port))
        let results = await f.deliver(makeJob(to: ["b@dest.test", "c@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        #expect(results.map(\.status) == [.sent, .sent])
        #expect(results.allSatisfy { $0.relay == "mx.dest.test[127.0.0.3]:\(sink.port)" })
        #expect(sink.messages.count == 1)
        #expect(sink.messages.first?.rcptTo == ["b@dest.test", "c@dest.test"])
    }

    @Test func refusedGreetingMovesToTheNextMX() async throws {
        let bad = try TestSink(address: "127.0.0.4", script: SinkScript(greeting: "554 5.7.1 No service for you"))
        defer { bad.stop() }
        let good = try TestSink(address: "127.0.0.5", port: bad.port)
        defer { good.stop() }
        let resolver = StaticMailExchangerResolver(
            mx: ["dest.test": .exchangers([MailExchanger(preference: 20, host: "backup.dest.test"),
                                           MailExchanger(preference: 10, host: "primary.dest.test")], secure: false)],
            hosts: ["primary.dest.test": .addresses(["127.0.0.4"], secure: false),
                    "backup.dest.test": .addresses(["127.0.0.5"], secure: false)])
        let f = AgentFixture(resolver: resolver, transports: mxTable("dest.test", port: bad.port))
        let results = await f.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        #expect(bad.connections == 1)
        #expect(results.first?.status == .sent)
        #expect(results.first?.relay == "backup.dest.test[127.0.0.5]:\(bad.port)")
    }

    @Test func everyAddressFailingDefersWithTheLastError() async throws {
        let bad = try TestSink(address: "127.0.0.6", script: SinkScript(greeting: "421 4.3.2 Too busy"))
        defer { bad.stop() }
        let resolver = StaticMailExchangerResolver(
            mx: ["dest.test": .exchangers([MailExchanger(preference: 10, host: "mx.dest.test")], secure: false)],
            hosts: ["mx.dest.test": .addresses(["127.0.0.2", "127.0.0.6"], secure: false)])
        let f = AgentFixture(resolver: resolver, transports: mxTable("dest.test", port: bad.port))
        let results = await f.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .deferred)
        #expect(r.dsn == "4.3.2")
        #expect(r.text.contains("421 4.3.2 Too busy"))
        #expect(r.relay == "mx.dest.test[127.0.0.6]:\(bad.port)")
        #expect(r.remoteMTA == "mx.dest.test")
    }

    @Test func nothingListeningDefersWithTheConnectError() async throws {
        let resolver = StaticMailExchangerResolver(
            mx: ["dest.test": .exchangers([MailExchanger(preference: 10, host: "mx.dest.test")], secure: false)],
            hosts: ["mx.dest.test": .addresses(["127.0.0.2"], secure: false)])
        // A port from a sink that is stopped at once: nothing listens there.
        let gone = try TestSink(address: "127.0.0.2")
        gone.stop()
        let f = AgentFixture(resolver: resolver, transports: mxTable("dest.test", port: gone.port))
        let results = await f.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .deferred)
        #expect(r.dsn == "4.4.1")
        #expect(r.text == "connect to mx.dest.test[127.0.0.2]:\(gone.port): Connection refused")
        #expect(r.relay == nil)
    }

    @Test func temporaryRefusalDefers() async throws {
        var script = SinkScript()
        script.rcpt = { $0.hasPrefix("busy") ? "450 4.2.0 <\($0)>: Mailbox busy" : "250 2.1.5 Ok" }
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink))
        let results = await f.deliver(makeJob(to: ["busy@dest.test", "ok@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        #expect(results.count == 2)
        let busy = try #require(results.first { $0.index == 0 })
        #expect(busy.status == .deferred)
        #expect(busy.dsn == "4.2.0")
        #expect(busy.text == "host 127.0.0.1[127.0.0.1] said: 450 4.2.0 <busy@dest.test>: Mailbox busy (in reply to RCPT TO command)")
        #expect(results.first { $0.index == 1 }?.status == .sent)
        #expect(sink.messages.first?.rcptTo == ["ok@dest.test"])
    }

    @Test func permanentRefusalBouncesWithTheReplyQuoted() async throws {
        var script = SinkScript()
        script.rcpt = { "550 5.1.1 <\($0)>: Recipient address rejected: User unknown" }
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink))
        let results = await f.deliver(makeJob(to: ["nobody@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .bounced)
        #expect(r.dsn == "5.1.1")
        #expect(r.remoteMTA == "127.0.0.1")
        #expect(r.diagnostic == "550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown")
        #expect(r.text.contains("said: 550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown (in reply to RCPT TO command)"))
        #expect(sink.messages.isEmpty)
        #expect(f.logs.all.contains { $0.contains("status=bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1") })
    }

    @Test func refusedMessageBouncesEveryRecipient() async throws {
        var script = SinkScript()
        script.dataEnd = "554 5.7.1 Message rejected: spam"
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink))
        let results = await f.deliver(makeJob(to: ["a@dest.test", "b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        #expect(results.map(\.status) == [.bounced, .bounced])
        #expect(results.allSatisfy { $0.dsn == "5.7.1" && $0.diagnostic == "554 5.7.1 Message rejected: spam" })
        #expect(results.allSatisfy { $0.text.hasSuffix("(in reply to end of DATA command)") })
    }

    @Test func hangUpAfterTheDotDefers() async throws {
        var script = SinkScript()
        script.hangUpAfterDot = true
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink))
        let results = await f.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .deferred)
        #expect(r.dsn.hasPrefix("4."))
        #expect(r.text.contains("lost connection"))
        #expect(sink.messages.count == 1)
    }

    @Test func bodyArrivesWithCRLFAndDotStuffing() async throws {
        let sink = try TestSink()
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink))
        var job = makeJob(to: ["b@dest.test"], nexthop: "dest.test")
        // Bare LF, bare CR, a CR LF split over two chunks, leading dots (one
        // at a chunk boundary), a lone "." line, and no final line end.
        job.body = [Array("Subject: dots\n\n.leading\r".utf8), Array("\n..two\rbare cr\n.".utf8),
                    Array("\n.\r\nlast".utf8)]
        job.size = UInt64(job.body.reduce(0) { $0 + $1.count })
        let results = await f.deliver(job)
        await f.shutdown()

        #expect(results.first?.status == .sent)
        let raw = try #require(sink.messages.first).raw
        let expected = "Subject: dots\r\n\r\n..leading\r\n...two\r\nbare cr\r\n..\r\n..\r\nlast\r\n.\r\n"
        #expect(String(decoding: raw, as: UTF8.self) == expected)
    }

    @Test func connectionIsReusedForTheNextJob() async throws {
        let sink = try TestSink()
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink)) { $0.connectionCacheTime = 60 }
        let first = await f.deliver(makeJob(1, to: ["a@dest.test"], nexthop: "dest.test"))
        let second = await f.deliver(makeJob(2, to: ["b@dest.test"], nexthop: "dest.test"))
        let cached = try await f.agent.eventLoop.submit { f.agent.idleConnectionCount }.get()
        await f.shutdown()

        #expect(first.first?.status == .sent)
        #expect(second.first?.status == .sent)
        #expect(sink.connections == 1)
        #expect(sink.messages.map(\.rcptTo) == [["a@dest.test"], ["b@dest.test"]])
        #expect(sink.commands.filter { $0.hasPrefix("EHLO") }.count == 1)
        #expect(cached == 1)
    }

    /// A large message to a slow receiver: the end-of-data reply's timeout
    /// starts once the body is on the wire; meanwhile each block of data
    /// has its own (here every phase is capped at 3 s, and the transfer
    /// takes longer, in steady progress). It timed out while the body was
    /// still being sent.
    @Test func aSlowReceiverGetsTheWholeBody() async throws {
        var script = SinkScript()
        // At most about 12 MB/s: the 60 MB take longer than the capped
        // timeout (which the body's writes must renew), while the client's
        // socket buffer (up to 4 MB) drains well within it once the last
        // write is out, even at a ninth of that pace on a busy machine.
        script.dataReadPause = (bytes: 65536, microseconds: 5_000)
        script.ehlo = ["250-sink.test", "250-PIPELINING", "250-SIZE 67108864", "250-8BITMIME", "250 ENHANCEDSTATUSCODES"]
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink)) {
            $0.maximumPhaseTimeout = 3
            $0.maximumMessageSize = 64 << 20
        }
        var job = makeJob(to: ["a@dest.test"], nexthop: "dest.test")
        let line = Array(String(repeating: "x", count: 998).utf8) + [13, 10]
        let chunk = Array((0..<256).map { _ in line }.joined())   // 256 KiB
        job.body = [Array("Subject: large\r\n\r\n".utf8)] + Array(repeating: chunk, count: 240)   // 60 MB
        job.size = UInt64(job.body.reduce(0) { $0 + $1.count })
        let results = await f.deliver(job)
        await f.shutdown()
        #expect(results.first?.status == .sent, "\(String(describing: results.first))")
        #expect(sink.messages.first.map { $0.raw.count } ?? 0 > 60_000_000)
    }

    /// A server that sends its reply a byte at a time, each well within
    /// the (here 2 s) timeout, does not renew it: the timeout bounds the
    /// whole reply. Renewed by every byte, this greeting would have
    /// completed after some 25 s and the message gone through.
    @Test func aReplyDrippedByteByByteTimesOut() async throws {
        var script = SinkScript()
        script.greeting = "220 " + String(repeating: "x", count: 46)
        script.greetingDrip = 500_000
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink)) { $0.maximumPhaseTimeout = 2 }
        let results = await f.deliver(makeJob(to: ["a@dest.test"], nexthop: "dest.test"))
        await f.shutdown()
        #expect(results.first?.status == .deferred, "\(String(describing: results.first))")
        #expect(results.first?.text.contains("timed out") == true, "\(String(describing: results.first))")
        #expect(sink.messages.isEmpty)
    }

    /// REQUIRETLS (RFC 8689 section 4.2.1): an MX host from an answer
    /// that was not DNSSEC-validated could be an attacker's, whatever
    /// certificate it shows; not tried. A host-specific 5.7.30 (another
    /// MX may qualify), so a bounce when none does.
    @Test func requireTLSNeedsADNSSECValidatedMX() async throws {
        let sink = try TestSink()
        defer { sink.stop() }
        let resolver = StaticMailExchangerResolver(
            mx: ["dest.test": .exchangers([MailExchanger(preference: 10, host: "mx.dest.test")], secure: false)],
            hosts: ["mx.dest.test": .addresses(["127.0.0.1"], secure: true)])
        let f = AgentFixture(resolver: resolver, transports: mxTable("dest.test", port: sink.port))
        var job = makeJob(to: ["a@dest.test", "b@dest.test"], nexthop: "dest.test")
        job.requireTLS = true
        let results = await f.deliver(job)
        // The same message without REQUIRETLS goes out (the route works).
        let plain = await f.deliver(makeJob(2, to: ["c@dest.test"], nexthop: "dest.test"))
        await f.shutdown()
        #expect(results.map(\.status) == [.bounced, .bounced], "\(results)")
        #expect(results.allSatisfy { $0.dsn == "5.7.30" && $0.text.contains("not found by a DNSSEC-validated lookup") })
        #expect(plain.first?.status == .sent)
        #expect(sink.messages.count == 1 && sink.messages.first?.rcptTo == ["c@dest.test"])
    }

    @Test func nullMXBouncesAtOnce() async throws {
        let f = AgentFixture(resolver: StaticMailExchangerResolver(mx: ["null.test": .nullMX]))
        let results = await f.deliver(makeJob(to: ["a@null.test"], nexthop: "null.test"))
        await f.shutdown()
        #expect(results.first?.status == .bounced)
        #expect(results.first?.dsn == "5.1.10")
        #expect(results.first?.relay == nil)
        #expect(f.logs.all.first?.contains("relay=none") == true)
    }

    @Test func nonexistentDomainBounces() async throws {
        let f = AgentFixture(resolver: StaticMailExchangerResolver())
        let results = await f.deliver(makeJob(to: ["a@nowhere.test"], nexthop: "nowhere.test"))
        await f.shutdown()
        #expect(results.first?.status == .bounced)
        #expect(results.first?.dsn == "5.1.2")
    }

    @Test func dnsFailureDefers() async throws {
        let f = AgentFixture(resolver: StaticMailExchangerResolver(mx: ["broken.test": .temporaryFailure("SERVFAIL for broken.test/MX")]))
        let results = await f.deliver(makeJob(to: ["a@broken.test", "b@broken.test"], nexthop: "broken.test"))
        await f.shutdown()
        #expect(results.map(\.status) == [.deferred, .deferred])
        #expect(results.allSatisfy { $0.dsn == "4.4.3" && $0.text == "SERVFAIL for broken.test/MX" })
    }

    @Test func localTransportEntryDefersAsMisrouted() async throws {
        let f = AgentFixture(transports: TransportTable(entries: [TransportEntry(key: "here.test", nextHop: .local, origin: "transport:3")]))
        let results = await f.deliver(makeJob(to: ["a@here.test"], nexthop: "here.test"))
        await f.shutdown()
        #expect(results.first?.status == .deferred)
        #expect(results.first?.dsn == "4.3.5")
        #expect(results.first?.text.contains("transport:3") == true)
    }

    @Test func requiredTLSWithoutATLSServiceDefers() async throws {
        var script = SinkScript()
        script.ehlo = ["250-sink.test", "250-PIPELINING", "250 STARTTLS"]
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let table = TransportTable(entries: [TransportEntry(key: "dest.test", nextHop: .host("127.0.0.1", port: sink.port), tls: .encrypt)])
        let f = AgentFixture(transports: table)
        let results = await f.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()
        let r = try #require(results.first)
        #expect(r.status == .deferred)
        #expect(r.dsn.hasPrefix("4.7."))
        #expect(sink.messages.isEmpty)
        #expect(!sink.commands.contains { $0.hasPrefix("MAIL") })
    }

    @Test func offeredSTARTTLSIsSkippedWithoutATLSService() async throws {
        var script = SinkScript()
        script.ehlo = ["250-sink.test", "250-PIPELINING", "250 STARTTLS"]
        let sink = try TestSink(script: script)
        defer { sink.stop() }
        let f = AgentFixture(transports: hostTable("dest.test", sink))
        let results = await f.deliver(makeJob(to: ["b@dest.test"], nexthop: "dest.test"))
        await f.shutdown()
        #expect(results.first?.status == .sent)
        #expect(results.first?.tls == TLSOutcome.none)
        #expect(!sink.commands.contains("STARTTLS"))
    }
}

/// Routing decisions that need no server: mail that would come back to
/// this host, address literals, next hops from the transport table.
@Suite struct RoutingEdgeTests {
    let hosts: [String: AddressLookupResult] = [
        "mx1.b.test": .addresses(["192.0.2.1"], secure: false),
        "mx3.b.test": .addresses(["192.0.2.3"], secure: false),
        "client.test": .addresses(["192.0.2.2"], secure: false),
    ]

    /// RFC 5321 5.1: a backup MX (this host, by its name) tries only the
    /// hosts preferred over it, and without one the mail loops back to
    /// myself (5.4.6) instead of being sent to our own listener.
    @Test func anMXThatIsThisHostEndsTheList() async throws {
        let resolver = StaticMailExchangerResolver(mx: [
            "b.test": .exchangers([MailExchanger(preference: 10, host: "mx1.b.test"),
                                   MailExchanger(preference: 20, host: "client.test"),
                                   MailExchanger(preference: 30, host: "mx3.b.test")], secure: false),
            "primary.test": .exchangers([MailExchanger(preference: 10, host: "client.test"),
                                         MailExchanger(preference: 20, host: "mx3.b.test")], secure: false),
        ], hosts: hosts)
        let route = try await RoutePlanner.route(.mailExchangers("b.test", port: 25), resolver: resolver, preference: .any,
                                                 myHostnames: ["Client.Test."]).get()
        #expect(route.candidates.map(\.host) == ["mx1.b.test"])
        guard case .failure(let failure) = await RoutePlanner.route(.mailExchangers("primary.test", port: 25), resolver: resolver,
                                                                    preference: .any, myHostnames: ["client.test"]) else {
            Issue.record("primary.test: routed to itself")
            return
        }
        #expect(failure.permanent && failure.status == EnhancedStatus(5, 4, 6) && failure.text.contains("loops back to myself"))
        // Without our name among the MX hosts, nothing changes.
        let all = try await RoutePlanner.route(.mailExchangers("b.test", port: 25), resolver: resolver, preference: .any,
                                               myHostnames: ["other.test"]).get()
        #expect(all.candidates.map(\.host) == ["mx1.b.test", "client.test", "mx3.b.test"])
    }

    /// A domain with a thousand MX hosts: only the 20 most preferred are
    /// looked up (each lookup could take the resolver's timeout); this
    /// host's own entry far down the list (by name) leaves them all.
    @Test func onlyTheMostPreferredMXHostsAreLookedUp() async throws {
        final class Counting: MailExchangerResolver, @unchecked Sendable {
            let lookups = Mutex(0)
            func mailExchangers(of domain: String) async -> MXLookupResult {
                var list = (0..<1000).map { MailExchanger(preference: 10 + $0, host: "mx\($0).many.test") }
                list.append(MailExchanger(preference: 5000, host: "client.test"))
                return .exchangers(list.reversed(), secure: false)
            }
            func addresses(of host: String) async -> AddressLookupResult {
                lookups.withLock { $0 += 1 }
                return .addresses(["192.0.2.\(host.count)"], secure: false)
            }
        }
        let resolver = Counting()
        let route = try await RoutePlanner.route(.mailExchangers("many.test", port: 25), resolver: resolver, preference: .any,
                                                 myHostnames: ["client.test"]).get()
        #expect(resolver.lookups.withLock { $0 } == RoutePlanner.exchangerLimit)
        #expect(route.candidates.map(\.host) == (0..<RoutePlanner.exchangerLimit).map { "mx\($0).many.test" })
    }

    /// This host is also recognized by where its listener answers (a
    /// short host name never equals an MX name): an MX whose address is
    /// one of ours ends the list, and a next hop that is ours (an address
    /// literal, say) is a loop, instead of mail sent to our own listener.
    @Test func anMXOrNextHopThatReachesOurListenerIsThisHost() async throws {
        let resolver = StaticMailExchangerResolver(mx: [
            "b.test": .exchangers([MailExchanger(preference: 10, host: "mx1.b.test"),
                                   MailExchanger(preference: 20, host: "backup.b.test")], secure: false),
            "only.test": .exchangers([MailExchanger(preference: 10, host: "backup.b.test")], secure: false),
        ], hosts: ["mx1.b.test": .addresses(["192.0.2.1"], secure: false),
                   "backup.b.test": .addresses(["192.0.2.2"], secure: false)])
        let ours = SelfRecognition(endpoints: [SelfRecognition.Endpoint("192.0.2.2:25")!])
        let route = try await RoutePlanner.route(.mailExchangers("b.test", port: 25), resolver: resolver, preference: .any,
                                                 isSelf: ours.isSelf).get()
        #expect(route.candidates.map(\.host) == ["mx1.b.test"])
        guard case .failure(let loop) = await RoutePlanner.route(.mailExchangers("only.test", port: 25), resolver: resolver,
                                                                 preference: .any, isSelf: ours.isSelf) else {
            Issue.record("only.test: routed to itself")
            return
        }
        #expect(loop.status == EnhancedStatus(5, 4, 6))
        // A wildcard listener is every local address, loopback included;
        // another port is another service.
        let wildcard = SelfRecognition(endpoints: [SelfRecognition.Endpoint("0.0.0.0:25")!, SelfRecognition.Endpoint("[::]:25")!])
        #expect(wildcard.isSelf("127.0.0.1", 25) && wildcard.isSelf("::1", 25) && !wildcard.isSelf("127.0.0.1", 2525))
        guard case .failure(let literal) = await RoutePlanner.route(RoutePlanner.defaultHop(for: "[127.0.0.1]"), resolver: resolver,
                                                                    preference: .any, isSelf: wildcard.isSelf) else {
            Issue.record("[127.0.0.1]: routed to itself")
            return
        }
        #expect(literal.permanent && literal.status == EnhancedStatus(5, 4, 6))
        // An AAAA record holding an IPv4-mapped address of ours
        // ("::ffff:192.0.2.2") reaches the IPv4 listener all the same.
        let mapped = StaticMailExchangerResolver(mx: [
            "mapped.test": .exchangers([MailExchanger(preference: 10, host: "mx1.b.test"),
                                        MailExchanger(preference: 20, host: "sneaky.b.test")], secure: false),
            "sneaky.test": .exchangers([MailExchanger(preference: 10, host: "sneaky.b.test")], secure: false),
        ], hosts: ["mx1.b.test": .addresses(["::ffff:192.0.2.1"], secure: false),
                   "sneaky.b.test": .addresses(["::ffff:c000:202"], secure: false)])
        let kept = try await RoutePlanner.route(.mailExchangers("mapped.test", port: 25), resolver: mapped, preference: .any,
                                                isSelf: ours.isSelf).get()
        #expect(kept.candidates.map(\.host) == ["mx1.b.test"] && kept.candidates.map(\.address) == ["192.0.2.1"])
        guard case .failure(let mappedLoop) = await RoutePlanner.route(.mailExchangers("sneaky.test", port: 25), resolver: mapped,
                                                                       preference: .any, isSelf: ours.isSelf) else {
            Issue.record("sneaky.test: routed to itself through an IPv4-mapped address")
            return
        }
        #expect(mappedLoop.status == EnhancedStatus(5, 4, 6))
        #expect(SelfRecognition.Endpoint("[2001:db8::1]:587") == SelfRecognition.Endpoint(host: "2001:db8::1", port: 587))
    }

    /// An address literal domain is that address (RFC 5321 4.1.3), no MX
    /// lookup, where it had been bounced as "domain not found".
    @Test func addressLiteralsAreNextHops() {
        #expect(RoutePlanner.defaultHop(for: "[192.0.2.1]") == .host("192.0.2.1", port: 25))
        #expect(RoutePlanner.defaultHop(for: "[IPv6:2001:db8::1]") == .host("2001:db8::1", port: 25))
        #expect(RoutePlanner.defaultHop(for: "[IPv6:::FFFF:192.0.2.9]") == .host("192.0.2.9", port: 25))
        #expect(RoutePlanner.defaultHop(for: "example.org") == .mailExchangers("example.org", port: 25))
        #expect(RoutePlanner.defaultHop(for: "[not an address]") == .mailExchangers("[not an address]", port: 25))
    }

    /// An SMTPUTF8 recipient in an internationalized domain: the domain is
    /// looked up (and matched in the transport table) by its A-labels; it
    /// bounced as "domain not found" before.
    @Test func anInternationalizedDomainIsLookedUpByItsALabels() async throws {
        var utf8 = SinkScript()
        utf8.ehlo = ["250-sink.test", "250-PIPELINING", "250-8BITMIME", "250-SMTPUTF8", "250 ENHANCEDSTATUSCODES"]
        let sink = try TestSink(script: utf8)
        defer { sink.stop() }
        let resolver = StaticMailExchangerResolver(
            mx: ["xn--bcher-kva.test": .exchangers([MailExchanger(preference: 10, host: "mx.xn--bcher-kva.test")], secure: false)],
            hosts: ["mx.xn--bcher-kva.test": .addresses(["127.0.0.1"], secure: false)])
        let table = TransportTable(entries: [TransportEntry(key: "xn--bcher-kva.test",
                                                            nextHop: .mailExchangers("xn--bcher-kva.test", port: sink.port))])
        let f = AgentFixture(resolver: resolver, transports: table)
        var job = makeJob(to: ["jörg@bücher.test"], nexthop: "bücher.test")
        job.smtputf8 = true
        let results = await f.deliver(job)
        await f.shutdown()
        #expect(results.first?.status == .sent, "\(String(describing: results.first))")
        #expect(sink.messages.first?.rcptTo == ["jörg@bücher.test"])
    }

    /// A next hop from the transport table that does not resolve is a
    /// configuration error: every message routed there would bounce.
    @Test func anUnresolvableTransportNextHopDefers() async throws {
        let table = TransportTable(entries: [TransportEntry(key: "*", nextHop: .host("smarthost.invalid", port: 587),
                                                            origin: "transport:7")])
        let f = AgentFixture(resolver: StaticMailExchangerResolver(hosts: ["smarthost.invalid": .noSuchHost("Host or domain name not found")]),
                             transports: table)
        let results = await f.deliver(makeJob(to: ["a@elsewhere.test"], nexthop: "elsewhere.test"))
        await f.shutdown()
        #expect(results.first?.status == .deferred)
        #expect(results.first?.dsn == "4.3.5")
        #expect(results.first?.text.contains("transport:7") == true)
    }

    /// A cached connection is taken before any lookup: a refusal that is
    /// this host's own (no SMTPUTF8 here) must still let the other MX
    /// hosts try, as it does on a fresh route.
    @Test func aCachedConnectionsHostSpecificRefusalTriesTheOtherMX() async throws {
        var plain = SinkScript()
        plain.ehlo = ["250-sink.test", "250-PIPELINING", "250-8BITMIME", "250 ENHANCEDSTATUSCODES"]
        let first = try TestSink(address: "127.0.0.1", script: plain)
        defer { first.stop() }
        var utf8 = SinkScript()
        utf8.ehlo = ["250-sink.test", "250-PIPELINING", "250-8BITMIME", "250-SMTPUTF8", "250 ENHANCEDSTATUSCODES"]
        let second = try TestSink(address: "127.0.0.2", port: first.port, script: utf8)
        defer { second.stop() }
        let resolver = StaticMailExchangerResolver(
            mx: ["u.test": .exchangers([MailExchanger(preference: 10, host: "mx1.u.test"),
                                        MailExchanger(preference: 20, host: "mx2.u.test")], secure: false)],
            hosts: ["mx1.u.test": .addresses(["127.0.0.1"], secure: false),
                    "mx2.u.test": .addresses(["127.0.0.2"], secure: false)])
        let table = TransportTable(entries: [TransportEntry(key: "u.test", nextHop: .mailExchangers("u.test", port: first.port))])
        let f = AgentFixture(resolver: resolver, transports: table) { $0.connectionCacheTime = 60 }
        let ascii = await f.deliver(makeJob(1, to: ["a@u.test"], nexthop: "u.test"))
        #expect(ascii.first?.status == .sent)
        var job = makeJob(2, to: ["b@u.test"], body: "Subject: caf\u{e9}\r\n\r\nHello.\r\n", nexthop: "u.test")
        job.smtputf8 = true
        let international = await f.deliver(job)
        await f.shutdown()
        #expect(international.first?.status == .sent, "\(String(describing: international.first))")
        #expect(second.messages.map(\.rcptTo) == [["b@u.test"]])
    }
}
