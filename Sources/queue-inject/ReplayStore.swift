// What queue-inject already read from stdin (normalized and completed), so
// that a lost connection to the queue can be retried from the start
// without asking the sender for the message again. The first MiB stays in
// memory; beyond that the bytes go to an unlinked temporary file, so a
// large message never sits whole in memory.

#if canImport(Glibc)
import Glibc
#endif

final class ReplayStore {
    private let memoryLimit: Int
    private var memory: [UInt8] = []
    private var fd: Int32 = -1
    private var fileSize = 0
    /// False once a spill to disk failed: a retry is then impossible.
    private(set) var isComplete = true
    /// Every byte appended, kept or not: the size limit counts them all,
    /// also after a failed spill has dropped what was kept.
    private(set) var count = 0

    init(memoryLimit: Int = 1_048_576) {
        self.memoryLimit = memoryLimit
    }

    deinit { if fd >= 0 { close(fd) } }

    func append(_ bytes: [UInt8]) {
        count += bytes.count
        store(bytes)
    }

    private func store(_ bytes: [UInt8]) {
        guard isComplete, !bytes.isEmpty else { return }
        if fd < 0 && memory.count + bytes.count <= memoryLimit {
            memory.append(contentsOf: bytes)
            return
        }
        if fd < 0 && !openSpill() { isComplete = false; memory = []; return }
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                pwrite(fd, raw.baseAddress! + off, raw.count - off, off_t(fileSize))
            }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { isComplete = false; memory = []; return }
            off += n
            fileSize += n
        }
    }

    /// Calls `body` with the stored bytes, in pieces of at most `chunk` bytes.
    func replay(chunk: Int, _ body: (ArraySlice<UInt8>) throws -> Void) throws {
        var i = 0
        while i < memory.count {
            try body(memory[i..<min(i + chunk, memory.count)])
            i += chunk
        }
        guard fd >= 0 else { return }
        var buffer = [UInt8](repeating: 0, count: chunk)
        var offset = 0
        while offset < fileSize {
            let want = min(chunk, fileSize - offset)
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(offset)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw SpillError(reason: n < 0 ? String(cString: strerror(errno)) : "short read") }
            try body(buffer[0..<n])
            offset += n
        }
    }

    struct SpillError: Error, CustomStringConvertible {
        var reason: String
        var description: String { "cannot read back the spooled message: \(reason)" }
    }

    private func openSpill() -> Bool {
        let dir = getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        var template = Array("\(dir)/queue-inject.XXXXXX".utf8CString)
        let f = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard f >= 0 else { return false }
        _ = fcntl(f, F_SETFD, FD_CLOEXEC)
        // Nobody else needs a name for it; the file disappears with us.
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        fd = f
        store(memory)   // keep the order: what was in memory goes first
        memory = []
        return isComplete
    }
}
