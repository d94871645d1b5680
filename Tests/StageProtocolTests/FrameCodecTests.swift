import Testing
@testable import StageProtocol

/// One valid conversation per protocol and direction, HELLO first, every
/// frame type allowed there, every attribute it defines.
enum Conversations {
    static let bigText = String(repeating: "é", count: 4096)   // 8192 bytes of 2-byte UTF-8
    static let bigBytes = (0..<65_536).map { UInt8(truncatingIfNeeded: $0) }

    static func hello(_ p: ProtocolName, _ extra: [(String, AttributeValue)] = []) -> Frame {
        Frame(.hello, attributes: [("protocol", .text(p.rawValue)), ("version", .uint(1)),
                                   ("software", .text("sealpost-test 0.1"))] + extra)
    }

    static let error = Frame(.error, ["status": .text("4.3.0"), "text": .text("shutting down")])

    static let all: [(ProtocolName, Direction, [Frame])] = [
        (.inject, .clientToServer, [
            hello(.inject),
            Frame(.mail, ["sender": .text(""), "ret": .text("HDRS"), "envid": .text("QQ314159"),
                          "requiretls": .bool(true), "smtputf8": .bool(false), "body-type": .text("8BITMIME"),
                          "client-address": .text("192.0.2.1"), "client-name": .text("mx.example.net"),
                          "helo": .text("mx.example.net"), "protocol": .text("ESMTPS"),
                          "auth-user": .text("bob"), "size": .uint(UInt64.max), "announce-id": .bool(true)]),
            Frame(.rcpt, ["address": .text("alice@example.org"), "notify": .text("SUCCESS,DELAY"),
                          "orcpt": .text("rfc822;alice@example.org")]),
            Frame(.rcpt, ["address": .text("дмитрий@пример.рф"), "notify": .text("NEVER")]),
            Frame(.body, ["data": .bytes(bigBytes)]),
            Frame(.body, ["data": .bytes([0, 13, 10])]),
            Frame(.end),
            Frame(.mail, ["sender": .text(bigText)]),
            Frame(.rcpt, ["address": .text("x@example.org")]),
            Frame(.abort),
            error,
        ]),
        (.inject, .serverToClient, [
            hello(.inject),
            Frame(.queueID, ["queue-id": .text("0123456789AB")]),
            Frame(.accepted, ["queue-id": .text("0123456789AB")]),
            Frame(.refused, ["code": .uint(452), "status": .text("4.3.1"), "text": .text("queue full")]),
            error,
        ]),
        (.deliver, .clientToServer, [
            hello(.deliver, [("transport", .text("local")), ("max-jobs", .uint(256))]),
            Frame(.result, ["job": .uint(7), "index": .uint(0), "status": .text("sent"), "dsn": .text("2.0.0"),
                            "text": .text("delivered to maildir"), "relay": .text("maildir"),
                            "remote-mta": .text("dns; mx.example.net"), "diagnostic": .text("smtp; 250 ok")]),
            Frame(.result, ["job": .uint(7), "index": .uint(1), "status": .text("bounced"), "dsn": .text("5.1.1"),
                            "text": .text("no such user")]),
            Frame(.jobDone, ["job": .uint(7)]),
        ]),
        (.deliver, .serverToClient, [
            hello(.deliver),
            Frame(.job, ["job": .uint(7), "queue-id": .text("0123456789AB"), "sender": .text("a@example.org"),
                         "arrival": .uint(1_700_000_000), "size": .uint(1234), "attempt": .uint(1),
                         "ret": .text("FULL"), "envid": .text("e1"), "requiretls": .bool(false),
                         "smtputf8": .bool(true), "body-type": .text("7BIT"), "nexthop": .text("example.org")]),
            Frame(.jobRcpt, ["index": .uint(0), "address": .text("b@example.org"), "notify": .text("FAILURE"),
                             "orcpt": .text("rfc822;b@example.org")]),
            Frame(.body, ["data": .bytes(Array("Subject: x\r\n\r\nhi\r\n".utf8))]),
            Frame(.jobEnd, ["job": .uint(7)]),
        ]),
        (.control, .clientToServer, [
            hello(.control),
            Frame(.request, ["verb": .text("list")]),
            Frame(.request, ["verb": .text("delete"), "queue-id": .text("0123456789AB"), "bounce": .bool(true)]),
            Frame(.request, ["verb": .text("flush")]),
        ]),
        (.control, .serverToClient, [
            hello(.control),
            Frame(.entry, ["queue-id": .text("0123456789AB"), "size": .uint(99), "arrival": .uint(0),
                           "sender": .text(""), "held": .bool(true), "envid": .text("e"), "ret": .text("HDRS")]),
            Frame(.entryRcpt, ["address": .text("b@example.org"), "state": .text("deferred"), "attempts": .uint(3),
                               "next-attempt": .uint(1_700_000_300), "error": .text("connection refused")]),
            Frame(.body, ["data": .bytes([65])]),
            Frame(.done, ["ok": .bool(true), "text": .text("1 message")]),
        ]),
    ]

