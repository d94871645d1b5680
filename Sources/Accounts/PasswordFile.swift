// The SMTP AUTH password file (smtp.auth_users, by default Config/users):
// who may submit mail, with which password, from which sender addresses.
//
//   # comments and blank lines are kept when the file is rewritten
//   alice:$argon2id$v=19$m=65536,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g
//   bob:$argon2id$v=19$m=65536,t=2,p=1$...$...:bob@example.org,@lists.example.org
//
// One account per line: NAME ":" HASH [ ":" SENDERS ].
// - NAME: the login name, 1-128 octets of letters, digits, ".", "_", "-",
//   "+", or a whole address (alice@example.org); case matters, as in
//   /etc/passwd.
// - HASH: crypto_pwhash_str output with Argon2id (module Sodium,
//   `PasswordHash`), checked strictly here: "$argon2id$v=19$m=M,t=T,p=1$
//   SALT$HASH" with the memory at most 1 GiB, so that a hand-edited line
//   cannot make each AUTH attempt allocate without bound.
// - SENDERS (optional): the envelope senders the account may use when
//   smtp.sender_login_match is on, comma-separated: addresses, or
//   "@domain" for any address in that domain. Without it: NAME@each local
//   domain (or NAME itself when NAME is an address).
//
// Strict, like the configuration: an error names the file and the line and
// stops smtp-listen at start-up. The file holds hashes only, yet they must
// not leak (an offline guess needs only the hash): `load(path:)` refuses a
// file that others may read or that the group may write.

import SealpostConfig
import Sodium

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A problem with the password file, placed on its line when it has one:
/// "Config/users:3: duplicate user \"alice\" (first on line 1)".
public struct PasswordFileError: Error, CustomStringConvertible, Equatable, Sendable {
    public var file: String
    public var line: Int?
    public var message: String

    public init(file: String, line: Int? = nil, message: String) {
        self.file = file
        self.line = line
        self.message = message
    }

    public var description: String {
        line.map { "\(file):\($0): \(message)" } ?? "\(file): \(message)"
    }
}

/// One account.
public struct PasswordEntry: Sendable, Equatable {
    public var name: String
    /// "$argon2id$..."
    public var hash: String
    /// Explicit sender addresses and "@domain" patterns, lower-cased;
    /// nil: the default (NAME@each local domain).
    public var senders: [String]?

    public init(name: String, hash: String, senders: [String]? = nil) {
        self.name = name
        self.hash = hash
        self.senders = senders
    }
}

public struct PasswordFile: Sendable, Equatable {
    /// A line of the file: comments are kept so that the CLI does not
    /// destroy an administrator's notes.
    enum Line: Sendable, Equatable {
        case comment(String)
        case entry(PasswordEntry)
    }

    var lines: [Line]

    /// Largest file read: a line is ~100 octets, so this is tens of
    /// thousands of accounts.
    public static let maximumFileSize = 4 << 20
    /// Largest Argon2 memory cost accepted in a hash (KiB): 1 GiB.
    public static let maximumMemoryKiB = 1 << 20
    /// Largest Argon2 time cost accepted.
    public static let maximumIterations = 64

    public init() {
        lines = []
    }

    /// The accounts, in file order.
    public var entries: [PasswordEntry] {
        lines.compactMap { if case .entry(let e) = $0 { return e } else { return nil } }
    }

    public func entry(named name: String) -> PasswordEntry? {
        entries.first { $0.name == name }
    }

    /// Adds the account, or replaces the one of that name in place.
    public mutating func set(_ entry: PasswordEntry) {
        if let i = lines.firstIndex(where: { if case .entry(let e) = $0 { return e.name == entry.name } else { return false } }) {
            lines[i] = .entry(entry)
        } else {
            lines.append(.entry(entry))
        }
    }

    /// Removes the account; false if there was none.
    @discardableResult
    public mutating func remove(named name: String) -> Bool {
        guard let i = lines.firstIndex(where: { if case .entry(let e) = $0 { return e.name == name } else { return false } }) else {
            return false
        }
        lines.remove(at: i)
        return true
    }

    /// The file's text (LF line ends, a final LF when not empty).
    public func render() -> String {
        var text = ""
        for line in lines {
            switch line {
            case .comment(let c): text += c
            case .entry(let e):
                text += e.name + ":" + e.hash
                if let senders = e.senders { text += ":" + senders.joined(separator: ",") }
            }
            text += "\n"
        }
        return text
    }

    // MARK: - Parsing

