#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import SealpostConfig

@Suite struct DurationTests {
    @Test(arguments: [
        ("0", 0), ("300", 300), ("300s", 300), ("90m", 5400), ("4h", 14_400), ("5d", 432_000),
        ("2w", 1_209_600), ("007s", 7), ("4000s", 4000),
    ])
    func accepted(_ text: String, _ seconds: Int) {
        #expect(ConfigValues.parseDuration(text) == seconds)
    }

    @Test(arguments: [
        "", "s", "5x", "5 s", " 5s", "5s ", "-5s", "+5s", "5S", "5H", "1.5h", "5sec", "5ms", "5ss",
        "5d3h", "0x10", "99999999999999999999", "9223372036854775807d", "٣s",
    ])
    func rejected(_ text: String) {
        #expect(ConfigValues.parseDuration(text) == nil)
    }

    @Test func integerAndStringFormsInTheFile() throws {
        let config = try load("[queue]\nminimal_backoff_time = 60\nmaximal_backoff_time = \"2h\"\ndelay_warning_time = 0\n")
        #expect(config.queue.minimalBackoffTime == 60)
        #expect(config.queue.maximalBackoffTime == 7200)
        #expect(config.queue.delayWarningTime == 0)
    }
}

@Suite struct MillisecondsTests {
    @Test(arguments: [("0ms", 0), ("1ms", 1), ("100ms", 100), ("2s", 2000), ("0s", 0), ("007ms", 7)])
    func accepted(_ text: String, _ milliseconds: Int) {
        #expect(ConfigValues.parseMilliseconds(text) == milliseconds)
    }

    @Test(arguments: ["", "1", "ms", "1 ms", "1MS", "1.5ms", "-1ms", "1m", "1us", "1mss", "99999999999999999999ms",
                      "9223372036854775807s"])
    func rejected(_ text: String) {
        #expect(ConfigValues.parseMilliseconds(text) == nil)
    }

    @Test func holdIncomingInTheFile() throws {
        #expect(try load("[queue]\n").queue.holdIncoming == false)
        #expect(try load("[queue]\nhold_incoming = true\n").queue.holdIncoming == true)
        expectError("[queue]\nhold_incoming = \"yes\"\n", line: 2, key: "queue.hold_incoming",
                    "expected a boolean (true or false), found a string")
    }

    @Test func commitDelayInTheFile() throws {
        #expect(try load("[queue]\ncommit_delay = \"0ms\"\n").queue.commitDelayMilliseconds == 0)
        #expect(try load("[queue]\ncommit_delay = \"100ms\"\n").queue.commitDelayMilliseconds == 100)
        expectError("[queue]\ncommit_delay = \"101ms\"\n", line: 2, key: "queue.commit_delay", "must be at most 100ms")
        expectError("[queue]\ncommit_delay = \"1s\"\n", line: 2, key: "queue.commit_delay", "must be at most 100ms")
        expectError("[queue]\ncommit_delay = \"1\"\n", line: 2, key: "queue.commit_delay",
                    "not a duration in ms or s: \"1\"")
    }
}

@Suite struct SizeTests {
    @Test(arguments: [
        ("0", 0), ("1000", 1000), ("64KiB", 65_536), ("10MiB", 10_485_760), ("1GiB", 1_073_741_824),
        ("16GiB", 17_179_869_184), ("2TiB", 2_199_023_255_552),
    ])
    func accepted(_ text: String, _ bytes: Int) {
        #expect(ConfigValues.parseSize(text) == bytes)
    }

    @Test(arguments: [
        "", "KiB", "10MB", "10mb", "10kib", "10K", "10k", "10 MiB", "1.5GiB", "-1", "+1", "10B",
        "1000 ", "99999999999TiB", "10MiBs",
    ])
    func rejected(_ text: String) {
        #expect(ConfigValues.parseSize(text) == nil)
    }

    @Test func integerAndStringFormsInTheFile() throws {
        let config = try load("[queue]\nmessage_size_limit = \"50MiB\"\nmap_size = 1048576\nmap_size_limit = \"1GiB\"\n")
        #expect(config.queue.messageSizeLimit == 52_428_800)
        #expect(config.queue.mapSize == 1_048_576)
        #expect(config.queue.mapSizeLimit == 1_073_741_824)
    }
}

@Suite struct SyntaxTests {
    @Test(arguments: ["localhost", "example.org", "mx-1.example.org", "xn--bcher-kva.example", "a.b.c.d.e", "1example.com"])
    func validDomains(_ domain: String) {
        #expect(ConfigValues.isValidDomain(domain))
    }

    @Test(arguments: ["", ".", "example.org.", ".example.org", "a..b", "-a.example", "a-.example", "ex_ample.org",
                      "exa mple.org", "bücher.example", "10.0.0.1", "[127.0.0.1]", String(repeating: "a", count: 64) + ".org"])
    func invalidDomains(_ domain: String) {
        #expect(!ConfigValues.isValidDomain(domain))
    }

