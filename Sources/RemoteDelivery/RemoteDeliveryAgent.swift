// One job from the queue -> one result per recipient, over SMTP.
//
// For a job (one destination domain, the `nexthop`): look the domain up in
// the transport table; wait for a slot under the destination's concurrency
// limit; reuse a cached connection to the destination if one is idle;
// otherwise resolve the route (MX hosts in preference order, random among
// equals, every address of each) and ask the destination policy for the
// TLS requirement; then try the addresses in turn until every recipient
// has a result. An address that refuses the connection, times out, greets
// with 4xx/5xx or fails the session passes the undecided recipients to the
// next address. So does a host's 4xx reply, as Postfix's smtp(8) does for
// any server but the last (RFC 5321 section 5.1): a 4xx to MAIL, DATA or
// the end of the data keeps every recipient of the transaction for the
// next address, a 4xx to RCPT that recipient (the others go to this host,
// and the kept ones to the next in a transaction of their own). A 5xx is
// final, but a host-specific bounce (SIZE, SMTPUTF8, REQUIRETLS, 8BITMIME)
// also lets the next address try. Each recipient kept is logged ("kept
// for the next address") when the next address is tried. When no address
// is left, a recipient still undecided is deferred with the last 4xx a host
// gave it, or with the last error if one came after (connect, greeting,
// lost connection, ...); it is bounced only when the hosts that answered
// it all refused it host-specifically. At most 5 addresses, and 2
// sessions that reached a transaction, are tried per job (Postfix's
// smtp_mx_address_limit and smtp_mx_session_limit; RemoteSettings), a
// cached connection counting as both; the route resolved after a cached
// connection's transaction leaves that address out. A TLS handshake that
// fails under an opportunistic policy is retried once on the same address
// in clear text (RFC 7435), not counted as another address.
//
// Everything runs on one event loop: the class is confined to it.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import DNS
import NIOCore
import NIOPosix
import MailMessage
import SMTP
import StageProtocol

/// What remote-deliver is configured with. Keys proposed for a `[remote]`
/// section of sealpost.toml are named on each field.
public struct RemoteSettings: Sendable {
    /// EHLO name (`sealpost.hostname`).
    public var hostname: String
    /// `remote.destination_concurrency_limit`: jobs (and so connections)
    /// at once per destination; Postfix's default_destination_concurrency_limit.
    public var destinationConcurrencyLimit = 20
    /// `remote.max_jobs`: jobs taken from the queue at once (HELLO max-jobs, 1-256).
    public var maxJobs = 100
    /// `remote.connect_timeout`: seconds for the TCP connection.
    public var connectTimeout = 30
    /// `remote.connection_cache_time`: seconds an idle connection is kept
    /// for the next job to the same destination (Postfix: 2 s).
    public var connectionCacheTime = 2
    /// `remote.connection_reuse_limit`: messages per connection.
    public var connectionReuseLimit = 100
    /// `remote.mx_address_limit`: addresses tried per job, a cached
    /// connection's included (Postfix's smtp_mx_address_limit, 5). RFC 5321
    /// section 5.1 allows such a limit and asks for at least two. 0: none.
    public var mxAddressLimit = 5
    /// `remote.mx_session_limit`: sessions per job that reached a
    /// transaction, past greeting, EHLO, TLS and AUTH (Postfix's
    /// smtp_mx_session_limit, 2). A host that answers 4xx has taken a
    /// whole transaction, perhaps the body: a destination whose hosts all
    /// refuse for now is not sent the message by each. 0: no limit.
    public var mxSessionLimit = 2
    /// `remote.source_address` / `remote.source_address_ipv6`: local
    /// addresses to bind outgoing connections to (nil: the kernel chooses).
    public var sourceIPv4: String?
    public var sourceIPv6: String?
    /// `remote.address_preference`: "ipv6" (default), "ipv4" or "any".
    public var addressPreference: AddressPreference = .ipv6
    /// `remote.eight_bit_without_8bitmime`: a message declared
    /// BODY=8BITMIME to a host without 8BITMIME is converted to 7 bit
    /// (default), sent unchanged, or bounced (RFC 6152 section 3).
    public var eightBitWithout8BITMIME: SMTPEightBitPolicy = .convert
    /// Caps every RFC 5321 phase timeout (tests; nil: the RFC's values).
    public var maximumPhaseTimeout: Int?
    /// Largest body held for a job (`queue.message_size_limit` + slack).
    public var maximumMessageSize = 10_240_000 + 1_048_576
    /// AUTH may be sent without TLS to a next hop on a loopback address.
    public var allowLoopbackAuthenticationWithoutTLS = true
    /// Seconds a delivery that would use TLS waits for crypto-negotiate's
    /// socket when it is missing: the supervisor starts crypto-negotiate
    /// just before remote-deliver and restarts it when it dies, and the
    /// first mail after either must not go out in clear text to a server
    /// that offers STARTTLS only because the local TLS stage was a second
    /// late. Missing for longer (crypto-negotiate not run at all), it is
    /// no longer waited for until it is back: clear text for "may", a
    /// deferral where TLS is required.
    public var tlsHandOffGrace = 10.0
    /// This host's names besides `hostname` (`sealpost.hostname` when
    /// the EHLO name differs): an MX host of such a name is this host.
    public var myHostnames: Set<String> = []
    /// Where this host's SMTP listener accepts mail (`smtp.listen`; a
    /// wildcard host, 0.0.0.0 or ::, stands for every local address): an
    /// address and port among them is this host, whatever its name.
    public var ownEndpoints: [SelfRecognition.Endpoint] = []

