import TOMLKit

/// One pass over a parsed document: type checks, value syntax, cross-key
/// rules. Every error goes through `error(_:_:_:)`, which places it on the
/// line of the key.
struct ConfigParser {
    let text: String
    /// As given: error messages use it.
    let file: String
    /// Absolute: relative paths resolve against its directory.
    let absoluteFile: String
    /// Built only for an error message: a valid file (every run of
    /// queue-inject reads it) never pays for the scan.
    var index: SourceIndex { SourceIndex(text: text) }

    /// The schema: sections and their keys.
    static let schema: [String: [String]] = [
        "sealpost": ["data_directory", "hostname", "postmaster"],
        "queue": ["maximal_queue_lifetime", "bounce_queue_lifetime", "minimal_backoff_time",
                  "maximal_backoff_time", "queue_run_delay", "delay_warning_time",
                  "message_size_limit", "recipient_limit", "map_size", "map_size_limit", "commit_delay",
                  "hold_incoming"],
        "local": ["domains", "accounts", "users", "mailbox", "aliases"],
        "smtp": ["listen", "submission", "smtps", "relay_domains", "trusted_networks", "command_line_limit",
                 "text_line_limit", "error_limit", "junk_command_limit", "client_connection_limit",
                 "client_ipv6_prefix_length", "session_limit", "command_timeout", "data_timeout",
                 "queue_reply_timeout", "queue_restart_wait", "auth_users", "sender_login_match", "event_loops",
                 "client_name_lookup", "reject_unknown_local_recipients"],
        "tls": ConfigParser.tlsKeys,
        "dns": dnsKeys,
        "remote": remoteKeys,
    ]

    /// sun_path of struct sockaddr_un holds 108 bytes with the NUL.
    static let maximumSocketPath = 107

    init(text: String, file: String) {
        self.text = text
        self.file = file
        self.absoluteFile = ConfigPath.absolute(file)
    }

    func error(_ section: String, _ key: String?, _ message: String) -> ConfigError {
        // A nested section ("tls.certificates.0") is a path of its own.
        let path = section.split(separator: ".").map(String.init) + (key.map { [$0] } ?? [])
        return ConfigError(file: file, line: index.line(of: path),
                           key: path.joined(separator: "."), message: message)
    }

