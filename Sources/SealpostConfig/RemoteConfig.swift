// The [dns] and [remote] sections: the DNSSEC-validating resolver and the
// SMTP client (remote-deliver). Kept in a file of their own so that the
// shared parser only calls `parseRemoteSections`.

import TOMLKit

/// `[dns]`: the resolver remote-deliver validates DNSSEC with (libunbound,
/// the DNS module's `ResolverConfiguration`).
public struct DNSSettings: Sendable, Equatable {
    /// A zone sent to given authoritative servers instead of the forwarders
    /// or the root (test beds, split horizons).
    public struct StubZone: Sendable, Equatable {
        /// Lower-cased, no trailing dot.
        public var zone: String
        /// "ADDRESS" or "ADDRESS@PORT", IP literals.
        public var addresses: [String]
        public init(zone: String, addresses: [String]) {
            self.zone = zone
            self.addresses = addresses
        }
    }

    /// Recursive resolvers to forward every query to, "ADDRESS" or
    /// "ADDRESS@PORT" (IP literals). Empty: full recursion from the root.
    public var forwarders: [String] = []
    /// Absolute paths. Empty: the root key (/usr/share/dns/root.key).
    public var trustAnchorFiles: [String] = []
    /// Seconds a query may take.
    public var timeout: Int = 10
    /// Zones to treat as unsigned although under a trust anchor.
    public var insecureDomains: [String] = []
    /// RFC 6761 zones ("test", "invalid", ...) to resolve rather than
    /// answer locally; test beds use "test".
    public var resolveReservedZones: [String] = []
    /// In file order.
    public var stubZones: [StubZone] = []

    public init() {}
}

/// `[remote]`: remote-deliver, the SMTP client. Durations in seconds.
public struct RemoteDeliverySettings: Sendable, Equatable {
    public enum AddressPreference: String, Sendable, CaseIterable { case ipv6, ipv4, any }
    /// A message declared BODY=8BITMIME to a host that does not offer
    /// 8BITMIME (RFC 6152 section 3).
    public enum EightBitWithout8BITMIME: String, Sendable, CaseIterable {
        /// Convert the 8-bit MIME parts to quoted-printable (Postfix's default).
        case convert
        /// Send unchanged (Postfix's disable_mime_output_conversion = yes).
        case send
        /// Bounce with 5.6.3.
        case bounce
    }

    /// Jobs (and so connections) at once to one destination (Postfix's
    /// default_destination_concurrency_limit).
    public var destinationConcurrencyLimit = 20
    /// Jobs taken from the queue at once (the deliver protocol's max-jobs).
    public var maxJobs = 100
    public var connectTimeout = 30
    /// How long an idle connection is kept for the next job to the same
    /// destination; 0 closes it at once.
    public var connectionCacheTime = 2
    /// Messages sent over one connection before it is closed (Postfix's
    /// smtp_connection_reuse_count_limit is unlimited; 100 bounds the
    /// damage of a session that goes bad).
    public var connectionReuseLimit = 100
    /// Addresses tried per job, and sessions per job that reached a
    /// transaction (Postfix's smtp_mx_address_limit and
    /// smtp_mx_session_limit); 0: no limit.
    public var mxAddressLimit = 5
    public var mxSessionLimit = 2
    /// Local addresses outgoing connections bind to (nil: the kernel's choice).
    public var sourceAddress: String?
    public var sourceAddressIPv6: String?
    public var addressPreference: AddressPreference = .ipv6
    /// `eight_bit_without_8bitmime`: "convert" (default), "send" or "bounce".
    public var eightBitWithout8BITMIME: EightBitWithout8BITMIME = .convert
    /// The EHLO name: `sealpost.hostname` unless set.
    public var heloName: String
    /// Absolute: the transport table (default "transport" beside the file).
    public var transportTable: String

    public init(heloName: String, transportTable: String) {
        self.heloName = heloName
        self.transportTable = transportTable
    }
}

extension ConfigParser {
    static let dnsKeys = ["forwarders", "trust_anchor_files", "timeout", "insecure_domains",
                          "resolve_reserved_zones", "stub_zones"]
    static let remoteKeys = ["destination_concurrency_limit", "max_jobs", "connect_timeout",
                             "connection_cache_time", "connection_reuse_limit", "mx_address_limit", "mx_session_limit",
                             "source_address", "source_address_ipv6",
                             "address_preference", "helo_name", "transport_table", "eight_bit_without_8bitmime"]

