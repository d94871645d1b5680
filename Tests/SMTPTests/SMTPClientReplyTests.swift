import Testing
@testable import SMTP

/// Parses everything in `text`, fed whole or byte by byte; the error ends it.
func parseReplies(_ text: String, feed: Feed, limits: SMTPClientReplyLimits = SMTPClientReplyLimits())
    -> (replies: [SMTPReply], error: String?) {
    var parser = SMTPClientReplyParser(limits: limits)
    var replies: [SMTPReply] = []
    let bytes = Array(text.utf8)
    let chunks: [[UInt8]] = feed == .whole ? [bytes] : bytes.map { [$0] }
    for chunk in chunks {
        parser.append(chunk)
        do {
            while let r = try parser.next() { replies.append(r) }
        } catch {
            return (replies, error.reason)
        }
    }
    return (replies, nil)
}

@Suite struct SMTPClientReplyTests {
    struct Good: Sendable, CustomStringConvertible {
        var wire: String
        var code: Int
        var status: String?
        var lines: [String]
        var description: String { wire.debugDescription }
    }

    static let good: [Good] = [
        Good(wire: "250 Ok\r\n", code: 250, status: nil, lines: ["Ok"]),
        Good(wire: "250\r\n", code: 250, status: nil, lines: [""]),
        Good(wire: "250 \r\n", code: 250, status: nil, lines: [""]),
        Good(wire: "550 5.1.1 No such user\r\n", code: 550, status: "5.1.1", lines: ["No such user"]),
        Good(wire: "550 5.1.1\r\n", code: 550, status: "5.1.1", lines: [""]),
        Good(wire: "250-first\r\n250-\r\n250 last\r\n", code: 250, status: nil, lines: ["first", "", "last"]),
        Good(wire: "550-5.7.1 Go\r\n550 5.7.1 away\r\n", code: 550, status: "5.7.1", lines: ["Go", "away"]),
        // The class must match the code; otherwise the text stays as it is.
        Good(wire: "250 5.1.1 odd\r\n", code: 250, status: nil, lines: ["5.1.1 odd"]),
        Good(wire: "354 2.0.0 go\r\n", code: 354, status: nil, lines: ["2.0.0 go"]),
        Good(wire: "451 4.3.0.1 x\r\n", code: 451, status: nil, lines: ["4.3.0.1 x"]),
        // Bare LF ends a line too; control characters become "?".
        Good(wire: "220 mx\n", code: 220, status: nil, lines: ["mx"]),
        Good(wire: "220 a\rb\tc\u{7F}\r\n", code: 220, status: nil, lines: ["a?b?c?"]),
        Good(wire: "220 h\u{E9}llo\r\n", code: 220, status: nil, lines: ["h?llo"]),
    ]

    @Test(arguments: good, Feed.allCases)
    func wellFormedReplies(c: Good, feed: Feed) throws {
        let (replies, error) = parseReplies(c.wire, feed: feed)
        #expect(error == nil)
        let r = try #require(replies.first)
        #expect(replies.count == 1)
        #expect(r.code == c.code)
        #expect(r.status?.description == c.status)
        #expect(r.lines == c.lines)
    }

    struct Bad: Sendable, CustomStringConvertible {
        var name: String
        var wire: String
        var error: String
        var description: String { name }
    }

    static let bad: [Bad] = [
        Bad(name: "empty line", wire: "\r\n", error: "empty reply line"),
        Bad(name: "empty line inside", wire: "250-a\r\n\r\n", error: "empty reply line"),
        Bad(name: "NUL", wire: "250 a\0b\r\n", error: "NUL byte in reply"),
        Bad(name: "mixed codes", wire: "250-a\r\n251 b\r\n", error: "reply code changed from 250 to 251 within a reply"),
        Bad(name: "letters", wire: "abc def\r\n", error: "malformed reply line: \"abc def\""),
        Bad(name: "short", wire: "25\r\n", error: "malformed reply line: \"25\""),
        Bad(name: "class 1", wire: "150 x\r\n", error: "malformed reply line: \"150 x\""),
        Bad(name: "class 6", wire: "650 x\r\n", error: "malformed reply line: \"650 x\""),
        Bad(name: "bad separator", wire: "250_x\r\n", error: "malformed reply line: \"250_x\""),
        Bad(name: "huge line", wire: "250 " + String(repeating: "x", count: 3000) + "\r\n",
            error: "reply line longer than 2048 bytes"),
        Bad(name: "huge line, no end", wire: "250 " + String(repeating: "x", count: 3000),
            error: "reply line longer than 2048 bytes"),
        Bad(name: "endless continuation", wire: String(repeating: "250-x\r\n", count: 101), error: "reply longer than 100 lines"),
        Bad(name: "many long lines", wire: String(repeating: "250-" + String(repeating: "y", count: 2000) + "\r\n", count: 40),
            error: "reply longer than 65536 bytes"),
    ]

