// smtp-listen's listening sockets, bound by the supervisor and handed over
// the systemd way (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES; sd_listen_fds(3)).
//
// Why here: as root the supervisor can bind port 25 for a stage that runs
// as its own user from its first instruction on, and because the supervisor
// keeps the sockets open, a connection that arrives while smtp-listen
// restarts waits in the backlog instead of being refused. The same code
// runs when the supervisor is not root (ports above 1023 need no privilege):
// one code path.

#if canImport(Glibc)
import Glibc
#endif
import StageRuntime

final class ListeningSockets {
    struct Bound {
        let definition: ListenerDefinition
        let fd: Int32
    }

    let definitions: [ListenerDefinition]
    /// Bound sockets, all of them or none.
    private(set) var bound: [Bound] = []

    init(definitions: [ListenerDefinition]) { self.definitions = definitions }

    var isBound: Bool { !bound.isEmpty || definitions.isEmpty }

    /// Binds every definition (once; afterwards they stay bound). All or
    /// nothing: on a failure the sockets bound so far are closed again and
    /// the error names the listener.
    func bindAll() throws -> [String] {
        guard !isBound else { return [] }
        var done: [Bound] = []
        var notes: [String] = []
        for definition in definitions {
            do {
                let fd = try Self.bind(definition)
                done.append(Bound(definition: definition, fd: fd))
                notes.append("bound \(definition.socketName) for \(definition.kind) on \(definition.address)")
            } catch {
                for b in done { close(b.fd) }
                throw error
            }
        }
        bound = done
        return notes
    }

    /// The environment a stage gets with the sockets (LISTEN_PID is
    /// written by the child itself, see Spawner.spawn).
    var environment: [String] {
        guard !bound.isEmpty else { return [] }
        return ["LISTEN_FDS=\(bound.count)", "LISTEN_FDNAMES=" + bound.map(\.definition.socketName).joined(separator: ":")]
    }

    var descriptors: [Int32] { bound.map(\.fd) }

    /// Binds again, in place, each socket that no longer listens. The
    /// kernel can end a listening socket under the supervisor's feet (`ss
    /// -K`, SOCK_DESTROY): accept(2) then fails with EINVAL for good,
    /// smtp-listen exits 71 to be started again, and a restart on the same
    /// socket would only fail the same way, for ever. So before each start
    /// of smtp-listen every socket is asked whether it still accepts
    /// connections (SO_ACCEPTCONN); a dead one is closed and bound anew.
    /// One that cannot be bound again is kept (the restart fails as before,
    /// with the supervisor's backoff, and tries again) and its error is
    /// returned for the log.
    func renewDead() -> (notes: [String], failures: [String]) {
        var notes: [String] = [], failures: [String] = []
        for (index, old) in bound.enumerated() where !Self.accepts(old.fd) {
            do {
                let fd = try Self.bind(old.definition)
                close(old.fd)
                bound[index] = Bound(definition: old.definition, fd: fd)
                notes.append("\(old.definition.socketName) for \(old.definition.kind) on \(old.definition.address) no longer listened: bound again")
            } catch {
                failures.append("\(old.definition.socketName) no longer listens and \(error)")
            }
        }
        return (notes, failures)
    }

    /// Whether `fd` is a socket in the listening state.
    static func accepts(_ fd: Int32) -> Bool {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &value, &length) == 0 && value != 0
    }

    func closeAll() {
        for b in bound { close(b.fd) }
        bound = []
    }

    /// One listening TCP socket, close-on-exec (only the dup2'ed copies
    /// reach smtp-listen), SO_REUSEADDR (a restart of the supervisor must
    /// not wait for TIME_WAIT), IPV6_V6ONLY for IPv6 (so that 0.0.0.0:25
    /// and [::]:25 can both be listed), as smtp-listen binds them itself.
    static func bind(_ definition: ListenerDefinition) throws(ListenerBindError) -> Int32 {
        do {
            return try bindListeningSocket(host: definition.host, port: definition.port)
        } catch {
            throw ListenerBindError(definition: definition, reason: error.reason)
        }
    }
}

struct ListenerBindError: Error, CustomStringConvertible {
    var definition: ListenerDefinition
    var reason: String
    var description: String { "cannot listen for \(definition.kind) on \(definition.address): \(reason)" }
}
