// Who is local, and where a recipient's mail goes.
//
// Local users come from the system's accounts (config `accounts = "system"`,
// read with getpwent once at start: after the chroot /etc/passwd is gone)
// plus the names listed in the configuration, or from that list alone
// (`accounts = "listed"`). Lookups ignore case; the mailbox path uses the
// name as the system or the configuration spells it.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MailMessage
import SealpostConfig
import StageProtocol

public struct LocalUsers: Sendable, Equatable {
    /// lower-cased name -> canonical spelling
    private var names: [String: String] = [:]

    public init<S: Sequence>(names list: S) where S.Element == String {
        for name in list where LocalUsers.isUsableName(name) {
            let key = name.lowercased()
            // Lookups fold case, so two accounts "Alice" and "alice" share
            // a key: the lower-case spelling gets the mail (as Postfix,
            // whose local(8) looks the folded name up in passwd), whatever
            // order the user database lists them in.
            if names[key] == nil || name == key { names[key] = name }
        }
    }

    /// The canonical name of local user `name` (any case), or nil.
    public func lookup(_ name: String) -> String? {
        names[name.lowercased()]
    }

    public var count: Int { names.count }

    /// The names, lower-cased.
    public var lowercasedNames: Dictionary<String, String>.Keys { names.keys }

    /// Every account name in the system's user database (getpwent_r: files,
    /// and whatever else nsswitch.conf names). Call before chroot.
    ///
    /// getpwent_r, not getpwent: getpwent answers NULL both at the end of
    /// the list and on an error, and a list cut short would bounce mail to
    /// every account it missed; getpwent_r returns the error number of a
    /// failure glibc reports (a source that says "try again", memory).
    /// Not every failure shows, though: glibc passes over a source that
    /// reports itself unavailable (NSS_STATUS_UNAVAIL: sssd or nslcd not
    /// answering) and ends the list as if that source had no accounts:
    /// LocalDeliveryService.users looks up by name each account of the last
    /// published table that the list left out (lookUpAccount).
    public static func systemAccountNames() throws(TableFileError) -> [String] {
        var out: [String] = []
        var buffer = [CChar](repeating: 0, count: 4096)
        setpwent()
        defer { endpwent() }
        while true {
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>? = nil
            let status = buffer.withUnsafeMutableBufferPointer {
                getpwent_r(&entry, $0.baseAddress!, $0.count, &result)
            }
            if status == 0, result != nil {
                if let name = entry.pw_name { out.append(String(cString: name)) }
                continue
            }
            if status == ENOENT || (status == 0 && result == nil) { return out }
            // ERANGE: the entry did not fit; glibc hands the same entry
            // again with a larger buffer. Anything larger than 1 MiB is
            // not an account.
            if status == ERANGE, buffer.count < 1 << 20 {
                buffer = [CChar](repeating: 0, count: buffer.count * 4)
                continue
            }
            throw TableFileError(file: "the system's user database (getpwent)", line: nil,
                                 message: "reading the account list failed after \(out.count) accounts: "
                                     + String(cString: strerror(status)))
        }
    }

    /// What the user database says of one account name: getpwnam_r, which
    /// in glibc answers 0 both for an account and for no such account in
    /// any source, and an error number when a source could not answer
    /// (unavailable, "try again"): the case the enumeration cannot see.
    public static func lookUpAccount(_ name: String) -> AccountLookup {
        var buffer = [CChar](repeating: 0, count: 4096)
        while true {
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>? = nil
            let status = buffer.withUnsafeMutableBufferPointer {
                getpwnam_r(name, &entry, $0.baseAddress!, $0.count, &result)
            }
            if status == 0 {
                guard result != nil, let canonical = entry.pw_name else { return .notFound }
                return .found(String(cString: canonical))
            }
            if status == ERANGE, buffer.count < 1 << 20 {
                buffer = [CChar](repeating: 0, count: buffer.count * 4)
                continue
            }
            return .unavailable(String(cString: strerror(status)))
        }
    }

    /// A user name becomes a directory name in the mailbox path: refuse
    /// anything that could climb out of it or confuse it.
    static func isUsableName(_ name: String) -> Bool {
        !name.isEmpty && !name.hasPrefix(".") && !name.contains("/")
            && !name.contains("\0") && !name.contains("{") && !name.contains("}")
    }
}

