/// AUTH PLAIN/LOGIN exchanges (RFC 4954), strict base64, and relay control.
import Testing
@testable import SMTP

func b64(_ s: String) -> String { Base64.encode(Array(s.utf8)) }

let authPolicy = policy { $0.auth = .always }

@Suite struct Authentication {
    @Test func plainWithInitialResponse() {
        var d = Driver(authPolicy)
        d.send("EHLO c.example\r\nAUTH PLAIN \(b64("\0alice\0secret"))\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\nx\r\n.\r\n")
        #expect(d.codes == ["220", "250", "235 2.7.0", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"])
        #expect(d.events.contains(.authenticate(SMTPCredentials(mechanism: .plain, authorizationIdentity: nil, username: "alice", password: "secret"))))
        #expect(d.envelopes[0].protocolName == "ESMTPA")
        #expect(d.envelopes[0].authenticatedUser == "alice")
        #expect(d.envelopes[0].recipients[0].relay == .relayAllowed)
        #expect(d.logs.contains(.authenticated(user: "alice", mechanism: "PLAIN")))
    }

    @Test func plainWithChallenge() {
        var d = Driver(authPolicy)
        d.send("EHLO c.example\r\nAUTH plain\r\n")
        #expect(d.replies.last == "334 \r\n")
        d.send("\(b64("alice\0alice\0secret"))\r\n")
        #expect(d.codes.last == "235 2.7.0")
        #expect(d.events.contains(.authenticate(SMTPCredentials(mechanism: .plain, authorizationIdentity: "alice", username: "alice", password: "secret"))))
    }

    @Test func wrongPassword() {
        var d = Driver(authPolicy)
        d.send("EHLO c.example\r\nAUTH PLAIN \(b64("\0alice\0wrong"))\r\nRCPT TO:<x@remote.example>\r\n")
        #expect(d.codes.suffix(2) == ["535 5.7.8", "503 5.5.1"])
        #expect(d.session.authenticatedUser == nil)
        #expect(d.logs.contains(.authenticationFailed(user: "alice", mechanism: "PLAIN")))
    }

    @Test func temporaryFailure() {
        var d = Driver(authPolicy)
        d.authAnswer = { _ in .temporaryFailure }
        d.send("EHLO c.example\r\nAUTH PLAIN \(b64("\0alice\0secret"))\r\n")
        #expect(d.codes.last == "454 4.7.0")
    }

    @Test func login() {
        var d = Driver(authPolicy)
        d.send("EHLO c.example\r\nAUTH LOGIN\r\n")
        #expect(d.replies.last == "334 VXNlcm5hbWU6\r\n")
        d.send("\(b64("bob"))\r\n")
        #expect(d.replies.last == "334 UGFzc3dvcmQ6\r\n")
        d.send("\(b64("secret"))\r\n")
        #expect(d.codes.last == "235 2.7.0")
        #expect(d.session.authenticatedUser == "bob")
        var e = Driver(authPolicy)
        e.send("EHLO c.example\r\nAUTH LOGIN \(b64("bob"))\r\n\(b64("secret"))\r\n")
        #expect(e.codes.suffix(2) == ["334", "235 2.7.0"])
    }

    @Test func cancelAndBadData() {
        var d = Driver(authPolicy)
        d.send("EHLO c.example\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n*\r\nAUTH LOGIN\r\nnot base64!\r\nAUTH PLAIN ====\r\n")
        #expect(d.codes == ["220", "250", "334", "501 5.0.0", "334", "501 5.0.0", "334", "501 5.5.2", "501 5.5.2"])
        d.send("AUTH PLAIN \(b64("alice\0secret"))\r\nAUTH PLAIN \(b64("\0\0secret"))\r\nAUTH PLAIN =\r\nAUTH PLAIN QQ\r\nAUTH PLAIN QR==\r\n")
        #expect(d.codes.suffix(5) == ["501 5.5.2", "501 5.5.2", "501 5.5.2", "501 5.5.2", "501 5.5.2"])
        #expect(d.session.authenticatedUser == nil)
    }

    @Test func badLineInsideTheExchange() {
        var d = Driver(authPolicy)
        d.send("EHLO c.example\r\nAUTH LOGIN\r\nab\ncd\r\nNOOP\r\n")
        #expect(d.codes.suffix(3) == ["500 5.5.2", "500 5.5.2", "250 2.0.0"])
    }

