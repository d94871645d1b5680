// A detached POSIX thread for a closure: the stages' helper threads (inject
// forwarders, TLS hand-off readers and writers, blocking connects); and
// threads joined at the end (local-deliver's workers, which drain). Plain
// pthreads, not libdispatch or Foundation's Thread: the stages run chrooted,
// where libdispatch traps (see SignalEvents).

#if canImport(Glibc)
import Glibc
#endif

private final class DetachedThreadBody: Sendable {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

extension StageRuntime {
    /// Runs `body` on a new detached thread. A thread that cannot be created
    /// is a resource exhaustion the stage cannot work around: it traps (the
    /// supervisor restarts the stage).
    public static func detachThread(_ body: @escaping @Sendable () -> Void) {
        pthread_detach(startThread(body))
    }

    /// Runs every body at once, the first on the calling thread and each
    /// other on a thread of its own, and returns when all have returned.
    public static func runOnThreads(_ bodies: [@Sendable () -> Void]) {
        guard let first = bodies.first else { return }
        let threads = bodies.dropFirst().map(startThread)
        first()
        for thread in threads { pthread_join(thread, nil) }
    }

    private static func startThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
        let context = Unmanaged.passRetained(DetachedThreadBody(body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<DetachedThreadBody>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, context)
        precondition(rc == 0, "pthread_create: \(rc)")
        return thread
    }
}
