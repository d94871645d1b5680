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
// Loop-confined: each pool is used only on its own event loop.

import NIOConcurrencyHelpers
import NIOCore

final class InjectPool: @unchecked Sendable {
    // @unchecked Sendable: `idle` is touched only on `eventLoop` (checked).
    let eventLoop: EventLoop
    /// At most this many idle connections are kept (the rest are closed).
    let capacity: Int
    private var idle: [(channel: Channel, handler: InjectResponseHandler)] = []
    /// After closeAll (shutdown): nothing is pooled any more.
    private var closed = false

    init(eventLoop: EventLoop, capacity: Int) {
        self.eventLoop = eventLoop
        self.capacity = capacity
    }

    var idleCount: Int {
        eventLoop.preconditionInEventLoop()
        return idle.count
    }

    /// The most recently used idle connection, if any (LIFO: the warmest).
    func take() -> (channel: Channel, handler: InjectResponseHandler)? {
        eventLoop.preconditionInEventLoop()
        while let entry = idle.popLast() {
            if entry.channel.isActive { return entry }
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
        idle.append((channel, handler))
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
        for channel in channels { channel.close(promise: nil) }
        return EventLoopFuture.andAllComplete(channels.map(\.closeFuture), on: eventLoop)
    }
}

/// The pools of a server, one per event loop, made on first use.
final class InjectPools: Sendable {
    let capacity: Int
    /// Shared by every transaction of the server, pooled or not.
    let queueCapabilities = QueueCapabilities()
    private let pools = NIOLockedValueBox<[ObjectIdentifier: InjectPool]>([:])

    init(capacity: Int) {
        self.capacity = capacity
    }

    func pool(for loop: EventLoop) -> InjectPool? {
        guard capacity > 0 else { return nil }
        return pools.withLockedValue { pools in
            let key = ObjectIdentifier(loop)
            if let pool = pools[key] { return pool }
            let pool = InjectPool(eventLoop: loop, capacity: capacity)
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