/// One answer of the user database for one name (LocalUsers.lookUpAccount).
public enum AccountLookup: Equatable, Sendable {
    /// The account, with its name as the database spells it.
    case found(String)
    /// No source has such an account.
    case notFound
    /// A source could not answer: the reason.
    case unavailable(String)
}

/// Where one recipient's copy goes after alias expansion.
public enum Destination: Hashable, Sendable, CustomStringConvertible {
    /// The Maildir of local `user`. `address` is the address that named the
    /// mailbox (with its extension, lower-cased): the Delivered-To line and
    /// the log's `to=`.
    case mailbox(user: String, address: String)
    /// A copy re-injected into the queue for a non-local address.
    case forward(address: String)

    public var address: String {
        switch self {
        case .mailbox(_, let a): return a
        case .forward(let a): return a
        }
    }

    /// What makes two destinations the same copy: the mailbox (whatever
    /// address led to it), or the forwarding address.
    public var identity: String {
        switch self {
        case .mailbox(let u, _): return "mailbox:" + u
        case .forward(let a): return "forward:" + a
        }
    }

    public var description: String {
        switch self {
        case .mailbox(let u, let a): return "mailbox \(u) (\(a))"
        case .forward(let a): return "forward \(a)"
        }
    }
}

/// Expands a recipient address into destinations: aliases first (recursively,
/// loop- and depth-checked), then local users; `user+ext` falls back to
/// `user` (address extensions with the "+" delimiter); local-domain addresses
/// in aliases are resolved again, other addresses are forwarded.
public struct RecipientResolver: Sendable {
    public var users: LocalUsers
    public var aliases: AliasTable
    /// Lower-cased local domains.
    public var localDomains: Set<String>
    /// Domain used for a recipient given without one (e.g. "postmaster").
    public var defaultDomain: String
    public var maximumDepth = AliasTable.maximumDepth
    public static let extensionDelimiter: Character = "+"

    public init(users: LocalUsers, aliases: AliasTable, localDomains: Set<String>, defaultDomain: String? = nil) {
        self.users = users
        self.aliases = aliases
        self.localDomains = Set(localDomains.map { $0.lowercased() })
        self.defaultDomain = (defaultDomain ?? localDomains.sorted().first ?? "localhost").lowercased()
    }

    /// What smtp-listen may accept at RCPT: every local user and every
    /// alias (a name `resolve` knows at its first step).
    public var recipientTable: LocalRecipientTable {
        LocalRecipientTable(names: Array(users.lowercasedNames) + Array(aliases.entries.keys))
    }

    /// Case-insensitive; a trailing dot (an absolute name) is ignored.
    public func isLocal(domain: String) -> Bool {
        var name = domain.lowercased()
        if name.hasSuffix(".") { name.removeLast() }
        return localDomains.contains(name)
    }

    /// The most destinations one recipient may expand to, and the most
    /// names looked at on the way (Postfix's expansion_limit is 1000).
    public static let destinationLimit = 1000
    public static let stepLimit = 10_000

    /// The destinations of `address`, in order, without duplicates.
    public func resolve(_ address: String) throws(DeliveryError) -> [Destination] {
        try resolution(address).destinations
    }

    /// What `address` expands to.
    public struct Resolution: Sendable, Equatable {
        public var destinations: [Destination] = []
        /// Members of aliases that are neither a local user, an alias nor
        /// an address ("staff -> carol"): left out, as Postfix bounces only
        /// the member, not the whole alias. When nothing else is left the
        /// recipient is unknown.
        public var skipped: [String] = []
    }

    /// The destinations of `address` and the alias members left out.
    public func resolution(_ address: String) throws(DeliveryError) -> Resolution {
        let local: String
        let domain: String
        if let (localPart, domainPart) = EnvelopeAddress.split(address) {
            local = String(localPart)
            domain = domainPart.lowercased()
            guard isLocal(domain: domain) else {
                throw DeliveryError(status: "5.1.2", text: "domain \"\(domain)\" is not a local domain")
            }
        } else {
            local = address
            domain = defaultDomain
        }
        guard !local.isEmpty else { throw .unknownUser(local) }
        var state = Expansion(origin: address)
        try expand(local, domain: domain, chain: [], into: &state)
        if state.result.destinations.isEmpty, let member = state.firstUnknown {
            throw .unknownUser(member)
        }
        return state.result
    }

