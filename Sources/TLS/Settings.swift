// What a TLS context is built from, and what a client asks of its peer.
// Plain values: the configuration (CryptoNegotiation) and the stage
// protocol requests translate into these.

/// TLS protocol versions Sealpost may speak; older ones are not offered
/// (SSLv3, TLS 1.0 and 1.1 are broken or deprecated, RFC 8996).
public enum TLSProtocolVersion: String, Sendable, Comparable, CaseIterable {
    case tls12 = "TLSv1.2"
    case tls13 = "TLSv1.3"

    var openSSLValue: Int32 { self == .tls12 ? 0x0303 : 0x0304 }

    public static func < (a: Self, b: Self) -> Bool { a.openSSLValue < b.openSSLValue }
}

/// A certificate chain (PEM: leaf first, then intermediates) and its
/// private key (PEM). `names`: the SNI host names for which this pair is
/// chosen (`*.example.org` matches one label); empty: the default pair.
/// Pairs with the same names (e.g. one RSA and one ECDSA) are served side by
/// side and OpenSSL chooses by the client's signature algorithms.
public struct CertificateKeyPair: Sendable, Equatable {
    public var certificateFile: String
    public var keyFile: String
    public var names: [String]

    public init(certificateFile: String, keyFile: String, names: [String] = []) {
        self.certificateFile = certificateFile
        self.keyFile = keyFile
        self.names = names
    }
}

/// Settings shared by both roles.
public struct TLSCommonSettings: Sendable, Equatable {
    /// Versions allowed (default TLS 1.2 and 1.3); a contiguous range is used
    /// from the lowest to the highest listed.
    public var protocols: Set<TLSProtocolVersion> = [.tls12, .tls13]
    /// TLS 1.2 cipher list: forward-secret (ECDHE) AEAD suites only. TLS 1.3
    /// suites are all AEAD and forward secret; OpenSSL's default set is kept.
    /// The server role and every client handshake that authenticates the
    /// peer or requires TLS use it; opportunistic client handshakes use
    /// `TLSClientCiphers.opportunisticDefault` instead.
    public var cipherList = TLSClientCiphers.strictDefault
    /// Key exchange groups, in preference order.
    public var groups = "X25519:P-256"

    public init() {}
}

public struct TLSServerSettings: Sendable, Equatable {
    public var certificates: [CertificateKeyPair]
    public var common = TLSCommonSettings()
    /// Session resumption with stateless tickets (TLS 1.3 and 1.2).
    public var sessionTickets = true

    public init(certificates: [CertificateKeyPair]) {
        self.certificates = certificates
    }
}

/// Which TLS 1.2 cipher list a client handshake offers. The versions stay
/// TLS 1.2 and 1.3 either way, and TLS 1.3's suites are the same.
public enum TLSClientCiphers: String, Sendable, Equatable {
    /// The server role's list (forward-secret AEAD only): for handshakes
    /// that authenticate the peer (PKIX, DANE, pins) or whose failure
    /// defers the mail (TLS required, `encrypt`).
    case strict
    /// For opportunistic TLS (RFC 7435), where a failed handshake means
    /// clear text: any reasonable encryption is better than none, so older
    /// servers' suites are offered too (Postfix's smtp_tls_ciphers =
    /// medium for its `may` level does the same).
    case opportunistic

    /// ECDHE with AES-GCM or ChaCha20-Poly1305.
    public static let strictDefault = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

    /// In order of preference: the strict suites, ECDHE with AES-CBC, then
    /// RSA key exchange with AES-GCM and AES-CBC (`openssl ciphers -v` lists
    /// 20 TLS 1.2 suites, from ECDHE-ECDSA-AES256-GCM-SHA384 to AES128-SHA).
    /// Left out: RC4, 3DES, DES, NULL encryption, anonymous (aNULL), export,
    /// MD5 MACs, Camellia/ARIA/SEED (no AES-less MX in practice), AES-CCM
    /// (no MX offers it; CCM8's tag is short), PSK/SRP (no such
    /// credentials here), and DHE: an old server with DHE often has
    /// 1024-bit groups, which OpenSSL 3 refuses at its default security
    /// level (2: "dh key too small"), so a DHE suite the server picks would
    /// fail a handshake that RSA key exchange would have completed.
    /// TLS 1.0 and 1.1 stay off (RFC 8996; `protocols` refuses them): with
    /// OpenSSL 3 at security level 1 or more their ECDHE handshakes fail
    /// anyway (MD5+SHA-1 signatures), and only RSA key exchange would work.
    public static let opportunisticDefault =
        "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:RSA+AESGCM:RSA+AES:!AESCCM:!aNULL:!eNULL:!PSK:!SRP:!DSS:!MD5:!3DES:!RC4:!EXP"
}