    func parse() throws(ConfigError) -> SealpostConfiguration {
        let root: TOMLTable
        do {
            root = try TOMLTable(string: text)
        } catch let syntax as TOMLParseError {
            let begin = syntax.source.begin
            throw ConfigError(file: file, line: begin.line > 0 ? begin.line : nil,
                              message: "TOML syntax error at column \(begin.column): \(syntax.description)")
        } catch {
            throw ConfigError(file: file, message: "TOML syntax error: \(error)")
        }

        // Unknown sections first, the earliest in the file reported.
        var unknown: [(line: Int, error: ConfigError)] = []
        for name in root.keys {
            guard let keys = Self.schema[name] else {
                let error = ConfigError(file: file, line: index.line(of: [name]), key: name,
                                        message: "unknown section (known: \(Self.schema.keys.sorted().joined(separator: ", ")))")
                unknown.append((error.line ?? Int.max, error))
                continue
            }
            guard let table = root[name]?.table else {
                throw error(name, nil, "not a section: expected a table [\(name)], found \(Self.describe(root[name]!.type))")
            }
            for key in table.keys where !keys.contains(key) {
                let error = self.error(name, key, "unknown key (known in [\(name)]: \(keys.joined(separator: ", ")))")
                unknown.append((error.line ?? Int.max, error))
            }
        }
        if let first = unknown.min(by: { $0.line < $1.line }) { throw first.error }

        var configuration = SealpostConfiguration(file: absoluteFile)
        let directory = ConfigPath.directory(of: absoluteFile)

        // [sealpost]
        let sealpost = Section(parser: self, name: "sealpost", table: root["sealpost"]?.table)
        if let path = try sealpost.string("data_directory") {
            guard !path.isEmpty else { throw sealpost.error("data_directory", "must not be empty") }
            configuration.dataDirectory = ConfigPath.resolve(path, relativeTo: directory)
        }
        configuration.deriveDataPaths()
        // The longest of the sockets under run/ (deliver and control are a
        // byte longer than inject).
        let longest = [configuration.injectSocket, configuration.deliverSocket, configuration.controlSocket, configuration.tlsSocket]
            .max { $0.utf8.count < $1.utf8.count }!
        if longest.utf8.count > Self.maximumSocketPath {
            throw sealpost.error("data_directory",
                                 "too long: the socket \(longest) exceeds \(Self.maximumSocketPath) bytes, the limit of a Unix socket path")
        }
        if let hostname = try sealpost.string("hostname"), !hostname.isEmpty {
            let name = hostname.lowercased()
            guard ConfigValues.isValidDomain(name) else {
                throw sealpost.error("hostname", "not a host name: \(Self.quote(hostname))")
            }
            configuration.hostname = name
        }
        if let postmaster = try sealpost.string("postmaster") {
            guard ConfigValues.isValidAddress(postmaster) else {
                throw sealpost.error("postmaster", "not an address (local-part@domain): \(Self.quote(postmaster))")
            }
            configuration.postmaster = Self.lowerCasingDomain(postmaster)
        }

        // [queue]
        let queue = Section(parser: self, name: "queue", table: root["queue"]?.table)
        var settings = QueueSettings()
        try queue.duration("maximal_queue_lifetime", into: &settings.maximalQueueLifetime)
        try queue.duration("bounce_queue_lifetime", into: &settings.bounceQueueLifetime)
        try queue.duration("minimal_backoff_time", into: &settings.minimalBackoffTime)
        try queue.duration("maximal_backoff_time", into: &settings.maximalBackoffTime)
        try queue.duration("queue_run_delay", into: &settings.queueRunDelay)
        try queue.duration("delay_warning_time", into: &settings.delayWarningTime)
        try queue.size("message_size_limit", into: &settings.messageSizeLimit)
        if let limit = try queue.integer("recipient_limit") { settings.recipientLimit = limit }
        try queue.size("map_size", into: &settings.mapSize)
        try queue.size("map_size_limit", into: &settings.mapSizeLimit)
        try queue.milliseconds("commit_delay", into: &settings.commitDelayMilliseconds)
        if let hold = try queue.boolean("hold_incoming") { settings.holdIncoming = hold }
        // Cross-key rules: a zero backoff or run delay would spin the queue.
        if settings.minimalBackoffTime < 1 { throw queue.error("minimal_backoff_time", "must be at least 1 second") }
        // A pair in conflict is blamed on a key that is written in the file.
        if settings.maximalBackoffTime < settings.minimalBackoffTime {
            if queue.contains("maximal_backoff_time") {
                throw queue.error("maximal_backoff_time", "must not be less than minimal_backoff_time (\(settings.minimalBackoffTime)s)")
            }
            throw queue.error("minimal_backoff_time", "must not be more than maximal_backoff_time (\(settings.maximalBackoffTime)s)")
        }
        if settings.queueRunDelay < 1 { throw queue.error("queue_run_delay", "must be at least 1 second") }
        if settings.messageSizeLimit < 1 { throw queue.error("message_size_limit", "must be at least 1 byte") }
        if settings.recipientLimit < 1 { throw queue.error("recipient_limit", "must be at least 1") }
        if settings.mapSize < 1 << 20 { throw queue.error("map_size", "must be at least 1MiB") }
        if settings.mapSizeLimit < settings.mapSize {
            if queue.contains("map_size_limit") {
                throw queue.error("map_size_limit", "must not be less than map_size (\(settings.mapSize) bytes)")
            }
            throw queue.error("map_size", "must not be more than map_size_limit (\(settings.mapSizeLimit) bytes)")
        }
        // Every urgent commit may wait this long under load: beyond a
        // tenth of a second it only slows every reply.
        if settings.commitDelayMilliseconds > QueueSettings.maximumCommitDelayMilliseconds {
            throw queue.error("commit_delay", "must be at most \(QueueSettings.maximumCommitDelayMilliseconds)ms")
        }
        configuration.queue = settings

        // [local]
        let local = Section(parser: self, name: "local", table: root["local"]?.table)
        if let domains = try local.strings("domains") {
            var seen: [String] = []
            for domain in domains {
                // "$hostname" stands for this host's name, as Postfix's
                // mydestination default names $myhostname: mail to
                // login@host (queue-inject's default sender) stays local.
                var name = domain == "$hostname" ? configuration.hostname : domain.lowercased()
                if name.hasSuffix(".") && name.count > 1 { name.removeLast() }
                guard ConfigValues.isValidDomain(name) else {
                    throw local.error("domains", "not a domain: \(Self.quote(domain))")
                }
                if !seen.contains(name) { seen.append(name) }
            }
            configuration.local.domains = seen
        }
        if let accounts = try local.string("accounts") {
            guard let value = LocalSettings.Accounts(rawValue: accounts) else {
                throw local.error("accounts", "expected \"system\" or \"listed\", found \(Self.quote(accounts))")
            }
            configuration.local.accounts = value
        }
        if let users = try local.strings("users") {
            var seen: [String] = []
            for user in users {
                guard Self.isValidUserName(user) else {
                    throw local.error("users", "not a user name (letters, digits, \".\", \"_\", \"-\"; at most 32): \(Self.quote(user))")
                }
                if !seen.contains(user) { seen.append(user) }
            }
            configuration.local.users = seen
        }
        if let mailbox = try local.string("mailbox") {
            if let problem = Self.mailboxProblem(mailbox) {
                throw local.error("mailbox", "\(problem): \(Self.quote(mailbox))")
            }
            configuration.local.mailbox = mailbox
        }
        if let aliases = try local.string("aliases") {
            guard !aliases.isEmpty else { throw local.error("aliases", "must not be empty") }
            configuration.local.aliasesFile = ConfigPath.resolve(aliases, relativeTo: directory)
        }

        // [smtp]
        let smtp = Section(parser: self, name: "smtp", table: root["smtp"]?.table)
        var listeners: [String: String] = [:]   // address -> key, to catch one listed twice
        for key in ["listen", "submission", "smtps"] {
            var addresses: [String]
            switch key {
            case "listen": addresses = configuration.smtp.listen
            case "submission": addresses = configuration.smtp.submission
            default: addresses = configuration.smtp.smtps
            }
            if let given = try smtp.strings(key) { addresses = given }
            for address in addresses {
                if let problem = ConfigValues.listenerError(address) {
                    throw smtp.error(key, "\(problem): \(Self.quote(address))")
                }
                let normalized = address.lowercased()
                if let other = listeners[normalized] {
                    throw smtp.error(key, "\(Self.quote(address)) is already listed in smtp.\(other)")
                }
                listeners[normalized] = key
            }
            switch key {
            case "listen": configuration.smtp.listen = addresses
            case "submission": configuration.smtp.submission = addresses
            default: configuration.smtp.smtps = addresses
            }
        }
        try parseSMTPPolicy(smtp, directory: directory, into: &configuration.smtp)

        // [tls] (TLSSettings.swift)
        try parseTLS(root["tls"]?.table, into: &configuration)

        // [dns], [remote]
        try parseRemoteSections(root, into: &configuration)
        return configuration
    }

