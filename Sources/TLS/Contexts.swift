// OpenSSL contexts (SSL_CTX) for both roles. Everything that reads a file
// happens here, in the initializers: crypto-negotiate builds its contexts
// before it drops privileges, and afterwards needs no file at all.

#if canImport(Glibc)
import Glibc
#endif
import COpenSSL
import FileAccess

/// An owned SSL_CTX.
final class ContextHandle {
    let ctx: OpaquePointer
    init(_ ctx: OpaquePointer) { self.ctx = ctx }
    deinit { SSL_CTX_free(ctx) }
}

/// Settings common to both roles: versions, ciphers, groups, no
/// compression, no renegotiation, relay-friendly write modes.
func applyCommon(_ ctx: OpaquePointer, _ common: TLSCommonSettings, what: String = "cipher list") throws(TLSError) {
    guard let low = common.protocols.min(), let high = common.protocols.max() else {
        throw TLSError(.configuration, "no TLS protocol version enabled")
    }
    guard sealpost_ssl_ctx_set_min_proto(ctx, low.openSSLValue) == 1,
          sealpost_ssl_ctx_set_max_proto(ctx, high.openSSLValue) == 1 else {
        throw TLSError.openSSL(.configuration, "cannot set the protocol versions")
    }
    SSL_CTX_set_options(ctx, sealpost_ssl_op_no_compression() | sealpost_ssl_op_no_renegotiation())
    guard SSL_CTX_set_cipher_list(ctx, common.cipherList) == 1 else {
        throw TLSError.openSSL(.configuration, "\(what) \"\(common.cipherList)\" refused")
    }
    guard sealpost_ssl_ctx_set1_groups_list(ctx, common.groups) == 1 else {
        throw TLSError.openSSL(.configuration, "groups \"\(common.groups)\" refused")
    }
    _ = sealpost_ssl_ctx_set_mode(ctx, sealpost_ssl_mode_relay())
    // Read ahead: one read(2) takes whatever the socket holds, up to the
    // record buffer, instead of a 5-byte record header and then its body
    // (two reads per record, about 20 per STARTTLS message). Safe here: the
    // socket carries nothing but TLS once a session starts on it.
    _ = SSL_CTX_ctrl(ctx, SSL_CTRL_SET_READ_AHEAD, 1, nil)
}

/// The server role: one SSL_CTX per distinct set of SNI names, each holding
/// every certificate/key pair for those names (RSA and ECDSA side by side).
/// The first context (names empty, else the first configured) is the
/// default; a servername callback switches a handshake to the context whose
/// names match the client's SNI.
public final class TLSServerContexts: @unchecked Sendable {
    // Immutable after init; OpenSSL reference-counts the SSL_CTXs, so
    // sessions may outlive a reload as long as they keep this object.
    struct Entry {
        var names: [String]          // lower-cased; empty for the default
        var handle: ContextHandle
    }
    let entries: [Entry]
    let defaultIndex: Int
    public let settings: TLSServerSettings
    /// (path, mtime seconds, mtime nanoseconds, size) of every file read, to notice changes.
    let fileStamps: [FileStamp]

    /// Reads every certificate chain and key file of `settings`.
    public convenience init(_ settings: TLSServerSettings) throws(TLSError) {
        var material: [PEMMaterial] = []
        for pair in settings.certificates {
            material.append(PEMMaterial(certificateChain: try PEMFile.read(path: pair.certificateFile, what: "certificate"),
                                        privateKey: try PEMFile.read(path: pair.keyFile, what: "private key"),
                                        certificateName: pair.certificateFile, keyName: pair.keyFile))
        }
        try self.init(settings, material: material)
    }

