/// Envelope addresses: the RFC 5321 section 4.1.2 path grammar with the RFC
/// 6531 (SMTPUTF8) extensions, parsed strictly from the bytes of a MAIL or RCPT
/// command.
///
///     Path          = "<" [ A-d-l ":" ] Mailbox ">"     ; A-d-l: source route
///     Mailbox       = Local-part "@" ( Domain / address-literal )
///     Local-part    = Dot-string / Quoted-string
///
/// Source routes are accepted and ignored (RFC 5321 section 4.1.1.3, C.6);
/// they are kept in `SMTPPath.sourceRoute` so that relay control can see them.
/// Non-ASCII is accepted only as well-formed UTF-8 and reported through
/// `isASCII`: the session refuses it unless the transaction uses SMTPUTF8.
/// Limits (RFC 5321 section 4.5.3.1): local part 64 octets, domain 255,
/// path 256 including the angle brackets.

/// A parsed mailbox `local@domain`.
public struct SMTPMailbox: Sendable, Hashable, CustomStringConvertible {
    public enum DomainKind: Sendable, Hashable { case name, ipv4, ipv6 }

    /// Decoded local part: the content of a quoted string without the quotes
    /// and the backslashes of quoted pairs.
    public var localPart: String
    /// The domain as written: "Example.ORG", "[192.0.2.1]", "[IPv6:2001:db8::1]".
    public var domain: String
    public var domainKind: DomainKind
    /// The local part was written as a quoted string.
    public var localPartWasQuoted: Bool

    public init(localPart: String, domain: String, domainKind: DomainKind = .name, localPartWasQuoted: Bool = false) {
        self.localPart = localPart
        self.domain = domain
        self.domainKind = domainKind
        self.localPartWasQuoted = localPartWasQuoted
    }

    public var isASCII: Bool { localPart.utf8.allSatisfy { $0 < 0x80 } && domain.utf8.allSatisfy { $0 < 0x80 } }

    /// The domain lower-cased (ASCII only), for comparisons.
    public var normalizedDomain: String { String(decoding: domain.utf8.map(asciiLower), as: UTF8.self) }

    /// Canonical text without angle brackets: the local part as a dot-string
    /// when it is one, otherwise re-quoted with `"` and `\` escaped.
    public var description: String { Self.canonicalLocalPart(localPart) + "@" + domain }

    static func canonicalLocalPart(_ local: String) -> String {
        if SMTPPathParser.isDotString(Array(local.utf8)) { return local }
        var out = "\""
        for ch in local {
            if ch == "\"" || ch == "\\" { out.append("\\") }
            out.append(ch)
        }
        return out + "\""
    }
}

/// A reverse path (MAIL) or forward path (RCPT).
public struct SMTPPath: Sendable, Hashable, CustomStringConvertible {
    public enum Target: Sendable, Hashable {
        /// `<>`: the null reverse path (MAIL only).
        case null
        /// `<postmaster>` without a domain (RCPT only, RFC 5321 section 4.1.1.3).
        case postmaster
        case mailbox(SMTPMailbox)
    }
    public var target: Target
    /// The domains of a source route, `<@a,@b:user@c>` gives ["a", "b"]. Ignored
    /// for delivery, as RFC 5321 says; seen by relay control.
    public var sourceRoute: [String]

    public init(target: Target, sourceRoute: [String] = []) {
        self.target = target
        self.sourceRoute = sourceRoute
    }

    public var mailbox: SMTPMailbox? {
        if case .mailbox(let m) = target { return m }
        return nil
    }

    public var isASCII: Bool { mailbox?.isASCII ?? true }

    /// Address text as the queue stores it: "" for `<>`, "postmaster", or
    /// the canonical mailbox; never angle brackets, never the source route.
    public var address: String {
        switch target {
        case .null: return ""
        case .postmaster: return "postmaster"
        case .mailbox(let m): return m.description
        }
    }

    public var description: String { "<\(address)>" }
}

