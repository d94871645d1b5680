// The [tls] section: what crypto-negotiate serves and trusts.
//
//   [tls]
//   [[tls.certificates]]                 server role (STARTTLS, port 465)
//   cert = "$data_directory/tls/self-signed-ecdsa.crt"   chain, leaf first (PEM)
//   key = "$data_directory/tls/self-signed-ecdsa.key"    its private key (PEM)
//   names = []                           SNI names; empty: the default pair
//   ca_file = "/etc/ssl/certs/ca-certificates.crt"   CA bundle "default" (client role)
//   ca_bundles = { mta-sts = "..." }     more bundles, by name
//   protocols = ["TLSv1.2", "TLSv1.3"]
//   client_opportunistic_ciphers = "..."  TLS 1.2 list for opportunistic delivery
//   session_tickets = true
//   handshake_timeout = "60s"
//   idle_timeout = "300s"
//
// Paths: absolute, relative to the directory of the configuration file, or
// starting with "$data_directory/" (as Postfix expands $data_directory):
// the self-signed pair that Pipeline/start creates lives there, and the
// configuration must find it wherever the data directory is.
//
// Only syntax is checked here; whether the files can be read (and match)
// is crypto-negotiate's business when it loads them, as root, at start-up.

/// One certificate chain and its key, served for `names` (SNI).
public struct TLSCertificateSettings: Sendable, Equatable {
    /// Absolute.
    public var certificateFile: String
    /// Absolute.
    public var keyFile: String
    /// Lower-cased host names, "*.example.org" allowed; empty: the default.
    public var names: [String]

    public init(certificateFile: String, keyFile: String, names: [String] = []) {
        self.certificateFile = certificateFile
        self.keyFile = keyFile
        self.names = names
    }
}

public struct TLSSettings: Sendable, Equatable {
    /// The server role's certificates. Empty: no server role (smtp-listen
    /// then offers neither STARTTLS nor port 465).
    public var certificates: [TLSCertificateSettings]
    /// The CA bundle named "default" (PKIX checks in the client role:
    /// MTA-STS, `verify` policies), absolute; nil: none.
    public var caFile: String?
    /// More CA bundles by name (absolute paths); "default" is `caFile`.
    public var caBundles: [String: String]
    /// "TLSv1.2" and/or "TLSv1.3"; older versions are not supported
    /// (RFC 8996).
    public var protocols: [String]
    /// The OpenSSL TLS 1.2 cipher list remote delivery offers where a
    /// failed handshake means clear text (opportunistic TLS); nil: the TLS
    /// module's default (TLSClientCiphers.opportunisticDefault). Checked
    /// here for its syntax only; crypto-negotiate refuses at start a list
    /// OpenSSL does not take or one that enables weak suites.
    public var clientOpportunisticCiphers: String?
    /// Resumption with stateless tickets (server role).
    public var sessionTickets: Bool
    /// Seconds a handshake may take (1..3600).
    public var handshakeTimeout: Int
    /// Seconds a relayed session may stay silent (1..86400).
    public var idleTimeout: Int

    public static let knownProtocols = ["TLSv1.2", "TLSv1.3"]
    /// The file names of the pair Pipeline/start creates in `<data>/tls/`.
    public static let selfSignedFiles = [("self-signed-ecdsa.crt", "self-signed-ecdsa.key"),
                                         ("self-signed-rsa.crt", "self-signed-rsa.key")]

    /// The defaults of the shipped file: the self-signed pair in
    /// `tlsDirectory` (data/tls), Debian's CA bundle.
    public init(tlsDirectory: String) {
        certificates = Self.selfSignedFiles.map {
            TLSCertificateSettings(certificateFile: ConfigPath.join(tlsDirectory, $0.0),
                                   keyFile: ConfigPath.join(tlsDirectory, $0.1))
        }
        caFile = "/etc/ssl/certs/ca-certificates.crt"
        caBundles = [:]
        protocols = Self.knownProtocols
        clientOpportunisticCiphers = nil
        sessionTickets = true
        handshakeTimeout = 60
        idleTimeout = 300
    }

    /// Every CA bundle by name, "default" included when set.
    public var allCABundles: [String: String] {
        var all = caBundles
        if let caFile { all["default"] = caFile }
        return all
    }
}

extension ConfigParser {
    static let tlsKeys = ["certificates", "ca_file", "ca_bundles", "protocols", "client_opportunistic_ciphers",
                          "session_tickets", "handshake_timeout", "idle_timeout"]
    static let certificateKeys = ["cert", "key", "names"]

