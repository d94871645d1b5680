// Errors of the TLS module. OpenSSL reports failures through a per-thread
// error queue; every failure here drains it into the message, so that the
// next operation (of another session on the same thread) starts clean.

import COpenSSL

/// A TLS failure with what the log line and the caller need: an RFC 3463
/// enhanced status code, a reason, and for verification failures the
/// verifier's own words.
public struct TLSError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// A certificate, key or CA file could not be loaded, or a setting was refused.
        case configuration
        /// The handshake failed (protocol version, ciphers, alerts, I/O).
        case handshake
        /// The peer's certificate did not satisfy the policy (PKIX, DANE, pin).
        case verification
        /// The peer went away or timed out.
        case connection
    }
    public var kind: Kind
    public var message: String
    /// X509_verify_cert_error_string of the verification result, when one failed.
    public var verifyError: String?

    public init(_ kind: Kind, _ message: String, verifyError: String? = nil) {
        self.kind = kind
        self.message = message
        self.verifyError = verifyError
    }

    /// RFC 3463: 4.7.5 cryptographic failure (handshake, verification),
    /// 4.4.2 bad connection (peer gone, timeout), 4.3.5 system configuration.
    public var enhancedStatus: String {
        switch kind {
        case .configuration: "4.3.5"
        case .handshake, .verification: "4.7.5"
        case .connection: "4.4.2"
        }
    }

    public var description: String {
        if let verifyError, !message.contains(verifyError) { return "\(message) (\(verifyError))" }
        return message
    }

    /// `what` followed by every error OpenSSL queued, oldest first; empties the queue.
    static func openSSL(_ kind: Kind, _ what: String) -> TLSError {
        let queued = drainErrorQueue()
        return TLSError(kind, queued.isEmpty ? what : "\(what): \(queued.joined(separator: "; "))")
    }
}

/// The OpenSSL error queue of this thread as strings (reason only, e.g.
/// "unsupported protocol"), emptied.
func drainErrorQueue() -> [String] {
    var out: [String] = []
    while true {
        let code = ERR_get_error()
        if code == 0 { break }
        if let reason = ERR_reason_error_string(code) {
            out.append(String(cString: reason))
        } else {
            var buf = [CChar](repeating: 0, count: 256)
            ERR_error_string_n(code, &buf, buf.count)
            out.append(String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
    }
    return out
}
