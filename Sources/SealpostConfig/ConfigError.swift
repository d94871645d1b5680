// A configuration error that names the file, the line and the key, so an
// administrator can go straight to the culprit:
//
//   Config/sealpost.toml:23: queue.minimal_backoff_time: not a duration: "5x"

public struct ConfigError: Error, CustomStringConvertible, Equatable {
    /// The path of the configuration file, as given to `load(path:)`.
    public var file: String
    /// 1-based line number, when the error can be placed on a line.
    public var line: Int?
    /// The dotted key ("queue.minimal_backoff_time") or section ("queue").
    public var key: String?
    public var message: String

    public init(file: String, line: Int? = nil, key: String? = nil, message: String) {
        self.file = file
        self.line = line
        self.key = key
        self.message = message
    }

    public var description: String {
        var text = file
        if let line { text += ":\(line)" }
        text += ": "
        if let key { text += "\(key): " }
        return text + message
    }
}
