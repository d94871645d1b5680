#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch

/// Signal callbacks for the stages' mains, as ordinary closures run on a
/// dedicated signal thread (or on a dispatch queue when one is given):
///
///     let signals = SignalEvents()
///     signals.on(SIGTERM) { server.shutDown() }
///     signals.on(SIGHUP) { reopenLogs() }
///
/// Why not DispatchSource.makeSignalSource alone: it needs the signal
/// ignored (SIG_IGN), and an ignored SIGTERM is inherited by every program
/// the stage executes. Here a real handler (reset to the default by exec)
/// writes the signal number to a self-pipe, and a plain thread blocked in
/// read(2) on that pipe calls the closures. The handler only calls write(2),
/// which is async-signal-safe. No libdispatch by default: in a chrooted
/// stage its worker-pool monitor finds no /proc and traps (SIGILL) now and
/// then at shutdown.
///
/// Signals must be process-directed (kill(pid), as the supervisor sends
/// them): raise() targets the calling thread, and dispatch worker threads
/// block signals, so a raise() there stays pending.
///
/// Keep the SignalEvents alive as long as the callbacks are wanted; `cancel()`
/// (or deinit) removes them and restores the default action of signals no
/// one listens to any more.
public final class SignalEvents: @unchecked Sendable {
    private let queue: DispatchQueue?
    private let token: Int

    /// Callbacks run on `queue`, or, when it is nil (the default), on the
    /// process's signal thread, one at a time.
    public init(queue: DispatchQueue? = nil) {
        self.queue = queue
        self.token = SignalDispatcher.shared.newToken()
    }

    /// Calls `handler` on the queue each time `signal` arrives. Signals that
    /// arrive in a burst may be coalesced into fewer calls; a signal is
    /// never lost entirely.
    public func on(_ signal: Int32, _ handler: @escaping @Sendable () -> Void) {
        SignalDispatcher.shared.register(signal, token: token, queue: queue, handler: handler)
    }

    public func cancel() {
        SignalDispatcher.shared.unregister(token: token)
    }

    deinit { cancel() }
}

// The write end of the self-pipe, read by the C signal handler. Set once,
// before any handler is installed, never changed.
nonisolated(unsafe) private var signalPipeWriteEnd: Int32 = -1

private func signalHandler(_ signal: Int32) {
    let saved = errno
    var byte = UInt8(truncatingIfNeeded: signal)
    _ = write(signalPipeWriteEnd, &byte, 1)   // pipe full: a wake-up is pending anyway
    errno = saved
}

/// The process-wide half: one pipe, one read source, the registrations.
final class SignalDispatcher: @unchecked Sendable {
    static let shared = SignalDispatcher()

    private struct Registration {
        var token: Int
        var queue: DispatchQueue?
        var handler: @Sendable () -> Void
    }

    private let state = LockedState((nextToken: 0, registrations: [Int32: [Registration]]()))
    private let readEnd: Int32

    private init() {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else {
            StageRuntime.fatal("signal pipe: \(String(cString: strerror(errno)))", exit: .osErr)
        }
        for end in ends {
            _ = fcntl(end, F_SETFD, FD_CLOEXEC)
        }
        // The write end never blocks the handler; the read end blocks the
        // signal thread until a signal arrives.
        _ = fcntl(ends[1], F_SETFL, fcntl(ends[1], F_GETFL) | O_NONBLOCK)
        readEnd = ends[0]
        signalPipeWriteEnd = ends[1]
        var thread = pthread_t()
        let started = pthread_create(&thread, nil, { _ in
            SignalDispatcher.shared.readLoop()   // never returns
        }, nil)
        guard started == 0 else {
            StageRuntime.fatal("signal thread: \(String(cString: strerror(started)))", exit: .osErr)
        }
        pthread_detach(thread)
    }

    func newToken() -> Int {
        state.withLock { state in
            state.nextToken += 1
            return state.nextToken
        }
    }

    func register(_ signal: Int32, token: Int, queue: DispatchQueue?, handler: @escaping @Sendable () -> Void) {
        precondition(signal > 0 && signal < 256, "not a signal number: \(signal)")
        state.withLock { state in
            if state.registrations[signal, default: []].isEmpty { install(signal, handler: signalHandler) }
            state.registrations[signal, default: []].append(Registration(token: token, queue: queue, handler: handler))
        }
    }

    func unregister(token: Int) {
        state.withLock { state in
            for (signal, list) in state.registrations {
                let kept = list.filter { $0.token != token }
                if kept.count == list.count { continue }
                state.registrations[signal] = kept
                if kept.isEmpty { install(signal, handler: nil) }
            }
        }
    }

    /// Installs our handler, or the default action (`nil`).
    private func install(_ signal: Int32, handler: (@convention(c) (Int32) -> Void)?) {
        var action = sigaction()
        #if canImport(Glibc)
        action.__sigaction_handler.sa_handler = handler ?? SIG_DFL
        #else
        action.__sigaction_u.__sa_handler = handler ?? SIG_DFL
        #endif
        sigemptyset(&action.sa_mask)
        action.sa_flags = SA_RESTART
        sigaction(signal, &action, nil)
    }

    /// The signal thread: blocks in read(2) until the handler writes.
    fileprivate func readLoop() -> Never {
        var buffer = [UInt8](repeating: 0, count: 64)
        while true {
            let count = read(readEnd, &buffer, buffer.count)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                StageRuntime.fatal("signal pipe: read: \(count == 0 ? "closed" : String(cString: strerror(errno)))", exit: .osErr)
            }
            let arrived = Set(buffer[..<count].map { Int32($0) })
            let calls = state.withLock { state in
                arrived.sorted().flatMap { state.registrations[$0] ?? [] }
            }
            for call in calls {
                if let queue = call.queue { queue.async(execute: call.handler) } else { call.handler() }
            }
        }
    }
}