    /// Conversations whose frames carry descriptors (`fd` attributes hold
    /// descriptor 0 here; the decoder yields the placeholder -1).
    static let withDescriptors: [(ProtocolName, Direction, [Frame])] = [
        (.tls, .clientToServer, [
            hello(.tls),
            Frame(.negotiate, ["session": .uint(1), "socket": .fd(0), "role": .text("server"),
                               "handshake-timeout": .uint(60), "idle-timeout": .uint(300),
                               "peer": .text("[192.0.2.1]:4711")]),
            Frame(.negotiate, ["session": .uint(2), "socket": .fd(0), "role": .text("client"),
                               "server-name": .text("mx1.example.net"), "policy": .text("dane"),
                               "match-names": .text("mx1.example.net,example.net"),
                               "tlsa": .bytes([3, 1, 1, 0, 2, 0xab, 0xcd]), "ca": .text("default")]),
            Frame(.negotiate, ["session": .uint(3), "socket": .fd(0), "role": .text("client"),
                               "policy": .text("pin"), "pins": .text(String(repeating: "0f", count: 32))]),
        ]),
        (.tls, .serverToClient, [
            hello(.tls),
            Frame(.negotiated, ["session": .uint(1), "plaintext": .fd(0), "protocol": .text("TLSv1.3"),
                                "cipher": .text("TLS_AES_256_GCM_SHA384"), "group": .text("x25519"),
                                "server-name": .text("mx1.example.net"), "peer-subject": .text("CN=mx1.example.net"),
                                "peer-spki": .text(String(repeating: "a1", count: 32)),
                                "authentication": .text("dane-ee"), "verify-error": .text("self-signed certificate"),
                                "resumed": .bool(false)]),
            Frame(.failed, ["session": .uint(2), "status": .text("4.7.5"), "text": .text("no TLSA record matched"),
                            "verify-error": .text("no matching DANE TLSA records"), "protocol": .text("TLSv1.3"),
                            "peer-subject": .text("CN=x"), "peer-spki": .text(String(repeating: "b2", count: 32))]),
            Frame(.closed, ["session": .uint(1), "received": .uint(10), "sent": .uint(20),
                            "close-notify": .bool(true), "reason": .text("closed")]),
        ]),
    ]

    /// The certificate channel (PROTOCOL.md section 7): no HELLO, its own
    /// schema, supervisor to crypto-negotiate only.
    static let certificateChannel: [Frame] = [
        Frame(.certificates, attributes: [("count", .uint(2)), ("reason", .text("SIGHUP")),
                                          ("cert-1", .fd(0)), ("key-1", .fd(0)), ("cert-2", .fd(0)), ("key-2", .fd(0))]),
        Frame(.certificates, attributes: [("count", .uint(1)), ("cert-1", .fd(0)), ("key-1", .fd(0))]),
    ]
}

@Suite struct RoundTrips {
    @Test func everyFrameTypeAppearsInAConversation() {
        let seen = Set((Conversations.all + Conversations.withDescriptors).flatMap { $0.2.map(\.type) }
                       + Conversations.certificateChannel.map(\.type))
        #expect(seen == Set(FrameType.allCases))
    }

    @Test func certificateChannelFramesByteAtATime() throws {
        var decoder = FrameDecoder(schema: .certificates, direction: .serverToClient, afterHello: true)
        var decoded: [Frame] = []
        for frame in Conversations.certificateChannel {
            for byte in FrameEncoder.encode(frame) {
                decoder.append([byte])
                if let f = try decoder.next() { decoded.append(f) }
            }
        }
        #expect(decoded.count == Conversations.certificateChannel.count)
        #expect(decoded.map(\.type) == [.certificates, .certificates])
        #expect(decoded.first?.attributes.map(\.name) == ["count", "reason", "cert-1", "key-1", "cert-2", "key-2"])
        // Nothing else travels there: a HELLO, or a frame the other way.
        var other = FrameDecoder(schema: .certificates, direction: .serverToClient, afterHello: true)
        other.append(FrameEncoder.encode(Frame(.hello, ["protocol": .text("tls"), "version": .uint(1)])))
        #expect(throws: ProtocolError.self) { _ = try other.next() }
        var reverse = FrameDecoder(schema: .certificates, direction: .clientToServer, afterHello: true)
        reverse.append(FrameEncoder.encode(Conversations.certificateChannel[1]))
        #expect(throws: ProtocolError.self) { _ = try reverse.next() }
    }

    @Test(arguments: 0..<Conversations.all.count)
    func manyFramesPerAppend(_ i: Int) throws {
        let (_, direction, frames) = Conversations.all[i]
        var wire: [UInt8] = []
        for f in frames { FrameEncoder.encode(f, into: &wire) }
        // Protocol nil: the decoder learns it from the HELLO.
        let decoded = try decodeAll(wire, protocol: nil, direction: direction, afterHello: false)
        #expect(decoded == frames)
    }

    @Test(arguments: 0..<Conversations.all.count)
    func oneByteAtATime(_ i: Int) throws {
        let (p, direction, frames) = Conversations.all[i]
        var wire: [UInt8] = []
        for f in frames { FrameEncoder.encode(f, into: &wire) }
        var d = FrameDecoder(protocol: p, direction: direction)
        var decoded: [Frame] = []
        for b in wire {
            d.append(CollectionOfOne(b))
            while let f = try d.next() { decoded.append(f) }
        }
        #expect(decoded == frames)
        #expect(d.bufferedByteCount == 0)
        #expect(d.consumedBytes == UInt64(wire.count))
        #expect(d.protocolName == p)
    }

