// The crypto-negotiate service: a Unix socket speaking the `tls` protocol
// (PROTOCOL.md section 4.5), and the relay engine, on one event loop.
//
// Each control connection (smtp-listen, remote-deliver) sends NEGOTIATE
// frames carrying a TCP socket; the engine runs the handshake and answers
// NEGOTIATED (with the caller's plaintext socket) or FAILED, then CLOSED
// when the relayed session ends. Sessions do not depend on the control
// connection: if it goes away, a finished handshake's plaintext end is
// closed (the session then ends with close_notify).

#if canImport(Glibc)
import Glibc
#endif
import CSystemShims
import Logging
import StageProtocol
import TLS

public final class NegotiationService: @unchecked Sendable {
    public let loop: EventLoop
    let engine: RelayEngine
    let configuration: TLSConfiguration
    /// Loop thread only (after init).
    var serverContexts: TLSServerContexts?
    let clientContexts: [String: TLSClientContext]
    let logger = Logger(label: "crypto-negotiate")
    private var listener: ListenerHandler?
    /// The supervisor's certificate channel, when it gave one: then the
    /// only source of reloads (CertificateChannel.swift).
    var certificateChannel: CertificateChannel?
    /// Stamps of a reload that failed, so that a changed file is retried
    /// only when it changes again.
    private var failedReloadStamps: [String] = []

    /// Loads every certificate, key and CA bundle now (call before dropping
    /// privileges). A configuration with no certificate serves the client
    /// role only.
    public init(configuration: TLSConfiguration) throws {
        self.configuration = configuration
        if !configuration.server.certificates.isEmpty {
            serverContexts = try TLSServerContexts(configuration.server)
        }
        var clients: [String: TLSClientContext] = [:]
        for (name, path) in configuration.caBundles {
            clients[name] = try TLSClientContext(caFile: path, common: configuration.common,
                                                 opportunisticCipherList: configuration.opportunisticCipherList)
        }
        if clients["default"] == nil {
            // DANE, pins and "none" need no trust anchors.
            clients["default"] = try TLSClientContext(caFile: nil, common: configuration.common,
                                                      opportunisticCipherList: configuration.opportunisticCipherList)
        }
        clientContexts = clients
        loop = try EventLoop()
        engine = RelayEngine(loop: loop)
        loop.every(5) { [weak self] in self?.reloadIfFilesChanged() }
        if configuration.server.sessionTickets {
            loop.every(TLSServerContexts.ticketKeyLifetime) { [weak self] in self?.rotateTicketKeys() }
        }
    }

    /// On the loop, where the handshakes run (see TLSServerContexts).
    private func rotateTicketKeys() {
        do {
            try serverContexts?.rotateTicketKeys()
        } catch {
            logger.warning("cannot rotate the session ticket keys: \(error)")
        }
    }

    /// Listens on `path` (a stale socket is replaced) with `mode`. Call
    /// before `run()` (the loop's registrations are not thread-safe).
    public func listen(path: String, mode: mode_t = 0o660) throws {
        unlink(path)
        let fd = sealpost_unix_listen(path, 128)
        guard fd >= 0 else { throw StageIOError("listen on \(path)", code: errno) }
        chmod(path, mode)
        setNonBlocking(fd)
        let handler = ListenerHandler(service: self, fd: fd)
        listener = handler
        try loop.register(fd, handler, writable: false)
        loop.every(1) { [weak handler] in handler?.retryIfPaused() }
    }

    /// Runs the loop on the calling thread until `stop()`.
    public func run() { loop.run() }

    public func stop() { loop.stop() }

    /// Loads the certificates again for new handshakes (SIGHUP); sessions
    /// in progress keep theirs. On failure the old ones stay.
    /// `done` (optional) gets whether the new certificates are in use.
    /// With a certificate channel, SIGHUP reaches the supervisor too,
    /// which sends the files: nothing is reopened here (`done` gets true).
    public func reload(_ done: (@Sendable (Bool) -> Void)? = nil) {
        loop.execute { [self] in
            if certificateChannel != nil {
                logger.info("SIGHUP: the certificates come from the supervisor (certificate channel)")
                done?(true)
                return
            }
            let ok = reloadNow()
            done?(ok)
        }
    }

    @discardableResult
    func reloadNow() -> Bool {
        guard !configuration.server.certificates.isEmpty else { return true }
        do {
            serverContexts = try TLSServerContexts(configuration.server)
            logger.info("reloaded \(configuration.server.certificates.count) certificate(s)")
            return true
        } catch {
            logger.warning("reload failed, keeping the certificates loaded before: \(error)")
            return false
        }
    }

