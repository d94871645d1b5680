// The aliases file (config `local.aliases`), read once at start, before the
// stage drops privileges and chroots.
//
//   # comment lines start with "#" (after optional white space)
//   postmaster: root
//   staff:      alice, bob,
//               carol@example.net     <- continuation: the line starts with white space
//   root:       root, admin@example.org   <- an alias naming itself means that user's mailbox
//
// A target is a local name (a user or another alias, resolved recursively)
// or a full address: one in a local domain is resolved like a local name,
// any other is forwarded through the queue. Targets are separated by commas
// and/or white space. Names are case-insensitive.
//
// Deliberately unsupported, refused when the file is loaded: "|command"
// (running programs), "/file" (appending to files) and ":include:" targets.
// local-deliver writes Maildirs and nothing else; a stage that parses mail
// from the network must not be able to run commands or write arbitrary files.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import FileAccess
import MailMessage
import SealpostConfig

public enum AliasTarget: Hashable, Sendable, CustomStringConvertible {
    /// A local user or another alias; lower-cased.
    case name(String)
    /// A full address. The local part is kept as written (remote systems may
    /// treat case as significant); the domain is lower-cased.
    case address(local: String, domain: String)

    public var description: String {
        switch self {
        case .name(let n): return n
        case .address(let l, let d): return "\(l)@\(d)"
        }
    }
}

public typealias AliasError = TableFileError

