import Testing
@testable import Spool

@Suite struct SpoolBasicTests {
    @Test func insertReadDelete() throws {
        let dir = TemporaryDirectory()
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        defer { spool.close() }
        let id = spool.newQueueID()
        let envelope = sampleEnvelope(id)
        let body = Array("Subject: hi\r\n\r\nhello\r\n".utf8)
        try spool.submitAndWait([.insert(envelope, try seal(spool, body))]).get()
        #expect(try spool.envelope(id) == envelope)
        #expect(try readAll(spool, id) == body)
        #expect(try spool.allEnvelopes() == [envelope])
        try spool.submitAndWait([.delete(id)]).get()
        #expect(try spool.envelope(id) == nil)
        #expect(throws: SpoolError.noSuchMessage) { try readAll(spool, id) }
        #expect(failure(spool.submitAndWait([.delete(id)])) == .noSuchMessage)
    }
}
