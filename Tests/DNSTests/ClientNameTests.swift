import Glibc
import Synchronization
import Testing
import DNS

/// Reverse names, and forward-confirmed client names from libunbound's own
/// local zones (localhost, 127.in-addr.arpa, the private ranges): nothing
/// leaves the machine; the one forwarder is a closed loopback port.
@Suite struct ClientNameTests {
    @Test(arguments: [
        ("192.0.2.1", "1.2.0.192.in-addr.arpa"),
        ("127.0.0.1", "1.0.0.127.in-addr.arpa"),
        ("2001:db8::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"),
        ("::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa"),
    ])
    func reverseNames(_ address: String, _ name: String) {
        #expect(Resolver.reverseName(of: address) == name)
    }

    @Test(arguments: ["", "localhost", "192.0.2", "192.0.2.1.5", "[127.0.0.1]", "::1%lo", "256.1.1.1"])
    func notAnAddress(_ text: String) {
        #expect(Resolver.reverseName(of: text) == nil)
    }

    /// IPAddress(text:), which smtp-listen's trusted networks and
    /// listeners parse with too: the family, the bytes, and what is not an
    /// address (reverseName above refuses the same texts through it).
    @Test func addressTexts() {
        #expect(IPAddress(text: "192.0.2.1") == .v4(IPv4Address(bytes: [192, 0, 2, 1])!))
        #expect(IPAddress(text: "::ffff:192.0.2.1") == .v6(IPv6Address(bytes: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1])!))
        #expect(IPAddress(text: "2001:DB8::1")?.description == "2001:db8::1")
        for text in ["", " 192.0.2.1", "192.0.2.1:25", "192.0.2.1\0", "2001:db8::1::2", "ｆｅ８０::1", "0x7f.1"] {
            #expect(IPAddress(text: text) == nil, "\(text)")
        }
    }

    @Test(arguments: [("127.0.0.1", "localhost"), ("::1", "localhost"),
                      ("127.0.0.5", nil), ("10.1.2.3", nil), ("not an address", nil)] as [(String, String?)])
    func verifiedNames(_ address: String, _ expected: String?) throws {
        let thread = try ResolverThread(Resolver(ResolverConfiguration(
            forwarders: ["127.0.0.1@9"], rootTrustAnchorFile: "", timeout: .seconds(5))))
        defer { thread.shutdown() }
        let done = Mutex<(String?, UInt32)?>(nil)
        thread.verifiedName(of: address) { name, ttl in done.withLock { $0 = (name, ttl) } }
        var waited = 0
        while done.withLock({ $0 }) == nil && waited < 1000 {
            usleep(10_000)
            waited += 1
        }
        let result = try #require(done.withLock { $0 })
        #expect(result.0 == expected)
        if expected != nil { #expect(result.1 > 0) }
    }
}
