// Mail-loop detection with Delivered-To, as local delivery agents have done
// for decades: every delivery (to a mailbox or forwarded) prepends
// "Delivered-To: <address>"; a message that already carries a Delivered-To
// for the address being delivered has gone around a forwarding loop and is
// returned to its sender (5.4.6) instead of circulating forever.

/// The addresses of the message's Delivered-To header fields, lower-cased,
/// without angle brackets. Reads only the header block (up to the first empty
/// line); the body may legitimately quote such lines.
public func deliveredToAddresses(in chunks: [[UInt8]]) -> Set<String> {
    var found = Set<String>()
    var line: [UInt8] = []
    var field: [UInt8]? = nil   // current (unfolded) field

    func finishField() {
        guard let f = field else { return }
        field = nil
        guard let colon = f.firstIndex(of: UInt8(ascii: ":")) else { return }
        let name = String(decoding: f[..<colon], as: UTF8.self)
            .trimmingSpaces().lowercased()
        guard name == "delivered-to" else { return }
        var value = String(decoding: f[(colon + 1)...], as: UTF8.self).trimmingSpaces()
        if value.hasPrefix("<") && value.hasSuffix(">") && value.count >= 2 {
            value = String(value.dropFirst().dropLast())
        }
        if !value.isEmpty { found.insert(value.lowercased()) }
    }

    // Returns false at the end of the header block.
    func take(_ line: [UInt8]) -> Bool {
        if line.isEmpty {
            finishField()
            return false
        }
        if line[0] == 0x20 || line[0] == 0x09 {
            field?.append(0x20)
            field?.append(contentsOf: line)
        } else {
            finishField()
            field = line
        }
        return true
    }

    for chunk in chunks {
        for byte in chunk {
            if byte == 0x0A {
                if line.last == 0x0D { line.removeLast() }
                if !take(line) { return found }
                line.removeAll(keepingCapacity: true)
            } else {
                line.append(byte)
            }
        }
    }
    if !line.isEmpty { _ = take(line) }
    finishField()
    return found
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s.removeFirst() }
        while let l = s.last, l == " " || l == "\t" { s.removeLast() }
        return String(s)
    }
}
