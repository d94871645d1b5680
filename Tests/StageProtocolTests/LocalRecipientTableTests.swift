import Foundation
import Testing
@testable import StageProtocol

@Suite struct LocalRecipientTableTests {
    static func file(_ lines: [String]) -> [UInt8] {
        Array((["sealpost-local-recipients 1"] + lines).map { $0 + "\n" }.joined().utf8)
    }

    @Test func lookupsIgnoreCaseAndFallBackFromTheExtension() {
        let table = LocalRecipientTable(names: ["Alice", "list+owner", "root"])
        #expect(table.names == ["alice", "list+owner", "root"])
        for known in ["alice", "ALICE", "alice+news", "Alice+", "list+owner", "root", "postmaster", "PostMaster"] {
            #expect(table.accepts(localPart: known), "\(known)")
        }
        // "+x" has no user before the delimiter; "list+other" falls back
        // to "list", which is not there.
        for unknown in ["bob", "+alice", "list", "list+other", "alic", "alice.x", ""] {
            #expect(!table.accepts(localPart: unknown), "\(unknown)")
        }
    }

    @Test func namesThatCannotBeLocalPartsAreLeftOut() {
        let long = String(repeating: "a", count: LocalRecipientTable.maximumNameLength + 1)
        let table = LocalRecipientTable(names: ["", "tab\there", "del\u{7F}", long, "ok"])
        #expect(table.names == ["ok"])
    }

    @Test func encodingIsSortedByBytesAndDecodesToTheSameTable() throws {
        let table = LocalRecipientTable(names: ["zoe", "Émile", "bob", "anna", "bob"])
        let bytes = table.encoded()
        #expect(bytes == Self.file(["anna", "bob", "zoe", "émile"]))
        #expect(try LocalRecipientTable(decoding: bytes) == table)
        #expect(try LocalRecipientTable(decoding: Self.file([])).count == 0)
    }

    static let malformed: [(String, String)] = [
        ("sealpost-local-recipients 2\nbob\n", "the first line"),
        ("bob\n", "the first line"),
        ("sealpost-local-recipients 1", "the first line"),
        ("sealpost-local-recipients 1\nbob", "does not end with a line feed"),
        ("sealpost-local-recipients 1\nbob\n\n", "line 3: not a name"),
        ("sealpost-local-recipients 1\nbob\r\n", "line 2: not a name"),
        ("sealpost-local-recipients 1\nbo\u{0}b\n", "line 2: not a name"),
        ("sealpost-local-recipients 1\nBob\n", "line 2: not in lower case"),
        ("sealpost-local-recipients 1\nbob\nanna\n", "line 3: not in ascending order"),
        ("sealpost-local-recipients 1\nbob\nbob\n", "line 3: not in ascending order"),
    ]

    @Test(arguments: malformed)
    func strictDecoding(text: String, complaint: String) {
        expectRefusal(Array(text.utf8), complaint)
    }

    @Test func invalidUTF8IsRefused() {
        expectRefusal(Array("sealpost-local-recipients 1\n".utf8) + [0x62, 0xFF, 0x0A], "line 2: not UTF-8")
    }

    func expectRefusal(_ bytes: [UInt8], _ complaint: String) {
        do {
            _ = try LocalRecipientTable(decoding: bytes)
            Issue.record("decoded: \(bytes)")
        } catch {
            #expect(error.reason.contains(complaint), "\(error.reason)")
        }
    }

    @Test func aFileOverTheLimitIsRefused() {
        let bytes = [UInt8](repeating: 0x61, count: LocalRecipientTable.maximumFileSize + 1)
        #expect(throws: LocalRecipientTableError.self) { try LocalRecipientTable(decoding: bytes) }
    }

    @Test func writtenFilesAreReadableByOtherUsersAndReplacedWhole() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sp-lrt-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        #expect(mkdir(dir, 0o755) == 0)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/recipients"
        #expect(try LocalRecipientTable.read(from: path) == nil)

        let old = umask(0o077)
        defer { umask(old) }
        try LocalRecipientTable(names: ["alice"]).write(to: path)
        var info = stat()
        #expect(stat(path, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o644)
        let firstInode = info.st_ino
        #expect(try LocalRecipientTable.read(from: path)?.names == ["alice"])

        // A second write replaces the file (a new inode), and leaves no
        // temporary file behind; one left by a writer that died is taken over.
        #expect(FileManager.default.createFile(atPath: path + ".new", contents: Data("junk".utf8)))
        try LocalRecipientTable(names: ["bob", "carol"]).write(to: path)
        #expect(stat(path, &info) == 0 && info.st_ino != firstInode)
        #expect(try LocalRecipientTable.read(from: path)?.names == ["bob", "carol"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["recipients"])

        // What a reader refuses names the file.
        #expect(FileManager.default.createFile(atPath: path, contents: Data("bob\n".utf8)))
        #expect { try LocalRecipientTable.read(from: path) } throws: { "\($0)".hasPrefix(path + ": not a local recipient table") }
        #expect(unlink(path) == 0 && mkdir(path, 0o755) == 0)
        #expect { try LocalRecipientTable.read(from: path) } throws: { "\($0)".contains("not a regular file") }
        #expect(throws: LocalRecipientTableError.self) { try LocalRecipientTable(names: ["x"]).write(to: path) }
        // A FIFO in its place is refused at once, not waited on.
        #expect(rmdir(path) == 0 && mkfifo(path, 0o644) == 0)
        #expect { try LocalRecipientTable.read(from: path) } throws: { "\($0)".contains("not a regular file") }
    }
}
