// Delivery routed by real DNS: the DNS module's libunbound resolver against
// the test bed (nsd serving the DNSSEC-signed dane.test, a validating
// unbound in front), and a sink listening on the MX host's address.

import StageProtocol
import DNSTestbed
import Testing
import DNS
import SMTP
@testable import RemoteDelivery

@Suite(.enabled(if: DNSTestbed.available, Comment(rawValue: DNSTestbed.unavailableReason)))
struct DNSRoutingTests {
    func adapter() throws -> UnboundMailExchangerResolver {
        UnboundMailExchangerResolver(try ResolverThread(try DNSTestbed.resolver()))
    }

    @Test func deliversToTheMXFoundInDNS() async throws {
        let resolver = try adapter()
        defer { resolver.thread.shutdown() }
        // mx1.dane.test is 127.0.0.21 (preference 10), mx2 127.0.0.22 (20).
        let sink = try TestSink(address: "127.0.0.21")
        defer { sink.stop() }
        let table = TransportTable(entries: [TransportEntry(key: "dane.test", nextHop: .mailExchangers("dane.test", port: sink.port))])
        let f = AgentFixture(resolver: resolver, transports: table)
        let results = await f.deliver(makeJob(to: ["user@dane.test"], nexthop: "dane.test"))
        await f.shutdown()

        let r = try #require(results.first)
        #expect(r.status == .sent)
        #expect(r.relay == "mx1.dane.test[127.0.0.21]:\(sink.port)")
        #expect(sink.messages.first?.rcptTo == ["user@dane.test"])
    }

    @Test func routeCarriesDNSSECStatus() async throws {
        let resolver = try adapter()
        defer { resolver.thread.shutdown() }
        let route = try await RoutePlanner.route(.mailExchangers("dane.test", port: 25), resolver: resolver, preference: .ipv6).get()
        #expect(route.mxSecure)
        #expect(route.candidates.map(\.description) == ["mx1.dane.test[127.0.0.21]:25", "mx2.dane.test[127.0.0.22]:25"])
        #expect(route.candidates.allSatisfy { $0.secure })
        let named = await resolver.addresses(of: "dual.dane.test")
        #expect(named == .addresses(["2001:db8::27", "127.0.0.27"], secure: true))
    }

    @Test func dnsOutcomesBecomeResults() async throws {
        let resolver = try adapter()
        defer { resolver.thread.shutdown() }
        let f = AgentFixture(resolver: resolver)
        let null = await f.deliver(makeJob(to: ["a@nullmx.dane.test"], nexthop: "nullmx.dane.test"))
        let nx = await f.deliver(makeJob(to: ["a@nosuch.dane.test"], nexthop: "nosuch.dane.test"))
        let noaddr = await f.deliver(makeJob(to: ["a@noaddr.dane.test"], nexthop: "noaddr.dane.test"))
        await f.shutdown()
        #expect(null.first?.status == .bounced)
        #expect(null.first?.dsn == "5.1.10")
        #expect(nx.first?.status == .bounced)
        #expect(nx.first?.dsn == "5.1.2")
        #expect(noaddr.first?.status == .bounced)
        #expect(noaddr.first?.dsn == "5.4.4")
    }
}