    /// One `resolution` in progress.
    private struct Expansion {
        let origin: String
        var result = Resolution()
        var identities: Set<String> = []
        /// Aliases already expanded for this recipient: an alias reached
        /// again by another path adds nothing new (and expanding it again
        /// made overlapping nested aliases exponential).
        var expanded: Set<String> = []
        var steps = 0
        /// The first member left out (the error when nothing is left).
        var firstUnknown: String?
    }

    private func expand(_ name: String, domain: String, chain: [String],
                        into state: inout Expansion) throws(DeliveryError) {
        if chain.count > maximumDepth {
            throw DeliveryError(status: "5.4.6", text: "alias expansion deeper than \(maximumDepth) levels: "
                                + (chain.prefix(4) + ["..."]).joined(separator: " -> "))
        }
        state.steps += 1
        if state.steps > Self.stepLimit { throw Self.tooLarge(state.origin) }
        let key = name.lowercased()
        let address = "\(key)@\(domain)"

        // Exact name first, then without the address extension: an alias or
        // user "list+owner" wins over "list".
        var candidates = [key]
        if let plus = key.firstIndex(of: RecipientResolver.extensionDelimiter), plus != key.startIndex {
            candidates.append(String(key[..<plus]))
        }
        for candidate in candidates {
            // "root: root, ..." - an alias listing its own name means the user.
            let isSelfReference = chain.last == candidate
            if !isSelfReference, let targets = aliases.targets(of: candidate) {
                if chain.contains(candidate) {
                    let cycle = chain.drop(while: { $0 != candidate }) + [candidate]
                    throw DeliveryError(status: "5.4.6", text: "alias loop: " + cycle.joined(separator: " -> "))
                }
                guard state.expanded.insert(candidate).inserted else { return }
                for target in targets {
                    let next: String, nextDomain: String
                    switch target {
                    case .name(let n):
                        (next, nextDomain) = (n, domain)
                    case .address(let l, let d):
                        guard isLocal(domain: d) else {
                            try append(.forward(address: "\(l)@\(d)"), to: &state)
                            continue
                        }
                        (next, nextDomain) = (l, d)
                    }
                    do throws(DeliveryError) {
                        try expand(next, domain: nextDomain, chain: chain + [candidate], into: &state)
                    } catch where error == .unknownUser(next) {
                        state.result.skipped.append((chain + [candidate, next]).joined(separator: " -> "))
                        if state.firstUnknown == nil { state.firstUnknown = next }
                    }
                }
                return
            }
            if let user = users.lookup(candidate) {
                try append(.mailbox(user: user, address: address), to: &state)
                return
            }
        }
        // RFC 5321 section 4.5.1: every domain must accept mail for
        // postmaster. Without an alias or a user of that name, it goes to root.
        if key == "postmaster" && !chain.contains("root") {
            if aliases.targets(of: "root") != nil || users.lookup("root") != nil {
                try expand("root", domain: domain, chain: chain + ["postmaster"], into: &state)
                return
            }
        }
        throw .unknownUser(name)
    }

    /// Adds a destination unless an equal one is there already; one mailbox
    /// gets one copy, however many addresses lead to it.
    private func append(_ destination: Destination, to state: inout Expansion) throws(DeliveryError) {
        guard state.identities.insert(destination.identity).inserted else { return }
        guard state.result.destinations.count < Self.destinationLimit else { throw Self.tooLarge(state.origin) }
        state.result.destinations.append(destination)
    }

    /// An alias too large to deliver: the administrator's to fix, so the
    /// mail waits (4.3.0, as Postfix for a configuration error) rather
    /// than bounce.
    private static func tooLarge(_ origin: String) -> DeliveryError {
        DeliveryError(status: "4.3.0", text: "alias expansion of \(origin) exceeds \(destinationLimit) destinations or \(stepLimit) steps")
    }
}
