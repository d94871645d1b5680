import Testing
@testable import MailMessage

@Suite struct SendmailOptionsTests {
    @Test func typicalInvocations() throws {
        var o = try SendmailOptions.parse(["-t", "-i"])
        #expect(o.extractRecipients && o.ignoreDots && o.recipients.isEmpty)

        o = try SendmailOptions.parse(["-oi", "-f", "<bounces@example.org>", "--", "-weird@example.org"])
        #expect(o.ignoreDots && o.sender == "bounces@example.org" && o.recipients == ["-weird@example.org"])

        o = try SendmailOptions.parse(["-ti", "-fme@example.org", "-F", "Me Myself", "a@example.org", "b"])
        #expect(o.extractRecipients && o.ignoreDots && o.sender == "me@example.org")
        #expect(o.fullName == "Me Myself" && o.recipients == ["a@example.org", "b"])

        o = try SendmailOptions.parse(["-r", "x@example.org", "rcpt@example.org", "-oi"])
        #expect(o.sender == "x@example.org" && o.ignoreDots && o.recipients == ["rcpt@example.org"])

        o = try SendmailOptions.parse(["-f", "<>", "a"])
        #expect(o.sender == "")
        o = try SendmailOptions.parse(["-f", "", "a"])
        #expect(o.sender == "")

        o = try SendmailOptions.parse(["-bm", "-odi", "-oem", "-v", "-N", "success,failure", "-R", "hdrs", "-V", "id-1", "-B", "8bitmime", "a"])
        #expect(o.ignored == ["-odi", "-oem", "-v"])
        #expect(o.notify == "SUCCESS,FAILURE" && o.ret == "HDRS" && o.envid == "id-1" && o.bodyType == "8BITMIME")
        #expect(!o.ignoreDots)
    }

    /// Symfony Mailer's and Laravel's default: "sendmail -bs" (-i too).
    @Test func standaloneSMTPMode() throws {
        let o = try SendmailOptions.parse(["-bs", "-i"])
        #expect(o.standaloneSMTP && o.recipients.isEmpty)
        #expect(try !SendmailOptions.parse(["-t"]).standaloneSMTP)
    }

    @Test(arguments: [
        (["-bp"], "sealpost queue list"),
        (["-q"], "sealpost queue flush"),
        (["-q30m"], "sealpost queue flush"),
        (["-bs", "a@example.org"], "-bs takes no recipients"),
        (["-bs", "-t"], "-bs and -t do not go together"),
        (["-bz"], "only -bm (read a message from stdin) and -bs"),
        (["-bi"], "not supported"),
        (["-x", "a"], "unknown option -x"),
        (["-t", "-Z"], "unknown option -Z"),
        (["-f"], "requires an argument"),
        (["-N", "sometimes", "a"], "-N"),
        (["-N", "success,Success", "a"], "names a keyword twice"),
        (["-R", "most", "a"], "-R"),
    ])
    func usageErrors(args: [String], message: String) {
        do {
            _ = try SendmailOptions.parse(args)
            Issue.record("accepted \(args)")
        } catch {
            #expect(error.exit == .usage)
            #expect(error.message.contains(message), "\(error.message)")
        }
    }
}

@Suite struct MessageSubmissionTests {
    static let context = SubmissionContext(hostname: "host.example", qualifyDomain: "localhost",
                                           loginName: "alice", uid: 1000,
                                           gecos: "Alice Liddell,Room 1,,", unixTime: 1795965223)

    func submit(_ args: [String], _ input: String, chunk: Int = 7, context: SubmissionContext = context) throws(SubmissionError) -> (MessageSubmission, String) {
        var s = try MessageSubmission(options: try SendmailOptions.parse(args), context: context)
        var out: [UInt8] = []
        let bytes = Array(input.utf8)
        var i = 0
        while i < bytes.count && !s.isInputComplete {
            try s.feed(bytes[i..<min(i + chunk, bytes.count)])
            out += s.takeOutput()
            i += chunk
        }
        try s.finish()
        out += s.takeOutput()
        return (s, String(decoding: out, as: UTF8.self))
    }