    @Test func unevenChunks() throws {
        for (p, direction, frames) in Conversations.all {
            var wire: [UInt8] = []
            for f in frames { FrameEncoder.encode(f, into: &wire) }
            var d = FrameDecoder(protocol: p, direction: direction)
            var decoded: [Frame] = []
            var offset = 0
            var size = 1
            while offset < wire.count {
                let end = min(wire.count, offset + size)
                d.append(wire[offset..<end])
                offset = end
                size = size * 3 % 1000 + 1
                while let f = try d.next() { decoded.append(f) }
            }
            #expect(decoded == frames)
        }
    }

    @Test(arguments: 0..<Conversations.withDescriptors.count)
    func conversationsWithDescriptors(_ i: Int) throws {
        let (p, direction, frames) = Conversations.withDescriptors[i]
        var wire: [UInt8] = []
        for f in frames { FrameEncoder.encode(f, into: &wire) }
        let decoded = try decodeAll(wire, protocol: p, direction: direction, afterHello: false)
        let expected = frames.map { f in
            Frame(f.type, attributes: f.attributes.map { ($0.name, $0.value.type == .fd ? AttributeValue.fd(-1) : $0.value) })
        }
        #expect(decoded == expected)
    }

    @Test func fdAttributeDecodesAsPlaceholder() throws {
        let schema = ProtocolSchema(name: "test", clientToServer: [.body: FrameRule([AttributeRule("socket", .fd, required: true)])],
                                    serverToClient: [:])
        var d = FrameDecoder(schema: schema, direction: .clientToServer, afterHello: true)
        d.append(FrameEncoder.encode(Frame(.body, ["socket": .fd(5)])))
        let f = try #require(try d.next())
        #expect(f["socket"] == .fd(-1))
    }

    @Test func encodingIsExact() {
        let bytes = FrameEncoder.encode(Frame(.jobDone, ["job": .uint(258)]))
        #expect(hex(bytes) == "00000013" + "0024" + "03" + hex(Array("job".utf8)) + "01" + "00000008" + "0000000000000102")
        #expect(hex(FrameEncoder.encode(Frame(.end))) == "000000020013")
        #expect(hex(FrameEncoder.encode(Frame(.done, ["ok": .bool(false), "text": .text("")])))
                == "000000150033" + "026f6b" + "04" + "00000001" + "00" + "0474657874" + "02" + "00000000")
    }
}

@Suite struct FramingRejections {
    let sender = Raw.text("sender", "a@example.org")

    @Test func lengthBelowMinimum() {
        expectRejected(Raw.be32(1) + [0, 19], "frame length 1 is below the minimum of 2")
        expectRejected(Raw.be32(0), "frame length 0 is below the minimum of 2")
    }

    @Test func lengthAboveMaximumIsRejectedBeforeTheBody() {
        // Only the length field arrived: no need to wait for 256 KiB.
        expectRejected(Raw.be32(262_145), "frame length 262145 exceeds the limit of 262144")
    }

    @Test func largestFrameIsAccepted() throws {
        // 4 BODY-like bytes attributes are not allowed in one BODY; use a
        // test schema to build a frame of exactly the maximal length.
        let schema = ProtocolSchema(name: "t", clientToServer: [.body: FrameRule(
            (0..<4).map { AttributeRule("d\($0)", .bytes) })], serverToClient: [:])
        let overhead = 2 + 4 * (1 + 2 + 1 + 4)
        let total = WireLimits.maxFrameLength - overhead
        let sizes = [65_536, 65_536, 65_536, total - 3 * 65_536]
        let frame = Frame(.body, attributes: sizes.enumerated().map { ("d\($0.offset)", .bytes([UInt8](repeating: 7, count: $0.element))) })
        let wire = FrameEncoder.encode(frame)
        #expect(wire.count == 4 + WireLimits.maxFrameLength)
        var d = FrameDecoder(schema: schema, direction: .clientToServer, afterHello: true)
        d.append(wire)
        #expect(try d.next() == frame)
    }

    @Test func unknownFrameType() {
        expectRejected(Raw.frame(99), "frame type 99 is unknown")
        expectRejected(Raw.frame(0), "frame type 0 is unknown")
    }

    @Test func attributeValueRunsPastTheEnd() {
        expectRejected(Raw.frame(16, [Raw.attr("sender", 2, Array("abc".utf8), length: 10)]),
                       "MAIL: attribute \"sender\": value of 10 bytes runs past the end of the frame (3 left)")
    }

    @Test func attributeNameRunsPastTheEnd() {
        expectRejected(Raw.frame(16, [[6] + Array("send".utf8)]), "MAIL: attribute name runs past the end of the frame")
    }

    @Test func attributeHeaderRunsPastTheEnd() {
        expectRejected(Raw.frame(16, [[6] + Array("sender".utf8) + [2, 0, 0]]),
                       "MAIL: attribute \"sender\": value header runs past the end of the frame")
    }

    @Test func frameLongerThanItsAttributes() {
        // The length claims 3 more bytes than the attributes use: the
        // frame is not fully consumed.
        var bytes = Raw.frame(16, [sender])
        bytes[3] += 3
        bytes += [0, 0, 0]
        expectRejected(bytes, "MAIL: attribute name is empty")
        var garbage = Raw.frame(16, [sender])
        garbage[3] += 2
        garbage += [1, 0x61]
        expectRejected(garbage, "MAIL: attribute \"a\": value header runs past the end of the frame")
    }

