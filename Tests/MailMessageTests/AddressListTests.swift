import Testing
@testable import MailMessage

@Suite struct AddressListTests {
    @Test(arguments: [
        ("a@example.org", ["a@example.org"]),
        ("  a@example.org  ", ["a@example.org"]),
        ("John Doe <john@example.org>", ["john@example.org"]),
        ("\"Doe, John\" <john@example.org>, jane@example.org", ["john@example.org", "jane@example.org"]),
        ("<john@example.org>", ["john@example.org"]),
        ("john@example.org (John Doe)", ["john@example.org"]),
        ("(comment (nested) \\) ) john@example.org", ["john@example.org"]),
        ("John (the man) Doe <john(x)@(y)example.org>", ["john@example.org"]),
        ("undisclosed-recipients:;", []),
        ("undisclosed-recipients: ;", []),
        ("friends: a@x.example, B <b@y.example>;, c@z.example", ["a@x.example", "b@y.example", "c@z.example"]),
        ("list:a@x.example;", ["a@x.example"]),
        ("a@x.example,,b@y.example,", ["a@x.example", "b@y.example"]),
        ("", []),
        ("\"john doe\"@example.org", ["\"john doe\"@example.org"]),
        ("\"john\"@example.org", ["john@example.org"]),
        ("\"a\\\"b\"@example.org", ["\"a\\\"b\"@example.org"]),
        ("first.last@sub.example.org", ["first.last@sub.example.org"]),
        ("\"first\".last@example.org", ["first.last@example.org"]),
        ("first . last @ example.org", ["first.last@example.org"]),
        ("user@[192.0.2.1]", ["user@[192.0.2.1]"]),
        ("<@relay.example,@other.example:user@example.org>", ["user@example.org"]),
        ("root", ["root"]),
        ("root, Admin <admin>", ["root", "admin"]),
        ("J. R. R. Tolkien <jrr@example.org>", ["jrr@example.org"]),
        ("=?UTF-8?B?SsO8cmdlbg==?= <j@example.org>", ["j@example.org"]),
        ("Jürgen <jürgen@bücher.example>", ["jürgen@bücher.example"]),
        ("a+tag@example.org", ["a+tag@example.org"]),
        ("x@example.org,\r\n y@example.org", ["x@example.org", "y@example.org"]),
    ])
    func valid(input: String, expected: [String]) throws {
        #expect(try AddressList.parse(input) == expected)
    }

    @Test(arguments: [
        "John Doe john@example.org",
        "a@example.org b@example.org",
        "<john@example.org",
        "john@example.org>",
        "\"unterminated@example.org",
        "(unterminated comment a@example.org",
        "a@",
        "@example.org",
        "a@.example.org",
        "a@example..org",
        "a..b@example.org",
        ".a@example.org",
        "<>",
        "group: a@x.example",
        "g1: g2: a@x.example;;",
        "a@[1.2.3.4",
        "a@b@c",
        "a\u{1}b@example.org",
        ": a@x.example;",
        "Name <a@x.example> trailing",
    ])
    func invalid(input: String) {
        #expect(throws: AddressSyntaxError.self, "\(input)") { try AddressList.parse(input) }
    }

    @Test func errorCarriesStatus() {
        do {
            _ = try AddressList.parse("John john@example.org")
            Issue.record("no error")
        } catch {
            #expect(error.status == "5.1.3")
            #expect(error.description.contains("John john@example.org"))
        }
    }

    @Test func single() throws {
        #expect(try AddressList.parseSingle("<a@example.org>") == "a@example.org")
        #expect(throws: AddressSyntaxError.self) { try AddressList.parseSingle("a@x.example, b@y.example") }
        #expect(throws: AddressSyntaxError.self) { try AddressList.parseSingle("g:;") }
    }

    @Test func splitAtLastUnquotedAt() {
        #expect(AddressList.split("a@b").local == "a")
        #expect(AddressList.split("\"x@y\"@b").local == "\"x@y\"")
        #expect(AddressList.split("\"x@y\"@b").domain == "b")
        #expect(AddressList.split("root").domain == nil)
        // A combining mark after '@' or '"' is one Character with it, not
        // one byte: the split is by bytes, as the queue's.
        #expect(AddressList.split("a@\u{301}x").local == "a")
        #expect(AddressList.split("a@\u{301}x").domain == "\u{301}x")
        #expect(AddressList.split("\"\u{301}x@y\"@b").domain == "b")
    }

    @Test func randomInputNeverTraps() {
        var g = SystemRandomNumberGenerator()
        let alphabet = Array("a@<>:;,.\"\\()[] \tb\r\n").map(String.init)
        for _ in 0..<2000 {
            let s = (0..<Int.random(in: 0..<30, using: &g)).map { _ in alphabet.randomElement(using: &g)! }.joined()
            _ = try? AddressList.parse(s)
        }
    }
}
