import Testing
import SealpostConfig
@testable import LocalDelivery

@Suite struct ServiceTests {
    @Test func concurrencyFromTheEnvironment() throws {
        #expect(try LocalDeliveryService.concurrency(environment: nil) == LocalDeliveryService.defaultConcurrency)
        #expect(try LocalDeliveryService.concurrency(environment: "") == LocalDeliveryService.defaultConcurrency)
        #expect(try LocalDeliveryService.concurrency(environment: "8") == 8)
        for bad in ["0", "65", "-1", "four", "2.5"] {
            #expect(throws: LocalSetupError.self) { try LocalDeliveryService.concurrency(environment: bad) }
        }
    }

    @Test func systemAccountsOrTheListOnly() {
        var settings = LocalSettings()
        settings.users = ["Virtual"]
        settings.accounts = .system
        let system = LocalDeliveryService.users(settings, systemAccounts: { ["root", "daemon"] })
        #expect(system.lookup("ROOT") == "root")
        #expect(system.lookup("virtual") == "Virtual")
        settings.accounts = .listed
        let listed = LocalDeliveryService.users(settings, systemAccounts: { ["root"] })
        #expect(listed.lookup("root") == nil)
        #expect(listed.lookup("virtual") == "Virtual")
        // The real account database is read when asked.
        settings.accounts = .system
        #expect(LocalDeliveryService.users(settings).lookup("root") == "root")
    }

    @Test func resolverFromAConfigurationFile() throws {
        let dir = TemporaryDirectory()
        try dir.write("sealpost.toml", """
            [sealpost]
            data_directory = "data"
            [local]
            domains = ["Example.ORG", "localhost"]
            accounts = "listed"
            users = ["alice"]
            aliases = "my-aliases"
            """)
        try dir.write("my-aliases", "info: alice\nsales: partner@remote.test\n")
        let config = try SealpostConfiguration.load(path: dir.file("sealpost.toml"))
        let resolver = try LocalDeliveryService.makeResolver(config)
        #expect(try resolver.resolve("INFO@example.org") == [.mailbox(user: "alice", address: "alice@example.org")])
        #expect(try resolver.resolve("sales@localhost") == [.forward(address: "partner@remote.test")])
        #expect(throws: DeliveryError.unknownUser("root")) { try resolver.resolve("root@localhost") }

        try dir.write("my-aliases", "info: alice\nrun: |/bin/true\n")
        #expect {
            try LocalDeliveryService.makeResolver(config)
        } throws: { error in
            (error as? AliasError)?.description.hasPrefix(dir.file("my-aliases") + ":2: command targets") == true
        }
    }
}
