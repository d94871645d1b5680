// SMTP AUTH in smtp-listen: real sockets, a real password file parsed by
// Accounts, real Argon2id checks on the verification pool.

import Accounts
import Foundation
import Logging
import SMTP
@testable import SMTPService
import SealpostConfig
import Sodium
import Testing

let testPasswordHash: String = try! PasswordHash.hash("s3cret pass")

func testAuthenticator() -> Authenticator {
    let file = try! PasswordFile.parse("""
        alice:\(testPasswordHash)
        bob:\(testPasswordHash):bob@elsewhere.example,@team.example.test
        """, file: "users")
    return Authenticator(file: file, localDomains: ["example.test"])
}

/// A server with the test accounts, loopback not trusted (so relaying
/// depends on AUTH alone), no delay after a failure.
func authHarness(_ configure: (inout SMTPServiceSettings) -> Void = { _ in }) throws -> Harness {
    try Harness { s in
        s.authenticator = testAuthenticator()
        s.trustedNetworks = []
        s.timeouts.authFailureDelayMilliseconds = 0
        configure(&s)
    }
}

func plain(_ user: String, _ password: String, authzid: String = "") -> String {
    Base64.encode(Array(authzid.utf8) + [0] + Array(user.utf8) + [0] + Array(password.utf8))
}

func b64(_ text: String) -> String { Base64.encode(Array(text.utf8)) }

@Suite struct AuthTests {
    @Test func offeredOnSubmissionOnly() throws {
        let h = try authHarness()
        defer { h.stop() }
        let submission = try h.client(port: h.submissionPort)
        let offered = try greet(submission)
        #expect(offered.lines.contains { $0.hasSuffix("-AUTH PLAIN LOGIN") || $0.hasSuffix(" AUTH PLAIN LOGIN") })
        let smtp = try h.client()
        let ehlo = try greet(smtp)
        #expect(!ehlo.description.contains("AUTH"))
        #expect(smtp.command("AUTH PLAIN \(plain("alice", "s3cret pass"))")?.last == "503 5.5.1 Authentication not enabled")
    }

    @Test func plainThenRelayWithESMTPA() throws {
        let h = try authHarness()
        defer { h.stop() }
        let c = try h.client(port: h.submissionPort)
        try greet(c)
        #expect(c.command("MAIL FROM:<alice@example.test>")?.last == "530 5.7.0 Authentication required")
        #expect(c.command("AUTH PLAIN \(plain("alice", "s3cret pass"))")?.last == "235 2.7.0 Authentication successful")
        #expect(c.command("MAIL FROM:<alice@example.test>")?.code == 250)
        #expect(c.command("RCPT TO:<someone@remote.example>")?.code == 250)
        #expect(c.command("DATA")?.code == 354)
        #expect(c.command("Subject: hi\r\n\r\nbody\r\n.")?.code == 250)
        #expect(c.command("QUIT")?.code == 221)
        let m = try #require(h.queue.accepted.first)
        #expect(m.recipients == ["someone@remote.example"])
        #expect(try m.mail.text("auth-user") == "alice")
        #expect(try m.mail.text("protocol") == "ESMTPA")
        #expect(m.text.contains("with ESMTPA"))
        #expect(h.logs.contains("unknown[127.0.0.1]: sasl_method=PLAIN, sasl_username=alice"))
    }