    /// Parses `text`; `file` names it in errors.
    public static func parse(_ text: String, file: String) throws(PasswordFileError) -> PasswordFile {
        var result = PasswordFile()
        var firstLine: [String: Int] = [:]
        // Split on LF octets, not Characters: "\r\n" is one Character in
        // Swift and would hide a CRLF file's line ends.
        var content = Substring(text).utf8[...]
        if content.last == UInt8(ascii: "\n") { content = content.dropLast() }
        guard !text.isEmpty else { return result }
        for (index, raw) in content.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).enumerated() {
            let number = index + 1
            func fail(_ message: String) -> PasswordFileError {
                PasswordFileError(file: file, line: number, message: message)
            }
            let line = String(Substring(raw))
            if raw.contains(where: { $0 < 0x20 || $0 == 0x7F }) {
                throw fail(raw.last == 13 ? "line ends with CR (not a Unix text file)" : "control character in line")
            }
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) || line.hasPrefix("#") {
                result.lines.append(.comment(line))
                continue
            }
            let fields = line.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard (2...3).contains(fields.count) else {
                throw fail("expected NAME:HASH or NAME:HASH:SENDERS, found \(fields.count) fields")
            }
            let name = fields[0]
            guard isValidName(name) else { throw fail("not a user name: \(quote(name))") }
            if let first = firstLine[name] { throw fail("duplicate user \(quote(name)) (first on line \(first))") }
            if let problem = hashProblem(fields[1]) { throw fail("user \(quote(name)): \(problem)") }
            var senders: [String]?
            if fields.count == 3 {
                switch parseSenders(fields[2]) {
                case .success(let list): senders = list
                case .failure(let problem): throw fail("user \(quote(name)): \(problem.message)")
                }
            }
            firstLine[name] = number
            result.lines.append(.entry(PasswordEntry(name: name, hash: fields[1], senders: senders)))
        }
        return result
    }

    /// Login names: letters, digits, ".", "_", "-", "+", not starting with
    /// "." or "-", 1-128 octets; or a whole address (local@domain) of those
    /// characters. Never ":" (the field separator), "," or white space.
    public static func isValidName(_ name: String) -> Bool {
        guard (1...128).contains(name.utf8.count), let first = name.utf8.first,
              first != UInt8(ascii: "."), first != UInt8(ascii: "-") else { return false }
        let ats = name.utf8.filter { $0 == UInt8(ascii: "@") }.count
        guard name.utf8.allSatisfy({ isNameByte($0) || $0 == UInt8(ascii: "@") }) else { return false }
        if ats == 0 { return true }
        return ats == 1 && ConfigValues.isValidAddress(name)
    }

    private static func isNameByte(_ b: UInt8) -> Bool {
        (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z"))
            || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9"))
            || b == UInt8(ascii: ".") || b == UInt8(ascii: "_") || b == UInt8(ascii: "-") || b == UInt8(ascii: "+")
    }

    /// nil when `hash` is a well-formed Argon2id string within the limits:
    /// "$argon2id$v=19$m=M,t=T,p=1$SALT$HASH", SALT and HASH unpadded
    /// standard base64 (at least 16 and 32 octets decoded: libsodium's).
    public static func hashProblem(_ hash: String) -> String? {
        let parts = hash.split(separator: "$", omittingEmptySubsequences: false)
        guard parts.count == 6, parts[0].isEmpty, parts[1] == "argon2id" else {
            return "not an Argon2id hash (expected $argon2id$v=19$m=...,t=...,p=1$salt$hash; make one with: sealpost user passwd NAME)"
        }
        guard parts[2] == "v=19" else { return "unsupported Argon2 version \(quote(String(parts[2]))) (expected v=19)" }
        let params = parts[3].split(separator: ",", omittingEmptySubsequences: false)
        guard params.count == 3, params[0].hasPrefix("m="), params[1].hasPrefix("t="), params[2].hasPrefix("p="),
              let m = decimal(params[0].dropFirst(2)), let t = decimal(params[1].dropFirst(2)),
              let p = decimal(params[2].dropFirst(2))
        else { return "malformed Argon2 parameters \(quote(String(parts[3]))) (expected m=KiB,t=passes,p=1)" }
        guard p == 1 else { return "parallelism p=\(p) is not supported (libsodium uses p=1)" }
        guard (8...maximumMemoryKiB).contains(m) else { return "memory cost m=\(m) KiB outside 8...\(maximumMemoryKiB)" }
        guard (1...maximumIterations).contains(t) else { return "time cost t=\(t) outside 1...\(maximumIterations)" }
        guard let salt = base64Length(parts[4]), salt >= 16 else { return "malformed salt" }
        guard let digest = base64Length(parts[5]), digest >= 32 else { return "malformed hash value" }
        return nil
    }

    private static func decimal(_ s: Substring) -> Int? {
        guard (1...10).contains(s.count), s.allSatisfy({ $0.isASCII && $0.isNumber }),
              s.first != "0" || s.count == 1 else { return nil }
        return Int(s)
    }

    /// Decoded length of unpadded base64, nil if not base64.
    private static func base64Length(_ s: Substring) -> Int? {
        guard !s.isEmpty, s.count % 4 != 1, s.utf8.allSatisfy({ b in
            isNameByte(b) && b != UInt8(ascii: ".") && b != UInt8(ascii: "_") && b != UInt8(ascii: "-")
                || b == UInt8(ascii: "/")
        }) else { return nil }
        return s.count * 3 / 4
    }

    /// "a@example.org,@example.net" -> lower-cased list; at least one.
    public static func parseSenders(_ text: String) -> Result<[String], PasswordFileError> {
        var list: [String] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
            let problem = PasswordFileError(file: "", message: "not a sender address or @domain: \(quote(item))")
            if item.hasPrefix("@") {
                let domain = String(item.dropFirst()).lowercased()
                guard ConfigValues.isValidDomain(domain) else { return .failure(problem) }
                list.append("@" + domain)
            } else {
                guard ConfigValues.isValidAddress(item), !item.contains(" ") else { return .failure(problem) }
                list.append(item.lowercased())
            }
        }
        guard !list.isEmpty else {
            return .failure(PasswordFileError(file: "", message: "empty sender list (leave out the third field for the default)"))
        }
        return .success(list)
    }

    static func quote(_ text: String) -> String {
        var q = "\""
        for s in text.unicodeScalars.prefix(200) {
            if s.value < 0x20 || s.value == 0x7F { q += "\\u{\(String(s.value, radix: 16))}" } else { q.unicodeScalars.append(s) }
        }
        return q + "\""
    }
}
