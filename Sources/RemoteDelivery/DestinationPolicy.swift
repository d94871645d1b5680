// The destination policy: one pluggable step between the DNS answers and
// the SMTP client. Input: the destination domain, its route (MX hosts and
// their DNSSEC status) and the transport-table entry; output: the TLS
// requirement and what crypto-negotiate must verify. DANE (TLSA lookups),
// MTA-STS, the remembered security level and REQUIRETLS plug in here as
// other implementations (or a chain of them) without touching the client.

import SMTP

/// What crypto-negotiate is asked to verify (its `tls` protocol's
/// `policy`, `match-names`, `tlsa`, `pins`, `ca` attributes).
public struct TLSVerification: Sendable, Hashable {
    public enum Method: String, Sendable, Hashable { case none, pkix, dane, pin }
    public var method: Method
    /// Names the certificate must carry (PKIX): the MX host, or the
    /// destination domain for "secure".
    public var matchNames: [String]
    /// TLSA records (RFC 6698 wire rdata, back to back as the tls protocol
    /// carries them) for DANE.
    public var tlsa: [[UInt8]]
    /// SPKI SHA-256 digests for "pin".
    public var pins: [String]

    public init(method: Method = .none, matchNames: [String] = [], tlsa: [[UInt8]] = [], pins: [String] = []) {
        self.method = method
        self.matchNames = matchNames
        self.tlsa = tlsa
        self.pins = pins
    }
}

/// The decision for one destination.
public struct DestinationSecurity: Sendable, Hashable, CustomStringConvertible {
    public var requirement: TLSRequirement
    public var verification: TLSVerification
    /// Why (for logs and `sealpost explain`): "transport table
    /// Config/transport:3", "default".
    public var source: String

    public init(requirement: TLSRequirement, verification: TLSVerification = TLSVerification(), source: String) {
        self.requirement = requirement
        self.verification = verification
        self.source = source
    }

    public var description: String { "tls=\(requirement.rawValue) (\(source))" }
}

/// Decides the TLS requirement of a destination.
public protocol DestinationPolicy: Sendable {
    /// `domain`: the job's destination (nexthop). `route`: the resolved MX
    /// hosts and addresses. `entry`: the transport-table entry, if any.
    func security(domain: String, route: DeliveryRoute, entry: TransportEntry?) async -> DestinationSecurity
    /// The verification for one candidate host (PKIX names depend on the
    /// MX host name; DANE TLSA records on the host too). `domain`: the next
    /// hop's name (the transport table's relay host, else the destination).
    func verification(for candidate: DeliveryCandidate, domain: String, security: DestinationSecurity) -> TLSVerification
}

/// The static policy: the transport table's tls=, else a default level
/// ("may": opportunistic TLS, RFC 7435). DANE levels without a DANE
/// policy behind them fall back as RFC 7672 says for insecure answers:
/// "dane" to opportunistic, "dane-only" stays required (no delivery
/// without authentication).
public struct StaticDestinationPolicy: DestinationPolicy {
    public var defaultRequirement: TLSRequirement

    public init(defaultRequirement: TLSRequirement = .may) {
        self.defaultRequirement = defaultRequirement
    }

    public func security(domain: String, route: DeliveryRoute, entry: TransportEntry?) async -> DestinationSecurity {
        if let entry, let level = entry.tls {
            return DestinationSecurity(requirement: level == .dane ? .may : level, source: "transport table \(entry.origin)")
        }
        return DestinationSecurity(requirement: defaultRequirement == .dane ? .may : defaultRequirement, source: "default")
    }

    public func verification(for candidate: DeliveryCandidate, domain: String, security: DestinationSecurity) -> TLSVerification {
        switch security.requirement {
        case .verify: return TLSVerification(method: .pkix, matchNames: [candidate.host])
        case .secure: return TLSVerification(method: .pkix, matchNames: [domain, "." + domain])
        case .none, .may, .encrypt, .dane, .daneOnly: return TLSVerification(method: .none)
        }
    }
}
