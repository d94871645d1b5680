// Writes a channel's outbound bytes with send(2) on the channel's socket
// itself while NIO holds none of them, and hands NIO only what the socket
// does not take.
//
// Why: a write through NIO (the pipeline's outbound handlers, the pending-
// writes queue, a promise, writability accounting) costs about 8,000
// instructions; smtp-listen writes seven replies and one batch of inject
// frames per message, each a few dozen or hundred bytes that the socket
// takes at once nearly always. When it does not (a peer that does not read,
// its window full) or fails, NIO gets the rest and does what it always
// does: buffers it, waits for the socket, makes the channel unwritable past
// its high-water mark, closes on an error. Every later write then goes
// through NIO too, until NIO has written all it holds, so the bytes keep
// their order.
//
// The owner must be the channel's only writer (a handler that writes only
// through this) and its outbound handler nearest the socket (nothing
// between them would see the bytes sent directly), on the channel's event
// loop.

#if canImport(Glibc)
import Glibc
#endif
import NIOCore

public final class DirectSocketWriter {
    /// The channel's socket, looked up at the first write; .some(nil) for
    /// a channel without one (an EmbeddedChannel in tests): everything
    /// then goes through NIO.
    private var descriptor: NIOBSDSocket.Handle??
    /// Writes handed to NIO and not completed yet (written or failed).
    private var writesInNIO = 0

    public init() {}

    /// Forgets the socket: the owner moved to another channel.
    public func reset() { descriptor = nil }

    /// Writes `buffer`: sent at once when the socket takes all of it,
    /// else what is left through NIO (flushed when `flush`). `promise`
    /// completes when it is all written. True when it went at once.
    @discardableResult
    public func write(_ buffer: ByteBuffer, context: ChannelHandlerContext,
                      promise: EventLoopPromise<Void>?, flush: Bool = true) -> Bool {
        var buffer = buffer
        if send(&buffer, context: context) {
            promise?.succeed()
            return true
        }
        writeThroughNIO(buffer, context: context, promise: promise, flush: flush)
        return false
    }

    /// Sends what `buffer` holds when NIO holds nothing of this channel's,
    /// and takes what went out of `buffer`; true when all of it did. (For
    /// an owner that does something else when NIO has to take the rest;
    /// `write` otherwise.)
    ///
    /// The descriptor is used only while the channel is active: NIO closes
    /// it in the same step (on this event loop, with no handler called in
    /// between) that makes the channel inactive, so a number the kernel may
    /// since have given to another file is never written to.
    public func send(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) -> Bool {
        #if canImport(Glibc)
        guard writesInNIO == 0, buffer.readableBytes > 0, context.channel.isActive else { return false }
        if descriptor == nil { descriptor = .some(Self.socket(of: context)) }
        guard case .some(.some(let socket)) = descriptor else { return false }
        let sent = buffer.withUnsafeReadableBytes { bytes in
            Glibc.send(socket, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL))
        }
        guard sent > 0 else { return false }
        buffer.moveReaderIndex(forwardBy: sent)
        return buffer.readableBytes == 0
        #else
        // No MSG_NOSIGNAL elsewhere (Darwin has SO_NOSIGPIPE, which NIO
        // sets): NIO writes everything there.
        return false
        #endif
    }

    /// Hands `buffer` to NIO (written and flushed from `context` on), and
    /// counts it until its write completes. `promise` completes with it.
    public func writeThroughNIO(_ buffer: ByteBuffer, context: ChannelHandlerContext,
                                promise: EventLoopPromise<Void>?, flush: Bool = true) {
        writesInNIO += 1
        let done = promise ?? context.eventLoop.makePromise()
        // NIO completes writes in order, and a write it holds bytes of has
        // not completed: once the count is back at 0 NIO holds nothing of
        // ours and the next write may go directly. (A callback the caller
        // added to `promise` before this one sees the count still up: it
        // would only send more through NIO, never out of order.)
        done.futureResult.assumeIsolated().whenComplete { [self] _ in writesInNIO -= 1 }
        if flush {
            context.writeAndFlush(NIOAny(buffer), promise: done)
        } else {
            context.write(NIOAny(buffer), promise: done)
        }
    }

    /// Whether NIO still holds bytes written through it.
    public var holdsWritesInNIO: Bool { writesInNIO > 0 }

    /// Closes the channel once NIO has written what it holds of ours (at
    /// once when it holds nothing): a close discards NIO's pending writes,
    /// and among them may be a reply the peer must get (the 250 for a
    /// queued message). NIO completes writes in order, so an empty one
    /// completes after them. Bounding the wait is the owner's business.
    public func closeWhenWritten(context: ChannelHandlerContext) {
        guard writesInNIO > 0 else {
            context.close(promise: nil)
            return
        }
        let done = context.eventLoop.makePromise(of: Void.self)
        done.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        writeThroughNIO(context.channel.allocator.buffer(capacity: 0), context: context, promise: done)
    }

    /// The channel's socket. NIO's accessor for it
    /// (`withUnsafeTransportIfAvailable`) casts the channel's core to a
    /// constrained existential, which the runtime checks anew at every
    /// call: 16,000 instructions, as much as two writes through NIO. A
    /// NIOPosix socket channel is its own core, and a cast to the plain
    /// protocol is a cached conformance lookup; a channel that is not
    /// (another transport) gets the accessor.
    private static func socket(of context: ChannelHandlerContext) -> NIOBSDSocket.Handle? {
        if let core = context.channel as? any NIOTransportAccessibleChannelCore,
           let socket = transport(of: core) {
            return socket
        }
        return try? context.pipeline.syncOperations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) { $0 }
    }

    private static func transport<Core: NIOTransportAccessibleChannelCore>(of core: Core) -> NIOBSDSocket.Handle? {
        (try? core.withUnsafeTransport { $0 }) as? NIOBSDSocket.Handle
    }
}

@available(*, unavailable, message: "confined to its channel's event loop")
extension DirectSocketWriter: Sendable {}
