/// The Received header builder, the fuzz driver's invariants on random
/// input, and feeding-independence: byte-at-a-time, random splits and
/// all-at-once produce the same transcript.
import Testing
@testable import SMTP

@Suite struct Received {
    let date = "Mon, 30 Nov 2026 10:00:00 +0000"

    @Test func wellFormedHeader() {
        let h = ReceivedHeader.build(helo: "client.example.net", clientAddress: "198.51.100.7",
                                     clientHostname: "mail.example.net", hostname: "mx.example.org",
                                     protocolName: "ESMTPS", queueID: "0123456789AB",
                                     recipient: "bob@example.org", date: date)
        #expect(h == "Received: from client.example.net (mail.example.net [198.51.100.7])\r\n\tby mx.example.org (Sealpost) with ESMTPS id 0123456789AB\r\n\tfor <bob@example.org>; \(date)\r\n")
    }

    @Test func withoutRecipientAndIPv6() {
        let h = ReceivedHeader.build(helo: "[IPv6:2001:db8::1]", clientAddress: "2001:db8::1", clientHostname: nil,
                                     hostname: "mx.example.org", protocolName: "ESMTPSA", queueID: nil,
                                     recipient: nil, tls: "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
                                     date: date)
        #expect(h == "Received: from [IPv6:2001:db8::1] (unknown [IPv6:2001:db8::1])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 \\(256/256 bits\\))\r\n\tby mx.example.org (Sealpost) with ESMTPSA;\r\n\t\(date)\r\n")
    }

    static let hostileHelos = [
        "evil)\r\nX-Injected: yes", "((((", "a\\", "caf\u{e9}.example", "x\0y", String(repeating: "(", count: 2000),
        "ok.example (fake [1.2.3.4])", ")", "\u{202e}rtl",
    ]

    @Test(arguments: hostileHelos)
    func hostileHeloStaysInsideOneField(_ helo: String) {
        let h = ReceivedHeader.build(helo: helo, clientAddress: "198.51.100.7", clientHostname: "bad)host\r\nX: y",
                                     hostname: "mx.example.org", protocolName: "ESMTP", queueID: "ID\r\nX",
                                     recipient: "\"a)b;c\"@example.org", date: "Mon\r\nX: y", )
        check(h)
        #expect(h.hasPrefix("Received: from [198.51.100.7] (unknown [198.51.100.7] helo="))
    }

    @Test func utf8RecipientOnlyForSMTPUTF8() {
        let a = ReceivedHeader.build(helo: "c.example", clientAddress: "198.51.100.7", clientHostname: nil,
                                     hostname: "mx.example.org", protocolName: "UTF8SMTP", queueID: "Q",
                                     recipient: "jörg@example.org", utf8: true, date: date)
        #expect(a.contains("for <jörg@example.org>;"))
        let b = ReceivedHeader.build(helo: "c.example", clientAddress: "198.51.100.7", clientHostname: nil,
                                     hostname: "mx.example.org", protocolName: "ESMTP", queueID: "Q",
                                     recipient: "jörg@example.org", date: date)
        #expect(!b.contains("for"))
        check(b)
    }

    /// The escapes take a shortcut when there is nothing to escape; it
    /// must give what the character-by-character rule gives.
    @Test func escapesAgreeWithTheRuleCharacterByCharacter() {
        func comment(_ text: String) -> String {
            var out = ""
            for scalar in text.unicodeScalars.prefix(200) {
                switch scalar {
                case "(", ")", "\\": out += "\\" + String(scalar)
                case " "..."~": out += String(scalar)
                default: out += "?"
                }
            }
            return out
        }
        func printable(_ text: String, max: Int) -> String {
            String(text.unicodeScalars.prefix(max).map { (0x20...0x7E).contains($0.value) ? Character($0) : "?" })
        }
        let alphabet: [String] = ["a", "Z", " ", "~", "(", ")", "\\", "\r", "\n", "\t", "\0", "\u{7f}", "é", "\u{202e}", "語"]
        var rng = SplitMix(state: 11)
        for _ in 0..<2000 {
            let count = [0, 1, 5, 79, 80, 81, 199, 200, 201][rng.below(9)]
            let plain = rng.below(2) == 0
            let text = (0..<count).map { _ in plain ? alphabet[rng.below(4)] : alphabet[rng.below(alphabet.count)] }.joined()
            #expect(ReceivedHeader.commentText(text) == comment(text))
            #expect(ReceivedHeader.printable(text, max: 80) == printable(text, max: 80))
        }
    }

