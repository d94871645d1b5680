import Foundation
import Testing
@testable import Spool

/// A fresh directory under the system temporary directory, removed on release.
final class TemporaryDirectory {
    let path: String

    init() {
        var template = Array((NSTemporaryDirectory() + "/sealpost-spool-XXXXXX").utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: p!)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
    }

    /// The spool directory (created by Spool itself).
    var spool: String { path + "/queue" }
}

let smallOptions = SpoolOptions(mapSize: 4 << 20, mapSizeLimit: 64 << 20)
/// A deferral far longer than any test: a deferred submission reaches the
/// disk only with an urgent one (or at close).
let deferringOptions = SpoolOptions(mapSize: 4 << 20, mapSizeLimit: 64 << 20, deferral: 3600)

func sampleEnvelope(_ id: QueueID, recipients: Int = 2) -> EnvelopeRecord {
    EnvelopeRecord(
        queueID: id, sender: "alice@example.org", arrival: 1_700_000_000, size: 1234,
        ret: "HDRS", envid: "env-1", requireTLS: true, smtputf8: true, bodyType: "8BITMIME",
        clientAddress: "127.0.0.2", clientName: "client.example.org", helo: "client.example.org",
        protocolName: "ESMTPS", authUser: "alice", peerUID: 1000, held: true, kind: .bounce,
        recipients: (0..<recipients).map { i in
            RecipientRecord(address: "rcpt\(i)@example.net", notify: "SUCCESS,FAILURE", orcpt: "rfc822;rcpt\(i)@example.net",
                            state: .deferred, attempts: 3, nextAttempt: 1_700_000_600, lastError: "451 4.4.1 timeout",
                            dsnStatus: "4.4.1", remoteMTA: "dns; mx.example.net", diagnostic: "smtp; 451 4.4.1 try later",
                            delayNotified: true)
        })
}

func seal(_ spool: Spool, _ body: [UInt8]) throws -> SealedBody {
    let writer = try spool.makeBodyWriter()
    try writer.append(body)
    return try writer.finish()
}

func readAll(_ spool: Spool, _ id: QueueID) throws -> [UInt8] {
    var out: [UInt8] = []
    try spool.readBody(id) { out += $0 }
    return out
}

/// The error of a failed submission, nil on success.
func failure(_ r: Result<Void, SpoolError>) -> SpoolError? {
    if case .failure(let e) = r { return e }
    return nil
}
