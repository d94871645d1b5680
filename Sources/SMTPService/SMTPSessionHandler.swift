// One SMTP session on one NIO channel: bytes from the client go into the
// pure state machine `SMTPServerSession` (module SMTP), whose actions this
// handler performs: replies, the message stream into the queue
// (`InjectTransaction`), log lines, closing. No thread per session: every
// session of an event loop shares its thread, and waits are deadlines.
//
// Back-pressure: this handler sits at the head of the pipeline's outbound
// side and swallows `read()` requests while it does not want input: the
// session has too much buffered while it waits for the queue, or the inject
// socket cannot take more body data. Reading resumes when that changes.
//
// STARTTLS (RFC 3207): after the 220 reply is written, a duplicate of the
// TCP descriptor goes to crypto-negotiate (TLSHandoff); this channel reads
// nothing more (one read per request, and none is requested), so every
// byte after STARTTLS is either discarded by the session (pipelined in the
// same read, CVE-2011-0411) or goes to the TLS handshake. On success the
// TCP channel is closed (crypto-negotiate keeps its copy) and this same
// handler, with the same session, moves to a channel on the plaintext
// socket; the session then expects a new EHLO. On port 465 the session
// starts on such a plaintext socket with TLS active.
//
// Timeouts (RFC 5321 4.5.3.2): a command is awaited for `timeouts.command`
// (5 min), message data for `timeouts.dataBlock` (3 min); while the queue
// decides, the client is not timed (the inject transaction has its own
// timeout). A timeout ends the session with 421 4.4.2. The deadlines are
// stored values that the event loop's SessionClock checks once a second,
// not a timer per session (see SessionClock.swift).
//
// AUTH: the password check (Argon2id, slow by design) runs on the server's
// verification thread pool, never on the event loop; the session buffers
// what the client pipelines meanwhile. A failed check is answered 535 5.7.8
// after `timeouts.authFailureDelayMilliseconds` (a timer, not a sleep), and
// counts toward the error limit like any error reply.

import Logging
import MailMessage
import NIOCore
import NIOPosix
import SMTP
import StageProtocolNIO

#if canImport(Glibc)
import Glibc
private func closeFileDescriptor(_ fd: Int32) -> Int32 { Glibc.close(fd) }
#endif