    @Test func attributeLongerThanTheFrame() {
        // The length field cuts the last attribute short; the rest looks
        // like the start of another frame, which must never be reached.
        var bytes = Raw.frame(16, [sender])
        bytes[3] -= 4
        expectRejected(bytes, "runs past the end of the frame")
    }

    @Test func names() {
        expectRejected(Raw.frame(16, [Raw.attr("", 2, [])]), "MAIL: attribute name is empty")
        expectRejected(Raw.frame(16, [Raw.attr(String(repeating: "a", count: 33), 2, [])]),
                       "MAIL: attribute name of 33 bytes exceeds the limit of 32")
        expectRejected(Raw.frame(16, [Raw.attr("Sender", 2, [])]), "MAIL: attribute name \"Sender\" does not start with a letter a-z")
        expectRejected(Raw.frame(16, [Raw.attr("1sender", 2, [])]), "does not start with a letter")
        expectRejected(Raw.frame(16, [Raw.attr("-x", 2, [])]), "does not start with a letter")
        expectRejected(Raw.frame(16, [Raw.attr("send_er", 2, [])]), "MAIL: attribute name \"send_er\" has byte 0x5F outside [a-z0-9-]")
        expectRejected(Raw.frame(16, [Raw.attr([0x73, 0xFF], 2, [])]), "has byte 0xFF outside [a-z0-9-]")
        // 32 bytes is fine as far as framing goes (then unknown to MAIL).
        expectRejected(Raw.frame(16, [Raw.attr(String(repeating: "a", count: 32), 2, [])]), "is not defined for MAIL")
    }

    @Test func valueTypesAndLengths() {
        expectRejected(Raw.frame(16, [Raw.attr("size", 6, [])]), "MAIL: attribute \"size\": unknown value type 6")
        expectRejected(Raw.frame(16, [Raw.attr("size", 0, [])]), "unknown value type 0")
        expectRejected(Raw.frame(16, [Raw.attr("size", 1, [0, 0, 0, 0, 0, 0, 1])]),
                       "MAIL: attribute \"size\": uint value length is 7, must be 8")
        expectRejected(Raw.frame(16, [Raw.attr("smtputf8", 4, [0, 0])]), "MAIL: attribute \"smtputf8\": bool value length is 2, must be 1")
        expectRejected(Raw.frame(16, [Raw.attr("smtputf8", 4, [])]), "bool value length is 0, must be 1")
        expectRejected(Raw.frame(16, [Raw.attr("x", 5, [1])]), "MAIL: attribute \"x\": fd value length is 1, must be 0")
    }

    @Test func boolTwo() {
        expectRejected(Raw.frame(16, [sender, Raw.attr("smtputf8", 4, [2])]),
                       "MAIL: attribute \"smtputf8\": bool value is 2, must be 0 or 1")
    }

    @Test func oversizedText() {
        let ok = Raw.frame(16, [Raw.attr("sender", 2, [UInt8](repeating: 0x61, count: 8192))])
        #expect(throws: Never.self) { try decodeAll(ok) }
        expectRejected(Raw.frame(16, [Raw.attr("sender", 2, [UInt8](repeating: 0x61, count: 8193))]),
                       "MAIL: attribute \"sender\": text value of 8193 bytes exceeds the limit of 8192")
        // The limit is checked from the length field alone.
        expectRejected(Raw.frame(16, [Raw.attr("sender", 2, [], length: 100_000)]), "exceeds the limit of 8192")
    }

    @Test func oversizedBytes() {
        let ok = Raw.frame(18, [Raw.attr("data", 3, [UInt8](repeating: 1, count: 65_536))])
        #expect(throws: Never.self) { try decodeAll(ok) }
        expectRejected(Raw.frame(18, [Raw.attr("data", 3, [UInt8](repeating: 1, count: 65_537))]),
                       "BODY: attribute \"data\": bytes value of 65537 bytes exceeds the limit of 65536")
    }

