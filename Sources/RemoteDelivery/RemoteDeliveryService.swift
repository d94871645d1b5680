// Wiring for the remote-deliver stage: settings from the configuration and
// (until sealpost.toml has a [remote] section) the environment, and the
// transport table next to the configuration file.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import SealpostConfig

public struct RemoteSetupError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public enum RemoteDeliveryService {
    /// `Config/transport`: the file "transport" in the directory of the
    /// configuration file.
    public static func transportTablePath(_ config: SealpostConfiguration) -> String {
        let file = config.file
        guard let slash = file.lastIndex(of: "/") else { return "transport" }
        return String(file[..<slash]) + "/transport"
    }

    /// Settings from the configuration and these environment variables
    /// (each stands for the proposed `[remote]` key of the same name):
    /// SEALPOST_REMOTE_DESTINATION_CONCURRENCY_LIMIT (1-1000, default 20),
    /// SEALPOST_REMOTE_MAX_JOBS (1-256, default 100),
    /// SEALPOST_REMOTE_CONNECT_TIMEOUT (seconds, 1-600, default 30),
    /// SEALPOST_REMOTE_CONNECTION_CACHE_TIME (seconds, 0-300, default 2),
    /// SEALPOST_REMOTE_SOURCE_ADDRESS, SEALPOST_REMOTE_SOURCE_ADDRESS_IPV6
    /// (an IP address each), SEALPOST_REMOTE_ADDRESS_PREFERENCE (ipv6,
    /// ipv4, any), SEALPOST_REMOTE_MAXIMUM_PHASE_TIMEOUT (seconds; caps the
    /// RFC 5321 timeouts, for tests).
    public static func settings(_ config: SealpostConfiguration,
                                environment: (String) -> String? = { getenv($0).map { String(cString: $0) } }) throws(RemoteSetupError) -> RemoteSettings {
        var s = RemoteSettings(hostname: config.hostname)
        s.maximumMessageSize = config.queue.messageSizeLimit + 1_048_576
        func integer(_ name: String, _ range: ClosedRange<Int>) throws(RemoteSetupError) -> Int? {
            guard let v = environment(name), !v.isEmpty else { return nil }
            guard let n = Int(v), range.contains(n) else {
                throw RemoteSetupError("\(name): expected an integer from \(range.lowerBound) to \(range.upperBound), got \"\(v)\"")
            }
            return n
        }
        func address(_ name: String, ipv6: Bool) throws(RemoteSetupError) -> String? {
            guard let v = environment(name), !v.isEmpty else { return nil }
            guard ipv6 ? TransportTable.isIPv6(v) : TransportTable.isIPv4(v) else {
                throw RemoteSetupError("\(name): not an \(ipv6 ? "IPv6" : "IPv4") address: \"\(v)\"")
            }
            return v
        }
        if let n = try integer("SEALPOST_REMOTE_DESTINATION_CONCURRENCY_LIMIT", 1...1000) { s.destinationConcurrencyLimit = n }
        if let n = try integer("SEALPOST_REMOTE_MAX_JOBS", 1...256) { s.maxJobs = n }
        if let n = try integer("SEALPOST_REMOTE_CONNECT_TIMEOUT", 1...600) { s.connectTimeout = n }
        if let n = try integer("SEALPOST_REMOTE_CONNECTION_CACHE_TIME", 0...300) { s.connectionCacheTime = n }
        if let n = try integer("SEALPOST_REMOTE_MAXIMUM_PHASE_TIMEOUT", 1...3600) { s.maximumPhaseTimeout = n }
        s.sourceIPv4 = try address("SEALPOST_REMOTE_SOURCE_ADDRESS", ipv6: false)
        s.sourceIPv6 = try address("SEALPOST_REMOTE_SOURCE_ADDRESS_IPV6", ipv6: true)
        if let v = environment("SEALPOST_REMOTE_ADDRESS_PREFERENCE"), !v.isEmpty {
            guard let p = AddressPreference(rawValue: v) else {
                throw RemoteSetupError("SEALPOST_REMOTE_ADDRESS_PREFERENCE: expected ipv6, ipv4 or any, got \"\(v)\"")
            }
            s.addressPreference = p
        }
        return s
    }

    /// The DNSSEC-validating resolver (DNS module), configured by the
    /// proposed `[dns]` keys, for now these environment variables:
    /// SEALPOST_DNS_FORWARDERS ("ADDR[@PORT],..."; empty: full recursion),
    /// SEALPOST_DNS_TRUST_ANCHORS (files, comma-separated; empty: the root
    /// key when installed), SEALPOST_DNS_RESOLVE_ZONES (special-use zones
    /// to resolve anyway, e.g. "test" for a test bed).
    public static func makeResolver(environment: (String) -> String? = { getenv($0).map { String(cString: $0) } }) throws(RemoteSetupError) -> UnboundMailExchangerResolver {
        func list(_ name: String) -> [String] {
            (environment(name) ?? "").split(separator: ",").map { String($0).trimmingSpaces() }.filter { !$0.isEmpty }
        }
        do {
            return try UnboundMailExchangerResolver.make(forwarders: list("SEALPOST_DNS_FORWARDERS"),
                                                         trustAnchors: list("SEALPOST_DNS_TRUST_ANCHORS"),
                                                         resolveZones: list("SEALPOST_DNS_RESOLVE_ZONES"))
        } catch {
            throw RemoteSetupError("DNS resolver: \(error)")
        }
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first == " " { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        return String(s)
    }
}
