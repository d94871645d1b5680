import Foundation
import Testing
@testable import StageProtocol

/// The example of Pipeline/PROTOCOL.md section 6, byte for byte: if this
/// test changes, the page changes with it.
@Suite struct ProtocolExample {
    static let message = "Subject: test\r\n\r\nHello.\r\n"

    static let frames: [Frame] = [
        Frame(.hello, ["protocol": .text("inject"), "version": .uint(1)]),
        Frame(.mail, ["sender": .text("")]),
        Frame(.rcpt, ["address": .text("a@example.org")]),
        Frame(.body, ["data": .bytes(Array(message.utf8))]),
        Frame(.end),
    ]

    static let hexLines = [
        "0000002b 0001 08 70726f746f636f6c 02 00000006 696e6a656374 07 76657273696f6e 01 00000008 0000000000000001",
        "0000000e 0010 06 73656e646572 02 00000000",
        "0000001c 0011 07 61646472657373 02 0000000d 61406578616d706c652e6f7267",
        "00000025 0012 04 64617461 03 00000019 5375626a6563743a20746573740d0a0d0a48656c6c6f2e0d0a",
        "00000002 0013",
    ]

    @Test func section6IsExact() throws {
        for (frame, line) in zip(Self.frames, Self.hexLines) {
            let expected = line.filter { $0 != " " }
            #expect(hex(FrameEncoder.encode(frame)) == expected, "\(frame.type.name): \(hex(FrameEncoder.encode(frame)))")
        }
        var wire: [UInt8] = []
        for f in Self.frames { FrameEncoder.encode(f, into: &wire) }
        #expect(try decodeAll(wire, protocol: nil, afterHello: false) == Self.frames)
    }

    /// The hex block of the page itself equals the encoder's output.
    @Test func pageMatchesTheEncoder() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let page = try String(contentsOf: root.appendingPathComponent("Pipeline/PROTOCOL.md"), encoding: .utf8)
        let section = try #require(page.components(separatedBy: "## 6. Example").last)
        let block = try #require(section.components(separatedBy: "```").dropFirst().first)
        var pageHex = ""
        for line in block.split(separator: "\n") {
            for word in line.split(separator: " ") where word.allSatisfy(\.isHexDigit) {
                pageHex += word
            }
        }
        var wire: [UInt8] = []
        for f in Self.frames { FrameEncoder.encode(f, into: &wire) }
        #expect(pageHex == hex(wire))
    }
}
