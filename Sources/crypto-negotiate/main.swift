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
//     certificates and keys, CA bundles, protocols, session tickets,
//     timeouts. By default the self-signed pair that Pipeline/start creates
//     in tls/ under the data directory. With no certificate configured the
//     server role is off (smtp-listen then offers no STARTTLS).
//
// PRIVILEGES
//     Reads every certificate, key and CA bundle first and (as root) creates
//     run/tls (root, group of run/, 0660), then chroots into empty/ under
//     the data directory (root's, 0755, empty: EmptyRoot) and becomes
//     SEALPOST_USER: afterwards it cannot reopen any file, and owns and may
//     write nothing in its file system. SIGHUP, or a certificate file that
//     changed, reloads the certificates for new handshakes (only where the
//     files are still reachable, i.e. not when started as root; otherwise
//     restart the stage); sessions in progress are kept.
//
// SIGNALS
//     SIGHUP reload certificates; SIGTERM, SIGINT stop.
//
// EXIT STATUS
//     0 stopped by a signal; 78 configuration error (including unreadable
//     certificates or keys); 77 privileges could not be dropped; 71 the
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

let signals = SignalEvents()
signals.on(SIGHUP) { service.reload() }
signals.on(SIGTERM) { service.stop() }
signals.on(SIGINT) { service.stop() }

service.log("listening on \(socketPath), \(tlsConfig.server.certificates.count) certificate(s), CA bundles: \(tlsConfig.caBundles.keys.sorted().joined(separator: ", "))")
service.run()
// Only reachable when not chrooted; a stale socket is replaced at the next
// start (connections to it are refused meanwhile).
if !asRoot { unlink(socketPath) }
exit(0)
