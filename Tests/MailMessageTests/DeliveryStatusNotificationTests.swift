import Testing
import Foundation
@testable import MailMessage

@Suite struct DeliveryStatusNotificationTests {
    static let original = Array("""
        Received: from client.example.net by mx.example.org\r
        From: Alice <alice@example.net>\r
        To: bob@example.org, carol@example.org\r
        Subject: lunch\r
        Message-ID: <1@example.net>\r
        \r
        Shall we?\r
        -- \r
        Alice\r

        """.utf8)

    func failure(ret: String? = nil, original: [UInt8] = original, limit: Int = 1_048_576) -> DeliveryStatusNotification {
        DeliveryStatusNotification(
            kind: .failure, reportingMTA: "mx.example.org", sender: "alice@example.net",
            envid: "ENV123", ret: ret, arrival: 1795965223,
            recipients: [
                .init(address: "bob@example.org", orcpt: "rfc822;Bob@Example.org", action: .failed,
                      status: "5.1.1", diagnostic: "550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown",
                      remoteMTA: "mail.example.org", lastAttempt: 1795965300),
                .init(address: "carol@example.org", action: .failed, status: "5.2.2",
                      diagnostic: "552 5.2.2 mailbox full", remoteMTA: nil),
            ],
            originalMessage: original, fullMessageLimit: limit)
    }

    /// Splits a multipart body at `boundary` into parts (header, body).
    func parts(_ message: String, boundary: String) -> [String] {
        let pieces = message.components(separatedBy: "\r\n--\(boundary)")
        return Array(pieces.dropFirst().dropLast())
            .map { $0.hasPrefix("\r\n") ? String($0.dropFirst(1)) : $0 }  // "\r\n" is one Character
    }

