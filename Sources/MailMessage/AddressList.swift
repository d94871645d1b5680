// Addresses out of To:, Cc:, Bcc: (RFC 5322 section 3.4, with the obsolete
// forms of section 4.4 that real mail still carries: empty list elements,
// routes in angle addresses, CFWS inside local parts). Only the addr-specs
// are returned; display names, comments and group names are dropped.
//
// UTF-8 in atoms and quoted strings is accepted (RFC 6532); whether the
// message may carry it is the SMTPUTF8 machinery's business, not a parser's.

public struct AddressSyntaxError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public var input: String
    /// RFC 3463: bad destination mailbox address syntax.
    public var status: String { "5.1.3" }
    public var description: String { "\(message) in \"\(input)\"" }
}

public enum AddressList {
    /// The addr-specs of an address-list, in order. A group contributes its
    /// members (none for "undisclosed-recipients:;"). An address with no
    /// domain ("root") is returned as it is: the caller qualifies it.
    public static func parse(_ text: String) throws(AddressSyntaxError) -> [String] {
        var p = Parser(text: text)
        return try p.parseList()
    }

    /// One address given on a command line or in an envelope: either an
    /// address-list of exactly one mailbox, or a bare "<addr>" / "addr".
    public static func parseSingle(_ text: String) throws(AddressSyntaxError) -> String {
        let list = try parse(text)
        guard list.count == 1 else {
            throw AddressSyntaxError(message: list.isEmpty ? "no address" : "more than one address", input: text)
        }
        return list[0]
    }

    /// Splits "local@domain" at the last "@" outside quotes (nil domain for
    /// an unqualified address).
    public static func split(_ address: String) -> (local: String, domain: String?) {
        // By bytes, as EnvelopeAddress splits: a combining mark after '@'
        // or '"' makes one Character of the two, which a Character scan
        // would not see as the separator or the quote.
        var inQuote = false, escaped = false
        var at: String.Index? = nil
        let bytes = address.utf8
        var i = bytes.startIndex
        while i < bytes.endIndex {
            let c = bytes[i]
            if escaped { escaped = false }
            else if c == UInt8(ascii: "\\") && inQuote { escaped = true }
            else if c == UInt8(ascii: "\"") { inQuote.toggle() }
            else if c == UInt8(ascii: "@") && !inQuote { at = i }
            i = bytes.index(after: i)
        }
        guard let at else { return (address, nil) }
        return (String(Substring(bytes[..<at])), String(Substring(bytes[bytes.index(after: at)...])))
    }
}

enum Token: Equatable {
    case atom(String)          // atext and dots (dot-atom, obs-phrase)
    case quoted(String)        // content of a quoted-string, unescaped
    case literal(String)       // a domain literal, brackets included
    case special(UInt8)        // < > : ; , @
}

