// The settings of crypto-negotiate: the `[tls]` section proposed for
// Config/sealpost.toml. Until SealpostConfig knows that section, it is read
// from its own file with the same keys (SEALPOST_TLS_CONFIG, else tls.toml
// next to sealpost.toml):
//
//   [tls]
//   ca_file = "/etc/ssl/certs/ca-certificates.crt"  # CA bundle "default" (client role, PKIX)
//   protocols = ["TLSv1.2", "TLSv1.3"]             # allowed versions
//   session_tickets = true                         # server role: resumption with tickets
//   handshake_timeout = "60s"
//   idle_timeout = "300s"
//
//   [tls.ca_bundles]                               # more bundles, by name
//   mta-sts = "/etc/sealpost/mta-sts-ca.pem"
//
//   [[tls.certificate]]                            # server role; first without names = default
//   cert = "/etc/sealpost/mx-ecdsa.pem"            # chain: leaf first
//   key = "/etc/sealpost/mx-ecdsa.key"
//   names = []                                     # SNI names ("*.example.org" allowed)
//
// Relative paths are relative to the file's directory.

import SealpostConfig
import TLS
import TOMLKit

public struct TLSConfiguration: Sendable, Equatable {
    public var server: TLSServerSettings
    /// CA bundles by name; "default" is `ca_file`.
    public var caBundles: [String: String]
    public var common: TLSCommonSettings
    public var timeouts: RelayTimeouts

    public init(server: TLSServerSettings, caBundles: [String: String] = [:], timeouts: RelayTimeouts = RelayTimeouts()) {
        self.server = server
        self.caBundles = caBundles
        self.common = server.common
        self.timeouts = timeouts
    }

    /// SEALPOST_TLS_CONFIG, else `tls.toml` in the directory of `mainConfig`.
    public static func locate(mainConfig: String, environment: String?) -> String {
        if let environment, !environment.isEmpty { return environment }
        return directory(of: mainConfig) + "/tls.toml"
    }

    public static func load(path: String) throws(ConfigError) -> TLSConfiguration {
        let text: String
        do {
            text = try readFile(path)
        } catch {
            throw ConfigError(file: path, message: "cannot read: \(error)")
        }
        return try parse(text: text, file: path)
    }

    static let keys: Set<String> = ["ca_file", "protocols", "session_tickets", "handshake_timeout", "idle_timeout",
                                    "ca_bundles", "certificate"]
    static let certificateKeys: Set<String> = ["cert", "key", "names"]

