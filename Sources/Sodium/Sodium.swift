// Sodium: the one Swift wrapper around libsodium (CSodium).
//
// What Sealpost needs: random bytes, crypto_secretbox (the spool wraps each
// per-message key under the master key), crypto_secretstream_xchacha20poly1305
// (bodies encrypted chunk by chunk) and crypto_pwhash_str with Argon2id (the
// SMTP AUTH password file). The types are shaped so that misuse is
// hard: keys live in `SecretKey` (zeroed with sodium_memzero when released),
// a stream can be finished only once, and `SecretStreamPull` treats a stream
// that ends without TAG_FINAL as an error (libsodium alone would accept a
// truncated stream as a shorter valid one).

import CSodium

/// Runs sodium_init exactly once (a global's initializer is lazy and
/// thread-safe in Swift).
private let sodiumInitialized: Bool = sodium_init() >= 0

public enum Sodium {
    /// Initializes libsodium; every entry point of this module calls it, so
    /// callers need not. Traps if libsodium cannot initialize (no usable
    /// randomness source): nothing secure can be done then.
    @inline(__always)
    public static func initialize() {
        precondition(sodiumInitialized, "sodium_init failed: no usable randomness source")
    }

    /// `count` bytes from the system's CSPRNG.
    public static func randomBytes(_ count: Int) -> [UInt8] {
        initialize()
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { randombytes_buf($0.baseAddress!, $0.count) }
        return bytes
    }

    /// Fills `buffer` from the CSPRNG.
    public static func randomFill(_ buffer: UnsafeMutableRawBufferPointer) {
        initialize()
        if let base = buffer.baseAddress { randombytes_buf(base, buffer.count) }
    }

    /// Overwrites `bytes` with zeros in a way the compiler cannot elide.
    /// (An Array may have copies elsewhere; prefer `SecretKey` for keys.)
    public static func memzero(_ bytes: inout [UInt8]) {
        bytes.withUnsafeMutableBytes { if let b = $0.baseAddress { sodium_memzero(b, $0.count) } }
    }

    /// Overwrites `buffer` with zeros in a way the compiler cannot elide.
    public static func memzero(_ buffer: UnsafeMutableRawBufferPointer) {
        if let b = buffer.baseAddress { sodium_memzero(b, buffer.count) }
    }

    /// Constant-time comparison of equal-length buffers.
    public static func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        return a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in sodium_memcmp(pa.baseAddress!, pb.baseAddress!, a.count) == 0 } }
    }

    /// The libsodium version string ("1.0.18").
    public static var version: String { String(cString: sodium_version_string()) }
}

/// Why a cryptographic operation failed. The messages name the cause but
/// never any key material.
public enum SodiumError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Authentication failed: the ciphertext or header was modified, or the key is wrong.
    case forged
    /// The stream ended before its TAG_FINAL chunk (truncation).
    case truncated
    /// Data after the TAG_FINAL chunk, or a stream used after it ended.
    case afterFinal
    /// A length that cannot be right (key, header, box or chunk sizes).
    case invalidLength(String)
    /// Password hashing could not allocate its memory.
    case outOfMemory

    public var description: String {
        switch self {
        case .forged: return "authentication failed (ciphertext modified or wrong key)"
        case .truncated: return "stream truncated: no final chunk"
        case .afterFinal: return "data after the final chunk of the stream"
        case .invalidLength(let what): return "invalid length: \(what)"
        case .outOfMemory: return "password hashing: out of memory"
        }
    }
}

// MARK: - Keys

/// A 32-byte symmetric key in memory that is zeroed when the key is released.
/// A class (not a struct of [UInt8]) so that no silent copies of the bytes exist.
public final class SecretKey: @unchecked Sendable {
    // @unchecked Sendable: the bytes are written only in init and read afterwards.
    public static let byteCount = 32
    private let storage: UnsafeMutableRawBufferPointer
    /// In sodium_malloc's memory (see `init(bytes:guarded:)`).
    private let guarded: Bool

    /// A fresh random key.
    public init() {
        Sodium.initialize()
        storage = .allocate(byteCount: Self.byteCount, alignment: 16)
        guarded = false
        randombytes_buf(storage.baseAddress!, Self.byteCount)
    }

