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

    @Test func systemAccountsOrTheListOnly() throws {
        var settings = LocalSettings()
        settings.users = ["Virtual"]
        settings.accounts = .system
        let system = try LocalDeliveryService.users(settings, systemAccounts: { ["root", "daemon"] })
        #expect(system.lookup("ROOT") == "root")
        #expect(system.lookup("virtual") == "Virtual")
        settings.accounts = .listed
        let listed = try LocalDeliveryService.users(settings, systemAccounts: { ["root"] })
        #expect(listed.lookup("root") == nil)
        #expect(listed.lookup("virtual") == "Virtual")
        // The real account database is read when asked.
        settings.accounts = .system
        #expect(try LocalDeliveryService.users(settings).lookup("root") == "root")
    }

    /// A user database that fails half way (an LDAP backend going away) is
    /// an error, not a shorter list: mail to the missing accounts would
    /// bounce. With accounts = "listed" the database is not read at all.
    @Test func aFailingAccountDatabaseIsAnError() throws {
        let failure = TableFileError(file: "the system's user database (getpwent)", line: nil,
                                     message: "reading the account list failed after 2 accounts: Input/output error")
        var settings = LocalSettings()
        settings.accounts = .system
        #expect(throws: failure) {
            try LocalDeliveryService.users(settings, systemAccounts: { () throws(TableFileError) -> [String] in throw failure })
        }
        settings.accounts = .listed
        settings.users = ["alice"]
        let listed = try LocalDeliveryService.users(settings, systemAccounts: { () throws(TableFileError) -> [String] in throw failure })
        #expect(listed.lookup("alice") == "alice")
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
