import Testing
import Foundation
import Synchronization
@testable import LocalDelivery
#if canImport(Glibc)
import Glibc
#endif

@Suite struct MaildirNameTests {
    @Test func uniqueNameHasTheSpecifiedForm() throws {
        let namer = MaildirNamer(hostname: "mx.example.org")
        let name = namer.next()
        // SECONDS.M<usec>P<pid>Q<counter>.<host>
        let parts = name.split(separator: ".", maxSplits: 2).map(String.init)
        #expect(parts.count == 3)
        #expect(Int(parts[0]) != nil)
        #expect(parts[2] == "example.org" || name.hasSuffix(".mx.example.org"))
        let middle = parts[1]
        #expect(middle.hasPrefix("M"))
        let m = try #require(middle.firstIndex(of: "P"))
        let q = try #require(middle.firstIndex(of: "Q"))
        #expect(Int(middle[middle.index(after: middle.startIndex)..<m]) != nil)
        #expect(Int(middle[middle.index(after: m)..<q]) == Int(getpid()))
        #expect(Int(middle[middle.index(after: q)...]) != nil)
        #expect(name.hasSuffix(".mx.example.org"))
    }

    @Test func namesAreUniqueEvenInTheSameMicrosecond() {
        let namer = MaildirNamer(hostname: "h")
        var seen = Set<String>()
        for _ in 0..<10_000 { seen.insert(namer.next()) }
        #expect(seen.count == 10_000)
    }

    @Test func hostnameSlashAndColonAreEscaped() {
        #expect(MaildirNamer.escape(hostname: "a/b:c") == "a\\057b\\072c")
        #expect(MaildirNamer(hostname: "x:y").next().hasSuffix(".x\\072y"))
        #expect(!MaildirNamer().hostname.isEmpty)
    }
}

@Suite struct LineEndingTests {
    @Test func crlfBecomesLF() {
        var c = CRLFToLFConverter()
        var out = c.convert(Array("a\r\nb\r\n".utf8))
        c.finish(into: &out)
        #expect(out == Array("a\nb\n".utf8))
    }

    @Test func crlfSplitAcrossChunks() {
        var c = CRLFToLFConverter()
        var out: [UInt8] = []
        c.convert(Array("line one\r".utf8), into: &out)
        #expect(out == Array("line one".utf8))     // the CR is held back
        c.convert(Array("\nline two\r".utf8), into: &out)
        c.convert(Array("\n".utf8), into: &out)
        c.finish(into: &out)
        #expect(out == Array("line one\nline two\n".utf8))
    }

    @Test func bareCRIsKeptIncludingAtTheEnd() {
        var c = CRLFToLFConverter()
        var out: [UInt8] = []
        c.convert(Array("a\rb\r".utf8), into: &out)
        c.convert(Array("\r".utf8), into: &out)
        c.convert(Array("\n".utf8), into: &out)
        c.convert(Array("x\r".utf8), into: &out)
        c.finish(into: &out)
        #expect(out == Array("a\rb\r\nx\r".utf8))
    }

    @Test(arguments: [1, 2, 3, 7, 64])
    func everyChunkSizeGivesTheSameResult(size: Int) {
        let text = "Subject: hi\r\n\r\nbody\r\nwith\rbare CR\r\n\r\n.\r\n"
        var c = CRLFToLFConverter()
        var out: [UInt8] = []
        for chunk in chunked(text, size: size) { c.convert(chunk, into: &out) }
        c.finish(into: &out)
        #expect(String(decoding: out, as: UTF8.self) == "Subject: hi\n\nbody\nwith\rbare CR\n\n.\n")
    }
}

@Suite struct MaildirDeliveryTests {
    @Test func prepareCreatesTheLayoutWithMode0700() throws {
        let dir = TemporaryDirectory()
        let md = Maildir(path: dir.file("mail/alice/Maildir"))
        try md.prepare()
        for sub in ["tmp", "new", "cur"] {
            #expect(fileMode(md.path + "/" + sub) == 0o700)
        }
        #expect(fileMode(dir.file("mail")) == 0o700)
        #expect(fileMode(dir.file("mail/alice")) == 0o700)
        try md.prepare()   // idempotent
    }

