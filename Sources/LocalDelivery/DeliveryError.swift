// Typed delivery failures: every error that reaches a RESULT frame carries an
// RFC 3463 enhanced status code and a reason, and says whether it is temporary
// (the queue retries: "deferred") or permanent (the queue bounces).

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct DeliveryError: Error, Sendable, Equatable, CustomStringConvertible {
    /// RFC 3463 enhanced status code, e.g. "4.2.0" or "5.1.1". The first digit
    /// decides: 4 is temporary, 5 permanent.
    public var status: String
    /// What happened, for the log line and the DSN.
    public var text: String

    public init(status: String, text: String) {
        self.status = status
        self.text = text
    }

    public var isTemporary: Bool { status.hasPrefix("4") }
    public var description: String { "\(status) \(text)" }

    // MARK: Common cases

    /// The recipient's local part names no user and no alias.
    public static func unknownUser(_ name: String) -> DeliveryError {
        DeliveryError(status: "5.1.1", text: "unknown user: \"\(name)\"")
    }

    /// The message already carries our Delivered-To line for this recipient:
    /// it went around a forwarding loop.
    public static func mailLoop(_ address: String) -> DeliveryError {
        DeliveryError(status: "5.4.6", text: "mail forwarding loop for \(address)")
    }

    /// A system call on the mailbox failed. The code follows RFC 3463 and what
    /// administrators expect: a quota is "mailbox full" (X.2.2), a full disk
    /// "mail system full" (X.3.1), a mailbox we cannot use (permissions, a file
    /// where a directory should be) a mailbox problem (X.2.0), anything else
    /// a system problem (X.3.0). All of them are temporary: an administrator
    /// can fix each without the sender doing anything.
    public static func system(_ operation: String, path: String, errno code: Int32) -> DeliveryError {
        let reason = String(cString: strerror(code))
        let status: String
        switch code {
        case EDQUOT, EFBIG: status = "4.2.2"
        case ENOSPC: status = "4.3.1"
        case EACCES, EPERM, ENOTDIR, EISDIR, ELOOP, EROFS, ENAMETOOLONG: status = "4.2.0"
        default: status = "4.3.0"
        }
        return DeliveryError(status: status, text: "cannot \(operation) \(path): \(reason)")
    }
}