/// Why an address was refused. Mapped to 501 with 5.1.7 (sender) or 5.1.3
/// (recipient) by the session.
public struct SMTPAddressError: Error, Sendable, Hashable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// The path parser. Pure functions over bytes.
public enum SMTPPathParser {
    public enum Kind: Sendable { case reversePath, forwardPath }

    public static let maxLocalPart = 64
    public static let maxDomain = 255
    public static let maxPath = 256

    /// Parses a path starting at `bytes.startIndex` (which must be "<").
    /// Returns the path and the index just after ">".
    public static func parse(_ bytes: ArraySlice<UInt8>, kind: Kind) throws(SMTPAddressError) -> (path: SMTPPath, end: Int) {
        var i = bytes.startIndex
        let end = bytes.endIndex
        guard i < end, bytes[i] == UInt8(ascii: "<") else { throw SMTPAddressError("address must be enclosed in <>") }
        i += 1
        func peek() -> UInt8? { i < end ? bytes[i] : nil }

        // <>
        if peek() == UInt8(ascii: ">") {
            guard kind == .reversePath else { throw SMTPAddressError("null address not allowed here") }
            return (SMTPPath(target: .null), i + 1)
        }

        // Source route: "@" Domain *( "," "@" Domain ) ":"
        var route: [String] = []
        if peek() == UInt8(ascii: "@") {
            while true {
                guard peek() == UInt8(ascii: "@") else { throw SMTPAddressError("bad source route") }
                i += 1
                let (domain, next) = try parseDomain(bytes, from: i, allowLiteral: true)
                route.append(domain.text)
                i = next
                if peek() == UInt8(ascii: ",") { i += 1; continue }
                guard peek() == UInt8(ascii: ":") else { throw SMTPAddressError("bad source route") }
                i += 1
                break
            }
        }

        // Local part.
        let localStart = i
        var local: [UInt8] = []
        var quoted = false
        if peek() == UInt8(ascii: "\"") {
            quoted = true
            i += 1
            while true {
                guard let b = peek() else { throw SMTPAddressError("unterminated quoted string") }
                if b == UInt8(ascii: "\"") { i += 1; break }
                if b == UInt8(ascii: "\\") {
                    i += 1
                    guard let c = peek(), (32...126).contains(c) else { throw SMTPAddressError("bad quoted pair") }
                    local.append(c)
                    i += 1
                    continue
                }
                guard isQText(b) else { throw SMTPAddressError("invalid character in quoted local part") }
                local.append(b)
                i += 1
            }
        } else {
            while let b = peek(), isAText(b) || b == UInt8(ascii: ".") {
                local.append(b)
                i += 1
            }
            guard isDotString(local) else { throw SMTPAddressError("invalid local part") }
        }
        let localLength = i - localStart

        // <postmaster>, RCPT only: no domain, no route.
        if peek() == UInt8(ascii: ">"), kind == .forwardPath, !quoted, route.isEmpty,
           local.count == 10, String(decoding: local.map(asciiLower), as: UTF8.self) == "postmaster" {
            return (SMTPPath(target: .postmaster), i + 1)
        }

        guard peek() == UInt8(ascii: "@") else { throw SMTPAddressError("missing @domain") }
        i += 1
        let (domain, next) = try parseDomain(bytes, from: i, allowLiteral: true)
        i = next
        guard peek() == UInt8(ascii: ">") else { throw SMTPAddressError("invalid domain or missing >") }
        i += 1

        guard localLength <= maxLocalPart else { throw SMTPAddressError("local part longer than 64 octets") }
        guard i - bytes.startIndex <= maxPath else { throw SMTPAddressError("path longer than 256 octets") }

        guard let localText = String(validatingUTF8Bytes: local[...]) else {
            throw SMTPAddressError("invalid UTF-8 in local part")
        }
        let mailbox = SMTPMailbox(localPart: localText, domain: domain.text, domainKind: domain.kind,
                                  localPartWasQuoted: quoted)
        return (SMTPPath(target: .mailbox(mailbox), sourceRoute: route), i)
    }