    /// From PEM already read (crypto-negotiate, chrooted, gets the files as
    /// descriptors from the supervisor): `material[i]` holds the contents
    /// of `settings.certificates[i]`'s files.
    public init(_ settings: TLSServerSettings, material: [PEMMaterial]) throws(TLSError) {
        guard !settings.certificates.isEmpty else {
            throw TLSError(.configuration, "no certificate configured for the server role")
        }
        guard material.count == settings.certificates.count else {
            throw TLSError(.configuration, "\(material.count) certificate/key pair(s) given for \(settings.certificates.count) configured")
        }
        self.settings = settings
        var groups: [(names: [String], pairs: [PEMMaterial])] = []
        for (pair, pem) in zip(settings.certificates, material) {
            let names = pair.names.map { $0.lowercased() }.sorted()
            if let i = groups.firstIndex(where: { $0.names == names }) {
                groups[i].pairs.append(pem)
            } else {
                groups.append((names, [pem]))
            }
        }
        var entries: [Entry] = []
        for group in groups {
            guard let ctx = SSL_CTX_new(TLS_server_method()) else {
                throw TLSError.openSSL(.configuration, "SSL_CTX_new")
            }
            let handle = ContextHandle(ctx)
            try applyCommon(ctx, settings.common)
            SSL_CTX_set_options(ctx, sealpost_ssl_op_cipher_server_preference()
                                | (settings.sessionTickets ? 0 : sealpost_ssl_op_no_ticket()))
            if settings.sessionTickets {
                // Stateless tickets only: no server-side cache to grow.
                _ = sealpost_ssl_ctx_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_OFF))
                SSL_CTX_set_num_tickets(ctx, 1)
            } else {
                _ = sealpost_ssl_ctx_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_OFF))
                SSL_CTX_set_num_tickets(ctx, 0)
            }
            // A session ticket must not resume in another SNI context.
            let sid = Array("sealpost-sni-\(entries.count)".utf8)
            _ = SSL_CTX_set_session_id_context(ctx, sid, UInt32(sid.count))
            for pair in group.pairs {
                ERR_clear_error()
                try useCertificateChain(ctx, pair)
                try usePrivateKey(ctx, pair)
                guard SSL_CTX_check_private_key(ctx) == 1 else {
                    throw TLSError.openSSL(.configuration, "private key \(pair.keyName) does not match certificate \(pair.certificateName)")
                }
            }
            entries.append(Entry(names: group.names, handle: handle))
        }
        self.entries = entries
        self.defaultIndex = entries.firstIndex(where: { $0.names.isEmpty }) ?? 0
        self.fileStamps = settings.certificates.flatMap { [FileStamp($0.certificateFile), FileStamp($0.keyFile)] }
        // The callback's argument points at this object, which outlives
        // every SSL made from its contexts (sessions hold a reference).
        let me = Unmanaged.passUnretained(self).toOpaque()
        for e in entries {
            _ = sealpost_ssl_ctx_set_servername_callback(e.handle.ctx, serverNameCallback, me)
        }
    }

    /// How often crypto-negotiate gives its contexts new session ticket
    /// keys (as Postfix rotates its ticket keys).
    public static let ticketKeyLifetime: Double = 3600

    /// New random session ticket keys for every context. A ticket encrypts
    /// the session's secret under these keys: kept for the life of the
    /// process, one disclosure of them would open every recorded TLS 1.2
    /// session since the start, which ECDHE alone was meant to prevent. A
    /// ticket issued before a rotation no longer resumes (a full handshake
    /// instead). Call on the thread that runs the handshakes.
    public func rotateTicketKeys() throws(TLSError) {
        for e in entries {
            var keys = [UInt8](repeating: 0, count: 80)
            defer { OPENSSL_cleanse(&keys, keys.count) }
            guard RAND_bytes(&keys, Int32(keys.count)) == 1 else { throw TLSError.openSSL(.configuration, "RAND_bytes") }
            guard sealpost_ssl_ctx_set_tlsext_ticket_keys(e.handle.ctx, &keys, keys.count) == 1 else {
                throw TLSError.openSSL(.configuration, "SSL_CTX_set_tlsext_ticket_keys")
            }
        }
    }

    /// Whether any certificate or key file changed on disk since loading
    /// (modification time or size), or can no longer be read.
    /// Files that cannot be read now (e.g. after a chroot) count as
    /// unchanged: there is nothing newer to load.
    public func filesChanged() -> Bool {
        let now = fileStamps.map { FileStamp($0.path) }
        return now.allSatisfy { $0.size >= 0 } && now != fileStamps
    }

    /// The current stamps as text, to remember a version that failed to load.
    public func currentStamps() -> [String] {
        fileStamps.map { let s = FileStamp($0.path); return "\(s.path) \(s.seconds).\(s.nanoseconds) \(s.size)" }
    }

    /// The context for an SNI name: an exact name, then a wildcard
    /// (`*.example.org` for `mx.example.org`), else the default.
    func context(for serverName: String?) -> ContextHandle {
        guard let name = serverName?.lowercased(), !name.isEmpty else { return entries[defaultIndex].handle }
        if let e = entries.first(where: { $0.names.contains(name) }) { return e.handle }
        if let dot = name.firstIndex(of: ".") {
            let wildcard = "*" + name[dot...]
            if let e = entries.first(where: { $0.names.contains(wildcard) }) { return e.handle }
        }
        return entries[defaultIndex].handle
    }

    var defaultContext: ContextHandle { entries[defaultIndex].handle }
}

