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
