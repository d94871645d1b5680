// Where each key and section of a TOML document is written.
//
// TOMLKit gives no source positions for values, only for syntax errors, so
// semantic errors ("not a duration") would have no line. This index scans the
// text the way TOML structures it (table headers, `key = value` lines, dotted
// keys) and records the first line of every key path. It only has to be right
// for documents TOMLKit has already accepted, which keeps it small: it never
// judges syntax, it only locates.

struct SourceIndex {
    /// Dotted key path ("queue.map_size", "queue") to its 1-based line.
    private var lines: [String: Int] = [:]

    init(text: String) {
        var table: [String] = []
        var arrayCounts: [String: Int] = [:]
        var multiline: String? = nil   // the open delimiter, """ or '''
        var lineNumber = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = Substring(rawLine.hasSuffix("\r") ? rawLine.dropLast() : rawLine)
            if let delimiter = multiline {
                // Inside a multi-line string: nothing here is a key.
                if SourceIndex.occurrences(of: delimiter, in: line) % 2 == 1 { multiline = nil }
                continue
            }
            let trimmed = line.drop(while: { $0 == " " || $0 == "\t" })
            if trimmed.isEmpty || trimmed.first == "#" { continue }
            if trimmed.first == "[" {
                let isArray = trimmed.hasPrefix("[[")
                var rest = trimmed.dropFirst(isArray ? 2 : 1)
                if let path = SourceIndex.parseKey(&rest) {
                    table = path
                    record(path, lineNumber)
                    if isArray {
                        // Each [[a.b]] is element N of a.b: its keys are
                        // "a.b.N.key", so errors find the right table.
                        let key = path.joined(separator: ".")
                        let index = arrayCounts[key, default: 0]
                        arrayCounts[key] = index + 1
                        table = path + [String(index)]
                        record(table, lineNumber)
                    }
                }
                continue
            }
            var rest = trimmed
            guard let key = SourceIndex.parseKey(&rest) else { continue }
            rest = rest.drop(while: { $0 == " " || $0 == "\t" })
            guard rest.first == "=" else { continue }
            // Every prefix of a dotted key names a (sub)table defined here.
            let full = table + key
            for length in (table.count + 1)...full.count {
                record(Array(full[..<length]), lineNumber)
            }
            let value = rest.dropFirst()
            for delimiter in ["\"\"\"", "'''"] where value.contains(delimiter) {
                if SourceIndex.occurrences(of: delimiter, in: value) % 2 == 1 { multiline = delimiter }
                break
            }
        }
    }

    private mutating func record(_ path: [String], _ line: Int) {
        let key = path.joined(separator: ".")
        if lines[key] == nil { lines[key] = line }
    }

    /// The line of `path`, or of its nearest enclosing table that is written
    /// down, or nil.
    func line(of path: [String]) -> Int? {
        var path = path
        while !path.isEmpty {
            if let line = lines[path.joined(separator: ".")] { return line }
            path.removeLast()
        }
        return nil
    }

    /// Parses a (dotted) key at the start of `text`, consuming it and the
    /// whitespace after it. Bare keys, "basic" and 'literal' quoted keys.
    private static func parseKey(_ text: inout Substring) -> [String]? {
        var parts: [String] = []
        while true {
            text = text.drop(while: { $0 == " " || $0 == "\t" })
            guard let first = text.first else { return nil }
            if first == "\"" || first == "'" {
                var part = ""
                var index = text.index(after: text.startIndex)
                var closed = false
                while index < text.endIndex {
                    let character = text[index]
                    if character == first { closed = true; break }
                    if character == "\\" && first == "\"" {
                        // Keep escapes verbatim: keys here are plain ASCII.
                        index = text.index(after: index)
                        guard index < text.endIndex else { return nil }
                    }
                    part.append(text[index])
                    index = text.index(after: index)
                }
                guard closed else { return nil }
                parts.append(part)
                text = text[text.index(after: index)...]
            } else {
                let bare = text.prefix(while: { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-") })
                guard !bare.isEmpty else { return nil }
                parts.append(String(bare))
                text = text[bare.endIndex...]
            }
            text = text.drop(while: { $0 == " " || $0 == "\t" })
            guard text.first == "." else { return parts }
            text = text.dropFirst()
        }
    }

    private static func occurrences(of needle: String, in text: Substring) -> Int {
        var count = 0
        var rest = text
        while let range = rest.firstRange(of: needle) {
            count += 1
            rest = rest[range.upperBound...]
        }
        return count
    }
}