    @Test func badUTF8() {
        for bad: [UInt8] in [[0xFF], [0xC3], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0x61, 0x80]] {
            expectRejected(Raw.frame(16, [Raw.attr("sender", 2, bad)]), "MAIL: attribute \"sender\": text is not valid UTF-8")
        }
    }

    @Test func forbiddenTextBytes() {
        expectRejected(Raw.frame(16, [Raw.text("sender", "a\nb")]), "MAIL: attribute \"sender\": text contains LF")
        expectRejected(Raw.frame(16, [Raw.text("sender", "a\rb")]), "MAIL: attribute \"sender\": text contains CR")
        expectRejected(Raw.frame(16, [Raw.text("sender", "a\u{0}b")]), "MAIL: attribute \"sender\": text contains NUL")
    }

    /// The scan over contiguous bytes (a native string, an array slice) and
    /// the one over other collections find the same first forbidden byte,
    /// wherever it is, also past the bytes above 0x0D that the fast loop skips.
    @Test func forbiddenTextBytesInEveryKindOfCollection() {
        let cases: [(String, String?)] = [
            ("", nil), ("plain text \u{7F} \u{E9}t\u{E9}", nil), ("\u{0B}\u{0C}\t", nil),
            ("\r", "text contains CR"), ("ab\n", "text contains LF"), ("\u{0}", "text contains NUL"),
            (String(repeating: "x", count: 300) + "\r\n", "text contains CR"),
            ("a\nb\u{0}", "text contains LF"),
        ]
        for (text, problem) in cases {
            let bytes = Array(text.utf8)
            #expect(FrameDecoder.textProblem(text.utf8) == problem, "\(bytes)")
            #expect(FrameDecoder.textProblem(bytes[...]) == problem, "\(bytes)")
            #expect(FrameDecoder.textProblem(bytes.lazy.map { $0 }) == problem, "\(bytes)")
        }
    }

    @Test func duplicateName() {
        expectRejected(Raw.frame(16, [sender, Raw.text("helo", "x"), sender]), "MAIL: attribute \"sender\" appears twice")
    }

    @Test func decoderStaysFailedAndIgnoresLaterBytes() throws {
        var d = FrameDecoder(protocol: .inject, direction: .clientToServer, afterHello: true)
        d.append(Raw.frame(99))
        #expect(throws: ProtocolError("frame type 99 is unknown")) { _ = try d.next() }
        d.append(FrameEncoder.encode(Frame(.end)))
        #expect(throws: ProtocolError("frame type 99 is unknown")) { _ = try d.next() }
    }

    @Test func incompleteFrameWaits() throws {
        var d = FrameDecoder(protocol: .inject, direction: .clientToServer, afterHello: true)
        let wire = FrameEncoder.encode(Frame(.mail, ["sender": .text("a@b")]))
        d.append(wire.dropLast())
        #expect(try d.next() == nil)
        #expect(d.bufferedByteCount == wire.count - 1)
        d.append(wire.suffix(1))
        #expect(try d.next() == Frame(.mail, ["sender": .text("a@b")]))
    }
}

@Suite struct SchemaRejections {
    @Test func onlyHelloOrErrorBeforeHello() throws {
        expectRejected(FrameEncoder.encode(Frame(.end)), "END: not allowed before HELLO (only HELLO and ERROR are)",
                       protocol: nil, afterHello: false)
        expectRejected(FrameEncoder.encode(Frame(.end)), "END: not allowed before HELLO", protocol: .inject, afterHello: false)
        // ERROR before HELLO is fine, and checked.
        let e = try decodeAll(FrameEncoder.encode(Conversations.error), protocol: nil, afterHello: false)
        #expect(e == [Conversations.error])
        expectRejected(FrameEncoder.encode(Frame(.error, ["status": .text("4.3.0")])),
                       "ERROR: required attribute \"text\" is missing", protocol: nil, afterHello: false)
    }

    @Test func helloOnlyOnce() {
        let hello = FrameEncoder.encode(Conversations.hello(.inject))
        expectRejected(hello + hello, "HELLO: allowed only once, as the first frame", protocol: nil, afterHello: false)
    }

    @Test func helloChoosesTheSchema() {
        let wire = FrameEncoder.encode(Conversations.hello(.control)) + FrameEncoder.encode(Frame(.mail, ["sender": .text("")]))
        expectRejected(wire, "MAIL: not allowed in protocol control from client to server", protocol: nil, afterHello: false)
    }

    @Test func helloProtocolMustMatchAndBeKnown() {
        expectRejected(FrameEncoder.encode(Conversations.hello(.control)),
                       "HELLO: attribute \"protocol\": this connection speaks inject, got \"control\"", protocol: .inject, afterHello: false)
        let unknown = Raw.frame(1, [Raw.text("protocol", "smtp"), Raw.uint("version", 1)])
        expectRejected(unknown, "HELLO: attribute \"protocol\": must be inject, deliver, control or tls, got \"smtp\"",
                       protocol: nil, afterHello: false)
        expectRejected(Raw.frame(1, [Raw.uint("version", 1)]), "HELLO: required attribute \"protocol\" is missing",
                       protocol: nil, afterHello: false)
        expectRejected(Raw.frame(1, [Raw.uint("protocol", 1)]), "HELLO: attribute \"protocol\": expected text, got uint",
                       protocol: nil, afterHello: false)
    }

    @Test func deliverHelloNeedsTransportFromTheClientOnly() {
        expectRejected(FrameEncoder.encode(Conversations.hello(.deliver)), "HELLO: required attribute \"transport\" is missing",
                       protocol: nil, afterHello: false)
        expectRejected(FrameEncoder.encode(Conversations.hello(.deliver, [("transport", .text("local"))])),
                       "HELLO: attribute \"transport\" is not defined for HELLO in protocol deliver (server to client)",
                       protocol: nil, direction: .serverToClient, afterHello: false)
        expectRejected(FrameEncoder.encode(Conversations.hello(.deliver, [("transport", .text("pigeon"))])),
                       "HELLO: attribute \"transport\": must be local or remote, got \"pigeon\"", protocol: nil, afterHello: false)
        expectRejected(FrameEncoder.encode(Conversations.hello(.deliver, [("transport", .text("local")), ("max-jobs", .uint(0))])),
                       "HELLO: attribute \"max-jobs\": must be 1..256, got 0", protocol: nil, afterHello: false)
    }

