// The TLS hand-off: the one function through which a connection's socket
// goes to crypto-negotiate after the server's "220" to STARTTLS, and a
// plaintext socket comes back. remote-deliver itself never links TLS.
//
// crypto-negotiate's `tls` protocol (frames NEGOTIATE/NEGOTIATED/FAILED/
// CLOSED, 64-67) takes the TCP socket with SCM_RIGHTS and answers with one
// end of a socketpair carrying the plaintext, plus a report (protocol,
// cipher, how the peer was authenticated). An implementation of
// `TLSClientHandOff` speaks it; when none is configured, STARTTLS is not
// used (policy "none" for "may", deferral for levels that require TLS).

import SMTP

/// What crypto-negotiate is asked to do for one connection.
public struct TLSClientRequest: Sendable, Hashable {
    /// SNI and, for PKIX, the default name to match: the MX host name.
    public var serverName: String
    /// "mx.example.net[192.0.2.1]:25", for its logs.
    public var peer: String
    public var verification: TLSVerification
    /// RFC 5321-style limit for the handshake, seconds.
    public var handshakeTimeout: Int
    /// A failed handshake means the message goes in clear text (RFC 7435:
    /// level "may", no verification, no REQUIRETLS): crypto-negotiate then
    /// offers its wider cipher list, since older encryption is better than
    /// none. Only with verification method `none`.
    public var opportunistic: Bool

    public init(serverName: String, peer: String, verification: TLSVerification, handshakeTimeout: Int = 300,
                opportunistic: Bool = false) {
        self.serverName = serverName
        self.peer = peer
        self.verification = verification
        self.handshakeTimeout = handshakeTimeout
        self.opportunistic = opportunistic
    }
}

/// A completed handshake.
public struct TLSClientHandOffResult: Sendable {
    /// The plaintext end (a connected stream socket) now owned by the caller.
    public var plaintext: Int32
    public var report: SMTPClientTLSReport
    /// "encrypted", "pkix", "dane-ee", "dane-ta", "pin" (crypto-negotiate's
    /// `authentication`), recorded per delivery.
    public var authentication: String

    public init(plaintext: Int32, report: SMTPClientTLSReport, authentication: String) {
        self.plaintext = plaintext
        self.report = report
        self.authentication = authentication
    }
}

public struct TLSHandOffError: Error, Sendable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Hands a connected socket to the TLS service and returns the plaintext.
public protocol TLSClientHandOff: Sendable {
    /// The service can be asked now (its socket exists). When false, the
    /// agent waits for it (RemoteSettings.tlsHandOffGrace), then makes the
    /// connection as if no hand-off were configured: clear text for "may",
    /// deferral for levels that require TLS.
    var isAvailable: Bool { get }
    /// Takes ownership of `socket` (it is closed whatever happens).
    func negotiate(socket: Int32, request: TLSClientRequest) async -> Result<TLSClientHandOffResult, TLSHandOffError>
}

extension TLSClientHandOff {
    public var isAvailable: Bool { true }
}

/// How the message travelled, recorded per delivery and logged as `tls=`.
public enum TLSOutcome: Sendable, Hashable, CustomStringConvertible {
    case none
    case encrypted(protocol: String, cipher: String)
    case authenticated(protocol: String, cipher: String, method: String)

    public var description: String {
        switch self {
        case .none: return "none"
        case .encrypted(let p, let c): return "\(p) \(c) unauthenticated"
        case .authenticated(let p, let c, let m): return "\(p) \(c) authenticated (\(m))"
        }
    }

    /// "none", "encrypted" or "authenticated".
    public var level: String {
        switch self {
        case .none: return "none"
        case .encrypted: return "encrypted"
        case .authenticated: return "authenticated"
        }
    }
}
