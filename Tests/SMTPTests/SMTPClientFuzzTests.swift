import Testing
@testable import SMTP

@Suite struct SMTPClientFuzzTests {
    /// A plausible server conversation, so the fuzzer's random mutations
    /// start deep in the protocol rather than at the greeting.
    static func seed(flags: UInt8, more: UInt8) -> [UInt8] {
        var out: [UInt8] = [flags, more]
        func server(_ s: String) {
            var bytes = Array(s.utf8)
            while !bytes.isEmpty {
                let n = min(bytes.count, 96)
                out.append(UInt8(n - 1))
                out += bytes.prefix(n)
                bytes.removeFirst(n)
            }
        }
        server("220 mx ESMTP\r\n")
        server("250-mx\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-STARTTLS\r\n250-REQUIRETLS\r\n250 AUTH PLAIN\r\n")
        server("220 2.0.0 go\r\n")
        out.append(2)  // TLS: established, authenticated
        server("250-mx\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-REQUIRETLS\r\n250 AUTH PLAIN\r\n")
        server("235 2.7.0 ok\r\n")
        server("250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
        out += [3, 5] + Array("a\r\n.b".utf8) + [4] + Array("\rc.\n".utf8) + [0]
        server("250 2.0.0 queued\r\n")
        out += [1, 0xC3]  // next message
        server("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        out += [1, 3] + Array("xyz".utf8)
        server("250 ok\r\n")
        out.append(0)  // quit
        server("221 bye\r\n")
        return out
    }

    @Test(arguments: 0..<32)
    func seedsRunCleanly(flags: Int) {
        let outcome = SMTPClientFuzz.run(Self.seed(flags: UInt8(flags * 8 + 1) & ~32, more: 0))
        #expect(outcome.closed)
    }

    @Test func aFullSeedDeliversTwoMessages() {
        // Pipelining, opportunistic TLS, credentials; four recipients.
        let outcome = SMTPClientFuzz.run(Self.seed(flags: 1 | 2 << 1 | 8, more: 3))
        #expect(outcome.tlsStarted == 1)
        #expect(outcome.bodiesSent == 2)
        #expect(outcome.messageResults == 2)
        #expect(outcome.protocolErrors == 0 && outcome.sessionFailures == 0)
    }

    @Test func randomInputsKeepTheInvariants() {
        var rng = SplitMix(state: 0xC11E_47)
        var totals = SMTPClientFuzz.Outcome()
        for round in 0..<3000 {
            var bytes: [UInt8]
            if round % 2 == 0 {
                // Mutate a seed: flip, insert, delete a few bytes.
                bytes = Self.seed(flags: UInt8(truncatingIfNeeded: rng.next()), more: UInt8(truncatingIfNeeded: rng.next()))
                for _ in 0..<(rng.below(4) + 1) {
                    let i = rng.below(bytes.count)
                    switch rng.below(3) {
                    case 0: bytes[i] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: bytes.insert(UInt8(truncatingIfNeeded: rng.next()), at: i)
                    default: bytes.remove(at: i)
                    }
                }
            } else {
                bytes = (0..<rng.below(400)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            }
            let o = SMTPClientFuzz.run(bytes)
            #expect(o.closed)
            totals.messageResults += o.messageResults
            totals.protocolErrors += o.protocolErrors
            totals.sessionFailures += o.sessionFailures
            totals.bodiesSent += o.bodiesSent
        }
        // The mutations reach every kind of ending.
        #expect(totals.messageResults > 0)
        #expect(totals.protocolErrors > 0)
        #expect(totals.sessionFailures > 0)
        #expect(totals.bodiesSent > 0)
    }

    @Test func emptyAndTinyInputs() {
        for bytes in [[], [0], [0, 0], [255, 255, 255], [0, 0, 0xFF], [0, 0, 0xFE]] as [[UInt8]] {
            #expect(SMTPClientFuzz.run(bytes).closed)
        }
        let data: [UInt8] = Self.seed(flags: 3, more: 1)
        data.withUnsafeBytes { raw in
            #expect(SMTPClientFuzz.run(data: raw).closed)
        }
    }

    /// Feeding a transcript whole or byte by byte gives the same actions,
    /// apart from how `.send` and results group into calls.
    @Test(arguments: [true, false], [SMTPClientTLSMode.none, .opportunistic])
    func byteAtATimeEquivalence(pipelining: Bool, tls: SMTPClientTLSMode) {
        let peers: [Peer] = [
            Peer(),
            Peer([("RCPT TO:<b", "550 5.1.1 no"), ("<END-OF-DATA>", "451-4.3.0 busy\r\n451 4.3.0 later")]),
            Peer([("MAIL", "452 4.3.1 full")]),
            Peer([("EHLO", "502 no")]),
            Peer([("RCPT", "550 no"), ("RCPT", "550 no"), ("RCPT", "550 no")]),
            Peer([("STARTTLS", "220 go\r\n250 injected\r\n")]),
            Peer([("DATA", "250-a\r\n251 b\r\n")]),
        ]
        for peer in peers {
            let m = message(["a@example.net", "b@example.net", "c@example.net"])
            let whole = drive(clientPolicy(tls, pipelining: pipelining), m, peer: peer, feed: .whole,
                              more: [message(["d@example.net"], first: 10)])
            let bytes = drive(clientPolicy(tls, pipelining: pipelining), m, peer: peer, feed: .byteAtATime,
                              more: [message(["d@example.net"], first: 10)])
            #expect(whole.commands == bytes.commands)
            #expect(whole.results == bytes.results)
            #expect(whole.messageResults == bytes.messageResults)
            #expect(whole.failures == bytes.failures)
            #expect(whole.protocolErrors.map(\.kind) == bytes.protocolErrors.map(\.kind))
            #expect(whole.peer.messages == bytes.peer.messages)
            #expect(whole.closed && bytes.closed)
        }
    }
}
