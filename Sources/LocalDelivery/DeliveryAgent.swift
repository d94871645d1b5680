// One job from the queue -> one result per recipient: resolve each recipient
// (aliases, users, extensions), refuse loops, write a Maildir copy per local
// mailbox, re-inject a copy per non-local alias target, log one line per
// destination in the style of Postfix's local(8).

import StageProtocol

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct RecipientResult: Sendable, Equatable {
    public enum Status: String, Sendable { case sent, deferred, bounced }
    public var index: UInt64
    public var status: Status
    public var dsn: String
    public var text: String
    public var relay: String?

    public init(index: UInt64, status: Status, dsn: String, text: String, relay: String? = nil) {
        self.index = index
        self.status = status
        self.dsn = dsn
        self.text = text
        self.relay = relay
    }
}

/// Re-injects a copy of a message for a non-local alias target. The real one
/// speaks `inject` to the queue (InjectForwarder); returns the new queue id.
/// `recipient`: the job's recipient whose alias named `address`.
public protocol MessageForwarder: Sendable {
    func forward(_ job: DeliveryJob, to address: String, for recipient: DeliveryJob.Recipient,
                 prepending header: [UInt8]) throws(DeliveryError) -> String
}

/// Where log lines go: lines are "QUEUEID: key=value, ..." without the
/// "stage[pid]: " prefix, which the logging backend adds.
public struct DeliveryLog: Sendable {
    public var info: @Sendable (String) -> Void
    public var warning: @Sendable (String) -> Void

    public init(info: @escaping @Sendable (String) -> Void, warning: @escaping @Sendable (String) -> Void) {
        self.info = info
        self.warning = warning
    }

    public static let discard = DeliveryLog(info: { _ in }, warning: { _ in })
}

public final class LocalDeliveryAgent: Sendable {
    public let resolver: RecipientResolver
    /// Data directory as seen by this process (after chroot: "/").
    public let dataDirectory: String
    /// Mailbox template with "{user}", relative to the data directory.
    public let mailboxTemplate: String
    public let namer: MaildirNamer
    public let forwarder: (any MessageForwarder)?
    public let log: DeliveryLog

    public init(resolver: RecipientResolver, dataDirectory: String, mailboxTemplate: String,
                namer: MaildirNamer = MaildirNamer(), forwarder: (any MessageForwarder)?,
                log: DeliveryLog) {
        self.resolver = resolver
        self.dataDirectory = dataDirectory
        self.mailboxTemplate = mailboxTemplate
        self.namer = namer
        self.forwarder = forwarder
        self.log = log
    }

    /// The Maildir of `user`.
    public func maildirPath(user: String) -> String {
        let relative = mailboxTemplate.replacingAll("{user}", with: user)
        if relative.hasPrefix("/") { return relative }
        return dataDirectory.hasSuffix("/") ? dataDirectory + relative : dataDirectory + "/" + relative
    }

    /// Delivers every recipient of `job` (each destination at most once per
    /// job) and returns one result per recipient, in the job's order.
    public func deliver(_ job: DeliveryJob) -> [RecipientResult] {
        let seen = deliveredToAddresses(in: job.body)
        // Outcome of each destination already handled in this job: a second
        // recipient reaching the same mailbox does not get a second copy.
        var done: [String: Result<String, DeliveryError>] = [:]
        var results: [RecipientResult] = []
        for recipient in job.recipients {
            results.append(deliver(recipient, of: job, seen: seen, done: &done))
        }
        return results
    }

