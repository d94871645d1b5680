// Forwarding for alias targets outside the local domains: the copy goes back
// into the queue as a new message, through the queue's inject socket
// (Pipeline/PROTOCOL.md section 4.2), exactly as queue-inject would submit
// it. The queue then owns it (it answers ACCEPTED only after its commit) and
// remote-deliver delivers it; its fate no longer concerns the original job.

import StageProtocol

public struct InjectForwarder: MessageForwarder {
    public let socketPath: String

    public init(socketPath: String) {
        self.socketPath = socketPath
    }

    /// Injects `header` + the job's body (CRLF, as received) from the job's
    /// sender to `address`, keeping the envelope options that must survive
    /// forwarding (REQUIRETLS above all, RFC 8689 section 5) and the
    /// recipient's NOTIFY and ORCPT. Returns the new message's queue id.
    public func forward(_ job: DeliveryJob, to address: String, for recipient: DeliveryJob.Recipient,
                        prepending header: [UInt8]) throws(DeliveryError) -> String {
        do {
            return try inject(job, to: address, for: recipient, header: header)
        } catch let error as DeliveryError {
            throw error
        } catch let error as PeerError {
            // ERROR is the queue refusing the conversation (a protocol or
            // version mismatch, its limits): local software's fault, never
            // the recipient's, so the mail waits. Only REFUSED bounces.
            throw DeliveryError(status: "4.3.0", text: "cannot forward to \(address): the queue said: \(error.status) \(error.text)")
        } catch {
            throw DeliveryError(status: "4.3.0", text: "cannot forward to \(address): \(error)")
        }
    }

    private func inject(_ job: DeliveryJob, to address: String, for recipient: DeliveryJob.Recipient,
                        header: [UInt8]) throws -> String {
        let connection = try StageConnection.connect(path: socketPath)
        defer { connection.close() }
        try connection.clientHello(.inject, extra: [("software", .text(DeliveryWorker.software))])

        var mail = Frame(.mail, ["sender": .text(job.sender), "protocol": .text("local")])
        mail.set("ret", job.ret.map { .text($0) })
        mail.set("envid", job.envid.map { .text($0) })
        if job.requireTLS { mail.set("requiretls", .bool(true)) }
        if job.smtputf8 { mail.set("smtputf8", .bool(true)) }
        mail.set("body-type", job.bodyType.map { .text($0) })
        try connection.send(mail)
        // The sender's DSN request follows the message (RFC 3461 6.2.7:
        // an alias is relayed on): NOTIFY as asked (NEVER stays never), and
        // the original recipient, so that a notice from further on names
        // the address the sender used.
        var rcpt = Frame(.rcpt, ["address": .text(address)])
        rcpt.set("notify", recipient.notify.map { .text($0) })
        rcpt.set("orcpt", .text(recipient.orcpt ?? "rfc822;" + recipient.address))
        try connection.send(rcpt)
        if !header.isEmpty {
            try connection.send(Frame(.body, ["data": .bytes(header)]))
        }
        for chunk in job.body where !chunk.isEmpty {
            // Chunks came in BODY frames, so each fits one; split anyway in
            // case a caller built bigger ones.
            var start = 0
            while start < chunk.count {
                let end = min(start + 65_536, chunk.count)
                try connection.send(Frame(.body, ["data": .bytes(Array(chunk[start..<end]))]))
                start = end
            }
        }
        try connection.send(Frame(.end))
        guard let reply = try connection.receive() else {
            throw DeliveryError(status: "4.3.0", text: "cannot forward to \(address): the queue closed the connection")
        }
        switch reply.type {
        case .accepted:
            return try reply.text("queue-id")
        case .refused:
            let status = try reply.text("status")
            let code = try reply.uint("code")
            let permanent = code >= 500 && status.hasPrefix("5")
            throw DeliveryError(status: permanent ? status : (status.hasPrefix("4") ? status : "4.3.0"),
                                text: "cannot forward to \(address): \(code) \(status) \(try reply.text("text"))")
        case .error:
            throw PeerError(status: try reply.text("status"), text: try reply.text("text"))
        default:
            throw ProtocolError("\(reply.type.name): expected ACCEPTED or REFUSED")
        }
    }
}