    @Test(arguments: bad, Feed.allCases)
    func hostileReplies(c: Bad, feed: Feed) {
        let (replies, error) = parseReplies(c.wire, feed: feed)
        #expect(replies.isEmpty)
        #expect(error == c.error)
    }

    @Test func boundsAreInclusiveAndMemoryStaysBounded() {
        // Exactly at the limits: fine.
        let atLines = String(repeating: "250-x\r\n", count: 99) + "250 x\r\n"
        #expect(parseReplies(atLines, feed: .whole).replies.first?.lines.count == 100)
        let atLength = "250 " + String(repeating: "x", count: 2044) + "\r\n"
        #expect(parseReplies(atLength, feed: .byteAtATime).error == nil)
        // Byte by byte an endless line never holds more than the limit.
        var parser = SMTPClientReplyParser()
        parser.append(Array("250 ".utf8))
        var failed = false
        for _ in 0..<5000 {
            parser.append([UInt8(ascii: "z")])
            #expect(parser.bufferedByteCount <= 2048 + 2)
            do { _ = try parser.next() } catch { failed = true; break }
        }
        #expect(failed)
    }

    @Test func severalRepliesInOneRead() {
        let (replies, error) = parseReplies("250 2.1.0 Ok\r\n550 5.1.1 No\r\n354 go\r\n", feed: .whole)
        #expect(error == nil)
        #expect(replies.map(\.code) == [250, 550, 354])
    }

    @Test func customLimits() {
        var limits = SMTPClientReplyLimits()
        limits.maxLines = 2
        limits.maxLineLength = 10
        #expect(parseReplies("250-a\r\n250-b\r\n250 c\r\n", feed: .whole, limits: limits).error == "reply longer than 2 lines")
        #expect(parseReplies("250 0123456789\r\n", feed: .whole, limits: limits).error == "reply line longer than 10 bytes")
    }

    @Test func replyTextIsBoundedForLogs() {
        let long = (0..<60).map { "250-" + String(repeating: "w", count: 400) + "\($0)" }.joined(separator: "\r\n") + "\r\n250 end\r\n"
        let r = parseReplies(long, feed: .whole).replies[0]
        let result = SMTPDeliveryResult(reply: r, phase: .rcptTo)
        #expect(result.diagnostic.count == 1000)
        #expect(result.diagnostic.hasSuffix("..."))
    }

    // MARK: EHLO keywords