    // MARK: - Value rules

    /// Unix user names as they can appear in a path: no "/" or "..", no
    /// leading "-" or "." (a hidden or option-like directory), at most 32.
    static func isValidUserName(_ name: String) -> Bool {
        guard (1...32).contains(name.utf8.count),
              name.utf8.first != UInt8(ascii: "-"), name.utf8.first != UInt8(ascii: ".")
        else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
    }

    /// The mailbox template must stay inside the data directory (the
    /// delivery agent may run chrooted there) and name each user's own
    /// directory.
    static func mailboxProblem(_ template: String) -> String? {
        if template.isEmpty { return "must not be empty" }
        if !template.contains("{user}") { return "must contain {user}" }
        if template.hasPrefix("/") { return "must be relative to the data directory" }
        let parts = template.split(separator: "/", omittingEmptySubsequences: false)
        if parts.contains(where: { $0 == ".." || $0 == "." || $0.isEmpty }) {
            return "must not contain \".\", \"..\" or empty components"
        }
        if template.replacing("{user}", with: "").contains(where: { $0 == "{" || $0 == "}" }) {
            return "unknown placeholder (only {user} is known)"
        }
        // The data directory holds the pipeline's own directories (queue,
        // run, local, log, tls): a user of such a name must not get a
        // Maildir among them, and local-deliver, run as root, cannot
        // create directories in the data directory itself.
        if parts.first?.contains("{user}") == true {
            return "must start with a directory of its own (such as \"mail/\"), not with {user}"
        }
        // Nor with one of those directories: the supervisor gives the mail
        // directory (the first component) to local-deliver's user, 0700,
        // which would take the spool from the queue, the sockets from the
        // stages, or the log (and its name) from root.
        if let first = parts.first, SealpostConfiguration.dataLayoutNames.contains(String(first)) {
            return "must not start with \"\(first)/\", a directory of the pipeline's own (\(SealpostConfiguration.dataLayoutNames.sorted().joined(separator: ", "))): use a directory such as \"mail/\""
        }
        if template.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) {
            return "contains a control character"
        }
        return nil
    }

    static func lowerCasingDomain(_ address: String) -> String {
        guard let at = address.lastIndex(of: "@") else { return address }
        return String(address[...at]) + address[address.index(after: at)...].lowercased()
    }

    static func quote(_ text: String) -> String {
        var quoted = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": quoted += "\\\""
            case "\\": quoted += "\\\\"
            case _ where scalar.value < 0x20 || scalar.value == 0x7f:
                quoted += "\\u{\(String(scalar.value, radix: 16))}"
            default: quoted.unicodeScalars.append(scalar)
            }
        }
        return quoted + "\""
    }

    static func describe(_ type: TOMLType) -> String {
        switch type {
        case .table: return "a table"
        case .array: return "an array"
        case .string: return "a string"
        case .int: return "an integer"
        case .double: return "a float"
        case .bool: return "a boolean"
        case .date: return "a date"
        case .time: return "a time"
        case .dateTime: return "a date-time"
        }
    }

    /// A human rendering of a scalar value for "not a duration: 5.5" errors.
    static func render(_ value: TOMLValueConvertible) -> String {
        if let string = value.string { return quote(string) }
        if let int = value.int { return String(int) }
        return value.debugDescription
    }
}

