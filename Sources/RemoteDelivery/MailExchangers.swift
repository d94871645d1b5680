// From a destination to the list of addresses to try, in order.
//
// The DNS work sits behind `MailExchangerResolver`, so that the libunbound
// resolver (the DNS module, with DNSSEC status) plugs in without touching
// the rest, and tests use a static table. The rules that do not depend on
// the resolver live here:
//
//   - MX hosts in preference order, random among equal preference
//     (RFC 5321 5.1), every address of each host tried (IPv6 and IPv4);
//   - null MX (RFC 7505): bounce at once, 5.1.10;
//   - the domain does not exist (NXDOMAIN), or has neither MX nor address:
//     bounce, 5.1.2;
//   - a lookup that failed for now (SERVFAIL, timeout): defer, 4.4.3;
//   - MX hosts whose names do not resolve are skipped; none left: bounce
//     5.4.4 when every lookup said "no such host", defer 4.4.3 when one
//     failed for now.

#if canImport(Glibc)
import Glibc
#endif
import DNS
import NIOCore
import NIOPosix
import SMTP
import StageRuntime

/// One MX host (or the implicit MX: the domain itself, preference 0).
public struct MailExchanger: Sendable, Hashable, CustomStringConvertible {
    public var preference: Int
    public var host: String
    /// Addresses the resolver found along with the MX answer (the DNS
    /// module looks them up in parallel); nil: the planner asks
    /// `addresses(of:)`.
    public var addresses: AddressLookupResult?
    public init(preference: Int, host: String, addresses: AddressLookupResult? = nil) {
        self.preference = preference
        self.host = host
        self.addresses = addresses
    }
    public var description: String { "\(preference) \(host)" }
}

/// The answer to "where does mail for this domain go?".
public enum MXLookupResult: Sendable, Hashable {
    /// MX hosts (any order; the planner sorts them). `secure`: the answer
    /// was DNSSEC-validated (DANE needs it).
    case exchangers([MailExchanger], secure: Bool)
    /// No MX records, but the domain has an address: the implicit MX.
    case implicit(secure: Bool)
    /// "MX 0 ." (RFC 7505): the domain accepts no mail.
    case nullMX
    /// NXDOMAIN, or neither MX nor address records.
    case noSuchDomain(String)
    /// SERVFAIL, timeout, bogus DNSSEC answer: try later.
    case temporaryFailure(String)
    /// Any other outcome the resolver classified itself.
    case failure(RoutingFailure)
}

/// The addresses of one host.
public enum AddressLookupResult: Sendable, Hashable {
    /// IPv4 and IPv6 literals in text form.
    case addresses([String], secure: Bool)
    case noSuchHost(String)
    case temporaryFailure(String)

    /// IPv4-mapped IPv6 addresses (an AAAA record "::ffff:127.0.0.1") as
    /// the IPv4 addresses they reach, once each: the self-recognition
    /// compares addresses as text, and a connection to the mapped form
    /// reaches the IPv4 listener (on Linux) all the same.
    var unmappingIPv4: AddressLookupResult {
        guard case .addresses(let list, let secure) = self else { return self }
        var seen = Set<String>()
        let unmapped = list.map { TransportTable.unmappedIPv4($0) ?? $0 }.filter { seen.insert($0).inserted }
        return .addresses(unmapped, secure: secure)
    }
}

/// DNS for remote delivery. The DNS module's libunbound resolver conforms
/// to it once it is in main; tests use `StaticMailExchangerResolver`.
public protocol MailExchangerResolver: Sendable {
    func mailExchangers(of domain: String) async -> MXLookupResult
    func addresses(of host: String) async -> AddressLookupResult
}

/// A fixed table: tests, and next hops given as IP literals.
public struct StaticMailExchangerResolver: MailExchangerResolver {
    public var mx: [String: MXLookupResult]
    public var hosts: [String: AddressLookupResult]

    public init(mx: [String: MXLookupResult] = [:], hosts: [String: AddressLookupResult] = [:]) {
        self.mx = mx
        self.hosts = hosts
    }

    public func mailExchangers(of domain: String) async -> MXLookupResult {
        if let r = mx[domain.lowercased()] { return r }
        if hosts[domain.lowercased()] != nil { return .implicit(secure: false) }
        return .noSuchDomain("Host or domain name not found. Name service error for name=\(domain) type=MX: Host not found")
    }