public struct AliasTable: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var targets: [AliasTarget]
        /// Line of the file where the alias starts, for error messages.
        public var line: Int
    }

    /// How deep aliases may refer to aliases. Deep enough for any sane
    /// setup, shallow enough to stop a runaway expansion quickly.
    public static let maximumDepth = 20
    /// Far beyond any aliases file (Postfix's own are a few MiB at most);
    /// a bound on what is read at each start.
    public static let maximumFileSize = 64 << 20

    public private(set) var entries: [String: Entry] = [:]
    /// Where the table came from ("" for a table built in code).
    public private(set) var file: String = ""

    public init() {}

    public var isEmpty: Bool { entries.isEmpty }

    /// The targets of alias `name` (case-insensitive), or nil if no such alias.
    public func targets(of name: String) -> [AliasTarget]? {
        entries[name.lowercased()]?.targets
    }

    /// Reads and parses the aliases file. A missing file is an empty table
    /// (the default configuration names one that need not exist); any other
    /// read error, and every malformed line, is an error.
    public static func load(path: String, localDomains: Set<String>) throws(AliasError) -> AliasTable {
        let bytes: [UInt8]
        do {
            guard let file = try WholeFile.readIfPresent(path, maximumSize: maximumFileSize, options: .characterDevices) else { return AliasTable() }
            bytes = file.bytes
        } catch {
            throw AliasError(file: path, line: nil, message: error.withoutPath)
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw AliasError(file: path, line: nil, message: "not valid UTF-8")
        }
        return try parse(text, file: path, localDomains: localDomains)
    }

    /// Parses the text of an aliases file. `localDomains` (lower-cased) lets
    /// the loader follow `name@local-domain` targets when it checks for loops.
    public static func parse(_ text: String, file: String, localDomains: Set<String>) throws(AliasError) -> AliasTable {
        var table = AliasTable()
        table.file = file
        var current: Entry? = nil

        func fail(_ line: Int?, _ message: String) -> AliasError {
            AliasError(file: file, line: line, message: message)
        }

        func flush() throws(AliasError) {
            guard let entry = current else { return }
            current = nil
            if entry.targets.isEmpty {
                throw fail(entry.line, "alias \"\(entry.name)\" has no targets")
            }
            if let first = table.entries[entry.name] {
                throw fail(entry.line, "duplicate alias \"\(entry.name)\" (first defined at line \(first.line))")
            }
            table.entries[entry.name] = entry
        }

        var lineNumber = 0
        // "\r\n" is one Character in Swift: split on both forms.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }) {
            lineNumber += 1
            var line = Substring(rawLine)
            if line.last == "\r" { line.removeLast() }
            let trimmed = String(line).trimmingSpaces()
            if trimmed.isEmpty || trimmed.hasPrefix("#") { continue }

            if line.first == " " || line.first == "\t" {
                guard current != nil else {
                    throw fail(lineNumber, "continuation line (starting with white space) with no alias before it")
                }
                let targets = try parseTargets(trimmed, line: lineNumber, file: file)
                current!.targets.append(contentsOf: targets)
                continue
            }

            try flush()
            guard let colon = trimmed.firstIndex(of: ":") else {
                throw fail(lineNumber, "expected \"name: target, ...\", found no \":\"")
            }
            let name = String(trimmed[..<colon]).trimmingSpaces()
            if let problem = nameProblem(name) {
                throw fail(lineNumber, problem)
            }
            let rest = String(trimmed[trimmed.index(after: colon)...])
            current = Entry(name: name.lowercased(),
                            targets: try parseTargets(rest, line: lineNumber, file: file),
                            line: lineNumber)
        }
        try flush()
        try table.checkExpansion(localDomains: localDomains)
        return table
    }

    // MARK: Parsing pieces

    static func nameProblem(_ name: String) -> String? {
        if name.isEmpty { return "empty alias name before \":\"" }
        if name.hasPrefix("\"") { return "quoted alias names are not supported: \(name)" }
        for ch in name.unicodeScalars {
            if ch.value <= 0x20 || ch.value == 0x7F {
                return "alias name \"\(name)\" contains white space or a control character"
            }
            if "@,|/\\<>()[];\"#".unicodeScalars.contains(ch) {
                return "alias name \"\(name)\" contains \"\(ch)\" (a name is a local part, without domain)"
            }
        }
        return nil
    }

    static func parseTargets(_ text: String, line: Int, file: String) throws(AliasError) -> [AliasTarget] {
        var out: [AliasTarget] = []
        let tokens = text.split(whereSeparator: { $0 == "," || $0 == " " || $0 == "\t" })
        for token in tokens {
            out.append(try parseTarget(String(token), line: line, file: file))
        }
        return out
    }

    static func parseTarget(_ raw: String, line: Int, file: String) throws(AliasError) -> AliasTarget {
        func fail(_ message: String) -> AliasError {
            AliasError(file: file, line: line, message: message)
        }
        var token = raw
        if token.hasPrefix("\"|") || token.hasPrefix("|") {
            throw fail("command targets (\(raw)) are not supported: local-deliver never runs programs")
        }
        if token.hasPrefix("\"/") || token.hasPrefix("/") {
            throw fail("file targets (\(raw)) are not supported: local-deliver only delivers to Maildirs")
        }
        if token.lowercased().hasPrefix(":include:") {
            throw fail(":include: targets (\(raw)) are not supported")
        }
        if token.hasPrefix("\"") {
            throw fail("quoted targets are not supported: \(raw)")
        }
        if token.hasPrefix("#") {
            throw fail("unexpected \"#\": comments must be on lines of their own")
        }
        if token.hasPrefix("<") && token.hasSuffix(">") && token.count >= 2 {
            token = String(token.dropFirst().dropLast())
        }
        for ch in token.unicodeScalars {
            if ch.value < 0x20 || ch.value == 0x7F || "\"\\<>()[];:#|".unicodeScalars.contains(ch) {
                throw fail("invalid character \"\(ch)\" in target \(raw)")
            }
        }
        guard let (localPart, domainPart) = EnvelopeAddress.split(token) else {
            if token.isEmpty { throw fail("empty target") }
            return .name(token.lowercased())
        }
        let local = String(localPart)
        let domain = String(domainPart)
        if local.isEmpty || domain.isEmpty || local.utf8.contains(UInt8(ascii: "@")) {
            throw fail("malformed address target \(raw): expected user@domain")
        }
        if domain.hasPrefix(".") || domain.hasSuffix(".") || domain.contains("..") {
            throw fail("malformed domain in target \(raw)")
        }
        return .address(local: local, domain: domain.lowercased())
    }

    // MARK: Loops and depth, checked once at load time

    /// Follows every alias through other aliases (by exact name, and through
    /// addresses in local domains), so that a loop or a chain that is too
    /// deep is reported with its line when the file is loaded rather than
    /// when mail arrives. The resolver checks again at delivery (defence in
    /// depth: a name with an address extension can reach aliases this check
    /// does not follow).
    func checkExpansion(localDomains: Set<String>) throws(AliasError) {
        var memo: [String: Int] = [:]
        var visiting: [String] = []
        for name in entries.keys.sorted() {
            _ = try height(name, visiting: &visiting, memo: &memo, localDomains: localDomains)
        }
    }

    /// Number of alias levels below and including `name` (0: not an alias).
    private func height(_ name: String, visiting: inout [String], memo: inout [String: Int],
                        localDomains: Set<String>) throws(AliasError) -> Int {
        if let known = memo[name] { return known }
        guard let entry = entries[name] else { return 0 }
        if let start = visiting.firstIndex(of: name) {
            let cycle = visiting[start...] + [name]
            throw AliasError(file: file, line: entries[cycle.first!]?.line,
                             message: "alias loop: " + cycle.joined(separator: " -> "))
        }
        // Before going deeper, not after: a chain of thousands of aliases
        // must end in this error, not in a stack overflow.
        if let top = visiting.first, visiting.count >= AliasTable.maximumDepth {
            throw AliasError(file: file, line: entries[top]?.line,
                             message: "aliases nested deeper than \(AliasTable.maximumDepth) levels below \"\(top)\"")
        }
        visiting.append(name)
        var below = 0
        for target in entry.targets {
            let next: String
            switch target {
            case .name(let n): next = n
            case .address(let local, let domain):
                guard localDomains.contains(domain) else { continue }
                next = local.lowercased()
            }
            if next == name { continue }             // "root: root": the user's mailbox
            below = max(below, try height(next, visiting: &visiting, memo: &memo, localDomains: localDomains))
        }
        visiting.removeLast()
        let result = below + 1
        if result > AliasTable.maximumDepth {
            throw AliasError(file: file, line: entry.line,
                             message: "aliases nested deeper than \(AliasTable.maximumDepth) levels below \"\(name)\"")
        }
        memo[name] = result
        return result
    }
}
