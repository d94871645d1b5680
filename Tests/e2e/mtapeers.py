"""Real SMTP peers for remote-deliver's end-to-end tests and bench/relay.

- DNSTestbed: nsd + unbound from Tests/testbed/dns (start.sh/stop.sh), the
  signed zone dane.test (mx1 -> 127.0.0.21, mx2 -> 127.0.0.22, nullmx, ...).
- PostfixPeer: a private Postfix instance (postfix -c DIR): smtpd on one
  address:port with STARTTLS, mail discarded or relayed; its own log file.
- SmtpSink: Postfix's smtp-sink with fault injection (-r, -f, -q) and a dump.
- AiosmtpdPeer: aiosmtpd (Debian's python3-aiosmtpd, run with
  /usr/bin/python3) writing each message it receives to a directory.
- RawSink: a tiny SMTP server in a thread that keeps the bytes of DATA
  exactly as they arrived on the wire (dot-stuffing and line ends included).

Nothing here talks to anything but loopback addresses.
"""

import json
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
TESTBED = CHECKOUT / "Tests" / "testbed" / "dns"
SYSTEM_PYTHON = "/usr/bin/python3"
IS_ROOT = os.geteuid() == 0


class Unavailable(Exception):
    """A tool is missing: the caller skips."""


def port_free_on(addresses, port):
    sockets = []
    try:
        for address in addresses:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        for s in sockets:
            s.close()


def free_port_on(*addresses):
    """A TCP port free at this moment on every one of `addresses`."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        if port_free_on(addresses, port):
            return port
    raise RuntimeError(f"no free port on {addresses}")


def wait_for_listener(address, port, timeout=30, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"listener for {address}:{port} exited with {process.returncode}")
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address}:{port} after {timeout} s")


# DNS ------------------------------------------------------------------------

class DNSTestbed:
    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.env = {}

    def start(self):
        env = dict(os.environ, DNS_TESTBED_WATCH_PID=str(os.getpid()))
        result = subprocess.run([str(TESTBED / "start.sh"), str(self.directory)], env=env,
                                capture_output=True, text=True, timeout=180)
        if result.returncode == 2:
            raise Unavailable(result.stderr.strip())
        if result.returncode != 0:
            raise RuntimeError(f"DNS test bed: start.sh failed: {result.stderr.strip()}")
        for line in (self.directory / "env").read_text().splitlines():
            key, _, value = line.partition("=")
            self.env[key] = value
        return self

    def stop(self):
        subprocess.run([str(TESTBED / "stop.sh"), str(self.directory)], capture_output=True, timeout=60)

    @property
    def resolver(self):
        return self.env["DNS_RESOLVER"]

    @property
    def trust_anchor(self):
        return self.env["DNS_TRUST_ANCHOR"]

    def config_overrides(self):
        """Keys of Config/sealpost.toml pointing Sealpost's resolver at the
        test bed: forward to its unbound, validate with the dane.test key."""
        return {
            "forwarders": f'["{self.resolver}"]',
            "trust_anchor_files": f'["{self.trust_anchor}"]',
            "resolve_reserved_zones": '["test"]',
        }


# Postfix --------------------------------------------------------------------

class PostfixPeer:
    """A private Postfix: smtpd on `listen` ("ADDRESS:PORT") with STARTTLS
    offered (certificate `cert`/`key`), and either discarding every message
    (relayhost None) or relaying everything to `relayhost` ("[ADDR]:PORT",
    with TLS when `relay_tls`)."""

    def __init__(self, directory, listen, cert=None, key=None, relayhost=None, relay_tls=False,
                 hostname="mx1.dane.test", extra=""):
        if not IS_ROOT:
            raise Unavailable("a private Postfix instance needs root")
        if not shutil.which("postfix") and not os.path.exists("/usr/sbin/postfix"):
            raise Unavailable("Postfix is not installed")
        self.directory = pathlib.Path(directory)
        self.config = self.directory / "etc"
        self.queue = self.directory / "spool"
        self.log = self.directory / "maillog"
        for d in (self.config, self.queue, self.directory / "data"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        user = pwd.getpwnam("postfix")
        os.chown(self.directory / "data", user.pw_uid, user.pw_gid)
        master = pathlib.Path("/usr/share/postfix/master.cf.dist")
        if not master.exists():
            master = pathlib.Path("/etc/postfix/master.cf")
        shutil.copy(master, self.config / "master.cf")
        tls = ""
        if cert:
            tls = f"""smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
"""
        if relayhost:
            delivery = f"""relayhost = {relayhost}
default_transport = smtp
relay_transport = smtp
smtp_tls_security_level = {'encrypt' if relay_tls else 'none'}
smtp_tls_loglevel = 1
smtp_dns_support_level = disabled
"""
        else:
            delivery = """relayhost =
default_transport = discard
relay_transport = discard
"""
        (self.config / "main.cf").write_text(f"""\
