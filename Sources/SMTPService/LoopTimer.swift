// LoopTimer: a one-shot timer on the event loop of its owner (a session's
// name lookup and STARTTLS hand-off, an inject transaction whose session
// has ended, a SessionClock's tick).
//
// NIO's `scheduleTask` makes a promise for every task (and its future, two
// closures, generic metadata lookups) and, on `cancel`, fails it with
// `EventLoopError.cancelled`; a scheduled callback needs none of that. This
// class is the callback's handler, made once per owner and re-armed as
// often as needed. Timeouts that move with every command are not timers at
// all (SessionClock.swift).
//
// The owner holds the timer; the timer holds the owner's action, which
// captures the owner weakly: a callback still pending keeps no session
// alive. Every call is made on the owner's event loop.

import NIOCore

final class LoopTimer: NIOScheduledCallbackHandler {
    private let action: () -> Void
    private var scheduled: NIOScheduledCallback?

    /// `action` runs when the timer fires (never after `cancel`).
    init(_ action: @escaping () -> Void) {
        self.action = action
    }

    /// Arms the timer for `deadline`, in place of any earlier arming. On
    /// an event loop that is shutting down nothing is armed: its channels
    /// are being closed anyway.
    func arm(at deadline: NIODeadline, on loop: EventLoop) {
        cancel()
        guard let callback = try? loop.assumeIsolated().scheduleCallback(at: deadline, handler: self) else { return }
        scheduled = callback
    }

    func arm(in amount: TimeAmount, on loop: EventLoop) {
        arm(at: .now() + amount, on: loop)
    }

    func cancel() {
        scheduled?.cancel()
        scheduled = nil
    }

    var isArmed: Bool { scheduled != nil }

    func handleScheduledCallback(eventLoop: some EventLoop) {
        scheduled = nil
        action()
    }
}
