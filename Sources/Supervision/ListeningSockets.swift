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
    static func bind(_ definition: ListenerDefinition) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE
        var result: UnsafeMutablePointer<addrinfo>? = nil
        let rc = getaddrinfo(definition.host, String(definition.port), &hints, &result)
        guard rc == 0, let first = result else {
            throw ListenerBindError(definition: definition, reason: "cannot resolve \(definition.host): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(result) }
        let family = first.pointee.ai_family
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ListenerBindError(definition: definition, reason: "socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if family == AF_INET6 {
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        // SOMAXCONN (4096 on current kernels): the backlog is what carries
        // clients over a restart of smtp-listen.
        guard Glibc.bind(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0, listen(fd, SOMAXCONN) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw ListenerBindError(definition: definition, reason: "bind: \(reason)")
        }
        return fd
    }
}

struct ListenerBindError: Error, CustomStringConvertible {
    var definition: ListenerDefinition
    var reason: String
    var description: String { "cannot listen for \(definition.kind) on \(definition.address): \(reason)" }
}
