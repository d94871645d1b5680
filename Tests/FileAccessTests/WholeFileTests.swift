// WholeFile on real files in a temporary directory: what it reads, what it
// refuses (and that a FIFO does not hang it), and that a replacement is
// whole, has its mode whatever the umask, and leaves no temporary file.

import FileAccess
import Testing
#if canImport(Glibc)
import Glibc
#endif

final class Scratch {
    let path: String

    init() {
        var template = Array("/tmp/fileaccess-test-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    deinit { _ = system("rm -rf '\(path)'") }

    func file(_ name: String) -> String { path + "/" + name }

    func write(_ name: String, _ bytes: [UInt8]) {
        let fd = open(file(name), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        precondition(fd >= 0)
        precondition(WholeFile.writeAll(fd, bytes) == 0)
        close(fd)
    }

    func entries() -> [String] {
        guard let directory = opendir(path) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }
}

@Suite struct WholeFileTests {
    let scratch = Scratch()

    @Test func readsAWholeFileAndItsStatus() throws {
        let bytes = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        scratch.write("data", bytes)
        let file = try WholeFile.read(scratch.file("data"), maximumSize: 100_000)
        #expect(file.bytes == bytes)
        #expect(file.status.st_size == 100_000)
        #expect(try WholeFile.read(scratch.file("data"), maximumSize: 100_000, options: .noFollow).bytes == bytes)
        scratch.write("empty", [])
        #expect(try WholeFile.read(scratch.file("empty"), maximumSize: 10).bytes == [])
    }

    @Test func aFileOfProcWhichClaimsNoSizeIsReadWhole() throws {
        let status = try WholeFile.read("/proc/self/status", maximumSize: 1 << 20)
        #expect(status.status.st_size == 0)
        let text = String(decoding: status.bytes, as: UTF8.self)
        #expect(text.hasPrefix("Name:"))
        #expect(text.contains("\nSigCgt:"))
        // Larger than the first buffer (a page): read on until the end.
        let maps = try WholeFile.read("/proc/self/maps", maximumSize: 1 << 24).bytes
        #expect(maps.count > 4096)
        #expect(maps.last == UInt8(ascii: "\n"))
        #expect(throws: FileError(step: "read", path: "/proc/self/maps", reason: .tooLarge(limit: 4096))) {
            try WholeFile.read("/proc/self/maps", maximumSize: 4096)
        }
    }

    @Test func aMissingFileIsNilOnlyWhenAsked() throws {
        #expect(try WholeFile.readIfPresent(scratch.file("none"), maximumSize: 10) == nil)
        #expect { try WholeFile.read(scratch.file("none"), maximumSize: 10) } throws: { error in
            let error = error as! FileError
            return error.isMissing && error.description == "cannot open \(scratch.file("none")): No such file or directory"
                && error.withoutPath == "cannot open: No such file or directory"
        }
        // A missing directory on the way is missing too; a file used as a
        // directory is an error.
        #expect(try WholeFile.readIfPresent(scratch.file("none/x"), maximumSize: 10) == nil)
        scratch.write("plain", [0x41])
        #expect(throws: FileError(step: "open", path: scratch.file("plain/x"), reason: .system(ENOTDIR))) {
            try WholeFile.readIfPresent(scratch.file("plain/x"), maximumSize: 10)
        }
    }

