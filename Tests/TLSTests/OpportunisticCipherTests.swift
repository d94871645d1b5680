// The client role's two TLS 1.2 cipher lists against `openssl s_server`
// restricted to one older suite, as an older MX offers: the opportunistic
// list reaches it, the strict one (TLS required, or the peer authenticated)
// does not. Then what each list holds, and the lists a configuration may
// not give.

import TLSTestSupport
import Glibc
import Testing
@testable import TLS

@Suite struct OpportunisticCipherTests {
    /// RSA key exchange with AES-GCM, RSA key exchange with AES-CBC, ECDHE
    /// with AES-CBC: none of them in the strict list. RSA key exchange
    /// needs the RSA certificate.
    static let olderSuites = ["AES128-GCM-SHA256", "AES256-SHA", "ECDHE-RSA-AES128-SHA"]

    static func olderServer(_ suite: String) -> [String] { ["-tls1_2", "-cipher", suite] }

    @Test(arguments: olderSuites)
    func opportunisticReachesAnOlderServer(_ suite: String) throws {
        let h = try ClientRoleTests.handshake(cert: "leaf-rsa.pem", key: "leaf-rsa.key", policy: .none,
                                              ciphers: .opportunistic, serverOptions: Self.olderServer(suite)).get()
        #expect(h.report.protocolVersion == "TLSv1.2")
        #expect(h.report.cipher == suite)
        #expect(h.report.authentication == .encrypted)
        // Still verified for the report (the shared certificate store).
        #expect(h.report.verifyError == nil)
    }

    /// Policy none without the opportunistic list (level "encrypt"), and
    /// PKIX with a certificate that would verify: no suite in common.
    @Test(arguments: olderSuites)
    func strictDoesNotReachIt(_ suite: String) throws {
        for policy in [VerificationPolicy.none, .pkix(names: ["mx.example.test"])] {
            let result = try ClientRoleTests.handshake(cert: "leaf-rsa.pem", key: "leaf-rsa.key", policy: policy,
                                                       serverOptions: Self.olderServer(suite))
            let e = try #require(result.failure, "\(policy) reached \(suite)")
            #expect(e.kind == .handshake, "\(e)")
            #expect(e.enhancedStatus == "4.7.5")
        }
    }

    /// A modern TLS 1.2 server still gets the client's first choice.
    @Test func opportunisticStillPrefersTheStrongest() throws {
        let h = try ClientRoleTests.handshake(cert: "leaf-rsa.pem", key: "leaf-rsa.key", policy: .none,
                                              ciphers: .opportunistic, serverOptions: ["-tls1_2"]).get()
        #expect(h.report.cipher == "ECDHE-RSA-AES256-GCM-SHA384")
    }

    @Test func opportunisticIsOnlyForPolicyNone() throws {
        let pki = try TestPKI.get()
        let context = try TLSClientContext(caFile: pki.path("ca.pem"))
        let listener = try Listener()
        let fd = try connectTCP(listener.port)
        defer { close(fd) }
        #expect(throws: TLSError(.configuration, "the opportunistic cipher list is only for handshakes that do not authenticate the peer")) {
            _ = try TLSConnection(client: context, fd: fd, serverName: "mx.example.test",
                                  policy: .pkix(names: ["mx.example.test"]), ciphers: .opportunistic)
        }
    }

    /// What `openssl ciphers -v` says of the two default lists.
    @Test func theDefaultLists() throws {
        let context = try TLSClientContext(caFile: nil)
        let strict = context.suiteNames(.strict).filter { !$0.hasPrefix("TLS_") }
        let wide = context.suiteNames(.opportunistic).filter { !$0.hasPrefix("TLS_") }
        #expect(strict == ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
                           "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"])
        // The strict suites first, in their order; then ECDHE with CBC,
        // then RSA key exchange.
        #expect(Array(wide.prefix(strict.count)) == strict)
        #expect(wide.count == 20)
        let cbc = try #require(wide.firstIndex(of: "ECDHE-RSA-AES128-SHA"))
        let rsa = try #require(wide.firstIndex(of: "AES128-GCM-SHA256"))
        #expect(cbc < rsa)
        #expect(wide.last == "AES128-SHA")
        for suite in Self.olderSuites { #expect(wide.contains(suite)) }
        // Nothing anonymous, unencrypted, DHE (1024-bit groups), CCM, or weak.
        let banned = wide.filter { suite in
            suite.hasPrefix("ADH") || suite.hasPrefix("AECDH") || suite.hasPrefix("DHE-")
                || ["NULL", "CCM", "DES", "RC4", "MD5", "PSK", "SRP", "CAMELLIA", "ARIA"].contains { suite.contains($0) }
        }
        #expect(banned.isEmpty)
        // TLS 1.3's suites are the same for both.
        #expect(context.suiteNames(.strict).filter { $0.hasPrefix("TLS_") }
                == context.suiteNames(.opportunistic).filter { $0.hasPrefix("TLS_") })
    }

    /// A configured list (`[tls] client_opportunistic_ciphers`) that
    /// OpenSSL refuses, or that enables what no peer should be offered.
    @Test(arguments: [
        ("ADH-AES128-SHA:AES128-SHA", "opportunistic cipher list \"ADH-AES128-SHA:AES128-SHA\" enables ADH-AES128-SHA: no authentication (anonymous)"),
        ("AES128-SHA:NULL-SHA256", "enables NULL-SHA256: no encryption"),
        ("NO-SUCH-SUITE", "opportunistic cipher list \"NO-SUCH-SUITE\" refused"),
    ])
    func badListsAreRefused(_ list: String, _ message: String) {
        do {
            _ = try TLSClientContext(caFile: nil, opportunisticCipherList: list)
            Issue.record("accepted \(list)")
        } catch {
            #expect(error.kind == .configuration)
            #expect("\(error)".contains(message), "\(error)")
        }
    }
}
