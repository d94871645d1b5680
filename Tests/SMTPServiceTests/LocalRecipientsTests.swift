// smtp-listen's view of local-deliver's recipient table: what it accepts
// before there is a table, when one arrives, when a new one replaces it,
// and when a file does not load or disappears.

import Foundation
import NIOConcurrencyHelpers
import StageProtocol
import Testing
@testable import SMTPService

@Suite struct LocalRecipientsTests {
    final class Lines: Sendable {
        let lines = NIOLockedValueBox<[String]>([])
        var all: [String] { lines.withLockedValue { $0 } }
    }

    @Test func followsTheFileAndKeepsTheLastTableThatLoaded() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sp-lr-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        #expect(mkdir(dir, 0o755) == 0)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/recipients"
        let log = Lines()
        let recipients = LocalRecipients(path: path, info: { line in log.lines.withLockedValue { $0.append(line) } },
                                         warning: { line in log.lines.withLockedValue { $0.append("warning: " + line) } })

        // No table yet: everything is accepted, said once.
        recipients.refresh()
        recipients.refresh()
        #expect(recipients.accepts("anyone"))
        #expect(log.all == ["no local recipient table at \(path) yet: every local part of the local domains is accepted until local-deliver writes it"])

        try LocalRecipientTable(names: ["alice"]).write(to: path)
        recipients.refresh()
        recipients.refresh()
        #expect(recipients.accepts("alice+x") && recipients.accepts("postmaster") && !recipients.accepts("anyone"))
        #expect(log.all.last == "local recipient table loaded: 1 names from \(path)")
        #expect(log.all.count == 2)

        // A new table (renamed over the old one) replaces it.
        try LocalRecipientTable(names: ["bob", "carol"]).write(to: path)
        recipients.refresh()
        #expect(recipients.accepts("bob") && !recipients.accepts("alice"))
        #expect(log.all.last == "local recipient table loaded: 2 names from \(path)")

        // A file that does not load: one warning, the table in use stays,
        // and the same file is not tried again.
        #expect(FileManager.default.createFile(atPath: path, contents: Data("sealpost-local-recipients 1\nZed\n".utf8)))
        recipients.refresh()
        recipients.refresh()
        #expect(recipients.accepts("bob") && !recipients.accepts("zed"))
        #expect(log.all.last == "warning: local recipient table not loaded: \(path): line 2: not in lower case (the table loaded before stays in use)")
        #expect(log.all.count == 4)

        // Gone: the table stays (local-deliver replaces it, never removes it).
        #expect(unlink(path) == 0)
        recipients.refresh()
        #expect(recipients.accepts("bob") && !recipients.accepts("anyone"))
        #expect(log.all.count == 4)
        try LocalRecipientTable(names: ["dave"]).write(to: path)
        recipients.refresh()
        #expect(recipients.accepts("dave") && !recipients.accepts("bob"))
    }

    @Test func aTableThatDoesNotLoadAtFirstLeavesEveryLocalPartAccepted() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sp-lr-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        #expect(mkdir(dir, 0o755) == 0)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/recipients"
        #expect(FileManager.default.createFile(atPath: path, contents: Data("not a table\n".utf8)))
        let log = Lines()
        let recipients = LocalRecipients(path: path, info: { _ in }, warning: { line in log.lines.withLockedValue { $0.append(line) } })
        recipients.refresh()
        #expect(recipients.accepts("anyone"))
        #expect(log.all.count == 1 && log.all[0].hasSuffix("(every local part of the local domains is accepted)"))
    }

    @Test func thePolicyAsksTheTableOnlyWhenConfigured() throws {
        var settings = SMTPServiceSettings(hostname: "mx.example.org", injectSocket: "/nonexistent")
        #expect(settings.policy(for: .smtp).isKnownLocalPart == nil)
        settings.localRecipients = LocalRecipients(path: "/nonexistent/recipients", info: { _ in }, warning: { _ in })
        let ask = try #require(settings.policy(for: .smtp).isKnownLocalPart)
        #expect(ask("anyone"))
    }
}