    @Test func loginMechanism() throws {
        let h = try authHarness()
        defer { h.stop() }
        let c = try h.client(port: h.submissionPort)
        try greet(c)
        #expect(c.command("AUTH LOGIN")?.last == "334 VXNlcm5hbWU6")
        #expect(c.command(b64("bob"))?.last == "334 UGFzc3dvcmQ6")
        #expect(c.command(b64("s3cret pass"))?.code == 235)
        // bob's own list: an address elsewhere and a whole domain.
        #expect(c.command("MAIL FROM:<bob@elsewhere.example>")?.code == 250)
        #expect(c.command("RSET")?.code == 250)
        #expect(c.command("MAIL FROM:<anyone@team.example.test>")?.code == 250)
        #expect(c.command("RSET")?.code == 250)
        #expect(c.command("MAIL FROM:<bob@example.test>")?.last
                == "553 5.7.1 <bob@example.test>: Sender address rejected: not owned by the authenticated user")
    }

    @Test func wrongPasswordAndUnknownUserGet535AndCountAsErrors() throws {
        let h = try authHarness { $0.limits.errors = 3 }
        defer { h.stop() }
        let c = try h.client(port: h.submissionPort)
        try greet(c)
        #expect(c.command("AUTH PLAIN \(plain("alice", "wrong"))")?.last == "535 5.7.8 Authentication credentials invalid")
        #expect(c.command("AUTH PLAIN \(plain("mallory", "s3cret pass"))")?.last == "535 5.7.8 Authentication credentials invalid")
        // Proxy authorization is not offered.
        c.send("AUTH PLAIN \(plain("alice", "s3cret pass", authzid: "bob"))\r\n")
        let replies = c.readToEOF()
        #expect(replies.map(\.last) == ["535 5.7.8 Authentication credentials invalid", "421 4.7.0 mx.example.test Error: too many errors"])
        #expect(h.logs.contains("warning: unknown[127.0.0.1]: SASL PLAIN authentication failed: user=mallory"))
    }

    @Test func failureDelayIsATimerNotASleep() throws {
        // With a long delay pending on one session, another session on the
        // same server is still served (the event loop is not blocked).
        let h = try authHarness { $0.timeouts.authFailureDelayMilliseconds = 60_000 }
        defer { h.stop() }
        let slow = try h.client(port: h.submissionPort)
        try greet(slow)
        slow.send("AUTH PLAIN \(plain("alice", "wrong"))\r\n")
        for _ in 0..<4 {
            let other = try h.client(port: h.submissionPort)
            try greet(other)
            #expect(other.command("AUTH PLAIN \(plain("alice", "s3cret pass"))")?.code == 235)
            #expect(other.command("QUIT")?.code == 221)
        }
    }

    @Test func senderLoginMatch() throws {
        let h = try authHarness()
        defer { h.stop() }
        let c = try h.client(port: h.submissionPort)
        try greet(c)
        #expect(c.command("AUTH PLAIN \(plain("alice", "s3cret pass"))")?.code == 235)
        #expect(c.command("MAIL FROM:<bob@example.test>")?.last
                == "553 5.7.1 <bob@example.test>: Sender address rejected: not owned by the authenticated user")
        #expect(c.command("MAIL FROM:<ALICE@Example.Test>")?.code == 250)
        #expect(c.command("RSET")?.code == 250)
        #expect(c.command("MAIL FROM:<>")?.code == 250)
        #expect(h.logs.all.contains { $0.contains("reject: MAIL from unknown[127.0.0.1]: 553 5.7.1") && $0.contains("proto=ESMTPA") })

        let open = try authHarness { $0.senderLoginMatch = false }
        defer { open.stop() }
        let d = try open.client(port: open.submissionPort)
        try greet(d)
        #expect(d.command("AUTH PLAIN \(plain("alice", "s3cret pass"))")?.code == 235)
        #expect(d.command("MAIL FROM:<bob@example.test>")?.code == 250)
    }

    @Test func relayRefusedWithoutAuthentication() throws {
        let h = try authHarness()
        defer { h.stop() }
        let c = try h.client()
        try greet(c)
        #expect(c.command("MAIL FROM:<x@remote.example>")?.code == 250)
        #expect(c.command("RCPT TO:<someone@remote.example>")?.last == "554 5.7.1 Relay access denied")
        #expect(c.command("RCPT TO:<alice@example.test>")?.code == 250)
    }

    @Test func tooManyPendingChecksGive454() throws {
        let h = try authHarness { $0.maxPendingAuthentications = 0 }
        defer { h.stop() }
        let c = try h.client(port: h.submissionPort)
        try greet(c)
        #expect(c.command("AUTH PLAIN \(plain("alice", "s3cret pass"))")?.last == "454 4.7.0 Temporary authentication failure")
        #expect(h.logs.all.contains { $0.contains("authentication deferred") })
    }

    /// One client (an address, or an IPv6 prefix) may hold an eighth of the
    /// password checks: a few addresses guessing passwords cannot keep
    /// every place from the users who submit mail.
    @Test func oneClientHoldsOnlyAShareOfThePasswordChecks() {
        var settings = SMTPServiceSettings(hostname: "mx.example.test", injectSocket: "/nonexistent")
        settings.maxPendingAuthentications = 32
        let core = SMTPServerCore(settings: settings, logger: Logger(label: "t"))
        #expect((0..<4).allSatisfy { _ in core.beginAuthentication(address: "192.0.2.7") })
        #expect(!core.beginAuthentication(address: "192.0.2.7"))
        // IPv6: one prefix (a /64 by default) is one client.
        #expect((1...4).allSatisfy { core.beginAuthentication(address: "2001:db8::\($0)") })
        #expect(!core.beginAuthentication(address: "2001:db8::ffff"))
        #expect(core.beginAuthentication(address: "2001:db8:0:1::1"))
        #expect(core.beginAuthentication(address: "192.0.2.8"))
        core.endAuthentication(address: "192.0.2.7")
        #expect(core.beginAuthentication(address: "192.0.2.7"))
        // The total still bounds everyone.
        for i in 0..<64 { _ = core.beginAuthentication(address: "198.51.100.\(i)") }
        #expect(!core.beginAuthentication(address: "203.0.113.1"))
    }

    @Test func pipelinedCommandsWaitForTheCheck() throws {
        let h = try authHarness()
        defer { h.stop() }
        let c = try h.client(port: h.submissionPort)
        try greet(c)
        c.send("AUTH PLAIN \(plain("alice", "s3cret pass"))\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<x@remote.example>\r\nQUIT\r\n")
        #expect(c.readToEOF().map(\.code) == [235, 250, 250, 221])
    }
}

