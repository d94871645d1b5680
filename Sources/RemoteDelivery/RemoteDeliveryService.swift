// Wiring for the remote-deliver stage: settings from the configuration's
// [sealpost], [queue], [dns] and [remote] sections, and the transport table
// `remote.transport_table` (default: "transport" beside the file).

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DNS
import SealpostConfig

public struct RemoteSetupError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public enum RemoteDeliveryService {
    /// `remote.transport_table`, absolute.
    public static func transportTablePath(_ config: SealpostConfiguration) -> String {
        config.remote.transportTable
    }

    /// The agent's settings from `[remote]` (validated by SealpostConfig)
    /// and `queue.message_size_limit`.
    public static func settings(_ config: SealpostConfiguration) -> RemoteSettings {
        let remote = config.remote
        var s = RemoteSettings(hostname: remote.heloName)
        s.myHostnames = [config.hostname]   // and the EHLO name, `hostname`
        s.ownEndpoints = config.smtp.listen.compactMap(SelfRecognition.Endpoint.init)
        s.maximumMessageSize = config.queue.messageSizeLimit + 1_048_576
        s.destinationConcurrencyLimit = remote.destinationConcurrencyLimit
        s.maxJobs = remote.maxJobs
        s.connectTimeout = remote.connectTimeout
        s.connectionCacheTime = remote.connectionCacheTime
        s.connectionReuseLimit = remote.connectionReuseLimit
        s.mxAddressLimit = remote.mxAddressLimit
        s.mxSessionLimit = remote.mxSessionLimit
        s.sourceIPv4 = remote.sourceAddress
        s.sourceIPv6 = remote.sourceAddressIPv6
        switch remote.eightBitWithout8BITMIME {
        case .convert: s.eightBitWithout8BITMIME = .convert
        case .send: s.eightBitWithout8BITMIME = .send
        case .bounce: s.eightBitWithout8BITMIME = .bounce
        }
        switch remote.addressPreference {
        case .ipv6: s.addressPreference = .ipv6
        case .ipv4: s.addressPreference = .ipv4
        case .any: s.addressPreference = .any
        }
        return s
    }

    /// The DNSSEC-validating resolver (libunbound) configured by `[dns]`.
    /// Fails for an unreadable trust anchor or a server unbound refuses.
    /// Every file it needs is read here (the DNS module loads eagerly):
    /// the stage may drop privileges and chroot right after.
    public static func makeResolver(_ config: SealpostConfiguration) throws(RemoteSetupError) -> UnboundMailExchangerResolver {
        do {
            return try UnboundMailExchangerResolver.make(ResolverConfiguration(config.dns))
        } catch {
            throw RemoteSetupError("\(config.file): [dns]: \(error)")
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