    /// A key from `bytes` (must be 32 bytes). The caller should zero its copy.
    /// `guarded`: for a key that lives as long as the process (the spool's
    /// master key), sodium_malloc's memory: locked so that it never reaches
    /// swap, left out of core dumps, between guard pages, then read-only.
    /// Too dear (pages, system calls) for the key of each message.
    public init(bytes: some Collection<UInt8>, guarded: Bool = false) throws(SodiumError) {
        guard bytes.count == Self.byteCount else { throw .invalidLength("key of \(bytes.count) bytes, need \(Self.byteCount)") }
        Sodium.initialize()
        if guarded, let memory = sodium_malloc(Self.byteCount) {
            storage = UnsafeMutableRawBufferPointer(start: memory, count: Self.byteCount)
            _ = storage.initializeMemory(as: UInt8.self, from: bytes)
            _ = sodium_mprotect_readonly(memory)
            self.guarded = true
        } else {
            storage = .allocate(byteCount: Self.byteCount, alignment: 16)
            _ = storage.initializeMemory(as: UInt8.self, from: bytes)
            self.guarded = false
        }
    }

    deinit {
        if guarded {
            // sodium_free zeroes the memory first (writable again).
            sodium_free(storage.baseAddress!)
        } else {
            sodium_memzero(storage.baseAddress!, storage.count)
            storage.deallocate()
        }
    }

    /// Lends the key bytes; do not let them escape `body`.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(storage))
    }

    fileprivate var pointer: UnsafePointer<UInt8> {
        UnsafePointer(storage.baseAddress!.assumingMemoryBound(to: UInt8.self))
    }
}

// MARK: - secretbox

/// crypto_secretbox_easy (XSalsa20-Poly1305) with a random nonce stored in
/// front of the ciphertext: box = nonce (24) || MAC (16) || ciphertext.
public enum SecretBox {
    public static var nonceBytes: Int { Int(crypto_secretbox_noncebytes()) }
    public static var macBytes: Int { Int(crypto_secretbox_macbytes()) }
    /// Bytes a box adds to its message.
    public static var overhead: Int { nonceBytes + macBytes }

    /// Encrypts and authenticates `message` under `key`.
    public static func seal(_ message: UnsafeRawBufferPointer, key: SecretKey) -> [UInt8] {
        Sodium.initialize()
        let nonceCount = nonceBytes
        var box = [UInt8](repeating: 0, count: overhead + message.count)
        box.withUnsafeMutableBytes { out in
            randombytes_buf(out.baseAddress!, nonceCount)
            let nonce = UnsafePointer(out.baseAddress!.assumingMemoryBound(to: UInt8.self))
            let c = out.baseAddress!.advanced(by: nonceCount).assumingMemoryBound(to: UInt8.self)
            let m = message.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? UnsafePointer(c)
            let rc = crypto_secretbox_easy(c, m, UInt64(message.count), nonce, key.pointer)
            precondition(rc == 0, "crypto_secretbox_easy failed")
        }
        return box
    }

    public static func seal(_ message: [UInt8], key: SecretKey) -> [UInt8] {
        message.withUnsafeBytes { seal($0, key: key) }
    }

    /// Wraps another key (e.g. a per-message key under the master key).
    public static func seal(key inner: SecretKey, under key: SecretKey) -> [UInt8] {
        inner.withUnsafeBytes { seal($0, key: key) }
    }

    /// Verifies and decrypts a box made by `seal`.
    public static func open(_ box: [UInt8], key: SecretKey) throws(SodiumError) -> [UInt8] {
        Sodium.initialize()
        guard box.count >= overhead else { throw .invalidLength("secretbox of \(box.count) bytes") }
        var message = [UInt8](repeating: 0, count: box.count - overhead)
        let ok = try open(box, key: key, into: &message)
        guard ok else { throw .forged }
        return message
    }

    /// Unwraps a key sealed with `seal(key:under:)`; the plaintext key goes
    /// straight into zeroed-on-release memory.
    public static func openKey(_ box: [UInt8], under key: SecretKey) throws(SodiumError) -> SecretKey {
        guard box.count == overhead + SecretKey.byteCount else { throw .invalidLength("wrapped key of \(box.count) bytes") }
        var plain = [UInt8](repeating: 0, count: SecretKey.byteCount)
        defer { Sodium.memzero(&plain) }
        guard try open(box, key: key, into: &plain) else { throw .forged }
        return try SecretKey(bytes: plain)
    }

    private static func open(_ box: [UInt8], key: SecretKey, into message: inout [UInt8]) throws(SodiumError) -> Bool {
        let nonceCount = nonceBytes
        return box.withUnsafeBytes { b in
            message.withUnsafeMutableBytes { m in
                let nonce = b.baseAddress!.assumingMemoryBound(to: UInt8.self)
                let c = nonce.advanced(by: nonceCount)
                var scratch: UInt8 = 0
                let out = m.baseAddress?.assumingMemoryBound(to: UInt8.self)
                return withUnsafeMutablePointer(to: &scratch) { s in
                    crypto_secretbox_open_easy(out ?? s, c, UInt64(b.count - nonceCount), nonce, key.pointer) == 0
                }
            }
        }
    }
}

