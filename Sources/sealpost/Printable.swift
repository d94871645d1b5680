// What `sealpost queue list` and `show` print comes from the network:
// senders, recipients, errors from remote servers, message bodies. A
// terminal takes control characters as commands (ESC starts sequences that
// can retitle the window, rewrite what is on screen, on some terminals
// even answer back as if typed), and the bidirectional formatting
// characters reorder what is shown. So every one of them is shown as an
// escape: C0 controls (except TAB, and LF in a message), DEL and the C1
// controls as \u{1b}, the bidi controls as \u{202e}, and bytes that are not
// UTF-8 as \xff. `show --raw` prints the message exactly as queued.

enum Printable {
    /// One line of text (an address, an error): no control character
    /// survives, not even a line end.
    static func text(_ s: String) -> String {
        String(decoding: escape(Array(s.utf8), keepLineEnds: false), as: UTF8.self)
    }

    /// A message for the terminal (LF line ends already): lines and tabs
    /// kept, everything else escaped as in `text`.
    static func message(_ bytes: [UInt8]) -> [UInt8] {
        escape(bytes, keepLineEnds: true)
    }

    static func escape(_ bytes: [UInt8], keepLineEnds: Bool) -> [UInt8] {
        // The common case: plain printable ASCII, TAB and line ends.
        if !bytes.contains(where: { ($0 < 0x20 && $0 != 0x09 && !(keepLineEnds && $0 == 0x0A)) || $0 >= 0x7F }) {
            return bytes
        }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + 16)
        var parser = Unicode.UTF8.ForwardParser()
        var iterator = bytes.makeIterator()
        var offset = 0
        while true {
            switch parser.parseScalar(from: &iterator) {
            case .valid(let encoded):
                let scalar = Unicode.UTF8.decode(encoded).value
                if shown(scalar, keepLineEnds: keepLineEnds) {
                    out.append(contentsOf: encoded)
                } else {
                    out.append(contentsOf: "\\u{\(String(scalar, radix: 16))}".utf8)
                }
                offset += encoded.count
            case .error(let length):
                for byte in bytes[offset..<offset + length] {
                    let hex = String(byte, radix: 16)
                    out.append(contentsOf: ("\\x" + (hex.count == 1 ? "0" : "") + hex).utf8)
                }
                offset += length
            case .emptyInput:
                return out
            }
        }
    }

    private static func shown(_ scalar: UInt32, keepLineEnds: Bool) -> Bool {
        switch scalar {
        case 0x09: return true
        case 0x0A: return keepLineEnds
        case 0..<0x20, 0x7F...0x9F: return false
        // Bidirectional formatting: LRE..RLO, LRI..PDI, and the marks.
        case 0x202A...0x202E, 0x2066...0x2069, 0x200E, 0x200F, 0x061C: return false
        default: return true
        }
    }
}
