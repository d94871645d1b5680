// Verified client names for smtp-listen: forward-confirmed reverse DNS
// (the DNS module's Resolver.verifiedName), looked up once per address and
// kept for the answer's TTL (at most an hour; a name that does not exist
// for at least a minute; a failure or a timeout not at all), so that a
// client that connects again and again costs no query. The session waits
// for the name before its greeting, as Postfix's smtpd does; bytes the
// client sends meanwhile make it an early talker (554).

import DNS
import NIOConcurrencyHelpers
import NIOCore

public final class ClientNames: Sendable {
    private struct Entry {
        var name: String?
        var expires: NIODeadline
    }

    private let resolver: ResolverThread
    /// Per query; the session bounds the whole lookup with `lookupTimeout`.
    private let queryTimeout: Duration
    /// How long a session waits for the name before it greets with
    /// "unknown".
    public let lookupTimeout: TimeAmount
    private let cache = NIOLockedValueBox([String: Entry]())
    /// Addresses kept at most; past it, expired entries go, then all.
    static let maximumEntries = 10_000

    public init(resolver: ResolverThread, queryTimeout: Duration = .seconds(5), lookupTimeout: TimeAmount = .seconds(10)) {
        self.resolver = resolver
        self.queryTimeout = queryTimeout
        self.lookupTimeout = lookupTimeout
    }

    /// The cached outcome for `address`: `.some(nil)` is a cached "no
    /// verified name"; nil: not cached (or expired).
    public func cached(_ address: String) -> String?? {
        let now = NIODeadline.now()
        return cache.withLockedValue { entries -> String?? in
            guard let entry = entries[address], entry.expires > now else { return nil }
            return .some(entry.name)
        }
    }

    /// A lookup in progress. Once `cancel()` has returned, its completion
    /// neither runs nor is running: a session cancels when it closes, so
    /// that an answer arriving later (the resolver's thread outlives the
    /// server) never reaches an event loop that may have been shut down.
    public final class Lookup: Sendable {
        private let cancelled = NIOLockedValueBox(false)

        public func cancel() { cancelled.withLockedValue { $0 = true } }

        /// Runs `body` unless cancelled, holding the lock: keep it short.
        func complete(_ body: () -> Void) {
            cancelled.withLockedValue { cancelled in if !cancelled { body() } }
        }
    }

    /// Looks `address` up; `completion` runs on the resolver's thread,
    /// unless the lookup was cancelled first.
    @discardableResult
    public func lookup(_ address: String, completion: @escaping @Sendable (String?) -> Void) -> Lookup {
        let cache = self.cache
        let lookup = Lookup()
        resolver.verifiedName(of: address, timeout: queryTimeout) { name, ttl in
            let seconds = name == nil ? Int64(ttl) : min(Int64(ttl), 3600)
            if seconds > 0 {
                let now = NIODeadline.now()
                cache.withLockedValue { entries in
                    if entries.count >= Self.maximumEntries {
                        entries = entries.filter { $0.value.expires > now }
                        if entries.count >= Self.maximumEntries { entries = [:] }
                    }
                    entries[address] = Entry(name: name, expires: now + .seconds(seconds))
                }
            }
            lookup.complete { completion(name) }
        }
        return lookup
    }
}
