#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import FileAccess

/// Path and file helpers on plain POSIX calls (no Foundation: the stages
/// may run chrooted, and the rules here must be obvious).
enum ConfigPath {
    /// Largest configuration file read: a sane file is a few KiB.
    static let maximumFileSize = 1 << 20

    static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    /// The directory part of an absolute path ("/a/b" -> "/a", "/a" -> "/").
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let head = String(path[..<slash])
        return head.isEmpty ? "/" : head
    }

    /// `path` made absolute against `directory`, then normalised lexically
    /// ("." and ".." removed, slashes collapsed). Lexical on purpose: the
    /// directories named need not exist yet.
    static func resolve(_ path: String, relativeTo directory: String) -> String {
        normalize(path.hasPrefix("/") ? path : join(directory, path))
    }

    static func normalize(_ path: String) -> String {
        var parts: [Substring] = []
        for part in path.split(separator: "/") {
            switch part {
            case ".": continue
            case "..": if !parts.isEmpty { parts.removeLast() }
            default: parts.append(part)
            }
        }
        return "/" + parts.joined(separator: "/")
    }

    static func currentDirectory() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return "/" }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    static func absolute(_ path: String) -> String {
        resolve(path, relativeTo: currentDirectory())
    }

    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    static func isRegularFile(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG
    }

    /// The system's host name, lower-cased; "localhost" if it has none.
    static func systemHostname() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        let name = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }.lowercased()
        return name.isEmpty ? "localhost" : name
    }

    /// The whole file as UTF-8 text; refuses directories, devices, huge
    /// files, invalid UTF-8 and NUL bytes (TOMLKit reads a C string).
    static func readText(_ path: String) throws(ConfigError) -> String {
        let bytes: [UInt8]
        do {
            bytes = try WholeFile.read(path, maximumSize: maximumFileSize).bytes
        } catch {
            throw ConfigError(file: path, message: error.withoutPath)
        }
        if let nul = bytes.firstIndex(of: 0) {
            let line = bytes[..<nul].reduce(1) { $1 == UInt8(ascii: "\n") ? $0 + 1 : $0 }
            throw ConfigError(file: path, line: line, message: "contains a NUL byte")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            // Name the first line that does not decode.
            var line = 1
            for content in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
                if String(validating: content, as: UTF8.self) == nil { break }
                line += 1
            }
            throw ConfigError(file: path, line: line, message: "not valid UTF-8")
        }
        if let line = nulEscapeLine(bytes) {
            throw ConfigError(file: path, line: line,
                              message: "a string contains \\u0000 (NUL), which would cut it short")
        }
        return text
    }

    /// The line of the first `\u0000` or `\U00000000` escape in a basic
    /// string ("..." or """..."""), if any: TOMLKit hands strings over as
    /// C strings, so such a value would silently end at the NUL (for
    /// example "127.0.0.1\u0000/8" read as "127.0.0.1"). A lexer just
    /// strong enough for that: comments, the four kinds of strings, their
    /// escapes; the rest of the syntax is TOMLKit's to check.
    static func nulEscapeLine(_ bytes: [UInt8]) -> Int? {
        let quote = UInt8(ascii: "\""), apostrophe = UInt8(ascii: "'"), backslash = UInt8(ascii: "\\")
        let newline = UInt8(ascii: "\n")
        func starts(_ pattern: String, at i: Int) -> Bool {
            var j = i
            for p in pattern.utf8 {
                guard j < bytes.count, bytes[j] == p else { return false }
                j += 1
            }
            return true
        }
        /// Past the closing delimiter, if there is one: a multi-line
        /// string's may follow one or two quotes of its content.
        func close(_ delimiter: String, at i: inout Int) {
            guard starts(delimiter, at: i) else { return }
            i += delimiter.utf8.count
            if delimiter.utf8.count == 3 {
                let q = delimiter.utf8.first!
                var extra = 0
                while extra < 2, i < bytes.count, bytes[i] == q { i += 1; extra += 1 }
            }
        }
        var line = 1
        var i = 0
        while i < bytes.count {
            let b = bytes[i]
            if b == newline { line += 1; i += 1; continue }
            if b == UInt8(ascii: "#") {
                while i < bytes.count, bytes[i] != newline { i += 1 }
                continue
            }
            if b == quote || b == apostrophe {
                // Escapes exist only in basic strings ("), not in literal ones (').
                let escapes = b == quote
                let one = escapes ? "\"" : "'"
                let delimiter = starts(one + one + one, at: i) ? one + one + one : one
                i += delimiter.utf8.count
                while i < bytes.count, !starts(delimiter, at: i), delimiter.utf8.count == 3 || bytes[i] != newline {
                    if bytes[i] == newline { line += 1 }
                    if escapes, bytes[i] == backslash {
                        if starts("\\u0000", at: i) || starts("\\U00000000", at: i) { return line }
                        i += 1   // the escaped character (a backslash or quote too)
                        if i < bytes.count, bytes[i] == newline { line += 1 }
                    }
                    i += 1
                }
                close(delimiter, at: &i)
                continue
            }
            i += 1
        }
        return nil
    }
}