    /// [dns] and [remote]; runs after [sealpost] (helo_name defaults to the
    /// host name resolved there).
    func parseRemoteSections(_ root: TOMLTable, into configuration: inout SealpostConfiguration) throws(ConfigError) {
        let directory = ConfigPath.directory(of: absoluteFile)

        // [dns]
        let dns = Section(parser: self, name: "dns", table: root["dns"]?.table)
        var resolver = DNSSettings()
        if let forwarders = try dns.strings("forwarders") {
            for forwarder in forwarders {
                if let problem = ConfigValues.nameServerError(forwarder) {
                    throw dns.error("forwarders", "\(problem): \(Self.quote(forwarder))")
                }
            }
            resolver.forwarders = forwarders
        }
        if let files = try dns.strings("trust_anchor_files") {
            resolver.trustAnchorFiles = try files.map { (file: String) throws(ConfigError) -> String in
                guard !file.isEmpty else { throw dns.error("trust_anchor_files", "an empty file name") }
                return ConfigPath.resolve(file, relativeTo: directory)
            }
        }
        try dns.duration("timeout", into: &resolver.timeout)
        if !(1...300).contains(resolver.timeout) {
            throw dns.error("timeout", "must be from 1 second to 300 seconds")
        }
        resolver.insecureDomains = try zones(dns, "insecure_domains") ?? []
        resolver.resolveReservedZones = try zones(dns, "resolve_reserved_zones") ?? []
        if dns.contains("stub_zones") {
            guard let table = dns.table?["stub_zones"]?.table else {
                throw dns.error("stub_zones", "expected a table of zone = [\"ADDRESS[@PORT]\", ...]")
            }
            for zone in table.keys {
                let key = "stub_zones." + zone
                let name = Self.zoneName(zone)
                guard let name else { throw stubError(key, "not a zone name: \(Self.quote(zone))") }
                guard let array = table[zone]?.array else {
                    throw stubError(key, "expected an array of \"ADDRESS[@PORT]\"")
                }
                var addresses: [String] = []
                for element in array {
                    guard let address = element.string else {
                        throw stubError(key, "expected an array of \"ADDRESS[@PORT]\", found \(Self.describe(element.type))")
                    }
                    if let problem = ConfigValues.nameServerError(address) {
                        throw stubError(key, "\(problem): \(Self.quote(address))")
                    }
                    addresses.append(address)
                }
                guard !addresses.isEmpty else { throw stubError(key, "no server address") }
                resolver.stubZones.append(.init(zone: name, addresses: addresses))
            }
            // TOMLKit's keys are unordered: file order is line order.
            resolver.stubZones.sort { a, b in
                let la = index.line(of: ["dns", "stub_zones", a.zone]) ?? 0
                let lb = index.line(of: ["dns", "stub_zones", b.zone]) ?? 0
                return la != lb ? la < lb : a.zone < b.zone
            }
        }
        configuration.dns = resolver

        // [remote]
        let remote = Section(parser: self, name: "remote", table: root["remote"]?.table)
        var settings = RemoteDeliverySettings(heloName: configuration.hostname,
                                              transportTable: ConfigPath.resolve("transport", relativeTo: directory))
        if let limit = try remote.integer("destination_concurrency_limit") {
            guard (1...1000).contains(limit) else {
                throw remote.error("destination_concurrency_limit", "must be from 1 to 1000")
            }
            settings.destinationConcurrencyLimit = limit
        }
        if let jobs = try remote.integer("max_jobs") {
            // The deliver protocol's HELLO allows 1-256 jobs in flight.
            guard (1...256).contains(jobs) else { throw remote.error("max_jobs", "must be from 1 to 256") }
            settings.maxJobs = jobs
        }
        try remote.duration("connect_timeout", into: &settings.connectTimeout)
        if !(1...600).contains(settings.connectTimeout) {
            throw remote.error("connect_timeout", "must be from 1 second to 600 seconds")
        }
        try remote.duration("connection_cache_time", into: &settings.connectionCacheTime)
        if settings.connectionCacheTime > 300 {
            throw remote.error("connection_cache_time", "must be at most 300 seconds")
        }
        if let limit = try remote.integer("connection_reuse_limit") {
            guard (1...100_000).contains(limit) else {
                throw remote.error("connection_reuse_limit", "must be from 1 to 100000")
            }
            settings.connectionReuseLimit = limit
        }
        // RFC 5321 section 5.1 asks a client to try at least two.
        let hostLimit = "must be 0 (no limit) or from 2 to 100"
        if let limit = try remote.integer("mx_address_limit") {
            guard limit == 0 || (2...100).contains(limit) else { throw remote.error("mx_address_limit", hostLimit) }
            settings.mxAddressLimit = limit
        }
        if let limit = try remote.integer("mx_session_limit") {
            guard limit == 0 || (2...100).contains(limit) else { throw remote.error("mx_session_limit", hostLimit) }
            settings.mxSessionLimit = limit
        }
        if let address = try remote.string("source_address"), !address.isEmpty {
            guard ConfigValues.isIPv4(address) else {
                throw remote.error("source_address", "not an IPv4 address: \(Self.quote(address))")
            }
            settings.sourceAddress = address
        }
        if let address = try remote.string("source_address_ipv6"), !address.isEmpty {
            guard ConfigValues.isIPv6(address) else {
                throw remote.error("source_address_ipv6", "not an IPv6 address: \(Self.quote(address))")
            }
            settings.sourceAddressIPv6 = address
        }
        if let preference = try remote.string("address_preference") {
            guard let value = RemoteDeliverySettings.AddressPreference(rawValue: preference) else {
                throw remote.error("address_preference", "expected \"ipv6\", \"ipv4\" or \"any\", found \(Self.quote(preference))")
            }
            settings.addressPreference = value
        }
        if let choice = try remote.string("eight_bit_without_8bitmime") {
            guard let value = RemoteDeliverySettings.EightBitWithout8BITMIME(rawValue: choice) else {
                throw remote.error("eight_bit_without_8bitmime",
                                   "expected \"convert\", \"send\" or \"bounce\", found \(Self.quote(choice))")
            }
            settings.eightBitWithout8BITMIME = value
        }
        if let name = try remote.string("helo_name"), !name.isEmpty {
            let lower = name.lowercased()
            guard ConfigValues.isValidDomain(lower) else {
                throw remote.error("helo_name", "not a host name: \(Self.quote(name))")
            }
            settings.heloName = lower
        }
        if let path = try remote.string("transport_table") {
            guard !path.isEmpty else { throw remote.error("transport_table", "must not be empty") }
            settings.transportTable = ConfigPath.resolve(path, relativeTo: directory)
        }
        configuration.remote = settings
    }

