/// The resolver pumped by its own thread, used with async/await.
import DNSTestbed
import Testing
import DNS

@Suite(.enabled(if: DNSTestbed.available, Comment(rawValue: DNSTestbed.unavailableReason)))
struct ResolverThreadTests {
    @Test func concurrentAsyncLookups() async throws {
        let service = try ResolverThread(DNSTestbed.resolver())
        defer { service.shutdown() }
        async let mx = service.resolveMailExchangers("dane.test")
        async let tlsa = service.resolve("_25._tcp.mx2.dane.test", .tlsa)
        async let bogus = service.resolve("_25._tcp.mxbogus.dane.test", .tlsa)
        guard case .exchangers(let exchangers, .secure, false) = await mx else {
            Issue.record("expected secure exchangers")
            return
        }
        #expect(exchangers.map(\.host) == ["mx1.dane.test", "mx2.dane.test"])
        let tlsaAnswer = try await tlsa
        #expect(tlsaAnswer.status == .secure)
        #expect(try tlsaAnswer.tlsaRecords().first?.usage == 2)
        #expect(try await bogus.status.isBogus)
    }

    @Test func asyncDeadline() async throws {
        let silent = try SilentServer()
        defer { silent.close() }
        let service = try ResolverThread(Resolver(ResolverConfiguration(
            forwarders: ["127.0.0.1@\(silent.port)"], rootTrustAnchorFile: "/nonexistent/root.key",
            resolveReservedZones: ["test"], timeout: .seconds(30))))
        defer { service.shutdown() }
        // The per-query deadline, shorter than the default, wins.
        await #expect(throws: DNSError.timeout(name: "dane.test", type: .a)) {
            try await service.resolve("dane.test", .a, timeout: .milliseconds(200))
        }
    }
}