    @Test func completesHeaderAndNormalizes() throws {
        let (s, out) = try submit(["bob@example.org"], "Subject: hi\n\nhello\n.\nnot read\n")
        #expect(s.sender == "alice@host.example")
        #expect(s.recipients == ["bob@example.org"])
        #expect(s.addedFields == ["From", "Date", "Message-ID"])
        let (block, term, off) = HeaderBlock.parse(Array(out.utf8))
        #expect(term == .emptyLine)
        #expect(block.fields.map(\.name) == ["Received", "Subject", "From", "Date", "Message-ID"])
        #expect(block.first("Received")!.value == "by host.example (Sealpost queue-inject, from userid 1000); \(RFC5322Date.format(unixTime: 1795965223))")
        #expect(block.first("From")!.value == "Alice Liddell <alice@host.example>")
        #expect(block.first("Date")!.value == RFC5322Date.format(unixTime: 1795965223))
        #expect(block.first("Message-ID")!.value.hasSuffix("@host.example>"))
        #expect(String(out.utf8.dropFirst(off))! == "hello\r\n")
    }

    @Test func dashIKeepsDotLines() throws {
        let (_, out) = try submit(["-i", "bob@example.org"], "Subject: hi\n\nhello\n.\nmore\n")
        #expect(out.hasSuffix("\r\n\r\nhello\r\n.\r\nmore\r\n"))
    }

    @Test func existingFieldsKeptAsTheyAre() throws {
        let input = "from: Someone <x@example.org>\r\nDATE: Thu, 1 Jan 2026 00:00:00 +0000\r\nmessage-id: <a@b>\r\n\tfolded\r\n\r\nbody\r\n"
        let (s, out) = try submit(["-f", "x@example.org", "bob@example.org"], input)
        #expect(s.addedFields.isEmpty)
        #expect(out.hasSuffix(input))
        #expect(out.hasPrefix("Received: by host.example"))
    }

    @Test func fromUsesDashFThenGecosThenBare() throws {
        var (_, out) = try submit(["-F", "Dr. Who", "-f", "who@example.org", "a@example.org"], "\n")
        #expect(out.contains("\r\nFrom: \"Dr. Who\" <who@example.org>\r\n"))
        (_, out) = try submit(["-F", "J\u{fc}rgen", "a@example.org"], "x: y\n")
        #expect(out.contains("\r\nFrom: =?UTF-8?B?SsO8cmdlbg==?= <alice@host.example>\r\n"))
        var ctx = Self.context
        ctx.gecos = "& Smith,,,"
        (_, out) = try submit(["a@example.org"], "x: y\n", context: ctx)
        #expect(out.contains("\r\nFrom: Alice Smith <alice@host.example>\r\n"))
        ctx.gecos = nil
        (_, out) = try submit(["a@example.org"], "x: y\n", context: ctx)
        #expect(out.contains("\r\nFrom: alice@host.example\r\n"))
        // The null sender still gets a From: naming the user.
        (_, out) = try submit(["-f", "<>", "a@example.org"], "x: y\n", context: ctx)
        #expect(out.contains("\r\nFrom: alice@host.example\r\n"))
    }

    @Test func dashTExtractsAndRemovesBcc() throws {
        let input = """
            To: Bob <bob@example.org>, root\r
            CC: carol@example.org,\r
             "Dave D." <dave@example.org>\r
            bcc: eve@example.org, bob@EXAMPLE.ORG, BOB@example.org\r
            Subject: t\r
            \r
            To: not@header.example\r

            """
        let (s, out) = try submit(["-t", "carol@Example.ORG"], input, chunk: 3)
        // Domains compare without case, local parts with (RFC 5321 2.4).
        #expect(s.recipients == ["bob@example.org", "root@localhost", "dave@example.org", "eve@example.org", "BOB@example.org"])
        // No Bcc field left (the random Message-ID may contain "bcc": look
        // at field names only).
        let fieldNames = out.lowercased().split(separator: "\r\n").map { $0.split(separator: ":").first ?? "" }
        #expect(!fieldNames.contains("bcc"))
        #expect(!out.contains("eve@"))
        #expect(out.contains("Subject: t\r\nFrom: Alice Liddell <alice@host.example>\r\nDate: \(RFC5322Date.format(unixTime: 1795965223))\r\nMessage-ID: <"))
        #expect(out.hasSuffix("\r\n\r\nTo: not@header.example\r\n"))
    }

