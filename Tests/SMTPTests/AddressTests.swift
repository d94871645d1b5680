/// Table-driven tests of the RFC 5321 / RFC 6531 path parser.
import Testing
@testable import SMTP

struct AddressCase: CustomTestStringConvertible, Sendable {
    var input: String
    var kind: SMTPPathParser.Kind = .forwardPath
    /// Expected canonical address, or nil when the path must be refused.
    var expected: String?
    var route: [String] = []
    var testDescription: String { input }
}

let validPaths: [AddressCase] = [
    AddressCase(input: "<user@example.org>", expected: "user@example.org"),
    AddressCase(input: "<User.Name+tag@Example.ORG>", expected: "User.Name+tag@Example.ORG"),
    AddressCase(input: "<!#$%&'*+-/=?^_`{|}~@example.org>", expected: "!#$%&'*+-/=?^_`{|}~@example.org"),
    AddressCase(input: "<\"john doe\"@example.org>", expected: "\"john doe\"@example.org"),
    AddressCase(input: "<\"a\\\"b\\\\c\"@example.org>", expected: "\"a\\\"b\\\\c\"@example.org"),
    AddressCase(input: "<\"plain\"@example.org>", expected: "plain@example.org"),
    AddressCase(input: "<\"a..b\"@example.org>", expected: "\"a..b\"@example.org"),
    AddressCase(input: "<\"\"@example.org>", expected: "\"\"@example.org"),
    AddressCase(input: "<user@[192.0.2.1]>", expected: "user@[192.0.2.1]"),
    AddressCase(input: "<user@[IPv6:2001:db8::1]>", expected: "user@[IPv6:2001:db8::1]"),
    AddressCase(input: "<user@[IPv6:::ffff:192.0.2.1]>", expected: "user@[IPv6:::ffff:192.0.2.1]"),
    AddressCase(input: "<user@[IPv6:1:2:3:4:5:6:7:8]>", expected: "user@[IPv6:1:2:3:4:5:6:7:8]"),
    AddressCase(input: "<user@localhost>", expected: "user@localhost"),
    AddressCase(input: "<user@xn--bcher-kva.example>", expected: "user@xn--bcher-kva.example"),
    AddressCase(input: "<@relay.example:user@example.org>", expected: "user@example.org", route: ["relay.example"]),
    AddressCase(input: "<@a.example,@b.example:user@example.org>", expected: "user@example.org", route: ["a.example", "b.example"]),
    AddressCase(input: "<postmaster>", expected: "postmaster"),
    AddressCase(input: "<PostMaster>", expected: "postmaster"),
    AddressCase(input: "<>", kind: .reversePath, expected: ""),
    AddressCase(input: "<jörg@bücher.example>", expected: "jörg@bücher.example"),
    AddressCase(input: "<\"ünï code\"@example.org>", expected: "\"ünï code\"@example.org"),
    AddressCase(input: "<" + String(repeating: "a", count: 64) + "@example.org>", expected: String(repeating: "a", count: 64) + "@example.org"),
    AddressCase(input: "<a@" + String(repeating: "b", count: 63) + ".example>", expected: "a@" + String(repeating: "b", count: 63) + ".example"),
]

