// Retry timing: exponential backoff with jitter, queue lifetimes and the delay
// warning threshold. Pure arithmetic on Unix seconds so that every rule can be
// tested with chosen clocks and chosen "random" numbers.

import Spool

import Spool

/// The queue's timing rules (Postfix's parameters of the same names).
public struct RetryPolicy: Sendable, Equatable {
    /// First retry delay; each further failed attempt doubles it...
    public var minimalBackoff: UInt64
    /// ...up to this ceiling.
    public var maximalBackoff: UInt64
    /// A normal message still undelivered this long after arrival is returned.
    public var maximalLifetime: UInt64
    /// The same for bounces and double bounces (Postfix's bounce_queue_lifetime).
    public var bounceLifetime: UInt64
    /// Deferred this long after arrival: the sender gets a delay notice. 0 disables.
    public var delayWarning: UInt64
    /// Relative spread of a retry delay: 0.1 means +-10 %. Jitter keeps the
    /// retries of a burst of messages that failed together from arriving
    /// together at the destination again.
    public var jitter: Double

    public init(minimalBackoff: UInt64 = 300, maximalBackoff: UInt64 = 4000,
                maximalLifetime: UInt64 = 5 * 86400, bounceLifetime: UInt64 = 5 * 86400,
                delayWarning: UInt64 = 4 * 3600, jitter: Double = 0.1) {
        self.minimalBackoff = max(1, minimalBackoff)
        self.maximalBackoff = max(self.minimalBackoff, maximalBackoff)
        self.maximalLifetime = maximalLifetime
        self.bounceLifetime = bounceLifetime
        self.delayWarning = delayWarning
        self.jitter = min(max(jitter, 0), 0.5)
    }

    /// Delay before the next attempt after `attempts` failed attempts (>= 1):
    /// minimal * 2^(attempts-1), capped at maximal, then spread by the jitter
    /// (`random` in 0..<1; 0.5 means no spread). The result always lies in
    /// minimal...maximal.
    public func backoff(attempts: UInt32, random: Double) -> UInt64 {
        let exponent = min(max(Int(attempts), 1) - 1, 40)
        var base = minimalBackoff
        for _ in 0..<exponent {
            if base >= maximalBackoff { break }
            base = base.multipliedReportingOverflow(by: 2).overflow ? maximalBackoff : base * 2
        }
        base = min(base, maximalBackoff)
        let r = min(max(random, 0), 1)
        let spread = Double(base) * jitter * (2 * r - 1)
        let value = (Double(base) + spread).rounded()
        let clamped = min(max(value, Double(minimalBackoff)), Double(maximalBackoff))
        return UInt64(clamped)
    }

    public func lifetime(of kind: MessageKind) -> UInt64 {
        kind == .normal ? maximalLifetime : bounceLifetime
    }

    /// True once the message has been queued for its whole lifetime. A
    /// lifetime of 0 means "no retries": the first deferral returns it.
    public func isExpired(arrival: UInt64, kind: MessageKind, now: UInt64) -> Bool {
        let (end, overflow) = arrival.addingReportingOverflow(lifetime(of: kind))
        return !overflow && now >= end
    }

    /// True once a delay notice is due for a message that arrived at `arrival`.
    public func delayWarningDue(arrival: UInt64, now: UInt64) -> Bool {
        guard delayWarning > 0 else { return false }
        let (end, overflow) = arrival.addingReportingOverflow(delayWarning)
        return !overflow && now >= end
    }
}
