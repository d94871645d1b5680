// The DNS module (libunbound, validating DNSSEC in-process) behind
// `MailExchangerResolver`: MX resolution with RFC 7505 null MX, implicit
// MX and the DNSSEC status of every answer, and A/AAAA lookups for next
// hops named in the transport table.

import DNS
import SMTP

public struct UnboundMailExchangerResolver: MailExchangerResolver {
    public let thread: ResolverThread

    public init(_ thread: ResolverThread) {
        self.thread = thread
    }

    /// A resolver with its own pumping thread. `forwarders`: "ADDR" or
    /// "ADDR@PORT" (empty: full recursion from the root); `trustAnchors`:
    /// files (empty: the root key when installed); `resolveZones`: RFC 6761
    /// zones to resolve anyway (test beds use "test").
    public static func make(forwarders: [String] = [], trustAnchors: [String] = [],
                            resolveZones: [String] = []) throws(DNSError) -> UnboundMailExchangerResolver {
        let configuration = ResolverConfiguration(forwarders: forwarders, trustAnchorFiles: trustAnchors,
                                                  resolveReservedZones: resolveZones)
        return try make(configuration)
    }

    /// A resolver with its own pumping thread, configured as given.
    public static func make(_ configuration: ResolverConfiguration) throws(DNSError) -> UnboundMailExchangerResolver {
        UnboundMailExchangerResolver(try ResolverThread(try Resolver(configuration)))
    }

    public func mailExchangers(of domain: String) async -> MXLookupResult {
        switch await thread.resolveMailExchangers(domain) {
        case .nullMX:
            return .nullMX
        case .failure(let f):
            let status = EnhancedStatus(parsing: f.enhancedStatusCode) ?? (f.temporary ? EnhancedStatus(4, 4, 3) : EnhancedStatus(5, 1, 2))
            let reason = "Name service error for name=\(f.domain) type=MX: \(f.reason)"
            if f.temporary { return .temporaryFailure(reason) }
            if status.subject == 1 && status.detail == 2 { return .noSuchDomain("Host or domain name not found. " + reason) }
            return .failure(RoutingFailure(permanent: true, status: status, text: reason))
        case .exchangers(let list, let mxStatus, _):
            return .exchangers(list.map { mx in
                // Past the resolver's lookup limit: the planner looks the
                // host up itself if it gets that far.
                guard mx.addressesLookedUp else {
                    return RemoteDelivery.MailExchanger(preference: Int(mx.preference), host: mx.host)
                }
                let addresses = mx.addresses.map(\.description)
                let lookup: AddressLookupResult
                if !addresses.isEmpty {
                    lookup = .addresses(addresses, secure: mx.addressesSecure)
                } else {
                    let why = mx.ipv4.failure ?? mx.ipv6.failure ?? "no A or AAAA record"
                    lookup = (mx.ipv4.temporaryFailure || mx.ipv6.temporaryFailure)
                        ? .temporaryFailure("Name service error for name=\(mx.host): \(why)")
                        : .noSuchHost("Host or domain name not found. Name service error for name=\(mx.host): \(why)")
                }
                return RemoteDelivery.MailExchanger(preference: Int(mx.preference), host: mx.host, addresses: lookup)
            }, secure: mxStatus.isSecure)
        }
    }

    public func addresses(of host: String) async -> AddressLookupResult {
        if TransportTable.isIPv4(host) || TransportTable.isIPv6(host) { return .addresses([host], secure: false) }
        async let v6 = lookup(host, .aaaa)
        async let v4 = lookup(host, .a)
        let (six, four) = await (v6, v4)
        let all = six.addresses + four.addresses
        if !all.isEmpty {
            let secure = (six.addresses.isEmpty || six.secure) && (four.addresses.isEmpty || four.secure)
            return .addresses(all, secure: secure)
        }
        if let why = six.temporary ?? four.temporary { return .temporaryFailure("Name service error for name=\(host): \(why)") }
        return .noSuchHost("Host or domain name not found. Name service error for name=\(host) type=A: Host not found")
    }

    private func lookup(_ host: String, _ type: RRType) async -> (addresses: [String], secure: Bool, temporary: String?) {
        do {
            let answer = try await thread.resolve(host, type)
            if answer.rcode != .noError && answer.rcode != .nxDomain {
                return ([], false, "\(type) lookup answered \(answer.rcode)")
            }
            let list = type == .a ? try answer.ipv4Addresses().map(\.description) : try answer.ipv6Addresses().map(\.description)
            return (list, answer.status.isSecure, nil)
        } catch {
            return ([], false, error.isTemporary ? error.description : nil)
        }
    }
}