# Private test instance (mtapeers.py): loopback only.
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.directory / 'data'}
maillog_file = {self.log}
maillog_file_prefixes = {self.directory}
myhostname = {hostname}
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = static:ALL
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
local_recipient_maps =
alias_maps =
alias_database =
smtputf8_enable = no
smtpd_peername_lookup = no
{delivery}{tls}{extra}""")
        subprocess.run(["postconf", "-c", str(self.config), "-F", "*/*/chroot = n"], check=True)
        # smtpd on the given address only, instead of the default "smtp inet".
        subprocess.run(["postconf", "-c", str(self.config), "-MX", "smtp/inet"], check=True)
        subprocess.run(["postconf", "-c", str(self.config), "-M",
                        f"{listen}/inet = {listen} inet n - n - - smtpd"], check=True)
        self.listen = listen
        self.env = dict(os.environ, MAIL_CONFIG=str(self.config))

    def start(self):
        for verb in ("check", "start"):
            # Postfix reports to syslog, or to stderr when that is a terminal:
            # give it one (script(1)) so that a failure says why.
            result = subprocess.run(["script", "-qec", f"postfix -c {self.config} {verb}", "/dev/null"],
                                    env=self.env, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"postfix {verb} failed: {result.stdout.strip()} {result.stderr.strip()}")
        host, _, port = self.listen.rpartition(":")
        wait_for_listener(host, int(port))
        return self

    def stop(self):
        subprocess.run(["postfix", "-c", str(self.config), "stop"], env=self.env, capture_output=True, timeout=120)
        pid_file = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (OSError, ValueError, IndexError):
                break
            time.sleep(0.1)

    def log_text(self):
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# smtp-sink --------------------------------------------------------------------

class SmtpSink:
    """smtp-sink on ADDRESS:PORT with `options` (e.g. ["-r", "RCPT"]). With
    `dump`, every transaction is appended to that file (-D)."""

    def __init__(self, address, port, options=(), dump=None, backlog=256, counters=False):
        command = ["smtp-sink"]
        if IS_ROOT:
            command += ["-u", "nobody"]
        command += list(options)
        self.dump = pathlib.Path(dump) if dump else None
        if dump:
            # A directory of dump files: smtp-sink appends a random suffix to
            # the name, and runs as nobody (the directory must be its own).
            self.dump.mkdir(parents=True, exist_ok=True)
            if IS_ROOT:
                user = pwd.getpwnam("nobody")
                os.chown(self.dump, user.pw_uid, user.pw_gid)
            command += ["-D", str(self.dump / "dump")]
        if counters:
            command += ["-c"]
        command += [f"inet:{address}:{port}", str(backlog)]
        self.command = command
        self.address, self.port = address, port
        self.process = None
        self.output = None

    def start(self, output_file=None):
        if not shutil.which("smtp-sink") and not os.path.exists("/usr/sbin/smtp-sink"):
            raise Unavailable("smtp-sink (package postfix) is not installed")
        self.output = open(output_file or os.devnull, "wb")
        env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin")
        self.process = subprocess.Popen(self.command, stdout=self.output, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        wait_for_listener(self.address, self.port, process=self.process)
        return self

    def dumped(self):
        """Everything dumped so far (every file of the dump directory)."""
        if not self.dump:
            return b""
        return b"".join(path.read_bytes() for path in sorted(self.dump.iterdir()))

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.output:
            self.output.close()


# aiosmtpd -----------------------------------------------------------------------

AIOSMTPD_PEER = r'''
import asyncio, json, os, signal, ssl, sys, threading
from aiosmtpd.controller import Controller
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cert = sys.argv[4] if len(sys.argv) > 5 else None
key = sys.argv[5] if len(sys.argv) > 5 else None
tls12_ciphers = sys.argv[6] if len(sys.argv) > 6 else None
refuse = json.loads(os.environ.get("PEER_REFUSE") or "{}")
counter = [0]
lock = threading.Lock()
def refusal(stage, address):
    """The reply refusing this stage (for this address), noted in refused.log."""
    if refuse.get("stage") != stage or refuse.get("only", "") not in address:
        return None
    with lock, open(os.path.join(out, "refused.log"), "a") as f:
        f.write("%s %s\n" % (stage, address))
    return refuse["reply"]
class Handler:
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = refusal("MAIL", address)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = refusal("RCPT", address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"
    async def handle_DATA(self, server, session, envelope):
        reply = refusal("DATA", ",".join(envelope.rcpt_tos))
        if reply:
            return reply
        with lock:
            counter[0] += 1
            n = counter[0]
        tls = "yes" if session.ssl else "no"
        head = ("X-Peer-Mail-From: %s\r\nX-Peer-Rcpt-To: %s\r\nX-Peer-TLS: %s\r\n" %
                (envelope.mail_from, ",".join(envelope.rcpt_tos), tls)).encode()
        path = os.path.join(out, "%06d.eml" % n)
        with open(path + ".tmp", "wb") as f:
            f.write(head + envelope.original_content)
        os.rename(path + ".tmp", path)
        return "250 2.0.0 Ok: stored %d" % n
context = None
if cert:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if tls12_ciphers:
        # An older MX: TLS 1.2 with only these suites.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(tls12_ciphers)
controller = Controller(Handler(), hostname=host, port=port, tls_context=context,
                        require_starttls=False, decode_data=False, server_hostname="mx2.dane.test")
controller.start()
print("ready", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
controller.stop()
'''


class AiosmtpdPeer:
    """aiosmtpd on ADDRESS:PORT storing each message in `directory` with
    X-Peer-* header fields (envelope, whether TLS was on); STARTTLS with
    `cert`/`key`, restricted to TLS 1.2 and the OpenSSL cipher list
    `tls12_ciphers` when given. `refuse`: (stage, reply) or (stage, reply,
    substring): the peer answers `reply` to MAIL, RCPT or the end of data
    ("DATA"), for a RCPT only when its address contains `substring`, and
    lists what it refused in `refused()`."""

    def __init__(self, address, port, directory, cert=None, key=None, tls12_ciphers=None, refuse=None):
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            raise Unavailable(f"{SYSTEM_PYTHON} is missing")
        check = subprocess.run([SYSTEM_PYTHON, "-c", "import aiosmtpd"], capture_output=True)
        if check.returncode != 0:
            raise Unavailable("aiosmtpd is not installed (apt-get install python3-aiosmtpd)")
        self.address, self.port = address, port
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.arguments = ([address, str(port), str(self.directory)] + ([str(cert), str(key)] if cert else [])
                          + ([tls12_ciphers] if cert and tls12_ciphers else []))
        self.refuse = dict(zip(("stage", "reply", "only"), refuse)) if refuse else {}
        self.process = None

    def start(self):
        env = dict(os.environ, PEER_REFUSE=json.dumps(self.refuse))
        self.process = subprocess.Popen([SYSTEM_PYTHON, "-c", AIOSMTPD_PEER, *self.arguments], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"aiosmtpd peer did not start: {line!r} {self.process.stdout.read()!r}")
        return self

    def messages(self):
        return sorted(p for p in self.directory.iterdir() if p.suffix == ".eml")

    def refused(self):
        """"STAGE address" for each refusal so far ("DATA" lists the recipients)."""
        log = self.directory / "refused.log"
        return log.read_text().splitlines() if log.exists() else []

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# A raw sink -----------------------------------------------------------------------

class RawSink:
    """An SMTP server that records the DATA bytes exactly as sent, up to and
    including the terminating CRLF.CRLF, one entry per transaction. No
    PIPELINING, no extensions beyond 8BITMIME: the client's plainest path.
    eight_bit_mime=False: not even 8BITMIME (an RFC 821 server, as far as
    8-bit data goes)."""

    def __init__(self, address, port, eight_bit_mime=True):
        self.address, self.port = address, port
        self.ehlo = b"250-raw.sink\r\n250 8BITMIME\r\n" if eight_bit_mime else b"250 raw.sink\r\n"
        self.transactions = []
        self.lock = threading.Lock()
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((address, port))
        self.server.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.close()

    def _accept(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(connection,), daemon=True).start()

    def _session(self, connection):
        buffer = b""

        def line():
            nonlocal buffer
            while b"\r\n" not in buffer:
                chunk = connection.recv(65536)
                if not chunk:
                    raise EOFError
                buffer += chunk
            text, _, buffer = buffer.partition(b"\r\n")
            return text

        try:
            connection.settimeout(60)
            connection.sendall(b"220 raw.sink ESMTP\r\n")
            envelope = {}
            while True:
                command = line()
                verb = command[:4].upper()
                if verb in (b"EHLO",):
                    connection.sendall(self.ehlo)
                elif verb == b"HELO":
                    connection.sendall(b"250 raw.sink\r\n")
                elif verb == b"MAIL":
                    envelope = {"mail": command, "rcpt": []}
                    connection.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    envelope.setdefault("rcpt", []).append(command)
                    connection.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    connection.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    while b"\r\n.\r\n" not in b"\r\n" + buffer:
                        chunk = connection.recv(65536)
                        if not chunk:
                            raise EOFError
                        buffer += chunk
                    marked = b"\r\n" + buffer
                    end = marked.index(b"\r\n.\r\n")
                    data = marked[2:end + 5]
                    buffer = marked[end + 5:]
                    envelope["data"] = data
                    with self.lock:
                        self.transactions.append(envelope)
                    connection.sendall(b"250 2.0.0 Ok: raw\r\n")
                elif verb == b"QUIT":
                    connection.sendall(b"221 2.0.0 Bye\r\n")
                    return
                elif verb in (b"RSET", b"NOOP"):
                    connection.sendall(b"250 2.0.0 Ok\r\n")
                else:
                    connection.sendall(b"502 5.5.1 Unrecognized\r\n")
        except (EOFError, OSError):
            pass
        finally:
            connection.close()
