// The TLS hand-off through crypto-negotiate (PROTOCOL.md 4.5, client role):
// one short connection to run/tls per handshake, HELLO, NEGOTIATE with the
// TCP socket (SCM_RIGHTS) and the destination's verification policy, then
// NEGOTIATED (the plaintext socket) or FAILED. The session outlives the
// control connection (4.5: "Sessions do not depend on the control
// connection"), so the connection closes right after the answer.
//
// StageConnection is blocking: each hand-off runs on a thread of its own,
// so that a slow handshake holds neither the event loop nor the Swift
// concurrency pool. Handshakes are short and bounded by handshake-timeout.

#if canImport(Glibc)
import StageRuntime
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import SMTP
import StageProtocol

public struct CryptoNegotiateHandOff: TLSClientHandOff {
    public let socketPath: String
    /// The CA bundle name in crypto-negotiate's configuration, for "pkix".
    public let caBundle: String?
    /// The uids crypto-negotiate may listen as (root, which creates the
    /// socket, and its own user); nil: not checked. run/ is the queue's:
    /// a socket put in crypto-negotiate's place would otherwise be told
    /// every TLS session, and believed about how the peer was authenticated.
    public let serverUIDs: Set<UInt32>?

    public init(socketPath: String, caBundle: String? = nil, serverUIDs: Set<UInt32>? = nil) {
        self.socketPath = socketPath
        self.caBundle = caBundle
        self.serverUIDs = serverUIDs
    }

    /// run/tls exists (crypto-negotiate is running, or was).
    public var isAvailable: Bool {
        var st = stat()
        return stat(socketPath, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK
    }

    public func negotiate(socket: Int32, request: TLSClientRequest) async -> Result<TLSClientHandOffResult, TLSHandOffError> {
        let path = socketPath, ca = caBundle, uids = serverUIDs
        return await withCheckedContinuation { continuation in
            StageRuntime.detachThread {
                continuation.resume(returning: Self.blockingNegotiate(path: path, socket: socket, request: request, caBundle: ca,
                                                                      serverUIDs: uids))
            }
        }
    }

    /// The NEGOTIATE frame for `request` (without the socket).
    public static func negotiateFrame(session: UInt64, request: TLSClientRequest, caBundle: String?) -> Frame {
        var attributes: [(String, AttributeValue)] = [
            ("session", .uint(session)), ("socket", .fd(-1)), ("role", .text("client")),
            ("handshake-timeout", .uint(UInt64(max(1, min(3600, request.handshakeTimeout))))),
            ("peer", AttributeValue.sanitizedText(request.peer)),
        ]
        // A host name, or an IPv4 next hop's address: the TLS module sends
        // only names as SNI, and checks the reported PKIX result against
        // either (PROTOCOL.md 4.5). An IPv6 address goes in match-names.
        if TransportTable.isDomainName(request.serverName) || TransportTable.isIPv4(request.serverName) {
            attributes.append(("server-name", .text(request.serverName)))
        }
        let v = request.verification
        switch v.method {
        case .none:
            if request.opportunistic { attributes.append(("opportunistic", .bool(true))) }
        case .pkix:
            attributes.append(("policy", .text("pkix")))
            if !v.matchNames.isEmpty { attributes.append(("match-names", .text(v.matchNames.joined(separator: ",")))) }
            if let caBundle { attributes.append(("ca", .text(caBundle))) }
        case .dane:
            attributes.append(("policy", .text("dane")))
            attributes.append(("tlsa", .bytes(v.tlsa.flatMap { $0 })))
            if !v.matchNames.isEmpty { attributes.append(("match-names", .text(v.matchNames.joined(separator: ",")))) }
        case .pin:
            attributes.append(("policy", .text("pin")))
            attributes.append(("pins", .text(v.pins.joined(separator: ","))))
        }
        return Frame(.negotiate, attributes: attributes)
    }

    /// The `authentication` values of NEGOTIATED (PROTOCOL.md 4.5) that
    /// answer a request with this verification method.
    static func allowedAuthentication(for method: TLSVerification.Method) -> Set<String> {
        switch method {
        case .none: return ["encrypted"]
        case .pkix: return ["pkix"]
        case .dane: return ["dane-ee", "dane-ta"]
        case .pin: return ["pin"]
        }
    }

    static func blockingNegotiate(path: String, socket: Int32, request: TLSClientRequest,
                                  caBundle: String?, serverUIDs: Set<UInt32>? = nil) -> Result<TLSClientHandOffResult, TLSHandOffError> {
        var owned: Int32? = socket
        defer { if let fd = owned { close(fd) } }
        do {
            // Bounded: crypto-negotiate answers within the handshake's own
            // timeout; a wedged one must not hold this thread and the TCP
            // socket for ever.
            let connection = try StageConnection.connect(path: path, timeout: Double(request.handshakeTimeout) + 30)
            defer { connection.close() }
            try connection.requireServer(uids: serverUIDs, name: "crypto-negotiate")
            _ = try connection.clientHello(.tls, extra: [("software", .text(QueueClient.software))])
            var frame = negotiateFrame(session: 1, request: request, caBundle: caBundle)
            frame.set("socket", .fd(socket))
            try connection.send(frame)
            // 4.5: the client closes its copy right after sending.
            close(socket)
            owned = nil
            while true {
                guard let answer = try connection.receive() else {
                    return .failure(TLSHandOffError("crypto-negotiate closed the connection during the handshake"))
                }
                switch answer.type {
                case .negotiated:
                    guard case .fd(let plaintext)? = answer["plaintext"] else {
                        return .failure(TLSHandOffError("NEGOTIATED without a plaintext socket"))
                    }
                    // From here the plaintext socket is this function's
                    // to close, on every way out but success.
                    let fields: (authentication: String, protocolVersion: String, cipher: String)
                    do {
                        fields = (try answer.text("authentication"), try answer.text("protocol"), try answer.text("cipher"))
                    } catch {
                        close(plaintext)
                        return .failure(TLSHandOffError("crypto-negotiate at \(path): NEGOTIATED: \(error)"))
                    }
                    let authentication = fields.authentication
                    // Only what the request allows: any program may serve
                    // this socket, and its word decides REQUIRETLS and the
                    // levels that require an authenticated peer.
                    guard Self.allowedAuthentication(for: request.verification.method).contains(authentication) else {
                        close(plaintext)
                        return .failure(TLSHandOffError("crypto-negotiate reported authentication \"\(authentication)\" for a \(request.verification.method.rawValue) request"))
                    }
                    let report = SMTPClientTLSReport(protocolVersion: fields.protocolVersion, cipher: fields.cipher,
                                                     peerAuthenticated: authentication != "encrypted")
                    return .success(TLSClientHandOffResult(plaintext: plaintext, report: report, authentication: authentication))
                case .failed:
                    let status = try answer.text("status")
                    var text = try answer.text("text")
                    if let why = try answer.optionalText("verify-error") { text += " (\(why))" }
                    return .failure(TLSHandOffError("\(status) \(text)"))
                case .error:
                    return .failure(TLSHandOffError("crypto-negotiate: \(try answer.text("status")) \(try answer.text("text"))"))
                default:
                    continue   // CLOSED of another session cannot come here (one session per connection)
                }
            }
        } catch {
            return .failure(TLSHandOffError("crypto-negotiate at \(path): \(error)"))
        }
    }
}

