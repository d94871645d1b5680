/// The Received trace field smtp-listen prepends to each message (RFC 5321
/// section 4.4, protocol names from RFC 3848 and RFC 6531):
///
///     Received: from HELO (RDNS [ADDR])
///     	(using TLS INFO)
///     	by HOST (Sealpost) with ESMTPS id QUEUEID
///     	for <rcpt@example.org>; DATE
///
/// Every string that came from the network is checked or escaped so the
/// field stays one well-formed header field: no CR or LF, no 8-bit octets
/// (unless the message is SMTPUTF8), parentheses balanced (comment text is
/// escaped with quoted-pairs), each folded line far under 998 octets. A HELO
/// name that is not a valid domain or address literal does not appear as the
/// from-domain: the client's address literal does, and the HELO name goes
/// into the comment. The date is passed in (formatted with
/// `RFC5322Date.format`, never with DateFormatter, which fails after chroot).
public enum ReceivedHeader {
    /// Builds the whole field, "Received: ..." with CRLF line ends (the last
    /// line ends with CRLF too).
    ///
    /// - Parameters:
    ///   - helo: the EHLO/HELO argument (untrusted), nil if none was given.
    ///   - clientAddress: numeric address, "192.0.2.1" or "2001:db8::1".
    ///   - clientHostname: verified reverse name, if any (escaped anyway).
    ///   - recipient: the recipient address without brackets when the message
    ///     has exactly one, else nil (no "for" clause, as Postfix does for privacy).
    ///   - utf8: the message is SMTPUTF8, non-ASCII may stay in the "for" clause.
    public static func build(helo: String?, clientAddress: String, clientHostname: String?,
                             hostname: String, softwareName: String = "Sealpost",
                             protocolName: String, queueID: String?, recipient: String?,
                             tls: String? = nil, utf8: Bool = false, date: String) -> String {
        String(decoding: bytes(helo: helo, clientAddress: clientAddress, clientHostname: clientHostname,
                               by: By(hostname: hostname, softwareName: softwareName), protocolName: protocolName,
                               queueID: queueID, recipient: recipient, tls: tls, utf8: utf8, date: date),
               as: UTF8.self)
    }

    /// The receiving host's part of the field, "HOST (SOFTWARE)", checked
    /// and escaped once for all the messages of a server.
    public struct By: Sendable, Equatable {
        let text: String

        public init(hostname: String, softwareName: String = "Sealpost") {
            text = (validDomain(hostname) ?? "localhost") + " (" + commentText(softwareName) + ")"
        }
    }

    /// The field as bytes, what goes into the message, with the receiving
    /// host's part made beforehand. Appended to one byte array: this runs
    /// for every message, and appending a string's bytes costs a fraction
    /// of appending the string to another string.
    public static func bytes(helo: String?, clientAddress: String, clientHostname: String?, by: By,
                             protocolName: String, queueID: String?, recipient: String?,
                             tls: String? = nil, utf8: Bool = false, date: String) -> [UInt8] {
        var field: [UInt8] = []
        field.reserveCapacity(320)
        func add(_ text: String) { field.append(contentsOf: text.utf8) }
        add("Received: from ")
        let literal = addressLiteral(clientAddress)
        let rdns = clientHostname.flatMap(validDomain) ?? "unknown"
        if let helo, let valid = validDomain(helo) ?? validLiteral(helo) {
            add(valid)
            add(" (")
            add(rdns)
            add(" ")
            add(literal)
            add(")")
        } else {
            add(literal)
            add(" (")
            add(rdns)
            add(" ")
            add(literal)
            if let helo {
                add(" helo=")
                add(commentText(helo))
            }
            add(")")
        }
        if let tls, !tls.isEmpty {
            add("\r\n\t(using ")
            add(commentText(tls))
            add(")")
        }
        add("\r\n\tby ")
        add(by.text)
        add(" with ")
        add(atom(protocolName) ?? "ESMTP")
        if let queueID, let id = atom(queueID) {
            add(" id ")
            add(id)
        }
        if let recipient, let path = pathText(recipient, utf8: utf8) {
            add("\r\n\tfor <")
            add(path)
            add(">; ")
        } else {
            add(";\r\n\t")
        }
        add(printable(date, max: 80))
        add("\r\n")
        return field
    }

