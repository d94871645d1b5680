// The local recipient table as a file (Pipeline/PROTOCOL.md section 8),
// apart from the codec so that the fuzz build of this module, which takes
// no dependency, leaves it out.

#if canImport(Glibc)
import Glibc
#endif
import FileAccess

extension LocalRecipientTable {
    /// Replaces the table at `path`: a new file written beside it
    /// (`path` + ".new") and renamed over it, so that a reader sees the old
    /// table or the new one, never a part. Mode 0644 whatever the umask:
    /// smtp-listen runs as another user. Not synced: the table is written
    /// again at each start of local-deliver.
    public func write(to path: String) throws(LocalRecipientTableError) {
        let bytes = encoded()
        guard bytes.count <= Self.maximumFileSize else {
            // Written, smtp-listen would refuse it whole.
            throw .init("\(count) names take \(bytes.count) bytes, more than the \(Self.maximumFileSize) a reader takes")
        }
        do {
            try WholeFile.replace(path, with: bytes, mode: 0o644, temporary: path + ".new")
        } catch {
            throw .init(error.description)
        }
    }

    /// The table at `path`; nil when there is no file. A symbolic link is
    /// refused: the directory is another stage's.
    public static func read(from path: String) throws(LocalRecipientTableError) -> LocalRecipientTable? {
        try readWithStatus(from: path)?.table
    }

    /// `read`, with the status (fstat) of the file the table came from:
    /// what a watcher compares with the path's next stat to see a new one.
    public static func readWithStatus(from path: String) throws(LocalRecipientTableError) -> (table: LocalRecipientTable, status: stat)? {
        let file: (bytes: [UInt8], status: stat)
        do {
            guard let present = try WholeFile.readIfPresent(path, maximumSize: maximumFileSize, options: .noFollow) else {
                return nil
            }
            file = present
        } catch {
            throw .init(error.description)
        }
        do {
            return (try LocalRecipientTable(decoding: file.bytes), file.status)
        } catch {
            throw .init("\(path): \(error.reason)")
        }
    }
}
