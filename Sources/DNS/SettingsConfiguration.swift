// The resolver configuration from `[dns]`, made in one place for every
// stage that resolves (remote-deliver, smtp-listen's client names).

import SealpostConfig

extension ResolverConfiguration {
    /// `validating` false: no trust anchor and no DNSSEC, for lookups whose
    /// answers are checked another way (a client name counts only once a
    /// forward lookup confirms it).
    public init(_ dns: DNSSettings, validating: Bool = true) {
        self.init(forwarders: dns.forwarders,
                  stubZones: dns.stubZones.map { StubZone(zone: $0.zone, addresses: $0.addresses) },
                  trustAnchorFiles: validating ? dns.trustAnchorFiles : [],
                  rootTrustAnchorFile: validating ? ResolverConfiguration().rootTrustAnchorFile : "",
                  insecureDomains: validating ? dns.insecureDomains : [],
                  resolveReservedZones: dns.resolveReservedZones,
                  timeout: .seconds(dns.timeout))
    }
}
