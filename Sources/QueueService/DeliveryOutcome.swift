// What a delivery stage's RESULT does to a recipient's queue state.

import Spool

/// The `status` of a RESULT frame.
public enum DeliveryStatus: String, Sendable, Equatable {
    case sent, deferred, bounced
}

/// One RESULT frame (PROTOCOL.md 4.3), without the job bookkeeping.
public struct DeliveryResult: Sendable, Equatable {
    public var status: DeliveryStatus
    public var dsn: String
    public var text: String
    public var relay: String?
    public var remoteMTA: String?
    public var diagnostic: String?
    public init(status: DeliveryStatus, dsn: String, text: String, relay: String? = nil,
                remoteMTA: String? = nil, diagnostic: String? = nil) {
        self.status = status; self.dsn = dsn; self.text = text; self.relay = relay
        self.remoteMTA = remoteMTA; self.diagnostic = diagnostic
    }
}

/// What happened to the recipient, for the log line.
public enum RecipientOutcome: Sendable, Equatable {
    case sent
    case bounced
    /// Deferred; tried again at `nextAttempt`.
    case deferred(nextAttempt: UInt64)
    /// Deferred past the message's lifetime: now bounced with 4.4.7.
    case expired
}

public enum RecipientUpdate {
    /// Applies a delivery stage's result to a recipient. `lastError` keeps the
    /// latest status text (also for `sent`, where the success DSN quotes it),
    /// `dsnStatus` the latest RFC 3463 code, and `remoteMTA` and `diagnostic`
    /// those of the latest attempt, absent when it reached no server (a DSN
    /// must not pair this attempt's status with an earlier server's words).
    public static func apply(_ result: DeliveryResult, to rcpt: inout RecipientRecord,
                             arrival: UInt64, kind: MessageKind, now: UInt64,
                             policy: RetryPolicy, random: Double) -> RecipientOutcome {
        rcpt.dsnStatus = result.dsn
        rcpt.lastError = result.text
        rcpt.remoteMTA = result.remoteMTA
        rcpt.diagnostic = result.diagnostic
        switch result.status {
        case .sent:
            rcpt.state = .sent
            rcpt.nextAttempt = 0
            return .sent
        case .bounced:
            rcpt.state = .bounced
            rcpt.nextAttempt = 0
            return .bounced
        case .deferred:
            rcpt.attempts &+= 1
            if policy.isExpired(arrival: arrival, kind: kind, now: now) {
                expire(&rcpt)
                return .expired
            }
            rcpt.state = .deferred
            rcpt.nextAttempt = now + policy.backoff(attempts: rcpt.attempts, random: random)
            return .deferred(nextAttempt: rcpt.nextAttempt)
        }
    }

    /// Returns a recipient whose message outlived its queue lifetime
    /// (RFC 3463 4.4.7, "delivery time expired"), quoting the last error.
    public static func expire(_ rcpt: inout RecipientRecord) {
        let last = rcpt.lastError ?? "delivery temporarily suspended"
        rcpt.state = .bounced
        rcpt.nextAttempt = 0
        rcpt.dsnStatus = "4.4.7"
        rcpt.lastError = last.hasPrefix("message expired: ") ? last : "message expired: \(last)"
    }

    /// A recipient whose job was lost (the delivery stage closed the
    /// connection or finished the job without a RESULT for it). The stage, not
    /// the destination, failed: the recipient is retried at once and the
    /// attempt is not counted, so that `kill -9` of a delivery stage delays
    /// nothing. A message that makes the stage die every time would loop, so
    /// after `lostJobLimit` losses in a row the loss counts as a failed
    /// attempt with the normal backoff.
    public static func lost(_ rcpt: inout RecipientRecord, losses: Int, lostJobLimit: Int,
                            arrival: UInt64, kind: MessageKind, now: UInt64,
                            policy: RetryPolicy, random: Double) -> RecipientOutcome {
        if losses < lostJobLimit {
            rcpt.state = .deferred
            rcpt.nextAttempt = now
            rcpt.lastError = "delivery stage lost the job; retrying"
            rcpt.remoteMTA = nil
            rcpt.diagnostic = nil
            return .deferred(nextAttempt: now)
        }
        return apply(DeliveryResult(status: .deferred, dsn: "4.3.0",
                                    text: "delivery stage failed \(losses) times while delivering this message"),
                     to: &rcpt, arrival: arrival, kind: kind, now: now, policy: policy, random: random)
    }
}

extension RecipientState {
    /// Sent and bounced recipients need nothing more.
    public var isFinal: Bool { self == .sent || self == .bounced }
}