/// The contents of one certificate/key pair, PEM: the chain (leaf first)
/// and the private key; the names (paths) are for messages.
public struct PEMMaterial: Sendable {
    public var certificateChain: [UInt8]
    public var privateKey: [UInt8]
    public var certificateName: String
    public var keyName: String

    public init(certificateChain: [UInt8], privateKey: [UInt8], certificateName: String, keyName: String) {
        self.certificateChain = certificateChain
        self.privateKey = privateKey
        self.certificateName = certificateName
        self.keyName = keyName
    }
}

/// Reading PEM files whole, by path or from a descriptor.
public enum PEMFile {
    /// Far beyond any certificate chain or key; a bound on what is read.
    public static let maximumSize = 1 << 20

    public static func read(path: String, what: String) throws(TLSError) -> [UInt8] {
        let bytes: [UInt8]
        do {
            bytes = try WholeFile.read(path, maximumSize: maximumSize).bytes
        } catch {
            throw TLSError(.configuration, "\(what) \(path): \(error.withoutPath)")
        }
        return try nonEmpty(bytes, what: "\(what) \(path)")
    }

    /// The whole content of a regular file open on `fd`, from offset 0
    /// (pread: the offset may be shared with the process that opened it).
    /// Does not close `fd`.
    public static func read(fd: Int32, what: String) throws(TLSError) -> [UInt8] {
        let bytes: [UInt8]
        do {
            bytes = try WholeFile.read(descriptor: fd, path: what, maximumSize: maximumSize).bytes
        } catch {
            throw TLSError(.configuration, "\(what): \(error.withoutPath)")
        }
        return try nonEmpty(bytes, what: what)
    }

    private static func nonEmpty(_ bytes: [UInt8], what: String) throws(TLSError) -> [UInt8] {
        guard !bytes.isEmpty else { throw TLSError(.configuration, "\(what): empty file") }
        return bytes
    }
}

/// No passphrase prompt, ever (OpenSSL's default would read the terminal):
/// an encrypted key is an error.
private let refusePassphrase: @convention(c) (UnsafeMutablePointer<CChar>?, Int32, Int32, UnsafeMutableRawPointer?) -> Int32 = { _, _, _, _ in -1 }

/// A read-only memory BIO over `bytes` for the duration of `body`.
private func withMemoryBIO<T>(_ bytes: [UInt8], _ what: String, _ body: (OpaquePointer) throws(TLSError) -> T) throws(TLSError) -> T {
    let result: Result<T, TLSError> = bytes.withUnsafeBytes { raw in
        guard let bio = BIO_new_mem_buf(raw.baseAddress, Int32(raw.count)) else {
            return .failure(TLSError.openSSL(.configuration, "\(what): BIO_new_mem_buf"))
        }
        defer { BIO_free(bio) }
        do throws(TLSError) { return .success(try body(bio)) } catch { return .failure(error) }
    }
    return try result.get()
}

