#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import SealpostConfig

@Suite struct ErrorLocationTests {
    @Test func descriptionFormat() {
        let error = ConfigError(file: "Config/sealpost.toml", line: 23, key: "queue.minimal_backoff_time",
                                message: "not a duration: \"5x\"")
        #expect(error.description == "Config/sealpost.toml:23: queue.minimal_backoff_time: not a duration: \"5x\"")
        #expect(ConfigError(file: "f.toml", message: "cannot open: No such file or directory").description
                == "f.toml: cannot open: No such file or directory")
        #expect(ConfigError(file: "f.toml", line: 3, message: "x").description == "f.toml:3: x")
    }

    @Test func notADuration() {
        expectError("""
            # comment
            [sealpost]
            hostname = "mx.example.org"

            [queue]
            maximal_queue_lifetime = "5d"
            minimal_backoff_time = "5x"
            """, line: 7, key: "queue.minimal_backoff_time", "not a duration: \"5x\"")
    }

    @Test func notASize() {
        expectError("[queue]\nmap_size = \"10MB\"\n", line: 2, key: "queue.map_size", "not a size: \"10MB\"")
    }

    @Test func syntaxErrorUsesTheParserPosition() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "[queue]\n\nminimal_backoff_time = 5x\n")
        do {
            _ = try SealpostConfiguration.load(path: file)
            Issue.record("a syntax error was accepted")
        } catch {
            #expect(error.line == 3)
            #expect(error.key == nil)
            #expect(error.description.hasPrefix(file + ":3: TOML syntax error at column "))
        }
    }

    @Test func unknownKeyInASection() {
        expectError("[sealpost]\nhostname = \"a.example\"\n\n[queue]\nhostname = \"b\"\n",
                    line: 5, key: "queue.hostname",
                    "unknown key (known in [queue]: maximal_queue_lifetime, bounce_queue_lifetime, minimal_backoff_time, maximal_backoff_time, queue_run_delay, delay_warning_time, message_size_limit, recipient_limit, map_size, map_size_limit, commit_delay, hold_incoming)")
    }

    @Test func unknownSection() {
        expectError("[sealpost]\npostmaster = \"root@localhost\"\n[quue]\nmap_size = 1\n",
                    line: 3, key: "quue", "unknown section (known: dns, local, queue, remote, sealpost, smtp, tls)")
    }

    @Test func earliestUnknownIsReported() {
        // TOMLKit's key order is not the file's; the first in the file wins.
        expectError("[zzz]\n[local]\nzzz = 1\n[aaa]\n", line: 1, key: "zzz",
                    "unknown section (known: dns, local, queue, remote, sealpost, smtp, tls)")
    }

    @Test func topLevelKeyIsUnknown() {
        expectError("hostname = \"x\"\n[sealpost]\n", line: 1, key: "hostname",
                    "unknown section (known: dns, local, queue, remote, sealpost, smtp, tls)")
    }

    @Test func sectionThatIsNotATable() {
        expectError("queue = 5\n", line: 1, key: "queue", "not a section: expected a table [queue], found an integer")
    }

    @Test func wrongTypes() {
        expectError("[queue]\nrecipient_limit = \"many\"\n", line: 2, key: "queue.recipient_limit",
                    "expected an integer, found a string")
        expectError("[sealpost]\nhostname = 1\n", line: 2, key: "sealpost.hostname", "expected a string, found an integer")
        expectError("[local]\ndomains = \"localhost\"\n", line: 2, key: "local.domains",
                    "expected an array of strings, found a string")
        expectError("[local]\nusers = [\"a\", 2]\n", line: 2, key: "local.users",
                    "element 2: expected a string, found an integer")
        expectError("[queue]\nqueue_run_delay = 1.5\n", line: 2, key: "queue.queue_run_delay",
                    "expected a duration (integer seconds or a string such as \"300s\"), found a float")
        expectError("[queue]\ncommit_delay = 1\n", line: 2, key: "queue.commit_delay",
                    "expected a duration with its unit (a string such as \"1ms\"), found an integer")
        expectError("[queue]\nmap_size = true\n", line: 2, key: "queue.map_size",
                    "expected a size (integer bytes or a string such as \"10MiB\"), found a boolean")
        expectError("[smtp]\nlisten = { a = 1 }\n", line: 2, key: "smtp.listen",
                    "expected an array of strings, found a table")
    }

    @Test func sameKeyNameInAnotherSectionPointsAtTheRightLine() {
        // "listen" is not a [local] key; the [smtp] one on line 2 is fine.
        expectError("[smtp]\nlisten = [\"127.0.0.1:25\"]\n[local]\nlisten = []\n",
                    line: 4, key: "local.listen",
                    "unknown key (known in [local]: domains, accounts, users, mailbox, aliases)")
    }

    @Test func dottedAndQuotedKeysAreLocated() {
        expectError("[sealpost]\nhostname = \"x.example\"\n\nqueue.map_size = \"x\"\n", line: 4,
                    key: "sealpost.queue", "unknown key (known in [sealpost]: data_directory, hostname, postmaster)")
        expectError("queue.map_size = \"1 MiB\"\n", line: 1, key: "queue.map_size", "not a size: \"1 MiB\"")
        expectError("[ queue ]\n\"map_size\" = \"x\"\n", line: 2, key: "queue.map_size", "not a size: \"x\"")
        expectError("[queue]\n  map_size   =   \"x\" # trailing comment\n", line: 2, key: "queue.map_size",
                    "not a size: \"x\"")
    }

    @Test func keyLikeTextInsideAMultiLineStringIsSkipped() {
        // [queue] is checked before [local], so the map_size error comes
        // first; the index must not take the text in the strings for keys.
        expectError("""
            [local]
            mailbox = \"\"\"
            [queue]
            map_size = 1
            \"\"\"
            aliases = '''
            [queue]
            map_size = 2'''
            [queue]
            map_size = "bad"
            """, line: 10, key: "queue.map_size", "not a size: \"bad\"")
    }

    @Test func semanticErrors() {
        expectError("[sealpost]\npostmaster = \"postmaster\"\n", line: 2, key: "sealpost.postmaster",
                    "not an address (local-part@domain): \"postmaster\"")
        expectError("[sealpost]\nhostname = \"mx..example\"\n", line: 2, key: "sealpost.hostname",
                    "not a host name: \"mx..example\"")
        expectError("[sealpost]\ndata_directory = \"\"\n", line: 2, key: "sealpost.data_directory", "must not be empty")
        expectError("[local]\ndomains = [\"localhost\", \"exa mple.org\"]\n", line: 2, key: "local.domains",
                    "not a domain: \"exa mple.org\"")
        expectError("[local]\naccounts = \"all\"\n", line: 2, key: "local.accounts",
                    "expected \"system\" or \"listed\", found \"all\"")
        expectError("[local]\nusers = [\"../root\"]\n", line: 2, key: "local.users",
                    "not a user name (letters, digits, \".\", \"_\", \"-\"; at most 32): \"../root\"")
        expectError("[local]\nmailbox = \"mail/Maildir\"\n", line: 2, key: "local.mailbox",
                    "must contain {user}: \"mail/Maildir\"")
        expectError("[local]\nmailbox = \"/var/mail/{user}\"\n", line: 2, key: "local.mailbox",
                    "must be relative to the data directory: \"/var/mail/{user}\"")
        expectError("[local]\nmailbox = \"../{user}\"\n", line: 2, key: "local.mailbox",
                    "must not contain \".\", \"..\" or empty components: \"../{user}\"")
        expectError("[local]\nmailbox = \"{user}/Maildir\"\n", line: 2, key: "local.mailbox",
                    "must start with a directory of its own (such as \"mail/\"), not with {user}: \"{user}/Maildir\"")
        for own in ["queue", "run", "log", "local", "tls", "supervise", "empty"] {
            expectError("[local]\nmailbox = \"\(own)/{user}/Maildir\"\n", line: 2, key: "local.mailbox",
                        "must not start with \"\(own)/\", a directory of the pipeline's own (empty, local, log, queue, run, supervise, tls): use a directory such as \"mail/\": \"\(own)/{user}/Maildir\"")
        }
        expectError("[local]\nmailbox = \"mail/{domain}/{user}\"\n", line: 2, key: "local.mailbox",
                    "unknown placeholder (only {user} is known): \"mail/{domain}/{user}\"")
        expectError("[local]\naliases = \"\"\n", line: 2, key: "local.aliases", "must not be empty")
        expectError("[queue]\nmaximal_queue_lifetime = -1\n", line: 2, key: "queue.maximal_queue_lifetime",
                    "must not be negative: -1")
        expectError("[queue]\nminimal_backoff_time = 0\n", line: 2, key: "queue.minimal_backoff_time",
                    "must be at least 1 second")
        expectError("[queue]\nminimal_backoff_time = \"2h\"\nmaximal_backoff_time = \"1h\"\n", line: 3,
                    key: "queue.maximal_backoff_time", "must not be less than minimal_backoff_time (7200s)")
        expectError("[queue]\nqueue_run_delay = 0\n", line: 2, key: "queue.queue_run_delay", "must be at least 1 second")
        expectError("[queue]\nmessage_size_limit = 0\n", line: 2, key: "queue.message_size_limit",
                    "must be at least 1 byte")
        expectError("[queue]\nrecipient_limit = 0\n", line: 2, key: "queue.recipient_limit", "must be at least 1")
        expectError("[queue]\nmap_size = \"1KiB\"\n", line: 2, key: "queue.map_size", "must be at least 1MiB")
        expectError("[queue]\nmap_size = \"2GiB\"\nmap_size_limit = \"1GiB\"\n", line: 3, key: "queue.map_size_limit",
                    "must not be less than map_size (2147483648 bytes)")
    }

    @Test func crossKeyRuleAgainstADefaultPointsAtTheGivenKey() {
        // maximal_backoff_time absent (default 4000s): the error is on the key written.
        expectError("[queue]\nminimal_backoff_time = \"2h\"\n", line: 2, key: "queue.minimal_backoff_time",
                    "must not be more than maximal_backoff_time (4000s)")
        expectError("[queue]\nmap_size = \"32GiB\"\n", line: 2, key: "queue.map_size",
                    "must not be more than map_size_limit (17179869184 bytes)")
    }

    @Test func listenerErrors() {
        expectError("[smtp]\nlisten = [\"127.0.0.1\"]\n", line: 2, key: "smtp.listen", "expected host:port: \"127.0.0.1\"")
        expectError("[smtp]\nsubmission = [\"::1:587\"]\n", line: 2, key: "smtp.submission",
                    "an IPv6 address needs brackets: [address]:port: \"::1:587\"")
        expectError("[smtp]\nsmtps = [\"[::1]:0\"]\n", line: 2, key: "smtp.smtps", "not a port (1-65535): \"0\": \"[::1]:0\"")
        expectError("[smtp]\nlisten = [\"127.0.0.1:25\"]\nsubmission = [\"127.0.0.1:25\"]\n", line: 3,
                    key: "smtp.submission", "\"127.0.0.1:25\" is already listed in smtp.listen")
        expectError("[smtp]\nlisten = [\"127.0.0.256:25\"]\n", line: 2, key: "smtp.listen",
                    "not an IPv4 address: \"127.0.0.256\": \"127.0.0.256:25\"")
    }

    @Test func missingFile() {
        let directory = TemporaryDirectory()
        let path = directory.path + "/absent.toml"
        #expect(throws: ConfigError(file: path, message: "cannot open: No such file or directory")) {
            try SealpostConfiguration.load(path: path)
        }
    }

    @Test func directoryIsNotAConfigFile() {
        let directory = TemporaryDirectory()
        #expect(throws: ConfigError(file: directory.path, message: "not a regular file")) {
            try SealpostConfiguration.load(path: directory.path)
        }
    }

    @Test func invalidUTF8IsRefusedWithItsLine() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "")
        let bytes: [UInt8] = Array("[sealpost]\n# caf".utf8) + [0xE9] + Array("\n".utf8)
        let descriptor = open(file, O_WRONLY | O_TRUNC)
        #expect(bytes.withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) } == bytes.count)
        close(descriptor)
        #expect(throws: ConfigError(file: file, line: 2, message: "not valid UTF-8")) {
            try SealpostConfiguration.load(path: file)
        }
    }

    @Test func syntaxErrorsCarryTheParsersMessage() {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "[queue]\nmap_size = 1\nmap_size = 2\n")
        #expect(throws: ConfigError(file: file, line: 3, message:
            "TOML syntax error at column 12: Error while parsing key-value pair: cannot redefine existing integer 'map_size'")) {
            try SealpostConfiguration.load(path: file)
        }
    }

    /// TOMLKit hands strings over as C strings: "127.0.0.1\u0000/8" would
    /// be read as "127.0.0.1". The escape is refused in every kind of basic
    /// string and key; the same text in a comment or a literal string
    /// (where it is not an escape) is not.
    @Test(arguments: [
        (#"[smtp]\#ntrusted_networks = ["127.0.0.1\u0000/8"]\#n"#, 2),
        (#"[smtp]\#n\#nrelay_domains = ["a.example", "b\U00000000.example"]\#n"#, 3),
        (#"hostname = """\#nmx\\\#nx\u0000"""\#n"#, 3),
        (#"[smtp]\#n"a\u0000b" = 1\#n"#, 2),
    ] as [(String, Int)])
    func nulEscapeIsRefusedWithItsLine(text: String, line: Int) {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", text)
        #expect(throws: ConfigError(file: file, line: line, message: "a string contains \\u0000 (NUL), which would cut it short")) {
            try SealpostConfiguration.load(path: file)
        }
    }

    @Test func nulEscapeTextOutsideBasicStringsIsNoEscape() {
        #expect(ConfigPath.nulEscapeLine(Array(#"# a comment about "\u0000"\#nhostname = 'mx\u0000'\#n"#.utf8)) == nil)
        #expect(ConfigPath.nulEscapeLine(Array(#"hostname = '''\#n\u0000'''\#nx = "\\u0000""#.utf8)) == nil)
        #expect(ConfigPath.nulEscapeLine(Array(#"a = "q\"\u0000""#.utf8)) == 1)
        #expect(ConfigPath.nulEscapeLine(Array(#"a = """x""""\#nb = "\u0000""#.utf8)) == 2)
    }

    @Test func nulByteIsRefusedWithItsLine() {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "[queue]\n\nmap_size = \"1\u{0}\"\n")
        #expect(throws: ConfigError(file: file, line: 3, message: "contains a NUL byte")) {
            try SealpostConfiguration.load(path: file)
        }
    }
}

