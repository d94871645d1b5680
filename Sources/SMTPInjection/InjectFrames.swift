// The frames of the inject protocol (Pipeline/PROTOCOL.md section 4.2)
// for a message received over SMTP: what smtp-listen sends the queue, and
// what queue-inject sends for a message of `sendmail -bs`.

import SMTP
import StageProtocol

public enum InjectFrames {
    /// MAIL without `queue-id` or `announce-id` (set as it goes out).
    public static func mail(_ e: SMTPEnvelope, clientName: String) -> Frame {
        // Each name appended once, in this order, into room made for all
        // of them (and the queue-id or announce-id that sendEnvelope adds):
        // Frame.set would look for the name among those before it first.
        var attributes: [(name: String, value: AttributeValue)] = []
        attributes.reserveCapacity(13)
        func add(_ name: String, _ value: AttributeValue?) {
            if let value { attributes.append((name: name, value: value)) }
        }
        let p = e.parameters
        add("sender", .text(e.sender.address))
        add("ret", p.ret.map { .text($0.rawValue) })
        add("envid", p.envid.map { AttributeValue.sanitizedText($0) })
        if p.requireTLS { add("requiretls", .bool(true)) }
        if p.smtputf8 { add("smtputf8", .bool(true)) }
        add("body-type", p.body.map { .text($0.rawValue) })
        add("client-address", .text(e.client.address))
        add("client-name", AttributeValue.sanitizedText(clientName))
        if !e.helo.isEmpty { add("helo", AttributeValue.sanitizedText(e.helo)) }
        add("protocol", .text(e.protocolName))
        add("auth-user", e.authenticatedUser.map { AttributeValue.sanitizedText($0) })
        add("size", p.size.map { .uint($0) })
        var frame = Frame(.mail)
        frame.attributes = attributes
        return frame
    }

    public static func rcpt(_ r: SMTPRecipient) -> Frame {
        var f = Frame(.rcpt, ["address": .text(r.address)])
        f.set("notify", r.parameters.notify.map { .text($0.description) })
        f.set("orcpt", r.parameters.orcpt.map { AttributeValue.sanitizedText($0.description) })
        return f
    }

    /// BODY frames of at most 64 KiB (the protocol's limit for bytes).
    public static func body(_ bytes: [UInt8]) -> [Frame] {
        var frames: [Frame] = []
        var start = 0
        while start < bytes.count {
            let end = min(bytes.count, start + WireLimits.maxBytes)
            frames.append(Frame(.body, ["data": .bytes(Array(bytes[start..<end]))]))
            start = end
        }
        return frames
    }

    /// The queue's REFUSED as an SMTP reply; a malformed one (a code that is
    /// not 4xx/5xx, a status that does not parse or does not match the
    /// code's class) becomes 451 4.3.0: never a success, never garbage.
    public static func reply(fromRefused frame: Frame) -> SMTPReply {
        guard let code = try? frame.uint("code"), (400...599).contains(code),
              let statusText = try? frame.text("status"), let status = EnhancedStatus(parsing: statusText),
              status.codeClass == Int(code / 100), let text = try? frame.text("text")
        else { return SMTPReply(451, "4.3.0", "Queue refused the message") }
        return SMTPReply(Int(code), status, text.isEmpty ? "Refused" : text)
    }
}