    private func reloadIfFilesChanged() {
        guard certificateChannel == nil, let current = serverContexts, current.filesChanged() else { return }
        let stamps = current.currentStamps()
        guard stamps != failedReloadStamps else { return }
        if !reloadNow() { failedReloadStamps = stamps }
    }

    // MARK: Requests (loop thread)

    func start(_ request: NegotiationRequest, for connection: ControlConnection) {
        let session = request.session
        var timeouts = configuration.timeouts
        if let t = request.handshakeTimeout { timeouts.handshake = t }
        if let t = request.idleTimeout { timeouts.idle = t }
        let peer = request.peer ?? "unknown"
        // Says why a client session has an older suite, or why a strict
        // handshake found no suite in common with an old server.
        let cipherNote: String
        if case .client(_, _, _, let ciphers) = request.role { cipherNote = ", ciphers=\(ciphers.rawValue)" } else { cipherNote = "" }
        let onHandshake: (Result<HandshakeResult, TLSError>) -> Void = { [weak connection, logger] result in
            switch result {
            case .success(let h):
                let r = h.report
                logger.info("session=\(session), peer=\(peer), protocol=\(r.protocolVersion), cipher=\(r.cipher), group=\(r.group ?? "none"), sni=\(r.serverName ?? "none"), authentication=\(r.authentication.rawValue)\(cipherNote)\(r.verifyError.map { ", verify=\"\($0)\"" } ?? "")")
                if let connection {
                    connection.send(Replies.negotiated(session: session, plaintext: h.plaintext, r), closing: [h.plaintext])
                } else {
                    close(h.plaintext)
                }
            case .failure(let e):
                logger.info("session=\(session), peer=\(peer), status=\(e.enhancedStatus)\(cipherNote), handshake failed: \(e)")
                connection?.sessionEnded(session)
                connection?.send(Replies.failed(session: session, e), closing: [])
            }
        }
        let reportClose = request.reportClose
        let onClose: (RelaySummary) -> Void = { [weak connection, logger] s in
            logger.info("session=\(session), peer=\(peer), closed: received=\(s.received), sent=\(s.sent), close_notify=\(s.closeNotify), reason=\(s.reason)")
            connection?.sessionEnded(session)
            if reportClose { connection?.send(Replies.closed(session: session, s), closing: []) }
        }
        switch request.role {
        case .server:
            guard let contexts = serverContexts else {
                close(request.socket)
                onHandshake(.failure(TLSError(.configuration, "no certificate configured: the server role is not available")))
                return
            }
            engine.startServer(contexts: contexts, socket: request.socket, timeouts: timeouts,
                               onHandshake: onHandshake, onClose: onClose)
        case .client(let serverName, let policy, let bundle, let ciphers):
            guard let context = clientContexts[bundle] else {
                close(request.socket)
                onHandshake(.failure(TLSError(.configuration, "no CA bundle named \"\(bundle)\" (known: \(clientContexts.keys.sorted().joined(separator: ", ")))")))
                return
            }
            engine.startClient(context: context, socket: request.socket, serverName: serverName, policy: policy,
                               ciphers: ciphers, timeouts: timeouts, onHandshake: onHandshake, onClose: onClose)
        }
    }

    /// One info line in the stage's log.
    public func log(_ message: String) { logger.info("\(message)") }

    /// The uids that may connect (checked with SO_PEERCRED at accept); nil:
    /// anyone the socket's mode lets in (one user runs every stage). Set
    /// before `run()`.
    public var allowedPeerUIDs: Set<UInt32>? = nil

    /// Sessions in handshake or relaying (loop thread).
    public var activeSessions: Int { engine.activeSessions }
}

/// One recvmsg(2) into `buffer` with the descriptors that came along
/// (close-on-exec); `truncated` when descriptors were lost. n < 0: errno.
func receiveWithDescriptors(_ fd: Int32, into buffer: inout [UInt8]) -> (n: Int, fds: [Int32], truncated: Bool) {
    var nfds = 0
    var truncated: Int32 = 0
    var fds = [Int32](repeating: -1, count: Int(SEALPOST_MAX_FDS))
    let n = buffer.withUnsafeMutableBytes { raw in
        fds.withUnsafeMutableBufferPointer { fdp in
            sealpost_recvmsg_fds(fd, raw.baseAddress, raw.count, fdp.baseAddress, fdp.count, &nfds, &truncated)
        }
    }
    return (n, Array(fds.prefix(nfds)), truncated != 0)
}

final class ListenerHandler: EventHandler {
    unowned let service: NegotiationService
    let fd: Int32
    var connections: [Int32: ControlConnection] = [:]

    init(service: NegotiationService, fd: Int32) {
        self.service = service
        self.fd = fd
    }

