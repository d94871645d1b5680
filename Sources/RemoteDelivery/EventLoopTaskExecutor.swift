// Swift concurrency without libdispatch's worker pool.
//
// The agent's pluggable steps are async functions (MX and address lookups,
// the destination policy, the TLS hand-off). A plain `Task {}` runs them on
// Swift's global executor, which on Linux is libdispatch's worker pool; in a
// chrooted stage that pool's monitor, looking for /proc/PID/stat of its
// threads, finds no /proc and traps (SIGILL) whenever it samples a busy
// queue (see StageRuntime's SignalEvents). remote-deliver chroots, so every
// task it starts prefers this executor (SE-0417 task executor preference):
// the task and its child tasks (`async let`) run their jobs on the agent's
// NIO event loop, and continuations resumed from other threads (the
// resolver's thread, a TLS hand-off thread) come back to it too. No job of
// remote-deliver ever reaches the global executor; the e2e test checks that
// no dispatch worker thread exists in the running stage.

import NIOCore

public final class EventLoopTaskExecutor: TaskExecutor {
    public let eventLoop: EventLoop

    public init(_ eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute { [self] in
            job.runSynchronously(on: asUnownedTaskExecutor())
        }
    }
}

extension EventLoop {
    /// Runs `body` as a task whose jobs all run on this event loop, and
    /// completes the future with its value (on this loop).
    func runTask<Value: Sendable>(on executor: EventLoopTaskExecutor,
                                  _ body: @escaping @Sendable () async -> Value) -> EventLoopFuture<Value> {
        let promise = makePromise(of: Value.self)
        Task(executorPreference: executor) {
            promise.succeed(await body())
        }
        return promise.futureResult
    }
}