    public static func parse(text: String, file: String) throws(ConfigError) -> TLSConfiguration {
        func fail(_ key: String?, _ message: String) -> ConfigError {
            ConfigError(file: file, key: key.map { "tls.\($0)" } ?? "tls", message: message)
        }
        let root: TOMLTable
        do {
            root = try TOMLTable(string: text)
        } catch {
            throw ConfigError(file: file, message: "TOML syntax error: \(error)")
        }
        for key in root.keys where key != "tls" {
            throw ConfigError(file: file, key: key, message: "unknown section (known: tls)")
        }
        guard let tls = root["tls"]?.table else { throw fail(nil, "missing section [tls]") }
        for key in tls.keys where !keys.contains(key) {
            throw fail(key, "unknown key (known in [tls]: \(keys.sorted().joined(separator: ", ")))")
        }
        let base = directory(of: file)
        func absolute(_ p: String) -> String { p.hasPrefix("/") ? p : base + "/" + p }
        func string(_ t: TOMLTable, _ key: String, _ name: String) throws(ConfigError) -> String? {
            guard let v = t[key] else { return nil }
            guard let s = v.string, !s.isEmpty else { throw fail(name, "expected a non-empty string") }
            return s
        }

        var certificates: [CertificateKeyPair] = []
        if let list = tls["certificate"] {
            guard let array = list.array else { throw fail("certificate", "expected [[tls.certificate]] tables") }
            for (i, item) in array.enumerated() {
                let name = "certificate[\(i)]"
                guard let t = item.table else { throw fail(name, "expected a table") }
                for key in t.keys where !certificateKeys.contains(key) {
                    throw fail("\(name).\(key)", "unknown key (known: cert, key, names)")
                }
                guard let cert = try string(t, "cert", "\(name).cert") else { throw fail("\(name).cert", "missing") }
                guard let key = try string(t, "key", "\(name).key") else { throw fail("\(name).key", "missing") }
                var names: [String] = []
                if let n = t["names"] {
                    guard let a = n.array else { throw fail("\(name).names", "expected an array of host names") }
                    for v in a {
                        guard let s = v.string, isHostPattern(s) else {
                            throw fail("\(name).names", "not a host name: \(v.string ?? "(not a string)")")
                        }
                        names.append(s.lowercased())
                    }
                }
                certificates.append(CertificateKeyPair(certificateFile: absolute(cert), keyFile: absolute(key), names: names))
            }
        }
        var server = TLSServerSettings(certificates: certificates)
        if let v = tls["protocols"] {
            guard let a = v.array, !a.isEmpty else { throw fail("protocols", "expected a non-empty array") }
            var set = Set<TLSProtocolVersion>()
            for item in a {
                guard let s = item.string, let p = TLSProtocolVersion(rawValue: s) else {
                    throw fail("protocols", "unknown protocol \(item.string ?? "(not a string)") (known: TLSv1.2, TLSv1.3)")
                }
                set.insert(p)
            }
            server.common.protocols = set
        }
        if let v = tls["session_tickets"] {
            guard let b = v.bool else { throw fail("session_tickets", "expected true or false") }
            server.sessionTickets = b
        }
        var bundles: [String: String] = [:]
        if let ca = try string(tls, "ca_file", "ca_file") { bundles["default"] = absolute(ca) }
        if let v = tls["ca_bundles"] {
            guard let t = v.table else { throw fail("ca_bundles", "expected a table of name = path") }
            for key in t.keys {
                guard let p = try string(t, key, "ca_bundles.\(key)") else { continue }
                bundles[key] = absolute(p)
            }
        }
        var timeouts = RelayTimeouts()
        for (key, assign) in [("handshake_timeout", { (x: Double) in timeouts.handshake = x }),
                              ("idle_timeout", { (x: Double) in timeouts.idle = x })] {
            guard let v = tls[key] else { continue }
            guard let seconds = duration(v), seconds >= 1 else {
                throw fail(key, "not a duration of at least 1s (an integer of seconds, or \"90s\", \"5m\", \"1h\")")
            }
            assign(Double(seconds))
        }
        var config = TLSConfiguration(server: server, caBundles: bundles, timeouts: timeouts)
        config.common = server.common
        return config
    }

    static func duration(_ v: TOMLValueConvertible) -> Int? {
        if let i = v.int { return i }
        guard let s = v.string, let unit = s.last, let n = Int(s.dropLast()) else { return nil }
        switch unit {
        case "s": return n
        case "m": return n * 60
        case "h": return n * 3600
        default: return nil
        }
    }

    static func isHostPattern(_ s: String) -> Bool {
        let rest = s.hasPrefix("*.") ? String(s.dropFirst(2)) : s
        guard !rest.isEmpty, rest.utf8.count <= 253 else { return false }
        return rest.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            (1...63).contains(label.utf8.count) && label.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
        }
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let d = String(path[..<slash])
        return d.isEmpty ? "/" : d
    }
}

struct FileReadError: Error, CustomStringConvertible {
    var description: String
}

#if canImport(Glibc)
import Glibc
#endif

/// The whole file as UTF-8 (the configuration is small).
func readFile(_ path: String) throws -> String {
    guard let f = fopen(path, "r") else { throw FileReadError(description: String(cString: strerror(errno))) }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n == 0 { break }
        bytes += buf[0..<n]
        if bytes.count > 1 << 20 { throw FileReadError(description: "larger than 1 MiB") }
    }
    return String(decoding: bytes, as: UTF8.self)
}
