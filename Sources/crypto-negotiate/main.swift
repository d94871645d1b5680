// NAME
//     crypto-negotiate - Sealpost TLS proxy: the only process with TLS keys
//
// SYNOPSIS
//     crypto-negotiate    (started by the supervisor, Pipeline/start)
//
// DESCRIPTION
//     Performs TLS handshakes for the other stages and relays the session:
//     smtp-listen hands over a client socket after STARTTLS (or on port 465)
//     and gets a plaintext socket back (server role); remote-deliver hands
//     over a socket to a remote MX with the host-authentication policy
//     (none, PKIX with names, DANE TLSA records, SPKI pins) and gets a
//     plaintext socket back (client role). Like Postfix's tlsproxy(8), it
//     never parses SMTP. One thread, an epoll loop, thousands of sessions.
//
//     Reports per handshake: protocol, cipher, key exchange group, SNI, the
//     peer's certificate subject and SPKI SHA-256, how the peer was
//     authenticated, and why verification failed.
//
// SOCKETS AND DESCRIPTORS
//     run/tls (mode 0660) under the data directory: the `tls` protocol of
//     Pipeline/PROTOCOL.md section 4.5. TCP sockets and plaintext
//     socketpair ends travel with SCM_RIGHTS.
//
// CONFIGURATION
//     The [tls] section of Config/sealpost.toml (SEALPOST_CONFIG):
//     certificates and keys, CA bundles, protocols, the TLS 1.2 cipher
//     list of opportunistic client handshakes (client_opportunistic_ciphers,
//     for NEGOTIATE requests with opportunistic=true; all others use the
//     server role's strict list), session tickets, timeouts. By default the self-signed pair that Pipeline/start creates
//     in tls/ under the data directory. With no certificate configured the
//     server role is off (smtp-listen then offers no STARTTLS).
//
// PRIVILEGES
//     Reads every certificate, key and CA bundle first and (as root) creates
//     run/tls (root, group of run/, 0660; as the group is every stage's,
//     connections from any uid but smtp-listen's, remote-deliver's and
//     root's are refused at accept, SO_PEERCRED), then chroots into empty/ under
//     the data directory (root's, 0755, empty: EmptyRoot) and becomes
//     SEALPOST_USER: afterwards it cannot reopen any file, and owns and may
//     write nothing in its file system: new certificates reach it only
//     through the supervisor's certificate channel (below).
//
// CERTIFICATE RELOAD
//     New certificates serve new handshakes; sessions in progress keep
//     theirs; a file that does not load keeps the certificates in use (a
//     warning says why).
//     - Started by the supervisor: SEALPOST_CERTIFICATE_FD names an
//       inherited SOCK_SEQPACKET socket (descriptor 3), the certificate
//       channel of Pipeline/PROTOCOL.md section 7. On SIGHUP, and when it
//       sees a configured certificate or key file change (checked every
//       5 s: device, inode, size, times, following symbolic links such as
//       certbot's live/ links), the supervisor (root) opens every
//       configured file and sends the descriptors in one CERTIFICATES
//       frame; crypto-negotiate reads the PEM from them. The variable is
//       removed from the environment. SIGHUP itself then changes nothing
//       here.
//     - Otherwise (started by hand or by tests): SIGHUP, or a file whose
//       time or size changed (checked every 5 s), reopens the files by
//       path, which works only where they are still reachable (not
//       chrooted).
//
// SIGNALS
//     SIGHUP reload certificates (see above); SIGTERM, SIGINT stop.
//
// EXIT STATUS
//     0 stopped by a signal; 78 configuration error (including unreadable
//     certificates or keys, a cipher list OpenSSL refuses or one enabling
//     a weak suite, and a SEALPOST_CERTIFICATE_FD that is not an
//     inherited socket); 77 privileges could not be dropped; 71 the
//     socket could not be created, or the empty chroot directory could not
//     be prepared.

import CryptoNegotiation
import Glibc
import SealpostConfig
import StageRuntime

let config = StageRuntime.bootstrap(stage: "crypto-negotiate")
let tlsConfig = TLSConfiguration(config.tls)

// Keys and CA bundles are read here, before the privileges go.
let service: NegotiationService
do {
    service = try NegotiationService(configuration: tlsConfig)
} catch {
    StageRuntime.fatal("\(error)", exit: .config)
}

// The certificate channel, taken (and checked) before anything else could
// inherit it.
var certificateChannel: Int32? = nil
if let text = getenv("SEALPOST_CERTIFICATE_FD").map({ String(cString: $0) }) {
    unsetenv("SEALPOST_CERTIFICATE_FD")
    guard let fd = StageRuntime.inheritedDescriptor(text, type: S_IFSOCK) else {
        StageRuntime.fatal("SEALPOST_CERTIFICATE_FD=\(text) is not an inherited socket", exit: .config)
    }
    certificateChannel = fd
}

// The socket, before the privileges go: after them nothing of the file
// system is left to reach. As root it is root's, with run/'s group (that of
// the stages), 0660: the stage's own user does not own it either.
let asRoot = geteuid() == 0
let socketPath = config.runtimeDirectory + "/tls"
do {
    try service.listen(path: socketPath)
} catch {
    StageRuntime.fatal("\(error)", exit: .osErr)
}
if asRoot {
    // Every stage's user is in run/'s group, so the socket's mode cannot
    // keep the queue or local-deliver out: the uids are checked at accept.
    var allowed: Set<UInt32> = [0]
    for stage in ["smtp-listen", "remote-deliver"] {
        if let entry = getpwnam("sealpost-\(stage)") { allowed.insert(entry.pointee.pw_uid) }
    }
    service.allowedPeerUIDs = allowed
    var run = stat()
    guard stat(config.runtimeDirectory, &run) == 0, chown(socketPath, 0, run.st_gid) == 0 else {
        StageRuntime.fatal("chown \(socketPath): \(String(cString: strerror(errno)))", exit: .osErr)
    }
}

let emptyRoot = EmptyRoot.path(dataDirectory: config.dataDirectory)
if asRoot {
    do throws(EmptyRootError) { try EmptyRoot.prepare(emptyRoot) } catch {
        StageRuntime.fatal(error.description, exit: .osErr)
    }
}
do {
    _ = try StageRuntime.dropPrivileges(config, chroot: true, chrootDirectory: emptyRoot)
} catch let e as PrivilegeError {
    StageRuntime.fatal(e.message, exit: e.exitCode)
} catch {
    StageRuntime.fatal("\(error)", exit: .noPerm)
}

if let fd = certificateChannel {
    do {
        try service.adoptCertificateChannel(fd: fd)
    } catch {
        StageRuntime.fatal("certificate channel: \(error)", exit: .osErr)
    }
}

let signals = SignalEvents()
signals.on(SIGHUP) { service.reload() }
signals.on(SIGTERM) { service.stop() }
signals.on(SIGINT) { service.stop() }

service.log("listening on \(socketPath), \(tlsConfig.server.certificates.count) certificate(s), CA bundles: \(tlsConfig.caBundles.keys.sorted().joined(separator: ", "))"
            + (certificateChannel.map { ", reloads through the certificate channel (descriptor \($0))" } ?? ""))
service.run()
// Only reachable when not chrooted; a stale socket is replaced at the next
// start (connections to it are refused meanwhile).
if !asRoot { unlink(socketPath) }
exit(0)
