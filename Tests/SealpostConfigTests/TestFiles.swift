#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import SealpostConfig

/// A fresh directory under /tmp, removed (with the files written) at the end.
final class TemporaryDirectory {
    let path: String
    private var files: [String] = []
    private var directories: [String] = []

    init() {
        var template = Array("/tmp/sealpost-config-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    /// Writes `text` to `name` (relative), creating directories on the way.
    @discardableResult
    func write(_ name: String, _ text: String) -> String {
        var directory = path
        for part in name.split(separator: "/").dropLast() {
            directory += "/" + part
            if Glibc.mkdir(directory, 0o700) == 0 { directories.append(directory) }
        }
        let file = path + "/" + name
        let descriptor = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        precondition(descriptor >= 0, "cannot create \(file)")
        let bytes = Array(text.utf8)
        precondition(bytes.withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) } == bytes.count)
        close(descriptor)
        if !files.contains(file) { files.append(file) }
        return file
    }

    func mkdir(_ name: String) -> String {
        let directory = path + "/" + name
        if Glibc.mkdir(directory, 0o700) == 0 { directories.append(directory) }
        return directory
    }

    deinit {
        for file in files { unlink(file) }
        for directory in directories.reversed() { rmdir(directory) }
        rmdir(path)
    }
}

/// Loads `text` written to a temporary sealpost.toml.
func load(_ text: String) throws(ConfigError) -> SealpostConfiguration {
    let directory = TemporaryDirectory()
    let file = directory.write("sealpost.toml", text)
    return try SealpostConfiguration.load(path: file)
}

/// Expects loading `text` to fail with exactly "<file>:<line>: <key>: <message>".
func expectError(_ text: String, line: Int?, key: String?, _ message: String,
                 sourceLocation: SourceLocation = #_sourceLocation) {
    let directory = TemporaryDirectory()
    let file = directory.write("sealpost.toml", text)
    do {
        let config = try SealpostConfiguration.load(path: file)
        Issue.record("loaded, expected an error: \(config)", sourceLocation: sourceLocation)
    } catch {
        #expect(error.file == file, sourceLocation: sourceLocation)
        #expect(error.line == line, "\(error)", sourceLocation: sourceLocation)
        #expect(error.key == key, "\(error)", sourceLocation: sourceLocation)
        #expect(error.message == message, "\(error)", sourceLocation: sourceLocation)
        var expected = file
        if let line { expected += ":\(line)" }
        expected += ": "
        if let key { expected += "\(key): " }
        #expect(error.description == expected + message, sourceLocation: sourceLocation)
    }
}
