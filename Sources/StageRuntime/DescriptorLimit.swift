// The descriptor limit of the long-running stages.
//
// The soft RLIMIT_NOFILE a stage inherits is usually 1024 (systemd's and
// most shells' default) while the hard limit is far higher (524288 under
// systemd). The queue holds a descriptor per inject connection and
// smtp-listen one per session (and one per pooled inject connection), so
// around a thousand sessions would meet EMFILE at the soft limit for no
// reason: the hard limit is what the administrator allowed. So each stage
// raises its soft limit to the hard one at start, as Postfix's
// open_limit() does.
//
// Above 1024 a descriptor no longer fits in an fd_set: select(2) and
// FD_SET on it write past the set (with _FORTIFY_SOURCE, FD_SET aborts
// instead). What the stages link was checked for that (Debian 12, 2026-12):
// - Sealpost's own code and SwiftNIO wait with poll(2) and epoll; so do
//   libdispatch and LMDB (which waits on nothing).
// - libunbound (smtp-listen, remote-deliver) is built with libevent
//   (libunbound8 depends on libevent-2.1-7; it imports event_base_new and
//   not select). Its resolver thread (ub_ctx_async(ctx, 1)) and ub_resolve
//   make their event bases with event_base_new, which picks epoll on Linux;
//   at verbosity 4 it says "pluggable-libevent 2.1.12-stable uses epoll
//   method", and with 1100 descriptors open it registered its sockets
//   1112 and 1113 with epoll_ctl and answered. libevent's select backend
//   (whose FD_SET is fortified: an abort, not corruption) is used only when
//   epoll and poll are disabled with EVENT_NOEPOLL and EVENT_NOPOLL in the
//   environment, which the supervisor never passes. ub_fd is waited on
//   with poll (DNS's Resolver and ResolverThread).
// - libcrypto (crypto-negotiate) calls select only in BIO_socket_wait (the
//   HTTP client and BIO_do_connect_retry, which the TLS module does not
//   use: it reads and writes with SSL_read/SSL_write on non-blocking
//   sockets under epoll) and in the /dev/random wait for kernels before 4.8.
// - Foundation calls select only in CFSocket, which no stage uses.
// - libcurl is not linked by any stage.
// So no stage needs a cap at FD_SETSIZE; a library added later that uses
// select must be checked against this.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging

/// What `StageRuntime.raiseDescriptorLimit()` did to the soft RLIMIT_NOFILE.
public enum DescriptorLimitChange: Sendable, Equatable, CustomStringConvertible {
    /// The soft limit went from `from` up to the hard limit `to`.
    case raised(from: UInt64, to: UInt64)
    /// The soft limit was the hard limit already.
    case unchanged(limit: UInt64)
    /// getrlimit or setrlimit failed; the soft limit is still `soft`.
    case failed(soft: UInt64, hard: UInt64, reason: String)

    public var description: String {
        switch self {
        case .raised(let from, let to): "descriptor limit raised from \(from) to \(to)"
        case .unchanged(let limit): "descriptor limit \(limit)"
        case .failed(let soft, let hard, let reason):
            "descriptor limit not raised from \(soft) to the hard limit \(hard): \(reason)"
        }
    }
}

extension StageRuntime {
    /// Raises the soft RLIMIT_NOFILE to the hard limit (see the top of this
    /// file for why, and why no stage needs to stay below FD_SETSIZE).
    /// `bootstrap` calls it, after setting up logging: a failure is logged
    /// as a warning (the stage runs on with the limit it has); success logs
    /// nothing.
    @discardableResult
    public static func raiseDescriptorLimit() -> DescriptorLimitChange {
        let change = raiseSoftDescriptorLimit()
        if case .failed = change { Logger(label: "stage").warning("\(change)") }
        return change
    }

    static func raiseSoftDescriptorLimit() -> DescriptorLimitChange {
        var limit = rlimit()
        guard getrlimit(resourceNoFile, &limit) == 0 else {
            return .failed(soft: 0, hard: 0, reason: "getrlimit: \(String(cString: strerror(errno)))")
        }
        let soft = UInt64(limit.rlim_cur), hard = UInt64(limit.rlim_max)
        guard limit.rlim_cur < limit.rlim_max else { return .unchanged(limit: soft) }
        limit.rlim_cur = limit.rlim_max
        guard setrlimit(resourceNoFile, &limit) == 0 else {
            return .failed(soft: soft, hard: hard, reason: "setrlimit: \(String(cString: strerror(errno)))")
        }
        return .raised(from: soft, to: hard)
    }

    /// The soft RLIMIT_NOFILE now; nil when unlimited (RLIM_INFINITY, all
    /// ones, which Swift cannot import as a literal) or unknown.
    public static func descriptorLimit() -> UInt64? {
        var limit = rlimit()
        guard getrlimit(resourceNoFile, &limit) == 0, limit.rlim_cur != rlim_t.max else { return nil }
        return UInt64(limit.rlim_cur)
    }

    /// RLIMIT_NOFILE as getrlimit takes it: an enum (__rlimit_resource) in
    /// glibc, an Int32 on Darwin.
    #if canImport(Glibc)
    static let resourceNoFile = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
    #else
    static let resourceNoFile = RLIMIT_NOFILE
    #endif
}
