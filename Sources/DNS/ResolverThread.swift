// A Resolver pumped by a thread of its own, with async/await entry points.
//
// SwiftNIO offers no way to watch a foreign descriptor for readability
// without reading from it, and ub_fd must be read by ub_process alone. So
// the resolver gets one small thread that polls ub_fd plus a wake-up pipe
// (written when a query with an earlier deadline arrives, or on shutdown),
// calls processEvents / expireDeadlines, and resumes the awaiting tasks.

import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

public final class ResolverThread: Sendable {
    public let resolver: Resolver
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let stopping = Atomic<Bool>(false)
    private let thread = Mutex<pthread_t?>(nil)

    public init(_ resolver: Resolver) throws(DNSError) {
        self.resolver = resolver
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw .configuration("pipe: \(String(cString: strerror(errno)))")
        }
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        }
        wakeRead = fds[0]
        wakeWrite = fds[1]
        let box = Unmanaged.passRetained(self)
        var handle = pthread_t()
        let code = pthread_create(&handle, nil, { argument in
            let owner = Unmanaged<ResolverThread>.fromOpaque(argument!).takeRetainedValue()
            owner.loop()
            return nil
        }, box.toOpaque())
        guard code == 0 else {
            box.release()   // the pipe closes in deinit, which a throw after full initialization runs
            throw .configuration("pthread_create: \(String(cString: strerror(code)))")
        }
        thread.withLock { $0 = handle }
    }

    /// Stops the thread (pending lookups end at their deadlines, unanswered).
    /// Call before dropping the last reference.
    public func shutdown() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        wake()
        if let handle = thread.withLock({ $0 }) {
            if pthread_equal(handle, pthread_self()) == 0 { pthread_join(handle, nil) } else { pthread_detach(handle) }
        }
        // The pipe stays open until deinit: another thread may still be
        // starting a lookup and wake() it, and a descriptor number closed
        // here could by then name another file.
    }

    deinit {
        close(wakeRead)
        close(wakeWrite)
    }

    private func wake() {
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)   // a full pipe already means "wake up"
    }

    private func loop() {
        var drain = [UInt8](repeating: 0, count: 64)
        while !stopping.load(ordering: .acquiring) {
            var timeout: Int32 = -1
            if let deadline = resolver.nextDeadline {
                timeout = Resolver.milliseconds(deadline - ContinuousClock.now)
            }
            var fds = [pollfd(fd: resolver.fileDescriptor, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            let ready = poll(&fds, 2, timeout)
            if ready > 0, fds[1].revents != 0 {
                while read(wakeRead, &drain, drain.count) > 0 {}
            }
            if ready > 0, fds[0].revents != 0 {
                resolver.processEvents()
            } else {
                resolver.expireDeadlines()
            }
        }
    }

    /// Starts a query and wakes the thread so it polls with the new deadline.
    public func query(_ name: String, _ type: RRType, timeout: Duration? = nil,
                      completion: @escaping DNSCompletion) throws(DNSError) {
        try resolver.query(name, type, timeout: timeout, completion: completion)
        wake()
    }

    /// `Resolver.verifiedName`, pumped by this thread.
    public func verifiedName(of address: String, timeout: Duration? = nil,
                             completion: @escaping @Sendable (_ name: String?, _ ttl: UInt32) -> Void) {
        resolver.verifiedName(of: address, timeout: timeout, completion: completion)
        wake()
    }

    public func resolve(_ name: String, _ type: RRType, timeout: Duration? = nil) async throws(DNSError) -> DNSAnswer {
        let result: Result<DNSAnswer, DNSError> = await withCheckedContinuation { continuation in
            do throws(DNSError) {
                try query(name, type, timeout: timeout) { continuation.resume(returning: $0) }
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        return try result.get()
    }

    public func resolveMailExchangers(_ domain: String, timeout: Duration? = nil) async -> MailExchangerResolution {
        await withCheckedContinuation { continuation in
            resolver.resolveMailExchangers(domain, timeout: timeout) { continuation.resume(returning: $0) }
            wake()
        }
    }
}