    @Test func authRefusals() {
        var never = Driver()
        never.send("EHLO c.example\r\nAUTH PLAIN\r\n")
        #expect(never.codes.last == "503 5.5.1")
        var tlsOnly = Driver(policy { $0.auth = .afterTLS })
        tlsOnly.send("EHLO c.example\r\nAUTH PLAIN\r\n")
        #expect(tlsOnly.codes.last == "538 5.7.11")
        var d = Driver(authPolicy)
        d.send("AUTH PLAIN\r\nHELO c.example\r\nAUTH PLAIN\r\nEHLO c.example\r\nAUTH CRAM-MD5\r\nAUTH\r\nAUTH PLAIN a b\r\n")
        #expect(d.codes == ["220", "503 5.5.1", "250", "503 5.5.1", "250", "504 5.5.4", "501 5.5.4", "501 5.5.4"])
        d.send("MAIL FROM:<a@example.net>\r\nAUTH PLAIN \(b64("\0alice\0secret"))\r\nRSET\r\nAUTH PLAIN \(b64("\0alice\0secret"))\r\nAUTH PLAIN \(b64("\0alice\0secret"))\r\n")
        #expect(d.codes.suffix(5) == ["250 2.1.0", "503 5.5.1", "250 2.0.0", "235 2.7.0", "503 5.5.1"])
    }

    @Test func authLineLimitIsLarger() {
        var d = Driver(authPolicy)
        let big = b64("\0alice\0" + String(repeating: "p", count: 200))
        d.authAnswer = { _ in .failure }
        d.send("EHLO c.example\r\nAUTH PLAIN \(big)\r\n")
        #expect(d.codes.last == "535 5.7.8")   // a 300-octet password is not > 255: accepted for checking
        let huge = "AUTH PLAIN " + String(repeating: "QUFB", count: 3100) + "\r\n"
        d.send(huge)
        #expect(d.codes.last == "500 5.5.2")
    }

    @Test func pipelinedCommandsWaitForTheAuthResult() {
        var s = SMTPServerSession(policy: policy { $0.auth = .always; $0.isSubmission = true }, client: outsider)
        _ = s.start()
        let a = s.receive(Array("EHLO c\r\nAUTH PLAIN \(b64("\0alice\0secret"))\r\nMAIL FROM:<alice@example.org>\r\n".utf8))
        #expect(a.contains(.authenticate(SMTPCredentials(mechanism: .plain, authorizationIdentity: nil, username: "alice", password: "secret"))))
        #expect(s.wantsInput)
        let b = s.authResult(.success)
        let replies = b.compactMap { if case .reply(let r) = $0 { return r.code } else { return nil } }
        #expect(replies == [235, 250])
    }

    @Test func credentialsNeverPrintThePassword() {
        let c = SMTPCredentials(mechanism: .login, authorizationIdentity: nil, username: "u", password: "hunter2")
        #expect(!c.description.contains("hunter2"))
    }
}

@Suite struct Base64Tests {
    @Test(arguments: ["", "f", "fo", "foo", "foob", "fooba", "foobar", "\0\u{1}\u{7f}"])
    func roundTrip(_ s: String) {
        #expect(Base64.decode(Array(Base64.encode(Array(s.utf8)).utf8)) == Array(s.utf8))
    }

    @Test func vectors() {
        #expect(Base64.encode(Array("foobar".utf8)) == "Zm9vYmFy")
        #expect(Base64.encode(Array("fo".utf8)) == "Zm8=")
        #expect(Base64.decode(Array("Zm8=".utf8)) == Array("fo".utf8))
    }

    @Test(arguments: ["Zm8", "Zm9=", "Zg==Zg==", "Z===", "Zm 8=", "Zm8=\r\n", "Zm-_", "=Zm8"])
    func strict(_ s: String) {
        #expect(Base64.decode(Array(s.utf8)) == nil)
    }
}

@Suite struct Relay {
    let relay = RelayPolicy(localDomains: ["example.org", "[192.0.2.25]"], relayDomains: ["relay.example", ".sub.relay.example"])

    func decide(_ address: String, trusted: Bool = false, authenticated: Bool = false) throws -> RelayDecision {
        let (path, _) = try SMTPPathParser.parse(ArraySlice(Array(address.utf8)), kind: .forwardPath)
        return relay.decide(path, clientTrusted: trusted, authenticated: authenticated)
    }

