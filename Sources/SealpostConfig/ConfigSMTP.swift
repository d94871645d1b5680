// The [smtp] keys beyond the listeners: relay control, limits, timeouts and
// SMTP AUTH. Kept apart from ConfigParser.swift so that each section's
// rules read in one place.
//
// Bounds, and why:
// - command_line_limit >= 512 and text_line_limit >= 1000: RFC 5321
//   4.5.3.1.4 / 4.5.3.1.6 make these the minimum a server must accept;
//   at most 64 KiB, far beyond any real client.
// - error_limit >= 1; client_connection_limit >= 0 (0: no limit);
//   junk_command_limit >= 0 (0: every NOOP, RSET, VRFY, HELP is an error);
//   client_ipv6_prefix_length 16...128 (shorter would lump providers together);
//   session_limit 0...1,000,000 (0: no limit).
// - event_loops 0...256 (0: half the cores); more threads than that only
//   contend for the cores.
// - command_timeout, data_timeout >= 1 s; RFC 5321 4.5.3.2.7 asks for at
//   least 5 minutes for commands, but a test bed or a busy server may
//   choose less, so only zero (which would spin) is refused.
// - queue_reply_timeout 1 s to 9 min: the client waits 10 minutes for the
//   reply to its final dot (RFC 5321 4.5.3.2.6), so a 451 must come before;
//   queue_restart_wait 0 to 5 min and shorter than queue_reply_timeout,
//   which runs on while the queue is tried again.
// - trusted_networks: "address/length" or a bare address, host bits zero
//   ("10.1.2.3/8" is refused as a probable typo).
// - relay_domains: domain names; a leading "." matches subdomains only.

import TOMLKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension ConfigParser {
    func parseSMTPPolicy(_ smtp: Section, directory: String, into settings: inout SMTPSettings) throws(ConfigError) {
        if let domains = try smtp.strings("relay_domains") {
            var seen: [String] = []
            for domain in domains {
                var name = domain.lowercased()
                if name.hasSuffix(".") && name.count > 1 { name.removeLast() }
                let bare = name.hasPrefix(".") ? String(name.dropFirst()) : name
                guard ConfigValues.isValidDomain(bare) else {
                    throw smtp.error("relay_domains", "not a domain (or .domain for its subdomains): \(Self.quote(domain))")
                }
                if !seen.contains(name) { seen.append(name) }
            }
            settings.relayDomains = seen
        }
        if let networks = try smtp.strings("trusted_networks") {
            for network in networks {
                if let problem = ConfigValues.networkError(network) {
                    throw smtp.error("trusted_networks", "\(problem): \(Self.quote(network))")
                }
            }
            settings.trustedNetworks = networks
        }
        try smtp.bounded("command_line_limit", 512...65536, into: &settings.commandLineLimit)
        try smtp.bounded("text_line_limit", 1000...65536, into: &settings.textLineLimit)
        try smtp.bounded("error_limit", 1...1000, into: &settings.errorLimit)
        try smtp.bounded("junk_command_limit", 0...1_000_000, into: &settings.junkCommandLimit)
        try smtp.bounded("client_connection_limit", 0...100_000, into: &settings.clientConnectionLimit)
        try smtp.bounded("client_ipv6_prefix_length", 16...128, into: &settings.clientIPv6PrefixLength)
        try smtp.bounded("session_limit", 0...1_000_000, into: &settings.sessionLimit)
        try smtp.bounded("event_loops", 0...256, into: &settings.eventLoops)
        try smtp.duration("command_timeout", into: &settings.commandTimeout)
        if settings.commandTimeout < 1 { throw smtp.error("command_timeout", "must be at least 1 second") }
        try smtp.duration("data_timeout", into: &settings.dataTimeout)
        if settings.dataTimeout < 1 { throw smtp.error("data_timeout", "must be at least 1 second") }
        try smtp.duration("queue_reply_timeout", into: &settings.queueReplyTimeout)
        guard (1...540).contains(settings.queueReplyTimeout) else {
            throw smtp.error("queue_reply_timeout",
                             "must be between 1 second and 9 minutes (the client waits 10 minutes for the reply): \(settings.queueReplyTimeout)s")
        }
        try smtp.duration("queue_restart_wait", into: &settings.queueRestartWait)
        guard settings.queueRestartWait <= 300 else {
            throw smtp.error("queue_restart_wait", "must be at most 5 minutes: \(settings.queueRestartWait)s")
        }
        guard settings.queueRestartWait == 0 || settings.queueRestartWait < settings.queueReplyTimeout else {
            // Blame the key the file sets: a short queue_reply_timeout alone
            // collides with the default wait.
            guard smtp.contains("queue_restart_wait") else {
                throw smtp.error("queue_reply_timeout",
                                 "must be longer than queue_restart_wait (\(settings.queueRestartWait)s by default; or set queue_restart_wait lower): \(settings.queueReplyTimeout)s")
            }
            throw smtp.error("queue_restart_wait",
                             "must be shorter than queue_reply_timeout (\(settings.queueReplyTimeout)s), which bounds it: \(settings.queueRestartWait)s")
        }
        if let users = try smtp.string("auth_users") {
            guard !users.isEmpty else { throw smtp.error("auth_users", "must not be empty") }
            settings.authUsersFile = ConfigPath.resolve(users, relativeTo: directory)
        }
        for (key, path) in [("sender_login_match", \SMTPSettings.senderLoginMatch),
                            ("client_name_lookup", \SMTPSettings.clientNameLookup),
                            ("reject_unknown_local_recipients", \SMTPSettings.rejectUnknownLocalRecipients)] {
            guard let value = smtp.value(ofKey: key) else { continue }
            guard let flag = value.bool else {
                throw smtp.error(key, "expected a boolean (true or false), found \(Self.describe(value.type))")
            }
            settings[keyPath: path] = flag
        }
    }
}

extension Section {
    /// An integer within `range`.
    func bounded(_ key: String, _ range: ClosedRange<Int>, into target: inout Int) throws(ConfigError) {
        guard let value = try integer(key) else { return }
        guard range.contains(value) else {
            throw error(key, "must be between \(range.lowerBound) and \(range.upperBound): \(value)")
        }
        target = value
    }

    func value(ofKey key: String) -> TOMLValueConvertible? { table?[key] }
}

extension ConfigValues {
    /// A network for trusted_networks: "192.0.2.0/24", "2001:db8::/32",
    /// "127.0.0.1" (a /32), "[::1]/128"; host bits must be zero. Returns
    /// nil when valid, else the reason.
    public static func networkError(_ text: String) -> String? {
        var body = Substring(text)
        var length: Int?
        if let slash = body.lastIndex(of: "/") {
            let digits = body[body.index(after: slash)...]
            guard (1...3).contains(digits.count), digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int(digits) else {
                return "not a prefix length after \"/\""
            }
            length = n
            body = body[..<slash]
        }
        if body.hasPrefix("["), body.hasSuffix("]") { body = body.dropFirst().dropLast() }
        guard let bytes = addressBytes(String(body)) else { return "not an IP address or network (address/length)" }
        let maximum = bytes.count * 8
        let n = length ?? maximum
        guard n <= maximum else { return "prefix length \(n) exceeds \(maximum)" }
        for bit in n..<maximum where bytes[bit / 8] & (0x80 >> UInt8(bit % 8)) != 0 {
            return "host bits set beyond /\(n) (did you mean the network address?)"
        }
        return nil
    }
}
