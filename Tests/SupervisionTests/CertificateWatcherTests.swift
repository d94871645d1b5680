// The supervisor's side of the certificate channel: when it sends, and
// what one CERTIFICATES record holds.

import CSystemShims
import FileAccess
import Glibc
import StageProtocol
import SealpostConfig
import Testing
@testable import Supervision

@Suite struct CertificateWatcherTests {
    /// A directory with cert/key files (contents are not parsed here).
    final class Files {
        let dir: String
        init() throws {
            var template = Array("/tmp/sealpost-certwatch-XXXXXX".utf8CString)
            guard let p = mkdtemp(&template) else { throw SystemError("mkdtemp") }
            dir = String(cString: p)
            for name in ["a.crt", "a.key", "b.crt", "b.key"] { try write(name, "first \(name)\n") }
        }
        deinit { _ = system("rm -rf '\(dir)'") }
        func path(_ name: String) -> String { dir + "/" + name }
        func write(_ name: String, _ text: String) throws {
            // As an editor or certbot does: a new file renamed over the old.
            try WholeFile.replace(path(name), with: Array(text.utf8), mode: 0o600, temporary: path(name + ".new"))
        }
    }

    func watcher(_ files: Files) -> CertificateWatcher {
        CertificateWatcher(pairs: [TLSCertificateSettings(certificateFile: files.path("a.crt"), keyFile: files.path("a.key")),
                                   TLSCertificateSettings(certificateFile: files.path("b.crt"), keyFile: files.path("b.key"))],
                           interval: 5)
    }

    @Test func aChangeIsDueOnceItIsStable() throws {
        let files = try Files()
        let w = watcher(files)
        w.started(now: 100)
        #expect(w.dueChange(now: 104) == nil, "not yet time to look")
        #expect(w.dueChange(now: 105) == nil, "nothing changed")
        try files.write("b.key", "second\n")
        #expect(w.dueChange(now: 110) == nil, "seen once: maybe still being written")
        #expect(w.dueChange(now: 115) == [files.path("b.key")])
        // Still undelivered (nothing was sent): due again at the next check.
        #expect(w.dueChange(now: 120) == [files.path("b.key")])
        // A symbolic link that now points elsewhere is a change too.
        try files.write("a2.crt", "other\n")
        unlink(files.path("a.crt"))
        #expect(symlink(files.path("a2.crt"), files.path("a.crt")) == 0)
        #expect(w.dueChange(now: 125) == nil)
        #expect(w.dueChange(now: 130) == [files.path("a.crt"), files.path("b.key")])
        // A missing file is never due.
        unlink(files.path("a.key"))
        #expect(w.dueChange(now: 135) == nil)
        #expect(w.dueChange(now: 140) == nil)
    }

    @Test func oneRecordCarriesEveryFileInOrder() throws {
        let files = try Files()
        let w = watcher(files)
        w.started(now: 0)
        var pair: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        defer { close(pair[0]); close(pair[1]) }
        try files.write("a.crt", "second a.crt\n")
        let line = w.send(on: pair[0], reason: "SIGHUP")
        #expect(line == "sent 2 certificate/key pair(s) to crypto-negotiate (SIGHUP)")
        // Delivered: the change is not due any more.
        #expect(w.dueChange(now: 5) == nil)
        #expect(w.dueChange(now: 10) == nil)

        var buffer = [UInt8](repeating: 0, count: 70_000)
        var fds = [Int32](repeating: -1, count: Int(SEALPOST_MAX_FDS))
        var nfds = 0
        var truncated: Int32 = 0
        let n = buffer.withUnsafeMutableBytes { raw in
            fds.withUnsafeMutableBufferPointer { sealpost_recvmsg_fds(pair[1], raw.baseAddress, raw.count, $0.baseAddress, $0.count, &nfds, &truncated) }
        }
        try #require(n > 0 && nfds == 4 && truncated == 0)
        defer { for fd in fds.prefix(nfds) { close(fd) } }
        var decoder = FrameDecoder(schema: .certificates, direction: .serverToClient, afterHello: true)
        decoder.append(buffer[0..<n])
        let frame = try #require(try decoder.next())
        #expect(decoder.bufferedByteCount == 0)
        #expect(frame.type == .certificates)
        #expect(try frame.uint("count") == 2)
        #expect(try frame.optionalText("reason") == "SIGHUP")
        #expect(frame.attributes.filter { $0.value.type == .fd }.map(\.name) == ["cert-1", "key-1", "cert-2", "key-2"])
        // The descriptors are the files, in that order, readable from 0.
        for (fd, name) in zip(fds.prefix(nfds), ["a.crt", "a.key", "b.crt", "b.key"]) {
            var content = [UInt8](repeating: 0, count: 64)
            let got = content.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            #expect(String(decoding: content.prefix(max(0, got)), as: UTF8.self) == (name == "a.crt" ? "second a.crt\n" : "first \(name)\n"))
        }
    }