    @Test func bounceStructure() throws {
        let m = failure().build(unixTime: 1795965400, messageID: "<dsn@mx.example.org>", boundary: "BOUNDARY")
        let s = String(decoding: m, as: UTF8.self)
        let (header, term, off) = HeaderBlock.parse(m)
        #expect(term == .emptyLine)
        #expect(header.first("From")?.value == "MAILER-DAEMON@mx.example.org (Mail Delivery System)")
        #expect(header.first("To")?.value == "alice@example.net")
        #expect(header.first("Subject")?.value == "Undelivered Mail Returned to Sender")
        #expect(header.first("Auto-Submitted")?.value == "auto-replied")
        #expect(header.first("Message-ID")?.value == "<dsn@mx.example.org>")
        #expect(header.first("MIME-Version")?.value == "1.0")
        #expect(header.first("Content-Type")?.value == "multipart/report; report-type=delivery-status;\tboundary=\"BOUNDARY\"")
        #expect(header.first("Date") != nil)
        #expect(!header.contains("Content-Transfer-Encoding"))
        #expect(s.hasSuffix("\r\n--BOUNDARY--\r\n"))
        // Only CRLF line ends.
        for (i, b) in m.enumerated() where b == 10 { #expect(i > 0 && m[i - 1] == 13) }

        let p = parts(String(decoding: m[off...], as: UTF8.self), boundary: "BOUNDARY")
        try #require(p.count == 3)
        #expect(p[0].contains("Content-Type: text/plain"))
        #expect(p[0].contains("<bob@example.org>: delivery failed (host mail.example.org)"))
        #expect(p[0].contains("mailbox full"))

        #expect(p[1].contains("Content-Type: message/delivery-status\r\n\r\n"))
        let status = p[1].components(separatedBy: "\r\n\r\n")
        try #require(status.count >= 4)
        #expect(status[1] == "Reporting-MTA: dns; mx.example.org\r\nOriginal-Envelope-Id: ENV123\r\nArrival-Date: \(RFC5322Date.format(unixTime: 1795965223))")
        #expect(status[2] == """
            Original-Recipient: rfc822; Bob@Example.org\r
            Final-Recipient: rfc822; bob@example.org\r
            Action: failed\r
            Status: 5.1.1\r
            Remote-MTA: dns; mail.example.org\r
            Diagnostic-Code: smtp; 550 5.1.1 <bob@example.org>: Recipient address\r
            \trejected: User unknown\r
            Last-Attempt-Date: \(RFC5322Date.format(unixTime: 1795965300))
            """)
        #expect(status[3].hasPrefix("Final-Recipient: rfc822; carol@example.org\r\nAction: failed\r\nStatus: 5.2.2\r\nDiagnostic-Code: smtp; 552 5.2.2 mailbox full"))

        #expect(p[2].hasPrefix("Content-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n\r\n"))
        #expect(p[2].hasSuffix(String(decoding: Self.original, as: UTF8.self)))
    }

    @Test func headersOnlyWhenAskedTooLargeOrDelay() throws {
        let hdrs = String(decoding: failure(ret: "hdrs").build(boundary: "B"), as: UTF8.self)
        #expect(hdrs.contains("Content-Type: text/rfc822-headers\r\n\r\nReceived: from client"))
        #expect(hdrs.contains("Message-ID: <1@example.net>\r\n\r\n--B--\r\n"))
        #expect(!hdrs.contains("Shall we?"))

        let big = String(decoding: failure(limit: 100).build(boundary: "B"), as: UTF8.self)
        #expect(big.contains("text/rfc822-headers") && !big.contains("Shall we?"))

        var delay = failure(ret: "FULL")
        delay.kind = .delay
        delay.recipients = [.init(address: "bob@example.org", action: .delayed, status: "4.4.1",
                                  diagnostic: "connect to mail.example.org: Connection refused",
                                  lastAttempt: 1795965300, willRetryUntil: 1796397223)]
        let d = String(decoding: delay.build(boundary: "B"), as: UTF8.self)
        #expect(d.contains("Subject: Delayed Mail (still being retried)\r\n"))
        #expect(d.contains("Action: delayed\r\nStatus: 4.4.1\r\n"))
        #expect(d.contains("Diagnostic-Code: X-Sealpost; connect to mail.example.org: Connection refused\r\n"))
        #expect(d.contains("Will-Retry-Until: \(RFC5322Date.format(unixTime: 1796397223))\r\n"))
        #expect(d.contains("text/rfc822-headers") && !d.contains("Shall we?"))

        var ok = failure()
        ok.kind = .success
        ok.recipients = [.init(address: "bob@example.org", action: .delivered, status: "2.0.0",
                               diagnostic: "250 2.0.0 Ok: queued as 1234")]
        let s = String(decoding: ok.build(boundary: "B"), as: UTF8.self)
        #expect(s.contains("Subject: Successful Mail Delivery Report\r\n"))
        #expect(s.contains("text/rfc822-headers"))
        ok.ret = "FULL"
        #expect(String(decoding: ok.build(boundary: "B"), as: UTF8.self).contains("message/rfc822\r\n\r\n"))
    }

    /// A notice about an SMTPUTF8 message (RFC 6533): the recipient's
    /// address stays whole (utf-8 type in message/global-delivery-status,
    /// in UTF-8 in part 1), the original with UTF-8 fields is
    /// message/global, the parts are 8bit; an ASCII notice stays as it was.
    @Test func internationalAddressesTakeTheGlobalForm() {
        let orig = Array("To: \u{7528}\u{6237}@example.org\r\nSubject: x\r\n\r\nhi\r\n".utf8)
        let notice = DeliveryStatusNotification(
            kind: .failure, reportingMTA: "mx.example.org", sender: "alice@example.net", arrival: 1795965223,
            recipients: [.init(address: "\u{7528}\u{6237}@example.org", orcpt: "rfc822;\u{7528}\u{6237}@example.org",
                               action: .failed, status: "5.1.1", diagnostic: "550 5.1.1 unknown \u{7528}")],
            originalMessage: orig)
        #expect(notice.isGlobal && notice.bodyType == "8BITMIME")
        let m = String(decoding: notice.build(boundary: "B"), as: UTF8.self)
        #expect(m.contains("Content-Type: multipart/report; report-type=global-delivery-status;\r\n"))
        #expect(m.contains("Content-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n"), "\(m)")
        #expect(m.contains("\r\nOriginal-Recipient: utf-8; \u{7528}\u{6237}@example.org\r\nFinal-Recipient: utf-8; \u{7528}\u{6237}@example.org\r\n"), "\(m)")
        #expect(m.contains("Diagnostic-Code: smtp; 550 5.1.1 unknown ?\r\n"))
        #expect(m.contains("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"))
        #expect(m.contains("<\u{7528}\u{6237}@example.org>: delivery failed"))
        #expect(m.contains("Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\nTo: \u{7528}\u{6237}@example.org\r\n"))
        #expect(m.contains("To: alice@example.net\r\n"))
        // Headers only: message/global-headers.
        var headers = notice
        headers.ret = "HDRS"
        #expect(String(decoding: headers.build(boundary: "B"), as: UTF8.self).contains("Content-Type: message/global-headers\r\n"))
        // The 7-bit downgrade encodes the global parts as text.
        let converted = try? MIMEDowngrade.convert(notice.build(boundary: "B"))
        // (The returned original's UTF-8 header fields stay, with a remark,
        // as in any message/global: see MIMEDowngrade.encapsulated.)
        #expect(converted.map { $0.remarks.contains(.headerFields) } == true)
        #expect(converted.map { String(decoding: $0.body, as: UTF8.self).contains("Final-Recipient: utf-8; =E7=94=A8=E6=88=B7@example.org") } == true)
        // All ASCII: the classic form.
        let plain = failure()
        #expect(!plain.isGlobal)
        let p = String(decoding: plain.build(boundary: "B"), as: UTF8.self)
        #expect(p.contains("Content-Type: message/delivery-status\r\n\r\n") && p.contains("charset=us-ascii\r\n\r\n"))
        #expect(p.contains("report-type=delivery-status;"))
    }

    /// The Status class fits the Action (RFC 3464): a delay after one MX's
    /// 5.7.1 reports 4.7.1, a success 2, a failure 5 or 4 (expiry).
    @Test func statusClassFitsTheAction() {
        typealias D = DeliveryStatusNotification
        #expect(D.validStatus("5.7.1", action: .delayed) == "4.7.1")
        #expect(D.validStatus("4.4.1", action: .delayed) == "4.4.1")
        #expect(D.validStatus("4.4.7", action: .failed) == "4.4.7")
        #expect(D.validStatus("5.1.1", action: .failed) == "5.1.1")
        #expect(D.validStatus("2.0.0", action: .failed) == "5.0.0")
        #expect(D.validStatus("4.2.0", action: .delivered) == "2.2.0")
        #expect(D.validStatus("x.1.1", action: .delayed) == "4.0.0")
        #expect(D.validStatus("5.1234.1", action: .failed) == "5.0.0")
    }

    /// No continuation line is white space alone, however the spaces fall;
    /// no line is longer than 998 octets, the first word too.
    @Test func foldingNeverMakesABlankOrOverlongLine() {
        for field in ["Diagnostic-Code: smtp; " + String(repeating: "x", count: 53) + "   ",
                      "Diagnostic-Code: smtp; " + String(repeating: "y", count: 54) + " " + String(repeating: " ", count: 9) + "z",
                      String(repeating: "w", count: 2500),
                      String(repeating: "a ", count: 300)] {
            let lines = DeliveryStatusNotification.fold(field)
            #expect(lines.allSatisfy { !$0.allSatisfy { $0 == " " || $0 == "\t" } }, "\(lines)")
            #expect(lines.allSatisfy { $0.utf8.count <= 998 }, "\(lines.map(\.count))")
            #expect(lines.joined().filter { $0 != " " && $0 != "\t" } == field.filter { $0 != " " })
        }
    }

    @Test func eightBitOriginalIsLabelled() {
        let orig = Array("Subject: cafe\r\n\r\nGr\u{fc}\u{df}e\r\n".utf8)
        let m = String(decoding: failure(original: orig).build(boundary: "B"), as: UTF8.self)
        #expect(m.contains("\r\nContent-Transfer-Encoding: 8bit\r\n\r\nThis is a MIME"))
        #expect(m.contains("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\nSubject: cafe"))
        // UTF-8 header fields make the original message/global (RFC 6532 3.7).
        let utf8 = Array("Subject: caf\u{e9}\r\n\r\nGr\u{fc}\u{df}e\r\n".utf8)
        let g = String(decoding: failure(original: utf8).build(boundary: "B"), as: UTF8.self)
        #expect(g.contains("Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\nSubject: caf\u{e9}"))
        // The queue stores the notice with BODY=8BITMIME, so that
        // remote-deliver declares it or converts it to 7 bit.
        #expect(failure(original: orig).bodyType == "8BITMIME")
        #expect(failure().bodyType == nil)
    }

    /// A notice goes out through DATA, which cannot carry binary: an
    /// original with NUL, a bare LF or a line over 998 octets in its body is
    /// returned as its header section; with such a header section, not at
    /// all. Never labelled binary.
    @Test func binaryOriginalIsReturnedAsItsHeaderSectionOrNotAtAll() {
        let long = String(repeating: "x", count: 999)
        for body in ["a\0b\r\n", "a\nb\r\n", long + "\r\n"] {
            let orig = Array("Subject: caf\u{e9}\r\n\r\n\(body)".utf8)
            let notice = failure(original: orig)
            let m = String(decoding: notice.build(boundary: "B"), as: UTF8.self)
            #expect(!m.contains("binary"))
            #expect(m.contains("Content-Type: message/global-headers\r\nContent-Transfer-Encoding: 8bit\r\n\r\nSubject: caf\u{e9}\r\n"))
            #expect(!m.contains("message/rfc822") && m.contains("including\r\nthe returned message headers."))
            #expect(notice.bodyType == "8BITMIME")
        }
        let header = failure(original: Array("Subject: \(long)\r\n\r\nbody\r\n".utf8))
        let m = String(decoding: header.build(boundary: "B"), as: UTF8.self)
        #expect(!m.contains("binary") && !m.contains("message/rfc822") && !m.contains("text/rfc822-headers") && !m.contains(long))
        #expect(m.contains("forward this notice to your postmaster.\r\n"))
        #expect(m.hasSuffix("\r\n\r\n--B--\r\n"), "\(m)")
        #expect(m.components(separatedBy: "--B").count == 4)   // two delimiters and the close one
        #expect(header.bodyType == nil)
    }

    @Test func boundaryNeverOccursInOriginal() {
        // An original that contains the requested boundary gets another one.
        let orig = Array("Subject: x\r\n\r\n--B\r\n".utf8)
        let m = String(decoding: failure(original: orig).build(boundary: "B"), as: UTF8.self)
        #expect(!m.contains("boundary=\"B\""))
        #expect(m.contains("boundary=\"=_sealpost_"))
    }

    @Test func hostileValuesStayInTheirField() {
        var n = failure()
        n.recipients = [.init(address: "x@example.org\r\nBcc: evil@example.org", action: .failed,
                              status: "bogus", diagnostic: "bad\r\nX-Injected: yes \u{e9}")]
        let m = String(decoding: n.build(boundary: "B"), as: UTF8.self)
        #expect(!m.contains("\r\nBcc:") && !m.contains("\r\nX-Injected"))
        #expect(m.contains("Status: 5.0.0\r\n"))
        #expect(m.contains("Diagnostic-Code: X-Sealpost; bad??X-Injected: yes ?"))
    }

    /// Python's email package reads the notice as multipart/report with a
    /// delivery-status part holding one block per recipient.
    @Test func pythonEmailPackageParsesIt() throws {
        let orig = Array("Subject: cafe\r\nFrom: a@example.net\r\n\r\nGr\u{fc}\u{df}e\r\n".utf8)
        let m = failure(original: orig).build()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dsn-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("dsn.eml")
        try Data(m).write(to: file)
        let script = """
            import sys, email, email.policy
            m = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=email.policy.compat32)
            assert m.get_content_type() == 'multipart/report', m.get_content_type()
            assert m.get_param('report-type') == 'delivery-status'
            parts = m.get_payload()
            assert [p.get_content_type() for p in parts] == ['text/plain', 'message/delivery-status', 'message/rfc822'], [p.get_content_type() for p in parts]
            blocks = parts[1].get_payload()
            assert len(blocks) == 3, len(blocks)
            assert blocks[0]['Reporting-MTA'] == 'dns; mx.example.org'
            assert blocks[1]['Final-Recipient'] == 'rfc822; bob@example.org'
            assert blocks[1]['Action'] == 'failed' and blocks[1]['Status'] == '5.1.1'
            assert blocks[2]['Status'] == '5.2.2'
            inner = parts[2].get_payload()[0]
            assert inner['From'] == 'a@example.net'
            assert not m.defects and not any(p.defects for p in parts), (m.defects, [p.defects for p in parts])
            print('ok')
            """
        let (status, out) = try runPython(script, [file.path])
        #expect(status == 0, "\(out)")
        #expect(out == "ok\n")
    }
}