final class SMTPSessionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = Never
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let server: SMTPServerCore
    private let kind: ListenerKind
    private var session: SMTPServerSession?
    private var client = "unknown[unknown]"
    private var clientAddress = "unknown"
    private var clientName = "unknown"
    private var registered = false
    private var context: ChannelHandlerContext?

    private var inject: InjectTransaction?
    /// Between `.beginMessage` and `.endMessage` / `.abortMessage`.
    private var inMessage = false
    /// `.endMessage` done, the queue's answer not yet.
    private var waitingForQueue = false
    /// A `read()` was swallowed while paused.
    private var readPending = false
    private var inputClosed = false
    private var closing = false
    /// The event loop's SessionClock, once this session has joined it:
    /// it times out `deadline` and the inject transaction's wait.
    private var clock: SessionClock?
    var clockSlot: Int?
    /// When the wait for the client ends (a command, or the next block of
    /// message data); nil while nothing is awaited from the client.
    private var deadline: NIODeadline?
    /// When the output being written must have reached the client: the
    /// last reply of a closing session, the 220 to STARTTLS. Writes are
    /// timed as reads are (as Postfix's smtpd_timeout): a client that stops
    /// reading, its window at zero, would otherwise hold the session for as
    /// long as it likes. The clock then closes the connection.
    private var writeDeadline: NIODeadline?
    private var lastCommand = "CONNECT"
    private var out: ByteBuffer?
    /// Where the last reply in `out` begins (to take back a 220 to STARTTLS).
    private var lastReplyStart = 0
    /// Replies go out with send(2) while the socket takes them at once
    /// (see DirectSocketWriter), through NIO otherwise.
    private let writer = DirectSocketWriter()
    private var shutdownRequested = false

    /// The channel is the client's TCP connection (whose descriptor goes to
    /// crypto-negotiate on STARTTLS); false on a plaintext socket from
    /// crypto-negotiate.
    private var onTCP: Bool
    /// The client's address when the channel's peer is not the client (the
    /// plaintext socket of implicit TLS).
    private let peer: String?
    /// "TLSv1.3 with cipher ..." once TLS is active (Received, logs).
    private var tlsSummary: String?
    private var tlsAtStart: TLSEstablished?
    /// STARTTLS: waiting for crypto-negotiate.
    private var handingOff = false
    private var handoffTimer: LoopTimer?
    /// TLSHandoff's number for the request under way.
    private var handoffRequest: UInt64?
    /// The TCP channel is being closed after a successful hand-off.
    private var handedOff = false
    /// The next channelActive is that of the plaintext channel.
    private var resuming: Channel?
    /// Waiting for the client's verified name (before the greeting).
    private var lookingUp = false
    private var lookupTimer: LoopTimer?
    private var lookup: ClientNames.Lookup?

    init(server: SMTPServerCore, kind: ListenerKind, tcp: Bool = false, peer: String? = nil,
         tls: TLSEstablished? = nil) {
        self.server = server
        self.kind = kind
        self.onTCP = tcp
        self.peer = peer
        self.tlsAtStart = tls
        self.tlsSummary = tls?.summary
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        writer.reset()   // after STARTTLS: another channel, another socket
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // After STARTTLS this handler lives on in the plaintext channel.
        guard context === self.context else { return }
        self.context = nil
        cancelTimer()
        stopLookingUp()
    }

    func channelActive(context: ChannelHandlerContext) {
        if let old = resuming {
            // The plaintext channel after STARTTLS: same session, TLS on.
            resuming = nil
            server.replace(old, with: context.channel)
            context.fireChannelActive()
            perform(session!.tlsEstablished())
            // A stop that came during the hand-off reached the old channel
            // only: the session ends now, with its 421, in TLS.
            if shutdownRequested || server.isStopping {
                shutdownRequested = true
                endForShutdown()
            }
            return
        }
        let settings = server.settings
        let raw = peer ?? context.channel.remoteAddress?.ipAddress ?? "unknown"
        clientAddress = NetworkPrefix.canonicalClientAddress(raw)
        let trusted = settings.isTrusted(clientAddress)
        // A session with TLS from the start comes from an smtps handshake,
        // counted since its accept (SMTPServerCore.beginHandshake).
        let admission = server.register(address: clientAddress, trusted: trusted, channel: context.channel,
                                        fromHandshake: tlsAtStart != nil)
        client = SessionLog.client(name: clientName, address: clientAddress)
        registered = true
        if admission != .admitted {
            let reply: SMTPReply
            if case .tooMany(let count, let counted) = admission {
                server.logger.warning("\(SessionLog.tooManyConnections(count, client: client, service: kind))")
                reply = SMTPReply(421, "4.7.0", "\(settings.hostname) Error: too many connections from \(counted)")
            } else if case .full(let limit) = admission {
                server.logger.warning("\(SessionLog.tooManySessions(limit, client: client, service: kind))")
                reply = SMTPReply(421, "4.3.2", "\(settings.hostname) Error: too many sessions, try again later")
            } else {
                reply = shuttingDown
            }
            closing = true
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: reply.rendered)))
                .assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            context.fireChannelActive()
            return
        }
        var policy = server.policy(for: kind, client: clientAddress)
        policy.maxPendingInput = 256 * 1024
        // STARTTLS only on a TCP channel, and only while crypto-negotiate
        // is there to take it (otherwise the verb is not even advertised).
        policy.tlsAvailable = onTCP && server.handoff?.isAvailable == true
        let info = SMTPClientInfo(address: clientAddress, hostname: nil, isTrusted: trusted,
                                  tlsActive: tlsAtStart != nil)
        // The session exists from here, in its greeting delay: what the
        // client sends before the greeting makes it an early talker.
        session = SMTPServerSession(policy: policy, client: info)
        context.fireChannelActive()
        guard let names = settings.clientNames, clientAddress != "unknown" else { return greet(name: nil) }
        if let cached = names.cached(clientAddress) { return greet(name: cached) }
        lookingUp = true
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        let timer = LoopTimer { [weak self] in self?.lookedUp(nil) }
        lookupTimer = timer
        timer.arm(in: names.lookupTimeout, on: loop)
        lookup = names.lookup(clientAddress) { name in
            loop.execute { bound.value.lookedUp(name) }
        }
    }

    private func lookedUp(_ name: String?) {
        guard lookingUp else { return }
        stopLookingUp()
        guard let context, context.channel.isActive else { return }
        greet(name: name)
    }

    /// A session that ends before its name was known: the lookup stops and
    /// the connect line is written (the first line of every session, as
    /// "unknown").
    private func connectLineWithoutName() {
        guard lookingUp else { return }
        stopLookingUp()
        server.logger.info("\(SessionLog.connect(client))")
    }

    /// No answer is wanted any more: the lookup's timer and an answer still
    /// to come are cancelled (after `lookup.cancel()` none can arrive).
    private func stopLookingUp() {
        lookingUp = false
        lookupTimer?.cancel()
        lookupTimer = nil
        lookup?.cancel()
        lookup = nil
    }

    /// The client's name is known (or will not be): log the connection and
    /// send the greeting (or the 554 for an early talker).
    private func greet(name: String?) {
        guard session != nil else { return }
        if let name {
            clientName = name
            client = SessionLog.client(name: name, address: clientAddress)
        }
        server.logger.info("\(SessionLog.connect(client))")
        if let tls = tlsAtStart {
            server.logger.info("\(client): TLS: \(tls.summary)\(tls.serverName.map { ", sni=\($0)" } ?? "")")
        }
        session!.clientNameResolved(name)
        perform(session!.start())
        if shutdownRequested { endForShutdown() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard session != nil, !closing else { return }
        let buffer = unwrapInboundIn(data)
        let before = session!.counters.count
        let actions = buffer.withUnsafeReadableBytes { session!.receive($0) }
        noteCommands(before: before)
        perform(actions)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inject?.flush()
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            inputClosed = true
            // The client will send nothing more. Let a pending queue answer
            // be written first (pipelined QUIT included), then end.
            if !waitingForQueue { endSession(lost: true) }
            return
        }
        if event is SMTPServerCore.ShutdownEvent {
            shutdownRequested = true
            if !waitingForQueue, !inMessage, !handingOff { endForShutdown() }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // Resets and the like: the channel closes; channelInactive logs.
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if handedOff {
            // The TCP channel after a successful STARTTLS: the session
            // continues on the plaintext channel.
            handedOff = false
            context.fireChannelInactive()
            return
        }
        if handingOff {
            // The client went away during the hand-off (or a stop closed
            // the session): crypto-negotiate's answer is not waited for,
            // which frees this handler even if none comes.
            handingOff = false
            handoffTimer?.cancel()
            handoffTimer = nil
            if let request = handoffRequest { server.handoff?.abandon(request) }
            handoffRequest = nil
        }
        cancelTimer()
        connectLineWithoutName()
        if session?.isClosed == false {
            server.logger.info("\(SessionLog.lostConnection(after: lastCommand, client: client))")
            perform(self.session!.disconnected())
        }
        if session != nil {
            server.logger.info("\(SessionLog.disconnect(client, counters: session!.counters))")
        }
        // A message whose END was sent stays with the queue: the client saw
        // no 250, so it will send it again (a duplicate, as RFC 5321 6.1
        // accepts), but the queue may already own it. Anything else in
        // flight is aborted.
        if waitingForQueue { inject?.clientLeft() } else { inject?.abort() }
        if registered {
            server.unregister(address: clientAddress, channel: context.channel)
            registered = false
        }
        context.fireChannelInactive()
    }

    // MARK: - Outbound: read control

    func read(context: ChannelHandlerContext) {
        if wantsInput {
            context.read()
        } else {
            readPending = true
        }
    }

    private var wantsInput: Bool {
        guard session?.wantsInput == true, !closing else { return false }
        if let inject, inMessage, !inject.isWritable { return false }
        // Replies the client does not read stay in memory: past NIO's
        // high-water mark (64 KiB) no more input is read (each command
        // could add a reply) until the client has taken them. A client
        // that never does times out, and its 421 is timed as a write.
        if let context, !context.channel.isWritable { return false }
        return true
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { resumeReadingIfWanted() }
        context.fireChannelWritabilityChanged()
    }

    private func resumeReadingIfWanted() {
        guard readPending, wantsInput, let context else { return }
        readPending = false
        context.read()
    }

    // MARK: - Actions

    private func perform(_ actions: [SMTPAction]) {
        guard let context else { return }
        for action in actions {
            switch action {
            case .reply(let reply):
                // Taken out of `out` so that the buffer stays uniquely referenced
                // (writing to a shared one would copy it).
                var buffer = out.take() ?? context.channel.allocator.buffer(capacity: 256)
                lastReplyStart = buffer.writerIndex
                buffer.writeBytes(reply.rendered)
                out = buffer
            case .close:
                closing = true
            case .startTLS:
                guard onTCP, server.handoff?.isAvailable == true else {
                    // crypto-negotiate went away since the EHLO: take the
                    // 220 back, say so, and end (the session cannot go
                    // back to clear text from here).
                    out?.moveWriterIndex(to: lastReplyStart)
                    var buffer = out ?? context.channel.allocator.buffer(capacity: 64)
                    buffer.writeBytes(SMTPReply(454, "4.7.0", "TLS not available due to local problem").rendered)
                    out = buffer
                    server.logger.warning("\(client): STARTTLS refused: crypto-negotiate is not available")
                    perform(session!.tlsFailed())
                    return
                }
                startTLSAfterFlush = true
            case .beginMessage(let envelope):
                beginMessage(envelope, context: context)
            case .messageData(let bytes):
                inject?.body(bytes)
            case .endMessage:
                endMessage()
            case .abortMessage:
                inMessage = false
                inject?.abort()
                inject = nil
            case .authenticate(let credentials):
                authenticate(credentials, context: context)
            case .log(let event):
                log(event)
            }
        }
        if startTLSAfterFlush {
            startTLSAfterFlush = false
            handOff(context: context)
            return
        }
        flushOutput(context: context)
        armTimer()
        resumeReadingIfWanted()
    }

    // MARK: - AUTH

    private func authenticate(_ credentials: SMTPCredentials, context: ChannelHandlerContext) {
        let server = self.server
        guard let authenticator = server.settings.authenticator else {
            // AUTH is offered only with a password file; answer safely anyway.
            perform(session!.authResult(.temporaryFailure))
            return
        }
        let address = clientAddress
        guard server.beginAuthentication(address: address) else {
            server.logger.warning("\(client): SASL \(credentials.mechanism.rawValue) authentication deferred: too many password checks pending (\(server.settings.maxPendingAuthentications) in all, an eighth of them per client)")
            perform(session!.authResult(.temporaryFailure))
            return
        }
        let check = SMTPServerCore.verificationPool.runIfActive(eventLoop: context.eventLoop) {
            authenticator.verify(username: credentials.username, password: credentials.password,
                                 authorizationIdentity: credentials.authorizationIdentity)
        }
        check.assumeIsolated().whenComplete { [weak self] result in
            server.endAuthentication(address: address)
            guard let self else { return }
            switch result {
            case .success(true):
                self.authAnswered(.success)
            case .success(false):
                let delay = server.settings.timeouts.authFailureDelayMilliseconds
                guard delay > 0, let context = self.context else { return self.authAnswered(.failure) }
                context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(delay)) { [weak self] in
                    self?.authAnswered(.failure)
                }
            case .failure(let error):
                server.logger.warning("\(self.client): password check failed: \(error)")
                self.authAnswered(.temporaryFailure)
            }
        }
    }

    private func authAnswered(_ result: SMTPAuthResult) {
        guard let context, context.channel.isActive, session != nil else { return }
        perform(session!.authResult(result))
    }

    private var startTLSAfterFlush = false

    /// Writes the replies gathered. `written`, when given, completes once
    /// they are on the wire (or failed); without it no promise is made,
    /// which is every reply but the 220 to STARTTLS and the last.
    private func flushOutput(context: ChannelHandlerContext, written: EventLoopPromise<Void>? = nil) {
        guard var buffer = out.take() else {
            if closing { closeWhenWritten(context: context) }
            written?.succeed()
            return
        }
        guard closing else {
            writer.write(buffer, context: context, promise: written)
            return
        }
        let corked = holdLastReplyForFIN(context: context)
        // The FIN first, which sends the corked reply with it: a close
        // with the client's input unread resets the connection, and a
        // reset throws away what is still corked (the 221, or a 250 for a
        // queued message).
        let close = {
            if corked { context.close(mode: .output, promise: nil) }
            context.close(promise: nil)
        }
        if writer.send(&buffer, context: context) {
            written?.succeed()
            return close()
        }
        // NIO takes the rest: timed, and the close waits for it.
        armWriteDeadline(context: context)
        let done = written ?? context.eventLoop.makePromise()
        done.futureResult.assumeIsolated().whenComplete { _ in close() }
        writer.writeThroughNIO(buffer, context: context, promise: done)
    }

    /// The last reply and the FIN in one segment instead of two: with
    /// TCP_CORK the kernel keeps the reply until the shutdown that follows
    /// at once, which puts the FIN on it. Per session that is a segment
    /// less to send, receive and acknowledge on both ends, as many as a
    /// command's round trip costs in the kernel. Only on the client's TCP
    /// socket (`onTCP`): a session after implicit TLS runs on a Unix
    /// socket from crypto-negotiate, which has no cork; a failure only
    /// costs the extra segment, so it is not worth a log line. Whether the
    /// socket is corked (it must then be shut down before it is closed).
    private func holdLastReplyForFIN(context: ChannelHandlerContext) -> Bool {
        guard onTCP, let options = context.channel.syncOptions else { return false }
        return (try? options.setOption(ChannelOptions.tcpOption(.init(rawValue: TCP_CORK)), value: 1)) != nil
    }

    // MARK: - STARTTLS

    /// Once the 220 is on the wire, a duplicate of the TCP descriptor goes
    /// to crypto-negotiate. The client is not timed meanwhile (a 421
    /// written now would land in the handshake); the 220 must be written
    /// within the write deadline, crypto-negotiate has its handshake
    /// timeout, and `tlsHandoffTimeout` bounds the wait for its answer.
    ///
    /// Reading stops before the 220 goes out: NIO may hold a read requested
    /// while an earlier command waited (a pipelined STARTTLS behind a
    /// message's 250 from the queue), and it would take the ClientHello,
    /// which belongs to crypto-negotiate. A failed hand-off closes the
    /// session, so reading never starts again on this channel.
    private func handOff(context: ChannelHandlerContext) {
        deadline = nil
        handingOff = true
        _ = try? context.channel.syncOptions?.setOption(.autoRead, value: false)
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        let written = loop.makePromise(of: Void.self)
        armWriteDeadline(context: context)
        flushOutput(context: context, written: written)
        written.futureResult.assumeIsolated().whenComplete { result in
            let handler = bound.value
            handler.writeDeadline = nil
            guard handler.handingOff else { return }
            guard case .success = result, handler.onTCP, let context = handler.context,
                  let handoff = handler.server.handoff else {
                handler.handoffDone(.failure(TLSHandoffFailure(status: "4.4.2", text: "the 220 reply could not be written")))
                return
            }
            // crypto-negotiate gets a copy; NIO closes its own.
            let copy: Int32
            switch SMTPServer.duplicateDescriptor(of: context.pipeline.syncOperations) {
            case .success(let fd): copy = fd
            case .failure(let failure): return handler.handoffDone(.failure(failure))
            }
            let timer = LoopTimer { [weak handler] in
                guard let handler else { return }
                // Its completion holds this handler: crypto-negotiate's
                // answer is no longer awaited.
                if let request = handler.handoffRequest { handoff.abandon(request) }
                handler.handoffDone(.failure(TLSHandoffFailure(status: "4.4.2", text: "no answer from crypto-negotiate")))
            }
            handler.handoffTimer = timer
            timer.arm(in: .seconds(handler.server.settings.tlsHandoffTimeout), on: loop)
            // Set before the timer can fire (it runs on this loop).
            handler.handoffRequest = handoff.negotiate(socket: copy, peer: handler.client) { result in
                loop.execute {
                    let handler = bound.value
                    if !handler.handingOff, case .success(let established) = result {
                        _ = closeFileDescriptor(established.plaintext)
                        return
                    }
                    handler.handoffDone(result)
                }
            }
        }
    }

    private func handoffDone(_ result: Result<TLSEstablished, TLSHandoffFailure>) {
        guard handingOff else { return }
        handingOff = false
        handoffTimer?.cancel()
        handoffTimer = nil
        handoffRequest = nil
        guard let context, var session else {
            if case .success(let established) = result { _ = closeFileDescriptor(established.plaintext) }
            return
        }
        switch result {
        case .failure(let failure):
            server.logger.info("\(client): STARTTLS failed: \(failure.text)")
            let actions = session.tlsFailed()
            self.session = session
            perform(actions)
        case .success(let established):
            tlsSummary = established.summary
            server.logger.info("\(client): STARTTLS: \(established.summary)\(established.serverName.map { ", sni=\($0)" } ?? "")")
            // Close the TCP channel (crypto-negotiate has its own copy of
            // the socket), then carry on over the plaintext socket.
            let old = context.channel
            let loop = context.eventLoop
            let bound = NIOLoopBound(self, eventLoop: loop)
            handedOff = true
            onTCP = false
            resuming = old
            old.close().assumeIsolated().whenComplete { _ in
                ClientBootstrap(group: loop)
                    .channelOption(.allowRemoteHalfClosure, value: true)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(bound.value)
                        }
                    }
                    .withConnectedSocket(established.plaintext)
                    .whenFailure { error in
                        let handler = bound.value
                        handler.server.logger.warning("\(handler.client): cannot use the plaintext socket from crypto-negotiate: \(error)")
                        handler.resuming = nil
                        if var session = handler.session, !session.isClosed {
                            _ = session.disconnected()
                            handler.session = session
                        }
                        handler.inject?.abort()
                        if handler.registered {
                            handler.server.unregister(address: handler.clientAddress, channel: old)
                            handler.registered = false
                        }
                    }
            }
        }
    }

    private func beginMessage(_ envelope: SMTPEnvelope, context: ChannelHandlerContext) {
        inMessage = true
        // DATA (or BDAT) is counted only with its final reply.
        lastCommand = "DATA"
        let settings = server.settings
        let transaction = InjectTransaction(eventLoop: context.eventLoop, socketPath: settings.injectSocket,
                                            replyTimeout: .seconds(settings.timeouts.queueReply),
                                            queueAway: .seconds(settings.timeouts.queueAway),
                                            pool: server.injectPools.pool(for: context.eventLoop),
                                            queue: server.injectPools.queueCapabilities)
        transaction.writabilityChanged = { [weak self] in self?.resumeReadingIfWanted() }
        let warnings = server.logger
        transaction.warn = { text in warnings.warning("\(text)") }
        inject = transaction
        joinClock(on: context.eventLoop)
        // The queue announces the ID the message will be queued under before
        // the first body byte: it goes into the Received header ("id ...")
        // and into the "ID: client=" line, as Postfix's smtpd logs it when
        // the queue file is created, so one grep for the ID follows the
        // message from here to its delivery.
        let tls = tlsSummary, client = self.client, authUser = session?.authenticatedUser
        let receivedBy = server.receivedBy
        let logger = server.logger
        transaction.start(envelope: envelope, clientName: clientName, prefix: { id in
            ReceivedHeader.bytes(envelope: envelope, by: receivedBy, queueID: id, tls: tls, date: RFC5322Date.now())
        }, announced: { id in
            logger.info("\(SessionLog.queued(id, client: client, authUser: authUser))")
        })
    }

    private func endMessage() {
        inMessage = false
        guard let transaction = inject else {
            // Cannot happen (every message began); never claim success.
            perform(session!.messageFailed(.unavailable))
            return
        }
        waitingForQueue = true
        let logger = server.logger, client = self.client
        transaction.end { [weak self] outcome in
            if case .unavailable(let reason) = outcome {
                // Here, not in queueAnswered: the client may have gone, and
                // its channel with this handler; the message's fate still
                // goes into the log.
                logger.warning("queue inject failed for \(client): \(reason)")
            }
            self?.queueAnswered(outcome)
        }
    }

    private func queueAnswered(_ outcome: InjectOutcome) {
        waitingForQueue = false
        inject = nil
        guard session != nil else { return }
        let actions: [SMTPAction]
        switch outcome {
        case .accepted(let id):
            actions = session!.messageCommitted(queueID: id)
        case .refused(let reply):
            actions = session!.messageFailed(.refused(reply))
        case .unavailable:
            actions = session!.messageFailed(.unavailable)
        }
        guard context != nil, context!.channel.isActive else { return }
        perform(actions)
        if inputClosed, !waitingForQueue { endSession(lost: true) }
        if shutdownRequested, !waitingForQueue, !inMessage { endForShutdown() }
    }

    /// The client half-closed, or the session must end now.
    private func endSession(lost: Bool) {
        guard let context, session != nil else { return }
        // A client that half-closes in the greeting delay ends here, before
        // channelInactive: its connect line must come before the "lost".
        connectLineWithoutName()
        if !session!.isClosed {
            if lost { server.logger.info("\(SessionLog.lostConnection(after: lastCommand, client: client))") }
            perform(session!.disconnected())
        }
        closeWhenWritten(context: context)
    }

    /// Closes once NIO has written the replies it holds (a client that
    /// half-closed still reads: the last may be a 250 for a queued
    /// message), within the write deadline.
    private func closeWhenWritten(context: ChannelHandlerContext) {
        if writer.holdsWritesInNIO { armWriteDeadline(context: context) }
        writer.closeWhenWritten(context: context)
    }

    private func log(_ event: SMTPEvent) {
        switch event {
        case .rejected(let command, let reply, let detail):
            server.logger.info("\(SessionLog.reject(command: command, client: client, reply: reply, detail: detail, protocolName: session?.protocolName ?? "SMTP"))")
        case .discardedAfterSTARTTLS(let bytes):
            server.logger.warning("\(client): \(bytes) bytes sent after STARTTLS discarded")
        case .authenticated(let user, let mechanism):
            server.logger.info("\(client): sasl_method=\(mechanism), sasl_username=\(SessionLog.printable(user))")
        case .authenticationFailed(let user, let mechanism):
            server.logger.warning("\(client): SASL \(mechanism) authentication failed: user=\(SessionLog.printable(user))")
        }
    }

    /// The last command the client sent, for "timeout after X" and "lost
    /// connection after X" lines: the last one counted (DATA while the
    /// message streams, END-OF-MESSAGE while the queue is awaited).
    private func noteCommands(before: Int) {
        if let counters = session?.counters, counters.count != before, let last = counters.last {
            lastCommand = waitingForQueue ? "END-OF-MESSAGE" : last
        }
        if inMessage { lastCommand = "DATA" }
    }

    /// The reply of a server that stops (RFC 5321 3.8).
    private var shuttingDown: SMTPReply { SMTPReply(421, "4.3.2", "\(server.settings.hostname) Service shutting down") }

    /// A stop asked for: the open session ends with `shuttingDown`.
    private func endForShutdown() {
        guard session?.isClosed == false else { return }
        perform(session!.shutdown(shuttingDown))
    }

    // MARK: - Timeouts

    /// Sets the deadline of what the session now waits for (RFC 5321
    /// 4.5.3.2), or clears it while nothing is awaited from the client.
    /// It runs after every batch of input; the event loop's SessionClock
    /// checks the deadline (no timer is armed or cancelled per command).
    private func armTimer() {
        guard let context, session?.isClosed == false, !closing, !waitingForQueue, !handingOff else {
            deadline = nil
            return
        }
        let timeouts = server.settings.timeouts
        let seconds = session?.readsMessageData == true ? timeouts.dataBlock : timeouts.command
        deadline = NIODeadline.now() + .seconds(seconds)
        joinClock(on: context.eventLoop)
    }

    private func armWriteDeadline(context: ChannelHandlerContext) {
        writeDeadline = NIODeadline.now() + .seconds(server.settings.timeouts.command)
        joinClock(on: context.eventLoop)
    }

    private func joinClock(on loop: EventLoop) {
        guard clockSlot == nil else { return }
        if clock == nil { clock = server.sessionClocks.clock(for: loop) }
        clock!.add(self)
    }

    /// The session has ended: nothing is timed any more.
    private func cancelTimer() {
        deadline = nil
        writeDeadline = nil
        clock?.remove(self)
    }

    private func timedOut() {
        guard session?.isClosed == false, !waitingForQueue, !handingOff else { return }
        server.logger.info("\(SessionLog.timeout(after: lastCommand, client: client))")
        perform(session!.shutdown(SMTPReply(421, "4.4.2", "\(server.settings.hostname) Error: timeout exceeded")))
    }
}

extension SMTPSessionHandler: SessionClockMember {
    func clockTicked(now: NIODeadline) {
        if let deadline, deadline <= now, context != nil {
            self.deadline = nil
            timedOut()
        }
        if let writeDeadline, writeDeadline <= now, let context {
            self.writeDeadline = nil
            server.logger.info("\(SessionLog.writeTimeout(after: lastCommand, client: client))")
            context.close(promise: nil)
        }
        inject?.clockTicked(now: now)
    }
}
