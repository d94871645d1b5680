// The resolver: one libunbound context, validating DNSSEC in-process.
//
// Why not the C library's resolver: it tells nothing about DNSSEC (at best
// an AD bit from whatever server resolv.conf names, over an unprotected
// path), and it blocks. libunbound validates itself from a trust anchor and
// resolves asynchronously: queries are started with ub_resolve_async, the
// answers are collected with ub_process whenever ub_fd is readable. The
// context runs its resolver in a thread (ub_ctx_async(ctx, 1)), never a
// forked process.
//
// Files are read once, when the Resolver is made. libunbound itself reads
// its trust anchors lazily, when the context answers its first query; a
// stage that drops privileges or chroots after making its resolver would
// then fail every lookup ("initialization failure"), and a missing anchor
// would show up as deferred mail instead of a start-up error. So `init`
// checks that each file can be read (DNSError.unreadableFile) and then
// makes libunbound load everything at once with one lookup it answers
// from a local zone of its own (no packet leaves the process): after
// `init` returns, the files may disappear. No other file is ever read:
// neither /etc/resolv.conf nor /etc/hosts (ub_ctx_resolvconf/ub_ctx_hosts
// are never called; DNS goes to the configured forwarders or the root
// servers, whose hints are built in), nor an unbound.conf.
//
// libunbound gives up on an unreachable server only after about 17 seconds
// (measured), so every query here has its own deadline: when it passes, the
// query is cancelled with ub_cancel and completes with DNSError.timeout.
//
// Two ways to drive it:
//   - from an event loop: wait for `fileDescriptor` to be readable and call
//     `processEvents()`; call `expireDeadlines()` at `nextDeadline`.
//     Completions run on the thread that calls those two methods, never
//     inside `query`.
//   - blocking, for tools and tests: `resolve(_:_:)`, `run(until:)`, built on
//     poll(2). Blocking callers are serialized; do not mix both ways on one
//     Resolver.

import CUnbound
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization

/// How the resolver finds answers and which answers it trusts.
public struct ResolverConfiguration: Sendable, Equatable {
    /// Recursive resolvers to forward every query to, "ADDRESS" or
    /// "ADDRESS@PORT" (IPv4 or IPv6 literal). Empty: full recursion from the
    /// root servers. A forwarder must pass DNSSEC records through (any
    /// validating resolver does); validation happens here regardless.
    public var forwarders: [String]
    /// Zones sent to given authoritative servers instead (test beds).
    public var stubZones: [StubZone]
    /// Trust anchor files (DS or DNSKEY records in zone-file format),
    /// read when the Resolver is made (never later).
    /// Empty: `rootTrustAnchorFile` when that file exists, else no
    /// validation (every answer insecure).
    public var trustAnchorFiles: [String]
    public var rootTrustAnchorFile: String
    /// Zones under a trust anchor that are to be treated as unsigned
    /// (unbound's domain-insecure).
    public var insecureDomains: [String]
    /// RFC 6761 special-use zones unbound answers locally by default
    /// ("test", "invalid", ...) that should be resolved instead (its
    /// `local-zone: "ZONE" transparent`): test beds use "test".
    public var resolveReservedZones: [String]
    /// Default deadline of a query.
    public var timeout: Duration

    public init(forwarders: [String] = [], stubZones: [StubZone] = [],
                trustAnchorFiles: [String] = [],
                rootTrustAnchorFile: String = "/usr/share/dns/root.key",
                insecureDomains: [String] = [], resolveReservedZones: [String] = [],
                timeout: Duration = .seconds(10)) {
        self.forwarders = forwarders
        self.stubZones = stubZones
        self.trustAnchorFiles = trustAnchorFiles
        self.rootTrustAnchorFile = rootTrustAnchorFile
        self.insecureDomains = insecureDomains
        self.resolveReservedZones = resolveReservedZones
        self.timeout = timeout
    }
}

public struct StubZone: Sendable, Equatable {
    public var zone: String
    /// "ADDRESS" or "ADDRESS@PORT".
    public var addresses: [String]
    public init(zone: String, addresses: [String]) {
        self.zone = zone
        self.addresses = addresses
    }
}