    public init(hostname: String) { self.hostname = hostname }
}

extension DeliveryJob {
    /// The destination domain: `nexthop`, else the first recipient's domain.
    public var destination: String {
        if let nexthop, !nexthop.isEmpty { return nexthop.lowercased() }
        return EnvelopeAddress.split(recipients.first?.address ?? "")?.domain.lowercased() ?? ""
    }
}

/// The outcome for one recipient (a RESULT frame, and a log line).
public struct RemoteResult: Sendable, Equatable {
    public enum Status: String, Sendable { case sent, deferred, bounced }
    public var index: UInt64
    public var status: Status
    public var dsn: String
    public var text: String
    /// "mx.example.net[192.0.2.1]:25", or nil when no host was reached.
    public var relay: String?
    public var remoteMTA: String?
    public var diagnostic: String?
    public var tls: TLSOutcome
    /// Remarks of the transaction for the log line (the 8-bit body
    /// converted for a host without 8BITMIME, what stayed 8-bit).
    public var notes: [String]

    public init(index: UInt64, status: Status, dsn: String, text: String, relay: String? = nil,
                remoteMTA: String? = nil, diagnostic: String? = nil, tls: TLSOutcome = .none, notes: [String] = []) {
        self.index = index
        self.status = status
        self.dsn = dsn
        self.text = text
        self.relay = relay
        self.remoteMTA = remoteMTA
        self.diagnostic = diagnostic
        self.tls = tls
        self.notes = notes
    }
}

/// Where log lines go: "QUEUEID: key=value, ..." without "stage[pid]: ".
public struct RemoteDeliveryLog: Sendable {
    public var info: @Sendable (String) -> Void
    public var warning: @Sendable (String) -> Void
    public init(info: @escaping @Sendable (String) -> Void, warning: @escaping @Sendable (String) -> Void) {
        self.info = info
        self.warning = warning
    }
}

public final class RemoteDeliveryAgent: @unchecked Sendable {
    public let eventLoop: EventLoop
    public let settings: RemoteSettings
    public let transports: TransportTable
    public let resolver: any MailExchangerResolver
    public let policy: any DestinationPolicy
    public let tlsHandOff: (any TLSClientHandOff)?
    public let log: RemoteDeliveryLog
    /// Runs the async steps (lookups, policy, TLS hand-off) on `eventLoop`,
    /// never on Swift's global executor (see EventLoopTaskExecutor).
    public let taskExecutor: EventLoopTaskExecutor
    /// Current time in seconds (for delay=); replaceable in tests.
    var clock: @Sendable () -> Double = { RemoteDeliveryAgent.now() }

    private var active: [String: Int] = [:]
    private var waiting: [String: [() -> Void]] = [:]
    /// Since when (clock()) crypto-negotiate's socket has been missing;
    /// nil while it is there.
    private var handOffMissingSince: Double?
    private var idle: [String: [(SMTPConnection, Scheduled<Void>)]] = [:]
    /// This host, for the loop check of every route (RoutePlanner.route).
    private let myHostnames: Set<String>
    private let selfRecognition: SelfRecognition

