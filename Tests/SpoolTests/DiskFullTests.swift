import Foundation
import Testing
@testable import Spool

@Suite struct DiskFullTests {
    /// Needs root (mounts a 1 MiB tmpfs); skipped otherwise.
    @Test(.enabled(if: geteuid() == 0, "needs root to mount a small tmpfs"))
    func diskFullRefusesAndKeepsData() throws {
        let dir = TemporaryDirectory()
        let mountPoint = dir.path + "/small"
        mkdir(mountPoint, 0o700)
        guard mount("tmpfs", mountPoint, "tmpfs", 0, "size=1m,mode=0700") == 0 else {
            // Root without CAP_SYS_ADMIN (e.g. some containers): nothing to test.
            print("DiskFullTests: mount failed (\(String(cString: strerror(errno)))); skipped")
            return
        }
        defer { umount2(mountPoint, Int32(MNT_DETACH)) }
        let path = mountPoint + "/queue"
        // The map (8 MiB) is far larger than the file system (1 MiB): the
        // disk fills before the map does.
        let options = SpoolOptions(mapSize: 8 << 20, mapSizeLimit: 8 << 20)
        var stored: [(QueueID, [UInt8])] = []
        var refused = false
        do {
            let spool = try Spool(directory: path, options: options)
            for i in 0..<20 {
                let id = spool.newQueueID()
                let body = [UInt8](repeating: UInt8(i), count: 200_000)
                switch spool.submitAndWait([.insert(sampleEnvelope(id), try seal(spool, body))]) {
                case .success: stored.append((id, body))
                case .failure(let e):
                    #expect(e == .full)
                    refused = true
                }
                if refused { break }
            }
            #expect(refused)
            #expect(!stored.isEmpty)
            for (id, body) in stored { #expect(try readAll(spool, id) == body) }
            spool.close()
        }
        // What was committed before the disk filled survives a restart.
        let spool = try Spool(directory: path, options: options)
        defer { spool.close() }
        #expect(try spool.allEnvelopes().map(\.queueID) == stored.map(\.0))
        for (id, body) in stored { #expect(try readAll(spool, id) == body) }
    }
}