@Suite struct AuthPolicyTests {
    @Test func availabilityPerListenerAndClient() {
        var s = SMTPServiceSettings(hostname: "mx.example.test", injectSocket: "/run/inject", localDomains: ["example.test"])
        #expect(s.policy(for: .submission, client: "127.0.0.1").auth == .never)   // no password file
        s.authenticator = testAuthenticator()
        #expect(s.policy(for: .submission, client: "127.0.0.1").auth == .always)
        #expect(s.policy(for: .submission, client: "127.9.8.7").auth == .always)
        #expect(s.policy(for: .submission, client: "::1").auth == .always)
        #expect(s.policy(for: .smtps, client: "::1").auth == .always)
        #expect(s.policy(for: .submission, client: "192.0.2.1").auth == .afterTLS)
        #expect(s.policy(for: .submission, client: "2001:db8::1").auth == .afterTLS)
        #expect(s.policy(for: .smtp, client: "127.0.0.1").auth == .never)
        #expect(s.policy(for: .submission, client: "127.0.0.1").senderAllowed != nil)
        s.senderLoginMatch = false
        #expect(s.policy(for: .submission, client: "127.0.0.1").senderAllowed == nil)
    }

    @Test func settingsFromTheConfiguration() throws {
        let config = try SealpostConfiguration.parse(text: """
            [local]
            domains = ["example.test"]
            [smtp]
            relay_domains = [".example.net"]
            trusted_networks = ["192.0.2.0/24", "[2001:db8::]/32"]
            command_line_limit = 1024
            text_line_limit = 2000
            error_limit = 7
            junk_command_limit = 12
            client_ipv6_prefix_length = 48
            client_connection_limit = 0
            session_limit = 300
            command_timeout = "60s"
            data_timeout = "2m"
            queue_reply_timeout = "90s"
            queue_restart_wait = 0
            sender_login_match = false
            """, file: "/etc/sealpost/sealpost.toml")
        let s = SMTPServiceSettings(config: config, injectSocket: "/run/inject", authenticator: testAuthenticator())
        #expect(s.relayDomains == [".example.net"])
        #expect(s.trustedNetworks.map(\.description) == ["192.0.2.0/24", "2001:db8::/32"])
        #expect(s.isTrusted("192.0.2.77") && !s.isTrusted("127.0.0.1"))
        #expect(s.limits.commandLine == 1024 && s.limits.textLine == 2000 && s.limits.errors == 7)
        #expect(s.limits.sessionsPerClient == Int.max)
        #expect(s.timeouts.command == 60 && s.timeouts.dataBlock == 120)
        #expect(s.timeouts.queueReply == 90 && s.timeouts.queueAway == 0)
        #expect(!s.senderLoginMatch)
        let p = s.policy(for: .submission, client: "127.0.0.1")
        #expect(p.commandLineLimit == 1024 && p.textLineLimit == 2000 && p.maxErrors == 7)
        #expect(s.limits.junkCommands == 12 && p.maxJunkCommands == 12)
        #expect(s.limits.ipv6PrefixLength == 48)
        #expect(s.limits.sessions == 300)
        #expect(p.relay.isRelayDomain("a.example.net") && !p.relay.isRelayDomain("example.net"))
        #expect(config.smtp.authUsersFile == "/etc/sealpost/users")
    }
}