let invalidPaths: [AddressCase] = [
    AddressCase(input: "user@example.org"),
    AddressCase(input: "<user@example.org"),
    AddressCase(input: "<user>"),
    AddressCase(input: "<>"),                      // null only for MAIL
    AddressCase(input: "<postmaster>", kind: .reversePath),
    AddressCase(input: "<@example.org>"),
    AddressCase(input: "<.user@example.org>"),
    AddressCase(input: "<user.@example.org>"),
    AddressCase(input: "<us..er@example.org>"),
    AddressCase(input: "<us er@example.org>"),
    AddressCase(input: "<user@@example.org>"),
    AddressCase(input: "<user@exa_mple.org>"),
    AddressCase(input: "<user@-example.org>"),
    AddressCase(input: "<user@example-.org>"),
    AddressCase(input: "<user@example..org>"),
    AddressCase(input: "<user@example.org.>"),
    AddressCase(input: "<user@>"),
    AddressCase(input: "<user@[192.0.2.256]>"),
    AddressCase(input: "<user@[192.0.2]>"),
    AddressCase(input: "<user@[IPv6:1::2::3]>"),
    AddressCase(input: "<user@[IPv6:12345::1]>"),
    AddressCase(input: "<user@[IPv6:1:2:3:4:5:6:7:8:9]>"),
    AddressCase(input: "<user@[x-tag:foo]>"),
    AddressCase(input: "<user@[192.0.2.1>"),
    AddressCase(input: "<\"unterminated@example.org>"),
    AddressCase(input: "<\"bad\\\u{1}\"@example.org>"),
    AddressCase(input: "<\"tab\there\"@example.org>"),
    AddressCase(input: "<user(comment)@example.org>"),
    AddressCase(input: "<user@example.org> "),        // parsed, but params checked elsewhere: see below
    AddressCase(input: "<@relay.example user@example.org>"),
    AddressCase(input: "<@relay.example:>"),
    AddressCase(input: "<" + String(repeating: "a", count: 65) + "@example.org>"),
    AddressCase(input: "<a@" + String(repeating: "b", count: 64) + ".example>"),
    AddressCase(input: "<a@" + Array(repeating: String(repeating: "b", count: 60), count: 5).joined(separator: ".") + ">"),
    AddressCase(input: "<" + String(repeating: "a", count: 60) + "@" + Array(repeating: String(repeating: "b", count: 60), count: 4).joined(separator: ".") + ">"),
]

@Test("valid paths", arguments: validPaths)
func validPath(_ c: AddressCase) throws {
    let bytes = ArraySlice(Array(c.input.utf8))
    let (path, end) = try SMTPPathParser.parse(bytes, kind: c.kind)
    #expect(end == bytes.endIndex)
    #expect(path.address == c.expected)
    #expect(path.sourceRoute == c.route)
}

@Test("invalid paths", arguments: invalidPaths)
func invalidPath(_ c: AddressCase) {
    let bytes = ArraySlice(Array(c.input.utf8))
    // A trailing space is not part of the path: it must then be followed by parameters.
    if let (_, end) = try? SMTPPathParser.parse(bytes, kind: c.kind) {
        #expect(end != bytes.endIndex, "accepted \(c.input)")
    }
}

@Test func invalidUTF8IsRefused() {
    let bytes: [UInt8] = Array("<us".utf8) + [0xC3, 0x28] + Array("@example.org>".utf8)
    #expect(throws: SMTPAddressError.self) { try SMTPPathParser.parse(ArraySlice(bytes), kind: .forwardPath) }
    let domain: [UInt8] = Array("<user@ex".utf8) + [0xFF] + Array(".org>".utf8)
    #expect(throws: SMTPAddressError.self) { try SMTPPathParser.parse(ArraySlice(domain), kind: .forwardPath) }
}

/// The parser's UTF-8 check (String(validatingUTF8Bytes:), a fast path for
/// ASCII) answers as the standard library's String(validating:as:) does,
/// for chosen byte strings and random ones, on slices that do not start at 0.
@Test func utf8CheckAgreesWithTheStandardLibrary() {
    var cases: [[UInt8]] = [[], Array("user".utf8), Array("jörg".utf8), Array("日本".utf8), Array("😀".utf8),
                            [0x80], [0xFF], [0xC3], [0xC3, 0x28], [0xC0, 0xAF], [0xE0, 0x80, 0xAF],
                            [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0x61, 0xF0, 0x9F, 0x98], [0x00, 0x7F]]
    var random = SplitMix(state: 0x5EA1_9057)
    let valid = ["é", "ß", "€", "日", "😀"].map { Array($0.utf8) }
    for _ in 0..<5000 {
        var bytes: [UInt8] = []
        for _ in 0..<Int.random(in: 0...10, using: &random) {
            switch Int.random(in: 0..<4, using: &random) {
            case 0, 1: bytes.append(UInt8.random(in: 0...0x7F, using: &random))
            case 2: bytes.append(UInt8.random(in: 0x80...0xFF, using: &random))
            default: bytes += valid.randomElement(using: &random)!
            }
        }
        cases.append(bytes)
    }
    var invalid = 0
    for bytes in cases {
        let padded = [UInt8(ascii: "<")] + bytes
        let expected = String(validating: bytes, as: UTF8.self)
        if expected == nil { invalid += 1 }
        #expect(String(validatingUTF8Bytes: padded[1...]) == expected, "\(bytes)")
    }
    #expect(invalid > 1000 && invalid < cases.count - 1000, "both kinds among the cases")
}

