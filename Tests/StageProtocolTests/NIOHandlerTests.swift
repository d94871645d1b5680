import NIOCore
import NIOEmbedded
import Testing
@testable import StageProtocol
import StageProtocolNIO

@Suite struct NIOHandlers {
    func makeChannel(_ p: ProtocolName? = nil) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoderHandler(protocol: p)))
        try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(FrameEncoderHandler(protocol: p ?? .inject)))
        return channel
    }

    @Test func decodesFramesSplitAnyhow() throws {
        let channel = try makeChannel()
        let frames = Conversations.all[0].2
        var wire: [UInt8] = []
        for f in frames { FrameEncoder.encode(f, into: &wire) }
        // Odd-sized pieces: frames split across buffers, several per buffer.
        var offset = 0
        var size = 5
        while offset < wire.count {
            let end = min(wire.count, offset + size)
            try channel.writeInbound(ByteBuffer(bytes: wire[offset..<end]))
            offset = end
            size = size * 7 % 70_001 + 1
        }
        var decoded: [Frame] = []
        while let f = try channel.readInbound(as: Frame.self) { decoded.append(f) }
        #expect(decoded == frames)
        #expect(try channel.finish().isClean)
    }

    @Test func rejectsInvalidInput() throws {
        let channel = try makeChannel(.inject)
        #expect(throws: ProtocolError("MAIL: not allowed before HELLO (only HELLO and ERROR are)")) {
            try channel.writeInbound(ByteBuffer(bytes: FrameEncoder.encode(Frame(.mail, ["sender": .text("")]))))
        }
        _ = try? channel.finish()

        let c2 = try makeChannel(nil)
        try c2.writeInbound(ByteBuffer(bytes: FrameEncoder.encode(Conversations.hello(.inject))))
        #expect(try c2.readInbound(as: Frame.self)?.type == .hello)
        #expect(throws: ProtocolError("MAIL: attribute \"sender\": text contains LF")) {
            try c2.writeInbound(ByteBuffer(bytes: Raw.frame(16, [Raw.text("sender", "a\nb")])))
        }
        _ = try? c2.finish()
    }

    @Test func eofInsideAFrame() throws {
        let channel = try makeChannel(nil)
        try channel.writeInbound(ByteBuffer(bytes: FrameEncoder.encode(Conversations.hello(.inject)) + [0, 0, 0]))
        #expect(try channel.readInbound(as: Frame.self)?.type == .hello)
        #expect(throws: ProtocolError("connection closed in the middle of a frame (3 bytes of it received)")) {
            _ = try channel.finish()
        }
    }

    @Test func encodesAndChecksOutboundFrames() throws {
        let channel = try makeChannel(.inject)
        let accepted = Frame(.accepted, ["queue-id": .text("0123456789AB")])
        try channel.writeOutbound(accepted)
        let out = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(Array(out.readableBytesView) == FrameEncoder.encode(accepted))
        // Invalid frames fail the write and nothing reaches the wire.
        #expect(throws: ProtocolError("REFUSED: attribute \"text\": text contains CR")) {
            try channel.writeOutbound(Frame(.refused, ["code": .uint(451), "status": .text("4.3.0"), "text": .text("a\rb")]))
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        _ = try? channel.finish()

        let c2 = try makeChannel(.inject)
        #expect(throws: ProtocolError("MAIL: not allowed in protocol inject from server to client")) {
            try c2.writeOutbound(Frame(.mail, ["sender": .text("")]))
        }
        #expect(try c2.readOutbound(as: ByteBuffer.self) == nil)
        _ = try? c2.finish()
    }
}
