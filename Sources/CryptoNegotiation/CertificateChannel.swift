// The certificate channel: how crypto-negotiate reloads certificates once
// it is chrooted and unprivileged and can no longer open the files itself.
//
// The supervisor (root) keeps the other end of a SOCK_SEQPACKET socketpair,
// announced by SEALPOST_CERTIFICATE_FD. On SIGHUP, and when it sees that a
// configured certificate or key file changed, it opens every configured
// file and sends the descriptors in one CERTIFICATES frame
// (Pipeline/PROTOCOL.md section 7): one record per frame, strict decoding
// with the channel's schema. crypto-negotiate reads the PEM from the
// descriptors (never a path), builds new contexts for new handshakes
// (sessions in progress keep theirs); anything wrong keeps the certificates
// in use and logs a warning. The channel only ever goes this way: nothing
// is sent back.

#if canImport(Glibc)
import Glibc
#endif
import CSystemShims
import StageProtocol
import TLS

final class CertificateChannel: EventHandler {
    unowned let service: NegotiationService
    let fd: Int32
    private var decoder = FrameDecoder(schema: .certificates, direction: .serverToClient, afterHello: true)
    private var closed = false

    init(service: NegotiationService, fd: Int32) {
        self.service = service
        self.fd = fd
    }

    func ready(fd: Int32, events: UInt32) {
        // A record is one whole frame; the buffer holds the largest.
        var buffer = [UInt8](repeating: 0, count: WireLimits.maxFrameLength + 4)
        while !closed {
            let (n, received, truncated) = receiveWithDescriptors(fd, into: &buffer)
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { return }
                shut("certificate channel: \(String(cString: strerror(errno)))")
                return
            }
            if n == 0 {
                for d in received { close(d) }
                shut("certificate channel closed by the supervisor: reloads are no longer possible until a restart")
                return
            }
            if truncated {
                for d in received { close(d) }
                service.logger.warning("certificate channel: descriptors were lost in transit; keeping the certificates in use")
                continue
            }
            decoder.append(buffer[0..<n])
            do {
                guard var frame = try decoder.next(), decoder.bufferedByteCount == 0 else {
                    throw ProtocolError("a record that is not exactly one frame")
                }
                try Self.attach(received, to: &frame)
                service.reloadFromDescriptors(frame)
            } catch {
                for d in received { close(d) }
                // A channel that broke framing cannot be trusted again.
                shut("certificate channel: \(error); no more reloads until a restart")
                return
            }
        }
    }

    /// Gives the received descriptors, in order, to the fd attributes.
    static func attach(_ descriptors: [Int32], to frame: inout Frame) throws(ProtocolError) {
        let wanted = frame.attributes.filter { $0.value.type == .fd }.count
        guard wanted == descriptors.count else {
            throw ProtocolError("\(frame.type.name): \(wanted) fd attribute(s) but \(descriptors.count) descriptor(s) received")
        }
        var left = descriptors[...]
        for i in frame.attributes.indices where frame.attributes[i].value.type == .fd {
            frame.attributes[i].value = .fd(left.removeFirst())
        }
    }

    private func shut(_ message: String) {
        guard !closed else { return }
        closed = true
        service.logger.warning("\(message)")
        service.loop.unregister(fd)
        close(fd)
    }
}

extension NegotiationService {
    /// Takes the certificate channel inherited from the supervisor (after
    /// the privileges were dropped). From now on reloads come from it
    /// alone: SIGHUP and the file check do nothing here (the supervisor,
    /// which got the SIGHUP too, sends the files).
    public func adoptCertificateChannel(fd: Int32) throws {
        setNonBlocking(fd)
        let channel = CertificateChannel(service: self, fd: fd)
        certificateChannel = channel
        try loop.register(fd, channel)
    }

    /// A CERTIFICATES frame: reads the PEM of every pair, closes the
    /// descriptors, and swaps the contexts in if they load.
    func reloadFromDescriptors(_ frame: Frame) {
        var descriptors: [Int32] = []
        for (_, value) in frame.attributes { if case .fd(let d) = value { descriptors.append(d) } }
        defer { for d in descriptors { close(d) } }
        let reason = (try? frame.optionalText("reason")) ?? nil
        let pairs = configuration.server.certificates
        do {
            guard !pairs.isEmpty else { throw TLSError(.configuration, "no certificate is configured") }
            let count = Int(try frame.uint("count"))
            guard count == pairs.count else {
                throw TLSError(.configuration, "\(count) pair(s) sent, \(pairs.count) configured")
            }
            var material: [PEMMaterial] = []
            for (i, pair) in pairs.enumerated() {
                guard case .fd(let cert)? = frame["cert-\(i + 1)"], case .fd(let key)? = frame["key-\(i + 1)"] else {
                    throw TLSError(.configuration, "pair \(i + 1) is missing")
                }
                material.append(PEMMaterial(
                    certificateChain: try PEMFile.read(fd: cert, what: "certificate \(pair.certificateFile)"),
                    privateKey: try PEMFile.read(fd: key, what: "private key \(pair.keyFile)"),
                    certificateName: pair.certificateFile, keyName: pair.keyFile))
            }
            serverContexts = try TLSServerContexts(configuration.server, material: material)
            // Key bytes are not left lying in freed memory longer than needed.
            for i in material.indices { material[i].privateKey.withUnsafeMutableBufferPointer { $0.update(repeating: 0) } }
            logger.info("reloaded \(pairs.count) certificate(s) from the supervisor\(reason.map { " (\($0))" } ?? "")")
        } catch {
            logger.warning("reload failed, keeping the certificates loaded before: \(error)")
        }
    }
}