/// isIPv4, one pass since the Received header runs it for every message,
/// answers as the split-based check it replaced, for chosen strings,
/// dotted groups of 0-4 digits, and random strings of digits and dots.
@Test func ipv4CheckAgreesWithTheSplitForm() {
    func reference(_ bytes: [UInt8]) -> Bool {
        let parts = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 4 else { return false }
        for part in parts {
            guard (1...3).contains(part.count), part.allSatisfy({ (48...57).contains($0) }) else { return false }
            guard part.reduce(0, { $0 * 10 + Int($1 - 48) }) <= 255 else { return false }
        }
        return true
    }
    var cases = ["127.0.0.1", "0.0.0.0", "255.255.255.255", "256.1.1.1", "1.2.3", "1.2.3.4.5", "01.02.003.4",
                 "1..2.3", ".1.2.3", "1.2.3.", "1.2.3.4a", "", "1234.1.1.1", "0001.1.1.1", "1.2.3.04", "1.2.3.999"]
        .map { Array($0.utf8) }
    var random = SplitMix(state: 0x1F4)
    let digits = Array("0123456789".utf8)
    let alphabet = digits + Array(".:a ".utf8)
    for _ in 0..<10_000 {
        let groups = (0..<Int.random(in: 3...5, using: &random)).map { _ in
            (0..<Int.random(in: 0...4, using: &random)).map { _ in digits.randomElement(using: &random)! }
        }
        cases.append(Array(groups.joined(separator: [UInt8(ascii: ".")])))
        cases.append((0..<Int.random(in: 0...16, using: &random)).map { _ in alphabet.randomElement(using: &random)! })
    }
    var valid = 0
    for bytes in cases {
        let expected = reference(bytes)
        if expected { valid += 1 }
        #expect(SMTPPathParser.isIPv4(bytes) == expected, "\(String(decoding: bytes, as: UTF8.self))")
    }
    #expect(valid > 100 && valid < cases.count - 100, "both kinds among the cases")
}

@Test func nonASCIIIsReported() throws {
    let (path, _) = try SMTPPathParser.parse(ArraySlice(Array("<jörg@example.org>".utf8)), kind: .forwardPath)
    #expect(!path.isASCII)
    let (ascii, _) = try SMTPPathParser.parse(ArraySlice(Array("<joerg@example.org>".utf8)), kind: .forwardPath)
    #expect(ascii.isASCII)
}

@Test func pathLengthLimit() throws {
    // 256 octets including the brackets is the maximum.
    let local = String(repeating: "a", count: 64)
    var labels: [String] = []
    var domain = ""
    repeat {
        labels.append(String(repeating: "b", count: 60))
        domain = labels.joined(separator: ".")
    } while 2 + local.count + 1 + domain.count < 256 - 61
    let pad = 256 - (2 + local.count + 1 + domain.count + 1)
    let exact = "<\(local)@\(domain).\(String(repeating: "c", count: pad))>"
    #expect(exact.utf8.count == 256)
    #expect(throws: Never.self) { try SMTPPathParser.parse(ArraySlice(Array(exact.utf8)), kind: .forwardPath) }
    let over = "<\(local)@\(domain).\(String(repeating: "c", count: pad + 1))>"
    #expect(throws: SMTPAddressError.self) { try SMTPPathParser.parse(ArraySlice(Array(over.utf8)), kind: .forwardPath) }
}

@Test(arguments: [
    ("mail.example.org", true), ("[192.0.2.1]", true), ("[IPv6:::1]", true), ("localhost", true),
    ("my_host.example", true), ("bad host", false), ("-bad.example", false), ("ex..ample", false),
    ("ümlaut.example", false), ("a.", false), ("[300.1.1.1]", false), ("", false),
])
func heloNames(_ name: String, _ ok: Bool) {
    #expect(SMTPServerSession.isAcceptableHeloName(ArraySlice(Array(name.utf8))) == ok)
}