    @Test func aMissingFileOrADeadPeerIsAWarning() throws {
        let files = try Files()
        let w = watcher(files)
        w.started(now: 0)
        var pair: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        defer { close(pair[0]) }
        unlink(files.path("b.crt"))
        #expect(w.send(on: pair[0], reason: "SIGHUP").hasPrefix("warning: certificates not reloaded (SIGHUP): open \(files.path("b.crt")): "))
        try files.write("b.crt", "back\n")
        // The peer's end dies by shutdown, not by close alone: a child that
        // another test forks meanwhile holds a copy of every descriptor
        // until its exec, and the socket lives on in it (once, a send here
        // then succeeded).
        shutdown(pair[1], Int32(SHUT_RDWR))
        close(pair[1])
        signal(SIGPIPE, SIG_IGN)
        #expect(w.send(on: pair[0], reason: "SIGHUP").hasPrefix("warning: certificates not reloaded (SIGHUP): sending to crypto-negotiate: "))
    }

    @Test func theSchemaWantsExactlyCountPairs() throws {
        func check(_ attributes: [(String, AttributeValue)]) -> String? {
            do {
                try ProtocolSchema.certificates.validate(Frame(.certificates, attributes: attributes), direction: .serverToClient)
                return nil
            } catch {
                return error.message
            }
        }
        #expect(check([("count", .uint(1)), ("cert-1", .fd(5)), ("key-1", .fd(6))]) == nil)
        #expect(check([("count", .uint(2)), ("cert-1", .fd(5)), ("key-1", .fd(6))])?.contains("\"cert-2\" is required") == true)
        #expect(check([("count", .uint(1)), ("cert-1", .fd(5)), ("key-1", .fd(6)), ("key-2", .fd(7))])?.contains("beyond count") == true)
        #expect(check([("count", .uint(0))]) != nil)
        #expect(check([("count", .uint(9))]) != nil)
        #expect(check([("count", .uint(1)), ("cert-1", .fd(5)), ("key-1", .text("x"))]) != nil)
        #expect(check([("count", .uint(1)), ("cert-1", .fd(5)), ("key-1", .fd(6)), ("path", .text("/etc"))]) != nil)
        #expect(throws: ProtocolError.self) {
            try ProtocolSchema.certificates.validate(Frame(.certificates, attributes: [("count", .uint(1))]), direction: .clientToServer)
        }
    }
}

/// The supervisor's check of local-deliver's files (the aliases file, the
/// configuration, /etc/passwd): a stable change starts a reload once; a
/// removed aliases file is a change too (it is an empty table).
@Suite struct ReloadWatchTests {
    @Test func aStableChangeIsDueOnceAndARemovalCounts() throws {
        let files = try CertificateWatcherTests.Files()
        var watch = FileWatch(paths: [files.path("a.crt"), files.path("b.crt")], interval: 5, missingIsAChange: true)
        watch.started(now: 0)
        #expect(watch.dueChange(now: 5) == nil)
        try files.write("a.crt", "edited\n")
        #expect(watch.dueChange(now: 10) == nil, "seen once: maybe still being written")
        #expect(watch.dueChange(now: 15) == [files.path("a.crt")])
        // The reload starts a new instance, which reads the files now: a
        // change it refuses is not tried again until the files change again.
        watch.started(now: 15)
        #expect(watch.dueChange(now: 20) == nil)
        #expect(watch.dueChange(now: 25) == nil)
        unlink(files.path("b.crt"))
        #expect(watch.dueChange(now: 30) == nil)
        #expect(watch.dueChange(now: 35) == [files.path("b.crt")])
    }
}