    public func addresses(of host: String) async -> AddressLookupResult {
        if TransportTable.isIPv4(host) || TransportTable.isIPv6(host) { return .addresses([host], secure: false) }
        return hosts[host.lowercased()] ?? .noSuchHost("Host or domain name not found. Name service error for name=\(host) type=A: Host not found")
    }
}

/// Which address family first when a host has both.
public enum AddressPreference: String, Sendable, CaseIterable {
    case ipv6, ipv4, any
}

/// One address to connect to.
public struct DeliveryCandidate: Sendable, Hashable, CustomStringConvertible {
    /// The MX host name (or the next-hop host); names the peer in logs and
    /// is the TLS server name.
    public var host: String
    public var address: String
    public var port: Int
    /// nil for a next hop given as "[host]".
    public var preference: Int?
    /// The MX answer and the address answer were both DNSSEC-secure.
    public var secure: Bool
    /// The MX answer that named this host (or said there was none, for a
    /// domain's own address) was DNSSEC-secure: the host is the domain's,
    /// not one an attacker on the path made up (what REQUIRETLS needs,
    /// RFC 8689 section 4.2.1). False for a next hop given as a host.
    public var mxSecure: Bool

    public init(host: String, address: String, port: Int, preference: Int? = nil, secure: Bool = false,
                mxSecure: Bool = false) {
        self.host = host
        self.address = address
        self.port = port
        self.preference = preference
        self.secure = secure
        self.mxSecure = mxSecure
    }

    /// "mx.example.net[192.0.2.1]:25", as Postfix writes it.
    public var description: String { "\(host)[\(address)]:\(port)" }
}

/// Why no address could be found; the recipients get this result.
public struct RoutingFailure: Error, Sendable, Hashable, CustomStringConvertible {
    public var permanent: Bool
    public var status: EnhancedStatus
    public var text: String
    public init(permanent: Bool, status: EnhancedStatus, text: String) {
        self.permanent = permanent
        self.status = status
        self.text = text
    }
    public var description: String { "\(status) \(text)" }
}

/// The route of one job: what the destination policy sees, and the addresses.
public struct DeliveryRoute: Sendable, Hashable {
    /// The domain the MX hosts were looked up for (nil for "[host]").
    public var mxDomain: String?
    public var exchangers: [MailExchanger]
    /// The MX answer was DNSSEC-secure.
    public var mxSecure: Bool
    public var candidates: [DeliveryCandidate]
}

public enum RoutePlanner {
    /// The next hop of a recipient domain with no transport table entry:
    /// its MX hosts, or for an address literal ("[192.0.2.1]",
    /// "[IPv6:2001:db8::1]", RFC 5321 4.1.3) that address, with no lookup.
    public static func defaultHop(for domain: String) -> NextHop {
        guard domain.hasPrefix("["), domain.hasSuffix("]") else { return .mailExchangers(domain, port: 25) }
        let inner = String(domain.dropFirst().dropLast())
        if TransportTable.isIPv4(inner) { return .host(inner, port: 25) }
        let address = String(inner.dropFirst(5))
        if inner.lowercased().hasPrefix("ipv6:"), TransportTable.isIPv6(address) {
            return .host(TransportTable.unmappedIPv4(address) ?? address, port: 25)
        }
        return .mailExchangers(domain, port: 25)
    }

    /// MX hosts by preference, shuffled among equal preferences.
    public static func order<G: RandomNumberGenerator>(_ mx: [MailExchanger], using rng: inout G) -> [MailExchanger] {
        let groups = Dictionary(grouping: mx, by: \.preference)
        return groups.keys.sorted().flatMap { groups[$0]!.shuffled(using: &rng) }
    }

    /// Addresses of one host in the preferred family order (the resolver's
    /// order within a family).
    public static func order(_ addresses: [String], preference: AddressPreference) -> [String] {
        switch preference {
        case .any: return addresses
        case .ipv6: return addresses.filter { $0.contains(":") } + addresses.filter { !$0.contains(":") }
        case .ipv4: return addresses.filter { !$0.contains(":") } + addresses.filter { $0.contains(":") }
        }
    }

    /// Resolves `hop` to the addresses to try, or the failure every
    /// recipient gets.
    /// `myHostnames`: this host's names (`sealpost.hostname`). An MX host
    /// among them means the mail would come back here (RFC 5321 5.1):
    /// only the MX hosts preferred over it are tried, and with none the
    /// mail loops back to myself (5.4.6), as a backup MX's must when the
    /// primaries are down.
    /// `isSelf`: whether an address and port reach this host's own SMTP
    /// listener (see SelfRecognition), the other way to tell an MX host is
    /// this one; a next hop that is this host is a loop as well.
    /// The most MX hosts of a domain looked up (in order of preference).
    public static let exchangerLimit = 20

