// A blocking stage-protocol connection over a connected Unix stream socket,
// for the simple sides of the pipeline (queue-inject, the sealpost CLI,
// local-deliver) and for tests. One thread uses it at a time.
//
// Sending: every frame is checked (framing and schema) before a byte is
// written; a frame with `fd` attributes goes out with one sendmsg(2) whose
// first byte is the frame's first byte and whose SCM_RIGHTS message carries
// the descriptors in attribute order (PROTOCOL.md section 3).
//
// Receiving: recvmsg(2) with MSG_CMSG_CLOEXEC, at most 64 KiB at a time, and
// the decoder is drained before the next read, so the buffer never holds
// more than one partial frame plus one read. Descriptors are queued with the
// stream offset of the read they came with and handed to the `fd`
// attributes of the first frame starting at or after that offset.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSystemShims

/// A failed system call, with errno and its text.
public struct StageIOError: Error, CustomStringConvertible, Equatable {
    public var operation: String
    public var code: Int32
    public init(_ operation: String, code: Int32) {
        self.operation = operation
        self.code = code
    }
    /// strerror(code), e.g. "No such file or directory".
    public var reason: String { String(cString: strerror(code)) }
    public var description: String { "\(operation): \(reason)" }
}

/// The peer sent an ERROR frame (and will close the connection).
public struct PeerError: Error, CustomStringConvertible, Equatable {
    public var status: String
    public var text: String
    public init(status: String, text: String) {
        self.status = status
        self.text = text
    }
    public var description: String { "\(status) \(text)" }
}

public final class StageConnection {
    /// The socket; -1 once closed.
    public private(set) var fileDescriptor: Int32
    private var decoder: FrameDecoder
    /// Descriptors received and not yet handed to a frame, with the stream
    /// offset of the first byte of the read they arrived with.
    private var pendingFDs: [(fd: Int32, offset: UInt64)] = []
    private var receivedBytes: UInt64 = 0
    private var readBuffer = [UInt8](repeating: 0, count: 65_536)
    private var failed: Error?
    /// Whether this side sent its HELLO: before it, only HELLO or ERROR.
    private var helloSent: Bool
    /// How long one wait for the socket may take (ms); -1: no limit.
    private var waitLimit: Int32 = -1

    /// The most descriptors one frame may carry (the receive buffer's size).
    public static let maxDescriptorsPerFrame = Int(SEALPOST_MAX_FDS)

    /// Connects to a stage's socket; the protocol is set by `clientHello`.
    ///
    /// `timeout` (seconds): for a client that must not wait forever on a
    /// stage that is alive but stuck (stopped, or wedged on a hung disk):
    /// the connect, and then every wait for the socket to take or give
    /// bytes, gives up after that long with ETIMEDOUT (EAGAIN for a connect
    /// that found the backlog full). nil: wait as long as it takes.
    public static func connect(path: String, timeout: Double? = nil) throws -> StageConnection {
        let milliseconds = timeout.map { Int32(clamping: Int(($0 * 1000).rounded(.up))) }.map { max(1, $0) }
        let fd = sealpost_unix_connect_timeout(path, milliseconds ?? 0)
        guard fd >= 0 else { throw StageIOError("connect to \(path)", code: errno) }
        let connection = StageConnection(fd: fd, decoder: FrameDecoder(protocol: nil, direction: .serverToClient))
        if let milliseconds {
            // Non-blocking from now on: every wait goes through poll(2),
            // which keeps the time limit.
            let flags = fcntl(fd, F_GETFL)
            guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else {
                throw StageIOError("fcntl O_NONBLOCK", code: errno)
            }
            connection.waitLimit = milliseconds
        }
        return connection
    }

    /// Throws unless the process that listens on the other end did so as
    /// one of `uids` (SO_PEERCRED gives the server's credentials as they
    /// were at its listen(2)). For a client that hands secrets (sockets to
    /// encrypt, and trust in what comes back) to a socket in a directory
    /// other stages' users may write: a socket someone put in the server's
    /// place is refused. nil: no check (one user runs every stage).
    public func requireServer(uids: Set<UInt32>?, name: String) throws {
        guard let uids else { return }
        var uid: UInt32 = 0
        guard sealpost_peer_uid(fileDescriptor, &uid) == 0 else {
            throw StageIOError("SO_PEERCRED on the connection to \(name)", code: errno)
        }
        guard uids.contains(uid) else {
            throw ProtocolError("\(name) listens as uid \(uid), not as \(uids.sorted().map(String.init).joined(separator: " or ")): refused")
        }
    }

