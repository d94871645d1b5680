// Client names as the sessions use them, against libunbound: the loopback
// PTR zone answered by libunbound itself, or sent to a forwarder that never
// answers (a bound UDP socket on loopback that reads nothing), so that the
// lookup stays pending for the whole greeting delay.

import DNS
import Foundation
import Glibc
import NIOCore
import SMTP
@testable import SMTPService
import Testing

@Suite struct ClientNameSessionTests {
    /// A UDP socket on 127.0.0.1 that never answers; its port.
    final class SilentForwarder {
        let fd: Int32
        let port: UInt16
        init() throws {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
            guard bound == 0 else {
                close(fd)
                throw POSIXError(.EADDRINUSE)
            }
            _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
            self.fd = fd
            self.port = UInt16(bigEndian: addr.sin_port)
        }
        deinit { close(fd) }
    }

    static func names(forwarder: SilentForwarder?, lookupTimeout: TimeAmount) throws -> ClientNames {
        var configuration = ResolverConfiguration(forwarders: ["127.0.0.1@\(forwarder?.port ?? 9)"],
                                                  rootTrustAnchorFile: "", timeout: .seconds(30))
        // The loopback PTR zone goes to the silent forwarder instead of
        // libunbound's built-in answer.
        if forwarder != nil { configuration.resolveReservedZones = ["127.in-addr.arpa"] }
        return ClientNames(resolver: try ResolverThread(Resolver(configuration)), queryTimeout: .seconds(30),
                           lookupTimeout: lookupTimeout)
    }

    @Test func verifiedNameInTheLogAndTheReceivedHeader() throws {
        let names = try Self.names(forwarder: nil, lookupTimeout: .seconds(30))
        let h = try Harness { $0.clientNames = names }
        defer { h.stop() }
        let c = try h.client()
        #expect(c.reply()?.code == 220)
        #expect(c.command("EHLO client.example")?.code == 250)
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<b@example.test>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        c.send("Subject: x\r\n\r\nx\r\n.\r\n")
        #expect(c.reply()?.code == 250)
        #expect(c.command("QUIT")?.code == 221)
        #expect(h.logs.contains("connect from localhost[127.0.0.1]"))
        let message = try #require(h.queue.accepted.first)
        #expect(message.text.hasPrefix("Received: from client.example (localhost [127.0.0.1])\r\n"))
        #expect((try? message.mail.text("client-name")) == "localhost")
        // The second session finds the name in the cache: the accepting
        // thread greets at once, and the session still knows the name.
        #expect(names.cached("127.0.0.1") == .some("localhost"))
        let again = try h.client()
        #expect(again.reply()?.code == 220)
        #expect(again.command("EHLO second.example")?.code == 250)
        #expect(again.command("MAIL FROM:<a@example.org>")?.code == 250)
        #expect(again.command("RCPT TO:<b@example.test>")?.code == 250)
        #expect(again.command("DATA")?.code == 354)
        #expect(again.command("Subject: y\r\n\r\ny\r\n.")?.code == 250)
        #expect(h.queue.accepted.last?.text.hasPrefix("Received: from second.example (localhost [127.0.0.1])\r\n") == true)
        #expect(h.logs.all.filter { $0.contains("connect from localhost[127.0.0.1]") && !$0.contains("disconnect") }.count == 2)
    }

    /// A session cancels its lookup when it closes: an answer arriving
    /// later must not reach its event loop, which may be shut down by then
    /// (SWIFTNIO_STRICT=1 in Pipeline/test turns that into a crash).
    @Test func aCancelledLookupNeverCompletes() {
        let cancelled = ClientNames.Lookup()
        cancelled.cancel()
        var ran = false
        cancelled.complete { ran = true }
        #expect(!ran)
        let live = ClientNames.Lookup()
        live.complete { ran = true }
        #expect(ran)
    }

    /// A client that leaves during the lookup (a half-close: smtp-listen
    /// allows those, so the session ends on the EOF, before its channel
    /// closes) gets the lines of every session, in their order: connect,
    /// lost connection, disconnect. The "lost" line used to come first.
    @Test func aClientGoneDuringTheLookupIsLoggedInOrder() throws {
        let forwarder = try SilentForwarder()
        let h = try Harness { $0.clientNames = try! Self.names(forwarder: forwarder, lookupTimeout: .seconds(60)) }
        defer { h.stop() }
        let gone = try h.client()
        gone.shutdownWrite()
        #expect(gone.readToEOF().isEmpty)
        #expect(h.logs.eventually("disconnect from unknown[127.0.0.1] commands=0"))
        let lines = h.logs.all
        let connect = lines.firstIndex { $0.contains("connect from unknown[127.0.0.1]") && !$0.contains("disconnect") }
        let lost = lines.firstIndex { $0.contains("lost connection after CONNECT from unknown[127.0.0.1]") }
        let disconnect = lines.firstIndex { $0.contains("disconnect from unknown[127.0.0.1]") }
        #expect(connect != nil && lost != nil && disconnect != nil)
        if let connect, let lost, let disconnect { #expect(connect < lost && lost < disconnect, "\(lines)") }
        #expect(lines.filter { $0.contains("connect from unknown[127.0.0.1]") && !$0.contains("disconnect") }.count == 1)
    }

    /// The greeting waits for the name; a client that talks meanwhile is an
    /// early talker (554), and when the lookup runs out the session goes on
    /// as "unknown".
    @Test func earlyTalkerDuringTheLookupAndTheLookupTimeout() throws {
        let forwarder = try SilentForwarder()
        let h = try Harness { $0.clientNames = try! Self.names(forwarder: forwarder, lookupTimeout: .seconds(2)) }
        defer { h.stop() }
        let early = try h.client()
        early.send("EHLO early.example\r\n")
        let refused = try #require(early.reply())
        #expect(refused.code == 554)
        #expect(refused.last.contains("5.5.0"))
        #expect(h.logs.eventually("connect from unknown[127.0.0.1]"))

        let patient = try h.client()
        #expect(patient.reply()?.code == 220)   // after the lookup timeout
        #expect(patient.command("EHLO patient.example")?.code == 250)
        #expect(patient.command("QUIT")?.code == 221)
    }
}