/// Identifies a started query, for `cancel`.
public struct QueryHandle: Sendable, Hashable {
    public let id: UInt64
}

public typealias DNSCompletion = @Sendable (Result<DNSAnswer, DNSError>) -> Void

/// Passed through libunbound as the callback's user data.
private final class QueryToken {
    let id: UInt64
    unowned(unsafe) let resolver: Resolver
    init(id: UInt64, resolver: Resolver) {
        self.id = id
        self.resolver = resolver
    }
}

/// libunbound's callback: runs inside ub_process on the pumping thread.
private func unboundCallback(_ data: UnsafeMutableRawPointer?, _ error: Int32,
                             _ result: UnsafeMutablePointer<ub_result>?) {
    guard let data else {
        if let result { ub_resolve_free(result) }
        return
    }
    let token = Unmanaged<QueryToken>.fromOpaque(data).takeRetainedValue()
    let outcome: Result<DNSAnswer, DNSError>
    if error != 0 {
        outcome = .failure(.resolver(code: error, message: String(cString: ub_strerror(error))))
    } else if let result {
        outcome = .success(DNSAnswer(copying: result.pointee))
    } else {
        outcome = .failure(.resolver(code: -1, message: "no result"))
    }
    if let result { ub_resolve_free(result) }
    token.resolver.answered(token.id, outcome)
}

extension DNSAnswer {
    /// Copies a ub_result; the caller frees it.
    init(copying result: ub_result) {
        var records: [[UInt8]] = []
        if let data = result.data, let lengths = result.len {
            var index = 0
            while let pointer = data[index] {
                let count = Int(lengths[index])
                records.append(count > 0
                    ? Array(UnsafeRawBufferPointer(start: pointer, count: count))
                    : [])
                index += 1
            }
        }
        let rcode = ResponseCode(rawValue: Int(result.rcode))
        let status: DNSSECStatus
        if result.secure != 0 {
            status = .secure
        } else if result.bogus != 0 {
            status = .bogus(reason: result.why_bogus.map { String(cString: $0) } ?? "")
        } else if rcode == .noError || rcode == .nxDomain {
            status = .insecure
        } else {
            status = .indeterminate
        }
        self.init(name: result.qname.map { String(cString: $0) } ?? "",
                  type: RRType(rawValue: UInt16(truncatingIfNeeded: result.qtype)),
                  rcode: rcode, status: status,
                  haveData: result.havedata != 0, nxDomain: result.nxdomain != 0,
                  canonicalName: result.canonname.map { DNSName.trimmed(String(cString: $0)) },
                  ttl: UInt32(clamping: result.ttl), rdata: records)
    }
}

public final class Resolver: @unchecked Sendable {
    // @unchecked: the context is only used through libunbound calls that
    // take its own locks (ub_resolve_async, ub_process, ub_cancel, ub_fd
    // are thread-safe in threaded async mode); our own state is in `state`.

    public let configuration: ResolverConfiguration
    /// True when a trust anchor is loaded: answers can be secure.
    public let validating: Bool

    private let context: OpaquePointer

    private struct Pending {
        var asyncID: Int32
        var name: String
        var type: RRType
        var deadline: ContinuousClock.Instant
        var completion: DNSCompletion
        var token: Unmanaged<QueryToken>
    }

    private struct State {
        var nextID: UInt64 = 1
        var pending: [UInt64: Pending] = [:]
        /// Answers collected by the callback, to be delivered once
        /// ub_process has returned (so a completion may start new queries).
        var ready: [(DNSCompletion, Result<DNSAnswer, DNSError>)] = []
    }

    private let state = Mutex(State())
    /// Serializes blocking callers (see the file comment).
    private let blockingLock = Mutex(())

