import Testing
import SealpostConfig
import StageProtocol
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

    /// glibc ends an enumeration quietly when a source is unavailable
    /// (sssd down): the names of the last table that the list left out are
    /// looked up one by one; found ones stay, gone ones go, and those a
    /// source could not answer for are kept with a warning. After three
    /// unavailable answers in a row the rest are kept without asking.
    @Test func accountsMissingFromTheEnumerationAreLookedUpByName() throws {
        var settings = LocalSettings()
        settings.accounts = .system
        settings.users = ["listed"]
        let previous = LocalRecipientTable(names: ["root", "alice", "bob", "carol", "dave", "erin", "frank",
                                                   "gina", "info", "listed"])
        let answers: [String: AccountLookup] = [
            "alice": .found("Alice"), "bob": .notFound, "carol": .unavailable("Connection refused"),
            "dave": .notFound, "erin": .unavailable("Connection refused"),
            "frank": .unavailable("Connection refused"), "gina": .unavailable("Connection refused"),
        ]
        let asked = Box<[String]>([])
        let warnings = Box<[String]>([])
        let infos = Box<[String]>([])
        let log = DeliveryLog(info: { infos.value.append($0) }, warning: { warnings.value.append($0) })
        let users = try LocalDeliveryService.users(settings, previous: previous, otherNames: ["info"], log: log,
                                                   systemAccounts: { ["root"] },
                                                   lookUpAccount: { asked.value.append($0); return answers[$0]! })
        // Neither root (listed), nor listed (configured), nor info (an alias) is asked.
        #expect(asked.value == ["alice", "bob", "carol", "dave", "erin", "frank", "gina"])
        #expect(users.lookup("alice") == "Alice")
        #expect(users.lookup("bob") == nil && users.lookup("dave") == nil)
        for kept in ["carol", "erin", "frank", "gina"] { #expect(users.lookup(kept) == kept) }
        #expect(users.lookup("info") == nil)
        #expect(infos.value == ["names of the last recipient table that are neither accounts nor aliases now: bob, dave"])
        #expect(warnings.value == ["the user database no longer lists 4 account(s) of the last recipient table"
            + " and cannot say whether they exist (getpwnam: Connection refused): kept until it can: carol, erin, frank, gina"])

        // Three unavailable answers in a row: the source is down, the rest
        // are kept without a question each.
        asked.value = []
        let down = try LocalDeliveryService.users(settings, previous: previous, log: .discard,
                                                  systemAccounts: { ["root"] },
                                                  lookUpAccount: { asked.value.append($0); return .unavailable("Timed out") })
        #expect(asked.value == ["alice", "bob", "carol"])
        for name in ["alice", "bob", "carol", "dave", "info"] { #expect(down.lookup(name) == name) }

        // No last table, or accounts = "listed": nothing is looked up.
        asked.value = []
        _ = try LocalDeliveryService.users(settings, previous: nil, systemAccounts: { ["root"] },
                                           lookUpAccount: { asked.value.append($0); return .notFound })
        settings.accounts = .listed
        let listed = try LocalDeliveryService.users(settings, previous: previous, systemAccounts: { ["root"] },
                                                    lookUpAccount: { asked.value.append($0); return .notFound })
        #expect(asked.value.isEmpty)
        #expect(listed.lookup("root") == nil)
    }

    /// The real user database, by name: root is there, a made-up name is in
    /// no source (not "unavailable": on a host where it were, removed
    /// accounts would be kept for good).
    @Test func lookingUpAnAccountByName() {
        #expect(LocalUsers.lookUpAccount("root") == .found("root"))
        #expect(LocalUsers.lookUpAccount("no-such-account-sealpost-9q") == .notFound)
    }

    /// The table the last instance wrote is read back by makeResolver: an
    /// account it named that the system has no more is dropped, the others
    /// stay as the system lists them.
    @Test func resolverChecksTheLastPublishedTable() throws {
        let dir = TemporaryDirectory()
        try dir.write("sealpost.toml", """
            [sealpost]
            data_directory = "data"
            [local]
            accounts = "system"
            aliases = "my-aliases"
            """)
        try dir.write("my-aliases", "info: root\n")
        let config = try SealpostConfiguration.load(path: dir.file("sealpost.toml"))
        try dir.makeDirectory("data/local")
        try LocalRecipientTable(names: ["root", "info", "no-such-account-sealpost-9q"]).write(to: config.localRecipientTable)
        let infos = Box<[String]>([])
        let resolver = try LocalDeliveryService.makeResolver(config, log: DeliveryLog(info: { infos.value.append($0) }, warning: { _ in }))
        #expect(resolver.users.lookup("root") == "root")
        #expect(resolver.users.lookup("no-such-account-sealpost-9q") == nil)
        #expect(infos.value == ["names of the last recipient table that are neither accounts nor aliases now: no-such-account-sealpost-9q"])
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