    private func stubError(_ key: String, _ message: String) -> ConfigError {
        ConfigError(file: file, line: index.line(of: ["dns", "stub_zones", String(key.dropFirst("stub_zones.".count))]),
                    key: "dns." + key, message: message)
    }

    /// A list of zone names, lower-cased, without the trailing dot.
    private func zones(_ section: Section, _ key: String) throws(ConfigError) -> [String]? {
        guard let names = try section.strings(key) else { return nil }
        var result: [String] = []
        for name in names {
            guard let zone = Self.zoneName(name) else {
                throw section.error(key, "not a zone name: \(Self.quote(name))")
            }
            if !result.contains(zone) { result.append(zone) }
        }
        return result
    }

    static func zoneName(_ text: String) -> String? {
        var name = text.lowercased()
        if name.hasSuffix(".") && name.count > 1 { name.removeLast() }
        return ConfigValues.isValidDomain(name) ? name : nil
    }
}

extension ConfigValues {
    /// A DNS server: "ADDRESS" or "ADDRESS@PORT" with an IPv4 or IPv6
    /// literal (unbound's forward-addr syntax). Returns nil when valid,
    /// else the reason.
    public static func nameServerError(_ text: String) -> String? {
        var address = Substring(text)
        if let at = text.lastIndex(of: "@") {
            address = text[..<at]
            let port = text[text.index(after: at)...]
            guard !port.isEmpty, port.count <= 5, port.allSatisfy({ $0.isASCII && $0.isNumber }),
                  let number = Int(port), (1...65535).contains(number)
            else { return "not a port (1-65535) after \"@\"" }
        }
        guard addressBytes(String(address)) != nil else {
            return "expected an IP address, optionally @PORT"
        }
        return nil
    }
}