    @Test func resentFieldsWinUnderDashT() throws {
        let input = "To: old@example.org\nResent-To: new@example.org\nResent-Bcc: hidden@example.org\n\nbody\n"
        let (s, out) = try submit(["-t"], input)
        #expect(s.recipients == ["new@example.org", "hidden@example.org"])
        #expect(!out.contains("hidden"))
        #expect(out.contains("To: old@example.org\r\n"))
        // Re-sent: the Resent- trio of RFC 5322 3.6.6, beside the original's fields.
        #expect(out.contains("\r\nResent-From: "))
        #expect(out.contains("\r\nResent-Date: "))
        #expect(out.contains("\r\nResent-Message-ID: <"))
        let (_, plain) = try submit(["-t"], "To: a@example.org\n\nbody\n")
        #expect(!plain.contains("Resent-"))
        // Re-sent to Resent-Bcc alone: still re-sent, though that field goes.
        let (bccOnly, quiet) = try submit(["-t"], "To: old@example.org\nResent-Bcc: hidden@example.org\n\nbody\n")
        #expect(bccOnly.recipients == ["hidden@example.org"] && !quiet.contains("hidden"))
        #expect(quiet.contains("\r\nResent-From: ") && quiet.contains("\r\nResent-Message-ID: <"))
    }

    @Test func bccRemovedEvenWithoutDashT() throws {
        let (s, out) = try submit(["a@example.org"], "Bcc: a@example.org\nSubject: s\n\nb\n")
        #expect(s.recipients == ["a@example.org"])
        #expect(!out.contains("Bcc"))
    }

