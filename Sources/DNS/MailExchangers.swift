// Where to deliver mail for a domain: RFC 5321 5.1 with RFC 7505 (null MX),
// keeping the DNSSEC status of every lookup for DANE (RFC 7672 2.2) and for
// `sealpost explain`.
//
//   MX lookup of the domain
//     NXDOMAIN                      -> permanent failure 5.1.2
//     SERVFAIL, timeout, bogus      -> temporary failure 4.4.3
//     one record "0 ."              -> null MX: the domain takes no mail (5.1.10)
//     no MX records (NODATA)        -> implicit MX: the domain itself, preference 0
//     MX records                    -> sorted by preference (equal ones shuffled);
//                                      "." among others and non-host names dropped
//   A and AAAA of every exchange, all in parallel (CNAMEs followed: RFC 2181
//   10.3 forbids an MX target to be an alias, but refusing it helps nobody)
//     no exchange has an address    -> temporary failure 4.4.3 if any lookup
//                                      failed temporarily, else permanent 5.4.4
//
// The whole resolution has one deadline; the lookups share it.

import Synchronization

/// The outcome of one address lookup (A or AAAA) of a mail exchanger.
public struct AddressLookup: Sendable, Equatable {
    public var addresses: [IPAddress]
    public var status: DNSSECStatus
    /// Set when the lookup did not give a usable answer (timeout, SERVFAIL,
    /// bogus, NXDOMAIN); `addresses` is then empty.
    public var failure: String?
    /// True when the failure may go away on retry.
    public var temporaryFailure: Bool
    /// Canonical name when a CNAME was followed.
    public var canonicalName: String?

    public init(addresses: [IPAddress], status: DNSSECStatus, failure: String? = nil,
                temporaryFailure: Bool = false, canonicalName: String? = nil) {
        self.addresses = addresses
        self.status = status
        self.failure = failure
        self.temporaryFailure = temporaryFailure
        self.canonicalName = canonicalName
    }
}

/// One mail exchanger with its addresses.
public struct MailExchanger: Sendable, Equatable, CustomStringConvertible {
    public var preference: UInt16
    /// The exchange's name as published, without the trailing dot.
    public var host: String
    public var ipv4: AddressLookup
    public var ipv6: AddressLookup
    /// False for a host past `addressLookupLimit` in the preference order:
    /// its addresses were not looked up (ipv4 and ipv6 are then empty and
    /// say so); a caller that needs them looks them up itself.
    public var addressesLookedUp = true

    /// How many MX hosts, in preference order, get their A and AAAA
    /// lookups. A domain may publish thousands of MX records: looking them
    /// all up would make this host send thousands of queries (to names
    /// the domain chose) per delivery attempt and wait for them all, while
    /// an SMTP client tries only a few addresses anyway.
    public static let addressLookupLimit = 20

    /// IPv6 first (RFC 6724 default preference), then IPv4.
    public var addresses: [IPAddress] { ipv6.addresses + ipv4.addresses }

    /// The name a CNAME led to, if one was followed.
    public var canonicalHost: String? { ipv4.canonicalName ?? ipv6.canonicalName }

    /// True when every address found comes from a DNSSEC-secure answer and
    /// there is at least one (RFC 7672 2.2.2: only then are TLSA records
    /// looked up under the host's name).
    public var addressesSecure: Bool {
        !addresses.isEmpty
            && (ipv4.addresses.isEmpty || ipv4.status == .secure)
            && (ipv6.addresses.isEmpty || ipv6.status == .secure)
    }

    public var description: String {
        "\(preference) \(host) [" + addresses.map(\.description).joined(separator: ", ") + "]"
    }
}

/// Why mail for a domain cannot be routed now (or ever).
public struct RoutingFailure: Error, Sendable, Equatable, CustomStringConvertible {
    public var domain: String
    /// False: bounce now. True: defer and retry.
    public var temporary: Bool
    /// RFC 3463 enhanced status code, e.g. "4.4.3", "5.1.2", "5.1.10".
    public var enhancedStatusCode: String
    public var reason: String

    public init(domain: String, temporary: Bool, enhancedStatusCode: String, reason: String) {
        self.domain = domain
        self.temporary = temporary
        self.enhancedStatusCode = enhancedStatusCode
        self.reason = reason
    }

    public var description: String { "\(enhancedStatusCode) \(domain): \(reason)" }
}

/// The result of `Resolver.resolveMailExchangers`.
public enum MailExchangerResolution: Sendable, Equatable {
    /// Exchangers in the order to try them. Those without any address are
    /// kept (with their failures) for logs and `explain`, after the others
    /// of their preference. `mxStatus` is the DNSSEC status of the MX
    /// answer (for an implicit MX: of the NODATA answer).
    case exchangers([MailExchanger], mxStatus: DNSSECStatus, implicit: Bool)
    /// RFC 7505: the domain publishes "MX 0 ." and accepts no mail.
    case nullMX(mxStatus: DNSSECStatus)
    case failure(RoutingFailure)

