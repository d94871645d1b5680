// One TLS connection (an SSL object) on a non-blocking socket: handshake,
// reads and writes that report "would block" instead of blocking, the
// client's verification policy, and the report of what was negotiated.
//
// Thread-confined: one thread drives a connection (OpenSSL's error queue is
// per thread; every operation starts by clearing it).

#if canImport(Glibc)
import Glibc
#endif
import COpenSSL

public enum TLSRole: String, Sendable { case server, client }

/// The outcome of one non-blocking operation.
public enum TLSIOResult: Equatable {
    /// Bytes transferred (handshake/shutdown: 0, done).
    case done(Int)
    /// Call again when the socket is readable.
    case wantRead
    /// Call again when the socket is writable.
    case wantWrite
    /// The peer sent close_notify: no more data will come.
    case closeNotify
    /// The connection failed or the peer went away without close_notify.
    case failed(TLSError)
}

public final class TLSConnection {
    let ssl: OpaquePointer
    public let role: TLSRole
    /// Keeps the contexts (and the SNI callback's argument) alive.
    private let owner: AnyObject
    private let policy: VerificationPolicy
    /// The SNI this client sent (nil for an address literal: not sent).
    private let sentServerName: String?
    public private(set) var handshakeDone = false

    /// Server role on connected socket `fd` (not owned: the caller closes it).
    public init(server contexts: TLSServerContexts, fd: Int32) throws(TLSError) {
        ERR_clear_error()
        guard let ssl = SSL_new(contexts.defaultContext.ctx) else {
            throw TLSError.openSSL(.configuration, "SSL_new")
        }
        self.ssl = ssl
        self.role = .server
        self.owner = contexts
        self.policy = .none
        self.sentServerName = nil
        guard SSL_set_fd(ssl, fd) == 1 else { throw TLSError.openSSL(.configuration, "SSL_set_fd") }
        SSL_set_accept_state(ssl)
    }

    /// Client role on connected socket `fd` (not owned). `serverName`: sent
    /// as SNI when it is a host name, never when it is an IPv4 or IPv6
    /// address literal (RFC 6066 section 3 forbids them in HostName; a
    /// relayhost or an address-literal next hop is one); either way the
    /// reference identity of the certificate checks below. The policy is
    /// enforced by OpenSSL during the handshake (PKIX, DANE) or right after
    /// it (pins). `ciphers`: `.opportunistic` only with
    /// policy `.none`: a handshake that authenticates its peer keeps the
    /// strict list (see TLSClientCiphers).
    public init(client context: TLSClientContext, fd: Int32, serverName: String?,
                policy: VerificationPolicy, ciphers: TLSClientCiphers = .strict) throws(TLSError) {
        if ciphers == .opportunistic && policy != .none {
            throw TLSError(.configuration, "the opportunistic cipher list is only for handshakes that do not authenticate the peer")
        }
        // OpenSSL takes the names as C strings: one with a NUL byte would
        // be sent (SNI) and matched against the certificate only up to the
        // NUL ("mx.example.org\0.evil.example" as "mx.example.org").
        // Nothing upstream passes one (DNS names come escaped, frames and
        // the configuration refuse NUL), and here it stays so.
        var names = serverName.map { [$0] } ?? []
        switch policy {
        case .pkix(let reference), .dane(_, let reference): names += reference
        case .none, .pin: break
        }
        if let bad = names.first(where: { $0.utf8.contains(0) }) {
            throw TLSError(.configuration, "a server or reference name holds a NUL byte: \(bad.debugDescription)")
        }
        ERR_clear_error()
        guard let ssl = SSL_new(context.handle(ciphers).ctx) else {
            throw TLSError.openSSL(.configuration, "SSL_new")
        }
        self.ssl = ssl
        self.role = .client
        self.owner = context
        self.policy = policy
        let sni = serverName.flatMap { Self.isAddressLiteral($0) ? nil : $0 }
        self.sentServerName = sni
        guard SSL_set_fd(ssl, fd) == 1 else { throw TLSError.openSSL(.configuration, "SSL_set_fd") }
        SSL_set_connect_state(ssl)
        if let sni, sealpost_ssl_set_tlsext_host_name(ssl, sni) != 1 {
            throw TLSError.openSSL(.configuration, "SNI \(sni)")
        }
        // Reference names go through SSL_set1_host/SSL_add1_host, which since
        // OpenSSL 3.0 take an address literal as an IP address (matched
        // against iPAddress subjectAltNames, X509_VERIFY_PARAM_set1_ip_asc),
        // a name as a DNS name.
        switch policy {
        case .none, .pin:
            // OpenSSL still verifies the chain and records the result, which
            // is reported (verify-error) without failing the handshake.
            SSL_set_verify(ssl, SSL_VERIFY_NONE, nil)
            if let serverName { _ = SSL_set1_host(ssl, serverName) }
        case .pkix(let names):
            SSL_set_verify(ssl, SSL_VERIFY_PEER, nil)
            SSL_set_hostflags(ssl, Self.hostFlags)
            try Self.setNames(ssl, names)
        case .dane(let records, let names):
            // The TLSA base domain is a host name (TLSA records live under
            // names), and SSL_dane_enable would send an address given as
            // one as SNI.
            guard let base = names.first ?? serverName, !Self.isAddressLiteral(base) else {
                throw TLSError(.configuration, "DANE needs a host name")
            }
            guard SSL_dane_enable(ssl, base) > 0 else { throw TLSError.openSSL(.configuration, "SSL_dane_enable") }
            // RFC 7672 section 3.1.1: no name checks for DANE-EE(3).
            _ = SSL_dane_set_flags(ssl, UInt(DANE_FLAG_NO_DANE_EE_NAMECHECKS))
            SSL_set_hostflags(ssl, Self.hostFlags)
            for name in names.dropFirst() where SSL_add1_host(ssl, name) != 1 {
                throw TLSError.openSSL(.configuration, "reference name \(name)")
            }
            var usable = 0
            // RFC 7672 section 3.1.3: PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP.
            for r in records where r.usage == 2 || r.usage == 3 {
                let added = r.data.withUnsafeBufferPointer { p in
                    SSL_dane_tlsa_add(ssl, r.usage, r.selector, r.matchingType, p.baseAddress, p.count)
                }
                if added > 0 { usable += 1 }
                // 0: unusable (an unknown selector or matching type); < 0: malformed.
                // Either way it is skipped, as RFC 7672 section 2.2 says.
                ERR_clear_error()
            }
            guard usable > 0 else {
                throw TLSError(.verification, "no usable TLSA record (of \(records.count))")
            }
            SSL_set_verify(ssl, SSL_VERIFY_PEER, nil)
        }
    }