enum Lexer {
    /// RFC 5322 atext, plus any byte >= 0x80 (UTF-8, RFC 6532).
    static func isAtext(_ b: UInt8) -> Bool {
        if b >= 0x80 { return true }
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "!#$%&'*+-/=?^_`{|}~".utf8.contains(b)
        }
    }

    static func tokenize(_ bytes: [UInt8], input: String) throws(AddressSyntaxError) -> [Token] {
        var tokens: [Token] = []
        var i = 0
        let n = bytes.count
        func fail(_ m: String) -> AddressSyntaxError { AddressSyntaxError(message: m, input: input) }
        while i < n {
            let b = bytes[i]
            switch b {
            case 32, 9, 13, 10:
                i += 1
            case UInt8(ascii: "("):
                // Comments nest and may hold quoted-pairs.
                var depth = 0
                repeat {
                    guard i < n else { throw fail("unterminated comment") }
                    let c = bytes[i]
                    if c == UInt8(ascii: "\\") { i += 2; continue }
                    if c == UInt8(ascii: "(") { depth += 1 }
                    if c == UInt8(ascii: ")") { depth -= 1 }
                    i += 1
                } while depth > 0
            case UInt8(ascii: "\""):
                var content: [UInt8] = []
                i += 1
                var closed = false
                while i < n {
                    let c = bytes[i]
                    if c == UInt8(ascii: "\\") {
                        guard i + 1 < n else { break }
                        content.append(bytes[i + 1]); i += 2; continue
                    }
                    if c == UInt8(ascii: "\"") { closed = true; i += 1; break }
                    // Folding inside a quoted string is removed by unfolding.
                    if c != 13 && c != 10 { content.append(c) }
                    i += 1
                }
                guard closed else { throw fail("unterminated quoted string") }
                tokens.append(.quoted(String(decoding: content, as: UTF8.self)))
            case UInt8(ascii: "["):
                var j = i + 1
                while j < n, bytes[j] != UInt8(ascii: "]") {
                    if bytes[j] == UInt8(ascii: "[") || bytes[j] == UInt8(ascii: "\\") { throw fail("bad domain literal") }
                    j += 1
                }
                guard j < n else { throw fail("unterminated domain literal") }
                let inner = bytes[(i + 1)..<j].filter { $0 != 32 && $0 != 9 && $0 != 13 && $0 != 10 }
                tokens.append(.literal("[" + String(decoding: inner, as: UTF8.self) + "]"))
                i = j + 1
            case UInt8(ascii: "<"), UInt8(ascii: ">"), UInt8(ascii: ":"), UInt8(ascii: ";"),
                 UInt8(ascii: ","), UInt8(ascii: "@"):
                tokens.append(.special(b)); i += 1
            default:
                guard isAtext(b) || b == UInt8(ascii: ".") else {
                    throw fail("unexpected character \(b < 32 || b == 127 ? "0x" + String(b, radix: 16) : "'" + String(UnicodeScalar(b)) + "'")")
                }
                var j = i
                while j < n, isAtext(bytes[j]) || bytes[j] == UInt8(ascii: ".") { j += 1 }
                tokens.append(.atom(String(decoding: bytes[i..<j], as: UTF8.self)))
                i = j
            }
        }
        return tokens
    }
}

struct Parser {
    let input: String
    var tokens: [Token] = []
    var pos = 0
    var lexError: AddressSyntaxError?

    init(text: String) {
        input = text
        do { tokens = try Lexer.tokenize(Array(text.utf8), input: text) }
        catch { lexError = error }
    }

    func fail(_ m: String) -> AddressSyntaxError { AddressSyntaxError(message: m, input: input) }
    var peek: Token? { pos < tokens.count ? tokens[pos] : nil }
    func isSpecial(_ t: Token?, _ c: Character) -> Bool {
        if case .special(let b) = t { return b == c.asciiValue! }
        return false
    }

    mutating func parseList() throws(AddressSyntaxError) -> [String] {
        if let e = lexError { throw e }
        var out: [String] = []
        while pos < tokens.count {
            if isSpecial(peek, ",") { pos += 1; continue }   // obs-addr-list: empty elements
            try parseAddress(into: &out, inGroup: false)
            if pos < tokens.count {
                guard isSpecial(peek, ",") else { throw fail("expected ',' between addresses") }
                pos += 1
            }
        }
        return out
    }

    /// address = mailbox / group
    mutating func parseAddress(into out: inout [String], inGroup: Bool) throws(AddressSyntaxError) {
        // Collect words up to a special that tells what we have.
        let start = pos
        while let t = peek, !isSpecialToken(t) { pos += 1 }
        let words = Array(tokens[start..<pos])
        let next = peek
        if isSpecial(next, "<") {
            pos += 1
            out.append(try parseAngleAddr())
        } else if isSpecial(next, ":") {
            guard !inGroup else { throw fail("group inside a group") }
            guard !words.isEmpty else { throw fail("group without a name") }
            pos += 1
            // group-list: mailboxes up to ';' (possibly none).
            while true {
                guard let t = peek else { throw fail("group not closed with ';'") }
                if isSpecial(t, ";") { pos += 1; break }
                if isSpecial(t, ",") { pos += 1; continue }
                try parseAddress(into: &out, inGroup: true)
                if !isSpecial(peek, ";") && !isSpecial(peek, ",") {
                    throw fail("expected ',' or ';' in group")
                }
            }
        } else {
            // addr-spec: local-part [ "@" domain ]
            pos = start
            out.append(try parseAddrSpec(allowUnqualified: true))
        }
    }