    public init(_ configuration: ResolverConfiguration = ResolverConfiguration()) throws(DNSError) {
        guard let context = ub_ctx_create() else {
            throw .configuration("ub_ctx_create failed")
        }
        // Configured and loaded before `self` is complete: a failure then
        // deletes the context here, and deinit (which deletes it too) never
        // runs for a Resolver that was not made.
        let validating: Bool
        do {
            validating = try Resolver.configure(context, configuration)
            try Resolver.loadNow(context, configuration)
        } catch {
            ub_ctx_delete(context)
            throw error
        }
        self.context = context
        self.configuration = configuration
        self.validating = validating
    }

    deinit {
        // Stops libunbound's thread; callbacks of pending queries never run,
        // so their tokens are released here and their completions dropped.
        ub_ctx_delete(context)
        let pending = state.withLock { state in
            let pending = Array(state.pending.values)
            state.pending.removeAll()
            return pending
        }
        for query in pending { query.token.release() }
    }

    private static func configure(_ context: OpaquePointer, _ config: ResolverConfiguration) throws(DNSError) -> Bool {
        func check(_ code: Int32, _ what: String) throws(DNSError) {
            guard code == 0 else {
                throw .configuration("\(what): \(String(cString: ub_strerror(code)))")
            }
        }
        func option(_ name: String, _ value: String) throws(DNSError) {
            try check(ub_ctx_set_option(context, name + ":", value), "\(name): \(value)")
        }

        // A thread, not a forked process: the stages drop privileges and
        // may be chrooted; a thread shares that and needs no extra fds.
        try check(ub_ctx_async(context, 1), "ub_ctx_async")

        var loopback = false
        for forwarder in config.forwarders {
            loopback = try validateServer(forwarder, what: "forwarder") || loopback
            try check(ub_ctx_set_fwd(context, forwarder), "forwarder \(forwarder)")
        }
        for stub in config.stubZones {
            try DNSName.validate(stub.zone)
            guard !stub.addresses.isEmpty else {
                throw .configuration("stub zone \(stub.zone): no address")
            }
            for address in stub.addresses {
                loopback = try validateServer(address, what: "stub zone \(stub.zone)") || loopback
                try check(ub_ctx_set_stub(context, stub.zone, address, 0), "stub zone \(stub.zone) \(address)")
            }
        }
        // By default unbound never sends queries to loopback addresses (a
        // delegation to 127.0.0.1 is a classic attack); a configured loopback
        // forwarder or stub is deliberate.
        if loopback { try option("do-not-query-localhost", "no") }
        for zone in config.resolveReservedZones {
            try DNSName.validate(zone)
            // "nodefault" set through ub_ctx_set_option has no effect in
            // libunbound 1.17 (measured: test. stays NXDOMAIN); "transparent"
            // overrides the default zone and, holding no data, resolves.
            try option("local-zone", "\(DNSName.trimmed(zone)). transparent")
        }
        for domain in config.insecureDomains {
            try DNSName.validate(domain)
            try option("domain-insecure", DNSName.trimmed(domain) + ".")
        }

        var anchors = config.trustAnchorFiles
        if anchors.isEmpty, access(config.rootTrustAnchorFile, R_OK) == 0 {
            anchors = [config.rootTrustAnchorFile]
        }
        for file in anchors {
            try checkReadable(file)
            try check(ub_ctx_add_ta_file(context, file), "trust anchor file \(file)")
        }
        // The zone of the lookup that makes libunbound load (see loadNow).
        try option("local-zone", loadCheckZone + ". static")
        return !anchors.isEmpty
    }

    /// A zone of the resolver's own, under "invalid." (RFC 6761: never a
    /// real name), answered locally with NXDOMAIN whatever else is set.
    static let loadCheckZone = "sealpost-load-check.invalid"