    /// An IPv4 or IPv6 address in text form (inet_pton's: no brackets).
    static func isAddressLiteral(_ name: String) -> Bool {
        // inet_pton reads a C string: a NUL would end the text early.
        guard !name.utf8.contains(0) else { return false }
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, name, &v4) == 1 || inet_pton(AF_INET6, name, &v6) == 1
    }

    private static func setNames(_ ssl: OpaquePointer, _ names: [String]) throws(TLSError) {
        var first = true
        for name in names {
            let ok = first ? SSL_set1_host(ssl, name) : SSL_add1_host(ssl, name)
            guard ok == 1 else { throw TLSError.openSSL(.configuration, "reference name \(name)") }
            first = false
        }
    }

    deinit { SSL_free(ssl) }

    // MARK: - I/O

    private func classify(_ ret: Int32, during what: String) -> TLSIOResult {
        let code = SSL_get_error(ssl, ret)
        let savedErrno = errno
        switch code {
        case SSL_ERROR_WANT_READ: return .wantRead
        case SSL_ERROR_WANT_WRITE: return .wantWrite
        case SSL_ERROR_ZERO_RETURN: return .closeNotify
        case SSL_ERROR_SYSCALL:
            let queued = drainErrorQueue()
            if !queued.isEmpty { return .failed(TLSError(.connection, "\(what): \(queued.joined(separator: "; "))")) }
            if savedErrno == 0 { return .failed(TLSError(.connection, "\(what): connection closed by the peer")) }
            return .failed(TLSError(.connection, "\(what): \(String(cString: strerror(savedErrno)))"))
        default:
            let verify = SSL_get_verify_result(ssl)
            let queued = drainErrorQueue()
            var message = queued.isEmpty ? "\(what) failed" : "\(what): \(queued.joined(separator: "; "))"
            // Only a verifying handshake fails for its verify result; under
            // SSL_VERIFY_NONE (policies none and pin) the result is recorded
            // for the report and the handshake failed for another reason.
            if !handshakeDone && verify != X509_V_OK && SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER != 0 {
                let reason = String(cString: X509_verify_cert_error_string(verify))
                message = "certificate verification failed: \(reason)"
                return .failed(TLSError(.verification, message, verifyError: reason))
            }
            return .failed(TLSError(handshakeDone ? .connection : .handshake, message))
        }
    }

    /// Name checks: no partial wildcards ("mx*.example.org"), and names
    /// from the subjectAltName only, never the subject's CN (RFC 6125
    /// 6.4.4 once a DNS-ID is required; RFC 8461 4.2 for MTA-STS).
    static let hostFlags = UInt32(X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | X509_CHECK_FLAG_NEVER_CHECK_SUBJECT)

    /// Drives the handshake; `.done(0)` once complete and the policy is satisfied.
    public func handshake() -> TLSIOResult {
        if handshakeDone { return .done(0) }
        ERR_clear_error()
        errno = 0
        let r = SSL_do_handshake(ssl)
        if r == 1 {
            handshakeDone = true
            if case .pin(let pins) = policy {
                let spki = peerSPKIDigest()
                guard let spki, pins.contains(spki) else {
                    return .failed(TLSError(.verification, spki == nil ? "the server sent no certificate"
                                            : "no pin matched the server's key (SPKI SHA-256 \(Hex.encode(spki!)))"))
                }
            }
            return .done(0)
        }
        if r == 0 {
            // Controlled shutdown by the protocol (e.g. an alert).
            let queued = drainErrorQueue()
            return .failed(TLSError(.handshake, queued.isEmpty ? "handshake: connection closed by the peer"
                                    : "handshake: \(queued.joined(separator: "; "))"))
        }
        switch classify(r, during: "handshake") {
        case .closeNotify: return .failed(TLSError(.handshake, "handshake: the peer closed the connection"))
        case .failed(var e):
            if e.kind == .connection { e.kind = .handshake }
            return .failed(e)
        case let other: return other
        }
    }

    /// Reads decrypted bytes into `buffer`.
    public func read(into buffer: UnsafeMutableRawBufferPointer) -> TLSIOResult {
        ERR_clear_error()
        errno = 0
        var n = 0
        if SSL_read_ex(ssl, buffer.baseAddress, buffer.count, &n) == 1 { return .done(n) }
        return classify(0, during: "read")
    }

    /// Encrypts and sends up to `buffer.count` bytes (partial writes allowed;
    /// after a want, call again with the same bytes).
    public func write(_ buffer: UnsafeRawBufferPointer) -> TLSIOResult {
        ERR_clear_error()
        errno = 0
        var n = 0
        if SSL_write_ex(ssl, buffer.baseAddress, buffer.count, &n) == 1 { return .done(n) }
        return classify(0, during: "write")
    }

    /// Sends close_notify (once; call again after a want). `.done(0)`: sent.
    public func shutdown() -> TLSIOResult {
        ERR_clear_error()
        errno = 0
        let r = SSL_shutdown(ssl)
        if r >= 0 { return .done(0) }
        return classify(r, during: "shutdown")
    }

    /// Whether decrypted bytes are buffered inside OpenSSL.
    public var pending: Bool { SSL_pending(ssl) > 0 }

    /// Whether OpenSSL holds bytes read from the socket that it has not
    /// returned yet (records, whole or partial, decrypted or not): with read
    /// ahead, one read(2) may bring several records.
    var hasBufferedInput: Bool { SSL_has_pending(ssl) == 1 }

    /// Sets `drained.pointee = true` whenever OpenSSL's read(2) on the socket
    /// returns fewer bytes than asked for, or fails: the socket's receive
    /// queue was empty at that moment. With an edge-triggered descriptor, any
    /// byte that arrives later is a new readiness event, so until one comes
    /// another read would only get EAGAIN (one wasted syscall per record).
    /// `drained` must outlive the connection.
    func watchReads(_ drained: UnsafeMutablePointer<Bool>) {
        guard let bio = SSL_get_rbio(ssl) else { return }
        BIO_set_callback_arg(bio, UnsafeMutableRawPointer(drained).assumingMemoryBound(to: CChar.self))
        BIO_set_callback_ex(bio, shortReadCallback)
    }

    // MARK: - Report

    /// SHA-256 of the peer's leaf SubjectPublicKeyInfo (DER).
    func peerSPKIDigest() -> [UInt8]? {
        guard let cert = SSL_get1_peer_certificate(ssl) else { return nil }
        defer { X509_free(cert) }
        return spkiSHA256(cert)
    }

    /// What was negotiated, how the peer was authenticated, and for a
    /// client without authentication why PKIX would have failed.
    public func report() -> TLSReport {
        let version = String(cString: SSL_get_version(ssl))
        let cipher = SSL_get_current_cipher(ssl).map { String(cString: SSL_CIPHER_get_name($0)) } ?? "unknown"
        var group: String?
        let nid = sealpost_ssl_get_negotiated_group(ssl)
        if nid != 0, let name = SSL_group_to_name(ssl, nid) {
            group = String(cString: name)
        }
        var sni: String?
        if role == .server {
            sni = SSL_get_servername(ssl, Int32(TLSEXT_NAMETYPE_host_name)).map { String(cString: $0) }
        } else {
            sni = sentServerName
        }
        var subject: String?
        var spki: String?
        if let cert = SSL_get1_peer_certificate(ssl) {
            subject = subjectText(cert)
            spki = spkiSHA256(cert).map { Hex.encode($0) }
            X509_free(cert)
        }
        var authentication = PeerAuthentication.encrypted
        var verifyError: String?
        let verify = SSL_get_verify_result(ssl)
        if role == .client {
            switch policy {
            case .none, .pin:
                if case .pin = policy { authentication = .pin }
                if subject != nil && verify != X509_V_OK {
                    verifyError = String(cString: X509_verify_cert_error_string(verify))
                }
            case .pkix:
                authentication = .pkix
            case .dane:
                var mcert: OpaquePointer?
                var mspki: OpaquePointer?
                let depth = SSL_get0_dane_authority(ssl, &mcert, &mspki)
                var usage: UInt8 = 0
                var selector: UInt8 = 0
                var mtype: UInt8 = 0
                var data: UnsafePointer<UInt8>?
                var dlen = 0
                if depth >= 0, SSL_get0_dane_tlsa(ssl, &usage, &selector, &mtype, &data, &dlen) >= 0 {
                    authentication = usage == 3 ? .daneEE : .daneTA
                }
            }
        }
        return TLSReport(protocolVersion: version, cipher: cipher, group: group, serverName: sni,
                         peerSubject: subject, peerSPKISHA256: spki, authentication: authentication,
                         verifyError: verifyError, resumed: SSL_session_reused(ssl) == 1)
    }
}