    @Test func refusesWhatIsNotARegularFileWithoutBlockingOnAFIFO() throws {
        try #require(mkfifo(scratch.file("fifo"), 0o600) == 0)
        #expect(throws: FileError(step: "stat", path: scratch.file("fifo"), reason: .notRegularFile)) {
            try WholeFile.read(scratch.file("fifo"), maximumSize: 10)
        }
        #expect(throws: FileError(step: "stat", path: scratch.path, reason: .notRegularFile)) {
            try WholeFile.read(scratch.path, maximumSize: 10)
        }
        #expect(FileError(step: "stat", path: "/x", reason: .notRegularFile).description == "/x: not a regular file")
        // A character device only when asked: /dev/null is then empty, and
        // /dev/zero as large as the bound allows.
        #expect(throws: FileError(step: "stat", path: "/dev/null", reason: .notRegularFile)) {
            try WholeFile.read("/dev/null", maximumSize: 10)
        }
        #expect(try WholeFile.read("/dev/null", maximumSize: 10, options: .characterDevices).bytes == [])
        #expect(throws: FileError(step: "read", path: "/dev/zero", reason: .tooLarge(limit: 10_000))) {
            try WholeFile.read("/dev/zero", maximumSize: 10_000, options: .characterDevices)
        }
        #expect(throws: FileError(step: "stat", path: scratch.file("fifo"), reason: .notRegularFile)) {
            try WholeFile.read(scratch.file("fifo"), maximumSize: 10, options: .characterDevices)
        }
    }

    @Test func refusesALinkWithNoFollow() throws {
        scratch.write("target", Array("secret".utf8))
        try #require(symlink(scratch.file("target"), scratch.file("link")) == 0)
        #expect(try WholeFile.read(scratch.file("link"), maximumSize: 10).bytes == Array("secret".utf8))
        #expect(throws: FileError(step: "open", path: scratch.file("link"), reason: .system(ELOOP))) {
            try WholeFile.read(scratch.file("link"), maximumSize: 10, options: .noFollow)
        }
    }

    @Test func refusesAFileOverTheBound() throws {
        scratch.write("big", [UInt8](repeating: 0x41, count: 11))
        #expect(throws: FileError(step: "stat", path: scratch.file("big"), reason: .tooLarge(limit: 10))) {
            try WholeFile.read(scratch.file("big"), maximumSize: 10)
        }
        #expect(try WholeFile.read(scratch.file("big"), maximumSize: 11).bytes.count == 11)
        #expect(FileError(step: "stat", path: "/x", reason: .tooLarge(limit: 10)).withoutPath == "larger than 10 bytes")
    }

    @Test func readsADescriptorFromOffsetZeroAndLeavesItOpen() throws {
        scratch.write("pem", Array("-----BEGIN-----\n".utf8))
        let fd = open(scratch.file("pem"), O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        try #require(lseek(fd, 5, SEEK_SET) == 5)
        #expect(try WholeFile.read(descriptor: fd, path: "pem", maximumSize: 100).bytes == Array("-----BEGIN-----\n".utf8))
        #expect(try WholeFile.read(descriptor: fd, path: "pem", maximumSize: 100).bytes.count == 16, "still open")
        #expect(lseek(fd, 0, SEEK_CUR) == 5, "pread moves no shared offset")
    }

    @Test func replacesAFileWholeWithItsModeWhateverTheUmask() throws {
        let path = scratch.file("table")
        scratch.write("table", Array("old\n".utf8))
        scratch.write("table.new", Array("left by a writer that died".utf8))
        let previous = umask(0o077)
        defer { umask(previous) }
        try WholeFile.replace(path, with: Array("new\n".utf8), mode: 0o644, temporary: path + ".new")
        #expect(try WholeFile.read(path, maximumSize: 100).bytes == Array("new\n".utf8))
        var info = stat()
        try #require(stat(path, &info) == 0)
        #expect(info.st_mode & 0o7777 == 0o644)
        #expect(scratch.entries() == ["table"])
        try WholeFile.replace(path, with: Array("durable\n".utf8), mode: 0o600, temporary: path + ".tmp", durable: true)
        #expect(try WholeFile.read(path, maximumSize: 100).bytes == Array("durable\n".utf8))
        #expect(scratch.entries() == ["table"])
    }

    @Test func aFailedReplacementLeavesTheOldFileAndNoTemporary() throws {
        let path = scratch.file("table")
        scratch.write("table", Array("old\n".utf8))
        // A directory where the file is: the rename fails.
        try #require(mkdir(scratch.file("dir"), 0o755) == 0)
        try #require(mkdir(scratch.file("dir/x"), 0o755) == 0)
        #expect { try WholeFile.replace(scratch.file("dir"), with: [0x41], mode: 0o644, temporary: path + ".new") } throws: {
            ($0 as! FileError).step == "rename"
        }
        #expect(scratch.entries() == ["dir", "table"])
        #expect(throws: FileError(step: "create", path: scratch.file("none/t.new"), reason: .system(ENOENT))) {
            try WholeFile.replace(scratch.file("none/t"), with: [0x41], mode: 0o644, temporary: scratch.file("none/t.new"))
        }
        #expect(try WholeFile.read(path, maximumSize: 100).bytes == Array("old\n".utf8))
    }

    @Test func writeAllFillsAPipeAcrossShortWritesAndReportsErrno() throws {
        var ends: [Int32] = [-1, -1]
        try #require(pipe(&ends) == 0)
        let bytes = (0..<300_000).map { UInt8(truncatingIfNeeded: $0) }
        var received: [UInt8] = []
        let reader = Thread { fd in
            var buffer = [UInt8](repeating: 0, count: 65536)
            var all: [UInt8] = []
            while case let n = read(fd, &buffer, buffer.count), n > 0 { all += buffer[..<n] }
            return all
        }
        reader.start(ends[0])
        #expect(WholeFile.writeAll(ends[1], bytes) == 0)
        close(ends[1])
        received = reader.join()
        close(ends[0])
        #expect(received == bytes)
        #expect(WholeFile.writeAll(-1, [0x41]) == EBADF)
        #expect(WholeFile.writeAll(-1, []) == 0, "nothing to write, nothing tried")
    }

    @Test func theDirectoryOfAPath() {
        #expect(WholeFile.directory(of: "/a/b") == "/a")
        #expect(WholeFile.directory(of: "/a") == "/")
        #expect(WholeFile.directory(of: "b") == ".")
        #expect(WholeFile.directory(of: "a/b/c") == "a/b")
    }

    @Test func syncsADirectoryAndNamesOneThatIsNot() throws {
        try WholeFile.syncDirectory(scratch.path)
        scratch.write("plain", [])
        #expect(throws: FileError(step: "open", path: scratch.file("plain"), reason: .system(ENOTDIR))) {
            try WholeFile.syncDirectory(scratch.file("plain"))
        }
    }
}

/// A pthread running `body` on a descriptor, joined for its result.
final class Thread: @unchecked Sendable {
    private let body: (Int32) -> [UInt8]
    private var argument: Int32 = -1
    private var result: [UInt8] = []
    private var thread = pthread_t()

    init(_ body: @escaping (Int32) -> [UInt8]) { self.body = body }

    func start(_ fd: Int32) {
        argument = fd
        let context = Unmanaged.passRetained(self).toOpaque()
        let created = pthread_create(&thread, nil, { raw in
            let me = Unmanaged<Thread>.fromOpaque(raw!).takeRetainedValue()
            me.result = me.body(me.argument)
            return nil
        }, context)
        precondition(created == 0)
    }

    func join() -> [UInt8] {
        pthread_join(thread, nil)
        return result
    }
}