/// One TLSA record (RFC 6698) as OpenSSL's DANE verifier takes it.
public struct TLSARecord: Sendable, Equatable {
    public var usage: UInt8          // 2 DANE-TA, 3 DANE-EE (0 and 1 are not used for SMTP, RFC 7672)
    public var selector: UInt8       // 0 full certificate, 1 SubjectPublicKeyInfo
    public var matchingType: UInt8   // 0 exact, 1 SHA-256, 2 SHA-512
    public var data: [UInt8]

    public init(usage: UInt8, selector: UInt8, matchingType: UInt8, data: [UInt8]) {
        self.usage = usage
        self.selector = selector
        self.matchingType = matchingType
        self.data = data
    }
}

/// How a client authenticates the server it reached.
public enum VerificationPolicy: Sendable, Equatable {
    /// Encrypt only; the outcome a PKIX check would have had is still
    /// reported (`verifyError`) for shadow enforcement.
    case none
    /// PKIX: a chain to the CA bundle and one of `names` in the certificate
    /// (`*.example.org` in a certificate matches one label).
    case pkix(names: [String])
    /// DANE (RFC 7671/7672): OpenSSL's verifier with the records; names
    /// are checked for usage 2 (DANE-TA) only.
    case dane(records: [TLSARecord], names: [String])
    /// The SHA-256 digest of the leaf's SubjectPublicKeyInfo is one of these.
    case pin(spkiSHA256: [[UInt8]])
}

/// How the peer was authenticated, as reported to the caller and logged.
public enum PeerAuthentication: String, Sendable, Equatable {
    /// Encrypted, peer not authenticated.
    case encrypted
    case pkix
    case daneEE = "dane-ee"
    case daneTA = "dane-ta"
    case pin
}

/// What a completed handshake yields.
public struct TLSReport: Sendable, Equatable {
    public var protocolVersion: String      // "TLSv1.3"
    public var cipher: String               // "TLS_AES_256_GCM_SHA384"
    public var group: String?               // "x25519", "secp256r1"
    public var serverName: String?          // SNI received (server) or sent (client)
    public var peerSubject: String?         // RFC 2253
    public var peerSPKISHA256: String?      // lower-case hex
    public var authentication: PeerAuthentication
    /// Why PKIX verification failed or would have failed (nil: it passed,
    /// or there was nothing to verify).
    public var verifyError: String?
    public var resumed: Bool

    public init(protocolVersion: String, cipher: String, group: String? = nil, serverName: String? = nil,
                peerSubject: String? = nil, peerSPKISHA256: String? = nil, authentication: PeerAuthentication,
                verifyError: String? = nil, resumed: Bool = false) {
        self.protocolVersion = protocolVersion
        self.cipher = cipher
        self.group = group
        self.serverName = serverName
        self.peerSubject = peerSubject
        self.peerSPKISHA256 = peerSPKISHA256
        self.authentication = authentication
        self.verifyError = verifyError
        self.resumed = resumed
    }
}

/// Hex helpers (lower case) for digests.
public enum Hex {
    public static func encode(_ bytes: some Sequence<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    /// nil unless an even number of hex digits (either case).
    public static func decode(_ text: some StringProtocol) -> [UInt8]? {
        let u = Array(text.utf8)
        guard u.count % 2 == 0 else { return nil }
        func v(_ c: UInt8) -> UInt8? {
            switch c {
            case 0x30...0x39: c - 0x30
            case 0x61...0x66: c - 0x61 + 10
            case 0x41...0x46: c - 0x41 + 10
            default: nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(u.count / 2)
        var i = 0
        while i < u.count {
            guard let hi = v(u[i]), let lo = v(u[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}
