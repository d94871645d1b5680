import Testing
@testable import StageProtocol

/// The order of a job's frames, as every delivery stage checks it.
@Suite struct DeliveryJobAssemblerTests {
    static let job = Frame(.job, ["job": .uint(7), "queue-id": .text("4F3A2B1C5D6E"), "sender": .text("s@example.net"),
                                  "arrival": .uint(1_700_000_000), "size": .uint(12), "attempt": .uint(2),
                                  "nexthop": .text("relay.example.net"), "requiretls": .bool(true)])
    static func rcpt(_ index: UInt64, _ address: String = "r@example.org") -> Frame {
        Frame(.jobRcpt, ["index": .uint(index), "address": .text(address), "notify": .text("FAILURE")])
    }
    static func body(_ text: String) -> Frame { Frame(.body, ["data": .bytes(Array(text.utf8))]) }
    static let end = Frame(.jobEnd, ["job": .uint(7)])

    /// Feeds frames; returns the jobs completed, or the first error.
    static func feed(_ frames: [Frame], limit: Int = 1000) -> Result<[DeliveryJob], ProtocolError> {
        var assembler = DeliveryJobAssembler(maximumMessageSize: limit)
        var jobs: [DeliveryJob] = []
        for frame in frames {
            do throws(ProtocolError) {
                if let job = try assembler.add(frame) { jobs.append(job) }
            } catch {
                return .failure(error)
            }
        }
        return .success(jobs)
    }

    @Test func wholeJob() throws {
        let jobs = try Self.feed([Self.job, Self.rcpt(0), Self.rcpt(3, "b@example.org"),
                                  Self.body("Subject: x\r\n"), Self.body("\r\nhi\r\n"), Self.end]).get()
        #expect(jobs.count == 1)
        let job = try #require(jobs.first)
        #expect(job.job == 7 && job.queueID == "4F3A2B1C5D6E" && job.sender == "s@example.net")
        #expect(job.attempt == 2 && job.size == 12 && job.arrival == 1_700_000_000)
        #expect(job.nexthop == "relay.example.net" && job.requireTLS && !job.smtputf8)
        #expect(job.recipients.map(\.index) == [0, 3])
        #expect(try Self.feed([Self.job, Self.rcpt(DeliveryJob.maximumRecipientIndex), Self.end]).get().count == 1)
        #expect(job.recipients[0].notify == "FAILURE")
        #expect(job.body.map { String(decoding: $0, as: UTF8.self) } == ["Subject: x\r\n", "\r\nhi\r\n"])
        #expect(!job.oversized)
        // The next job starts clean.
        let two = try Self.feed([Self.job, Self.rcpt(0), Self.end, Self.job, Self.rcpt(0), Self.end]).get()
        #expect(two.count == 2 && two[1].recipients.count == 1)
    }

    @Test func oversizedBodyIsReadToTheEndButNotKept() throws {
        let jobs = try Self.feed([Self.job, Self.rcpt(0), Self.body("12345"), Self.body("67890"), Self.end], limit: 8).get()
        #expect(jobs.count == 1 && jobs[0].oversized && jobs[0].body.isEmpty)
    }

    @Test(arguments: [
        ([rcpt(0)], "JOB-RCPT outside a job"),
        ([end], "JOB-END outside a job"),
        ([job, job], "JOB inside job 7"),
        ([job, body("x")], "BODY before any JOB-RCPT in job 7"),
        ([job, rcpt(0), body("x"), rcpt(1)], "JOB-RCPT after BODY in job 7"),
        ([job, rcpt(1), rcpt(1)], "JOB-RCPT: index 1 twice in job 7"),
        // A stage keeps an index in an Int: 2^63 would trap there.
        ([job, rcpt(1 << 63)], "JOB-RCPT: index 9223372036854775808 over 2147483647 in job 7"),
        ([job, end], "job 7 has no JOB-RCPT"),
        ([job, rcpt(0), Frame(.jobEnd, ["job": .uint(8)])], "JOB-END for job 8 inside job 7"),
        ([job, Frame(.jobDone, ["job": .uint(7)])], "JOB-DONE inside job 7"),
    ] as [([Frame], String)])
    func outOfOrder(_ frames: [Frame], _ message: String) {
        #expect(Self.feed(frames).failure?.message == message)
    }
}

extension Result {
    var failure: Failure? { if case .failure(let e) = self { return e }; return nil }
}