    @Test func frameTypeNotAllowedInThisDirection() {
        expectRejected(FrameEncoder.encode(Frame(.accepted, ["queue-id": .text("X")])),
                       "ACCEPTED: not allowed in protocol inject from client to server")
        expectRejected(FrameEncoder.encode(Frame(.mail, ["sender": .text("")])),
                       "MAIL: not allowed in protocol inject from server to client", direction: .serverToClient)
        expectRejected(FrameEncoder.encode(Frame(.body, ["data": .bytes([1])])),
                       "BODY: not allowed in protocol deliver from client to server", protocol: .deliver)
        expectRejected(FrameEncoder.encode(Frame(.body, ["data": .bytes([1])])),
                       "BODY: not allowed in protocol control from client to server", protocol: .control)
    }

    @Test func frameTypeNotAllowedInThisProtocol() {
        expectRejected(FrameEncoder.encode(Frame(.request, ["verb": .text("list")])),
                       "REQUEST: not allowed in protocol inject")
        expectRejected(FrameEncoder.encode(Frame(.jobDone, ["job": .uint(1)])),
                       "JOB-DONE: not allowed in protocol control", protocol: .control)
    }

    @Test func unknownAttribute() {
        expectRejected(Raw.frame(16, [Raw.text("sender", ""), Raw.text("colour", "blue")]),
                       "MAIL: attribute \"colour\" is not defined for MAIL in protocol inject (client to server)")
        expectRejected(Raw.frame(19, [Raw.text("x", "")]), "END: attribute \"x\" is not defined for END")
    }

    @Test func wrongValueType() {
        expectRejected(Raw.frame(16, [Raw.uint("sender", 5)]), "MAIL: attribute \"sender\": expected text, got uint")
        expectRejected(Raw.frame(16, [Raw.text("sender", ""), Raw.text("size", "5")]), "MAIL: attribute \"size\": expected uint, got text")
        expectRejected(Raw.frame(16, [Raw.text("sender", ""), Raw.attr("smtputf8", 1, Raw.be64(1))]),
                       "MAIL: attribute \"smtputf8\": expected bool, got uint")
        expectRejected(Raw.frame(18, [Raw.text("data", "x")]), "BODY: attribute \"data\": expected bytes, got text")
        expectRejected(Raw.frame(18, [Raw.attr("data", 5, [])]), "BODY: attribute \"data\": expected bytes, got fd")
    }

    @Test func missingRequired() {
        expectRejected(Raw.frame(16, [Raw.text("helo", "x")]), "MAIL: required attribute \"sender\" is missing")
        expectRejected(Raw.frame(18), "BODY: required attribute \"data\" is missing")
        expectRejected(FrameEncoder.encode(Frame(.refused, ["code": .uint(452), "text": .text("x")])),
                       "REFUSED: required attribute \"status\" is missing", direction: .serverToClient)
        expectRejected(FrameEncoder.encode(Frame(.result, ["job": .uint(1), "index": .uint(0), "status": .text("sent"),
                                                           "dsn": .text("2.0.0")])),
                       "RESULT: required attribute \"text\" is missing", protocol: .deliver)
        expectRejected(FrameEncoder.encode(Frame(.entry, ["queue-id": .text("A"), "size": .uint(1), "arrival": .uint(1),
                                                          "sender": .text("")])),
                       "ENTRY: required attribute \"held\" is missing", protocol: .control, direction: .serverToClient)
    }

    @Test func valueRules() {
        expectRejected(FrameEncoder.encode(Frame(.body, ["data": .bytes([])])), "BODY: attribute \"data\": must hold 1..65536 bytes, got 0")
        expectRejected(FrameEncoder.encode(Frame(.mail, ["sender": .text(""), "ret": .text("ALL")])),
                       "MAIL: attribute \"ret\": must be FULL or HDRS, got \"ALL\"")
        expectRejected(FrameEncoder.encode(Frame(.rcpt, ["address": .text("a@b"), "notify": .text("SUCCESS,NEVER")])),
                       "RCPT: attribute \"notify\": must be NEVER or a comma-separated subset")
        expectRejected(FrameEncoder.encode(Frame(.rcpt, ["address": .text("a@b"), "notify": .text("DELAY,DELAY")])),
                       "RCPT: attribute \"notify\"")
        expectRejected(FrameEncoder.encode(Frame(.rcpt, ["address": .text("")])), "RCPT: attribute \"address\": must not be empty")
        expectRejected(FrameEncoder.encode(Frame(.refused, ["code": .uint(250), "status": .text("2.0.0"), "text": .text("x")])),
                       "REFUSED: attribute \"code\": must be 400..599, got 250", direction: .serverToClient)
        expectRejected(FrameEncoder.encode(Frame(.error, ["status": .text("4.3"), "text": .text("x")])),
                       "ERROR: attribute \"status\": not an RFC 3463 status code")
        expectRejected(FrameEncoder.encode(Frame(.error, ["status": .text("3.0.0"), "text": .text("x")])),
                       "not an RFC 3463 status code")
        expectRejected(FrameEncoder.encode(Frame(.result, ["job": .uint(1), "index": .uint(0), "status": .text("lost"),
                                                           "dsn": .text("2.0.0"), "text": .text("x")])),
                       "RESULT: attribute \"status\": must be sent, deferred or bounced, got \"lost\"", protocol: .deliver)
        expectRejected(FrameEncoder.encode(Frame(.job, ["job": .uint(1), "queue-id": .text("A"), "sender": .text(""),
                                                        "arrival": .uint(0), "size": .uint(0), "attempt": .uint(0)])),
                       "JOB: attribute \"attempt\": must be 1..", protocol: .deliver, direction: .serverToClient)
        expectRejected(FrameEncoder.encode(Frame(.request, ["verb": .text("show")])),
                       "REQUEST: attribute \"queue-id\" is required for verb \"show\"", protocol: .control)
        expectRejected(FrameEncoder.encode(Frame(.request, ["verb": .text("delete"), "all": .bool(true),
                                                            "queue-id": .text("0123456789AB")])),
                       "REQUEST: attributes \"all\" and \"queue-id\" exclude each other", protocol: .control)
        expectRejected(FrameEncoder.encode(Frame(.request, ["verb": .text("show"), "all": .bool(true)])),
                       "REQUEST: attribute \"all\" is not allowed for verb \"show\"", protocol: .control)
        expectRejected(FrameEncoder.encode(Frame(.request, ["verb": .text("hold"), "all": .bool(false)])),
                       "REQUEST: attribute \"queue-id\" is required for verb \"hold\"", protocol: .control)
        expectRejected(FrameEncoder.encode(Frame(.request, ["verb": .text("purge")])),
                       "REQUEST: attribute \"verb\": must be list, show, flush, delete, hold, release or stats, got \"purge\"",
                       protocol: .control)
        expectRejected(FrameEncoder.encode(Frame(.entryRcpt, ["address": .text("a"), "state": .text("gone"), "attempts": .uint(0),
                                                              "next-attempt": .uint(0)])),
                       "ENTRY-RCPT: attribute \"state\": must be pending, deferred, sent or bounced", protocol: .control,
                       direction: .serverToClient)
    }

