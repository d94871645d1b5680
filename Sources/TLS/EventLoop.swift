// A single-threaded epoll loop: the relay engine of crypto-negotiate runs
// thousands of TLS sessions on it. Why not SwiftNIO: the sessions drive
// OpenSSL directly on the socket (SSL_set_fd), which needs readiness
// events on raw descriptors and nothing else; NIO's channels would force
// every byte through memory BIOs and ByteBuffers for no gain.
//
// Descriptors are registered edge-triggered: a handler must work until
// EAGAIN each time it is called (the relay sessions do). Writability is
// watched only on request (`watchWritable`): with EPOLLOUT in the mask, every
// read by the peer that frees buffer space is an edge, and a wake-up of this
// process for nothing (about four per relayed STARTTLS message).

#if canImport(Glibc)
import Glibc
#endif
import COpenSSL
import CSystemShims

/// Something that reacts to readiness of the descriptors it registered.
public protocol EventHandler: AnyObject {
    /// `events`: EPOLLIN/EPOLLOUT/EPOLLHUP/EPOLLERR/EPOLLRDHUP bits.
    func ready(fd: Int32, events: UInt32)
}

public final class EventLoop: @unchecked Sendable {
    private let epfd: Int32
    private let wakeRead: Int32
    private let wakeWrite: Int32
    /// Loop thread only.
    private var handlers: [Int32: EventHandler] = [:]
    /// Loop thread only: the descriptors registered with EPOLLOUT.
    private var writable: Set<Int32> = []
    private var tickers: [(interval: Double, next: Double, body: () -> Void)] = []
    /// Guarded by `lock`: tasks from other threads. The mutex lives in
    /// memory of its own: `&property` may hand pthread a temporary copy
    /// (Swift promises no stable address for a stored property), and a
    /// mutex must never move.
    private let lock: UnsafeMutablePointer<pthread_mutex_t> = {
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        return mutex
    }()
    private var tasks: [() -> Void] = []
    private var stopping = false

    public init() throws {
        // OpenSSL writes to sockets with write(2), not send(MSG_NOSIGNAL):
        // a peer that vanished must be EPIPE, not the death of the process.
        signal(SIGPIPE, SIG_IGN)
        epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epfd >= 0 else { throw TLSError(.configuration, "epoll_create1: \(String(cString: strerror(errno)))") }
        var p: [Int32] = [-1, -1]
        guard sealpost_pipe_cloexec(&p) == 0 else {
            throw TLSError(.configuration, "pipe: \(String(cString: strerror(errno)))")
        }
        wakeRead = p[0]
        wakeWrite = p[1]
        setNonBlocking(wakeRead)
        setNonBlocking(wakeWrite)
        var ev = epoll_event()
        ev.events = EPOLLIN.rawValue
        ev.data.fd = wakeRead
        epoll_ctl(epfd, EPOLL_CTL_ADD, wakeRead, &ev)
    }

    deinit {
        close(epfd)
        close(wakeRead)
        close(wakeWrite)
        pthread_mutex_destroy(lock)
        lock.deinitialize(count: 1)
        lock.deallocate()
    }

    // MARK: Loop thread API

    /// Watches `fd` (edge-triggered) for `handler`: readable, and writable
    /// too if `writable` (else see `watchWritable`).
    public func register(_ fd: Int32, _ handler: EventHandler, writable: Bool = true) throws(TLSError) {
        var ev = epoll_event()
        ev.events = Self.mask(writable: writable)
        ev.data.fd = fd
        guard epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) == 0 else {
            throw TLSError(.connection, "epoll_ctl add \(fd): \(String(cString: strerror(errno)))")
        }
        handlers[fd] = handler
        if writable { self.writable.insert(fd) }
    }

    private static func mask(writable: Bool) -> UInt32 {
        EPOLLIN.rawValue | EPOLLRDHUP.rawValue | EPOLLET.rawValue | (writable ? EPOLLOUT.rawValue : 0)
    }

    /// Adds writability to the events of registered `fd`, once: call when a
    /// write would block. It stays on (a descriptor that blocked once may
    /// well block again; no epoll_ctl churn). Adding EPOLLOUT to an
    /// edge-triggered descriptor that is writable now reports it at once.
    public func watchWritable(_ fd: Int32) {
        guard handlers[fd] != nil, !writable.contains(fd) else { return }
        var ev = epoll_event()
        ev.events = Self.mask(writable: true)
        ev.data.fd = fd
        if epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) == 0 { writable.insert(fd) }
    }

    /// Stops watching `fd`; call before closing it.
    public func unregister(_ fd: Int32) {
        var ev = epoll_event()
        epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev)
        handlers[fd] = nil
        writable.remove(fd)
    }

    /// Forgets `fd` without epoll_ctl, for a descriptor about to be closed
    /// that is the only reference to its open file (a socketpair end made
    /// here): closing it removes it from the epoll set. Not for a
    /// descriptor received from another process, which may still hold it.
    public func forget(_ fd: Int32) {
        handlers[fd] = nil
        writable.remove(fd)
    }

    /// Number of descriptors watched (without the wake-up pipe).
    public var registeredCount: Int { handlers.count }

    /// Calls `body` on the loop thread about every `seconds` (timeouts, file checks).
    public func every(_ seconds: Double, _ body: @escaping () -> Void) {
        tickers.append((seconds, monotonicNow() + seconds, body))
    }

    // MARK: Any thread

    /// Runs `task` on the loop thread, soon.
    public func execute(_ task: @escaping @Sendable () -> Void) {
        pthread_mutex_lock(lock)
        tasks.append(task)
        pthread_mutex_unlock(lock)
        wake()
    }

    /// Makes `run()` return after the current iteration.
    public func stop() {
        pthread_mutex_lock(lock)
        stopping = true
        pthread_mutex_unlock(lock)
        wake()
    }

    private func wake() {
        var b: UInt8 = 1
        _ = write(wakeWrite, &b, 1)   // EAGAIN: a wake-up is already pending
    }

    /// Runs the loop on the calling thread until `stop()`.
    public func run() {
        var events = [epoll_event](repeating: epoll_event(), count: 256)
        while true {
            let now = monotonicNow()
            var timeout: Int32 = 1000
            for t in tickers { timeout = min(timeout, Int32(max(0, (t.next - now) * 1000))) }
            let n = epoll_wait(epfd, &events, Int32(events.count), timeout)
            if n < 0 && errno != EINTR { fatalError("epoll_wait: \(String(cString: strerror(errno)))") }
            for i in 0..<max(0, Int(n)) {
                let fd = events[i].data.fd
                if fd == wakeRead {
                    var buf = [UInt8](repeating: 0, count: 64)
                    while read(wakeRead, &buf, buf.count) > 0 {}
                    continue
                }
                // A handler may have closed and unregistered it meanwhile.
                handlers[fd]?.ready(fd: fd, events: events[i].events)
            }
            pthread_mutex_lock(lock)
            let pending = tasks
            tasks.removeAll()
            let stop = stopping
            pthread_mutex_unlock(lock)
            for task in pending { task() }
            if stop { return }
            let after = monotonicNow()
            for i in tickers.indices where tickers[i].next <= after {
                tickers[i].next = after + tickers[i].interval
                tickers[i].body()
            }
        }
    }
}

/// Seconds on the monotonic clock.
public func monotonicNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// O_NONBLOCK on a descriptor.
public func setNonBlocking(_ fd: Int32) {
    let flags = fcntl(fd, F_GETFL)
    // Sockets handed over by smtp-listen are non-blocking already.
    guard flags >= 0, flags & O_NONBLOCK == 0 else { return }
    _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
}