    public init(eventLoop: EventLoop, settings: RemoteSettings, transports: TransportTable = TransportTable(),
                resolver: any MailExchangerResolver, policy: any DestinationPolicy = StaticDestinationPolicy(),
                tlsHandOff: (any TLSClientHandOff)? = nil, log: RemoteDeliveryLog) {
        self.eventLoop = eventLoop
        self.settings = settings
        self.transports = transports
        self.resolver = resolver
        self.policy = policy
        self.tlsHandOff = tlsHandOff
        self.log = log
        self.taskExecutor = EventLoopTaskExecutor(eventLoop)
        // Once: the interfaces' addresses are read at start, not per job.
        self.myHostnames = settings.myHostnames.union([settings.hostname])
        self.selfRecognition = SelfRecognition(endpoints: settings.ownEndpoints)
    }

    /// Delivers `job`; `completion` gets one result per recipient, on the
    /// agent's event loop. `abandoned` (asked on the event loop) turns true
    /// when the results can no longer reach the queue, which then has taken
    /// the job back and will hand it out again: from then on no host is
    /// tried and no end of data sent, so that the message does not go out
    /// twice (only a transaction past its end of data, whose reply could
    /// not be reported, can still be repeated).
    public func deliver(_ job: DeliveryJob, abandoned: @escaping @Sendable () -> Bool = { false },
                        completion: @escaping @Sendable ([RemoteResult]) -> Void) {
        eventLoop.execute { [self] in
            // An internationalized domain (SMTPUTF8) is looked up, matched
            // in the transport table and named in policies by its A-labels.
            let domain = IDNA.asciiDomain(job.destination) ?? job.destination
            let entry = transports.lookup(domain)
            let hop = entry?.nextHop ?? RoutePlanner.defaultHop(for: domain)
            let state = JobState(job: job, domain: domain, entry: entry, hop: hop, started: clock(),
                                 abandoned: abandoned, completion: completion)
            if job.oversized {
                state.decideAll(RemoteResult(index: 0, status: .bounced, dsn: "5.3.4",
                                             text: "message larger than remote-deliver's limit of \(settings.maximumMessageSize) bytes"))
                finish(state, releasing: nil)
                return
            }
            if hop == .local {
                state.decideAll(RemoteResult(index: 0, status: .deferred, dsn: "4.3.5",
                                             text: "mail for \(domain) is routed to local delivery by \(entry?.origin ?? "the transport table"), but was given to remote-deliver"))
                finish(state, releasing: nil)
                return
            }
            let key = "\(hop)|\(entry?.origin ?? "-")"
            acquire(key) { [self] in start(state, key: key) }
        }
    }

    /// Connections kept for reuse (tests, statistics).
    public var idleConnectionCount: Int {
        eventLoop.preconditionInEventLoop()
        return idle.values.reduce(0) { $0 + $1.count }
    }

    /// Closes every cached connection (QUIT).
    public func closeIdleConnections() {
        eventLoop.preconditionInEventLoop()
        let all = idle.values.flatMap { $0 }
        idle = [:]
        for (c, timer) in all {
            timer.cancel()
            c.quit()
        }
    }

    // MARK: - Concurrency

    private func acquire(_ key: String, _ body: @escaping () -> Void) {
        if active[key, default: 0] < settings.destinationConcurrencyLimit {
            active[key, default: 0] += 1
            body()
        } else {
            waiting[key, default: []].append(body)
        }
    }

    private func release(_ key: String) {
        if var queue = waiting[key], !queue.isEmpty {
            let next = queue.removeFirst()
            waiting[key] = queue.isEmpty ? nil : queue
            next()   // the slot passes on
        } else {
            active[key, default: 1] -= 1
            if active[key] == 0 { active[key] = nil }
        }
    }

    // MARK: - One job

    private func start(_ state: JobState, key: String) {
        state.key = key
        if state.abandoned() { return giveUp(state) }
        // A REQUIRETLS message takes no cached connection: it was opened
        // for another job, perhaps without the verification this one needs.
        if !state.job.requireTLS, let connection = takeIdle(key) {
            state.addressesTried += 1
            attempt(state, on: connection, security: state.security)
            return
        }
        resolve(state)
    }