    @Test func fromASessionEnvelope() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n")
        let h = ReceivedHeader.build(envelope: d.envelopes[0], hostname: "mx.example.org", queueID: "QID1", date: date)
        #expect(h == "Received: from c.example (client.example.net [198.51.100.7])\r\n\tby mx.example.org (Sealpost) with ESMTP id QID1\r\n\tfor <b@example.org>; \(date)\r\n")
    }

    /// One field: "Received:" first, continuation lines start with a tab,
    /// CRLF only as line ends, printable ASCII, lines < 998, comment
    /// parentheses balanced outside quoted pairs.
    func check(_ h: String) {
        let bytes = Array(h.utf8)
        #expect(h.hasPrefix("Received: "))
        #expect(h.hasSuffix("\r\n"))
        let lines = h.dropLast(2).split(separator: "\r\n", omittingEmptySubsequences: false)
        for (i, line) in lines.enumerated() {
            #expect(line.utf8.count < 998)
            #expect(!line.utf8.contains(13) && !line.utf8.contains(10))
            if i > 0 { #expect(line.first == "\t") }
        }
        #expect(bytes.allSatisfy { (32...126).contains($0) || $0 == 9 || $0 == 13 || $0 == 10 })
        var depth = 0
        var escaped = false
        var quoted = false
        for b in bytes {
            if escaped { escaped = false; continue }
            switch b {
            case UInt8(ascii: "\\"): escaped = true
            case UInt8(ascii: "\"") where depth == 0: quoted.toggle()
            case UInt8(ascii: "(") where !quoted: depth += 1
            case UInt8(ascii: ")") where !quoted: depth -= 1; #expect(depth >= 0)
            default: break
            }
        }
        #expect(depth == 0)
    }
}

/// Small deterministic PRNG (SplitMix64) so runs are reproducible.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

let sessionScripts: [String] = [
    basicSession,
    "EHLO c.example\r\nMAIL FROM:<a@example.net> SIZE=100 RET=FULL ENVID=x+2By\r\nRCPT TO:<b@example.org> NOTIFY=SUCCESS ORCPT=rfc822;b+40example.org\r\nRCPT TO:<c@elsewhere.example>\r\nDATA\r\nSubject: t\r\n\r\n..dot\r\nline\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nBDAT 5\r\nab\r\nxBDAT 0 LAST\r\nQUIT\r\n",
    "EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nhello\n.\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.org>\r\nDATA\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n",
    "NOOP\nFOO\r\nHELO x\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nBDAT 3\r\nabcRSET\r\nVRFY x\r\nHELP\r\n" + String(repeating: "Z", count: 700) + "\r\nQUIT\r\n",
    "EHLO c.example\r\nAUTH PLAIN \(b64("\0alice\0secret"))\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@remote.example>\r\nDATA\r\nx\r\n.\r\nAUTH LOGIN\r\nQUIT\r\n",
    "EHLO c.example\r\nAUTH LOGIN\r\n\(b64("u"))\r\n\(b64("bad"))\r\nAUTH PLAIN\r\n*\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\(String(repeating: "x", count: 1200))\r\n.\r\nQUIT\r\n",
]

func transcript(_ script: String, split: (Int) -> [Int]) -> [Event] {
    var d = Driver(policy { $0.auth = .always; $0.messageChunkSize = 50 })
    let bytes = Array(script.utf8)
    var pos = 0
    for n in split(bytes.count) where pos < bytes.count {
        let end = min(bytes.count, pos + n)
        d.send(Array(bytes[pos..<end]))
        pos = end
    }
    if pos < bytes.count { d.send(Array(bytes[pos...])) }
    // How much of a refused message streamed out before the refusal was
    // detected depends on the splitting; it is discarded, so leave it out.
    var events: [Event] = []
    for e in d.events {
        if case .abort = e, case .data = events.last { events.removeLast() }
        events.append(e)
    }
    return events
}