    /// accept(2) failed for want of descriptors or memory: the listener is
    /// edge-triggered, so the connections left in the backlog raise no new
    /// event; the loop's ticker tries again (retryIfPaused).
    private var paused = false

    func retryIfPaused() {
        if paused { ready(fd: fd, events: 0) }
    }

    func ready(fd: Int32, events: UInt32) {
        while true {
            let c = sealpost_accept_cloexec(self.fd)
            if c < 0 {
                let e = errno
                if e == ECONNABORTED || e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { return }
                if !paused {
                    // Once per episode, not once a second.
                    service.logger.warning("accept: \(String(cString: strerror(e))); trying again every second")
                }
                paused = true
                return
            }
            if paused { service.logger.info("accept: accepting again") }
            paused = false
            // The socket's group is every stage's (run/'s); only the stages
            // that do TLS may have handshakes made with the server's key.
            if let allowed = service.allowedPeerUIDs {
                var uid: UInt32 = 0
                let known = sealpost_peer_uid(c, &uid) == 0
                guard known, allowed.contains(uid) else {
                    let who = known ? "uid \(uid)" : "an unknown uid"
                    service.logger.warning("refused a connection from \(who): only smtp-listen, remote-deliver and root may use crypto-negotiate")
                    close(c)
                    continue
                }
            }
            setNonBlocking(c)
            let connection = ControlConnection(service: self.service, listener: self, fd: c)
            connections[c] = connection
            do {
                try service.loop.register(c, connection, writable: false)
            } catch {
                connections[c] = nil
                close(c)
                continue
            }
            connection.ready(fd: c, events: 0)
        }
    }
}

/// One client of the `tls` socket: non-blocking frame I/O with descriptors.
final class ControlConnection: EventHandler {
    unowned let service: NegotiationService
    unowned let listener: ListenerHandler
    let fd: Int32
    private var decoder = FrameDecoder(protocol: .tls, direction: .clientToServer)
    private var pendingFDs: [(fd: Int32, offset: UInt64)] = []
    private var receivedBytes: UInt64 = 0
    private var output: [(bytes: [UInt8], fds: [Int32], offset: Int)] = []
    private var closed = false
    private var closeAfterFlush = false
    private static let schema = ProtocolSchema.standard(.tls)
    private static let maximumPendingDescriptors = 32
    /// Answers queued for a client that does not read them, at most,
    /// before its requests are read no further.
    static let maximumQueuedFrames = 64
    /// The sessions of this client that have not ended (their numbers must
    /// stay unique while they run: the answers are matched by them).
    private var sessions = Set<UInt64>()

    func sessionEnded(_ session: UInt64) { sessions.remove(session) }
    /// The receive buffer, kept: a fresh zeroed 64 KiB array per readiness
    /// event (two per STARTTLS session) was a malloc and a memset each.
    private var buffer = [UInt8](repeating: 0, count: 65_536)

    init(service: NegotiationService, listener: ListenerHandler, fd: Int32) {
        self.service = service
        self.listener = listener
        self.fd = fd
    }

