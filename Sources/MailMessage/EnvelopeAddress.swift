// An envelope address as the queue carries it: "local@domain", or a bare
// local part ("postmaster"). Every stage splits it at the same place: the
// last "@" byte. Not the last "@" Character: a "@" followed by a combining
// mark is one Character (a grapheme cluster), so a Character search does
// not see it, and an address from the network such as "a@\u{301}x" would
// have no domain in one stage and the domain "\u{301}x" in the queue,
// which routes by bytes.

public enum EnvelopeAddress {
    /// The local part and the domain of `address`, split at its last "@"
    /// byte; nil when it has none.
    public static func split(_ address: String) -> (localPart: Substring, domain: Substring)? {
        guard let at = address.utf8.lastIndex(of: UInt8(ascii: "@")) else { return nil }
        return (address[..<at], address[address.utf8.index(after: at)...])
    }

    /// The domain of `address` (what follows its last "@" byte),
    /// lower-cased; nil when it has no "@" or nothing follows it.
    public static func domain(of address: String) -> String? {
        guard let domain = split(address)?.domain, !domain.isEmpty else { return nil }
        return domain.lowercased()
    }
}
