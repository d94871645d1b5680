// NAME
//      remote-deliver - Sealpost SMTP client: delivery to other mail servers
//
// SYNOPSIS
//      remote-deliver     (started by the supervisor, Pipeline/stages)
//
// DESCRIPTION
//      remote-deliver delivers mail for every domain that is not local. It
//      is a client of the queue: it takes delivery jobs (one destination
//      domain each, the job's `nexthop`), delivers them over SMTP, and
//      reports one result per recipient. Many jobs and connections run at
//      once in one event loop (SwiftNIO).
//
//      For a job: the transport table (Config/transport, see
//      Sources/RemoteDelivery/TransportTable.swift) may name another next
//      hop ("[host]:port" without MX lookup, "host" with MX lookup, a
//      smarthost with AUTH credentials); otherwise the domain's MX hosts
//      are tried in preference order, random among equal preferences,
//      every address of each (IPv6 first). A connection that is refused,
//      times out, is greeted with 4xx/5xx or fails mid-session passes the
//      undecided recipients to the next address; so does a 4xx reply to
//      MAIL, DATA or the end of data (every recipient of the transaction)
//      or to RCPT (that recipient; the host gets the message for the
//      others), as Postfix's smtp(8) does for every server but the last.
//      A 5xx is final. At most 5 addresses, and 2 sessions that reached a
//      transaction, are tried per job (Postfix's smtp_mx_address_limit and
//      smtp_mx_session_limit). What remains at the end is deferred with
//      the last host's 4xx to it, or the last error when that came later
//      (a connection refused, ...). Null MX (RFC 7505) bounces at once
//      (5.1.10); a domain that does not exist bounces (5.1.2); a DNS
//      failure defers (4.4.3). The conversation is the SMTP module's client
//      state machine: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, DSN, REQUIRETLS,
//      AUTH PLAIN, RFC 5321 timeouts per phase; the connect timeout is
//      remote.connect_timeout (30 s). After a message the connection is
//      kept remote.connection_cache_time (2 s) for the next job to the same
//      destination. At most remote.destination_concurrency_limit (20) jobs
//      at once go to one destination.
//
//      TLS: the destination policy (static: the transport table's tls=,
//      default "may") decides the requirement. STARTTLS goes through
//      crypto-negotiate (run/tls) when it is running. When its socket is
//      missing (crypto-negotiate starting or restarting), a delivery waits
//      up to 10 s for it; missing for longer, opportunistic TLS falls back
//      to clear text and levels that require TLS defer (4.7.4/4.7.5), with
//      no more waiting until it is back. A failed handshake under "may" is
//      retried once in clear text (RFC 7435). "secure" matches the
//      certificate against the next hop (the transport table's host, else
//      the domain) and its subdomains, as Postfix. A REQUIRETLS message
//      (RFC 8689 4.2.1) goes only to an MX host from a DNSSEC-validated
//      answer (else a host-specific 5.7.30) and over TLS with the server
//      authenticated by PKIX at least, whatever the level (but "none",
//      where the session refuses it), never on a cached connection.
//      crypto-negotiate's answer must name the authentication asked for.
//      An RFC 5321 timeout bounds the whole reply (bytes of it dribbling
//      in do not renew it); a closing connection whose last writes do
//      not go out is closed after 10 s anyway.
//
// SOCKETS
//      run/deliver   client, protocol `deliver`, transport `remote`
//                    (Pipeline/PROTOCOL.md section 4.3), max-jobs
//                    remote.max_jobs (100). The queue may restart at
//                    any time: the stage reconnects with a pause growing from 0.1 s to 5 s.
//                    The jobs of a connection that closed are given up (no
//                    further host, no end of data): the queue took them back.
//      run/tls       client, protocol `tls` (section 4.5), one short
//                    connection per STARTTLS: the TCP socket goes to
//                    crypto-negotiate, a plaintext socket comes back. Used
//                    while the socket exists; after 10 s without it, "may"
//                    is clear text.
//      TCP           outgoing SMTP connections (port 25 or the next hop's).
//
// CONFIGURATION
//      Config/sealpost.toml (SEALPOST_CONFIG): [remote] (concurrency per
//      destination, max jobs, connect timeout, connection cache time,
//      source addresses, address preference, EHLO name, transport table
//      path), [dns] (forwarders, trust anchors, query timeout, insecure
//      domains, reserved zones to resolve, stub zones: the validating
//      resolver, libunbound in-process; default: full recursion from the
//      root with the root trust anchor), queue.message_size_limit.
//
// ENVIRONMENT
//      SEALPOST_CONFIG          the configuration file
//      SEALPOST_USER            the account to run as (when started as root)
//
// PRIVILEGES
//      Started as root by the supervisor, it reads the configuration, the
//      transport table and the credential files it names, and makes its
//      resolver, which reads the DNS trust anchors then (the DNS module
//      loads every file at once; no other file is ever read: DNS goes to
//      [dns] forwarders or the root servers, never /etc/resolv.conf or
//      /etc/hosts). Then it chroots into the runtime directory (run/,
//      owned by the queue's user, mode 0755, holding only the stages'
//      sockets and the supervisor's pid and status files; remote-deliver
//      can create nothing there; it reaches run/deliver and run/tls as
//      /deliver and /tls) and runs as its own user
//      (SEALPOST_USER). After that it needs no file: outgoing connections
//      go to IP addresses (no getaddrinfo), randomness comes from
//      getrandom(2), and no work runs on libdispatch's worker pool (it
//      traps without /proc; see Sources/RemoteDelivery/
//      EventLoopTaskExecutor.swift). It holds no keys and never touches the
//      spool, the mailboxes or the log.

