// Listener configuration, socket activation, trusted networks, log format,
// and back-pressure from the queue to the SMTP client.

import Foundation
import Logging
import NIOPosix
import SMTP
@testable import SMTPService
import StageProtocol
import Testing

@Suite struct ListenerParsing {
    @Test func addresses() {
        #expect(ListenAddress("127.0.0.1:25") == ListenAddress(host: "127.0.0.1", port: 25))
        #expect(ListenAddress("[::1]:587") == ListenAddress(host: "::1", port: 587))
        #expect(ListenAddress("mail.example.org:2525") == ListenAddress(host: "mail.example.org", port: 2525))
        #expect(ListenAddress("[::1]:587")?.description == "[::1]:587")
        for bad in ["127.0.0.1", "::1:25", "[::1]25", ":25", "host:", "host:65536", "host:-1", "host:123456"] {
            #expect(ListenAddress(bad) == nil, "\(bad)")
        }
    }

    @Test func configuredListenersKeepTheirKind() throws {
        let specs = try configuredListeners(listen: ["127.0.0.1:25", "[::1]:25"], submission: ["127.0.0.1:587"],
                                            smtps: ["127.0.0.1:465"])
        #expect(specs.map(\.kind) == [.smtp, .smtp, .submission, .smtps])
        #expect(throws: ListenerError.self) { try configuredListeners(listen: ["nonsense"], submission: [], smtps: []) }
    }

    @Test func socketActivationVariables() throws {
        let pid: Int32 = 4242
        #expect(try SocketActivation.listeners(environment: [:], pid: pid) == nil)
        #expect(try SocketActivation.listeners(environment: ["LISTEN_FDS": "2", "LISTEN_PID": "1"], pid: pid) == nil,
                "for another process")
        let named = try #require(try SocketActivation.listeners(
            environment: ["LISTEN_FDS": "3", "LISTEN_PID": "4242", "LISTEN_FDNAMES": "smtp:submission:smtps"], pid: pid))
        #expect(named == [ListenerSpec(kind: .smtp, source: .inherited(fd: 3)),
                          ListenerSpec(kind: .submission, source: .inherited(fd: 4)),
                          ListenerSpec(kind: .smtps, source: .inherited(fd: 5))])
        let unnamed = try #require(try SocketActivation.listeners(environment: ["LISTEN_FDS": "1"], pid: pid))
        #expect(unnamed == [ListenerSpec(kind: .smtp, source: .inherited(fd: 3))])
        for bad: [String: String] in [
            ["LISTEN_FDS": "x"], ["LISTEN_FDS": "1", "LISTEN_PID": "me"], ["LISTEN_FDS": "65"],
            ["LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp"], ["LISTEN_FDS": "1", "LISTEN_FDNAMES": "imap"],
        ] {
            #expect(throws: ListenerError.self, "\(bad)") { try SocketActivation.listeners(environment: bad, pid: pid) }
        }
    }

    @Test func inheritedListeningSocketIsAdopted() throws {
        // A socket bound and listening as a supervisor would pass it.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        try #require(bound == 0)
        try #require(listen(fd, 16) == 0)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        let port = Int(UInt16(bigEndian: addr.sin_port))

        let queue = try FakeQueue()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let capture = LogCapture()
        let server = SMTPServer(settings: SMTPServiceSettings(hostname: "mx.example.test", injectSocket: queue.path),
                                group: group, logger: Logger(label: "t") { _ in CapturingLogHandler(capture: capture) })
        defer {
            try? server.shutdown(grace: .seconds(5)).wait()
            try? group.syncShutdownGracefully()
            queue.stop()
        }
        let listeners = try server.open([ListenerSpec(kind: .smtp, source: .inherited(fd: fd)),
                                         ListenerSpec(kind: .smtps, source: .bind(ListenAddress(host: "127.0.0.1", port: 0)))]).wait()
        #expect(listeners.map(\.kind) == [.smtp], "smtps needs a TLS socket (a configured certificate)")
        #expect(listeners.first?.address?.port == port)
        #expect(capture.contains("smtps (implicit TLS, RFC 8314) is not served: no TLS certificate is configured"))
        server.startAccepting()
        let c = try SMTPTestClient(port: port)
        #expect(c.reply()?.last == "220 mx.example.test ESMTP Sealpost")
    }
}

