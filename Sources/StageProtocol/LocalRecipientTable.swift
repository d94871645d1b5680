// The local recipient table: the local parts that have a mailbox or an
// alias in the local domains, so that smtp-listen refuses an unknown one
// at RCPT (550 5.1.1) instead of accepting the message and bouncing it
// later, most often to a forged sender (backscatter). Postfix's
// local_recipient_maps.
//
// local-deliver writes it, since it alone reads the account database and
// the aliases file (before its chroot); smtp-listen, chrooted in the same
// data directory, reads it and notices a new one. The format is in
// Pipeline/PROTOCOL.md section 8. A table comes from another process, so
// it is decoded as strictly as a frame: the exact header, names in
// strictly ascending byte order (no duplicates), lower-case, valid UTF-8,
// no control characters, each line ended by LF, a size limit. Reading and
// writing the file: LocalRecipientTableFile.swift.

public struct LocalRecipientTable: Sendable, Equatable {
    /// The first line of the file: the format and its version.
    public static let header = "sealpost-local-recipients 1"
    /// About a million names: more than any account database a host
    /// enumerates, and a bound on what the reader allocates.
    public static let maximumFileSize = 16 << 20
    /// Longer than any local part SMTP carries (RFC 5321: 64 octets), for
    /// alias names; a longer name could never be looked up.
    public static let maximumNameLength = 1024

    /// Lower-cased names.
    public private(set) var names: Set<String>

    /// The table of `names` (any case). Names that could never be a local
    /// part of an address (empty, too long, with control characters) are
    /// left out.
    public init(names list: some Sequence<String>) {
        var names = Set<String>()
        for name in list {
            let key = name.lowercased()
            if Self.isValidName(key) { names.insert(key) }
        }
        self.names = names
    }

    public var count: Int { names.count }

    /// Whether mail to `localPart` of a local domain can be delivered, as
    /// local-deliver resolves it: the name itself in any case, else the
    /// name without its address extension ("user+ext" -> "user"); and
    /// postmaster always (RFC 5321 section 4.5.1).
    public func accepts(localPart: String) -> Bool {
        let key = localPart.lowercased()
        if key == "postmaster" || names.contains(key) { return true }
        guard let plus = key.firstIndex(of: "+"), plus != key.startIndex else { return false }
        return names.contains(String(key[..<plus]))
    }

    /// The file's bytes: the header, then one name per line in ascending
    /// byte order.
    public func encoded() -> [UInt8] {
        var out = Array((Self.header + "\n").utf8)
        for name in names.map({ Array($0.utf8) }).sorted(by: { $0.lexicographicallyPrecedes($1) }) {
            out += name
            out.append(0x0A)
        }
        return out
    }

    /// Decodes a file's bytes; every byte must belong to a valid line.
    public init(decoding bytes: [UInt8]) throws(LocalRecipientTableError) {
        guard bytes.count <= Self.maximumFileSize else {
            throw .init("larger than \(Self.maximumFileSize) bytes (\(bytes.count))")
        }
        let header = Array((Self.header + "\n").utf8)
        guard bytes.starts(with: header) else {
            throw .init("not a local recipient table (the first line is not \"\(Self.header)\")")
        }
        guard bytes.last == 0x0A else { throw .init("the last line does not end with a line feed") }
        var names = Set<String>()
        var previous: ArraySlice<UInt8>?
        var start = header.count
        var line = 2
        while start < bytes.count {
            let end = bytes[start...].firstIndex(of: 0x0A)!
            let raw = bytes[start..<end]
            guard let name = String(validating: raw, as: UTF8.self) else { throw .init("line \(line): not UTF-8") }
            guard Self.isValidName(name) else {
                throw .init("line \(line): not a name (empty, longer than \(Self.maximumNameLength) bytes, or a control character)")
            }
            guard name.lowercased() == name else { throw .init("line \(line): not in lower case") }
            if let previous, !previous.lexicographicallyPrecedes(raw) {
                throw .init("line \(line): not in ascending order after the line before (or the same name twice)")
            }
            names.insert(name)
            previous = raw
            start = end + 1
            line += 1
        }
        self.names = names
    }

    static func isValidName(_ name: String) -> Bool {
        let utf8 = name.utf8
        return !utf8.isEmpty && utf8.count <= maximumNameLength && !utf8.contains { $0 < 0x20 || $0 == 0x7F }
    }
}

/// Why a local recipient table could not be decoded.
public struct LocalRecipientTableError: Error, Equatable, Sendable, CustomStringConvertible {
    public var reason: String
    init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}
