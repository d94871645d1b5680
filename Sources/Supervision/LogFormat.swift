// Log lines as syslog writes them: "Nov 29 16:13:43 host queue[812]: text".

#if canImport(Glibc)
import Glibc
#endif

public enum LogFormat {
    /// "Nov 29 16:13:43" in local time, in the C locale (the supervisor never
    /// calls setlocale, so strftime's names are English, as syslog's).
    public static func timestamp(_ time: time_t) -> String {
        var t = time
        var parts = tm()
        guard localtime_r(&t, &parts) != nil else { return "??? ?? ??:??:??" }
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, buffer.count, "%b %e %H:%M:%S", &parts)
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The host part of a syslog line: the first label of the host name.
    public static func shortHostname(_ name: String) -> String {
        let label = name.split(separator: ".", maxSplits: 1).first.map(String.init) ?? ""
        return label.isEmpty ? "localhost" : label
    }

    /// A line a stage wrote, made safe and attributed: control bytes (other
    /// than TAB) become "?", a trailing CR goes, invalid UTF-8 is replaced,
    /// and a line that does not already start with "stage[pid]: " (its own
    /// name) gets "stage[pid]: " in front, so every line says where it came
    /// from: a line in another program's name ("queue[1]: ...", from a
    /// stage that faces the network) keeps the name of the stage that
    /// wrote it in front.
    public static func stageLine(_ bytes: [UInt8], stage: String, pid: Int32) -> String {
        var cleaned = bytes
        if cleaned.last == UInt8(ascii: "\r") { cleaned.removeLast() }
        for index in cleaned.indices where cleaned[index] < 0x20 && cleaned[index] != 0x09 || cleaned[index] == 0x7f {
            cleaned[index] = UInt8(ascii: "?")
        }
        let text = String(decoding: cleaned, as: UTF8.self)
        let own = cleaned.starts(with: stage.utf8) && cleaned.count > stage.utf8.count
            && cleaned[stage.utf8.count] == UInt8(ascii: "[")
        return own && hasProgramPrefix(cleaned) ? text : "\(stage)[\(pid)]: \(text)"
    }

    /// Whether the line starts with "program[digits]: ".
    public static func hasProgramPrefix(_ bytes: [UInt8]) -> Bool {
        var index = 0
        while index < bytes.count, index < 64 {
            let byte = bytes[index]
            let isNameByte = (byte >= 0x61 && byte <= 0x7a) || (byte >= 0x41 && byte <= 0x5a)
                || (byte >= 0x30 && byte <= 0x39) || byte == 0x2d || byte == 0x5f || byte == 0x2e || byte == 0x2f
            if !isNameByte { break }
            index += 1
        }
        guard index > 0, index < bytes.count, bytes[index] == UInt8(ascii: "[") else { return false }
        index += 1
        let digitsStart = index
        while index < bytes.count, bytes[index] >= 0x30, bytes[index] <= 0x39 { index += 1 }
        guard index > digitsStart, index + 1 < bytes.count else { return false }
        return bytes[index] == UInt8(ascii: "]") && bytes[index + 1] == UInt8(ascii: ":")
    }
}
