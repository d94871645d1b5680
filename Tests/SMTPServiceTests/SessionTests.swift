import Foundation
import SMTP
@testable import SMTPService
import StageProtocol
import Testing

@Suite struct Sessions {
    @Test func fullSessionQueuesOneMessage() throws {
        let h = try Harness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        #expect(c.command("MAIL FROM:<alice@example.org> SIZE=100")?.code == 250)
        #expect(c.command("RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        let done = try #require(c.command("Subject: hi\r\n\r\nHello.\r\n."))
        #expect(done.code == 250)
        #expect(done.last.hasPrefix("250 2.0.0 Ok: queued as "))
        #expect(c.command("QUIT")?.code == 221)
        print(h.logs.all)
    }
}