    @Test func schemaValidateIsUsableBySenders() {
        let schema = ProtocolSchema.standard(.inject)
        #expect(throws: ProtocolError("MAIL: required attribute \"sender\" is missing")) {
            try schema.validate(Frame(.mail), direction: .clientToServer)
        }
        #expect(throws: Never.self) { try schema.validate(Frame(.mail, ["sender": .text("")]), direction: .clientToServer) }
    }

    /// A client NEGOTIATE for PKIX with these match-names.
    static func negotiate(_ names: String) -> Frame {
        Frame(.negotiate, ["session": .uint(1), "socket": .fd(0), "role": .text("client"),
                           "policy": .text("pkix"), "match-names": .text(names)])
    }

    /// remote-deliver's "secure" level names the next-hop domain and, with
    /// a leading dot, any name under it; an empty name stays refused.
    @Test func matchNamesMayNameADomainsSubdomains() {
        let schema = ProtocolSchema.standard(.tls)
        #expect(throws: Never.self) { try schema.validate(Self.negotiate("example.org,.example.org"), direction: .clientToServer) }
        for bad in ["example.org,", ".", "..example.org", "example..org"] {
            #expect(throws: ProtocolError.self) { try schema.validate(Self.negotiate(bad), direction: .clientToServer) }
        }
    }

    /// A next hop given as an address ("smtp:[2001:db8::1] tls=verify") is
    /// its own reference identity, matched against iPAddress names.
    @Test func matchNamesMayBeAnAddress() {
        let schema = ProtocolSchema.standard(.tls)
        for good in ["2001:db8::1", "192.0.2.1", "::1", "2001:db8::1,mx.example.org"] {
            #expect(throws: Never.self) { try schema.validate(Self.negotiate(good), direction: .clientToServer) }
        }
        for bad in ["2001:db8::zz", ".2001:db8::1", "[2001:db8::1]", "2001:db8::1%eth0", ":"] {
            #expect(throws: ProtocolError.self) { try schema.validate(Self.negotiate(bad), direction: .clientToServer) }
        }
        // Framing refuses a NUL in text before the schema looks; on its own
        // the address check does not read one as the end of the text.
        #expect(Checks.isIPv6Address("2001:db8::1"))
        #expect(!Checks.isIPv6Address("2001:db8::1\u{0}.example"))
    }
}

@Suite struct EncoderChecks {
    @Test func refusesWhatTheDecoderWouldReject() {
        func refused(_ frame: Frame, _ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
            #expect(throws: ProtocolError(message), sourceLocation: sourceLocation) { try FrameEncoder.checkFraming(frame) }
        }
        refused(Frame(.mail, ["sender": .text("a\r\nb")]), "MAIL: attribute \"sender\": text contains CR")
        refused(Frame(.mail, ["sender": .text("a\nb")]), "MAIL: attribute \"sender\": text contains LF")
        refused(Frame(.mail, ["sender": .text("a\u{0}")]), "MAIL: attribute \"sender\": text contains NUL")
        refused(Frame(.mail, ["sender": .text(String(repeating: "x", count: 8193))]),
                "MAIL: attribute \"sender\": text value of 8193 bytes exceeds the limit of 8192")
        refused(Frame(.body, ["data": .bytes([UInt8](repeating: 0, count: 65_537))]),
                "BODY: attribute \"data\": bytes value of 65537 bytes exceeds the limit of 65536")
        refused(Frame(.mail, ["Sender": .text("")]), "MAIL: attribute name \"Sender\" does not start with a letter a-z")
        refused(Frame(.mail, ["": .text("")]), "MAIL: attribute name is empty")
        refused(Frame(.mail, attributes: [("sender", .text("")), ("sender", .text(""))]), "MAIL: attribute \"sender\" appears twice")
        refused(Frame(.mail, ["x": .fd(-1)]), "MAIL: attribute \"x\": fd -1 is not a descriptor")
        let big = Frame(.body, attributes: (0..<5).map { ("d\($0)", .bytes([UInt8](repeating: 0, count: 60_000))) })
        refused(big, "BODY: frame length 300042 exceeds the limit of 262144")
    }

