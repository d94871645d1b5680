// What the inject connections hold in memory: a message's body is sealed
// into chunks as it arrives and kept until END commits it with the
// envelope in one transaction. The inject socket is open to every local
// user (0666), so without a bound a user who opens many connections and
// sends nearly `message_size_limit` on each, never END, would make the
// queue run out of memory and stop all mail. Past the bound a transaction
// is refused 452 4.3.1 (insufficient system storage: the client tries
// again later, as for a full disk) and its chunks are dropped at once. One
// peer uid may hold at most half of the bound, so that a local user cannot
// take all of it from smtp-listen, and smtp-listen's sessions cannot take
// all of it from local submissions.

#if canImport(Glibc)
import Glibc
#endif

/// Loop-confined (the queue engine's loop), like the handlers that use it.
final class PendingBodies {
    let limit: Int
    var perPeerLimit: Int { limit / 2 }
    private(set) var total = 0
    private var byPeer: [UInt32: Int] = [:]

    init(limit: Int) { self.limit = limit }

    /// The default bound: an eighth of the physical memory, 64 MiB to 2 GiB.
    static func defaultLimit() -> Int {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), pageSize = sysconf(Int32(_SC_PAGESIZE))
        let memory = pages > 0 && pageSize > 0 ? pages * pageSize : 1 << 30
        return min(max(memory / 8, 64 << 20), 2 << 30)
    }

    /// Takes `bytes` for `peer` (nil: unknown uid); false, taking nothing,
    /// when that would pass the total or the peer's share.
    func reserve(_ bytes: Int, peer: UInt32?) -> Bool {
        let key = peer ?? UInt32.max
        let held = byPeer[key, default: 0]
        guard total + bytes <= limit, held + bytes <= perPeerLimit else { return false }
        total += bytes
        byPeer[key] = held + bytes
        return true
    }

    func release(_ bytes: Int, peer: UInt32?) {
        guard bytes > 0 else { return }
        let key = peer ?? UInt32.max
        let left = byPeer[key, default: 0] - bytes
        precondition(left >= 0 && total >= bytes, "pending body bytes released twice")
        total -= bytes
        byPeer[key] = left == 0 ? nil : left
    }
}
