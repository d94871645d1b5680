import MailMessage
import Testing

@Suite struct EnvelopeAddressTests {
    @Test func splitsAtTheLastAtSignByte() throws {
        let (local, domain) = try #require(EnvelopeAddress.split("user@Example.ORG"))
        #expect(local == "user" && domain == "Example.ORG")
        #expect(EnvelopeAddress.domain(of: "user@Example.ORG") == "example.org")
        // The last one: a quoted local part may hold one.
        let quoted = try #require(EnvelopeAddress.split("\"a@b\"@example.org"))
        #expect(quoted.localPart == "\"a@b\"" && quoted.domain == "example.org")
        #expect(EnvelopeAddress.split("postmaster") == nil)
        #expect(EnvelopeAddress.domain(of: "postmaster") == nil)
        #expect(EnvelopeAddress.domain(of: "user@") == nil)
        #expect(EnvelopeAddress.split("user@").map { $0.domain.isEmpty } == true)
    }

    @Test func anAtSignFollowedByACombiningMarkIsStillTheAtSign() throws {
        // "@\u{301}" is one Character, which a Character search for "@"
        // does not find; the queue routes by the byte.
        let address = "a@\u{301}evil.example"
        #expect(address.lastIndex(of: "@") == nil)
        let (local, domain) = try #require(EnvelopeAddress.split(address))
        #expect(local == "a")
        #expect(Array(domain.unicodeScalars).map(\.value) == [0x301] + Array("evil.example".unicodeScalars).map(\.value))
        #expect(EnvelopeAddress.domain(of: address) == "\u{301}evil.example")
    }
}
