// OpenSSL contexts (SSL_CTX) for both roles. Everything that reads a file
// happens here, in the initializers: crypto-negotiate builds its contexts
// before it drops privileges, and afterwards needs no file at all.

#if canImport(Glibc)
import Glibc
#endif
import COpenSSL

/// An owned SSL_CTX.
final class ContextHandle {
    let ctx: OpaquePointer
    init(_ ctx: OpaquePointer) { self.ctx = ctx }
    deinit { SSL_CTX_free(ctx) }
}

/// Settings common to both roles: versions, ciphers, groups, no
/// compression, no renegotiation, relay-friendly write modes.
func applyCommon(_ ctx: OpaquePointer, _ common: TLSCommonSettings) throws(TLSError) {
    guard let low = common.protocols.min(), let high = common.protocols.max() else {
        throw TLSError(.configuration, "no TLS protocol version enabled")
    }
    guard sealpost_ssl_ctx_set_min_proto(ctx, low.openSSLValue) == 1,
          sealpost_ssl_ctx_set_max_proto(ctx, high.openSSLValue) == 1 else {
        throw TLSError.openSSL(.configuration, "cannot set the protocol versions")
    }
    SSL_CTX_set_options(ctx, sealpost_ssl_op_no_compression() | sealpost_ssl_op_no_renegotiation())
    guard SSL_CTX_set_cipher_list(ctx, common.cipherList) == 1 else {
        throw TLSError.openSSL(.configuration, "cipher list \"\(common.cipherList)\" refused")
    }
    guard sealpost_ssl_ctx_set1_groups_list(ctx, common.groups) == 1 else {
        throw TLSError.openSSL(.configuration, "groups \"\(common.groups)\" refused")
    }
    _ = sealpost_ssl_ctx_set_mode(ctx, sealpost_ssl_mode_relay())
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

    public init(_ settings: TLSServerSettings) throws(TLSError) {
        guard !settings.certificates.isEmpty else {
            throw TLSError(.configuration, "no certificate configured for the server role")
        }
        self.settings = settings
        var groups: [(names: [String], pairs: [CertificateKeyPair])] = []
        for pair in settings.certificates {
            let names = pair.names.map { $0.lowercased() }.sorted()
            if let i = groups.firstIndex(where: { $0.names == names }) {
                groups[i].pairs.append(pair)
            } else {
                groups.append((names, [pair]))
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
                guard SSL_CTX_use_certificate_chain_file(ctx, pair.certificateFile) == 1 else {
                    throw TLSError.openSSL(.configuration, "certificate \(pair.certificateFile)")
                }
                guard SSL_CTX_use_PrivateKey_file(ctx, pair.keyFile, SSL_FILETYPE_PEM) == 1 else {
                    throw TLSError.openSSL(.configuration, "private key \(pair.keyFile)")
                }
                guard SSL_CTX_check_private_key(ctx) == 1 else {
                    throw TLSError.openSSL(.configuration, "private key \(pair.keyFile) does not match certificate \(pair.certificateFile)")
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

/// The client role: one SSL_CTX per CA bundle (or none), loaded at start.
public final class TLSClientContext: @unchecked Sendable {
    let handle: ContextHandle
    public let caFile: String?

    /// `caFile`: PEM bundle of trust anchors for PKIX (nil: PKIX always fails,
    /// DANE and pins still work).
    public init(caFile: String?, common: TLSCommonSettings = TLSCommonSettings()) throws(TLSError) {
        guard let ctx = SSL_CTX_new(TLS_client_method()) else {
            throw TLSError.openSSL(.configuration, "SSL_CTX_new")
        }
        handle = ContextHandle(ctx)
        self.caFile = caFile
        try applyCommon(ctx, common)
        // No ticket storage here: every session is a fresh handshake.
        _ = sealpost_ssl_ctx_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_OFF))
        if let caFile {
            ERR_clear_error()
            guard SSL_CTX_load_verify_locations(ctx, caFile, nil) == 1 else {
                throw TLSError.openSSL(.configuration, "CA file \(caFile)")
            }
        }
        guard SSL_CTX_dane_enable(ctx) > 0 else {
            throw TLSError.openSSL(.configuration, "SSL_CTX_dane_enable")
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