@Suite struct TrustedNetworks {
    @Test func prefixes() throws {
        let v4 = try #require(NetworkPrefix("192.0.2.0/24"))
        #expect(v4.contains("192.0.2.77"))
        #expect(v4.contains("::ffff:192.0.2.77"))
        #expect(!v4.contains("192.0.3.1"))
        #expect(!v4.contains("2001:db8::1"))
        let v6 = try #require(NetworkPrefix("2001:db8::/32"))
        #expect(v6.contains("2001:db8:ffff::1"))
        #expect(!v6.contains("2001:db9::1"))
        #expect(!v6.contains("192.0.2.1"))
        let host = try #require(NetworkPrefix("[::1]"))
        #expect(host.contains("::1"))
        #expect(!host.contains("::2"))
        #expect(NetworkPrefix("0.0.0.0/0")?.contains("203.0.113.9") == true)
        for bad in ["10.1.2.3/8", "10.0.0.0/33", "::/129", "example.org", "10.0.0.0/", "10.0.0.0/x", ""] {
            #expect(NetworkPrefix(bad) == nil, "\(bad)")
        }
        #expect(NetworkPrefix.defaultTrusted.map(\.description) == ["127.0.0.0/8", "::1/128"])
    }

    @Test func clientAddressesAreNamedWithoutTheMappedPrefix() {
        #expect(NetworkPrefix.canonicalClientAddress("::ffff:192.0.2.1") == "192.0.2.1")
        #expect(NetworkPrefix.canonicalClientAddress("::FFFF:192.0.2.1") == "192.0.2.1")
        #expect(NetworkPrefix.canonicalClientAddress("2001:db8::1") == "2001:db8::1")
        #expect(NetworkPrefix.canonicalClientAddress("::ffff:1:2") == "::ffff:1:2")
    }
}

@Suite struct LogLines {
    @Test func rejectLineOrdersFieldsAsPostfix() {
        let line = SessionLog.reject(command: "RCPT", client: "unknown[1.2.3.4]", reply: SMTPReply(554, "5.7.1", "Relay access denied"),
                                     detail: "from=<a@b> to=<x@y> helo=<h>", protocolName: "ESMTP")
        #expect(line == "NOQUEUE: reject: RCPT from unknown[1.2.3.4]: 554 5.7.1 Relay access denied; from=<a@b> to=<x@y> proto=ESMTP helo=<h>")
        let connect = SessionLog.reject(command: "CONNECT", client: "unknown[1.2.3.4]",
                                        reply: SMTPReply(554, "5.5.0", "x"), detail: "", protocolName: "SMTP")
        #expect(connect == "NOQUEUE: reject: CONNECT from unknown[1.2.3.4]: 554 5.5.0 x")
    }

    @Test func queuedLineNamesTheSASLUser() {
        #expect(SessionLog.queued("0123456789AB", client: "unknown[::1]", authUser: nil) == "0123456789AB: client=unknown[::1]")
        #expect(SessionLog.queued("0123456789AB", client: "unknown[::1]", authUser: "bob\n") == "0123456789AB: client=unknown[::1], sasl_username=bob?")
    }

    @Test func settingsFollowTheConfiguration() {
        var s = SMTPServiceSettings(hostname: "mx.example.test", injectSocket: "/run/inject", localDomains: ["Example.TEST"])
        s.limits.messageSize = 5000
        s.limits.recipients = 7
        let smtp = s.policy(for: .smtp)
        #expect(smtp.maxMessageSize == 5000)
        #expect(smtp.maxRecipients == 7)
        #expect(smtp.maxErrors == 20)
        #expect(smtp.commandLineLimit == 512)
        #expect(smtp.textLineLimit == 1000)
        #expect(smtp.relay.isLocal("example.test"))
        #expect(!smtp.isSubmission)
        #expect(s.policy(for: .submission).isSubmission)
        #expect(!smtp.tlsAvailable)
        #expect(smtp.auth == .never)
    }
}

@Suite struct BackPressure {
    /// While the queue does not read, smtp-listen must stop reading the
    /// client instead of buffering the message in memory: the client's
    /// non-blocking sends stop being accepted long before 32 MB are out.
    /// Once the queue reads again, the whole message arrives intact.
    @Test func stalledQueueStopsReadingTheClient() throws {
        let q = try FakeQueue()
        let h = try Harness(queue: q) { $0.limits.messageSize = 64 << 20 }
        defer { h.stop() }
        q.stallBodies = true
        let c = try h.client()
        try greet(c)
        #expect(c.command("MAIL FROM:<a@example.org>")?.code == 250)
        #expect(c.command("RCPT TO:<x@example.test>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        let line = Array((String(repeating: "b", count: 998) + "\r\n").utf8)
        let total = 32 << 20
        var message: [UInt8] = Array("Subject: pressure\r\n\r\n".utf8)
        message.reserveCapacity(total + 1000)
        while message.count < total { message += line }
        let sentWhileStalled = c.sendUntilBlocked(message, patienceMilliseconds: 2000)
        #expect(sentWhileStalled < 16 << 20, "smtp-listen kept reading: \(sentWhileStalled) bytes taken while the queue stalled")
        q.stallBodies = false
        c.send(Array(message[sentWhileStalled...]) + Array(".\r\n".utf8))
        let r = try #require(c.reply())
        #expect(r.code == 250)
        let m = try #require(q.accepted.first)
        #expect(m.body.count > message.count)
        #expect(Array(m.body.suffix(message.count)) == message)
    }
}