/// What SSL_CTX_use_certificate_chain_file does, from memory: the first
/// certificate is the leaf, the others its chain (for the current key
/// type's slot, so RSA and ECDSA chains stay apart).
private func useCertificateChain(_ ctx: OpaquePointer, _ pem: PEMMaterial) throws(TLSError) {
    let what = "certificate \(pem.certificateName)"
    try withMemoryBIO(pem.certificateChain, what) { bio throws(TLSError) in
        guard let leaf = PEM_read_bio_X509_AUX(bio, nil, refusePassphrase, nil) else {
            throw TLSError.openSSL(.configuration, "\(what): no PEM certificate")
        }
        defer { X509_free(leaf) }
        guard SSL_CTX_use_certificate(ctx, leaf) == 1 else { throw TLSError.openSSL(.configuration, what) }
        guard SSL_CTX_ctrl(ctx, SSL_CTRL_CHAIN, 0, nil) == 1 else { throw TLSError.openSSL(.configuration, "\(what): clearing the chain") }
        while let next = PEM_read_bio_X509(bio, nil, refusePassphrase, nil) {
            // SSL_CTX_add0_chain_cert (a macro): the context takes the reference.
            guard SSL_CTX_ctrl(ctx, SSL_CTRL_CHAIN_CERT, 0, UnsafeMutableRawPointer(next)) == 1 else {
                X509_free(next)
                throw TLSError.openSSL(.configuration, "\(what): chain certificate refused")
            }
        }
        // The loop ends at the end of the data ("no start line") or at
        // something that is not a certificate, which is an error.
        let last = ERR_peek_last_error()
        if ERR_GET_LIB(last) == ERR_LIB_PEM && ERR_GET_REASON(last) == PEM_R_NO_START_LINE {
            ERR_clear_error()
        } else if last != 0 {
            throw TLSError.openSSL(.configuration, "\(what): bad chain certificate")
        }
    }
}

private func usePrivateKey(_ ctx: OpaquePointer, _ pem: PEMMaterial) throws(TLSError) {
    let what = "private key \(pem.keyName)"
    try withMemoryBIO(pem.privateKey, what) { bio throws(TLSError) in
        guard let key = PEM_read_bio_PrivateKey(bio, nil, refusePassphrase, nil) else {
            throw TLSError.openSSL(.configuration, "\(what): no PEM private key (or an encrypted one)")
        }
        defer { EVP_PKEY_free(key) }
        guard SSL_CTX_use_PrivateKey(ctx, key) == 1 else { throw TLSError.openSSL(.configuration, what) }
    }
}

/// Switches the handshake to the context chosen by the client's SNI.
private let serverNameCallback: sealpost_servername_cb = { ssl, _, arg in
    guard let ssl, let arg else { return SSL_TLSEXT_ERR_OK }
    let contexts = Unmanaged<TLSServerContexts>.fromOpaque(arg).takeUnretainedValue()
    let name = SSL_get_servername(ssl, Int32(TLSEXT_NAMETYPE_host_name)).map { String(cString: $0) }
    let chosen = contexts.context(for: name)
    if chosen.ctx != SSL_get_SSL_CTX(ssl) {
        _ = SSL_set_SSL_CTX(ssl, chosen.ctx)
    }
    return SSL_TLSEXT_ERR_OK
}

/// The client role for one CA bundle (or none), loaded at start: two
/// SSL_CTXs that differ only in their TLS 1.2 cipher list (strict and
/// opportunistic, `TLSClientCiphers`) and share one certificate store, so
/// the bundle is read and held once.
public final class TLSClientContext: @unchecked Sendable {
    let strict: ContextHandle
    let opportunistic: ContextHandle
    public let caFile: String?