    /// Reads [tls] into `configuration.tls` (whose defaults are set).
    func parseTLS(_ table: TOMLTable?, into configuration: inout SealpostConfiguration) throws(ConfigError) {
        let tls = Section(parser: self, name: "tls", table: table)
        // The defaults follow the data directory read above.
        var settings = TLSSettings(tlsDirectory: configuration.tlsDirectory)
        let directory = ConfigPath.directory(of: absoluteFile)
        let data = configuration.dataDirectory
        func path(_ text: String, _ key: String) throws(ConfigError) -> String {
            guard !text.isEmpty else { throw tls.error(key, "must not be empty") }
            if text == "$data_directory" { return data }
            if text.hasPrefix("$data_directory/") {
                return ConfigPath.resolve(String(text.dropFirst("$data_directory/".count)), relativeTo: data)
            }
            if text.hasPrefix("$") {
                throw tls.error(key, "unknown variable in \(Self.quote(text)) (only $data_directory is known)")
            }
            return ConfigPath.resolve(text, relativeTo: directory)
        }

        if let value = table?["certificates"] {
            guard let array = value.array else {
                throw tls.error("certificates", "expected [[tls.certificates]] tables, found \(Self.describe(value.type))")
            }
            var certificates: [TLSCertificateSettings] = []
            for index in 0..<array.count {
                // Errors name "certificates.N.key" (0-based, as written in
                // the file's order); the index knows the line of each table.
                let entry = "certificates.\(index)"
                guard let item = array[index].table else {
                    throw tls.error(entry, "expected a table {cert, key, names}, found \(Self.describe(array[index].type))")
                }
                let section = Section(parser: self, name: "tls.\(entry)", table: item)
                for key in item.keys where !Self.certificateKeys.contains(key) {
                    throw section.error(key, "unknown key (known in [[tls.certificates]]: \(Self.certificateKeys.joined(separator: ", ")))")
                }
                guard let cert = try section.string("cert") else { throw tls.error(entry, "missing key \"cert\"") }
                guard let key = try section.string("key") else { throw tls.error(entry, "missing key \"key\"") }
                var names: [String] = []
                for name in try section.strings("names") ?? [] {
                    guard Self.isHostPattern(name) else {
                        throw section.error("names", "not a host name (\"*.\" allowed as the first label): \(Self.quote(name))")
                    }
                    let lower = name.lowercased()
                    if !names.contains(lower) { names.append(lower) }
                }
                certificates.append(TLSCertificateSettings(certificateFile: try path(cert, "\(entry).cert"),
                                                           keyFile: try path(key, "\(entry).key"), names: names))
            }
            settings.certificates = certificates
        }
        if let caFile = try tls.string("ca_file") {
            // "" says: no default bundle (DANE and pins need none).
            settings.caFile = caFile.isEmpty ? nil : try path(caFile, "ca_file")
        }
        if let value = table?["ca_bundles"] {
            guard let bundles = value.table else {
                throw tls.error("ca_bundles", "expected a table of name = path, found \(Self.describe(value.type))")
            }
            let section = Section(parser: self, name: "tls.ca_bundles", table: bundles)
            var map: [String: String] = [:]
            for name in bundles.keys {
                guard name != "default" else {
                    throw section.error(name, "\"default\" is ca_file; give this bundle another name")
                }
                guard let file = try section.string(name) else { continue }
                map[name] = try path(file, "ca_bundles.\(name)")
            }
            settings.caBundles = map
        }
        if let protocols = try tls.strings("protocols") {
            guard !protocols.isEmpty else { throw tls.error("protocols", "must list at least one of TLSv1.2, TLSv1.3") }
            var seen: [String] = []
            for name in protocols {
                guard TLSSettings.knownProtocols.contains(name) else {
                    throw tls.error("protocols", "unsupported \(Self.quote(name)) (known: TLSv1.2, TLSv1.3; SSLv3, TLSv1 and TLSv1.1 are deprecated by RFC 8996)")
                }
                if !seen.contains(name) { seen.append(name) }
            }
            settings.protocols = seen
        }
        if let ciphers = try tls.string("client_opportunistic_ciphers") {
            try Self.checkCipherList(ciphers, in: tls, key: "client_opportunistic_ciphers")
            settings.clientOpportunisticCiphers = ciphers
        }
        if let value = table?["session_tickets"] {
            guard let flag = value.bool else {
                throw tls.error("session_tickets", "expected true or false, found \(Self.describe(value.type))")
            }
            settings.sessionTickets = flag
        }
        try tls.duration("handshake_timeout", into: &settings.handshakeTimeout)
        if !(1...3600).contains(settings.handshakeTimeout) {
            throw tls.error("handshake_timeout", "must be between 1s and 1h")
        }
        try tls.duration("idle_timeout", into: &settings.idleTimeout)
        if !(1...86400).contains(settings.idleTimeout) {
            throw tls.error("idle_timeout", "must be between 1s and 1d")
        }
        configuration.tls = settings
    }

    /// The syntax of an OpenSSL cipher list (ciphers(1)): names and
    /// aliases joined by "+", with "!", "-" or "+" before them, separated
    /// by ":", "," or spaces. "@" directives are refused: "@SECLEVEL"
    /// would lower the security level of the whole context (certificate
    /// key sizes, signature algorithms), not just choose suites.
    static func checkCipherList(_ list: String, in section: Section, key: String) throws(ConfigError) {
        guard !list.allSatisfy({ $0 == " " }) else {
            throw section.error(key, "must not be empty (leave the key out for the default list)")
        }
        if list.contains("@") {
            throw section.error(key, "\"@\" directives (@SECLEVEL, @STRENGTH) are not allowed: \(Self.quote(list))")
        }
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-!:,._ ")
        if let bad = list.first(where: { !allowed.contains($0) }) {
            throw section.error(key, "not an OpenSSL cipher list (character \(Self.quote(String(bad)))): \(Self.quote(list))")
        }
    }

    /// A DNS name, or one with "*." as its whole first label.
    static func isHostPattern(_ name: String) -> Bool {
        let rest = name.hasPrefix("*.") ? String(name.dropFirst(2)) : name
        guard !rest.contains("*") else { return false }
        return ConfigValues.isValidDomain(rest.lowercased())
    }
}

import TOMLKit