@Suite struct Feeding {
    @Test(arguments: sessionScripts.indices)
    func byteAtATimeEqualsAllAtOnce(_ i: Int) {
        let whole = transcript(sessionScripts[i]) { [$0] }
        let bytewise = transcript(sessionScripts[i]) { Array(repeating: 1, count: $0) }
        #expect(whole == bytewise)
        #expect(whole.count > 3)
    }

    @Test(arguments: sessionScripts.indices)
    func randomSplitsEqualAllAtOnce(_ i: Int) {
        let whole = transcript(sessionScripts[i]) { [$0] }
        var rng = SplitMix(state: UInt64(i) &* 7919)
        for _ in 0..<50 {
            let parts = transcript(sessionScripts[i]) { total in
                var sizes: [Int] = []
                var sum = 0
                while sum < total { let n = rng.below(40) + 1; sizes.append(n); sum += n }
                return sizes
            }
            #expect(parts == whole)
        }
    }
}

@Suite struct Fuzzing {
    static let fragments: [String] = [
        "EHLO c.example\r\n", "HELO x\r\n", "MAIL FROM:<a@example.net>\r\n", "MAIL FROM:<> SMTPUTF8 BODY=8BITMIME\r\n",
        "RCPT TO:<b@example.org>\r\n", "RCPT TO:<x@elsewhere.example>\r\n", "DATA\r\n", "BDAT 5\r\n", "BDAT 0 LAST\r\n",
        "BDAT 3 LAST\r\n", "hello", "\r\n.\r\n", "\n.\n", "\r.\r", ".", "\r", "\n", "\0", "\u{e9}", "RSET\r\n",
        "QUIT\r\n", "STARTTLS\r\n", "AUTH PLAIN\r\n", "AUTH LOGIN\r\n", "*\r\n", "AGFsaWNlAHNlY3JldA==\r\n",
        "dXNlcg==\r\n", "NOOP\r\n", "Subject: x\r\n\r\n", String(repeating: "x", count: 600),
    ]

    @Test func randomInputsKeepTheInvariants() {
        var rng = SplitMix(state: 42)
        var outcomes = SMTPFuzz.Outcome()
        for _ in 0..<3000 {
            // Flags: mostly without the early-talker and low-error-limit bits.
            var data: [UInt8] = [UInt8(rng.below(256)) & (rng.below(5) == 0 ? 0xFF : 0x5F)]
            func add(_ fragment: String) {
                let f = Array(fragment.utf8)
                data.append(UInt8(min(63, f.count - 1)))   // chunk length byte
                data += f
            }
            if rng.below(2) == 0 {
                // A plausible transaction first, so the deep states are reached.
                for f in ["EHLO c.example\r\n", "MAIL FROM:<a@example.net>\r\n", "RCPT TO:<b@example.org>\r\n"] { add(f) }
                if rng.below(2) == 0 { add("DATA\r\n"); add("hello") } else { add("BDAT 5\r\n"); add("hello") }
            }
            for _ in 0..<rng.below(40) {
                if rng.below(4) == 0 {
                    data.append(UInt8(rng.below(256)))
                } else {
                    add(Self.fragments[rng.below(Self.fragments.count)])
                }
            }
            let o = SMTPFuzz.run(data)
            outcomes.replies += o.replies
            outcomes.messagesCommitted += o.messagesCommitted
            outcomes.messagesAborted += o.messagesAborted
            #expect(o.closed)
        }
        // The generator reaches the interesting states.
        #expect(outcomes.messagesCommitted > 10)
        #expect(outcomes.messagesAborted > 10)
    }

    @Test func rawRandomBytes() {
        var rng = SplitMix(state: 7)
        for _ in 0..<2000 {
            let data = (0..<rng.below(300)).map { _ in UInt8(rng.below(256)) }
            _ = data.withUnsafeBytes { SMTPFuzz.run(data: $0) }
        }
    }
}