    private func resolve(_ state: JobState) {
        state.resolved = true
        let hop = state.hop, resolver = self.resolver, preference = settings.addressPreference
        let policy = self.policy, domain = state.domain, entry = state.entry
        let me = myHostnames, isSelf = selfRecognition.isSelf
        eventLoop.runTask(on: taskExecutor) { () async -> (Result<DeliveryRoute, RoutingFailure>, DestinationSecurity?) in
            let route = await RoutePlanner.route(hop, resolver: resolver, preference: preference, myHostnames: me,
                                                 isSelf: isSelf)
            guard case .success(let r) = route else { return (route, nil) }
            return (route, await policy.security(domain: domain, route: r, entry: entry))
        }.whenComplete { [self] result in
            switch result {
            case .failure(let error):
                // runTask never fails; kept so that no job waits forever.
                state.failed(AttemptFailure(status: EnhancedStatus(4, 3, 0), text: "internal error: \(error)", reply: nil,
                                            diagnostic: "internal error", peerAnswered: false), at: nil, tls: .none)
            case .success((.failure(var failure), _)):
                if failure.permanent, let origin = entry?.origin, entry?.nextHop != nil,
                   failure.status.subject == 4 || failure.status.subject == 1 {
                    // A next hop from the transport table that does not
                    // resolve is a configuration error (or a passing DNS
                    // fault), not the recipient's: defer, as Postfix does for
                    // its relayhost, rather than bounce all mail routed there.
                    failure = RoutingFailure(permanent: false, status: EnhancedStatus(4, 3, 5),
                                             text: "next hop \(hop) (\(origin)): \(failure.text)")
                }
                // After a cached connection's attempt: what a host said
                // to a recipient is its answer, not the lookup's.
                state.decidePending(RemoteResult(index: 0, status: failure.permanent ? .bounced : .deferred,
                                                 dsn: failure.status.description, text: failure.text,
                                                 diagnostic: failure.text), exceptHeld: true)
            case .success((.success(let route), let security)):
                // Postfix too drops the address a cached connection
                // reached from the route: that host has answered.
                state.candidates = route.candidates.filter { !state.visited.contains(JobState.endpoint($0)) }.map { ($0, false) }
                state.security = security ?? DestinationSecurity(requirement: .may, source: "default")
            }
            next(state)
        }
    }

