// Listener configuration, socket activation, trusted networks, log format,
// and back-pressure from the queue to the SMTP client.

import Foundation
import Logging
import NIOPosix
import SMTP
@testable import SMTPService
import StageProtocol
import StageRuntime
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
        #expect(try SocketActivation.descriptors(environment: [:], pid: pid) == nil)
        #expect(try SocketActivation.descriptors(environment: ["LISTEN_FDS": "2", "LISTEN_PID": "1"], pid: pid) == nil,
                "for another process")
        #expect(try SocketActivation.descriptors(environment: ["LISTEN_FDS": "1"], pid: pid) == nil,
                "without LISTEN_PID, as sd_listen_fds(3)")
        let named = try #require(try SocketActivation.descriptors(
            environment: ["LISTEN_FDS": "3", "LISTEN_PID": "4242", "LISTEN_FDNAMES": "smtp-25:submission-587:smtps"], pid: pid))
        #expect(named == [InheritedDescriptor(fd: 3, name: "smtp-25", address: nil),
                          InheritedDescriptor(fd: 4, name: "submission-587", address: nil),
                          InheritedDescriptor(fd: 5, name: "smtps", address: nil)])
        let unnamed = try #require(try SocketActivation.descriptors(environment: ["LISTEN_FDS": "1", "LISTEN_PID": "4242"], pid: pid))
        #expect(unnamed == [InheritedDescriptor(fd: 3, name: "", address: nil)])
        for bad: [String: String] in [
            ["LISTEN_FDS": "x", "LISTEN_PID": "4242"], ["LISTEN_FDS": "1", "LISTEN_PID": "me"],
            ["LISTEN_FDS": "65", "LISTEN_PID": "4242"], ["LISTEN_FDS": "+1", "LISTEN_PID": "4242"],
            ["LISTEN_FDS": "2", "LISTEN_PID": "4242", "LISTEN_FDNAMES": "smtp-25"],
        ] {
            #expect(throws: ListenerError.self, "\(bad)") { try SocketActivation.descriptors(environment: bad, pid: pid) }
        }
    }

    func spec(_ kind: ListenerKind, _ address: String) -> ListenerSpec {
        ListenerSpec(kind: kind, source: .bind(ListenAddress(address)!))
    }

    func passed(_ fd: Int32, _ name: String, _ address: String?) -> InheritedDescriptor {
        InheritedDescriptor(fd: fd, name: name, address: address.flatMap(ListenAddress.init))
    }

    @Test func descriptorsAreMatchedToTheConfiguredListenersByNameAndAddress() throws {
        let configured = [spec(.smtp, "127.0.0.1:25"), spec(.smtp, "[::1]:25"), spec(.submission, "127.0.0.1:587"),
                          spec(.smtps, "0.0.0.0:465")]
        // The supervisor's names, in another order than the configuration.
        let matched = try SocketActivation.match([
            passed(3, "submission-587", "127.0.0.1:587"), passed(4, "smtp-25", "[::1]:25"),
            passed(5, "smtps-465", "0.0.0.0:465"), passed(6, "smtp-25", "127.0.0.1:25"),
        ], to: configured)
        #expect(matched == [ListenerSpec(kind: .smtp, source: .inherited(fd: 6)),
                            ListenerSpec(kind: .smtp, source: .inherited(fd: 4)),
                            ListenerSpec(kind: .submission, source: .inherited(fd: 3)),
                            ListenerSpec(kind: .smtps, source: .inherited(fd: 5))])
        // A bare kind, or no name (systemd's "unknown"), matches by address.
        let byAddress = try SocketActivation.match([passed(3, "unknown", "127.0.0.1:587"), passed(4, "smtp", "127.0.0.1:25"),
                                                    passed(5, "", "[::1]:25"), passed(6, "smtps", "0.0.0.0:465")],
                                                   to: configured)
        #expect(byAddress.map(\.kind) == [.smtp, .smtp, .submission, .smtps])
        #expect(byAddress.first == ListenerSpec(kind: .smtp, source: .inherited(fd: 4)))
        // An IPv4-mapped bound address is its IPv4 address; a host name in
        // the configuration matches any address on its port.
        #expect(try SocketActivation.match([passed(3, "smtp-25", "[::ffff:127.0.0.1]:25")], to: [spec(.smtp, "127.0.0.1:25")]).count == 1)
        #expect(try SocketActivation.match([passed(3, "smtp-25", "192.0.2.7:25")], to: [spec(.smtp, "mx.example.org:25")]).count == 1)
        #expect(try SocketActivation.match([], to: []) == [])
    }

    @Test func aDescriptorWithoutListenerOrAListenerWithoutDescriptorIsAnError() {
        let configured = [spec(.smtp, "127.0.0.1:25"), spec(.submission, "127.0.0.1:587")]
        func failure(_ inherited: [InheritedDescriptor]) -> String? {
            do {
                _ = try SocketActivation.match(inherited, to: configured)
                return nil
            } catch {
                return error.message
            }
        }
        // A listener without a descriptor.
        let missing = failure([passed(3, "smtp-25", "127.0.0.1:25")])
        #expect(missing?.contains("no descriptor was passed for submission on 127.0.0.1:587 (name \"submission-587\"") == true, "\(missing ?? "")")
        // A descriptor for another port, kind or address.
        for stray in [passed(3, "smtp-2525", "127.0.0.1:2525"), passed(3, "smtps-25", "127.0.0.1:25"),
                      passed(3, "smtp-25", "127.0.0.2:25"), passed(3, "smtp-25", "127.0.0.1:26")] {
            let message = failure([stray, passed(4, "submission-587", "127.0.0.1:587")])
            #expect(message?.contains("descriptor 3 (name \"\(stray.name)\"") == true, "\(message ?? "")")
            #expect(message?.contains("matches no listener") == true)
        }
        // Two descriptors for one listener.
        #expect(failure([passed(3, "smtp-25", "127.0.0.1:25"), passed(4, "smtp-25", "127.0.0.1:25"),
                         passed(5, "submission-587", "127.0.0.1:587")]) != nil)
        // Names that name nothing.
        for name in ["imap", "smtp-", "smtp-0", "smtp-65536", "smtp-25x", "lmtp-24"] {
            #expect(failure([passed(3, name, "127.0.0.1:25"), passed(4, "submission-587", "127.0.0.1:587")])?
                        .contains("names no listener") == true, "\(name)")
        }
    }

    @Test func theNameIsKindDashPort() {
        #expect(ListenerDefinition(kind: "submission", host: "::1", port: 587).socketName == "submission-587")
        #expect(ListenerDefinition(kind: "submission", host: "::1", port: 587).address == "[::1]:587")
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

    /// The sessions-per-client limit counts IPv6 clients per network: every
    /// address of a /64 is the same client (its owner has them all).
    @Test func ipv6ClientsAreCountedPerNetwork() {
        let counted = { (address: String, length: Int) in SMTPServerCore.countedClient(address, ipv6PrefixLength: length) }
        #expect(counted("2001:db8:1:2:aaaa::1", 64) == "2001:db8:1:2::/64")
        #expect(counted("2001:DB8:1:2:ffff:ffff:ffff:ffff", 64) == "2001:db8:1:2::/64")
        #expect(counted("2001:db8:1:3::1", 64) == "2001:db8:1:3::/64")
        #expect(counted("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48")
        #expect(counted("2001:db8:1:2:aaaa::1", 128) == "2001:db8:1:2:aaaa::1")
        #expect(counted("192.0.2.1", 64) == "192.0.2.1")
        #expect(counted("unknown", 64) == "unknown")
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
        // A quoted local part holding " helo=": proto= still goes before the
        // session's own helo=, the last one.
        let forged = SessionLog.reject(command: "RCPT", client: "unknown[1.2.3.4]", reply: SMTPReply(554, "5.7.1", "Relay access denied"),
                                       detail: "from=<\"x helo=<evil>\"@b> to=<x@y> helo=<h>", protocolName: "ESMTP")
        #expect(forged.hasSuffix("; from=<\"x helo=<evil>\"@b> to=<x@y> proto=ESMTP helo=<h>"))
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
        #expect(smtp.maxJunkCommands == 100)
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
        openData(c)
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

    /// A client that leaves while the stalled queue holds its message:
    /// the ABORT cannot go out behind the unread body, and the inject
    /// connection must not wait for it forever.
    @Test func anAbortTheStalledQueueDoesNotTakeIsGivenUpOn() throws {
        let q = try FakeQueue()
        let h = try Harness(queue: q) {
            $0.limits.messageSize = 64 << 20
            $0.timeouts.queueReply = 1
        }
        defer { h.stop() }
        q.stallBodies = true
        defer { q.stallBodies = false }
        let c = try h.client()
        try greet(c)
        openData(c)
        let message = Array(String(repeating: String(repeating: "b", count: 998) + "\r\n", count: 16 << 10).utf8)
        let sent = c.sendUntilBlocked(message, patienceMilliseconds: 2000)
        #expect(sent < message.count, "the queue took it all: nothing stalled")
        c.reset()
        #expect(h.logs.eventually("the queue did not take the ABORT within 1 s; inject connection closed"), "\(h.logs.all)")
    }
}
