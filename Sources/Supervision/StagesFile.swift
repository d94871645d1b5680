// The stages file (Pipeline/stages): which executable runs each stage.
//
//     # comment
//     NAME  EXECUTABLE [ARGUMENTS...]
//
// Fields are separated by blanks; there is no quoting. A relative EXECUTABLE
// is relative to the build directory (`--bin`, by default the directory that
// holds `supervise` itself). NAME matches [a-z][a-z0-9-]* and is at most 23
// characters, so that "sealpost-NAME" fits in a Unix user name (32).

#if canImport(Glibc)
import Glibc
#endif
import FileAccess
import SealpostConfig

public struct StageDefinition: Sendable, Equatable {
    public var name: String
    /// Absolute path of the program.
    public var executable: String
    /// argv[1...]; argv[0] is the executable's path (interpreters such as
    /// Python find their installation from it; the stage learns its name
    /// from SEALPOST_STAGE).
    public var arguments: [String]
    /// Where it was defined, for messages.
    public var line: Int

    public init(name: String, executable: String, arguments: [String], line: Int) {
        self.name = name
        self.executable = executable
        self.arguments = arguments
        self.line = line
    }

    /// The Unix user the stage runs as when the supervisor is root.
    public var userName: String { "sealpost-\(name)" }
}

public typealias StagesFileError = TableFileError

public enum StagesFile {
    /// Longest stage name: "sealpost-" plus the name must fit in 32 bytes.
    public static let maximumNameLength = 23

    /// Parses the text of a stages file. Does not look at the file system.
    public static func parse(_ text: String, file: String, binDirectory: String) throws(StagesFileError) -> [StageDefinition] {
        var stages: [StageDefinition] = []
        var seen: [String: Int] = [:]
        var number = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            number += 1
            var line = Substring(rawLine)
            if line.last == "\r" { line = line.dropLast() }
            // A "#" starts a comment at the start of a line or after a blank.
            if let hash = commentStart(line) { line = line[..<hash] }
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            if fields.isEmpty { continue }
            let name = fields[0]
            guard isValidName(name) else {
                throw StagesFileError(file: file, line: number,
                    message: "bad stage name \"\(name)\": must match [a-z][a-z0-9-]* and be at most \(maximumNameLength) characters")
            }
            if let first = seen[name] {
                throw StagesFileError(file: file, line: number,
                    message: "stage \"\(name)\" is already defined on line \(first)")
            }
            guard fields.count >= 2 else {
                throw StagesFileError(file: file, line: number,
                    message: "stage \"\(name)\" has no executable (expected: NAME EXECUTABLE [ARGUMENTS...])")
            }
            for field in fields where field.utf8.contains(0) {
                throw StagesFileError(file: file, line: number, message: "NUL byte in \"\(field)\"")
            }
            let executable = fields[1].hasPrefix("/") ? fields[1] : joinPath(binDirectory, fields[1])
            seen[name] = number
            stages.append(StageDefinition(name: name, executable: executable,
                                          arguments: Array(fields.dropFirst(2)), line: number))
        }
        if stages.isEmpty {
            throw StagesFileError(file: file, line: nil, message: "no stage defined")
        }
        return stages
    }

    /// Reads and parses a stages file, then checks that every executable
    /// exists and may be executed.
    public static func load(path: String, binDirectory: String) throws(StagesFileError) -> [StageDefinition] {
        let text: String
        do {
            text = try readWholeFile(path, options: .characterDevices)
        } catch {
            throw StagesFileError(file: path, line: nil, message: error.withoutPath)
        }
        let stages = try parse(text, file: path, binDirectory: binDirectory)
        for stage in stages where access(stage.executable, X_OK) != 0 {
            let reason = String(cString: strerror(errno))
            throw StagesFileError(file: path, line: stage.line,
                message: "stage \"\(stage.name)\": cannot execute \(stage.executable): \(reason)")
        }
        return stages
    }

    public static func isValidName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard let first = bytes.first, bytes.count <= maximumNameLength,
              first >= UInt8(ascii: "a"), first <= UInt8(ascii: "z") else { return false }
        return bytes.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                || byte == UInt8(ascii: "-")
        }
    }

    private static func commentStart(_ line: Substring) -> Substring.Index? {
        var previous: Character? = nil
        for index in line.indices {
            let character = line[index]
            if character == "#" && (previous == nil || previous == " " || previous == "\t") {
                return index
            }
            previous = character
        }
        return nil
    }
}

func joinPath(_ directory: String, _ name: String) -> String {
    if directory.hasSuffix("/") { return directory + name }
    return directory + "/" + name
}

struct SystemError: Error, CustomStringConvertible {
    var operation: String
    var path: String?
    var code: Int32

    init(_ operation: String, path: String? = nil, code: Int32 = errno) {
        self.operation = operation
        self.path = path
        self.code = code
    }

    var description: String {
        let reason = String(cString: strerror(code))
        if let path { return "\(operation) \(path): \(reason)" }
        return "\(operation): \(reason)"
    }
}

/// A whole small file (a stages file, /proc/PID/status) as text; refuses
/// anything over 1 MiB.
func readWholeFile(_ path: String, options: WholeFile.Options = []) throws(FileError) -> String {
    String(decoding: try WholeFile.read(path, maximumSize: 1 << 20, options: options).bytes, as: UTF8.self)
}