    /// Tries the next address, or finishes the job.
    private func next(_ state: JobState) {
        guard !state.pending.isEmpty else { return finish(state, releasing: state.key) }
        if state.abandoned() { return giveUp(state) }
        // The clear-text retry is the address just tried, not another one.
        let retry = state.candidates.first?.1 == true
        guard retry || state.mayTryAnotherAddress(addressLimit: settings.mxAddressLimit, sessionLimit: settings.mxSessionLimit) else {
            return finish(state, releasing: state.key)
        }
        guard !state.candidates.isEmpty else {
            if !state.resolved { return resolve(state) }
            return finish(state, releasing: state.key)
        }
        for line in state.keptLines { log.info(line) }
        state.keptLines = []
        let (candidate, plaintext) = state.candidates.removeFirst()
        let security = state.security ?? DestinationSecurity(requirement: .may, source: "default")
        var verification = policy.verification(for: candidate, domain: state.nexthopName, security: security)
        if state.job.requireTLS {
            // RFC 8689 section 4.2.1: the MX host from a DNSSEC-validated
            // lookup (MTA-STS, the other way, is not implemented), and the
            // server authenticated by PKIX (or DANE) whatever the level;
            // SMTPClientSession then insists on an authenticated peer that
            // offers REQUIRETLS. A host that cannot qualify is a
            // host-specific 5.7.30: another may.
            if case .mailExchangers = state.hop, !candidate.mxSecure {
                for index in state.pending {
                    state.hold(RemoteResult(index: index, status: .bounced, dsn: "5.7.30",
                                            text: "REQUIRETLS: MX host \(candidate.host) of \(state.nexthopName) was not found by a DNSSEC-validated lookup",
                                            relay: candidate.description))
                }
                return next(state)
            }
            if verification.method == .none {
                verification = TLSVerification(method: .pkix, matchNames: [candidate.host])
            }
        }
        if security.requirement == .daneOnly && verification.method != .dane {
            state.failed(AttemptFailure(status: EnhancedStatus(4, 7, 5),
                                        text: "TLS is required (dane-only, \(security.source)), but \(candidate.host) has no DNSSEC-validated TLSA records",
                                        reply: nil, diagnostic: "no usable TLSA records for \(candidate.host)", peerAnswered: false),
                         at: nil, tls: .none)
            return next(state)
        }
        var clientPolicy = SMTPClientPolicy(hostname: settings.hostname)
        // REQUIRETLS: TLS or nothing (but where the administrator said
        // tls=none: then the session refuses the message, 5.7.30).
        clientPolicy.tls = state.job.requireTLS && security.requirement != .none ? .required : security.requirement.clientMode
        clientPolicy.eightBitWithout8BITMIME = settings.eightBitWithout8BITMIME
        let handOff = tlsHandOff.flatMap { $0.isAvailable ? $0 : nil }
        if handOff != nil { handOffMissingSince = nil }
        if tlsHandOff != nil, handOff == nil, clientPolicy.tls != .none, !plaintext, waitForHandOff() {
            state.candidates.insert((candidate, plaintext), at: 0)
            eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(100)) { [self] in next(state) }
            return
        }
        if clientPolicy.tls == .opportunistic && (plaintext || handOff == nil) {
            // RFC 7435: clear text rather than no delivery.
            clientPolicy.tls = .none
        }
        clientPolicy.credentials = state.entry?.credentials
        clientPolicy.allowAuthenticationWithoutTLS = settings.allowLoopbackAuthenticationWithoutTLS && Self.isLoopback(candidate.address)
        // The wider cipher list exactly when a failed handshake is retried
        // in clear text (SMTPClientSession's plaintextRetryMayWork): level
        // "may", or "dane" without TLSA records (RFC 7672 then falls back to
        // opportunistic TLS, as Postfix's effective level "may"), and no
        // REQUIRETLS. Everything else keeps the strict list: "encrypt"
        // (a failure defers, so nothing is lost by insisting), "verify" and
        // "secure" (PKIX), and DANE with TLSA records, where RFC 7672 forbids
        // clear text and Postfix uses its mandatory ciphers: servers that
        // publish TLSA records are maintained, and the strict suites are
        // the non-anonymous set such servers negotiate. A REQUIRETLS message
        // on a connection cached from an opportunistic job is still refused
        // there: it needs an authenticated peer, which policy none never gives.
        let opportunistic = clientPolicy.tls == .opportunistic && verification.method == .none && !state.job.requireTLS
        let request = TLSClientRequest(serverName: candidate.host, peer: candidate.description, verification: verification,
                                       handshakeTimeout: min(SMTPClientPhase.tlsHandshake.timeoutSeconds ?? 300, settings.maximumPhaseTimeout ?? 300),
                                       opportunistic: opportunistic)
        let options = ConnectionOptions(connectTimeout: settings.connectTimeout, maximumPhaseTimeout: settings.maximumPhaseTimeout,
                                        sourceIPv4: settings.sourceIPv4, sourceIPv6: settings.sourceIPv6)
        if !plaintext { state.addressesTried += 1 }
        let (connection, future) = SMTPConnection.open(on: eventLoop, candidate: candidate, cacheKey: state.key ?? "",
                                                       policy: clientPolicy, message: state.message(), body: state.job.body,
                                                       options: options, handOff: handOff, tlsRequest: request,
                                                       taskExecutor: taskExecutor, abandoned: state.abandoned)
        future.whenSuccess { [self] outcome in
            apply(outcome, connection: connection, to: state, plaintext: plaintext, cached: false)
            next(state)
        }
    }

    /// crypto-negotiate's socket is missing: whether to wait (and look
    /// again in 100 ms) rather than go on without TLS. See
    /// `RemoteSettings.tlsHandOffGrace`.
    private func waitForHandOff() -> Bool {
        let now = clock()
        guard let since = handOffMissingSince else {
            handOffMissingSince = now
            log.warning("crypto-negotiate is not available (no socket): waiting up to \(settings.tlsHandOffGrace) s before delivering without it")
            return settings.tlsHandOffGrace > 0
        }
        return now - since < settings.tlsHandOffGrace
    }

    /// A transaction on a cached connection (then the route, if needed).
    private func attempt(_ state: JobState, on connection: SMTPConnection, security: DestinationSecurity?) {
        connection.send(state.message(), body: state.job.body, abandoned: state.abandoned).whenSuccess { [self] outcome in
            apply(outcome, connection: connection, to: state, plaintext: false, cached: true)
            next(state)
        }
    }

    private func apply(_ outcome: TransactionOutcome, connection: SMTPConnection, to state: JobState, plaintext: Bool,
                       cached: Bool) {
        let candidate = connection.candidate
        let relay = candidate.description
        if cached || connection.session.messageCount > 0 { state.sessions += 1 }
        // The failure first: it replaces what earlier hosts said to the
        // recipients still pending, not what this one said before it.
        let retryInClearText = outcome.failure?.plaintextRetryMayWork == true && !plaintext
        if let failure = outcome.failure {
            state.failed(failure, at: candidate, tls: connection.tls)
            if retryInClearText {
                state.candidates.insert((candidate, true), at: 0)
            }
        } else if cached {
            state.visited.insert(JobState.endpoint(candidate))
        }
        var kept: [UInt64: RemoteResult] = [:]
        for (index, r) in outcome.results {
            let result = RemoteResult(
                index: UInt64(index), status: RemoteResult.Status(rawValue: r.status.rawValue)!, dsn: r.dsn.description,
                text: r.reply == nil ? r.text : (r.status == .sent ? r.diagnostic : "host \(candidate.host)[\(candidate.address)] said: \(r.text)"),
                relay: relay, remoteMTA: r.reply == nil ? nil : candidate.host, diagnostic: r.diagnostic, tls: connection.tls,
                notes: outcome.message?.notes ?? [])
            if r.mayTryAnotherHost {
                state.hold(result)
                kept[result.index] = result
            } else {
                state.decide(result)
            }
        }
        // Every pending recipient was in this transaction: this host
        // either answered it or failed before it had a result. Nothing
        // for a retry in clear text: the same address, and crypto-negotiate
        // logs the handshake that failed.
        state.keptLines = retryInClearText ? [] : state.pending.compactMap { index in
            guard let (dsn, text) = kept[index].map({ ($0.dsn, $0.text) }) ?? outcome.failure.map({ ($0.status.description, $0.text) })
            else { return nil }
            return Self.keptLine(queueID: state.job.queueID, to: state.address(of: index), relay: relay, dsn: dsn, text: text)
        }
        // Keep the connection for the next job to this destination.
        if connection.isIdle {
            if connection.session.messageCount < settings.connectionReuseLimit, let key = state.key {
                cache(connection, key: key)
            } else {
                connection.quit()
            }
        }
    }

    /// The job's owner is gone (see `deliver`): its pending recipients
    /// end deferred here, for the log; the queue retries them.
    private func giveUp(_ state: JobState) {
        state.keptLines = []
        state.held = [:]
        state.decidePending(RemoteResult(index: 0, status: .deferred, dsn: "4.3.0",
                                         text: "not delivered: the queue's connection closed, and the queue took the job back"))
        finish(state, releasing: state.key)
    }

    private func finish(_ state: JobState, releasing key: String?) {
        // The last attempt's kept recipients are decided below: their
        // results say what that host said.
        state.keptLines = []
        for index in state.pending {
            if let kept = state.held[index] {
                state.decide(kept)
            } else if let failure = state.lastFailure {
                state.decide(RemoteResult(index: index, status: .deferred, dsn: failure.status.description, text: failure.text,
                                          relay: state.lastRelay?.description, remoteMTA: state.lastRelay?.host,
                                          diagnostic: failure.diagnostic, tls: state.lastTLS))
            } else {
                state.decide(RemoteResult(index: index, status: .deferred, dsn: "4.4.0",
                                          text: "no address to deliver to"))
            }
        }
        let now = clock()
        let delay = state.job.delay(now: UInt64(max(0, now)))
        let byIndex = Dictionary(uniqueKeysWithValues: state.job.recipients.map { ($0.index, $0.address) })
        var results: [RemoteResult] = []
        for r in state.job.recipients {
            guard let result = state.results[r.index] else { continue }
            results.append(result)
            log.info(Self.logLine(queueID: state.job.queueID, to: byIndex[r.index] ?? "", result: result, delay: delay))
        }
        if let key { release(key) }
        state.completion(results)
    }

    /// "ID: to=<b@example.net>, relay=mx.example.net[192.0.2.1]:25,
    /// delay=0, dsn=2.0.0, status=sent (250 2.0.0 Ok), tls=none" (delay in
    /// whole seconds, see DeliveryJob.delay), and at the end the
    /// transaction's notes when it has any: ", notes=(8-bit content
    /// converted to quoted-printable for a host without 8BITMIME; ...)".
    public static func logLine(queueID: String, to: String, result: RemoteResult, delay: UInt64) -> String {
        let line = "\(queueID): to=<\(to)>, relay=\(result.relay ?? "none"), delay=\(delay), dsn=\(result.dsn), status=\(result.status.rawValue) (\(result.text)), tls=\(result.tls)"
        return result.notes.isEmpty ? line : line + ", notes=(\(result.notes.joined(separator: "; ")))"
    }

    /// "ID: to=<b@example.net>, relay=mx1.example.net[192.0.2.1]:25,
    /// dsn=4.3.0, kept for the next address (host mx1.example.net[192.0.2.1]
    /// said: 451 4.3.0 Try later (in reply to MAIL FROM command))": a
    /// recipient this host did not take, on its way to the next address.
    /// No status=: the recipient has no result yet (its one result line
    /// follows), as Postfix logs a server it skips.
    public static func keptLine(queueID: String, to: String, relay: String, dsn: String, text: String) -> String {
        "\(queueID): to=<\(to)>, relay=\(relay), dsn=\(dsn), kept for the next address (\(text))"
    }

    // MARK: - The connection cache

    private func cache(_ connection: SMTPConnection, key: String) {
        let timer = eventLoop.scheduleTask(in: .seconds(Int64(settings.connectionCacheTime))) { [self] in
            if let i = idle[key]?.firstIndex(where: { $0.0 === connection }) {
                idle[key]!.remove(at: i)
                if idle[key]!.isEmpty { idle[key] = nil }
            }
            connection.quit()
        }
        connection.onClosed = { [self] c in
            if let i = idle[key]?.firstIndex(where: { $0.0 === c }) {
                idle[key]![i].1.cancel()
                idle[key]!.remove(at: i)
                if idle[key]!.isEmpty { idle[key] = nil }
            }
        }
        idle[key, default: []].append((connection, timer))
    }

    private func takeIdle(_ key: String) -> SMTPConnection? {
        while var list = idle[key], !list.isEmpty {
            let (c, timer) = list.removeLast()
            idle[key] = list.isEmpty ? nil : list
            timer.cancel()
            c.onClosed = nil
            if c.isIdle { return c }
        }
        return nil
    }

    // MARK: - Helpers

    static func isLoopback(_ address: String) -> Bool {
        address.hasPrefix("127.") || address == "::1"
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// The progress of one job.
/// Confined to the agent's event loop.
final class JobState: @unchecked Sendable {
    let job: DeliveryJob
    let domain: String
    let entry: TransportEntry?
    let hop: NextHop
    let started: Double
    let completion: @Sendable ([RemoteResult]) -> Void
    /// True once the job's owner (the queue connection it came on) is gone.
    let abandoned: @Sendable () -> Bool
    var key: String?
    var resolved = false
    var security: DestinationSecurity?
    /// Addresses still to try; `true`: in clear text (after a failed handshake).
    var candidates: [(DeliveryCandidate, Bool)] = []
    var results: [UInt64: RemoteResult] = [:]
    /// What a host said to a recipient still pending when another address
    /// may do better (`SMTPDeliveryResult.mayTryAnotherHost`): its 4xx, or
    /// a host-specific bounce. The result when no address is left.
    var held: [UInt64: RemoteResult] = [:]
    var lastFailure: AttemptFailure?
    var lastRelay: DeliveryCandidate?
    var lastTLS: TLSOutcome = .none
    /// For RemoteSettings.mxAddressLimit and mxSessionLimit.
    var addressesTried = 0
    var sessions = 0
    /// Endpoints (`endpoint(_:)`) a cached connection completed a
    /// transaction with: left out of the route resolved after it.
    var visited: Set<String> = []
    /// The last attempt's "kept for the next address" lines: logged when
    /// the next address is tried; at the end the results say it instead.
    var keptLines: [String] = []

    init(job: DeliveryJob, domain: String, entry: TransportEntry?, hop: NextHop, started: Double,
         abandoned: @escaping @Sendable () -> Bool, completion: @escaping @Sendable ([RemoteResult]) -> Void) {
        self.job = job
        self.abandoned = abandoned
        self.domain = domain
        self.entry = entry
        self.hop = hop
        self.started = started
        self.completion = completion
    }

    /// The name of the next hop: the transport table's host when it names
    /// one (a relay, a smarthost), else the destination domain. What "secure"
    /// matches certificates against, as Postfix's nexthop and .nexthop.
    var nexthopName: String {
        switch hop {
        case .host(let host, _): return host
        case .mailExchangers(let domain, _): return domain
        case .local: return domain
        }
    }

    /// Recipients without a result, in job order.
    var pending: [UInt64] { job.recipients.map(\.index).filter { results[$0] == nil } }

    func decide(_ result: RemoteResult) {
        if results[result.index] == nil { results[result.index] = result }
    }

    /// `exceptHeld`: recipients with a held result keep it.
    func decidePending(_ template: RemoteResult, exceptHeld: Bool = false) {
        for i in pending where !exceptHeld || held[i] == nil {
            var r = template
            r.index = i
            decide(r)
        }
    }

    func decideAll(_ template: RemoteResult) { decidePending(template) }

    /// Keeps a host's answer to a recipient another address may take. A
    /// later host's deferral replaces it (the last host's reply); a
    /// host-specific bounce does not replace a deferral: the host that
    /// deferred may take the message on a later attempt.
    func hold(_ result: RemoteResult) {
        if result.status == .bounced && held[result.index]?.status == .deferred { return }
        held[result.index] = result
    }

    /// An attempt ended before deciding the pending recipients: the last
    /// error, which replaces the deferrals held from earlier hosts. A
    /// host-specific bounce held stays: the mail is not kept queued, for
    /// days perhaps, on the chance that a host not reached now would take
    /// what the one that answered cannot.
    func failed(_ failure: AttemptFailure, at candidate: DeliveryCandidate?, tls: TLSOutcome) {
        lastFailure = failure
        lastRelay = failure.peerAnswered ? candidate : nil
        lastTLS = tls
        held = held.filter { $0.value.status == .bounced }
    }

    /// Whether the limits leave room for another address.
    func mayTryAnotherAddress(addressLimit: Int, sessionLimit: Int) -> Bool {
        (addressLimit <= 0 || addressesTried < addressLimit) && (sessionLimit <= 0 || sessions < sessionLimit)
    }

    func address(of index: UInt64) -> String {
        job.recipients.first { $0.index == index }?.address ?? ""
    }

    /// An address and port, to recognize the same endpoint on a route.
    static func endpoint(_ c: DeliveryCandidate) -> String { "[\(c.address)]:\(c.port)" }

    /// The message for the recipients still pending.
    func message() -> SMTPClientMessage {
        let pendingSet = Set(pending)
        let recipients = job.recipients.filter { pendingSet.contains($0.index) }.map {
            SMTPClientRecipient(index: Int($0.index), address: $0.address, notify: $0.notify.flatMap(JobState.notify),
                                orcpt: $0.orcpt.flatMap(JobState.orcpt))
        }
        let body: SMTPBodyType? = job.bodyType.flatMap { SMTPBodyType(rawValue: $0.uppercased()) }
        return SMTPClientMessage(sender: job.sender, recipients: recipients, size: job.size, bodyType: body,
                                 smtputf8: job.smtputf8, ret: job.ret.flatMap { DSNReturn(rawValue: $0.uppercased()) },
                                 envid: job.envid, requireTLS: job.requireTLS)
    }

    /// "NEVER" or "SUCCESS,FAILURE,DELAY" as the queue protocol carries it.
    static func notify(_ s: String) -> DSNNotify? {
        var n = DSNNotify()
        for part in s.uppercased().split(separator: ",") {
            switch part {
            case "NEVER": n.never = true
            case "SUCCESS": n.success = true
            case "FAILURE": n.failure = true
            case "DELAY": n.delay = true
            default: return nil
            }
        }
        if n.never && (n.success || n.failure || n.delay) { return nil }
        return (n.never || n.success || n.failure || n.delay) ? n : nil
    }

    /// "rfc822;user@example.org".
    static func orcpt(_ s: String) -> DSNOriginalRecipient? {
        guard let semi = s.firstIndex(of: ";"), semi != s.startIndex else { return nil }
        return DSNOriginalRecipient(addressType: String(s[..<semi]), address: String(s[s.index(after: semi)...]))
    }
}
