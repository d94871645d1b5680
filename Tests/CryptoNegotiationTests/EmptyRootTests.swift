// The empty directory crypto-negotiate chroots into (as root).

import Glibc
import Testing
@testable import CryptoNegotiation

@Suite struct EmptyRootTests {
    func scratch() -> String {
        var template = Array("/tmp/sealpost-emptyroot-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        return String(cString: made!)
    }

    @Test func createsAnEmptyDirectory0755() throws {
        let base = scratch()
        let path = EmptyRoot.path(dataDirectory: base)
        #expect(path == base + "/empty")
        #expect(EmptyRoot.path(dataDirectory: base + "/") == base + "/empty")
        try EmptyRoot.prepare(path)
        var info = stat()
        #expect(stat(path, &info) == 0)
        #expect(info.st_mode & S_IFMT == S_IFDIR)
        #expect(info.st_mode & 0o7777 == 0o755)
        if geteuid() == 0 { #expect(info.st_uid == 0 && info.st_gid == 0) }
        // Again: an existing empty directory is fine, and put right.
        chmod(path, 0o777)
        try EmptyRoot.prepare(path)
        #expect(stat(path, &info) == 0 && info.st_mode & 0o7777 == 0o755)
        rmdir(path)
        rmdir(base)
    }

    @Test func refusesADirectoryWithEntries() throws {
        let base = scratch()
        let path = base + "/empty"
        mkdir(path, 0o755)
        let fd = open(path + "/planted", O_CREAT | O_WRONLY, 0o644)
        close(fd)
        #expect(throws: EmptyRootError.self) { try EmptyRoot.prepare(path) }
        do {
            try EmptyRoot.prepare(path)
        } catch {
            #expect(error.description.contains("not empty (holds \"planted\")"))
        }
        unlink(path + "/planted")
        rmdir(path)
        rmdir(base)
    }

    @Test func refusesASymbolicLinkOrAFile() throws {
        let base = scratch()
        let path = base + "/empty"
        symlink("/", path)
        #expect(throws: EmptyRootError.self) { try EmptyRoot.prepare(path) }
        unlink(path)
        close(open(path, O_CREAT | O_WRONLY, 0o644))
        #expect(throws: EmptyRootError.self) { try EmptyRoot.prepare(path) }
        unlink(path)
        rmdir(base)
    }
}