    /// A whole string as a domain or address literal (for EHLO/HELO and tests).
    public static func parseDomainOrLiteral(_ text: some Collection<UInt8>) -> (text: String, kind: SMTPMailbox.DomainKind)? {
        let bytes = ArraySlice(Array(text))
        guard let (d, end) = try? parseDomain(bytes, from: bytes.startIndex, allowLiteral: true),
              end == bytes.endIndex else { return nil }
        return (d.text, d.kind)
    }

    // MARK: - Pieces

    /// Domain or address literal at `start`; stops at the first byte that
    /// cannot continue it. Non-ASCII (U-labels) is allowed in names when it
    /// is well-formed UTF-8.
    static func parseDomain(_ bytes: ArraySlice<UInt8>, from start: Int, allowLiteral: Bool) throws(SMTPAddressError) -> (domain: (text: String, kind: SMTPMailbox.DomainKind), end: Int) {
        var i = start
        let end = bytes.endIndex
        if i < end, bytes[i] == UInt8(ascii: "[") {
            guard allowLiteral else { throw SMTPAddressError("address literal not allowed") }
            var j = i + 1
            while j < end, bytes[j] != UInt8(ascii: "]") {
                guard j - i < maxDomain else { throw SMTPAddressError("domain longer than 255 octets") }
                j += 1
            }
            guard j < end else { throw SMTPAddressError("unterminated address literal") }
            let inner = Array(bytes[(i + 1)..<j])
            let text = "[" + String(decoding: inner, as: UTF8.self) + "]"
            if isIPv4(inner) { return ((text, .ipv4), j + 1) }
            if inner.count > 5, String(decoding: inner.prefix(5).map(asciiLower), as: UTF8.self) == "ipv6:",
               isIPv6(Array(inner.dropFirst(5))) {
                return ((text, .ipv6), j + 1)
            }
            throw SMTPAddressError("invalid address literal")
        }
        // sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str] (or U-label)
        var labelStart = i
        while true {
            while i < end, isLabelByte(bytes[i]) { i += 1 }
            let label = bytes[labelStart..<i]
            guard !label.isEmpty else { throw SMTPAddressError("empty domain label") }
            guard label.count <= 63 else { throw SMTPAddressError("domain label longer than 63 octets") }
            guard label.first != UInt8(ascii: "-"), label.last != UInt8(ascii: "-") else {
                throw SMTPAddressError("domain label starts or ends with a hyphen")
            }
            if i < end, bytes[i] == UInt8(ascii: "."), i + 1 < end, isLabelByte(bytes[i + 1]) {
                i += 1
                labelStart = i
                continue
            }
            break
        }
        guard i - start <= maxDomain else { throw SMTPAddressError("domain longer than 255 octets") }
        guard let text = String(validatingUTF8Bytes: bytes[start..<i]) else {
            throw SMTPAddressError("invalid UTF-8 in domain")
        }
        return ((text, .name), i)
    }

    static func isLabelByte(_ b: UInt8) -> Bool {
        isASCIIAlnum(b) || b == UInt8(ascii: "-") || b >= 0x80
    }

