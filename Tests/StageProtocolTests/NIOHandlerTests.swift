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

    // MARK: CoalescingFrameEncoder

    func makeCoalescingChannel() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(CoalescingFrameEncoder(protocol: .inject, direction: .clientToServer))
        return channel
    }

    @Test func coalescesTheFramesOfAFlushIntoOneWrite() throws {
        let channel = try makeCoalescingChannel()
        let frames = [Frame(.mail, ["sender": .text("a@example.org")]), Frame(.rcpt, ["address": .text("b@example.org")]),
                      Frame(.body, ["data": .bytes(Array("Subject: x\r\n\r\nhi\r\n".utf8))]), Frame(.end)]
        var written: [Bool] = []
        for frame in frames {
            let promise = channel.eventLoop.makePromise(of: Void.self)
            promise.futureResult.whenComplete { written.append((try? $0.get()) != nil) }
            channel.write(frame, promise: promise)
        }
        // Nothing goes down before the flush.
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(written.isEmpty)
        channel.flush()
        let out = try #require(try channel.readOutbound(as: ByteBuffer.self))
        var expected: [UInt8] = []
        for frame in frames { FrameEncoder.encode(frame, into: &expected) }
        #expect(Array(out.readableBytesView) == expected)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(written == [true, true, true, true])
        #expect(try channel.finish().isClean)
    }

    /// Records the writes that pass it (EmbeddedChannel shows only what
    /// was flushed).
    final class WriteRecorder: ChannelOutboundHandler {
        typealias OutboundIn = ByteBuffer
        var sizes: [Int] = []
        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            sizes.append(unwrapOutboundIn(data).readableBytes)
            context.write(data, promise: promise)
        }
    }

    @Test func coalescingSendsPastTheThresholdWithoutAFlush() throws {
        let channel = EmbeddedChannel()
        let recorder = WriteRecorder()
        try channel.pipeline.syncOperations.addHandler(recorder)
        try channel.pipeline.syncOperations.addHandler(CoalescingFrameEncoder(protocol: .inject, direction: .clientToServer))
        let piece = [UInt8](repeating: UInt8(ascii: "x"), count: 40_000)
        channel.write(Frame(.body, ["data": .bytes(piece)]), promise: nil)
        #expect(recorder.sizes.isEmpty)
        channel.write(Frame(.body, ["data": .bytes(piece)]), promise: nil)
        // Over pushThreshold: down the pipeline (where the channel's
        // writability counts it), though not flushed.
        #expect(recorder.sizes.count == 1)
        #expect(recorder.sizes.first ?? 0 > CoalescingFrameEncoder.pushThreshold)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        channel.flush()
        #expect(try channel.readOutbound(as: ByteBuffer.self)?.readableBytes == recorder.sizes.first)
        #expect(try channel.finish().isClean)
    }

    @Test func coalescingRefusesAnInvalidFrameAndEverythingAfter() throws {
        let channel = try makeCoalescingChannel()
        channel.write(Frame(.mail, ["sender": .text("a@example.org")]), promise: nil)
        var failures: [Error] = []
        let bad = channel.eventLoop.makePromise(of: Void.self)
        bad.futureResult.whenFailure { failures.append($0) }
        channel.write(Frame(.rcpt, ["address": .text("b@example.org\r\nX")]), promise: bad)
        #expect(failures.map { $0 as? ProtocolError } == [ProtocolError("RCPT: attribute \"address\": text contains CR")])
        // The error went up the pipeline too.
        #expect(throws: ProtocolError("RCPT: attribute \"address\": text contains CR")) { try channel.throwIfErrorCaught() }
        let later = channel.eventLoop.makePromise(of: Void.self)
        later.futureResult.whenFailure { failures.append($0) }
        channel.write(Frame(.end), promise: later)
        #expect(failures.count == 2)
        _ = try? channel.finish()
    }

    @Test func coalescingFailsWhatWaitsWhenTheChannelCloses() throws {
        let channel = try makeCoalescingChannel()
        var failed = false
        let promise = channel.eventLoop.makePromise(of: Void.self)
        promise.futureResult.whenFailure { _ in failed = true }
        channel.write(Frame(.mail, ["sender": .text("a@example.org")]), promise: promise)
        _ = try channel.finish()
        #expect(failed)
    }
}
