// Which delivery status notifications (RFC 3464) a message calls for, and to
// whom. Pure decisions; QueueEngine builds the messages with MailMessage's
// DeliveryStatusNotification and inserts them in the same spool batch that
// updates or deletes the original, so that a crash can neither lose nor
// duplicate a notice.

import MailMessage
import Spool

/// The RFC 3464 `Action` of a recipient in a notice.
public enum NoticeAction: String, Sendable, Equatable {
    case failed, delayed, delivered
}

/// One notice to build.
public struct NoticePlan: Sendable, Equatable {
    /// `.bounce` for notices to the sender, `.doubleBounce` for the ones to
    /// the postmaster about a notice that could not be delivered.
    public var kind: MessageKind
    /// Envelope recipient of the notice (its sender is `<>`, but for a
    /// double bounce's: the double-bounce sender).
    public var recipient: String
    /// RFC 3461 RET: return the whole original (`FULL`) or its header (`HDRS`).
    public var returnFullMessage: Bool
    /// Recipients of the original it reports on, by index, with their action.
    public var entries: [NoticeEntry]

    public init(kind: MessageKind, recipient: String, returnFullMessage: Bool, entries: [NoticeEntry]) {
        self.kind = kind; self.recipient = recipient; self.returnFullMessage = returnFullMessage; self.entries = entries
    }
}

public struct NoticeEntry: Sendable, Equatable {
    public var index: Int
    public var action: NoticeAction
    public init(index: Int, action: NoticeAction) { self.index = index; self.action = action }
}

public enum NoticePlanner {
    /// The notice owed when every recipient is final (sent or bounced):
    ///
    /// - a normal message with a sender: one report to the sender covering
    ///   the bounced recipients whose NOTIFY allows FAILURE and the ones
    ///   delivered locally whose NOTIFY asks for SUCCESS (RFC 3461 6.2: a
    ///   remote delivery is "relayed" on and the next hop reports success);
    /// - a message with the null sender, or a bounce: never a notice to `<>`
    ///   (RFC 5321 6.1); the failure goes to the postmaster as a double
    ///   bounce, whatever NOTIFY says;
    /// - a double bounce, or a message from the double-bounce sender (a
    ///   double bounce an alias forwarded, which comes back to the queue as
    ///   a normal message with that sender): nothing; the caller logs and
    ///   discards it (see `isDiscardedNotice`).
    public static func completionNotice(for envelope: EnvelopeRecord, router: Router,
                                        postmaster: String, doubleBounceSender: String) -> NoticePlan? {
        let bounced = envelope.recipients.indices.filter { envelope.recipients[$0].state == .bounced }
        if isFromDoubleBounceSender(envelope, doubleBounceSender) { return nil }
        switch envelope.kind {
        case .doubleBounce:
            return nil
        case .bounce:
            return doubleBounce(bounced, postmaster: postmaster)
        case .normal:
            if envelope.sender.isEmpty { return doubleBounce(bounced, postmaster: postmaster) }
            var entries: [NoticeEntry] = []
            for (i, r) in envelope.recipients.enumerated() {
                let notify = NotifyConditions(parameter: r.notify)
                if r.state == .bounced && notify.contains(.failure) {
                    entries.append(NoticeEntry(index: i, action: .failed))
                } else if r.state == .sent && notify.contains(.success)
                            && router.destination(of: r.address).transport == .local {
                    entries.append(NoticeEntry(index: i, action: .delivered))
                }
            }
            guard !entries.isEmpty else { return nil }
            return NoticePlan(kind: .bounce, recipient: envelope.sender,
                              returnFullMessage: (envelope.ret ?? "FULL").uppercased() != "HDRS", entries: entries)
        }
    }

    /// A postmaster notification that failed: logged and dropped
    /// ("undeliverable postmaster notification discarded").
    public static func isDiscardedNotice(_ envelope: EnvelopeRecord, doubleBounceSender: String) -> Bool {
        (envelope.kind == .doubleBounce || isFromDoubleBounceSender(envelope, doubleBounceSender))
            && envelope.recipients.contains { $0.state == .bounced }
    }

    /// The domain compared without case, as everywhere in the queue; the
    /// local part as written ("double-bounce", ours).
    private static func isFromDoubleBounceSender(_ envelope: EnvelopeRecord, _ doubleBounceSender: String) -> Bool {
        guard let sender = EnvelopeAddress.split(envelope.sender),
              let ours = EnvelopeAddress.split(doubleBounceSender) else { return false }
        return sender.localPart.utf8.elementsEqual(ours.localPart.utf8)
            && sender.domain.lowercased() == ours.domain.lowercased()
    }

    private static func doubleBounce(_ bounced: [Int], postmaster: String) -> NoticePlan? {
        guard !bounced.isEmpty else { return nil }
        return NoticePlan(kind: .doubleBounce, recipient: postmaster, returnFullMessage: true,
                          entries: bounced.map { NoticeEntry(index: $0, action: .failed) })
    }

    /// The delay notice owed now, if any: for a normal message with a sender
    /// (not the double-bounce sender, whose mail nothing reports on),
    /// its still-undelivered, not-yet-warned recipients whose NOTIFY allows
    /// DELAY, once the message is older than delay_warning_time. One notice
    /// per message and recipient (the caller sets `delayNotified`); headers
    /// only (RET=HDRS), as the message itself is still on its way.
    public static func delayNotice(for envelope: EnvelopeRecord, now: UInt64, policy: RetryPolicy,
                                   doubleBounceSender: String, inFlight: Set<Int> = []) -> NoticePlan? {
        guard envelope.kind == .normal, !envelope.sender.isEmpty, !envelope.held,
              !isFromDoubleBounceSender(envelope, doubleBounceSender),
              policy.delayWarningDue(arrival: envelope.arrival, now: now) else { return nil }
        var entries: [NoticeEntry] = []
        for (i, r) in envelope.recipients.enumerated()
        where !r.state.isFinal && !r.delayNotified && !inFlight.contains(i)
            && NotifyConditions(parameter: r.notify).contains(.delay) {
            entries.append(NoticeEntry(index: i, action: .delayed))
        }
        guard !entries.isEmpty else { return nil }
        return NoticePlan(kind: .bounce, recipient: envelope.sender, returnFullMessage: false, entries: entries)
    }
}