    @Test(arguments: ["postmaster@localhost", "a.b+c@example.org", "\"john doe\"@example.org", "δοκιμή@example.org",
                      "a@b@example.org"])
    func validAddresses(_ address: String) {
        // The last one is invalid as a dot-atom: "a@b" is not atext.
        #expect(ConfigValues.isValidAddress(address) == (address != "a@b@example.org"))
    }

    @Test(arguments: ["postmaster", "@example.org", "a@", "a.@example.org", ".a@example.org", "a..b@example.org",
                      "a b@example.org", "\"a\"b\"@example.org", String(repeating: "a", count: 65) + "@example.org"])
    func invalidAddresses(_ address: String) {
        #expect(!ConfigValues.isValidAddress(address))
    }

    @Test(arguments: ["127.0.0.1:25", "0.0.0.0:2525", "[::1]:587", "[::]:465",
                      "[2001:db8::1]:65535"])
    func validListeners(_ listener: String) {
        #expect(ConfigValues.listenerError(listener) == nil)
    }

    @Test(arguments: ["", "127.0.0.1", ":25", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:+25",
                      "127.0.0.1:25x", "::1:25", "[::1]25", "[::1", "[127.0.0.1]:25", "1.2.3:25", "bad_host:25",
                      "127.0.0.1:000025", " 127.0.0.1:25", "localhost:25", "mx.example.org:1"])
    func invalidListeners(_ listener: String) {
        #expect(ConfigValues.listenerError(listener) != nil)
    }

    @Test func aHostNameIsNoListener() {
        #expect(ConfigValues.listenerError("localhost:2525")
                == "not an IP address: \"localhost\" (a name may stand for several addresses; list each, e.g. \"127.0.0.1:2525\" and \"[::1]:2525\")")
    }
}

@Suite struct LoadingTests {
    @Test func emptyFileGivesTheDefaults() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("etc/sealpost.toml", "")
        let config = try SealpostConfiguration.load(path: file)
        #expect(config.dataDirectory == directory.path + "/var")
        #expect(config.local.aliasesFile == directory.path + "/etc/aliases")
        #expect(config.queue == QueueSettings())
        var smtp = SMTPSettings()
        smtp.authUsersFile = directory.path + "/etc/users"
        #expect(config.smtp == smtp)
        #expect(config.local.domains == ["localhost"])
        #expect(config.postmaster == "postmaster@localhost")
    }

    @Test func relativePathsResolveAgainstTheFilesDirectory() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("conf/sealpost.toml", """
            [sealpost]
            data_directory = "./data/../spool//x/"
            [local]
            aliases = "../shared/aliases"
            """)
        let config = try SealpostConfiguration.load(path: file)
        #expect(config.file == file)
        #expect(config.dataDirectory == directory.path + "/conf/spool/x")
        #expect(config.injectSocket == directory.path + "/conf/spool/x/run/inject")
        #expect(config.spoolDirectory == directory.path + "/conf/spool/x/queue")
        #expect(config.local.aliasesFile == directory.path + "/shared/aliases")
    }

    @Test func absolutePathsAreKept() throws {
        let config = try load("[sealpost]\ndata_directory = \"/srv/mail\"\n[local]\naliases = \"/etc/aliases\"\n")
        #expect(config.dataDirectory == "/srv/mail")
        #expect(config.controlSocket == "/srv/mail/run/control")
        #expect(config.logDirectory == "/srv/mail/log")
        #expect(config.local.aliasesFile == "/etc/aliases")
    }

    @Test func relativeFileNameIsMadeAbsoluteButErrorsKeepItAsGiven() throws {
        let directory = TemporaryDirectory()
        directory.write("sealpost.toml", "[queue]\nmap_size = \"x\"\n")
        // A relative name for the file, without chdir (process-wide).
        let depth = ConfigPath.currentDirectory().split(separator: "/").count
        let relative = String(repeating: "../", count: depth) + directory.path.dropFirst() + "/sealpost.toml"
        #expect(throws: ConfigError(file: relative, line: 2, key: "queue.map_size", message: "not a size: \"x\"")) {
            try SealpostConfiguration.load(path: relative)
        }
        let config = try SealpostConfiguration.parse(text: "", file: relative)
        #expect(config.file == directory.path + "/sealpost.toml")
        #expect(config.dataDirectory == ConfigPath.normalize(directory.path + "/../var"))
    }

    @Test func namesAreNormalised() throws {
        let config = try load("""
            [sealpost]
            hostname = "MX.Example.ORG"
            postmaster = "Hostmaster@Example.ORG"
            [local]
            domains = ["Example.ORG", "example.org", "LOCALHOST.", "$hostname"]
            accounts = "listed"
            users = ["alice", "bob.smith", "alice"]
            mailbox = "Maildirs/{user}"
            """)
        #expect(config.hostname == "mx.example.org")
        #expect(config.postmaster == "Hostmaster@example.org")   // local part is case-sensitive
        #expect(config.local.domains == ["example.org", "localhost", "mx.example.org"])
        #expect(config.local.accounts == .listed)
        #expect(config.local.users == ["alice", "bob.smith"])
        #expect(config.local.mailbox == "Maildirs/{user}")
        #expect(config.local.isLocal(domain: "EXAMPLE.org."))
        #expect(!config.local.isLocal(domain: "sub.example.org"))
    }

    @Test func emptyHostnameIsTheSystemName() throws {
        var buffer = [CChar](repeating: 0, count: 256)
        #expect(gethostname(&buffer, 255) == 0)
        let system = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }.lowercased()
        let config = try load("[sealpost]\nhostname = \"\"\n")
        #expect(config.hostname == (system.isEmpty ? "localhost" : system))
    }

    @Test func listenersCanBeDisabledAndListed() throws {
        let config = try load("[smtp]\nlisten = [\"0.0.0.0:25\", \"[::]:25\"]\nsubmission = []\n")
        #expect(config.smtp.listen == ["0.0.0.0:25", "[::]:25"])
        #expect(config.smtp.submission == [])
        #expect(config.smtp.smtps == ["127.0.0.1:2465"])
    }

    @Test func socketPathTooLongForSunPath() {
        let long = "/" + String(repeating: "d", count: 100)
        expectError("[sealpost]\ndata_directory = \"\(long)\"\n", line: 2, key: "sealpost.data_directory",
                    "too long: the socket \(long)/run/deliver exceeds 107 bytes, the limit of a Unix socket path")
        // run/inject fits in 107 bytes, run/deliver (a byte longer) not.
        let edge = "/" + String(repeating: "d", count: 95)
        expectError("[sealpost]\ndata_directory = \"\(edge)\"\n", line: 2, key: "sealpost.data_directory",
                    "too long: the socket \(edge)/run/deliver exceeds 107 bytes, the limit of a Unix socket path")
    }
}

