// The test sink itself (Support.swift): a sink must be trustworthy for the
// tests that use it to mean anything.

import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The test sink itself: a stopped sink must never answer another sink's
/// clients. (It once closed its listening socket in stop() while its
/// accept thread could still call accept() on that descriptor number, by
/// then another test's listener; that test's connection then met the
/// wrong script, and permanentRefusalBouncesWithTheReplyQuoted failed
/// once in a parallel run.)
@Suite struct TestSinkTests {
    @Test func aStoppedSinkTakesNoOtherSinksConnections() throws {
        for _ in 0..<20 {
            let gone = try TestSink(script: SinkScript(greeting: "554 5.3.2 gone"))
            gone.stop()
            let sink = try TestSink()
            defer { sink.stop() }
            let greeting = try greetingFrom(port: sink.port)
            #expect(greeting.hasPrefix("220 sink.test"))
            #expect(gone.connections == 0)
        }
    }

    private func greetingFrom(port: Int) throws -> String {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(s) }
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = in_port_t(UInt16(port).bigEndian)
        inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr)
        let rc = withUnsafePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        try #require(rc == 0)
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 512)
        while !reply.contains(10) {
            let n = chunk.withUnsafeMutableBytes { read(s, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            reply += chunk[0..<n]
        }
        return String(decoding: reply, as: UTF8.self)
    }
}