    func ready(fd: Int32, events: UInt32) {
        flush()
        guard !closed, !closeAfterFlush else { return }
        while !closed && !closeAfterFlush {
            // A client that sends NEGOTIATEs without reading the answers:
            // each queued NEGOTIATED holds a plaintext descriptor until it
            // is sent. Reading waits until the answers go out; flush() hit
            // EAGAIN (or output would be empty), so writability is watched
            // and brings this handler back, edge-triggered input and all.
            if output.count >= Self.maximumQueuedFrames {
                service.loop.watchWritable(fd)
                return
            }
            let (n, fds, truncated) = receiveWithDescriptors(fd, into: &buffer)
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { return }
                shut()
                return
            }
            for d in fds { pendingFDs.append((d, receivedBytes)) }
            // A frame has one descriptor; more waiting than this is a client
            // that sends descriptors without their frames.
            if pendingFDs.count > Self.maximumPendingDescriptors {
                protocolError("\(pendingFDs.count) descriptors received ahead of their frames")
                return
            }
            if truncated {
                protocolError("descriptors were lost in transit")
                return
            }
            if n == 0 {
                if decoder.bufferedByteCount != 0 || !pendingFDs.isEmpty {
                    service.logger.warning("tls client closed its connection in the middle of a frame")
                }
                shut()
                return
            }
            receivedBytes += UInt64(n)
            decoder.append(buffer[0..<n])
            do {
                while true {
                    let start = decoder.consumedBytes
                    guard var frame = try decoder.next() else { break }
                    try attach(&frame, start: start)
                    handle(frame)
                    if closed || closeAfterFlush { return }
                }
            } catch {
                protocolError(error.message)
                return
            }
        }
    }

    private func attach(_ frame: inout Frame, start: UInt64) throws(ProtocolError) {
        let wanted = frame.descriptorCount
        let available = pendingFDs.prefix { $0.offset <= start }.count
        guard available >= wanted else {
            throw ProtocolError("\(frame.type.name): \(wanted) fd attribute(s) but \(available) descriptor(s) received with the frame")
        }
        if wanted == 0 {
            if decoder.bufferedByteCount == 0 && !pendingFDs.isEmpty {
                throw ProtocolError("\(pendingFDs.count) descriptor(s) arrived with no fd attribute to take them")
            }
            return
        }
        var taken = pendingFDs.prefix(wanted).map(\.fd)
        pendingFDs.removeFirst(wanted)
        for i in frame.attributes.indices where frame.attributes[i].value.type == .fd {
            frame.attributes[i].value = .fd(taken.removeFirst())
        }
        // Descriptors that came with this frame (or before it) beyond its fd
        // attributes would otherwise go to the next frame: the next
        // session's socket would be this one's extra, and so on.
        let extra = pendingFDs.prefix { $0.offset <= start }.count
        if extra > 0 {
            for d in frame.attributes.compactMap({ if case .fd(let d) = $0.value { d } else { nil } }) { close(d) }
            throw ProtocolError("\(frame.type.name): \(extra) descriptor(s) more than its \(wanted) fd attribute(s)")
        }
    }

    private func handle(_ frame: Frame) {
        switch frame.type {
        case .hello:
            guard case .uint(1)? = frame["version"] else {
                protocolError("HELLO: attribute \"version\": this server speaks version 1")
                return
            }
            send(Frame(.hello, ["protocol": .text("tls"), "version": .uint(1),
                                "software": .text("sealpost-crypto-negotiate 0.1")]), closing: [])
        case .error:
            shut()
        case .negotiate:
            do {
                let request = try NegotiationRequest(frame)
                guard sessions.insert(request.session).inserted else {
                    close(request.socket)
                    protocolError("NEGOTIATE: session \(request.session) is still in progress")
                    return
                }
                service.start(request, for: self)
            } catch {
                if case .fd(let d)? = frame["socket"], d >= 0 { close(d) }
                protocolError("\(error)")
            }
        default:
            protocolError("\(frame.type.name): unexpected")
        }
    }

    private func protocolError(_ message: String) {
        service.logger.warning("tls protocol error: \(message)")
        send(Frame(.error, ["status": .text("5.5.0"), "text": .sanitizedText(message)]), closing: [])
        closeAfterFlush = true
        flush()
    }

    /// Queues a frame (checked against the schema) with its descriptors;
    /// `closing`: descriptors of ours to close once sent (or dropped).
    func send(_ frame: Frame, closing: [Int32]) {
        guard !closed else {
            for d in closing { close(d) }
            return
        }
        do {
            try Self.schema.validate(frame, direction: .serverToClient)
        } catch {
            service.logger.error("refusing to send an invalid frame: \(error)")
            for d in closing { close(d) }
            return
        }
        var fds: [Int32] = []
        for (_, v) in frame.attributes { if case .fd(let d) = v { fds.append(d) } }
        output.append((FrameEncoder.encode(frame), fds, 0))
        // The descriptors stay open until sendmsg has passed them.
        ownedFDs += closing
        flush()
    }

    private var ownedFDs: [Int32] = []

    private func flush() {
        while !closed, !output.isEmpty {
            var item = output[0]
            let fdsNow = item.offset == 0 ? item.fds : []
            let n = item.bytes.withUnsafeBytes { raw in
                fdsNow.withUnsafeBufferPointer { fdp in
                    sealpost_sendmsg_fds(fd, raw.baseAddress! + item.offset, raw.count - item.offset, fdp.baseAddress, fdp.count)
                }
            }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    service.loop.watchWritable(fd)
                    return
                }
                shut()
                return
            }
            if item.offset == 0 {
                // Passed: the peer has its own copies now.
                for d in item.fds where ownedFDs.contains(d) {
                    close(d)
                    ownedFDs.removeAll { $0 == d }
                }
            }
            item.offset += n
            if item.offset == item.bytes.count { output.removeFirst() } else { output[0] = item }
        }
        if output.isEmpty && closeAfterFlush { shut() }
    }

    private func shut() {
        guard !closed else { return }
        closed = true
        service.loop.unregister(fd)
        close(fd)
        for p in pendingFDs { close(p.fd) }
        pendingFDs.removeAll()
        for d in ownedFDs { close(d) }
        ownedFDs.removeAll()
        output.removeAll()
        listener.connections[fd] = nil
    }
}
