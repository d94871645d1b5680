// SessionClock on a real event loop: members are told the time until they
// leave, and a member that leaves during a tick (a session timed out and
// closed, taking another with it) leaves the others' places right.

import NIOCore
import NIOPosix
@testable import SMTPService
import Synchronization
import Testing

// @unchecked Sendable: touched only on the loop (every access is submitted).
private final class Member: SessionClockMember, @unchecked Sendable {
    var clockSlot: Int?
    var ticks = 0
    /// Run at the first tick (on the loop).
    var onFirstTick: (() -> Void)?

    func clockTicked(now: NIODeadline) {
        ticks += 1
        if ticks == 1, let onFirstTick { onFirstTick() }
    }
}

@Suite struct SessionClockTests {
    @Test func membersAreToldTheTimeUntilTheyLeave() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        let clock = SessionClock(eventLoop: loop)
        let (a, b, c) = try loop.submit { () -> (Member, Member, Member) in
            let a = Member(), b = Member(), c = Member()
            // The last member, at its first tick, leaves and takes the
            // first with it: b moves, and must stay findable.
            c.onFirstTick = { clock.remove(c); clock.remove(a) }
            for m in [a, b, c] { clock.add(m) }
            clock.add(b)   // a second add changes nothing
            #expect(clock.memberCount == 3)
            return (a, b, c)
        }.wait()
        let ticked = try waitOnLoop(loop) { b.ticks >= 2 }
        #expect(ticked, "the clock never ticked twice")
        try loop.submit {
            #expect(a.ticks == 1 && c.ticks == 1)
            #expect(clock.memberCount == 1)
            #expect(b.clockSlot == 0 && a.clockSlot == nil && c.clockSlot == nil)
            clock.remove(a)   // not a member: nothing happens
            clock.remove(b)
            #expect(clock.memberCount == 0 && b.clockSlot == nil)
        }.wait()
    }

    /// Whether `condition` (read on the loop) becomes true within 20 s.
    private func waitOnLoop(_ loop: EventLoop, _ condition: @escaping @Sendable () -> Bool) throws -> Bool {
        for _ in 0..<2000 {
            if try loop.submit(condition).wait() { return true }
            usleep(10_000)
        }
        return false
    }
}