// MARK: - secretstream

/// Sizes of crypto_secretstream_xchacha20poly1305.
public enum SecretStream {
    /// Header that starts a stream (24 bytes); store it with the ciphertext.
    public static var headerBytes: Int { Int(crypto_secretstream_xchacha20poly1305_headerbytes()) }
    /// Bytes each chunk adds (17: tag + MAC).
    public static var chunkOverhead: Int { Int(crypto_secretstream_xchacha20poly1305_abytes()) }
}

/// The encrypting side of a secretstream. Each `push` returns one
/// ciphertext chunk; the last chunk is pushed with `final: true`
/// (TAG_FINAL), after which the stream refuses more input.
public final class SecretStreamPush {
    private var state = crypto_secretstream_xchacha20poly1305_state()
    private var finished = false
    /// The stream header; the reader needs it together with the key.
    public let header: [UInt8]

    public init(key: SecretKey) {
        Sodium.initialize()
        var header = [UInt8](repeating: 0, count: SecretStream.headerBytes)
        var st = crypto_secretstream_xchacha20poly1305_state()
        let rc = header.withUnsafeMutableBufferPointer {
            crypto_secretstream_xchacha20poly1305_init_push(&st, $0.baseAddress!, key.pointer)
        }
        precondition(rc == 0, "crypto_secretstream_xchacha20poly1305_init_push failed")
        self.header = header
        self.state = st
        withUnsafeMutableBytes(of: &st) { sodium_memzero($0.baseAddress!, $0.count) }
    }

    deinit {
        withUnsafeMutableBytes(of: &state) { sodium_memzero($0.baseAddress!, $0.count) }
    }

    /// Whether the final chunk was pushed.
    public var isFinished: Bool { finished }

    /// Encrypts one chunk. `final` marks the end of the stream.
    public func push(_ plaintext: UnsafeRawBufferPointer, final: Bool) throws(SodiumError) -> [UInt8] {
        guard !finished else { throw .afterFinal }
        let tag = final ? crypto_secretstream_xchacha20poly1305_tag_final() : crypto_secretstream_xchacha20poly1305_tag_message()
        var out = [UInt8](repeating: 0, count: plaintext.count + SecretStream.chunkOverhead)
        var scratch: UInt8 = 0
        let rc = out.withUnsafeMutableBufferPointer { o in
            withUnsafeMutablePointer(to: &scratch) { s in
                crypto_secretstream_xchacha20poly1305_push(
                    &state, o.baseAddress!, nil,
                    plaintext.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? UnsafePointer(s),
                    UInt64(plaintext.count), nil, 0, tag)
            }
        }
        precondition(rc == 0, "crypto_secretstream_xchacha20poly1305_push failed")
        if final {
            finished = true
            withUnsafeMutableBytes(of: &state) { sodium_memzero($0.baseAddress!, $0.count) }
        }
        return out
    }

    public func push(_ plaintext: [UInt8], final: Bool) throws(SodiumError) -> [UInt8] {
        try plaintext.withUnsafeBytes { b in Result { () throws(SodiumError) in try push(b, final: final) } }.get()
    }
}

/// The decrypting side of a secretstream. `pull` authenticates each chunk
/// in order; `finish()` must be called at the end of the input and throws
/// `.truncated` unless the TAG_FINAL chunk was seen. A chunk after the
/// final one throws `.afterFinal`.
public final class SecretStreamPull {
    private var state = crypto_secretstream_xchacha20poly1305_state()
    private var finished = false

    public init(key: SecretKey, header: [UInt8]) throws(SodiumError) {
        Sodium.initialize()
        guard header.count == SecretStream.headerBytes else { throw .invalidLength("stream header of \(header.count) bytes") }
        let rc = header.withUnsafeBufferPointer {
            crypto_secretstream_xchacha20poly1305_init_pull(&state, $0.baseAddress!, key.pointer)
        }
        guard rc == 0 else { throw .forged }
    }

    deinit {
        withUnsafeMutableBytes(of: &state) { sodium_memzero($0.baseAddress!, $0.count) }
    }

    /// Whether the final chunk was seen.
    public var isFinished: Bool { finished }

