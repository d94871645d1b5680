import Testing
@testable import SealpostConfig

/// [smtp] relay control, limits, timeouts and AUTH keys.
@Suite struct SMTPKeysTests {
    @Test func givenValues() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("etc/sealpost.toml", """
            [smtp]
            relay_domains = ["Backup.Example.ORG", ".example.net", "example.com."]
            trusted_networks = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7", "[::1]/128", "0.0.0.0/0"]
            command_line_limit = 2048
            text_line_limit = 2000
            error_limit = 5
            junk_command_limit = 0
            client_ipv6_prefix_length = 56
            client_connection_limit = 0
            session_limit = 0
            command_timeout = "2m"
            data_timeout = 60
            queue_reply_timeout = "2m"
            queue_restart_wait = "30s"
            auth_users = "../private/users"
            sender_login_match = false
            event_loops = 3
            client_name_lookup = false
            """)
        let smtp = try SealpostConfiguration.load(path: file).smtp
        #expect(smtp.relayDomains == ["backup.example.org", ".example.net", "example.com"])
        #expect(smtp.trustedNetworks == ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7", "[::1]/128", "0.0.0.0/0"])
        #expect(smtp.commandLineLimit == 2048)
        #expect(smtp.textLineLimit == 2000)
        #expect(smtp.errorLimit == 5)
        #expect(smtp.junkCommandLimit == 0)
        #expect(smtp.clientIPv6PrefixLength == 56)
        #expect(smtp.clientConnectionLimit == 0)
        #expect(smtp.sessionLimit == 0)
        #expect(smtp.commandTimeout == 120)
        #expect(smtp.dataTimeout == 60)
        #expect(smtp.queueReplyTimeout == 120 && smtp.queueRestartWait == 30)
        #expect(smtp.authUsersFile == directory.path + "/private/users")
        #expect(!smtp.senderLoginMatch)
        #expect(smtp.eventLoops == 3 && smtp.eventLoopThreads(cores: 8) == 3)
        let automatic = try load("[smtp]\n").smtp
        #expect(automatic.eventLoops == 0)
        #expect(automatic.junkCommandLimit == 100)
        #expect(automatic.clientIPv6PrefixLength == 64)
        #expect(automatic.sessionLimit == 10_000)
        #expect(automatic.queueReplyTimeout == 300 && automatic.queueRestartWait == 10)
        #expect(try load("[smtp]\nqueue_restart_wait = 0\n").smtp.queueRestartWait == 0)
        #expect(automatic.clientNameLookup && !smtp.clientNameLookup)
        #expect(automatic.eventLoopThreads(cores: 1) == 1)
        #expect(automatic.eventLoopThreads(cores: 2) == 1)
        #expect(automatic.eventLoopThreads(cores: 8) == 4)
        #expect(try load("[smtp]\ntrusted_networks = []\n").smtp.trustedNetworks == [])
    }

    @Test func errors() {
        expectError("[smtp]\ntrusted_networks = [\"10.1.2.3/8\"]\n", line: 2, key: "smtp.trusted_networks",
                    "host bits set beyond /8 (did you mean the network address?): \"10.1.2.3/8\"")
        expectError("[smtp]\ntrusted_networks = [\"127.0.0.0/33\"]\n", line: 2, key: "smtp.trusted_networks",
                    "prefix length 33 exceeds 32: \"127.0.0.0/33\"")
        expectError("[smtp]\ntrusted_networks = [\"localhost\"]\n", line: 2, key: "smtp.trusted_networks",
                    "not an IP address or network (address/length): \"localhost\"")
        expectError("[smtp]\ntrusted_networks = [\"::1/\"]\n", line: 2, key: "smtp.trusted_networks",
                    "not a prefix length after \"/\": \"::1/\"")
        expectError("[smtp]\ntrusted_networks = \"127.0.0.0/8\"\n", line: 2, key: "smtp.trusted_networks",
                    "expected an array of strings, found a string")
        expectError("[smtp]\nrelay_domains = [\"exa mple.org\"]\n", line: 2, key: "smtp.relay_domains",
                    "not a domain (or .domain for its subdomains): \"exa mple.org\"")
        expectError("[smtp]\ncommand_line_limit = 100\n", line: 2, key: "smtp.command_line_limit",
                    "must be between 512 and 65536: 100")
        expectError("[smtp]\ntext_line_limit = 999\n", line: 2, key: "smtp.text_line_limit",
                    "must be between 1000 and 65536: 999")
        expectError("[smtp]\nerror_limit = 0\n", line: 2, key: "smtp.error_limit", "must be between 1 and 1000: 0")
        expectError("[smtp]\njunk_command_limit = -1\n", line: 2, key: "smtp.junk_command_limit",
                    "must be between 0 and 1000000: -1")
        expectError("[smtp]\nclient_ipv6_prefix_length = 8\n", line: 2, key: "smtp.client_ipv6_prefix_length",
                    "must be between 16 and 128: 8")
        expectError("[smtp]\nsession_limit = 1000001\n", line: 2, key: "smtp.session_limit",
                    "must be between 0 and 1000000: 1000001")
        expectError("[smtp]\nclient_name_lookup = 1\n", line: 2, key: "smtp.client_name_lookup",
                    "expected a boolean (true or false), found an integer")
        expectError("[smtp]\nevent_loops = 300\n", line: 2, key: "smtp.event_loops", "must be between 0 and 256: 300")
        expectError("[smtp]\ncommand_timeout = \"0s\"\n", line: 2, key: "smtp.command_timeout", "must be at least 1 second")
        expectError("[smtp]\ndata_timeout = \"3x\"\n", line: 2, key: "smtp.data_timeout", "not a duration: \"3x\"")
        expectError("[smtp]\nqueue_reply_timeout = \"10m\"\n", line: 2, key: "smtp.queue_reply_timeout",
                    "must be between 1 second and 9 minutes (the client waits 10 minutes for the reply): 600s")
        expectError("[smtp]\nqueue_reply_timeout = 0\n", line: 2, key: "smtp.queue_reply_timeout",
                    "must be between 1 second and 9 minutes (the client waits 10 minutes for the reply): 0s")
        expectError("[smtp]\nqueue_restart_wait = \"6m\"\n", line: 2, key: "smtp.queue_restart_wait",
                    "must be at most 5 minutes: 360s")
        expectError("[smtp]\nqueue_reply_timeout = \"30s\"\nqueue_restart_wait = \"30s\"\n", line: 3,
                    key: "smtp.queue_restart_wait", "must be shorter than queue_reply_timeout (30s), which bounds it: 30s")
        expectError("[smtp]\nqueue_reply_timeout = \"5s\"\n", line: 2, key: "smtp.queue_reply_timeout",
                    "must be longer than queue_restart_wait (10s by default; or set queue_restart_wait lower): 5s")
        expectError("[smtp]\nqueue_restart_wait = -1\n", line: 2, key: "smtp.queue_restart_wait",
                    "must not be negative: -1")
        expectError("[smtp]\nauth_users = \"\"\n", line: 2, key: "smtp.auth_users", "must not be empty")
        expectError("[smtp]\nsender_login_match = \"yes\"\n", line: 2, key: "smtp.sender_login_match",
                    "expected a boolean (true or false), found a string")
    }

    @Test(arguments: ["127.0.0.0/8", "::1/128", "::1", "10.0.0.0/8", "fe80::/10", "::/0", "[2001:db8::]/32", "192.0.2.255"])
    func validNetworks(_ network: String) {
        #expect(ConfigValues.networkError(network) == nil)
    }

    @Test(arguments: ["127.0.0.1/8", "fe80::1/10", "1.2.3/24", "::1/129", "/8", "10.0.0.0/08x", "10.0.0.0 /8", ""])
    func invalidNetworks(_ network: String) {
        #expect(ConfigValues.networkError(network) != nil)
    }
}
