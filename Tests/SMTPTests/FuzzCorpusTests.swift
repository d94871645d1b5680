import Foundation
import Testing
import SMTP

/// The committed seed corpora of the libFuzzer targets (fuzz/corpus, written
/// by fuzz/make-seeds), replayed through the same drivers the fuzzers run.
/// Every seed must keep the invariants (a violation traps), and each must
/// still get as far into the protocol as it was written to: a seed that
/// drifted (a reply that changed, a byte that now means something else)
/// would silently start the fuzzer at the greeting again.
@Suite struct FuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fuzz/corpus")

    static func seeds(_ name: String) throws -> [String: [UInt8]] {
        let directory = corpus.appendingPathComponent(name)
        var seeds: [String: [UInt8]] = [:]
        for file in try FileManager.default.contentsOfDirectory(atPath: directory.path) where file.hasSuffix(".bin") {
            let data = try #require(FileManager.default.contents(atPath: directory.appendingPathComponent(file).path))
            seeds[String(file.dropLast(4))] = [UInt8](data)
        }
        return seeds
    }

    /// Seed name: messages committed to the queue.
    static let serverCommits: [String: Int] = [
        "plain-data": 1, "pipelined": 1, "starttls-auth-bdat": 1, "auth-login-dsn": 1,
        "trusted-relay-bdat": 1, "small-limits": 0, "helo-errors": 0, "early-talker": 0,
        "tls-failed": 0, "too-many-errors": 0, "pipelined-while-committing": 2, "pipelined-overflow": 1,
        "shutdown-while-committing": 0, "shutdown-while-authenticating": 0, "timeout-in-data": 0,
    ]

    /// Seed name: (message results, bodies sent, session failures, protocol errors).
    static let clientResults: [String: (Int, Int, Int, Int)] = [
        "pipelined-tls-auth": (2, 2, 0, 0), "lockstep": (1, 1, 0, 0), "helo-fallback": (1, 1, 0, 0),
        "tls-required-missing": (0, 0, 1, 0), "tls-failed": (0, 0, 1, 0), "transient-failures": (1, 1, 1, 0),
        "small-limits-timeout": (1, 0, 0, 0), "server-speaks-in-body": (0, 0, 0, 1), "quit-in-tls": (0, 0, 0, 0),
        "eight-bit-converted": (1, 1, 0, 0), "eight-bit-unconvertible": (1, 0, 0, 0),
    ]

    @Test func serverSeedsReachTheirStates() throws {
        let seeds = try Self.seeds("smtp-server")
        #expect(Set(seeds.keys) == Set(Self.serverCommits.keys))
        for (name, bytes) in seeds {
            let outcome = SMTPFuzz.run(bytes)
            #expect(outcome.closed, "\(name)")
            #expect(outcome.messagesCommitted == Self.serverCommits[name], "\(name): \(outcome)")
        }
    }

    @Test func clientSeedsReachTheirStates() throws {
        let seeds = try Self.seeds("smtp-client")
        #expect(Set(seeds.keys) == Set(Self.clientResults.keys))
        for (name, bytes) in seeds {
            let outcome = SMTPClientFuzz.run(bytes)
            let expected = try #require(Self.clientResults[name])
            #expect(outcome.closed, "\(name)")
            #expect((outcome.messageResults, outcome.bodiesSent, outcome.sessionFailures, outcome.protocolErrors)
                    == expected, "\(name): \(outcome)")
        }
    }
}