    public static func route(_ hop: NextHop, resolver: any MailExchangerResolver,
                             preference: AddressPreference,
                             myHostnames: Set<String> = [],
                             isSelf: @Sendable (String, Int) -> Bool = { _, _ in false }) async -> Result<DeliveryRoute, RoutingFailure> {
        var rng = SystemRandomNumberGenerator()
        switch hop {
        case .local:
            return .failure(RoutingFailure(permanent: false, status: EnhancedStatus(4, 3, 5),
                                           text: "mail for a local transport was given to remote-deliver (transport table and queue routing disagree)"))
        case .host(let host, let port):
            switch await resolver.addresses(of: host).unmappingIPv4 {
            case .addresses(let list, _) where list.contains(where: { isSelf($0, port) }):
                return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 4, 6),
                                               text: "mail for [\(host)]:\(port) loops back to myself"))
            case .addresses(let list, let secure) where !list.isEmpty:
                let ordered = order(list, preference: preference)
                return .success(DeliveryRoute(mxDomain: nil, exchangers: [], mxSecure: false,
                                              candidates: ordered.map { DeliveryCandidate(host: host, address: $0, port: port, secure: secure) }))
            case .addresses:
                return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 4, 4),
                                               text: "Host or domain name not found. Name service error for name=\(host): no address"))
            case .noSuchHost(let why):
                return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 4, 4), text: why))
            case .temporaryFailure(let why):
                return .failure(RoutingFailure(permanent: false, status: EnhancedStatus(4, 4, 3), text: why))
            }
        case .mailExchangers(let domain, let port):
            var exchangers: [MailExchanger]
            let secure: Bool
            switch await resolver.mailExchangers(of: domain) {
            case .nullMX:
                return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 1, 10),
                                               text: "Domain \(domain) does not accept mail (null MX, RFC 7505)"))
            case .noSuchDomain(let why):
                return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 1, 2), text: why))
            case .temporaryFailure(let why):
                return .failure(RoutingFailure(permanent: false, status: EnhancedStatus(4, 4, 3), text: why))
            case .failure(let failure):
                return .failure(failure)
            case .implicit(let s):
                exchangers = [MailExchanger(preference: 0, host: domain)]
                secure = s
            case .exchangers(let list, let s):
                guard !list.isEmpty else {
                    return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 1, 2),
                                                   text: "Domain \(domain) has no MX host"))
                }
                exchangers = order(list, using: &rng)
                secure = s
            }
            // This host among the MX hosts by name: only the hosts preferred
            // over it matter (below, by address too). Of those, only the
            // first `exchangerLimit`: each is a lookup, and a domain may list
            // thousands (a job would wait for them all, the resolver make
            // them all); at most a few addresses are tried anyway.
            let mine = Set(myHostnames.map { DNSName.trimmed($0.lowercased()) })
            let oursByName = exchangers.filter { mine.contains(DNSName.trimmed($0.host.lowercased())) }.map(\.preference).min()
            exchangers = Array(exchangers.prefix(exchangerLimit))
            var lookups: [AddressLookupResult] = []
            for mx in exchangers {
                let lookup = if let known = mx.addresses { known } else { await resolver.addresses(of: mx.host) }
                lookups.append(lookup.unmappingIPv4)
            }
            // By address: an address its listener answers on.
            let ours = ([oursByName] + zip(exchangers, lookups).filter { mx, lookup in
                if case .addresses(let list, _) = lookup { return list.contains { isSelf($0, port) } }
                return false
            }.map { Optional($0.0.preference) }).compactMap { $0 }.min()
            if let ours {
                let kept = zip(exchangers, lookups).filter { $0.0.preference < ours }
                exchangers = kept.map(\.0)
                lookups = kept.map(\.1)
                if exchangers.isEmpty {
                    return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 4, 6),
                                                   text: "mail for \(domain) loops back to myself"))
                }
            }
            var candidates: [DeliveryCandidate] = []
            var temporary: String?
            var permanent: String?
            for (mx, lookup) in zip(exchangers, lookups) {
                switch lookup {
                case .addresses(let list, let s):
                    for a in order(list, preference: preference) {
                        candidates.append(DeliveryCandidate(host: mx.host, address: a, port: port,
                                                            preference: mx.preference, secure: secure && s,
                                                            mxSecure: secure))
                    }
                    if list.isEmpty { permanent = permanent ?? "MX host \(mx.host) has no address" }
                case .noSuchHost(let why):
                    permanent = permanent ?? why
                case .temporaryFailure(let why):
                    temporary = temporary ?? why
                }
            }
            if candidates.isEmpty {
                if let temporary {
                    return .failure(RoutingFailure(permanent: false, status: EnhancedStatus(4, 4, 3), text: temporary))
                }
                return .failure(RoutingFailure(permanent: true, status: EnhancedStatus(5, 4, 4),
                                               text: permanent ?? "no address for any MX host of \(domain)"))
            }
            return .success(DeliveryRoute(mxDomain: domain, exchangers: exchangers, mxSecure: secure, candidates: candidates))
        }
    }
}