    /// Decrypts and authenticates the next chunk. Returns the plaintext and
    /// whether it was the final chunk.
    public func pull(_ ciphertext: UnsafeRawBufferPointer) throws(SodiumError) -> (plaintext: [UInt8], isFinal: Bool) {
        guard !finished else { throw .afterFinal }
        guard ciphertext.count >= SecretStream.chunkOverhead else { throw .invalidLength("stream chunk of \(ciphertext.count) bytes") }
        var out = [UInt8](repeating: 0, count: ciphertext.count - SecretStream.chunkOverhead)
        var tag: UInt8 = 0
        var scratch: UInt8 = 0
        let rc = out.withUnsafeMutableBufferPointer { o in
            withUnsafeMutablePointer(to: &scratch) { s in
                crypto_secretstream_xchacha20poly1305_pull(
                    &state, o.baseAddress ?? s, nil, &tag,
                    ciphertext.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    UInt64(ciphertext.count), nil, 0)
            }
        }
        guard rc == 0 else { throw .forged }
        let isFinal = tag == crypto_secretstream_xchacha20poly1305_tag_final()
        if isFinal {
            finished = true
            withUnsafeMutableBytes(of: &state) { sodium_memzero($0.baseAddress!, $0.count) }
        }
        return (out, isFinal)
    }

    public func pull(_ ciphertext: [UInt8]) throws(SodiumError) -> (plaintext: [UInt8], isFinal: Bool) {
        try ciphertext.withUnsafeBytes { b in Result { () throws(SodiumError) in try pull(b) } }.get()
    }

    /// Call at the end of the input: throws `.truncated` unless the final chunk was seen.
    public func finish() throws(SodiumError) {
        guard finished else { throw .truncated }
    }
}

// MARK: - Password hashing

/// Password hashes for the SMTP AUTH password file: crypto_pwhash_str with
/// Argon2id, the memory-hard function of RFC 9106, in the PHC string
/// format "$argon2id$v=19$m=65536,t=2,p=1$salt$hash" (salt and parameters
/// travel inside the string, so verification needs nothing else).
///
/// Cost: OPSLIMIT_INTERACTIVE / MEMLIMIT_INTERACTIVE (t=2, 64 MiB), about
/// 0.05-0.1 s on one core. That is libsodium's advice for online
/// authentication, and an SMTP server is one: each AUTH attempt from the
/// network costs a verification, so a costlier setting (MODERATE: 256 MiB,
/// ~0.7 s) would hand a flood of AUTH commands a lever on the server's
/// memory and CPU. The hashes themselves sit in a file readable by root
/// alone. Verification reads the cost from the string: a file whose
/// hashes were made with other limits keeps working.
public enum PasswordHash {
    /// "$argon2id$": the only algorithm produced and accepted.
    public static let prefix = "$argon2id$"
    /// Longest string produced (crypto_pwhash_STRBYTES, NUL excluded).
    public static var maximumLength: Int { Int(crypto_pwhash_argon2id_strbytes()) - 1 }
    public static var interactiveOpsLimit: Int { Int(crypto_pwhash_argon2id_opslimit_interactive()) }
    public static var interactiveMemLimit: Int { Int(crypto_pwhash_argon2id_memlimit_interactive()) }

    /// Hashes `password` with a fresh random salt. Throws only when the
    /// memory cannot be allocated (the limits are libsodium's own).
    public static func hash(_ password: String, opsLimit: Int = interactiveOpsLimit,
                            memLimit: Int = interactiveMemLimit) throws(SodiumError) -> String {
        Sodium.initialize()
        var out = [CChar](repeating: 0, count: Int(crypto_pwhash_argon2id_strbytes()))
        // One spare byte: an empty password still has a base address.
        var bytes = Array(password.utf8) + [0]
        defer { Sodium.memzero(&bytes) }
        let rc = bytes.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { c in
                crypto_pwhash_argon2id_str(&out, c.baseAddress!, UInt64(c.count - 1), UInt64(opsLimit), memLimit)
            }
        }
        guard rc == 0 else { throw .outOfMemory }
        return out.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    /// Whether `password` matches `hash` (an "$argon2id$" string). A
    /// malformed hash never matches. Takes as long as the hash's cost says:
    /// run it off any event loop.
    public static func verify(_ password: String, against hash: String) -> Bool {
        Sodium.initialize()
        guard hash.hasPrefix(prefix), hash.utf8.count <= maximumLength,
              !hash.utf8.contains(0) else { return false }
        var bytes = Array(password.utf8) + [0]
        defer { Sodium.memzero(&bytes) }
        return bytes.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { c in
                crypto_pwhash_argon2id_str_verify(hash, c.baseAddress!, UInt64(c.count - 1)) == 0
            }
        }
    }

    /// Whether `hash` was made with other limits than these (time to
    /// rehash at the next password change).
    public static func needsRehash(_ hash: String, opsLimit: Int = interactiveOpsLimit,
                                   memLimit: Int = interactiveMemLimit) -> Bool {
        Sodium.initialize()
        return crypto_pwhash_argon2id_str_needs_rehash(hash, UInt64(opsLimit), memLimit) != 0
    }
}
