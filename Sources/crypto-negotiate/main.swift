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
//     Reads every certificate, key and CA bundle first, then (as root)
//     chroots into the data directory and becomes SEALPOST_USER: afterwards
//     it cannot reopen them. SIGHUP, or a certificate file that changed,
//     reloads the certificates for new handshakes (only where the files
//     are still reachable; otherwise restart the stage); sessions in
//     progress are kept.
//
// SIGNALS
//     SIGHUP reload certificates; SIGTERM, SIGINT stop.
//
// EXIT STATUS
//     0 stopped by a signal; 78 configuration error (including unreadable
//     certificates or keys); 77 privileges could not be dropped; 71 the
//     socket could not be created.

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

let paths: RuntimePaths
do {
    paths = try StageRuntime.dropPrivileges(config, chroot: true)
} catch let e as PrivilegeError {
    StageRuntime.fatal(e.message, exit: e.exitCode)
} catch {
    StageRuntime.fatal("\(error)", exit: .noPerm)
}

let socketPath = paths.runtimeDirectory + "/tls"
do {
    try service.listen(path: socketPath)
} catch {
    StageRuntime.fatal("\(error)", exit: .osErr)
}

let signals = SignalEvents()
signals.on(SIGHUP) { service.reload() }
signals.on(SIGTERM) { service.stop() }
signals.on(SIGINT) { service.stop() }

service.log("listening on \(socketPath), \(tlsConfig.server.certificates.count) certificate(s), CA bundles: \(tlsConfig.caBundles.keys.sorted().joined(separator: ", "))")
service.run()
unlink(socketPath)
exit(0)