    @Test func encodePreconditionStopsTheProcess() async {
        await #expect(processExitsWith: .failure) {
            _ = FrameEncoder.encode(Frame(.mail, ["sender": .text("evil\r\nRCPT TO:<x>")]))
        }
    }

    @Test func sanitizedText() {
        #expect(AttributeValue.sanitizedText("a\r\nb\u{0}c") == .text("a  b c"))
        let long = String(repeating: "é", count: 5000)   // 10000 bytes
        guard case .text(let s) = AttributeValue.sanitizedText(long) else { Issue.record(); return }
        #expect(s.utf8.count == 8192)
        #expect(throws: Never.self) { try FrameEncoder.checkFraming(Frame(.mail, ["sender": .sanitizedText(long)])) }
    }

    @Test func typedAccess() throws {
        var f = Frame(.mail, ["sender": .text("a@b"), "size": .uint(5)])
        #expect(try f.text("sender") == "a@b")
        #expect(try f.optionalText("envid") == nil)
        #expect(try f.uint("size") == 5)
        #expect(try f.bool("smtputf8", default: true) == true)
        #expect(throws: ProtocolError("MAIL: attribute \"size\": expected text, got uint")) { try f.text("size") }
        #expect(throws: ProtocolError("MAIL: required attribute \"ret\" is missing")) { try f.text("ret") }
        f.set("size", nil)
        f.set("sender", .text("c@d"))
        f.set("smtputf8", .bool(false))
        #expect(f == Frame(.mail, ["sender": .text("c@d"), "smtputf8": .bool(false)]))
        #expect(f != Frame(.mail, ["smtputf8": .bool(false), "sender": .text("c@d")]))
        #expect(f.description == "MAIL sender=\"c@d\" smtputf8=false")
    }
}

/// checkFraming's duplicate check compares names for a few attributes and
/// hashes them for many: both ways must catch a repeat.
@Suite struct EncoderDuplicateChecks {
    private func problem(_ frame: Frame) -> String? {
        do { _ = try FrameEncoder.checkFraming(frame); return nil } catch { return error.description }
    }

    @Test func duplicateNamesAmongFewAndManyAttributes() {
        #expect(problem(Frame(.mail, attributes: [("sender", .text("a")), ("helo", .text("x")), ("sender", .text("b"))]))
                == "MAIL: attribute \"sender\" appears twice")
        var many: [(String, AttributeValue)] = (0..<20).map { ("a\($0)", .uint(UInt64($0))) }
        #expect(problem(Frame(.mail, attributes: many)) == nil)
        many.append(("a7", .uint(0)))
        #expect(problem(Frame(.mail, attributes: many)) == "MAIL: attribute \"a7\" appears twice")
        #expect(problem(Frame(.mail, attributes: [("send_er", .text("a"))]))?.contains("outside [a-z0-9-]") == true)
    }
}

/// The decoder's UTF-8 check (String(validatingUTF8Bytes:), a fast path for
/// ASCII) answers as the standard library's String(validating:as:) does,
/// for chosen byte strings and random ones, on slices that do not start at 0.
@Test func utf8CheckAgreesWithTheStandardLibrary() {
    var cases: [[UInt8]] = [[], Array("sender".utf8), Array("jörg@example.org".utf8), Array("😀".utf8),
                            [0x80], [0xFF], [0xC3], [0xC3, 0x28], [0xC0, 0xAF], [0xED, 0xA0, 0x80],
                            [0xF4, 0x90, 0x80, 0x80], [0x61, 0xF0, 0x9F, 0x98]]
    // A fixed sequence (an LCG), so that a failure repeats.
    var state: UInt64 = 0x5EA1_9057
    func next(_ bound: Int) -> Int {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Int(state >> 33) % bound
    }
    let valid = ["é", "ß", "€", "日", "😀"].map { Array($0.utf8) }
    for _ in 0..<5000 {
        var bytes: [UInt8] = []
        for _ in 0..<next(11) {
            switch next(4) {
            case 0, 1: bytes.append(UInt8(next(0x80)))
            case 2: bytes.append(UInt8(0x80 + next(0x80)))
            default: bytes += valid[next(valid.count)]
            }
        }
        cases.append(bytes)
    }
    var invalid = 0
    for bytes in cases {
        let padded = [UInt8(0x20)] + bytes
        let expected = String(validating: bytes, as: UTF8.self)
        if expected == nil { invalid += 1 }
        #expect(String(validatingUTF8Bytes: padded[1...]) == expected, "\(bytes)")
    }
    #expect(invalid > 1000 && invalid < cases.count - 1000, "both kinds among the cases")
}