    /// atext (RFC 5322 3.2.3) plus UTF8-non-ascii (RFC 6531), byte-wise;
    /// UTF-8 validity is checked on the whole local part.
    static func isAText(_ b: UInt8) -> Bool {
        if isASCIIAlnum(b) || b >= 0x80 { return true }
        switch b {
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"),
             UInt8(ascii: "'"), UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "/"),
             UInt8(ascii: "="), UInt8(ascii: "?"), UInt8(ascii: "^"), UInt8(ascii: "_"), UInt8(ascii: "`"),
             UInt8(ascii: "{"), UInt8(ascii: "|"), UInt8(ascii: "}"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    /// qtextSMTP: %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii.
    static func isQText(_ b: UInt8) -> Bool {
        (32...126).contains(b) && b != UInt8(ascii: "\"") && b != UInt8(ascii: "\\") || b >= 0x80
    }

    /// Dot-string = Atom *("." Atom): no leading, trailing or double dots.
    static func isDotString(_ bytes: [UInt8]) -> Bool {
        guard !bytes.isEmpty, bytes.first != UInt8(ascii: "."), bytes.last != UInt8(ascii: ".") else { return false }
        var previousDot = false
        for b in bytes {
            if b == UInt8(ascii: ".") {
                if previousDot { return false }
                previousDot = true
            } else {
                guard isAText(b) else { return false }
                previousDot = false
            }
        }
        return true
    }

    /// IPv4-address-literal = Snum 3("." Snum), Snum = 1*3DIGIT, 0-255.
    static func isIPv4(_ bytes: [UInt8]) -> Bool {
        // One pass, no parts array: the Received header checks the
        // client's address with it for every message.
        var dots = 0, digits = 0, value = 0
        for byte in bytes {
            if byte == UInt8(ascii: ".") {
                guard digits > 0, dots < 3 else { return false }
                dots += 1
                digits = 0
                value = 0
            } else {
                guard isASCIIDigit(byte), digits < 3 else { return false }
                value = value * 10 + Int(byte - UInt8(ascii: "0"))
                digits += 1
                guard value <= 255 else { return false }
            }
        }
        return dots == 3 && digits > 0
    }

    /// IPv6 text form (RFC 4291 section 2.2): eight groups of 1-4 hex digits,
    /// at most one "::", optionally ending with a dotted IPv4 address.
    static func isIPv6(_ bytes: [UInt8]) -> Bool {
        guard !bytes.isEmpty, bytes.count <= 45 else { return false }
        var halves: [String] = []
        var current: [UInt8] = []
        var k = 0
        while k < bytes.count {
            if bytes[k] == UInt8(ascii: ":"), k + 1 < bytes.count, bytes[k + 1] == UInt8(ascii: ":") {
                halves.append(String(decoding: current, as: UTF8.self))
                current = []
                k += 2
            } else {
                current.append(bytes[k])
                k += 1
            }
        }
        halves.append(String(decoding: current, as: UTF8.self))
        guard halves.count <= 2 else { return false }
        func groups(_ s: String, allowIPv4Tail: Bool) -> Int? {
            if s.isEmpty { return 0 }
            let parts = s.split(separator: ":", omittingEmptySubsequences: false)
            var count = 0
            for (index, part) in parts.enumerated() {
                if allowIPv4Tail, index == parts.count - 1, part.contains(".") {
                    guard isIPv4(Array(part.utf8)) else { return nil }
                    count += 2
                } else {
                    guard (1...4).contains(part.count), part.utf8.allSatisfy(isASCIIHex) else { return nil }
                    count += 1
                }
            }
            return count
        }
        if halves.count == 1 {
            return groups(halves[0], allowIPv4Tail: true) == 8
        }
        guard let left = groups(halves[0], allowIPv4Tail: false),
              let right = groups(halves[1], allowIPv4Tail: true) else { return false }
        return left + right <= 7
    }
}

// MARK: - Byte helpers shared by the module

@inline(__always) func asciiLower(_ b: UInt8) -> UInt8 {
    (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b) ? b + 32 : b
}
@inline(__always) func isASCIIDigit(_ b: UInt8) -> Bool { (48...57).contains(b) }
@inline(__always) func isASCIIAlpha(_ b: UInt8) -> Bool { (65...90).contains(b) || (97...122).contains(b) }
@inline(__always) func isASCIIAlnum(_ b: UInt8) -> Bool { isASCIIDigit(b) || isASCIIAlpha(b) }
@inline(__always) func isASCIIHex(_ b: UInt8) -> Bool {
    isASCIIDigit(b) || (65...70).contains(b) || (97...102).contains(b)
}
