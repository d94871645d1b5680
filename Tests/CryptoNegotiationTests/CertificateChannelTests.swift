// Reloads through the supervisor's certificate channel: the files arrive
// as descriptors; the configured paths are never reopened.

import TLSTestSupport
import CSystemShims
import Foundation
import Glibc
import StageProtocol
import Testing
@testable import CryptoNegotiation
@testable import TLS

@Suite struct CertificateChannelTests {
    /// One CERTIFICATES record with the given files as the pair's descriptors.
    func sendCertificates(_ channel: Int32, _ cert: String, _ key: String, count: UInt64 = 1) throws {
        let c = open(cert, O_RDONLY | O_CLOEXEC)
        let k = open(key, O_RDONLY | O_CLOEXEC)
        defer { close(c); close(k) }
        try #require(c >= 0 && k >= 0)
        let bytes = FrameEncoder.encode(Frame(.certificates, attributes: [
            ("count", .uint(count)), ("reason", .text("test")), ("cert-1", .fd(c)), ("key-1", .fd(k))]))
        let sent = bytes.withUnsafeBytes { raw in
            [c, k].withUnsafeBufferPointer { sealpost_sendmsg_fds(channel, raw.baseAddress, raw.count, $0.baseAddress, $0.count) }
        }
        try #require(sent == bytes.count)
    }

    @Test func newCertificatesFromDescriptorsForNewHandshakesOnly() throws {
        var pair: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        defer { close(pair[0]) }
        let running = try ReloadableService { try $0.adoptCertificateChannel(fd: pair[1]) }
        defer { withExtendedLifetime(running) {} }   // the service runs until the test ends
        let (pki, tag, service, c) = (running.pki, running.tag, running.service, running.connection)
        let old = try negotiatePair(c, first: 101)

        // The configured files go away (as if out of reach in a chroot):
        // SIGHUP's reload does nothing by path with a channel...
        try shell("rm r-\(tag).pem r-\(tag).key", in: pki.dir)
        let hup = Box<Bool>()
        service.reload { hup.put($0) }
        #expect(try hup.take())
        // ... the certificate arrives as descriptors.
        try sendCertificates(pair[0], pki.path("other.pem"), pki.path("other.key"))
        try waitForSubject(c, "CN=other.example.test")
        // The session made before goes on with its certificate.
        try exchangeAndClose(c, old, sessions: [101, 102])

        // Refused: a file that is no certificate, a key of another; the
        // certificates in use stay.
        try "garbage\n".write(toFile: pki.path("bad-\(tag).pem"), atomically: true, encoding: .utf8)
        try sendCertificates(pair[0], pki.path("bad-\(tag).pem"), pki.path("leaf-ec.key"))
        try sendCertificates(pair[0], pki.path("leaf-ec.pem"), pki.path("other.key"))
        try exchangeAndClose(c, try negotiatePair(c, pkix: false, subject: "CN=other.example.test"))
        // And a good one again.
        try sendCertificates(pair[0], pki.path("leaf-ec.pem"), pki.path("leaf-ec.key"))
        try waitForSubject(c, "CN=mx.example.test")
    }

    /// New handshakes until one presents `subject` (the record is handled
    /// on the service's loop, after the send returned).
    func waitForSubject(_ c: StageConnection, _ subject: String) throws {
        for _ in 0..<200 {
            var seen = ""
            let p = try negotiatePair(c, pkix: false, subject: nil, seen: { seen = $0 })
            try exchangeAndClose(c, p)
            if seen == subject { return }
            usleep(20_000)
        }
        throw TestFailure("no handshake presented \(subject)")
    }
}
