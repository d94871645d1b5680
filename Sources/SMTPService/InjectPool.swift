// Idle inject connections, kept per event loop for the next transaction.
//
// A transaction used to open a connection of its own to the queue (connect,
// HELLO both ways, then close): per message a socket, an accept, SO_PEERCRED,
// two NIO channels with their pipelines, a handful of epoll_ctl calls and a
// round trip, on both sides. The inject protocol allows any number of
// transactions on a connection, one after the other, so a connection whose
// transaction ended cleanly (ACCEPTED or REFUSED read, nothing outstanding)
// goes back here and the next transaction of the same event loop takes it.
//
// Still one transaction per connection at a time (see InjectTransaction:
// sharing a connection between concurrent transactions would make each wait
// behind the slowest). A connection that fails, times out or is aborted is
// closed, never pooled. An idle connection that the queue closes (a restart)
// or that receives anything leaves the pool at once; a transaction that took
// one the queue closed just before it noticed retries once on a fresh
// connection (nothing is lost: it still has all it sent, whether it waited
// for QUEUE-ID or replays what went under the connection's reserved ID).
// The pooled connection also carries the queue ID the queue reserved for
// its next MAIL (InjectResponseHandler), which is what spares the next
// transaction the QUEUE-ID round trip.
//
// A connection idle in the pool for `idleTime` (60 s) is closed: the queue
// closes inject connections idle for 300 s, and one closed here first is
// never taken by a transaction as the queue closes it. Only the ones left
// over from a burst age out: a busy loop reuses the newest (LIFO).
//
// Loop-confined: each pool is used only on its own event loop.

import NIOConcurrencyHelpers
import NIOCore

final class InjectPool: @unchecked Sendable {
    // @unchecked Sendable: `idle` is touched only on `eventLoop` (checked).
    let eventLoop: EventLoop
    /// At most this many idle connections are kept (the rest are closed).
    let capacity: Int
    /// An idle connection is closed after this long in the pool.
    let idleTime: TimeAmount
    /// In the order they came back (`since`, oldest first): `take` pops
    /// the newest, `expire` closes from the front.
    private var idle: [(channel: Channel, handler: InjectResponseHandler, since: NIODeadline)] = []
    /// The next `expire`, while anything is idle.
    private var expiry: Scheduled<Void>?
    /// After closeAll (shutdown): nothing is pooled any more.
    private var closed = false

    init(eventLoop: EventLoop, capacity: Int, idleTime: TimeAmount) {
        self.eventLoop = eventLoop
        self.capacity = capacity
        self.idleTime = idleTime
    }

    var idleCount: Int {
        eventLoop.preconditionInEventLoop()
        return idle.count
    }

    /// The most recently used idle connection, if any (LIFO: the warmest).
    func take() -> (channel: Channel, handler: InjectResponseHandler)? {
        eventLoop.preconditionInEventLoop()
        while let entry = idle.popLast() {
            if entry.channel.isActive { return (entry.channel, entry.handler) }
            entry.channel.close(promise: nil)
        }
        return nil
    }

    /// A connection whose transaction ended cleanly.
    func giveBack(_ channel: Channel, _ handler: InjectResponseHandler) {
        eventLoop.preconditionInEventLoop()
        handler.transaction = nil
        guard channel.isActive, !closed, idle.count < capacity else {
            channel.close(promise: nil)
            return
        }
        handler.pool = self
        let now = NIODeadline.now()
        idle.append((channel, handler, now))
        if expiry == nil { scheduleExpiry(at: now + idleTime) }
    }

    private func scheduleExpiry(at deadline: NIODeadline) {
        expiry = eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in expire() }
    }

    /// Closes the connections idle for `idleTime`; looks again when the
    /// oldest left will have been.
    private func expire() {
        expiry = nil
        let cutoff = NIODeadline.now() - idleTime
        let count = idle.prefix { $0.since <= cutoff }.count
        // Out of the list before closing: a close calls `discard` at once.
        let expired = idle.prefix(count).map(\.channel)
        idle.removeFirst(count)
        for channel in expired { channel.close(promise: nil) }
        if let oldest = idle.first { scheduleExpiry(at: oldest.since + idleTime) }
    }

    /// An idle connection closed or spoke out of turn: drop it.
    func discard(_ channel: Channel) {
        eventLoop.preconditionInEventLoop()
        idle.removeAll { $0.channel === channel }
        channel.close(promise: nil)
    }

    /// Closes every idle connection (shutdown); done when all are closed.
    func closeAll() -> EventLoopFuture<Void> {
        eventLoop.preconditionInEventLoop()
        let channels = idle.map(\.channel)
        idle = []
        closed = true
        expiry?.cancel()
        expiry = nil
        for channel in channels { channel.close(promise: nil) }
        return EventLoopFuture.andAllComplete(channels.map(\.closeFuture), on: eventLoop)
    }
}

/// The pools of a server, one per event loop, made on first use.
final class InjectPools: Sendable {
    let capacity: Int
    let idleTime: TimeAmount
    /// Shared by every transaction of the server, pooled or not.
    let queueCapabilities = QueueCapabilities()
    private let pools = NIOLockedValueBox<[ObjectIdentifier: InjectPool]>([:])

    init(capacity: Int, idleTime: TimeAmount) {
        self.capacity = capacity
        self.idleTime = idleTime
    }

    func pool(for loop: EventLoop) -> InjectPool? {
        guard capacity > 0 else { return nil }
        return pools.withLockedValue { pools in
            let key = ObjectIdentifier(loop)
            if let pool = pools[key] { return pool }
            let pool = InjectPool(eventLoop: loop, capacity: capacity, idleTime: idleTime)
            pools[key] = pool
            return pool
        }
    }

    /// Closes the idle connections of every pool; done when all are closed.
    func closeAll(on loop: EventLoop) -> EventLoopFuture<Void> {
        let closed = pools.withLockedValue({ Array($0.values) }).map { pool in
            pool.eventLoop.flatSubmit { pool.closeAll() }
        }
        return EventLoopFuture.andAllComplete(closed, on: loop)
    }
}
