import Glibc
import Testing
@testable import Supervision
import StageRuntime

/// The supervisor keeps smtp-listen's listening sockets across restarts;
/// one that the kernel ended must be bound again, not handed on dead.
@Suite struct ListeningSocketsTests {
    /// A loopback port free a moment ago (bound to port 0, then closed).
    func freePort() throws -> Int {
        let probe = try ListeningSockets.bind(ListenerDefinition(kind: "smtp", host: "127.0.0.1", port: 0))
        defer { close(probe) }
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        try withUnsafeMutablePointer(to: &address) { pointer in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                try #require(getsockname(probe, $0, &length) == 0)
            }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// Whether a TCP connection to 127.0.0.1:port is accepted.
    func connects(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }

    @Test func aSocketThatStoppedListeningIsBoundAgainInPlace() throws {
        let port = try freePort()
        let sockets = ListeningSockets(definitions: [ListenerDefinition(kind: "smtp", host: "127.0.0.1", port: port)])
        defer { sockets.closeAll() }
        _ = try sockets.bindAll()
        let first = try #require(sockets.descriptors.first)
        let firstIdentity = try #require(Self.identity(of: first))
        // Nothing to renew while it listens.
        let quiet = sockets.renewDead()
        #expect(quiet.notes.isEmpty && quiet.failures.isEmpty)
        #expect(sockets.descriptors == [first])

        // shutdown(2) of a listening socket ends it the way `ss -K` does:
        // it leaves the listening state and accept(2) fails from then on.
        #expect(shutdown(first, Int32(SHUT_RDWR)) == 0)
        #expect(!ListeningSockets.accepts(first))
        #expect(!connects(port))

        let renewed = sockets.renewDead()
        #expect(renewed.failures.isEmpty)
        #expect(renewed.notes.count == 1 && renewed.notes.first?.contains("bound again") == true, "\(renewed.notes)")
        let second = try #require(sockets.descriptors.first)
        #expect(ListeningSockets.accepts(second))
        #expect(connects(port))
        // Tests run in parallel, so the number may already name another
        // descriptor; the dead socket is gone if the number no longer names
        // that socket (device and inode: socket inodes are not reused while
        // one is open).
        #expect(Self.identity(of: first) != firstIdentity, "the dead socket is closed")
    }

    /// The device and inode behind a descriptor, nil if it is not open.
    static func identity(of descriptor: Int32) -> [UInt]? {
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { return nil }
        return [UInt(status.st_dev), UInt(status.st_ino)]
    }

    @Test func aSocketThatCannotBeBoundAgainIsKeptAndReported() throws {
        let port = try freePort()
        let sockets = ListeningSockets(definitions: [ListenerDefinition(kind: "smtp", host: "127.0.0.1", port: port)])
        defer { sockets.closeAll() }
        _ = try sockets.bindAll()
        let first = try #require(sockets.descriptors.first)
        #expect(shutdown(first, Int32(SHUT_RDWR)) == 0)
        // Someone else took the port meanwhile and listens on it (with
        // SO_REUSEADDR, as the dead socket still holds the address).
        let squatter = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(squatter) }
        var on: Int32 = 1
        #expect(setsockopt(squatter, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size)) == 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(squatter, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        try #require(bound == 0 && listen(squatter, 1) == 0)

        let renewed = sockets.renewDead()
        #expect(renewed.notes.isEmpty)
        #expect(renewed.failures.count == 1 && renewed.failures.first?.contains("no longer listens") == true, "\(renewed.failures)")
        #expect(sockets.descriptors == [first])
    }
}