/// Until the DNS module (libunbound, DNSSEC) is in: host addresses through
/// the system's getaddrinfo(3) on NIO's thread pool, and no MX lookups (a
/// destination that needs one is deferred, 4.4.3, rather than delivered to
/// a guessed host). Next hops from the transport table ("[host]:port")
/// work with it.
public struct SystemAddressResolver: MailExchangerResolver {
    public init() {}

    public func mailExchangers(of domain: String) async -> MXLookupResult {
        .temporaryFailure("MX lookup for \(domain) unavailable: remote-deliver was built without the DNS resolver; use a transport table next hop")
    }

    public func addresses(of host: String) async -> AddressLookupResult {
        if TransportTable.isIPv4(host) || TransportTable.isIPv6(host) { return .addresses([host], secure: false) }
        do {
            return try await NIOThreadPool.singleton.runIfActive { Self.getaddrinfo(host) }
        } catch {
            return .temporaryFailure("address lookup for \(host) failed: \(error)")
        }
    }

    static func getaddrinfo(_ host: String) -> AddressLookupResult {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = Glibc.getaddrinfo(host, nil, &hints, &list)
        guard rc == 0 else {
            let why = "Name service error for name=\(host) type=A: \(String(cString: gai_strerror(rc)))"
            return rc == EAI_NONAME || rc == -5 /* EAI_NODATA, GNU-only */ ? .noSuchHost("Host or domain name not found. " + why) : .temporaryFailure(why)
        }
        defer { freeaddrinfo(list) }
        var out: [String] = []
        var p = list
        while let ai = p {
            var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
            if ai.pointee.ai_family == AF_INET {
                ai.pointee.ai_addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                    var a = sin.pointee.sin_addr
                    _ = inet_ntop(AF_INET, &a, &buffer, socklen_t(buffer.count))
                }
            } else if ai.pointee.ai_family == AF_INET6 {
                ai.pointee.ai_addr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin in
                    var a = sin.pointee.sin6_addr
                    _ = inet_ntop(AF_INET6, &a, &buffer, socklen_t(buffer.count))
                }
            }
            let text = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if !text.isEmpty && !out.contains(text) { out.append(text) }
            p = ai.pointee.ai_next
        }
        return .addresses(out, secure: false)
    }
}

/// Whether an address and port are this host's own SMTP listener: the
/// configured `smtp.listen` endpoints, a wildcard host standing for every
/// address of this host's interfaces (and loopback).
public struct SelfRecognition: Sendable {
    /// "host:port" or "[v6]:port", as `smtp.listen` writes them.
    public typealias Endpoint = ListenAddress

    let endpoints: [Endpoint]
    let localAddresses: Set<String>

    public init(endpoints: [Endpoint]) {
        self.endpoints = endpoints
        localAddresses = endpoints.contains(where: Self.isWildcard) ? Self.interfaceAddresses() : []
    }

    public func isSelf(_ address: String, _ port: Int) -> Bool {
        endpoints.contains { e in
            e.port == port && (e.host == address || (Self.isWildcard(e) && (localAddresses.contains(address)
                                                                         || address.hasPrefix("127.") || address == "::1")))
        }
    }

    static func isWildcard(_ e: Endpoint) -> Bool { ["", "*", "0.0.0.0", "::"].contains(e.host) }

    /// Every address of this host's interfaces (NIO's getifaddrs wrapper).
    static func interfaceAddresses() -> Set<String> {
        Set(((try? System.enumerateDevices()) ?? []).compactMap { $0.address?.ipAddress })
    }
}