// Serialized: two tests read SEALPOST_CONFIG, one sets it.
@Suite(.serialized) struct LocateTests {
    @Test func environmentWins() {
        #expect(SealpostConfiguration.locate(environment: "/x/y.toml", executable: "/a/b/c") == "/x/y.toml")
    }

    @Test func emptyEnvironmentIsUnset() {
        #expect(SealpostConfiguration.locate(environment: "", executable: nil) == "/etc/sealpost/sealpost.toml")
    }

    @Test func walksUpFromTheExecutableToACheckout() {
        let directory = TemporaryDirectory()
        let config = directory.write("checkout/Config/sealpost.toml", "")
        directory.write("checkout/Package.swift", "")
        directory.write("checkout/.build/x86_64-unknown-linux-gnu/release/queue", "")
        let executable = directory.path + "/checkout/.build/x86_64-unknown-linux-gnu/release/queue"
        #expect(SealpostConfiguration.locate(environment: nil, executable: executable) == config)
    }

    @Test func aConfigDirectoryWithoutPackageSwiftIsNotACheckout() {
        let directory = TemporaryDirectory()
        directory.write("opt/Config/sealpost.toml", "")
        directory.write("opt/bin/queue", "")
        #expect(SealpostConfiguration.locate(environment: nil, executable: directory.path + "/opt/bin/queue")
                == "/etc/sealpost/sealpost.toml")
    }

    @Test func realLocateFindsThisCheckout() {
        // The test binary lives in <checkout>/.build/...; SEALPOST_CONFIG may
        // be set by whoever runs the tests, and then it wins.
        if let environment = getenv("SEALPOST_CONFIG").map({ String(cString: $0) }), !environment.isEmpty {
            #expect(SealpostConfiguration.locate() == environment)
        } else {
            #expect(SealpostConfiguration.locate() == checkoutConfig)
        }
    }

    @Test func realLocateHonoursSealpostConfig() {
        // setenv is process-wide: set it to a name of the file locate()
        // finds anyway, so that concurrent readers are unaffected.
        let saved = getenv("SEALPOST_CONFIG").map { String(cString: $0) }
        let equivalent = checkoutRoot + "/Config/./sealpost.toml"
        setenv("SEALPOST_CONFIG", equivalent, 1)
        defer {
            if let saved { setenv("SEALPOST_CONFIG", saved, 1) } else { unsetenv("SEALPOST_CONFIG") }
        }
        #expect(SealpostConfiguration.locate() == equivalent)
    }
}

/// inet_pton reads C strings: an address with a NUL byte is no address
/// (it would have been read up to the NUL).
@Suite struct AddressTextTests {
    @Test func aNULByteMakesNoAddress() {
        #expect(ConfigValues.isIPv4("127.0.0.1"))
        #expect(!ConfigValues.isIPv4("127.0.0.1\u{0}/8"))
        #expect(ConfigValues.isIPv6("::1"))
        #expect(!ConfigValues.isIPv6("::1\u{0}x"))
        #expect(ConfigValues.networkError("127.0.0.0/8") == nil)
        #expect(ConfigValues.networkError("127.0.0.0\u{0}/8") == "not an IP address or network (address/length)")
        #expect(ConfigValues.networkError("[::1\u{0}]") == "not an IP address or network (address/length)")
    }
}