/// The BIO callback of `watchReads`: after each read on the socket BIO.
private let shortReadCallback: BIO_callback_fn_ex = { bio, oper, _, len, _, _, ret, processed in
    // Before an operation: 1 lets it proceed; after it: its result, unchanged.
    guard oper & Int32(BIO_CB_RETURN) != 0 else { return 1 }
    guard oper == Int32(BIO_CB_READ | BIO_CB_RETURN) else { return Int(ret) }
    if let arg = BIO_get_callback_arg(bio), ret <= 0 || (processed?.pointee ?? 0) < len {
        UnsafeMutableRawPointer(arg).assumingMemoryBound(to: Bool.self).pointee = true
    }
    return Int(ret)
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo in DER (what TLSA
/// selector 1 / matching type 1 and SPKI pins compare).
func spkiSHA256(_ cert: OpaquePointer) -> [UInt8]? {
    guard let pub = X509_get_X509_PUBKEY(cert) else { return nil }
    var der: UnsafeMutablePointer<UInt8>?
    let len = i2d_X509_PUBKEY(pub, &der)
    guard len > 0, let der else { return nil }
    defer { sealpost_openssl_free(der) }
    var md = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
    var mdLen: UInt32 = 0
    guard EVP_Digest(der, Int(len), &md, &mdLen, EVP_sha256(), nil) == 1 else { return nil }
    return Array(md.prefix(Int(mdLen)))
}

/// The subject as RFC 2253 text ("CN=mx.example.org,O=Example").
func subjectText(_ cert: OpaquePointer) -> String? {
    guard let name = X509_get_subject_name(cert), let bio = BIO_new(BIO_s_mem()) else { return nil }
    defer { BIO_free(bio) }
    guard X509_NAME_print_ex(bio, name, 0, sealpost_xn_flag_rfc2253()) >= 0 else { return nil }
    var data: UnsafeMutablePointer<CChar>?
    let n = sealpost_bio_get_mem_data(bio, &data)
    guard n > 0, let data else { return "" }
    return String(decoding: UnsafeRawBufferPointer(start: data, count: n), as: UTF8.self)
}