    @Test func errors() {
        #expect(throws: SubmissionError(.usage, "no recipients")) { try submit([], "x: y\n") }
        #expect(throws: SubmissionError.self) { try submit(["-t"], "Subject: nobody\n\nbody\n") }
        do { _ = try submit(["-t"], "To: John john@example.org\n\n"); Issue.record("accepted") }
        catch { #expect(error.exit == .dataErr && error.message.contains("To: header")) }
        do { _ = try submit(["a b@example.org"], ""); Issue.record("accepted") }
        catch { #expect(error.exit == .dataErr) }
        do { _ = try submit(["-f", "a@@b", "c@example.org"], ""); Issue.record("accepted") }
        catch { #expect(error.exit == .dataErr && error.message.contains("sender")) }
    }

    @Test func envelopeAddressesHaveNoControlsAndBoundedLength() {
        for args in [["\"a\u{0}b\"@example.org"], ["\"a\tb\"@example.org"], [String(repeating: "a", count: 400) + "@example.org"],
                     ["-f", "\"x\u{7f}\"@example.org", "a@example.org"]] {
            do { _ = try submit(args, ""); Issue.record("accepted \(args)") }
            catch { #expect(error.exit == .dataErr) }
        }
        do { _ = try submit(["-t"], "To: \"a\u{1}\"@example.org\n\n"); Issue.record("accepted") }
        catch { #expect(error.exit == .dataErr) }
    }

    @Test func commandLineListsAndQualification() throws {
        let (s, _) = try submit(["root, Bob <bob@example.org>", "root", "-f", "daemon"], "")
        #expect(s.recipients == ["root@localhost", "bob@example.org"])
        #expect(s.sender == "daemon@host.example")
    }

    @Test func noSeparatorGetsOne() throws {
        var (_, out) = try submit(["a@example.org"], "Subject: s\nThis line is body\n")
        #expect(out.hasSuffix("\r\n\r\nThis line is body\r\n"))
        (_, out) = try submit(["a@example.org"], "Just a body, no header at all.\n")
        #expect(out.hasSuffix("Message-ID: " + out.split(separator: "Message-ID: ")[1]))
        #expect(out.hasSuffix(">\r\n\r\nJust a body, no header at all.\r\n"))
        (_, out) = try submit(["a@example.org"], "")
        #expect(out.hasSuffix(">\r\n\r\n"))
        (_, out) = try submit(["a@example.org"], "Subject: only header")
        #expect(out.contains("\r\nSubject: only header\r\n"))
        #expect(out.hasSuffix(">\r\n\r\n"))
    }

    @Test func mboxFromLineDropped() throws {
        let (_, out) = try submit(["a@example.org"], "From alice Thu Jan  1 00:00:00 1970\nSubject: s\n\nFrom the body\n")
        #expect(!out.contains("From alice"))
        #expect(out.hasSuffix("\r\n\r\nFrom the body\r\n"))
    }

    @Test func headerLimitBoundsMemory() throws {
        // Header fields past the limit are refused: ending the header there
        // would put the later fields, this Bcc: among them, in the body.
        var s = try MessageSubmission(options: try SendmailOptions.parse(["a@example.org"]), context: Self.context, headerLimit: 1000)
        let line = Array("X-Filler: 0123456789012345678901234567890123456789\n".utf8)
        var refused: SubmissionError?
        for _ in 0..<100 where refused == nil {
            do {
                try s.feed(line)
            } catch {
                refused = error
            }
            #expect(s.takeOutput().isEmpty)
            #expect(s.bufferedCount <= 1000 + line.count * 2)
        }
        #expect(refused?.exit == .dataErr)
        #expect(refused?.message == "the header section is over 1000 bytes")

        // One endless line without any line end.
        var t = try MessageSubmission(options: try SendmailOptions.parse(["a@example.org"]), context: Self.context, headerLimit: 1000)
        for _ in 0..<100 {
            try t.feed([UInt8](repeating: 65, count: 500))
            _ = t.takeOutput()
            #expect(t.bufferedCount <= 1500)
        }
        #expect(t.isHeaderComplete)
    }

    @Test func smtputf8Detection() throws {
        let (s, _) = try submit(["j\u{fc}rgen@example.org"], "")
        #expect(s.needsSMTPUTF8)
        let (t, _) = try submit(["a@example.org"], "")
        #expect(!t.needsSMTPUTF8)
        // UTF-8 in a header field (RFC 6532), ASCII addresses: SMTPUTF8 too.
        let (u, _) = try submit(["a@example.org"], "Subject: Gr\u{fc}\u{df}e\n\nHello.\n")
        #expect(u.headerHasEightBit && u.needsSMTPUTF8)
        // In the body only: not a header matter (8BITMIME's, -B).
        let (v, _) = try submit(["a@example.org"], "Subject: plain\n\nGr\u{fc}\u{df}e.\n")
        #expect(!v.headerHasEightBit && !v.needsSMTPUTF8)
        // A header that ends at the first line that is not a field: what
        // follows is body, whatever its bytes.
        let (w, _) = try submit(["a@example.org"], "Subject: plain\nno field here \u{fc}\n")
        #expect(!w.needsSMTPUTF8)
        // Only in a Bcc field, which never leaves: nothing to ask for.
        let (x, _) = try submit(["a@example.org"], "Subject: plain\nBcc: J\u{fc}rgen <j@example.org>\n\nHello.\n")
        #expect(!x.headerHasEightBit && !x.needsSMTPUTF8)
    }
}

@Suite struct InjectionPolicyTests {
    @Test func refusals() {
        #expect(InjectionPolicy.refusal(code: 452, status: "4.3.1", text: "queue full")
                == SubmissionError(.tempFail, "refused: 452 4.3.1 queue full"))
        #expect(InjectionPolicy.refusal(code: 552, status: "5.3.4", text: "message too large")
                == SubmissionError(.dataErr, "refused: 552 5.3.4 message too large"))
        #expect(InjectionPolicy.refusal(code: 554, status: "5.5.1", text: "no recipients").exit == .unavailable)
        // Too many recipients would be refused again on every try.
        #expect(InjectionPolicy.refusal(code: 452, status: "4.5.3", text: "too many recipients").exit == .dataErr)
    }

    @Test func waits() {
        #expect(InjectionPolicy.wait(environment: nil) == 30)
        #expect(InjectionPolicy.wait(environment: "2.5") == 2.5)
        #expect(InjectionPolicy.wait(environment: "0") == 0)
        #expect(InjectionPolicy.wait(environment: "-1") == 30)
        #expect(InjectionPolicy.wait(environment: "soon") == 30)
        #expect(InjectionPolicy.pauses(total: 0).isEmpty)
        let one = InjectionPolicy.pauses(total: 1)
        #expect(one.count == 4 && Array(one.prefix(3)) == [0.1, 0.2, 0.4] && abs(one[3] - 0.3) < 1e-9)
        let p = InjectionPolicy.pauses(total: 30)
        #expect(abs(p.reduce(0, +) - 30) < 1e-9)
        #expect(p.max() == 5)
    }
}
