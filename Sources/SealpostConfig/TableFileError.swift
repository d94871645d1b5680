// The error of the small table files beside sealpost.toml (aliases,
// transport, stages): it names the file and the line, "transport:7:
// unknown option \"tsl\"", as compilers and the configuration loader do, so
// an administrator can jump to the line. Each file's parser has its own name
// for it (AliasError, TransportTableError, StagesFileError).

public struct TableFileError: Error, Sendable, Equatable, CustomStringConvertible {
    public var file: String
    /// nil: the file as a whole (it cannot be read, say).
    public var line: Int?
    public var message: String

    public init(file: String, line: Int?, message: String) {
        self.file = file
        self.line = line
        self.message = message
    }

    public var description: String {
        if let line { return "\(file):\(line): \(message)" }
        return "\(file): \(message)"
    }
}
