import Testing
@testable import SealpostConfig

// [dns] and [remote]: defaults, values, and errors that name file:line: key.

@Suite struct RemoteConfigTests {
    @Test func shippedFileHasTheDefaults() throws {
        let config = try SealpostConfiguration.load(path: checkoutConfig)
        #expect(config.dns == DNSSettings())
        #expect(config.dns.forwarders == [])
        #expect(config.dns.timeout == 10)
        #expect(config.remote.destinationConcurrencyLimit == 20)
        #expect(config.remote.maxJobs == 100)
        #expect(config.remote.connectTimeout == 30)
        #expect(config.remote.connectionCacheTime == 2)
        #expect(config.remote.sourceAddress == nil)
        #expect(config.remote.sourceAddressIPv6 == nil)
        #expect(config.remote.addressPreference == .ipv6)
        #expect(config.remote.eightBitWithout8BITMIME == .convert)
        #expect(config.remote.heloName == config.hostname)
        #expect(config.remote.transportTable == checkoutRoot + "/Config/transport")
    }

    @Test func emptyFileHasTheSameDefaults() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "")
        let config = try SealpostConfiguration.load(path: file)
        #expect(config.dns == DNSSettings())
        #expect(config.remote == RemoteDeliverySettings(heloName: config.hostname,
                                                        transportTable: directory.path + "/transport"))
        // Built without a file, too.
        let built = SealpostConfiguration(file: file)
        #expect(built.remote == config.remote)
        #expect(built.dns == config.dns)
    }

    @Test func everyKeyIsRead() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("etc/sealpost.toml", """
            [sealpost]
            hostname = "mx.example.org"

            [dns]
            forwarders = ["127.0.0.11@5353", "::1", "192.0.2.53"]
            trust_anchor_files = ["keys/anchor.key", "/etc/root.key"]
            timeout = "5s"
            insecure_domains = ["Insecure.TEST."]
            resolve_reserved_zones = ["test", "test"]

            [dns.stub_zones]
            "z.example" = ["127.0.0.10@53"]
            "a.example" = ["127.0.0.10", "::1@1"]

            [remote]
            destination_concurrency_limit = 3
            max_jobs = 256
            connect_timeout = 7
            connection_cache_time = "0s"
            connection_reuse_limit = 7
            mx_address_limit = 0
            mx_session_limit = 3
            source_address = "127.0.0.5"
            source_address_ipv6 = "::1"
            address_preference = "ipv4"
            eight_bit_without_8bitmime = "bounce"
            helo_name = "Out.Example.ORG"
            transport_table = "../transport.map"
            """)
        let config = try SealpostConfiguration.load(path: file)
        #expect(config.dns.forwarders == ["127.0.0.11@5353", "::1", "192.0.2.53"])
        #expect(config.dns.trustAnchorFiles == [directory.path + "/etc/keys/anchor.key", "/etc/root.key"])
        #expect(config.dns.timeout == 5)
        #expect(config.dns.insecureDomains == ["insecure.test"])
        #expect(config.dns.resolveReservedZones == ["test"])
        #expect(config.dns.stubZones == [.init(zone: "z.example", addresses: ["127.0.0.10@53"]),
                                         .init(zone: "a.example", addresses: ["127.0.0.10", "::1@1"])])
        #expect(config.remote.destinationConcurrencyLimit == 3)
        #expect(config.remote.maxJobs == 256)
        #expect(config.remote.connectTimeout == 7)
        #expect(config.remote.connectionCacheTime == 0)
        #expect(config.remote.connectionReuseLimit == 7)
        #expect(config.remote.mxAddressLimit == 0)
        #expect(config.remote.mxSessionLimit == 3)
        #expect(config.remote.sourceAddress == "127.0.0.5")
        #expect(config.remote.sourceAddressIPv6 == "::1")
        #expect(config.remote.addressPreference == .ipv4)
        #expect(config.remote.eightBitWithout8BITMIME == .bounce)
        #expect(config.remote.heloName == "out.example.org")
        #expect(config.remote.transportTable == directory.path + "/transport.map")
    }

    @Test func heloNameDefaultsToTheHostName() throws {
        let config = try load("[sealpost]\nhostname = \"MX.Example.NET\"\n[remote]\nhelo_name = \"\"\n")
        #expect(config.remote.heloName == "mx.example.net")
    }

    @Test func inlineStubZoneTable() throws {
        let config = try load("[dns]\nstub_zones = { \"dane.test\" = [\"127.0.0.10@5300\"] }\n")
        #expect(config.dns.stubZones == [.init(zone: "dane.test", addresses: ["127.0.0.10@5300"])])
    }

    @Test func dnsErrors() {
        expectError("[dns]\nforwarders = [\"dns.example\"]\n", line: 2, key: "dns.forwarders",
                    "expected an IP address, optionally @PORT: \"dns.example\"")
        expectError("[dns]\n\nforwarders = [\"127.0.0.1@0\"]\n", line: 3, key: "dns.forwarders",
                    "not a port (1-65535) after \"@\": \"127.0.0.1@0\"")
        expectError("[dns]\nforwarders = \"127.0.0.1\"\n", line: 2, key: "dns.forwarders",
                    "expected an array of strings, found a string")
        expectError("[dns]\ntimeout = \"0s\"\n", line: 2, key: "dns.timeout",
                    "must be from 1 second to 300 seconds")
        expectError("[dns]\ntimeout = \"5x\"\n", line: 2, key: "dns.timeout", "not a duration: \"5x\"")
        expectError("[dns]\ntrust_anchor_files = [\"\"]\n", line: 2, key: "dns.trust_anchor_files",
                    "an empty file name")
        expectError("[dns]\ninsecure_domains = [\"bad..zone\"]\n", line: 2, key: "dns.insecure_domains",
                    "not a zone name: \"bad..zone\"")
        expectError("[dns]\nresolve_reserved_zones = [\"-x\"]\n", line: 2, key: "dns.resolve_reserved_zones",
                    "not a zone name: \"-x\"")
        expectError("[dns]\nstub_zones = [\"x\"]\n", line: 2, key: "dns.stub_zones",
                    "expected a table of zone = [\"ADDRESS[@PORT]\", ...]")
        expectError("[dns.stub_zones]\n\"a.test\" = []\n", line: 2, key: "dns.stub_zones.a.test",
                    "no server address")
        expectError("[dns.stub_zones]\n\"a.test\" = [\"127.0.0.1\"]\n\"b.test\" = [\"ns.b.test\"]\n", line: 3,
                    key: "dns.stub_zones.b.test", "expected an IP address, optionally @PORT: \"ns.b.test\"")
        expectError("[dns]\nforwarder = []\n", line: 2, key: "dns.forwarder",
                    "unknown key (known in [dns]: forwarders, trust_anchor_files, timeout, insecure_domains, resolve_reserved_zones, stub_zones)")
    }

    @Test func remoteErrors() {
        expectError("[remote]\ndestination_concurrency_limit = 0\n", line: 2, key: "remote.destination_concurrency_limit",
                    "must be from 1 to 1000")
        expectError("[remote]\nmax_jobs = 257\n", line: 2, key: "remote.max_jobs", "must be from 1 to 256")
        expectError("[remote]\nmax_jobs = \"5\"\n", line: 2, key: "remote.max_jobs", "expected an integer, found a string")
        expectError("[remote]\nconnect_timeout = 0\n", line: 2, key: "remote.connect_timeout",
                    "must be from 1 second to 600 seconds")
        expectError("[remote]\nconnection_cache_time = \"1h\"\n", line: 2, key: "remote.connection_cache_time",
                    "must be at most 300 seconds")
        expectError("[remote]\nsource_address = \"::1\"\n", line: 2, key: "remote.source_address",
                    "not an IPv4 address: \"::1\"")
        expectError("[remote]\nsource_address_ipv6 = \"127.0.0.1\"\n", line: 2, key: "remote.source_address_ipv6",
                    "not an IPv6 address: \"127.0.0.1\"")
        expectError("[remote]\naddress_preference = \"IPv6\"\n", line: 2, key: "remote.address_preference",
                    "expected \"ipv6\", \"ipv4\" or \"any\", found \"IPv6\"")
        expectError("[remote]\nmx_session_limit = 1\n", line: 2, key: "remote.mx_session_limit",
                    "must be 0 (no limit) or from 2 to 100")
        expectError("[remote]\nconnection_reuse_limit = 0\n", line: 2, key: "remote.connection_reuse_limit",
                    "must be from 1 to 100000")
        expectError("[remote]\neight_bit_without_8bitmime = \"Convert\"\n", line: 2, key: "remote.eight_bit_without_8bitmime",
                    "expected \"convert\", \"send\" or \"bounce\", found \"Convert\"")
        expectError("[remote]\neight_bit_without_8bitmime = true\n", line: 2, key: "remote.eight_bit_without_8bitmime",
                    "expected a string, found a boolean")
        expectError("[remote]\nhelo_name = \"bad_name\"\n", line: 2, key: "remote.helo_name",
                    "not a host name: \"bad_name\"")
        expectError("[remote]\ntransport_table = \"\"\n", line: 2, key: "remote.transport_table", "must not be empty")
        expectError("[remote]\nmax_job = 1\n", line: 2, key: "remote.max_job",
                    "unknown key (known in [remote]: destination_concurrency_limit, max_jobs, connect_timeout, connection_cache_time, connection_reuse_limit, mx_address_limit, mx_session_limit, source_address, source_address_ipv6, address_preference, helo_name, transport_table, eight_bit_without_8bitmime)")
    }

    @Test func nameServerSyntax() {
        #expect(ConfigValues.nameServerError("127.0.0.1") == nil)
        #expect(ConfigValues.nameServerError("127.0.0.1@53") == nil)
        #expect(ConfigValues.nameServerError("2001:db8::1@853") == nil)
        #expect(ConfigValues.nameServerError("127.0.0.1@") != nil)
        #expect(ConfigValues.nameServerError("127.0.0.1@65536") != nil)
        #expect(ConfigValues.nameServerError("127.0.0.1:53") != nil)
        #expect(ConfigValues.nameServerError("") != nil)
    }
}