    @Test(arguments: [
        ("<bob@example.org>", RelayDecision.local),
        ("<bob@EXAMPLE.org>", .local),
        ("<bob@[192.0.2.25]>", .local),
        ("<postmaster>", .local),
        ("<@elsewhere.example:bob@example.org>", .local),
        ("<bob@relay.example>", .relayDomain),
        ("<bob@a.sub.relay.example>", .relayDomain),
        ("<bob@sub.relay.example>", .denied(RelayPolicy.relayDenied)),
        ("<bob@elsewhere.example>", .denied(RelayPolicy.relayDenied)),
        ("<bob@example.org.evil.example>", .denied(RelayPolicy.relayDenied)),
        ("<bob@[198.51.100.1]>", .denied(RelayPolicy.relayDenied)),
        ("<bob%elsewhere.example@example.org>", .denied(RelayPolicy.routingDenied)),
        ("<elsewhere.example!bob@example.org>", .denied(RelayPolicy.routingDenied)),
        ("<\"bob@elsewhere.example\"@example.org>", .denied(RelayPolicy.routingDenied)),
        ("<bob%x@relay.example>", .denied(RelayPolicy.routingDenied)),
        ("<@example.org:bob@elsewhere.example>", .denied(RelayPolicy.routingDenied)),
        // Each followed by a combining acute accent: one Character with it,
        // still the byte.
        ("<bob%\u{301}elsewhere.example@example.org>", .denied(RelayPolicy.routingDenied)),
        ("<elsewhere.example!\u{301}bob@example.org>", .denied(RelayPolicy.routingDenied)),
        ("<\"bob@\u{301}elsewhere.example\"@example.org>", .denied(RelayPolicy.routingDenied)),
    ])
    func untrusted(_ address: String, _ expected: RelayDecision) throws {
        #expect(try decide(address) == expected)
    }

    @Test(arguments: [
        ("<bob@elsewhere.example>", RelayDecision.relayAllowed),
        ("<bob%elsewhere.example@example.org>", .local),
        ("<@example.org:bob@elsewhere.example>", .relayAllowed),
        ("<bob@example.org>", .local),
        ("<bob@relay.example>", .relayDomain),
    ])
    func trustedOrAuthenticated(_ address: String, _ expected: RelayDecision) throws {
        #expect(try decide(address, trusted: true) == expected)
        #expect(try decide(address, authenticated: true) == expected)
    }

    @Test func sessionUsesTheDecision() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<x%elsewhere.example@example.org>\r\n")
        #expect(d.codes.suffix(2) == ["554 5.7.1", "554 5.7.1"])
        #expect(d.logs.contains { if case .rejected(command: "RCPT", _, let detail) = $0 { return detail.contains("to=<x@elsewhere.example>") } else { return false } })
        var t = Driver(client: loopback)
        t.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        #expect(t.codes.last == "250 2.1.5")
    }
}

/// Unknown local recipients (Postfix's local_recipient_maps): the session
/// asks `isKnownLocalPart` for recipients in local domains only.
@Suite struct UnknownLocalRecipients {
    static let known: Set<String> = ["bob", "\"john doe\"", "list"]
    let table = policy { $0.isKnownLocalPart = { UnknownLocalRecipients.known.contains($0) } }

    @Test func anUnknownLocalPartIsRefusedWith550() {
        var d = Driver(table)
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<nobody-here@example.org>\r\nRCPT TO:<bob@example.org>\r\n")
        #expect(d.codes.suffix(2) == ["550 5.1.1", "250 2.1.5"])
        #expect(d.replies.contains("550 5.1.1 <nobody-here@example.org>: Recipient address rejected: User unknown in local recipient table\r\n"))
        #expect(d.logs.contains { if case .rejected(command: "RCPT", _, let detail) = $0 { return detail.contains("to=<nobody-here@example.org>") } else { return false } })
        d.send("DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        #expect(d.envelopes.count == 1)
        #expect(d.envelopes[0].recipients.map(\.address) == ["bob@example.org"])
    }

    @Test func theLocalPartIsAskedAsItGoesToTheQueue() {
        // Quoted when it is not a dot-string, as local-deliver will see it.
        var d = Driver(table)
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<\"john doe\"@example.org>\r\nRCPT TO:<\"bob\"@example.org>\r\n")
        #expect(d.codes.suffix(2) == ["250 2.1.5", "250 2.1.5"])
    }

    @Test func otherDomainsAndPostmasterAreNotAsked() {
        var d = Driver(table, client: loopback)
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<anyone@elsewhere.example>\r\nRCPT TO:<anyone@relay.example>\r\nRCPT TO:<postmaster>\r\n")
        #expect(d.codes.suffix(3) == ["250 2.1.5", "250 2.1.5", "250 2.1.5"])
    }

    @Test func withoutATableEveryLocalPartIsAccepted() {
        var d = Driver()
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<nobody-here@example.org>\r\n")
        #expect(d.codes.last == "250 2.1.5")
    }

    @Test func refusalsCountAsErrors() {
        var d = Driver(policy {
            $0.isKnownLocalPart = { _ in false }
            $0.maxErrors = 2
        })
        d.send("EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n")
        #expect(d.codes.suffix(3) == ["550 5.1.1", "550 5.1.1", "421 4.7.0"])
    }
}
