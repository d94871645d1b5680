// The transport table's format, errors with file:line, lookup order; the
// route planner's MX ordering and DNS outcomes.

import Testing
import SMTP
@testable import RemoteDelivery
#if canImport(Glibc)
import Glibc
#endif

private func parse(_ text: String, credentials: [String: SMTPClientCredentials] = [:]) throws(TransportTableError) -> TransportTable {
    try TransportTable.parse(Array(text.utf8), file: "Config/transport") { (name: String) throws(TransportTableError) -> SMTPClientCredentials in
        guard let c = credentials[name] else { throw TransportTableError(file: name, line: nil, message: "No such file or directory") }
        return c
    }
}

private func parseError(_ text: String) -> String? {
    do {
        _ = try parse(text)
        return nil
    } catch {
        return error.description
    }
}

@Suite struct TransportTableTests {
    @Test func nextHopForms() throws {
        let creds = SMTPClientCredentials(username: "relayuser", password: "s3cret:with:colons")
        let t = try parse("""
            # comment line

            example.com        relay:[192.0.2.10]:587   auth=relay.auth tls=encrypt
            .example.com       smtp:mail.example.com
            lab.test           smtp:[127.0.0.1]:2525    # trailing comment
            v6.test            smtp:[ipv6:2001:db8::1]
            mapped.test        smtp:[IPv6:::ffff:192.0.2.7]:2525
            named.test         smtp:[smart.example.net]
            port.test          smtp:mx.port.test:2526
            secure.example     smtp: tls=verify
            Internal.TEST      local
            *                  relay:[smarthost.example.net]:587
            """, credentials: ["relay.auth": creds])
        #expect(t.entries.count == 10)
        let e = try #require(t.lookup("example.com"))
        #expect(e.nextHop == .host("192.0.2.10", port: 587))
        #expect(e.credentials == creds)
        #expect(e.tls == .encrypt)
        #expect(e.origin == "Config/transport:3")
        #expect(t.lookup("a.b.example.com")?.nextHop == .mailExchangers("mail.example.com", port: 25))
        #expect(t.lookup("lab.test")?.nextHop == .host("127.0.0.1", port: 2525))
        #expect(t.lookup("v6.test")?.nextHop == .host("2001:db8::1", port: 25))
        // An IPv4-mapped address is the IPv4 host (its certificate names
        // 192.0.2.7, which OpenSSL would not match with the mapped form).
        #expect(t.lookup("mapped.test")?.nextHop == .host("192.0.2.7", port: 2525))
        #expect(t.lookup("named.test")?.nextHop == .host("smart.example.net", port: 25))
        #expect(t.lookup("port.test")?.nextHop == .mailExchangers("mx.port.test", port: 2526))
        let s = try #require(t.lookup("secure.example"))
        #expect(s.nextHop == nil)
        #expect(s.tls == .verify)
        #expect(t.lookup("internal.test")?.nextHop == .local)
        #expect(t.lookup("INTERNAL.test.")?.nextHop == .local)
        #expect(t.lookup("elsewhere.org")?.key == "*")
    }

    @Test func mostSpecificKeyWins() throws {
        let t = try parse("""
            example.com      smtp:[192.0.2.1]
            .example.com     smtp:[192.0.2.2]
            .b.example.com   smtp:[192.0.2.3]
            """)
        #expect(t.lookup("example.com")?.nextHop == .host("192.0.2.1", port: 25))
        #expect(t.lookup("a.example.com")?.nextHop == .host("192.0.2.2", port: 25))
        #expect(t.lookup("x.b.example.com")?.nextHop == .host("192.0.2.3", port: 25))
        // ".b.example.com" does not match b.example.com itself.
        #expect(t.lookup("b.example.com")?.nextHop == .host("192.0.2.2", port: 25))
        #expect(t.lookup("example.org") == nil)
    }