    /// The failure to report for a domain with a null MX.
    public static func nullMXFailure(domain: String) -> RoutingFailure {
        RoutingFailure(domain: domain, temporary: false, enhancedStatusCode: "5.1.10",
                       reason: "domain accepts no mail (null MX, RFC 7505)")
    }
}

extension Resolver {
    /// Resolves the mail exchangers of `domain`; the completion runs once,
    /// from `processEvents()` / `expireDeadlines()` (see `query`).
    public func resolveMailExchangers(_ domain: String, timeout: Duration? = nil,
                                      completion: @escaping @Sendable (MailExchangerResolution) -> Void) {
        let job = MXJob(resolver: self, domain: DNSName.trimmed(domain),
                        deadline: ContinuousClock.now + (timeout ?? configuration.timeout),
                        completion: completion)
        job.start()
    }

    /// Blocking form, for tools and tests.
    public func resolveMailExchangers(_ domain: String, timeout: Duration? = nil) -> MailExchangerResolution {
        let box = ResultBox<MailExchangerResolution>()
        resolveMailExchangers(domain, timeout: timeout) { box.set($0) }
        // The job may have finished synchronously (bad name); otherwise pump.
        run { box.get() != nil }
        return box.get() ?? .failure(RoutingFailure(domain: domain, temporary: true,
                                                    enhancedStatusCode: "4.4.3",
                                                    reason: "DNS lookups did not complete"))
    }
}

/// One MX resolution in flight. Callbacks may come from any pumping thread,
/// so its state sits behind a lock; the completion is called outside it.
private final class MXJob: @unchecked Sendable {
    let resolver: Resolver
    let domain: String
    let deadline: ContinuousClock.Instant
    let completion: @Sendable (MailExchangerResolution) -> Void

    private struct State {
        var done = false
        var mxStatus: DNSSECStatus = .indeterminate
        var implicit = false
        var hosts: [(preference: UInt16, host: String)] = []
        var ipv4: [String: AddressLookup] = [:]
        var ipv6: [String: AddressLookup] = [:]
        var outstanding = 0
        /// The first hosts, whose addresses are looked up.
        var lookedUp = 0
    }
    private let state = Mutex(State())

    init(resolver: Resolver, domain: String, deadline: ContinuousClock.Instant,
         completion: @escaping @Sendable (MailExchangerResolution) -> Void) {
        self.resolver = resolver
        self.domain = domain
        self.deadline = deadline
        self.completion = completion
    }

    private var remaining: Duration { max(.zero, deadline - ContinuousClock.now) }

    private func finish(_ result: MailExchangerResolution) {
        let first = state.withLock { state in
            defer { state.done = true }
            return !state.done
        }
        if first { completion(result) }
    }

    private func fail(temporary: Bool, _ code: String, _ reason: String) {
        finish(.failure(RoutingFailure(domain: domain, temporary: temporary,
                                       enhancedStatusCode: code, reason: reason)))
    }

    func start() {
        do {
            try DNSName.validate(domain)
            try resolver.query(domain, .mx, timeout: remaining) { [self] result in mxAnswered(result) }
        } catch {
            fail(temporary: error.isTemporary, error.isTemporary ? "4.4.3" : "5.1.2", error.description)
        }
    }

    private func mxAnswered(_ result: Result<DNSAnswer, DNSError>) {
        let answer: DNSAnswer
        switch result {
        case .failure(let error):
            return fail(temporary: true, "4.4.3", "MX lookup: \(error)")
        case .success(let value):
            answer = value
        }
        if case .bogus(let why) = answer.status {
            return fail(temporary: true, "4.4.3", "MX lookup: DNSSEC validation failed: \(why)")
        }
        if answer.rcode == .nxDomain {
            return fail(temporary: false, "5.1.2", "domain does not exist (NXDOMAIN)")
        }
        guard answer.rcode == .noError else {
            return fail(temporary: true, "4.4.3", "MX lookup: \(answer.rcode)")
        }

        var hosts: [(preference: UInt16, host: String)] = []
        if !answer.haveData {
            hosts = [(0, domain)]   // RFC 5321 5.1: implicit MX
        } else {
            let records: [MXRecord]
            do {
                records = try answer.mxRecords()
            } catch {
                return fail(temporary: true, "4.4.3", "MX lookup: \(error)")
            }
            // RFC 7505 3: a null MX is the only record of its RRset; one
            // published next to real exchangers is ignored as a target.
            if records.count == 1, records[0].exchange.isRoot {
                return finish(.nullMX(mxStatus: answer.status))
            }
            // Shuffle, then a stable sort: equal preferences end up in random
            // order (RFC 5321 5.1 load spreading).
            let usable = records.filter { !$0.exchange.isRoot && $0.exchange.isHostname }.shuffled()
            var seen = Set<String>()
            for record in usable.enumerated().sorted(by: {
                ($0.element.preference, $0.offset) < ($1.element.preference, $1.offset)
            }).map(\.element) {
                let host = record.exchange.text
                if seen.insert(host.lowercased()).inserted { hosts.append((record.preference, host)) }
            }
            if hosts.isEmpty {
                if records.allSatisfy(\.exchange.isRoot) {
                    return finish(.nullMX(mxStatus: answer.status))
                }
                return fail(temporary: false, "5.4.4", "no usable MX host name: "
                    + records.map(\.description).joined(separator: ", "))
            }
        }

        let looked = hosts.prefix(MailExchanger.addressLookupLimit)
        state.withLock { state in
            state.mxStatus = answer.status
            state.implicit = !answer.haveData
            state.hosts = hosts
            state.lookedUp = looked.count
            state.outstanding = looked.count * 2
        }
        for (_, host) in looked {
            for type in [RRType.a, .aaaa] {
                do {
                    try resolver.query(host, type, timeout: remaining) { [self] result in
                        addressAnswered(host, type, result)
                    }
                } catch {
                    // Cannot even start: record it as that lookup's result.
                    record(host, type, AddressLookup(addresses: [], status: .indeterminate,
                                                     failure: error.description,
                                                     temporaryFailure: error.isTemporary))
                }
            }
        }
    }