    private func deliver(_ recipient: DeliveryJob.Recipient, of job: DeliveryJob, seen: Set<String>,
                         done: inout [String: Result<String, DeliveryError>]) -> RecipientResult {
        let original = recipient.address
        let destinations: [Destination]
        do throws(DeliveryError) {
            let resolved = try resolver.resolution(original)
            destinations = resolved.destinations
            // The administrator's to fix (a member whose account is gone):
            // the other members get their copies.
            for member in resolved.skipped {
                log.warning("\(job.queueID): to=<\(original)>: alias member left out, not a local user, an alias or an address: \(member)")
            }
            if seen.contains(original.lowercased()) {
                throw DeliveryError.mailLoop(original)
            }
            // A member of an alias that already had this message is left
            // out (below), as Postfix refuses only the looping address: one
            // member that redirected the message to its alias must not cost
            // the others their copy. Only when every member loops does the
            // recipient bounce.
            if let looping = destinations.first, destinations.allSatisfy({ seen.contains($0.address.lowercased()) }) {
                throw DeliveryError.mailLoop(looping.address)
            }
        } catch {
            logLine(job, to: original, origTo: nil, dsn: error.status,
                    status: error.isTemporary ? "deferred" : "bounced", text: error.text)
            return RecipientResult(index: recipient.index, status: error.isTemporary ? .deferred : .bounced,
                                   dsn: error.status, text: error.text)
        }

        var firstTemporary: DeliveryError? = nil
        var firstPermanent: DeliveryError? = nil
        var mailboxes = 0
        var forwards: [String] = []
        for destination in destinations {
            let origTo = destination.address.lowercased() == original.lowercased() ? nil : original
            if seen.contains(destination.address.lowercased()) {
                let loop = DeliveryError.mailLoop(destination.address)
                logLine(job, to: destination.address, origTo: origTo, dsn: loop.status, status: "bounced", text: loop.text)
                continue
            }
            let outcome: Result<String, DeliveryError>
            var duplicate = false
            if let previous = done[destination.identity] {
                outcome = previous
                duplicate = true
            } else {
                outcome = perform(destination, recipient: recipient, job: job)
                done[destination.identity] = outcome
            }
            switch outcome {
            case .success(let what):
                switch destination {
                case .mailbox: mailboxes += 1
                case .forward(let a): forwards.append(a)
                }
                logLine(job, to: destination.address, origTo: origTo, dsn: "2.0.0", status: "sent",
                        text: duplicate ? "duplicate: \(what) already" : what)
            case .failure(let error):
                if error.isTemporary {
                    if firstTemporary == nil { firstTemporary = error }
                } else if firstPermanent == nil {
                    firstPermanent = error
                }
                logLine(job, to: destination.address, origTo: origTo, dsn: error.status,
                        status: error.isTemporary ? "deferred" : "bounced", text: error.text)
            }
        }

        // One RESULT per recipient: a temporary failure of any destination
        // defers the recipient (the queue tries again; destinations that
        // succeeded may then get a second copy, as with any MTA that expands
        // aliases), otherwise a permanent one bounces it.
        if let e = firstTemporary {
            return RecipientResult(index: recipient.index, status: .deferred, dsn: e.status, text: e.text)
        }
        if let e = firstPermanent {
            return RecipientResult(index: recipient.index, status: .bounced, dsn: e.status, text: e.text)
        }
        var parts: [String] = []
        if mailboxes == 1 { parts.append("delivered to maildir") }
        if mailboxes > 1 { parts.append("delivered to \(mailboxes) maildirs") }
        if !forwards.isEmpty { parts.append("forwarded to " + forwards.joined(separator: ", ")) }
        let relay = forwards.isEmpty ? "maildir" : (mailboxes == 0 ? "forwarded" : "maildir+forwarded")
        return RecipientResult(index: recipient.index, status: .sent, dsn: "2.0.0",
                               text: parts.joined(separator: "; "), relay: relay)
    }

    /// Delivers one copy; the success value is the log text.
    private func perform(_ destination: Destination, recipient: DeliveryJob.Recipient, job: DeliveryJob) -> Result<String, DeliveryError> {
        switch destination {
        case .mailbox(let user, let address):
            var header = Array("Return-Path: <\(job.sender)>\n".utf8)
            header += Array("Delivered-To: \(address)\n".utf8)
            do {
                try Maildir(path: maildirPath(user: user)).deliver(header: header, chunks: job.body, namer: namer)
                return .success("delivered to maildir")
            } catch {
                return .failure(error)
            }
        case .forward(let address):
            guard let forwarder else {
                return .failure(DeliveryError(status: "4.3.5", text: "forwarding to \(address) is not configured"))
            }
            // The forwarded copy carries our Delivered-To for the address
            // that was expanded: if it comes back here, that is a loop.
            let header = Array("Delivered-To: \(recipient.address.lowercased())\r\n".utf8)
            do {
                let queueID = try forwarder.forward(job, to: address, for: recipient, prepending: header)
                return .success("forwarded as \(queueID)")
            } catch {
                return .failure(error)
            }
        }
    }

    /// Bounces every recipient of a job whose message is over the local
    /// delivery limit (the queue does not log what a stage reports: the
    /// stage logs it, PROTOCOL.md 4.3).
    public func refuseOversized(_ job: DeliveryJob, limit: Int) -> [RecipientResult] {
        let text = "message larger than the local delivery limit of \(limit) bytes"
        return job.recipients.map { r in
            logLine(job, to: r.address, origTo: nil, dsn: "5.3.4", status: "bounced", text: text)
            return RecipientResult(index: r.index, status: .bounced, dsn: "5.3.4", text: text)
        }
    }

    /// `QUEUEID: to=<a>, orig_to=<b>, relay=local, delay=0, dsn=2.0.0, status=sent (text)`
    private func logLine(_ job: DeliveryJob, to: String, origTo: String?, dsn: String, status: String, text: String) {
        var line = "\(job.queueID): to=<\(to)>"
        if let origTo { line += ", orig_to=<\(origTo)>" }
        line += ", relay=local, delay=\(job.delay(now: UInt64(time(nil)))), dsn=\(dsn), status=\(status) (\(text))"
        log.info(line)
    }
}

extension String {
    func replacingAll(_ target: String, with replacement: String) -> String {
        guard !target.isEmpty else { return self }
        var out = ""
        var rest = Substring(self)
        while let range = rest.firstRange(of: target) {
            out += rest[..<range.lowerBound]
            out += replacement
            rest = rest[range.upperBound...]
        }
        out += rest
        return out
    }
}