    /// Takes ownership of a connected socket. `direction`: of the frames
    /// *received* (a server adopting an accepted socket: `.clientToServer`).
    public convenience init(adopting fd: Int32, protocol: ProtocolName, direction: Direction) {
        self.init(fd: fd, decoder: FrameDecoder(protocol: `protocol`, direction: direction))
    }

    /// Takes ownership of a connected socket with a decoder of the caller's
    /// choice (another schema, or `afterHello`).
    public init(fd: Int32, decoder: FrameDecoder) {
        self.fileDescriptor = fd
        self.decoder = decoder
        self.helloSent = decoder.helloReceived   // a decoder made after the HELLOs
    }

    deinit { close() }

    /// The protocol in force (known after the HELLO).
    public var protocolName: ProtocolName? { decoder.protocolName }

    // MARK: Sending

    /// Checks the frame (framing, then the schema for the sending direction)
    /// and writes it whole, with its descriptors. Throws `ProtocolError`
    /// without writing anything when the frame is invalid.
    public func send(_ frame: Frame) throws {
        guard fileDescriptor >= 0 else { throw StageIOError("send", code: EBADF) }
        let length = try FrameEncoder.checkFraming(frame)
        let sendDirection = decoder.direction.reversed
        if frame.type == .hello, case .text(let named)? = frame["protocol"], let name = ProtocolName(rawValue: named) {
            decoder.expect(protocol: name)
        }
        if !helloSent && frame.type != .hello && frame.type != .error {
            throw ProtocolError("\(frame.type.name): not allowed before HELLO (only HELLO and ERROR are)")
        }
        if helloSent && frame.type == .hello {
            throw ProtocolError("HELLO: allowed only once, as the first frame")
        }
        if let schema = decoder.schema {
            try schema.validate(frame, direction: sendDirection)
        } else {
            try Standard.beforeHello.validate(frame, direction: sendDirection)
        }
        var fds: [Int32] = []
        for (_, value) in frame.attributes {
            if case .fd(let d) = value { fds.append(d) }
        }
        guard fds.count <= Self.maxDescriptorsPerFrame else {
            throw ProtocolError("\(frame.type.name): \(fds.count) descriptors exceed the limit of \(Self.maxDescriptorsPerFrame) per frame")
        }
        var bytes: [UInt8] = []
        FrameEncoder.unsafeEncode(frame, length: length, into: &bytes)
        try write(bytes, fds: fds)
        if frame.type == .hello { helloSent = true }
    }

