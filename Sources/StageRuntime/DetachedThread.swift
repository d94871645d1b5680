// A detached POSIX thread for a closure: the stages' helper threads (inject
// forwarders, TLS hand-off readers and writers, blocking connects). Plain
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
        let context = Unmanaged.passRetained(DetachedThreadBody(body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<DetachedThreadBody>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, context)
        precondition(rc == 0, "pthread_create: \(rc)")
        pthread_detach(thread)
    }
}
