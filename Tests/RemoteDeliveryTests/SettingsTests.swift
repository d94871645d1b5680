import Testing
import RemoteDelivery
import SealpostConfig

/// `[remote]` reaches the agent: each key read by SealpostConfig is the
/// setting remote-deliver runs with.
@Suite struct RemoteSettingsFromConfigTests {
    @Test func theRemoteSectionBecomesTheAgentsSettings() throws {
        let config = try SealpostConfiguration.parse(text: """
            [sealpost]
            hostname = "mx.example.org"
            [remote]
            destination_concurrency_limit = 3
            connection_cache_time = "7s"
            connection_reuse_limit = 9
            mx_address_limit = 0
            mx_session_limit = 4
            eight_bit_without_8bitmime = "send"
            """, file: "/etc/sealpost/sealpost.toml")
        let settings = RemoteDeliveryService.settings(config)
        #expect(settings.destinationConcurrencyLimit == 3)
        #expect(settings.connectionCacheTime == 7)
        #expect(settings.connectionReuseLimit == 9)
        #expect(settings.mxAddressLimit == 0)
        #expect(settings.mxSessionLimit == 4)
        #expect(settings.eightBitWithout8BITMIME == .send)

        let defaults = RemoteDeliveryService.settings(try SealpostConfiguration.parse(text: "", file: "/etc/sealpost/sealpost.toml"))
        #expect(defaults.connectionReuseLimit == 100)
        #expect(defaults.mxAddressLimit == 5 && defaults.mxSessionLimit == 2)
    }
}

/// Where a job goes: its nexthop, else its first recipient's domain, split
/// at the last "@" byte as the queue routes it.
@Suite struct JobDestinationTests {
    @Test func theNexthopElseTheFirstRecipientsDomain() {
        #expect(makeJob(to: ["a@Remote.TEST", "b@other.test"]).destination == "remote.test")
        #expect(makeJob(to: ["a@remote.test"], nexthop: "Relay.TEST").destination == "relay.test")
        // "@\u{301}" is one Character: a Character search found no domain.
        #expect(makeJob(to: ["a@\u{301}evil.example"]).destination == "\u{301}evil.example")
        #expect(makeJob(to: ["postmaster"]).destination == "")
    }
}
