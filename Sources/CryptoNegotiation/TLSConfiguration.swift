// The settings of crypto-negotiate, from the [tls] section of
// Config/sealpost.toml (SealpostConfig's `TLSSettings`, which checks the
// syntax and reports errors with file, line and key), translated into the
// TLS module's values.

import SealpostConfig
import TLS

public struct TLSConfiguration: Sendable, Equatable {
    public var server: TLSServerSettings
    /// CA bundles by name; "default" is `ca_file`.
    public var caBundles: [String: String]
    public var common: TLSCommonSettings
    /// The client role's TLS 1.2 list for opportunistic handshakes
    /// (`opportunistic` in NEGOTIATE); `common.cipherList` is the strict one.
    public var opportunisticCipherList = TLSClientCiphers.opportunisticDefault
    public var timeouts: RelayTimeouts

    public init(server: TLSServerSettings, caBundles: [String: String] = [:], timeouts: RelayTimeouts = RelayTimeouts()) {
        self.server = server
        self.caBundles = caBundles
        self.common = server.common
        self.timeouts = timeouts
    }

    /// From the configuration's [tls] section.
    public init(_ settings: TLSSettings) {
        var server = TLSServerSettings(certificates: settings.certificates.map {
            CertificateKeyPair(certificateFile: $0.certificateFile, keyFile: $0.keyFile, names: $0.names)
        })
        server.common.protocols = Set(settings.protocols.compactMap(TLSProtocolVersion.init(rawValue:)))
        server.sessionTickets = settings.sessionTickets
        self.init(server: server, caBundles: settings.allCABundles,
                  timeouts: RelayTimeouts(handshake: Double(settings.handshakeTimeout), idle: Double(settings.idleTimeout)))
        if let list = settings.clientOpportunisticCiphers { opportunisticCipherList = list }
    }
}