    func isSpecialToken(_ t: Token) -> Bool {
        if case .special = t { return true }
        return false
    }

    /// After "<": [obs-route] addr-spec ">"
    mutating func parseAngleAddr() throws(AddressSyntaxError) -> String {
        // obs-route = obs-domain-list ":"   e.g. <@a.example,@b.example:user@c>
        if isSpecial(peek, "@") {
            while isSpecial(peek, "@") || isSpecial(peek, ",") {
                if isSpecial(peek, ",") { pos += 1; continue }
                pos += 1
                _ = try parseDomain()
            }
            guard isSpecial(peek, ":") else { throw fail("bad source route") }
            pos += 1
        }
        if isSpecial(peek, ">") { throw fail("empty address <>") }
        let spec = try parseAddrSpec(allowUnqualified: true)
        guard isSpecial(peek, ">") else { throw fail("missing '>'") }
        pos += 1
        return spec
    }

    mutating func parseAddrSpec(allowUnqualified: Bool) throws(AddressSyntaxError) -> String {
        let local = try parseLocalPart()
        guard isSpecial(peek, "@") else {
            if allowUnqualified { return local }
            throw fail("address without domain")
        }
        pos += 1
        return local + "@" + (try parseDomain())
    }

    /// local-part = dot-atom / quoted-string / obs-local-part (words joined by dots)
    mutating func parseLocalPart() throws(AddressSyntaxError) -> String {
        var words: [Token] = []
        while let t = peek {
            if case .atom = t { words.append(t); pos += 1 }
            else if case .quoted = t { words.append(t); pos += 1 }
            else { break }
        }
        guard !words.isEmpty else {
            if let t = peek, case .literal = t { throw fail("domain literal where a local part belongs") }
            throw fail(peek == nil ? "missing address" : "missing local part")
        }
        // Two words must be joined by a dot; "john doe@example" is a display
        // name without angle brackets, which is an error.
        for k in 1..<max(words.count, 1) {
            let a = words[k - 1], b = words[k]
            var joined = false
            if case .atom(let s) = a, s.hasSuffix(".") { joined = true }
            if case .atom(let s) = b, s.hasPrefix(".") { joined = true }
            if !joined { throw fail("words of a local part not separated by '.'") }
        }
        if words.count == 1, case .quoted(let q) = words[0] {
            return Parser.quoteIfNeeded(q)
        }
        var text = ""
        for w in words {
            switch w {
            case .atom(let s): text += s
            case .quoted(let q): text += Parser.quoteIfNeeded(q)
            default: break
            }
        }
        if words.count == 1 {
            guard Parser.isDotAtom(text) else { throw fail("bad dots in local part") }
        }
        return text
    }

    /// domain = dot-atom / domain-literal
    mutating func parseDomain() throws(AddressSyntaxError) -> String {
        guard let t = peek else { throw fail("missing domain") }
        switch t {
        case .atom(let s):
            guard Parser.isDotAtom(s) else { throw fail("bad domain \"\(s)\"") }
            pos += 1
            return s
        case .literal(let s):
            pos += 1
            return s
        default:
            throw fail("missing domain")
        }
    }

    static func isDotAtom(_ s: String) -> Bool {
        !s.isEmpty && !s.hasPrefix(".") && !s.hasSuffix(".") && !s.contains("..")
    }

    /// A quoted local part whose content is a valid dot-atom is the same
    /// address unquoted (RFC 5321 section 4.1.2 says to prefer that form).
    static func quoteIfNeeded(_ q: String) -> String {
        if isDotAtom(q) && q.utf8.allSatisfy({ Lexer.isAtext($0) || $0 == UInt8(ascii: ".") }) {
            return q
        }
        var out = "\""
        for c in q.unicodeScalars {
            if c == "\"" || c == "\\" { out += "\\" }
            out.unicodeScalars.append(c)
        }
        return out + "\""
    }
}