/// Typed access to the keys of one section; absent keys read as nil.
struct Section {
    let parser: ConfigParser
    let name: String
    let table: TOMLTable?

    func error(_ key: String, _ message: String) -> ConfigError {
        parser.error(name, key, message)
    }

    private func value(_ key: String) -> TOMLValueConvertible? { table?[key] }

    func contains(_ key: String) -> Bool { table?[key] != nil }

    private func wrongType(_ key: String, _ expected: String, _ value: TOMLValueConvertible) -> ConfigError {
        error(key, "expected \(expected), found \(ConfigParser.describe(value.type))")
    }

    func string(_ key: String) throws(ConfigError) -> String? {
        guard let value = value(key) else { return nil }
        guard let string = value.string else { throw wrongType(key, "a string", value) }
        return string
    }

    func integer(_ key: String) throws(ConfigError) -> Int? {
        guard let value = value(key) else { return nil }
        guard let int = value.int else { throw wrongType(key, "an integer", value) }
        return int
    }

    func boolean(_ key: String) throws(ConfigError) -> Bool? {
        guard let value = value(key) else { return nil }
        guard let bool = value.bool else { throw wrongType(key, "a boolean (true or false)", value) }
        return bool
    }

    func strings(_ key: String) throws(ConfigError) -> [String]? {
        guard let value = value(key) else { return nil }
        guard let array = value.array else { throw wrongType(key, "an array of strings", value) }
        var strings: [String] = []
        for (position, element) in array.enumerated() {
            guard let string = element.string else {
                throw error(key, "element \(position + 1): expected a string, found \(ConfigParser.describe(element.type))")
            }
            strings.append(string)
        }
        return strings
    }

    /// Integer seconds or a duration string.
    func duration(_ key: String, into target: inout Int) throws(ConfigError) {
        guard let value = value(key) else { return }
        if let seconds = value.int {
            guard seconds >= 0 else { throw error(key, "must not be negative: \(seconds)") }
            target = seconds
        } else if let text = value.string {
            guard let seconds = ConfigValues.parseDuration(text) else {
                throw error(key, "not a duration: \(ConfigParser.quote(text))")
            }
            target = seconds
        } else {
            throw wrongType(key, "a duration (integer seconds or a string such as \"300s\")", value)
        }
    }

    /// A string with its unit, "1ms" or "1s": an integer is refused, since
    /// it would mean seconds in every other duration key.
    func milliseconds(_ key: String, into target: inout Int) throws(ConfigError) {
        guard let value = value(key) else { return }
        guard let text = value.string else {
            throw wrongType(key, "a duration with its unit (a string such as \"1ms\")", value)
        }
        guard let milliseconds = ConfigValues.parseMilliseconds(text) else {
            throw error(key, "not a duration in ms or s: \(ConfigParser.quote(text))")
        }
        target = milliseconds
    }

    /// Integer bytes or a size string.
    func size(_ key: String, into target: inout Int) throws(ConfigError) {
        guard let value = value(key) else { return }
        if let bytes = value.int {
            guard bytes >= 0 else { throw error(key, "must not be negative: \(bytes)") }
            target = bytes
        } else if let text = value.string {
            guard let bytes = ConfigValues.parseSize(text) else {
                throw error(key, "not a size: \(ConfigParser.quote(text))")
            }
            target = bytes
        } else {
            throw wrongType(key, "a size (integer bytes or a string such as \"10MiB\")", value)
        }
    }
}
