// Checks SMTP AUTH credentials against a loaded password file, and which
// envelope senders an authenticated user may use (Postfix's
// reject_sender_login_mismatch, with the owners given by the password file
// instead of smtpd_sender_login_maps).
//
// `verify` is slow on purpose (Argon2id, ~64 MiB and tens of milliseconds):
// callers run it on a thread pool, never on an event loop. An unknown user
// costs the same as a wrong password (a hash is checked all the same), so
// the reply time does not tell which names exist.

import MailMessage
import Sodium

public final class Authenticator: Sendable {
    private let accounts: [String: PasswordEntry]
    /// Lower-cased local domains: the default senders are NAME@each.
    public let localDomains: [String]

    public init(file: PasswordFile, localDomains: [String]) {
        var accounts: [String: PasswordEntry] = [:]
        for entry in file.entries { accounts[entry.name] = entry }
        self.accounts = accounts
        self.localDomains = localDomains.map { $0.lowercased() }
    }

    public var userCount: Int { accounts.count }

    public func hasUser(_ name: String) -> Bool { accounts[name] != nil }

    /// Whether `password` is `username`'s. A PLAIN authorization identity
    /// other than the user itself is refused: acting for someone else
    /// (proxy authorization) is not offered.
    public func verify(username: String, password: String, authorizationIdentity: String? = nil) -> Bool {
        let entry = accounts[username]
        // Always one hash check, whatever the outcome, for equal timing.
        let matches = PasswordHash.verify(password, against: entry?.hash ?? Self.unknownUserHash)
        guard let entry, matches else { return false }
        if let authz = authorizationIdentity, !authz.isEmpty, authz != entry.name { return false }
        return true
    }

    /// A hash no password given over SMTP can match in practice (its
    /// password is 32 random bytes, hex, made once per process), checked
    /// for unknown users.
    private static let unknownUserHash: String = {
        let secret = Sodium.randomBytes(32).map { String($0, radix: 16) }.joined()
        return (try? PasswordHash.hash(secret)) ?? "$argon2id$"
    }()

    /// The sender addresses and "@domain" patterns `user` owns.
    public func senders(of user: String) -> [String] {
        guard let entry = accounts[user] else { return [] }
        if let explicit = entry.senders { return explicit }
        if entry.name.contains("@") { return [entry.name.lowercased()] }
        return localDomains.map { "\(entry.name.lowercased())@\($0)" }
    }

    /// Whether `user` may send as `sender` ("local@domain", no brackets;
    /// empty for the null sender <>, which owns nothing and is always
    /// allowed: bounces and auto-replies from a mail client use it).
    /// Compared without regard to case.
    public func owns(user: String, sender: String) -> Bool {
        if sender.isEmpty { return true }
        let address = sender.lowercased()
        guard let domain = EnvelopeAddress.split(address)?.domain else { return false }
        return senders(of: user).contains { owned in
            owned.hasPrefix("@") ? owned.dropFirst() == domain : owned == address
        }
    }
}