    /// `caFile`: PEM bundle of trust anchors for PKIX (nil: PKIX always fails,
    /// DANE and pins still work). `common.cipherList` is the strict list;
    /// `opportunisticCipherList` the one for opportunistic handshakes.
    /// A list OpenSSL refuses, or one that enables a suite without
    /// encryption or authentication, under 128 bits (export, DES, 3DES),
    /// with RC4 or an MD5 MAC, is a configuration error.
    public init(caFile: String?, common: TLSCommonSettings = TLSCommonSettings(),
                opportunisticCipherList: String = TLSClientCiphers.opportunisticDefault) throws(TLSError) {
        self.caFile = caFile
        strict = try Self.makeContext(common, cipherList: common.cipherList, what: "cipher list")
        opportunistic = try Self.makeContext(common, cipherList: opportunisticCipherList, what: "opportunistic cipher list")
        if let caFile {
            ERR_clear_error()
            guard SSL_CTX_load_verify_locations(strict.ctx, caFile, nil) == 1 else {
                throw TLSError.openSSL(.configuration, "CA file \(caFile)")
            }
        }
        // Under policy none the chain is still verified for the report
        // (verify-error): the opportunistic context needs the anchors too.
        SSL_CTX_set1_cert_store(opportunistic.ctx, SSL_CTX_get_cert_store(strict.ctx))
    }

    func handle(_ ciphers: TLSClientCiphers) -> ContextHandle {
        ciphers == .strict ? strict : opportunistic
    }

    /// OpenSSL's names of the suites a handshake with `ciphers` offers, in
    /// order (TLS 1.3's first, named "TLS_..."), as `openssl ciphers` lists them.
    func suiteNames(_ ciphers: TLSClientCiphers) -> [String] {
        Self.suites(of: handle(ciphers).ctx).map { String(cString: SSL_CIPHER_get_name($0)) }
    }

    private static func suites(of ctx: OpaquePointer) -> [OpaquePointer] {
        guard let stack = SSL_CTX_get_ciphers(ctx) else { return [] }
        return (0..<sealpost_sk_ssl_cipher_num(stack)).compactMap { sealpost_sk_ssl_cipher_value(stack, $0) }
    }

    private static func makeContext(_ common: TLSCommonSettings, cipherList: String, what: String) throws(TLSError) -> ContextHandle {
        guard let ctx = SSL_CTX_new(TLS_client_method()) else {
            throw TLSError.openSSL(.configuration, "SSL_CTX_new")
        }
        let handle = ContextHandle(ctx)
        var settings = common
        settings.cipherList = cipherList
        try applyCommon(ctx, settings, what: what)
        try refuseWeakSuites(ctx, cipherList, what: what)
        // No ticket storage here: every session is a fresh handshake.
        _ = sealpost_ssl_ctx_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_OFF))
        guard SSL_CTX_dane_enable(ctx) > 0 else {
            throw TLSError.openSSL(.configuration, "SSL_CTX_dane_enable")
        }
        return handle
    }

    /// OpenSSL takes any suite a list names (its security level drops some
    /// of them only when the ClientHello is built): a configured list that
    /// asks for what no peer should be offered is refused at start, with
    /// the first such suite named.
    private static func refuseWeakSuites(_ ctx: OpaquePointer, _ list: String, what: String) throws(TLSError) {
        for suite in suites(of: ctx) {
            var algorithmBits: Int32 = 0
            let reason: String? =
                SSL_CIPHER_get_cipher_nid(suite) == NID_undef ? "no encryption"
                : SSL_CIPHER_get_auth_nid(suite) == NID_auth_null ? "no authentication (anonymous)"
                : SSL_CIPHER_get_bits(suite, &algorithmBits) < 128 ? "fewer than 128 bits of strength"
                : SSL_CIPHER_get_cipher_nid(suite) == NID_rc4 ? "RC4"
                : SSL_CIPHER_get_digest_nid(suite) == NID_md5 ? "an MD5 MAC"
                : nil
            if let reason {
                let name = String(cString: SSL_CIPHER_get_name(suite))
                throw TLSError(.configuration, "\(what) \"\(list)\" enables \(name): \(reason)")
            }
        }
    }
}

/// What identifies a file's version: modification time and size.
struct FileStamp: Equatable {
    var path: String
    var seconds: Int
    var nanoseconds: Int
    var size: Int

    init(_ path: String) {
        self.path = path
        var st = stat()
        if stat(path, &st) == 0 {
            seconds = st.st_mtim.tv_sec
            nanoseconds = st.st_mtim.tv_nsec
            size = Int(st.st_size)
        } else {
            seconds = -1
            nanoseconds = -1
            size = -1
        }
    }
}