    @Test func errorsNameFileAndLine() {
        #expect(parseError("example.com") == "Config/transport:1: expected \"domain next-hop [options]\", got \"example.com\" alone")
        #expect(parseError("\n\nexample.com  smtp:[192.0.2.1] tsl=may") == "Config/transport:3: unknown option \"tsl\" (known: auth, tls)")
        #expect(parseError("example.com  lmtp:[192.0.2.1]")?.hasPrefix("Config/transport:1: next hop \"lmtp:[192.0.2.1]\": unknown transport \"lmtp\"") == true)
        #expect(parseError("example.com  smtp:[192.0.2.1]:0")?.contains("is not a port number") == true)
        #expect(parseError("example.com  smtp:[192.0.2.1]:x25")?.contains("is not a port number") == true)
        #expect(parseError("example.com  smtp:[192.0.2.1")?.contains("without \"]\"") == true)
        #expect(parseError("example.com  smtp:2001:db8::1")?.contains("must be in brackets") == true)
        #expect(parseError("exa mple.com") != nil)
        #expect(parseError("ex!ample.com  local")?.contains("is not a domain name") == true)
        // A dotted IPv4 address is not a name: not as a key, and as a next
        // hop only in brackets (bare, it would get an MX lookup).
        #expect(parseError("192.0.2.1  local")?.contains("is not a domain name") == true)
        #expect(parseError("example.com  smtp:192.0.2.1:2525")
                == "Config/transport:1: next hop \"smtp:192.0.2.1:2525\": an IP address goes in brackets: \"smtp:[192.0.2.1]:2525\"")
        #expect(parseError("example.com  relay:10.1.2.3")?.hasSuffix("an IP address goes in brackets: \"relay:[10.1.2.3]\"") == true)
        #expect(parseError("example.com  smtp:10.1.2.3:")?.hasSuffix("an IP address goes in brackets: \"smtp:[10.1.2.3]\"") == true)
        #expect(parseError("example.com  smtp:mx.123") != nil)
        #expect(parseError("example.com  smtp:123.example") == nil)
        #expect(parseError("example.com  smtp:[mx1.example]") == nil)
        #expect(parseError("example.com  smtp: tls=sometimes")?.contains("tls=sometimes: expected one of none, may, encrypt") == true)
        #expect(parseError("example.com  local tls=may") == "Config/transport:1: options make no sense with \"local\"")
        #expect(parseError("example.com  smtp:\nEXAMPLE.com local") == "Config/transport:2: \"example.com\" already has an entry (Config/transport:1)")
        #expect(parseError("example.com  smtp: auth=missing") == "Config/transport:1: auth=missing: No such file or directory")
        #expect(parseError("example.com  smtp:\n  continued") == "Config/transport:2: continuation lines are not supported: an entry is one line")
        #expect(parseError("example.com smtp:[192.0.2.1]\r\n") == nil)
    }

    @Test func loadsFileAndCredentials() throws {
        var template = Array("/tmp/sealpost-transport-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        defer {
            unlink(dir + "/transport")
            unlink(dir + "/relay.auth")
            rmdir(dir)
        }
        func write(_ name: String, _ text: String) {
            let fd = open(dir + "/" + name, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            _ = Array(text.utf8).withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        write("relay.auth", "# smarthost account\nuser@example.net:pa ss:word\n")
        write("transport", "*  relay:[127.0.0.1]:2587  auth=relay.auth\n")
        let t = try TransportTable.load(path: dir + "/transport")
        let c = try #require(t.lookup("any.test")?.credentials)
        #expect(c.username == "user@example.net")
        #expect(c.password == "pa ss:word")
        #expect(c.description == "PLAIN user=user@example.net")
        // A password goes to a verified server unless the entry says
        // otherwise.
        #expect(t.lookup("any.test")?.tls == .verify)
        write("transport", "*  relay:[127.0.0.1]:2587  auth=relay.auth tls=encrypt\n")
        #expect(try TransportTable.load(path: dir + "/transport").lookup("any.test")?.tls == .encrypt)
        write("transport", "*  relay:[127.0.0.1]:2587  auth=relay.auth\n")

        // Missing file: no table.
        #expect(try TransportTable.load(path: dir + "/absent").isEmpty)

        write("relay.auth", "nocolon\n")
        #expect(throws: TransportTableError.self) { try TransportTable.load(path: dir + "/transport") }
        do {
            _ = try TransportTable.load(path: dir + "/transport")
        } catch {
            #expect(error.description == "\(dir)/transport:1: auth=relay.auth: line 1: expected \"username:password\"")
        }
    }
}

@Suite struct RoutePlannerTests {
    @Test func mxByPreferenceRandomAmongEquals() {
        let mx = [MailExchanger(preference: 20, host: "c"), MailExchanger(preference: 10, host: "a"),
                  MailExchanger(preference: 10, host: "b"), MailExchanger(preference: 30, host: "d")]
        var seen = Set<[String]>()
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let order = RoutePlanner.order(mx, using: &rng).map(\.host)
            #expect(Array(order.suffix(2)) == ["c", "d"])
            #expect(Set(order.prefix(2)) == ["a", "b"])
            seen.insert(order)
        }
        // Both orders of the two preference-10 hosts show up.
        #expect(seen.count == 2)
    }

    @Test func addressFamilyPreference() {
        let a = ["192.0.2.1", "2001:db8::1", "192.0.2.2", "2001:db8::2"]
        #expect(RoutePlanner.order(a, preference: .ipv6) == ["2001:db8::1", "2001:db8::2", "192.0.2.1", "192.0.2.2"])
        #expect(RoutePlanner.order(a, preference: .ipv4) == ["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"])
        #expect(RoutePlanner.order(a, preference: .any) == a)
    }

    @Test func everyAddressOfEveryMX() async throws {
        let resolver = StaticMailExchangerResolver(
            mx: ["d.test": .exchangers([MailExchanger(preference: 5, host: "mx1.d.test"), MailExchanger(preference: 9, host: "mx2.d.test"),
                                        MailExchanger(preference: 7, host: "gone.d.test")], secure: true)],
            hosts: ["mx1.d.test": .addresses(["192.0.2.1", "2001:db8::1"], secure: true),
                    "mx2.d.test": .addresses(["192.0.2.2"], secure: false)])
        let route = try await RoutePlanner.route(.mailExchangers("d.test", port: 25), resolver: resolver, preference: .ipv6).get()
        #expect(route.candidates.map(\.description) == ["mx1.d.test[2001:db8::1]:25", "mx1.d.test[192.0.2.1]:25", "mx2.d.test[192.0.2.2]:25"])
        #expect(route.candidates.map(\.secure) == [true, true, false])
        #expect(route.mxSecure)
    }

    @Test func implicitMX() async throws {
        let resolver = StaticMailExchangerResolver(hosts: ["plain.test": .addresses(["192.0.2.9"], secure: false)])
        let route = try await RoutePlanner.route(.mailExchangers("plain.test", port: 25), resolver: resolver, preference: .ipv6).get()
        #expect(route.exchangers == [MailExchanger(preference: 0, host: "plain.test")])
        #expect(route.candidates.map(\.description) == ["plain.test[192.0.2.9]:25"])
    }

    @Test func dnsOutcomes() async {
        func failure(_ r: MXLookupResult?, hosts: [String: AddressLookupResult] = [:]) async -> RoutingFailure? {
            let resolver = StaticMailExchangerResolver(mx: r.map { ["x.test": $0] } ?? [:], hosts: hosts)
            if case .failure(let f) = await RoutePlanner.route(.mailExchangers("x.test", port: 25), resolver: resolver, preference: .ipv6) {
                return f
            }
            return nil
        }
        let null = await failure(.nullMX)
        #expect(null?.permanent == true)
        #expect(null?.status == EnhancedStatus(5, 1, 10))
        let nx = await failure(nil)
        #expect(nx?.permanent == true)
        #expect(nx?.status == EnhancedStatus(5, 1, 2))
        let servfail = await failure(.temporaryFailure("SERVFAIL"))
        #expect(servfail?.permanent == false)
        #expect(servfail?.status == EnhancedStatus(4, 4, 3))
        let mx = MXLookupResult.exchangers([MailExchanger(preference: 1, host: "mx.x.test")], secure: false)
        let unresolvable = await failure(mx)
        #expect(unresolvable?.permanent == true)
        #expect(unresolvable?.status == EnhancedStatus(5, 4, 4))
        let tempHost = await failure(mx, hosts: ["mx.x.test": .temporaryFailure("timeout")])
        #expect(tempHost?.permanent == false)
        #expect(tempHost?.status == EnhancedStatus(4, 4, 3))
    }
}
