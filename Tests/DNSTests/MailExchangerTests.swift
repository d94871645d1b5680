/// RFC 5321 5.1 / RFC 7505 routing against the test bed.
import DNSTestbed
import Testing
import DNS

@Suite(.enabled(if: DNSTestbed.available, Comment(rawValue: DNSTestbed.unavailableReason)))
struct MailExchangerTests {
    func resolve(_ domain: String) throws -> MailExchangerResolution {
        try DNSTestbed.resolver().resolveMailExchangers(domain)
    }

    @Test func secureMXWithAddresses() throws {
        guard case .exchangers(let exchangers, let status, let implicit) = try resolve("dane.test") else {
            Issue.record("no exchangers")
            return
        }
        #expect(status == .secure)
        #expect(!implicit)
        #expect(exchangers.map(\.host) == ["mx1.dane.test", "mx2.dane.test"])
        #expect(exchangers.map(\.preference) == [10, 20])
        #expect(exchangers[0].ipv4.addresses.map(\.description) == ["127.0.0.21"])
        #expect(exchangers[0].ipv4.status == .secure)
        #expect(exchangers[0].ipv6.addresses.isEmpty)
        #expect(exchangers[0].ipv6.status == .secure)    // a secure NODATA
        #expect(exchangers[0].ipv6.failure == nil)
        #expect(exchangers[0].addressesSecure)
        #expect(exchangers[1].addresses.map(\.description) == ["127.0.0.22"])
    }

    @Test func nullMX() throws {
        let result = try resolve("nullmx.dane.test")
        #expect(result == .nullMX(mxStatus: .secure))
        #expect(MailExchangerResolution.nullMXFailure(domain: "nullmx.dane.test").enhancedStatusCode == "5.1.10")
    }

    @Test func implicitMX() throws {
        guard case .exchangers(let exchangers, let status, let implicit) = try resolve("implicit.dane.test") else {
            Issue.record("no exchangers")
            return
        }
        #expect(implicit)
        #expect(status == .secure)
        #expect(exchangers.count == 1)
        #expect(exchangers.first?.host == "implicit.dane.test")
        #expect(exchangers.first?.preference == 0)
        // IPv6 first.
        #expect(exchangers.first?.addresses.map(\.description) == ["::1", "127.0.0.26"])
    }

    @Test func mxTargetThatIsACNAME() throws {
        guard case .exchangers(let exchangers, _, _) = try resolve("viacname.dane.test") else {
            Issue.record("no exchangers")
            return
        }
        #expect(exchangers.first?.host == "alias.dane.test")
        #expect(exchangers.first?.canonicalHost == "mx1.dane.test")
        #expect(exchangers.first?.addresses.map(\.description) == ["127.0.0.21"])
    }

    /// A domain with more MX hosts than `addressLookupLimit`: all are
    /// listed, in preference order, and only the first ones were looked
    /// up (the rest would be thousands of queries for a hostile domain).
    @Test func onlyTheFirstMXHostsAreLookedUp() throws {
        guard case .exchangers(let exchangers, let status, _) = try resolve("many.dane.test") else {
            Issue.record("no exchangers")
            return
        }
        #expect(status == .secure)
        #expect(exchangers.count == 25)
        let limit = MailExchanger.addressLookupLimit
        #expect(exchangers.prefix(limit).allSatisfy { $0.addressesLookedUp && $0.addresses.count == 1 && $0.addressesSecure })
        #expect(exchangers.dropFirst(limit).allSatisfy { !$0.addressesLookedUp && $0.addresses.isEmpty })
        #expect(exchangers.dropFirst(limit).first?.ipv4.failure?.contains("not looked up") == true)
        #expect(Set(exchangers.map(\.host)).count == 25)
    }

    @Test func nxdomainIsPermanent() throws {
        guard case .failure(let failure) = try resolve("no-such-domain.dane.test") else {
            Issue.record("expected a failure")
            return
        }
        #expect(!failure.temporary)
        #expect(failure.enhancedStatusCode == "5.1.2")
    }

    @Test func mxHostWithoutAddressIsPermanent() throws {
        guard case .failure(let failure) = try resolve("noaddr.dane.test") else {
            Issue.record("expected a failure")
            return
        }
        #expect(!failure.temporary)
        #expect(failure.enhancedStatusCode == "5.4.4")
        #expect(failure.reason.contains("nowhere.dane.test"))
    }

    @Test func insecureDomain() throws {
        guard case .exchangers(let exchangers, let status, _) = try resolve("insecure.test") else {
            Issue.record("no exchangers")
            return
        }
        #expect(status == .insecure)
        #expect(exchangers.first?.host == "mx.insecure.test")
        #expect(exchangers.first?.ipv4.status == .insecure)
        #expect(exchangers.first?.addressesSecure == false)
    }

    @Test func nameOutsideTheTestZonesIsTemporary() throws {
        // The test bed refuses everything outside its zones: SERVFAIL.
        guard case .failure(let failure) = try resolve("example.org") else {
            Issue.record("expected a failure")
            return
        }
        #expect(failure.temporary)
        #expect(failure.enhancedStatusCode == "4.4.3")
    }

    @Test func invalidDomainIsPermanent() throws {
        guard case .failure(let failure) = try resolve("bad domain.example") else {
            Issue.record("expected a failure")
            return
        }
        #expect(!failure.temporary)
    }
}