    /// Opens and reads `path` the way libunbound will: a regular file we
    /// may read. The error names the file and says why.
    static func checkReadable(_ path: String) throws(DNSError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw .unreadableFile(path: path, reason: String(cString: strerror(errno)))
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw .unreadableFile(path: path, reason: String(cString: strerror(errno)))
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw .unreadableFile(path: path, reason: "not a regular file")
        }
        var byte: UInt8 = 0
        guard read(fd, &byte, 1) >= 0 else {
            throw .unreadableFile(path: path, reason: String(cString: strerror(errno)))
        }
    }

    /// Makes libunbound read its files now rather than at the first real
    /// query: a synchronous lookup in `loadCheckZone` finalizes the context
    /// (modules set up, trust anchors parsed) and is answered from that
    /// local zone without any network traffic. A trust anchor that does not
    /// parse fails here (UB_INITFAIL) instead of deferring every message.
    private static func loadNow(_ context: OpaquePointer, _ config: ResolverConfiguration) throws(DNSError) {
        var result: UnsafeMutablePointer<ub_result>? = nil
        let code = ub_resolve(context, "check." + loadCheckZone + ".", Int32(RRType.a.rawValue), 1, &result)
        if let result { ub_resolve_free(result) }
        guard code == 0 else {
            var anchors = config.trustAnchorFiles
            if anchors.isEmpty, access(config.rootTrustAnchorFile, R_OK) == 0 { anchors = [config.rootTrustAnchorFile] }
            let files = anchors.isEmpty ? "" : " (trust anchors: \(anchors.joined(separator: ", ")); DS or DNSKEY records in zone-file format?)"
            throw .configuration("libunbound failed to load its configuration: \(String(cString: ub_strerror(code)))\(files)")
        }
    }

    /// Checks "ADDRESS" / "ADDRESS@PORT"; returns whether it is loopback.
    private static func validateServer(_ text: String, what: String) throws(DNSError) -> Bool {
        let parts = text.split(separator: "@", omittingEmptySubsequences: false)
        guard parts.count == 1 || parts.count == 2 else {
            throw .configuration("\(what) \"\(text)\": expected ADDRESS or ADDRESS@PORT")
        }
        if parts.count == 2 {
            guard let port = UInt16(parts[1]), port > 0 else {
                throw .configuration("\(what) \"\(text)\": bad port")
            }
        }
        // Quoted as a Swift literal: the text may hold what a log line must not.
        switch IPAddress(text: String(parts[0])) {
        case .v4(let address): return address.bytes[0] == 127
        case .v6(let address): return address.bytes == [UInt8](repeating: 0, count: 15) + [1]
        case nil: throw .configuration("\(what) \(text.debugDescription): not an IP address")
        }
    }

    // MARK: Event-loop API

    /// Readable when answers are waiting: then call `processEvents()`.
    public var fileDescriptor: Int32 { ub_fd(context) }

    /// Starts a query. The completion runs later, from `processEvents()` or
    /// `expireDeadlines()`, exactly once unless the query is cancelled.
    /// Throws (and never calls the completion) when the query cannot start.
    @discardableResult
    public func query(_ name: String, _ type: RRType, timeout: Duration? = nil,
                      completion: @escaping DNSCompletion) throws(DNSError) -> QueryHandle {
        try DNSName.validate(name)
        let deadline = ContinuousClock.now + (timeout ?? configuration.timeout)
        // The entry exists before ub_resolve_async so that a callback on
        // another thread's ub_process finds it; libunbound's own locks are
        // never taken while holding ours (no lock-order inversion).
        let (id, token) = state.withLock { state in
            let id = state.nextID
            state.nextID += 1
            let token = Unmanaged.passRetained(QueryToken(id: id, resolver: self))
            state.pending[id] = Pending(asyncID: 0, name: name, type: type,
                                        deadline: deadline, completion: completion, token: token)
            return (id, token)
        }
        var asyncID: Int32 = 0
        let code = ub_resolve_async(context, name, Int32(type.rawValue), 1 /* class IN */,
                                    token.toOpaque(), unboundCallback, &asyncID)
        guard code == 0 else {
            state.withLock { _ = $0.pending.removeValue(forKey: id) }
            token.release()
            throw .resolver(code: code, message: String(cString: ub_strerror(code)))
        }
        state.withLock { state in state.pending[id]?.asyncID = asyncID }
        return QueryHandle(id: id)
    }

    /// Cancels a query; its completion is not called. No effect if it
    /// already completed.
    public func cancel(_ handle: QueryHandle) {
        guard let query = state.withLock({ $0.pending.removeValue(forKey: handle.id) }) else { return }
        abandon(query)
    }

    /// Stops libunbound working on a query already removed from `pending`.
    private func abandon(_ query: Pending) {
        // On success libunbound will not call back: release the token here.
        // If the answer is already on its way (UB_NOID, or asyncID still 0),
        // the callback runs, releases the token and finds no entry.
        if query.asyncID != 0, ub_cancel(context, query.asyncID) == 0 { query.token.release() }
    }

    /// Collects waiting answers (ub_process), expires overdue queries, and
    /// runs their completions on the calling thread.
    public func processEvents() {
        let code = ub_process(context)
        if code != 0 {
            // Only fails when the pipe to libunbound's thread broke; queries
            // then end at their deadlines.
            _ = code
        }
        expireDeadlines()
    }

    /// Cancels the queries whose deadline passed (completing them with
    /// `.timeout`) and runs every completion ready.
    public func expireDeadlines(now: ContinuousClock.Instant = .now) {
        let (ready, expired) = state.withLock { state in
            let ready = state.ready
            state.ready.removeAll()
            var expired: [Pending] = []
            for (id, query) in state.pending where query.deadline <= now {
                state.pending.removeValue(forKey: id)
                expired.append(query)
            }
            return (ready, expired)
        }
        for query in expired { abandon(query) }
        for (completion, result) in ready { completion(result) }
        for query in expired { query.completion(.failure(.timeout(name: query.name, type: query.type))) }
    }

    /// The earliest deadline of a pending query.
    public var nextDeadline: ContinuousClock.Instant? {
        state.withLock { state in state.pending.values.map(\.deadline).min() }
    }

    public var pendingCount: Int { state.withLock { $0.pending.count } }

    /// From the callback, inside ub_process.
    fileprivate func answered(_ id: UInt64, _ outcome: Result<DNSAnswer, DNSError>) {
        state.withLock { state in
            guard let query = state.pending.removeValue(forKey: id) else { return }   // cancelled or expired
            state.ready.append((query.completion, outcome))
        }
    }

    // MARK: Blocking API

    /// Pumps answers with poll(2) until `done()` is true or no query is
    /// pending. Every query has a deadline, so this returns.
    public func run(until done: () -> Bool) {
        blockingLock.withLock { _ in
            expireDeadlines()
            while !done() {
                guard let deadline = nextDeadline else { return }
                let remaining = deadline - ContinuousClock.now
                var pfd = pollfd(fd: fileDescriptor, events: Int16(POLLIN), revents: 0)
                let result = poll(&pfd, 1, Resolver.milliseconds(remaining))
                if result > 0 {
                    processEvents()
                } else {
                    expireDeadlines()
                }
            }
        }
    }

    /// Resolves one name and type, blocking until the answer or the deadline.
    public func resolve(_ name: String, _ type: RRType, timeout: Duration? = nil) throws(DNSError) -> DNSAnswer {
        let box = ResultBox<Result<DNSAnswer, DNSError>>()
        try query(name, type, timeout: timeout) { box.set($0) }
        run { box.get() != nil }
        guard let result = box.get() else {
            return try Result<DNSAnswer, DNSError>.failure(.timeout(name: name, type: type)).get()
        }
        return try result.get()
    }

    /// Milliseconds for poll(2), rounded up so a wake-up never comes early,
    /// at least 0.
    static func milliseconds(_ duration: Duration) -> Int32 {
        let (seconds, attoseconds) = duration.components
        if seconds < 0 || (seconds == 0 && attoseconds <= 0) { return 0 }
        let millis = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
        return Int32(clamping: millis)
    }
}

/// A value set by a completion and read by the blocking caller.
final class ResultBox<Value: Sendable>: Sendable {
    private let value = Mutex<Value?>(nil)
    func set(_ newValue: Value) { value.withLock { $0 = newValue } }
    func get() -> Value? { value.withLock { $0 } }
}
