// Which delivery stage handles a recipient, and how recipients are grouped
// into jobs.

import MailMessage
import Spool

/// The delivery transports of PROTOCOL.md 4.3 (`transport` of a deliver HELLO).
public enum Transport: String, Sendable, CaseIterable, Hashable {
    case local, remote

    /// The name of the stage that serves it, for log lines.
    public var stageName: String { self == .local ? "local-deliver" : "remote-deliver" }
}

/// Where one job goes: a transport and, for `remote`, the destination domain
/// (sent as `nexthop`). Local jobs carry no nexthop: one job holds all the
/// local recipients of a message that are due.
public struct Destination: Hashable, Sendable, CustomStringConvertible {
    public var transport: Transport
    public var nexthop: String?
    public init(transport: Transport, nexthop: String?) { self.transport = transport; self.nexthop = nexthop }
    public var description: String { nexthop.map { "\(transport.rawValue):\($0)" } ?? transport.rawValue }
}

/// Decides each recipient's destination from its address.
public struct Router: Sendable {
    private let isLocal: @Sendable (String) -> Bool

    /// `isLocal` receives the lower-cased domain of an address (SealpostConfig's
    /// `LocalSettings.isLocal(domain:)` in the service).
    public init(isLocal: @escaping @Sendable (String) -> Bool) { self.isLocal = isLocal }

    /// The domain of an address: what follows the last "@" byte,
    /// lower-cased; nil for a bare local part such as "postmaster".
    public static func domain(of address: String) -> String? {
        EnvelopeAddress.domain(of: address)
    }

    /// A bare local part (no domain) is local: it can only mean a user here.
    public func destination(of address: String) -> Destination {
        guard let domain = Router.domain(of: address) else { return Destination(transport: .local, nexthop: nil) }
        if isLocal(domain) { return Destination(transport: .local, nexthop: nil) }
        return Destination(transport: .remote, nexthop: domain)
    }
}
