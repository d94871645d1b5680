// TEMPORARY: the Spool module's value types exactly as HACKING.md specifies
// them, so that the pure scheduling logic compiles and is tested before the
// Spool branch lands. Deleted (and replaced by `import Spool`) at the merge.

public struct QueueID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public var description: String { rawValue }
    public static func < (a: QueueID, b: QueueID) -> Bool { a.rawValue < b.rawValue }
}
public enum RecipientState: String, Sendable { case pending, deferred, sent, bounced }
public enum MessageKind: UInt8, Sendable { case normal = 0, bounce = 1, doubleBounce = 2 }
public struct RecipientRecord: Sendable, Equatable {
    public var address: String; public var notify: String?; public var orcpt: String?
    public var state: RecipientState; public var attempts: UInt32; public var nextAttempt: UInt64
    public var lastError: String?; public var dsnStatus: String?
    public var remoteMTA: String?; public var diagnostic: String?; public var delayNotified: Bool
    public init(address: String, notify: String? = nil, orcpt: String? = nil, state: RecipientState = .pending,
                attempts: UInt32 = 0, nextAttempt: UInt64 = 0, lastError: String? = nil, dsnStatus: String? = nil,
                remoteMTA: String? = nil, diagnostic: String? = nil, delayNotified: Bool = false) {
        self.address = address; self.notify = notify; self.orcpt = orcpt; self.state = state
        self.attempts = attempts; self.nextAttempt = nextAttempt; self.lastError = lastError
        self.dsnStatus = dsnStatus; self.remoteMTA = remoteMTA; self.diagnostic = diagnostic
        self.delayNotified = delayNotified
    }
}
public struct EnvelopeRecord: Sendable, Equatable {
    public var queueID: QueueID; public var sender: String; public var arrival: UInt64; public var size: UInt64
    public var ret: String?; public var envid: String?; public var requireTLS: Bool; public var smtputf8: Bool
    public var bodyType: String?; public var clientAddress: String?; public var clientName: String?
    public var helo: String?; public var protocolName: String?; public var authUser: String?; public var peerUID: UInt32?
    public var held: Bool; public var kind: MessageKind; public var recipients: [RecipientRecord]
    public init(queueID: QueueID, sender: String, arrival: UInt64, size: UInt64, ret: String? = nil,
                envid: String? = nil, requireTLS: Bool = false, smtputf8: Bool = false, bodyType: String? = nil,
                clientAddress: String? = nil, clientName: String? = nil, helo: String? = nil,
                protocolName: String? = nil, authUser: String? = nil, peerUID: UInt32? = nil,
                held: Bool = false, kind: MessageKind = .normal, recipients: [RecipientRecord]) {
        self.queueID = queueID; self.sender = sender; self.arrival = arrival; self.size = size
        self.ret = ret; self.envid = envid; self.requireTLS = requireTLS; self.smtputf8 = smtputf8
        self.bodyType = bodyType; self.clientAddress = clientAddress; self.clientName = clientName
        self.helo = helo; self.protocolName = protocolName; self.authUser = authUser; self.peerUID = peerUID
        self.held = held; self.kind = kind; self.recipients = recipients
    }
}
