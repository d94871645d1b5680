// SwiftNIO codec for the queue's servers: the same decoder and checks as
// StageConnection, over a ByteBuffer pipeline. A module of its own so that
// the blocking clients of StageProtocol (queue-inject above all, one process
// per message) need not link NIOCore. Descriptor passing is not
// supported over NIO (no version-1 frame carries one): a frame with an `fd`
// attribute is rejected in both directions.

import NIOCore
import StageProtocol

/// bytes -> Frame, with the validation of `FrameDecoder`. A violation is
/// fired as a `ProtocolError` through `errorCaught`; the decoder stays failed
/// (the server answers ERROR and closes).
public final class FrameDecoderHandler: ByteToMessageDecoder {
    public typealias InboundOut = Frame

    private var decoder: FrameDecoder

    /// `protocol` nil: learned from the client's HELLO. `direction`: of the
    /// frames received (a server: `.clientToServer`).
    public init(protocol: ProtocolName? = nil, direction: Direction = .clientToServer) {
        decoder = FrameDecoder(protocol: `protocol`, direction: direction)
    }

    public init(decoder: FrameDecoder) {
        self.decoder = decoder
    }

    /// The protocol in force (after the HELLO).
    public var protocolName: ProtocolName? { decoder.protocolName }

    public func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        // The whole readable part moves into the FrameDecoder, which keeps at
        // most one partial frame: every complete frame is fired at once.
        decoder.append(buffer.readableBytesView)
        buffer.moveReaderIndex(to: buffer.writerIndex)
        while let frame = try decoder.next() {
            if frame.descriptorCount > 0 {
                throw ProtocolError("\(frame.type.name): fd attributes cannot be received over this channel")
            }
            context.fireChannelRead(wrapInboundOut(frame))
        }
        return .needMoreData
    }

    public func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        _ = try decode(context: context, buffer: &buffer)
        if decoder.bufferedByteCount > 0 {
            let n = decoder.bufferedByteCount
            // Forget the partial frame so a second call does not repeat this.
            decoder = FrameDecoder(protocol: decoder.protocolName, direction: decoder.direction, afterHello: decoder.protocolName != nil)
            throw ProtocolError("connection closed in the middle of a frame (\(n) bytes of it received)")
        }
        return .needMoreData
    }
}

@available(*, unavailable, message: "channel handlers are confined to their event loop")
extension FrameDecoderHandler: Sendable {}

/// Frame -> bytes. Every frame is checked (framing; and the schema when a
/// protocol is given) and a violation fails the write with `ProtocolError`
/// instead of putting an invalid frame on the wire.
public final class FrameEncoderHandler: MessageToByteEncoder {
    public typealias OutboundIn = Frame

    private let schema: ProtocolSchema?
    private let direction: Direction

    /// `protocol`: check the schema of the frames sent; `direction` of the
    /// frames *sent* (a server: `.serverToClient`).
    public init(protocol: ProtocolName? = nil, direction: Direction = .serverToClient) {
        self.schema = `protocol`.map(ProtocolSchema.standard)
        self.direction = direction
    }

    public func encode(data frame: Frame, out: inout ByteBuffer) throws {
        var bytes: [UInt8] = []
        try Self.append(frame, schema: schema, direction: direction, to: &bytes)
        out.writeBytes(bytes)
    }

    /// Checks `frame` and appends its encoding to `bytes`; on a violation
    /// appends nothing.
    static func append(_ frame: Frame, schema: ProtocolSchema?, direction: Direction, to bytes: inout [UInt8]) throws {
        let length = try FrameEncoder.checkFraming(frame)
        if frame.descriptorCount > 0 {
            throw ProtocolError("\(frame.type.name): fd attributes cannot be sent over this channel")
        }
        if let schema {
            try schema.validate(frame, direction: direction)
        }
        FrameEncoder.unsafeEncode(frame, length: length, into: &bytes)
    }
}

/// Frame -> bytes like `FrameEncoderHandler`, for a client that writes
/// several frames before each flush (smtp-listen's inject transactions:
/// MAIL, RCPT, the BODYs and END of a small message go in one flush). The
/// frames of a flush are encoded into one buffer and go down the pipeline
/// as one write, instead of a buffer, a write and an iovec each.
///
/// Encoded frames wait here until the flush, or until `pushThreshold`
/// bytes wait: the channel's writability counts them only once they have
/// gone down, so more than that is not kept from it. A frame that fails
/// its checks fails its write and fires the error; every later write
/// fails with it (the connection is finished), as with
/// MessageToByteHandler. Frames not flushed when the channel closes are
/// dropped, their writes failed.
public final class CoalescingFrameEncoder: ChannelOutboundHandler {
    public typealias OutboundIn = Frame
    public typealias OutboundOut = ByteBuffer

    /// Bytes waiting beyond which they go down without a flush.
    public static let pushThreshold = 64 * 1024

    private let schema: ProtocolSchema?
    private let direction: Direction
    private var pending: [UInt8] = []
    /// Completed when the pending bytes are written (the promises of their
    /// writes cascade from it).
    private var pendingPromise: EventLoopPromise<Void>?
    private var failure: Error?
    /// The encoded frames go out with send(2) while the socket takes them
    /// (see DirectSocketWriter): this handler must be the channel's only
    /// writer.
    private let writer = DirectSocketWriter()

    /// As `FrameEncoderHandler.init`.
    public init(protocol: ProtocolName? = nil, direction: Direction = .serverToClient) {
        self.schema = `protocol`.map(ProtocolSchema.standard)
        self.direction = direction
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if let failure {
            promise?.fail(failure)
            return
        }
        do {
            try FrameEncoderHandler.append(unwrapOutboundIn(data), schema: schema, direction: direction, to: &pending)
        } catch {
            failure = error
            promise?.fail(error)
            context.fireErrorCaught(error)
            return
        }
        if let promise {
            if let pendingPromise {
                pendingPromise.futureResult.cascade(to: promise)
            } else {
                pendingPromise = promise
            }
        }
        if pending.count >= Self.pushThreshold { push(context: context) }
    }

    public func flush(context: ChannelHandlerContext) {
        push(context: context)
        context.flush()
    }

    public func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode == .all { drop(ChannelError.ioOnClosedChannel) }
        context.close(mode: mode, promise: promise)
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        drop(ChannelError.ioOnClosedChannel)
    }

    private func push(context: ChannelHandlerContext) {
        guard !pending.isEmpty else { return }
        var buffer = context.channel.allocator.buffer(capacity: pending.count)
        buffer.writeBytes(pending)
        // A connection carries small messages mostly: a big one's
        // capacity is not kept for them.
        pending.removeAll(keepingCapacity: pending.count <= 16 * 1024)
        let promise = pendingPromise
        pendingPromise = nil
        // What the socket does not take waits in NIO for the flush that
        // follows (a push at the threshold, from `write`: for the next
        // flush, as everything pushed there did before the direct send).
        writer.write(buffer, context: context, promise: promise, flush: false)
    }

    private func drop(_ error: Error) {
        pending.removeAll()
        let promise = pendingPromise
        pendingPromise = nil
        promise?.fail(error)
    }
}

@available(*, unavailable, message: "channel handlers are confined to their event loop")
extension CoalescingFrameEncoder: Sendable {}

@available(*, unavailable, message: "channel handlers are confined to their event loop")
extension FrameEncoderHandler: Sendable {}
