import Foundation
import Testing
@testable import Spool

@Suite struct KeyFileTests {
    private func mode(_ path: String) -> mode_t {
        var st = stat()
        stat(path, &st)
        return st.st_mode & 0o777
    }

    @Test func createdWithMode0600AndReused() throws {
        let dir = TemporaryDirectory()
        let keyPath = dir.spool + "/spool.key"
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            spool.close()
        }
        #expect(mode(keyPath) == 0o600)
        #expect(mode(dir.spool) == 0o700)
        let key = try Data(contentsOf: URL(fileURLWithPath: keyPath))
        #expect(key.count == 32)
        #expect(!FileManager.default.fileExists(atPath: keyPath + ".new"))
        let spool = try Spool(directory: dir.spool, options: smallOptions)
        spool.close()
        #expect(try Data(contentsOf: URL(fileURLWithPath: keyPath)) == key)
    }

    private func expectRefusal(_ prepare: (String) throws -> Void, _ fragment: String) throws {
        let dir = TemporaryDirectory()
        let id: QueueID
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            id = spool.newQueueID()
            try spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, [1, 2, 3]))]).get()
            spool.close()
        }
        try prepare(dir.spool + "/spool.key")
        do {
            let spool = try Spool(directory: dir.spool, options: smallOptions)
            spool.close()
            Issue.record("spool opened; expected refusal containing \"\(fragment)\"")
        } catch let e as SpoolError {
            #expect(e.description.contains(fragment), "\(e)")
        }
    }

    @Test func refusesGroupReadableKey() throws {
        try expectRefusal({ chmod($0, 0o640) }, "group or others")
    }

    @Test func refusesWorldReadableKey() throws {
        try expectRefusal({ chmod($0, 0o604) }, "group or others")
    }

    @Test func refusesWrongSize() throws {
        try expectRefusal({ path in
            let fd = open(path, O_WRONLY | O_APPEND)
            _ = write(fd, "x", 1)
            close(fd)
        }, "33 bytes")
    }

    @Test func refusesMissingKeyWhenDataExists() throws {
        try expectRefusal({ unlink($0) }, "missing")
    }

    @Test func refusesAForeignKey() throws {
        try expectRefusal({ path in
            unlink(path)
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
            let other = [UInt8](repeating: 0x42, count: 32)
            _ = other.withUnsafeBytes { write(fd, $0.baseAddress, 32) }
            close(fd)
        }, "does not belong")
    }
}