    private func write(_ bytes: [UInt8], fds: [Int32]) throws {
        var offset = 0
        var fdsToSend = fds
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                fdsToSend.withUnsafeBufferPointer { fdp in
                    sealpost_sendmsg_fds(fileDescriptor, raw.baseAddress! + offset, raw.count - offset,
                                         fdp.baseAddress, fdp.count)
                }
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { try wait(for: Int16(POLLOUT)); continue }
                throw StageIOError("send", code: e)
            }
            // The descriptors went with the first byte; partial writes
            // continue without them.
            fdsToSend = []
            offset += n
        }
    }

    /// Blocks until the socket is ready (a non-blocking socket: adopted, or
    /// connected with a timeout, which this wait keeps).
    private func wait(for events: Int16) throws {
        var p = pollfd(fd: fileDescriptor, events: events, revents: 0)
        while true {
            let ready = poll(&p, 1, waitLimit)
            if ready > 0 { return }
            if ready == 0 {
                throw StageIOError(events == Int16(POLLIN) ? "receive" : "send", code: ETIMEDOUT)
            }
            guard errno == EINTR else { throw StageIOError("poll", code: errno) }
        }
    }

    // MARK: Receiving

    /// The next frame, with received descriptors in its `fd` attributes
    /// (owned by the caller from now on); nil on an orderly EOF between
    /// frames. Throws `ProtocolError` on a protocol violation (the connection
    /// is then unusable: close it), `StageIOError` on a system error.
    public func receive() throws -> Frame? {
        if let failed { throw failed }
        do {
            return try receiveFrame()
        } catch {
            failed = error
            closePendingFDs()
            throw error
        }
    }

    private func receiveFrame() throws -> Frame? {
        guard fileDescriptor >= 0 else { throw StageIOError("receive", code: EBADF) }
        while true {
            let frameStart = decoder.consumedBytes
            if var frame = try decoder.next() {
                try attachDescriptors(&frame, frameStart: frameStart)
                if decoder.bufferedByteCount == 0 && !pendingFDs.isEmpty {
                    throw ProtocolError("\(pendingFDs.count) descriptor(s) arrived with no fd attribute to take them")
                }
                return frame
            }
            var nfds = 0
            var truncated: Int32 = 0
            var fds = [Int32](repeating: -1, count: Self.maxDescriptorsPerFrame)
            let n = readBuffer.withUnsafeMutableBytes { raw in
                fds.withUnsafeMutableBufferPointer { fdp in
                    sealpost_recvmsg_fds(fileDescriptor, raw.baseAddress, raw.count,
                                         fdp.baseAddress, fdp.count, &nfds, &truncated)
                }
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { try wait(for: Int16(POLLIN)); continue }
                throw StageIOError("receive", code: e)
            }
            for i in 0..<nfds { pendingFDs.append((fd: fds[i], offset: receivedBytes)) }
            if truncated != 0 {
                throw ProtocolError("descriptors were lost in transit (more than \(Self.maxDescriptorsPerFrame) in one read)")
            }
            if pendingFDs.count > 2 * Self.maxDescriptorsPerFrame {
                throw ProtocolError("\(pendingFDs.count) descriptors received and not taken by any frame")
            }
            if n == 0 {
                if decoder.bufferedByteCount == 0 {
                    guard pendingFDs.isEmpty else {
                        throw ProtocolError("\(pendingFDs.count) descriptor(s) arrived with no fd attribute to take them")
                    }
                    return nil
                }
                throw ProtocolError("connection closed in the middle of a frame (\(decoder.bufferedByteCount) bytes of it received)")
            }
            receivedBytes += UInt64(n)
            decoder.append(readBuffer[0..<n])
        }
    }

    private func attachDescriptors(_ frame: inout Frame, frameStart: UInt64) throws {
        let wanted = frame.descriptorCount
        guard wanted > 0 else { return }
        // Descriptors arrive with the read holding the frame's first byte,
        // so only those that came at or before the frame's start are its own.
        let available = pendingFDs.prefix { $0.offset <= frameStart }.count
        guard available >= wanted else {
            throw ProtocolError("\(frame.type.name): \(wanted) fd attribute(s) but \(available) descriptor(s) received with the frame")
        }
        var taken = pendingFDs.prefix(wanted).map(\.fd)
        pendingFDs.removeFirst(wanted)
        for i in frame.attributes.indices where frame.attributes[i].value.type == .fd {
            frame.attributes[i].value = .fd(taken.removeFirst())
        }
    }

    private func closePendingFDs() {
        for p in pendingFDs { _ = Glibc.close(p.fd) }
        pendingFDs.removeAll()
    }

    // MARK: HELLO

    /// Client side of the HELLO exchange: sends HELLO (`protocol`, `version`
    /// 1, then `extra`, e.g. `software`, or `transport` in `deliver`) and
    /// returns the server's HELLO. Throws `PeerError` when the server answers
    /// ERROR, `ProtocolError` on a mismatch or another version.
    @discardableResult
    public func clientHello(_ protocol: ProtocolName, extra: [(String, AttributeValue)] = []) throws -> Frame {
        if let current = decoder.schema, current.name != `protocol`.rawValue {
            throw ProtocolError("HELLO: this connection speaks \(current.name), not \(`protocol`.rawValue)")
        }
        decoder.expect(protocol: `protocol`)
        var refusal: Frame?
        do {
            try send(Frame(.hello, attributes: [("protocol", .text(`protocol`.rawValue)), ("version", .uint(1))] + extra))
        } catch let failed as StageIOError where failed.code == EPIPE || failed.code == ECONNRESET {
            // A server that refuses at accept (too many connections, say)
            // writes its ERROR and closes, possibly before our HELLO
            // arrives: its reason is still ours to read, and says more
            // than "Broken pipe".
            guard let said = try? receive(), said.type == .error else { throw failed }
            refusal = said
        }
        guard let reply = try refusal ?? receive() else {
            throw ProtocolError("HELLO: the server closed the connection before answering")
        }
        if reply.type == .error {
            throw PeerError(status: try reply.text("status"), text: try reply.text("text"))
        }
        guard reply.type == .hello else {
            throw ProtocolError("\(reply.type.name): expected HELLO from the server")
        }
        let version = try reply.uint("version")
        guard version == 1 else {
            throw ProtocolError("HELLO: attribute \"version\": the server speaks version \(version), this client 1")
        }
        return reply
    }

    // MARK: Closing

    /// shutdown(SHUT_WR): the peer reads EOF after the frames sent so far.
    public func shutdownWrite() {
        if fileDescriptor >= 0 { _ = shutdown(fileDescriptor, Int32(SHUT_WR)) }
    }

    public func close() {
        closePendingFDs()
        if fileDescriptor >= 0 {
            _ = Glibc.close(fileDescriptor)
            fileDescriptor = -1
        }
    }
}

@available(*, unavailable, message: "StageConnection is thread-confined")
extension StageConnection: Sendable {}