// LOGGING
//      One line per recipient on stderr, as Postfix's smtp(8):
//      remote-deliver[815]: 4F3A2B1C5D6E: to=<b@example.net>,
//      relay=mx.example.net[192.0.2.1]:25, delay=0, dsn=2.0.0,
//      status=sent (250 2.0.0 Ok: queued as X), tls=none
//      and, when the transaction had any, its notes: ", notes=(8-bit
//      content converted to quoted-printable for a host without 8BITMIME)".
//      A recipient an address did not take, when the next address is
//      tried (no status=: its one result line comes later):
//      remote-deliver[815]: 4F3A2B1C5D6E: to=<b@example.net>,
//      relay=mx1.example.net[192.0.2.1]:25, dsn=4.3.0, kept for the next
//      address (host mx1.example.net[192.0.2.1] said: 451 4.3.0 Try again
//      later (in reply to MAIL FROM command))
//
// EXIT STATUS
//      It runs until killed. At start: 78 (EX_CONFIG) for an unreadable
//      configuration, transport table or trust anchor, or a resolver
//      setting libunbound refuses;
//      67 (EX_NOUSER), 77 (EX_NOPERM) or 71 (EX_OSERR) when privileges
//      cannot be dropped.

#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOPosix
import RemoteDelivery
import SealpostConfig
import StageRuntime

let config = StageRuntime.bootstrap(stage: "remote-deliver")
let logger = Logger(label: "remote-deliver")

let settings: RemoteSettings
let transports: TransportTable
let resolver: UnboundMailExchangerResolver
do {
    settings = RemoteDeliveryService.settings(config)
    // Reads the trust anchors now, while they are readable.
    resolver = try RemoteDeliveryService.makeResolver(config)
    transports = try TransportTable.load(path: RemoteDeliveryService.transportTablePath(config))
} catch let error as RemoteSetupError {
    StageRuntime.fatal(error.description, exit: .config)
} catch let error as TransportTableError {
    StageRuntime.fatal(error.description, exit: .config)
} catch {
    StageRuntime.fatal("\(error)", exit: .config)
}

// One event loop for everything: made before the chroot (NIO reads
// nothing later, but threads are better started while all is visible).
let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)

// Who may listen on run/tls: root (crypto-negotiate creates the socket
// before it drops privileges) or crypto-negotiate's user; looked up while
// /etc/passwd is in reach. Run by one user: no check.
let tlsServerUIDs: Set<UInt32>? = geteuid() == 0
    ? Set([0] + [getpwnam("sealpost-crypto-negotiate")].compactMap { $0?.pointee.pw_uid })
    : nil

let paths: RuntimePaths
do {
    // The chroot is the runtime directory, not the data directory: the
    // stage that talks to the Internet sees the sockets and nothing else.
    var jail = config
    jail.dataDirectory = config.runtimeDirectory
    paths = try StageRuntime.dropPrivileges(jail, chroot: true)
} catch let error as PrivilegeError {
    StageRuntime.fatal(error.message, exit: error.exitCode)
} catch {
    StageRuntime.fatal("\(error)", exit: .osErr)
}

let agent = RemoteDeliveryAgent(
    eventLoop: group.next(), settings: settings, transports: transports,
    resolver: resolver, policy: StaticDestinationPolicy(),
    tlsHandOff: CryptoNegotiateHandOff(socketPath: paths.runtimeDirectory + "/tls", serverUIDs: tlsServerUIDs),
    log: RemoteDeliveryLog(info: { logger.info("\($0)") }, warning: { logger.warning("\($0)") }))
let client = QueueClient(socketPath: paths.deliverSocket, agent: agent)
logger.info("starting: max-jobs=\(settings.maxJobs), destination concurrency \(settings.destinationConcurrencyLimit), \(transports.entries.count) transport table entries, helo=\(settings.hostname)")
client.start()
while true { pause() }
