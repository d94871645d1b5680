// smtp-listen's copy of the local recipient table (StageProtocol's
// LocalRecipientTable), which local-deliver writes when it starts and at
// each reload. smtp-listen, chrooted into the same data directory, checks
// the file once a second on a thread of its own (a large table is parsed
// off the event loop) and swaps in a new one. Until a table exists every
// local part is accepted, as before there was a table: a pipeline whose
// local delivery is another program has none. A table that does not load
// leaves the one in use (a warning names the reason), and so does a file
// that disappears: local-deliver replaces it, never removes it.

#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers
import StageProtocol
import StageRuntime

public final class LocalRecipients: Sendable {
    /// Where the file was seen: a new file (local-deliver renames one
    /// over the old), or one changed in place.
    struct FileIdentity: Equatable {
        var device: UInt64, inode: UInt64, size: Int64, modified: Int64, modifiedNanoseconds: Int

        init?(path: String) {
            var info = stat()
            guard stat(path, &info) == 0 else { return nil }
            self.init(info)
        }

        init(_ info: stat) {
            device = UInt64(info.st_dev)
            inode = UInt64(info.st_ino)
            size = Int64(info.st_size)
            modified = Int64(info.st_mtim.tv_sec)
            modifiedNanoseconds = Int(info.st_mtim.tv_nsec)
        }
    }

    private struct State {
        var table: LocalRecipientTable?
        var identity: FileIdentity?
        var looked = false
    }

    public let path: String
    private let state = NIOLockedValueBox(State())
    private let info: @Sendable (String) -> Void
    private let warning: @Sendable (String) -> Void

    /// `path`: the table as seen after the chroot. The log closures get
    /// one line for each table loaded or refused.
    public init(path: String, info: @escaping @Sendable (String) -> Void,
                warning: @escaping @Sendable (String) -> Void) {
        self.path = path
        self.info = info
        self.warning = warning
    }

    /// Whether RCPT may accept `localPart` of a local domain: as the table
    /// says, or yes when there is none.
    public func accepts(_ localPart: String) -> Bool {
        guard let table = state.withLockedValue({ $0.table }) else { return true }
        return table.accepts(localPart: localPart)
    }

    /// Loads the file if it changed since the last look.
    public func refresh() {
        let current = FileIdentity(path: path)
        let (previous, looked, had) = state.withLockedValue { ($0.identity, $0.looked, $0.table != nil) }
        guard current != previous || !looked else { return }
        guard current != nil else {
            state.withLockedValue { $0.identity = nil; $0.looked = true }
            if !looked {
                info("no local recipient table at \(path) yet: every local part of the local domains is accepted until local-deliver writes it")
            }
            return
        }
        do {
            guard let (table, status) = try LocalRecipientTable.readWithStatus(from: path) else {
                // Gone between the stat and the open: the next look decides.
                return
            }
            // The identity of the file read (replaced since the stat, it
            // is the newer one), so the next look does not load it again.
            let loaded = FileIdentity(status)
            // The old table is freed after the lock, not under it: a large
            // one takes a while, and sessions' RCPTs wait for the lock.
            let old = state.withLockedValue { state -> LocalRecipientTable? in
                defer { state.table = table; state.identity = loaded; state.looked = true }
                return state.table
            }
            withExtendedLifetime(old) {}
            info("local recipient table loaded: \(table.count) names from \(path)")
        } catch {
            // Not tried again until the file changes.
            state.withLockedValue { $0.identity = current; $0.looked = true }
            let kept = had ? "the table loaded before stays in use" : "every local part of the local domains is accepted"
            warning("local recipient table not loaded: \(error) (\(kept))")
        }
    }

    /// Looks at the file now, then once a second on a thread of its own
    /// for as long as the process runs.
    public func watch() {
        refresh()
        StageRuntime.detachThread { [self] in
            while true {
                sleep(1)
                refresh()
            }
        }
    }
}