    @Test func deliveryWritesOneCompleteFileToNewAndNothingElse() throws {
        let dir = TemporaryDirectory()
        let md = Maildir(path: dir.file("Maildir"))
        let message = "From: a@b\r\nSubject: test\r\n\r\nHello\r\nWorld\r\n"
        let name = try md.deliver(header: Array("Return-Path: <a@b>\nDelivered-To: c@d\n".utf8),
                                  chunks: chunked(message, size: 5), namer: MaildirNamer(hostname: "h"))
        #expect(listDirectory(md.newDirectory) == [name])
        #expect(listDirectory(md.tmpDirectory).isEmpty)
        #expect(listDirectory(md.curDirectory).isEmpty)
        #expect(readText(md.newDirectory + "/" + name)
                == "Return-Path: <a@b>\nDelivered-To: c@d\nFrom: a@b\nSubject: test\n\nHello\nWorld\n")
        #expect(fileMode(md.newDirectory + "/" + name) == 0o600)
    }

    /// new/ removed while tmp/ stays (a user's cleanup, a broken client):
    /// the Maildir is made whole again instead of every delivery failing
    /// until the stage restarts.
    @Test func aRemovedNewDirectoryIsMadeAgain() throws {
        let dir = TemporaryDirectory()
        let md = Maildir(path: dir.file("Maildir"))
        let namer = MaildirNamer(hostname: "h")
        try md.deliver(header: [], chunks: [Array("Subject: 1\r\n\r\n".utf8)], namer: namer)
        for name in listDirectory(md.newDirectory) { unlink(md.newDirectory + "/" + name) }
        #expect(rmdir(md.newDirectory) == 0)
        let name = try md.deliver(header: [], chunks: [Array("Subject: 2\r\n\r\n".utf8)], namer: namer)
        #expect(listDirectory(md.newDirectory) == [name])
        #expect(listDirectory(md.tmpDirectory).isEmpty)
    }

    @Test func deliveriesNeverOverwriteEachOther() throws {
        let dir = TemporaryDirectory()
        let md = Maildir(path: dir.file("Maildir"))
        let namer = MaildirNamer(hostname: "h")
        for i in 0..<20 {
            try md.deliver(header: [], chunks: [Array("Subject: \(i)\r\n\r\n".utf8)], namer: namer)
        }
        let files = listDirectory(md.newDirectory)
        #expect(files.count == 20)
        let subjects = Set(files.map { readText(md.newDirectory + "/" + $0) })
        #expect(subjects.count == 20)
    }

    @Test func concurrentDeliveriesIntoOneMaildirAllLandAndShareDirectoryFlushes() throws {
        let dir = TemporaryDirectory()
        let md = Maildir(path: dir.file("Maildir"))
        let namer = MaildirNamer(hostname: "h")
        let sync = DirectorySync()
        let threads = 8, each = 25
        let failures = Mutex(0)
        let group = DispatchGroup()
        for t in 0..<threads {
            group.enter()
            Thread {
                for i in 0..<each {
                    do {
                        try md.deliver(header: [], chunks: [Array("Subject: \(t)-\(i)\r\n\r\n".utf8)], namer: namer)
                        try sync.sync(md.newDirectory)   // as deliver does, on a counter of our own
                    } catch {
                        failures.withLock { $0 += 1 }
                    }
                }
                group.leave()
            }.start()
        }
        group.wait()
        #expect(failures.withLock { $0 } == 0)
        let files = listDirectory(md.newDirectory)
        #expect(files.count == threads * each)
        #expect(Set(files.map { readText(md.newDirectory + "/" + $0) }).count == threads * each)
        // Never more than one flush per caller; a shared one counts once.
        #expect((1...UInt64(threads * each)).contains(sync.flushCount))
    }

    @Test func aDirectoryFlushThatFailsIsReportedToItsCaller() {
        #expect(throws: DeliveryError.self) {
            try DirectorySync().sync("/nonexistent-\(getpid())/new")
        }
    }

    @Test func aMaildirRemovedAfterADeliveryIsMadeAgain() throws {
        let dir = TemporaryDirectory()
        let md = Maildir(path: dir.file("Maildir"))
        let namer = MaildirNamer(hostname: "h")
        try md.deliver(header: [], chunks: [Array("Subject: 1\r\n\r\n".utf8)], namer: namer)
        try FileManager.default.removeItem(atPath: md.path)
        try md.deliver(header: [], chunks: [Array("Subject: 2\r\n\r\n".utf8)], namer: namer)
        let files = listDirectory(md.newDirectory)
        #expect(files.count == 1)
        #expect(files.first.map { readText(md.newDirectory + "/" + $0) } == "Subject: 2\n\n")
    }

    @Test func aFileWhereTheMaildirShouldBeIsATemporaryFailure() throws {
        let dir = TemporaryDirectory()
        try dir.write("Maildir", "not a directory")
        let md = Maildir(path: dir.file("Maildir"))
        #expect {
            try md.deliver(header: [], chunks: [Array("x\r\n".utf8)], namer: MaildirNamer(hostname: "h"))
        } throws: { error in
            guard let e = error as? DeliveryError else { return false }
            return e.isTemporary && e.status == "4.2.0" && e.text.contains("Not a directory")
        }
    }

    @Test func anUnwritableTmpIsATemporaryFailure() throws {
        let dir = TemporaryDirectory()
        let md = Maildir(path: dir.file("Maildir"))
        try md.prepare()
        // Replace tmp/ by a file: fails for root too (permissions would not).
        rmdir(md.tmpDirectory)
        try dir.write("Maildir/tmp", "")
        #expect(throws: DeliveryError.self) {
            try md.deliver(header: [], chunks: [Array("x\r\n".utf8)], namer: MaildirNamer(hostname: "h"))
        }
        #expect(listDirectory(md.newDirectory).isEmpty)
    }

    @Test func systemErrorsMapToEnhancedStatusCodes() {
        #expect(DeliveryError.system("write", path: "/x", errno: ENOSPC).status == "4.3.1")
        #expect(DeliveryError.system("write", path: "/x", errno: EDQUOT).status == "4.2.2")
        #expect(DeliveryError.system("write", path: "/x", errno: EIO).status == "4.3.0")
        #expect(DeliveryError.system("open", path: "/x", errno: EACCES).status == "4.2.0")
        let e = DeliveryError.system("write", path: "/x/y", errno: ENOSPC)
        #expect(e.text == "cannot write /x/y: No space left on device")
        #expect(e.isTemporary)
    }

    /// A real full file system: a 64 KiB tmpfs (needs root and mount(2)).
    @Test(.enabled(if: getuid() == 0, "needs root to mount a tmpfs"))
    func aFullDiskRemovesTheTmpFileAndIsTemporary() throws {
        let dir = TemporaryDirectory()
        let mountPoint = dir.file("fs")
        mkdir(mountPoint, 0o700)
        guard mount("tmpfs", mountPoint, "tmpfs", 0, "size=64k") == 0 else {
            return  // no CAP_SYS_ADMIN in this container: nothing to test here
        }
        defer { umount2(mountPoint, Int32(MNT_DETACH)) }
        let md = Maildir(path: mountPoint + "/Maildir")
        let line = String(repeating: "x", count: 998) + "\r\n"
        let big = [[UInt8]](repeating: Array(line.utf8), count: 200)   // about 200 KB
        #expect {
            try md.deliver(header: [], chunks: big, namer: MaildirNamer(hostname: "h"))
        } throws: { error in
            guard let e = error as? DeliveryError else { return false }
            return e.status == "4.3.1" && e.text.contains("No space left on device")
        }
        #expect(listDirectory(md.tmpDirectory).isEmpty)
        #expect(listDirectory(md.newDirectory).isEmpty)
        // The space was given back: a small message fits again.
        try md.deliver(header: [], chunks: [Array("Subject: small\r\n\r\n".utf8)], namer: MaildirNamer(hostname: "h"))
        #expect(listDirectory(md.newDirectory).count == 1)
    }
}

@Suite struct LoopDetectionTests {
    @Test func findsDeliveredToInTheHeaderOnly() {
        let message = "Received: x\r\nDelivered-To: Alice@Example.org\r\nDelivered-To:\r\n <bob@localhost>\r\nSubject: s\r\n\r\nDelivered-To: carol@localhost\r\n"
        let found = deliveredToAddresses(in: chunked(message, size: 3))
        #expect(found == ["alice@example.org", "bob@localhost"])
    }

    @Test func noHeaderNoAddresses() {
        #expect(deliveredToAddresses(in: []).isEmpty)
        #expect(deliveredToAddresses(in: [Array("Subject: x\r\n\r\n".utf8)]).isEmpty)
    }
}
