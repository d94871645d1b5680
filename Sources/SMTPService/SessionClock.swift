// SessionClock: the timeouts of the sessions on one event loop, checked by
// one timer.
//
// A session waits for its client under a deadline that moves with every
// command (RFC 5321 4.5.3.2), and for the queue's answer to its message
// under another. An NIO timer per wait costs an arm and a cancel per
// message (a promise, closures, a heap entry), and NIO's cancel walks every
// timer of the event loop: with a thousand sessions, a thousand steps per
// message. Here a deadline is a stored value: the clock ticks once per
// `resolution` while it has members and tells each the time; a member
// whose deadline has passed times out then. A timeout so fires up to one
// resolution late, which RFC 5321's minimums ("at least 5 minutes") allow;
// the configured timeouts are whole seconds.
//
// Every call is made on the clock's event loop. A member is held until it
// leaves: a session leaves when its channel goes inactive or its handler is
// removed.

import NIOConcurrencyHelpers
import NIOCore

protocol SessionClockMember: AnyObject {
    /// The member's place in its clock (the clock's business).
    var clockSlot: Int? { get set }
    /// The clock's tick: time out what is overdue at `now`.
    func clockTicked(now: NIODeadline)
}

final class SessionClock: @unchecked Sendable {
    // @unchecked Sendable: `members` is touched only on `eventLoop` (checked).
    static let resolution = TimeAmount.seconds(1)

    private let eventLoop: EventLoop
    private var members: [SessionClockMember] = []
    private lazy var ticker = LoopTimer { [weak self] in self?.tick() }

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    var memberCount: Int {
        eventLoop.preconditionInEventLoop()
        return members.count
    }

    func add(_ member: SessionClockMember) {
        eventLoop.preconditionInEventLoop()
        guard member.clockSlot == nil else { return }
        member.clockSlot = members.count
        members.append(member)
        if !ticker.isArmed { ticker.arm(in: Self.resolution, on: eventLoop) }
    }

    func remove(_ member: SessionClockMember) {
        eventLoop.preconditionInEventLoop()
        guard let slot = member.clockSlot, slot < members.count, members[slot] === member else { return }
        let last = members.removeLast()
        if slot < members.count {
            members[slot] = last
            last.clockSlot = slot
        }
        member.clockSlot = nil
        // The ticker is left armed: it stops at its next tick if nobody
        // came meanwhile (a cancel would walk the loop's timers).
    }

    private func tick() {
        guard !members.isEmpty else { return }
        let now = NIODeadline.now()
        // A member that times out may leave (and move another) meanwhile.
        for member in members where member.clockSlot != nil {
            member.clockTicked(now: now)
        }
        // A member that joined meanwhile armed it already.
        if !members.isEmpty, !ticker.isArmed { ticker.arm(in: Self.resolution, on: eventLoop) }
    }
}

/// The clocks of a server, one per event loop, made on first use (as
/// InjectPools).
final class SessionClocks: Sendable {
    private let clocks = NIOLockedValueBox<[ObjectIdentifier: SessionClock]>([:])

    func clock(for loop: EventLoop) -> SessionClock {
        clocks.withLockedValue { clocks in
            let key = ObjectIdentifier(loop)
            if let clock = clocks[key] { return clock }
            let clock = SessionClock(eventLoop: loop)
            clocks[key] = clock
            return clock
        }
    }
}