    @Test func capabilities() {
        let wire = """
            250-mx.example.net Hello client [192.0.2.1]\r
            250-PIPELINING\r
            250-size 35882577\r
            250-8BITMIME\r
            250-SMTPUTF8\r
            250-ENHANCEDSTATUSCODES\r
            250-DSN\r
            250-STARTTLS\r
            250-CHUNKING\r
            250-REQUIRETLS\r
            250-AUTH PLAIN login\r
            250-AUTH=CRAM-MD5 PLAIN\r
            250-X-UNKNOWN whatever\r
            250-=bogus\r
            250 VRFY\r

            """
        let reply = parseReplies(wire, feed: .byteAtATime).replies[0]
        let c = SMTPServerCapabilities(ehlo: reply)
        #expect(c.extensions == [.pipelining, .size, .eightBitMIME, .smtputf8, .enhancedStatusCodes, .dsn,
                                 .startTLS, .chunking, .requireTLS, .auth])
        #expect(c.sizeLimit == 35_882_577)
        #expect(c.authMechanisms == ["PLAIN", "LOGIN", "CRAM-MD5"])
        #expect(c.serverName == "mx.example.net")
    }

    @Test(arguments: [("250-mx\r\n250 SIZE\r\n", nil), ("250-mx\r\n250 SIZE 0\r\n", nil),
                      ("250-mx\r\n250 SIZE -5\r\n", nil), ("250-mx\r\n250 SIZE 99999999999999999999999\r\n", nil),
                      ("250-mx\r\n250 SIZE 1024\r\n", UInt64(1024))] as [(String, UInt64?)])
    func sizeKeyword(wire: String, limit: UInt64?) {
        let c = SMTPServerCapabilities(ehlo: parseReplies(wire, feed: .whole).replies[0])
        #expect(c.extensions.contains(.size))
        #expect(c.sizeLimit == limit)
    }

    // MARK: Hostile replies in a session

    @Test(arguments: [
        "250 \0\r\n", "\r\n", "250-a\r\n550 b\r\n", "xyz\r\n",
        String(repeating: "250-ENDLESS\r\n", count: 200),
        "250 " + String(repeating: "A", count: 5000) + "\r\n",
    ], Feed.allCases)
    func hostileEHLOReplyIsAProtocolError(ehloReply: String, feed: Feed) throws {
        let run = drive(clientPolicy(), message(["bob@example.net"]), peer: Peer([("EHLO", ehloReply.hasSuffix("\n") ? ehloReply : ehloReply + "\n")]), feed: feed)
        let e = try #require(run.protocolErrors.first)
        #expect(e.kind == .protocolError && e.status == EnhancedStatus(4, 5, 0) && e.phase == .ehlo)
        #expect(run.actions.last == .close)
        #expect(run.commands == ["EHLO client.example.org"])
        #expect(run.results.isEmpty)
    }

    @Test(arguments: Feed.allCases)
    func unexpectedRepliesAreProtocolErrors(feed: Feed) throws {
        // A reply nobody asked for, after the final reply to the data.
        let extra = drive(clientPolicy(.none), message(["bob@example.net"]),
                          peer: Peer([("<END-OF-DATA>", "250 2.0.0 Ok\r\n250 2.0.0 again\r\n")]), feed: feed)
        #expect(extra.results[1]?.status == .sent)
        // Byte by byte, the client has sent QUIT before the extra reply
        // is complete: it reads as the reply to QUIT, as it would on a wire.
        #expect(extra.protocolErrors.count == (feed == .whole ? 1 : 0))
        #expect(extra.actions.last == .close)

        // Data while the body streams (the server must wait for the dot).
        var s = SMTPClientSession(policy: clientPolicy(.none), message: message(["bob@example.net"]))
        for reply in ["220 hi", "250 mx", "250 ok", "250 ok"] { _ = s.receive(Array((reply + "\r\n").utf8)) }
        #expect(s.receive(Array("354 go\r\n".utf8)) == [.sendBody])
        let during = s.receive(Array("552 too big\r\n".utf8))
        guard case .protocolError(let f) = during.first else { Issue.record("expected a protocol error"); return }
        #expect(f.phase == .dataBlock)
        #expect(during.last == .close)

        // A 354 to RCPT, a 2xx to DATA: out of step.
        let rcpt354 = drive(clientPolicy(.none), message(["bob@example.net"]), peer: Peer([("RCPT", "354 what")]), feed: feed)
        #expect(rcpt354.protocolErrors.first?.phase == .rcptTo)
        let data250 = drive(clientPolicy(.none), message(["bob@example.net"]), peer: Peer([("DATA", "250 sure")]), feed: feed)
        #expect(data250.protocolErrors.first?.phase == .dataInit)
        #expect(data250.results.isEmpty)

        // Bytes after the 354 in the same read.
        let after354 = drive(clientPolicy(.none), message(["bob@example.net"]), peer: Peer([("DATA", "354 go\r\n250 early\r\n")]), feed: .whole)
        #expect(after354.protocolErrors.count == 1)
        #expect(after354.peer.messages.isEmpty)
    }
}