    /// Convenience for a session's envelope.
    public static func build(envelope: SMTPEnvelope, hostname: String, softwareName: String = "Sealpost",
                             queueID: String?, tls: String? = nil, date: String) -> String {
        String(decoding: bytes(envelope: envelope, by: By(hostname: hostname, softwareName: softwareName),
                               queueID: queueID, tls: tls, date: date),
               as: UTF8.self)
    }

    /// Convenience for a session's envelope, with the host's part made
    /// beforehand, as bytes.
    public static func bytes(envelope: SMTPEnvelope, by: By, queueID: String?, tls: String? = nil,
                             date: String) -> [UInt8] {
        bytes(helo: envelope.helo.isEmpty ? nil : envelope.helo, clientAddress: envelope.client.address,
              clientHostname: envelope.client.hostname, by: by,
              protocolName: envelope.protocolName, queueID: queueID,
              recipient: envelope.recipients.count == 1 ? envelope.recipients[0].address : nil,
              tls: tls, utf8: envelope.parameters.smtputf8, date: date)
    }

    // MARK: - Escaping

    /// "[192.0.2.1]" / "[IPv6:2001:db8::1]"; anything else becomes a comment-safe word.
    static func addressLiteral(_ address: String) -> String {
        let bytes = Array(address.utf8)
        if SMTPPathParser.isIPv4(bytes) { return "[\(address)]" }
        if SMTPPathParser.isIPv6(bytes) { return "[IPv6:\(address)]" }
        return "[unknown]"
    }

    static func validDomain(_ text: String) -> String? {
        let bytes = Array(text.utf8)
        guard !bytes.isEmpty, bytes.count <= 255, bytes.allSatisfy({ $0 < 0x80 }),
              let (d, kind) = SMTPPathParser.parseDomainOrLiteral(bytes), kind == .name else { return nil }
        return d
    }

    static func validLiteral(_ text: String) -> String? {
        let bytes = Array(text.utf8)
        guard bytes.first == UInt8(ascii: "["), bytes.allSatisfy({ $0 < 0x80 }),
              let (d, kind) = SMTPPathParser.parseDomainOrLiteral(bytes), kind != .name else { return nil }
        return d
    }

    /// Comment content: printable ASCII, "(", ")" and "\" as quoted-pairs,
    /// at most 200 characters.
    static func commentText(_ text: String) -> String {
        // Usually there is nothing to escape (a software name, a TLS summary).
        let bytes = text.utf8
        if bytes.count <= 200, bytes.allSatisfy({ (0x20...0x7E).contains($0) && $0 != UInt8(ascii: "(")
                                                 && $0 != UInt8(ascii: ")") && $0 != UInt8(ascii: "\\") }) {
            return text
        }
        var out = ""
        for scalar in text.unicodeScalars.prefix(200) {
            switch scalar {
            case "(", ")", "\\": out.append("\\"); out.unicodeScalars.append(scalar)
            case " "..."~": out.unicodeScalars.append(scalar)
            default: out.append("?")
            }
        }
        return out
    }

    static func printable(_ text: String, max: Int) -> String {
        let bytes = text.utf8
        if bytes.count <= max, bytes.allSatisfy({ (0x20...0x7E).contains($0) }) { return text }
        return String(String.UnicodeScalarView(text.unicodeScalars.prefix(max).map { (0x20...0x7E).contains($0.value) ? $0 : "?" }))
    }

    /// An RFC 5322 atom (letters, digits, "-", "_", "."), or nil.
    static func atom(_ text: String) -> String? {
        guard !text.isEmpty, text.utf8.count <= 64,
              text.utf8.allSatisfy({ isASCIIAlnum($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") })
        else { return nil }
        return text
    }

    /// The recipient re-parsed as a path, so that only a valid mailbox lands
    /// between the brackets; non-ASCII only for SMTPUTF8 messages.
    static func pathText(_ address: String, utf8: Bool) -> String? {
        var bytes: [UInt8] = [UInt8(ascii: "<")]
        bytes.reserveCapacity(address.utf8.count + 2)
        bytes.append(contentsOf: address.utf8)
        bytes.append(UInt8(ascii: ">"))
        guard utf8 || bytes.allSatisfy({ $0 < 0x80 }),
              let (path, end) = try? SMTPPathParser.parse(ArraySlice(bytes), kind: .forwardPath),
              end == bytes.count else { return nil }
        return path.address
    }
}