    private func addressAnswered(_ host: String, _ type: RRType, _ result: Result<DNSAnswer, DNSError>) {
        let lookup: AddressLookup
        switch result {
        case .failure(let error):
            lookup = AddressLookup(addresses: [], status: .indeterminate,
                                   failure: error.description, temporaryFailure: error.isTemporary)
        case .success(let answer):
            if case .bogus(let why) = answer.status {
                lookup = AddressLookup(addresses: [], status: answer.status,
                                       failure: "DNSSEC validation failed: \(why)", temporaryFailure: true)
            } else if answer.rcode == .nxDomain {
                lookup = AddressLookup(addresses: [], status: answer.status,
                                       failure: "host does not exist (NXDOMAIN)", temporaryFailure: false)
            } else if answer.rcode != .noError {
                lookup = AddressLookup(addresses: [], status: answer.status,
                                       failure: "\(type) lookup: \(answer.rcode)", temporaryFailure: true)
            } else {
                let canonical = answer.followedCNAME ? answer.canonicalName : nil
                do {
                    let addresses: [IPAddress] = type == .a
                        ? try answer.ipv4Addresses().map(IPAddress.v4)
                        : try answer.ipv6Addresses().map(IPAddress.v6)
                    lookup = AddressLookup(addresses: addresses, status: answer.status,
                                           canonicalName: canonical)
                } catch {
                    lookup = AddressLookup(addresses: [], status: answer.status,
                                           failure: error.description, temporaryFailure: true,
                                           canonicalName: canonical)
                }
            }
        }
        record(host, type, lookup)
    }

    private func record(_ host: String, _ type: RRType, _ lookup: AddressLookup) {
        let complete: State? = state.withLock { state in
            if type == .a { state.ipv4[host] = lookup } else { state.ipv6[host] = lookup }
            state.outstanding -= 1
            return state.outstanding == 0 ? state : nil
        }
        if let complete { conclude(complete) }
    }

    private func conclude(_ state: State) {
        let missing = AddressLookup(addresses: [], status: .indeterminate,
                                    failure: "no answer", temporaryFailure: true)
        let notLookedUp = AddressLookup(addresses: [], status: .indeterminate,
                                        failure: "not looked up (past the first \(MailExchanger.addressLookupLimit) MX hosts)")
        let exchangers = state.hosts.enumerated().map { index, entry in
            guard index < state.lookedUp else {
                var exchanger = MailExchanger(preference: entry.preference, host: entry.host,
                                              ipv4: notLookedUp, ipv6: notLookedUp)
                exchanger.addressesLookedUp = false
                return exchanger
            }
            return MailExchanger(preference: entry.preference, host: entry.host,
                                 ipv4: state.ipv4[entry.host] ?? missing,
                                 ipv6: state.ipv6[entry.host] ?? missing)
        }
        let reachable = exchangers.filter { !$0.addresses.isEmpty }
        guard !reachable.isEmpty else {
            let looked = exchangers.prefix(state.lookedUp)
            let lookups = looked.flatMap { [$0.ipv4, $0.ipv6] }
            let temporary = lookups.contains { $0.temporaryFailure }
            let details = looked.map { exchanger in
                let why = [exchanger.ipv4.failure.map { "A: \($0)" },
                           exchanger.ipv6.failure.map { "AAAA: \($0)" }].compactMap { $0 }
                return exchanger.host + (why.isEmpty ? ": no address records" : ": " + why.joined(separator: "; "))
            }.joined(separator: ", ")
            let what = state.implicit ? "no MX and no address for the domain" : "no address for any MX host"
            return fail(temporary: temporary, temporary ? "4.4.3" : "5.4.4", "\(what) (\(details))")
        }
        // Keep hosts without addresses (for explain), after the usable ones
        // of the same preference.
        let ordered = exchangers.enumerated().sorted { lhs, rhs in
            (lhs.element.preference, lhs.element.addresses.isEmpty ? 1 : 0, lhs.offset)
                < (rhs.element.preference, rhs.element.addresses.isEmpty ? 1 : 0, rhs.offset)
        }.map(\.element)
        finish(.exchangers(ordered, mxStatus: state.mxStatus, implicit: state.implicit))
    }
}
