/// SASL pieces for AUTH (RFC 4954): strict base64 (RFC 4648 section 4, with
/// padding, no whitespace), the PLAIN message (RFC 4616) and the LOGIN
/// prompts. The password check itself belongs to the I/O layer.

public enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    private static let table: [Int8] = {
        var t = [Int8](repeating: -1, count: 256)
        for (i, c) in alphabet.enumerated() { t[Int(c)] = Int8(i) }
        return t
    }()

    public static func encode(_ bytes: some Collection<UInt8>) -> String {
        let input = Array(bytes)
        var out: [UInt8] = []
        out.reserveCapacity((input.count + 2) / 3 * 4)
        var i = 0
        while i + 3 <= input.count {
            let v = UInt32(input[i]) << 16 | UInt32(input[i + 1]) << 8 | UInt32(input[i + 2])
            out += [alphabet[Int(v >> 18 & 63)], alphabet[Int(v >> 12 & 63)], alphabet[Int(v >> 6 & 63)], alphabet[Int(v & 63)]]
            i += 3
        }
        let rest = input.count - i
        if rest == 1 {
            let v = UInt32(input[i]) << 16
            out += [alphabet[Int(v >> 18 & 63)], alphabet[Int(v >> 12 & 63)], 61, 61]
        } else if rest == 2 {
            let v = UInt32(input[i]) << 16 | UInt32(input[i + 1]) << 8
            out += [alphabet[Int(v >> 18 & 63)], alphabet[Int(v >> 12 & 63)], alphabet[Int(v >> 6 & 63)], 61]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Strict decoding: length a multiple of 4, padding only at the end,
    /// unused bits zero (so every input has exactly one valid spelling).
    public static func decode(_ bytes: some Collection<UInt8>) -> [UInt8]? {
        let input = Array(bytes)
        guard input.count % 4 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(input.count / 4 * 3)
        var i = 0
        while i < input.count {
            let last = i + 4 == input.count
            let c = input[i..<(i + 4)]
            let pad = c.reversed().prefix { $0 == 61 }.count
            guard pad <= 2, pad == 0 || last else { return nil }
            var v: UInt32 = 0
            for (k, ch) in c.enumerated() {
                if k >= 4 - pad { v <<= 6; continue }
                let d = table[Int(ch)]
                guard d >= 0 else { return nil }
                v = v << 6 | UInt32(d)
            }
            out.append(UInt8(v >> 16 & 255))
            if pad < 2 { out.append(UInt8(v >> 8 & 255)) } else if v & 0xFFFF != 0 { return nil }
            if pad < 1 { out.append(UInt8(v & 255)) } else if v & 0xFF != 0 { return nil }
            i += 4
        }
        return out
    }
}

enum SASL {
    static let usernamePrompt = "VXNlcm5hbWU6"   // "Username:"
    static let passwordPrompt = "UGFzc3dvcmQ6"   // "Password:"

    /// RFC 4616: [authzid] NUL authcid NUL passwd, all UTF-8, authcid and
    /// passwd non-empty, no further NUL.
    static func parsePlain(_ message: [UInt8]) -> (authzid: String?, user: String, password: String)? {
        let parts = message.split(separator: 0, maxSplits: 3, omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[1].isEmpty, !parts[2].isEmpty, parts[0].count <= 255,
              parts[1].count <= 255, parts[2].count <= 255,
              let z = String(validating: parts[0], as: UTF8.self),
              let u = String(validating: parts[1], as: UTF8.self),
              let p = String(validating: parts[2], as: UTF8.self) else { return nil }
        return (z.isEmpty ? nil : z, u, p)
    }

    /// A LOGIN username or password: UTF-8, non-empty, no NUL or line break.
    static func parseLoginField(_ message: [UInt8]) -> String? {
        guard !message.isEmpty, message.count <= 255,
              !message.contains(where: { $0 == 0 || $0 == 10 || $0 == 13 }) else { return nil }
        return String(validating: message, as: UTF8.self)
    }
}
