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
        let length = try FrameEncoder.checkFraming(frame)
        if frame.descriptorCount > 0 {
            throw ProtocolError("\(frame.type.name): fd attributes cannot be sent over this channel")
        }
        if let schema {
            try schema.validate(frame, direction: direction)
        }
        var bytes: [UInt8] = []
        FrameEncoder.unsafeEncode(frame, length: length, into: &bytes)
        out.writeBytes(bytes)
    }
}

@available(*, unavailable, message: "channel handlers are confined to their event loop")
extension FrameEncoderHandler: Sendable {}
