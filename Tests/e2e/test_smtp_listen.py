"""smtp-listen as a real process, driven by real SMTP clients.

Two kinds of tests:

- smtp-listen alone, in front of a queue stand-in written here in Python
  from Pipeline/PROTOCOL.md section 4.2 (a real Unix socket, real frames),
  driven by Python's smtplib and by swaks: sessions, pipelining, what the
  queue receives, 451 when the queue is away, privileges, socket activation,
  SIGTERM.
- the whole pipeline (supervise, queue, local-deliver): mail sent with
  smtplib ends in a Maildir.
"""

import os
import pathlib
import pwd
import re
import resource
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import (IS_ROOT, Pipeline, executable, free_tcp_port as free_port, local_user, parse_message,
                      require_build, wait_until)
from mtapeers import wait_for_listener
from stageproto import (ABORT, ACCEPTED, BODY, END, HELLO, MAIL, MAX_FRAME, QUEUE_ID, RCPT, REFUSED,
                        decode_attributes, encode)


class QueueStandIn:
    """The queue's side of the inject protocol: answers a MAIL with
    announce-id with QUEUE-ID, every END with ACCEPTED (or with
    `self.refusal`), and keeps what it received."""

    def __init__(self, path):
        self.path = str(path)
        self.messages = []
        self.aborted = 0
        self.refusal = None
        self.errors = []
        self.next_id = 0xA0000
        self.lock = threading.Lock()
        self.connections = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        os.chmod(self.path, 0o666)
        self.server.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.server.close()

    def go_away(self):
        """As the queue process exiting: no socket, and every connection
        (smtp-listen keeps idle ones for its next transactions) closed."""
        self.close()
        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection):
        buffer = b""

        def frames():
            nonlocal buffer
            while True:
                while len(buffer) >= 4:
                    (length,) = struct.unpack(">I", buffer[:4])
                    assert 2 <= length <= MAX_FRAME, f"bad frame length {length}"
                    if len(buffer) < 4 + length:
                        break
                    frame, buffer = buffer[4:4 + length], buffer[4 + length:]
                    (kind,) = struct.unpack(">H", frame[:2])
                    yield kind, decode_attributes(frame[2:])
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffer += chunk

        try:
            stream = frames()
            kind, hello = next(stream)
            assert kind == HELLO and hello["protocol"] == "inject" and hello["version"] == 1, hello
            connection.sendall(encode(HELLO, [("protocol", "inject"), ("version", 1)]))
            mail, rcpts, body, queue_id = None, [], b"", None
            for kind, attributes in stream:
                if kind == MAIL:
                    mail, rcpts, body, queue_id = attributes, [], b"", None
                    if attributes.get("announce-id"):
                        with self.lock:
                            self.next_id += 1
                            queue_id = f"{self.next_id:012X}"
                        connection.sendall(encode(QUEUE_ID, [("queue-id", queue_id)]))
                elif kind == RCPT:
                    rcpts.append(attributes)
                elif kind == BODY:
                    assert 1 <= len(attributes["data"]) <= 65536
                    body += attributes["data"]
                elif kind == ABORT:
                    with self.lock:
                        self.aborted += 1
                    mail = None
                elif kind == END:
                    assert mail is not None, "END without MAIL"
                    if self.refusal:
                        code, status, text = self.refusal
                        connection.sendall(encode(REFUSED, [("code", code), ("status", status), ("text", text)]))
                        continue
                    with self.lock:
                        if queue_id is None:
                            self.next_id += 1
                            queue_id = f"{self.next_id:012X}"
                        self.messages.append({"mail": mail, "rcpts": rcpts, "body": body, "id": queue_id})
                    connection.sendall(encode(ACCEPTED, [("queue-id", queue_id)]))
                    mail = None
                else:
                    raise AssertionError(f"unexpected frame type {kind}")
        except Exception as error:  # recorded, checked by the tests
            self.errors.append(repr(error))
        finally:
            connection.close()


class Listener:
    """smtp-listen with its own configuration and data directory."""

    def __init__(self, directory, inherited_socket=None, fdnames=None, wait=True, descriptors=None, smtp=""):
        """With `inherited_socket` (a listening socket), smtp-listen is
        socket-activated with it as descriptor 3, named `fdnames` (default
        smtp-PORT), and the configuration lists it as the only listener.
        `descriptors`: its limit of open files (RLIMIT_NOFILE). `smtp`:
        more [smtp] keys."""
        self.directory = pathlib.Path(directory)
        self.data = self.directory / "data"
        (self.data / "run").mkdir(parents=True)
        for path in (self.directory, self.data, self.data / "run"):
            os.chmod(path, 0o755)
        self.port = free_port() if inherited_socket is None else inherited_socket.getsockname()[1]
        self.submission_port = free_port()
        self.config = self.directory / "sealpost.toml"
        listeners = (f'listen = ["127.0.0.1:{self.port}"]\n'
                     f'submission = ["127.0.0.1:{self.submission_port}"]\n'
                     f'smtps = ["127.0.0.1:{free_port()}"]\n')
        if inherited_socket is not None:
            listeners = f'listen = ["127.0.0.1:{self.port}"]\nsubmission = []\nsmtps = []\n'
        self.config.write_text(
            "[sealpost]\n"
            f'data_directory = "{self.data}"\n'
            'hostname = "mx.e2e.test"\n'
            "[local]\n"
            'domains = ["localhost", "e2e.test"]\n'
            "[smtp]\n" + listeners + smtp +
            # No crypto-negotiate runs beside this smtp-listen: without
            # certificates it does not wait for one (tls_start_wait) at start.
            "[tls]\ncertificates = []\n")
        self.queue = QueueStandIn(self.data / "run" / "inject")
        self.log = open(self.directory / "smtp-listen.log", "wb")
        environment = {"SEALPOST_CONFIG": str(self.config)}
        if IS_ROOT:
            environment["SEALPOST_USER"] = "nobody"
        inherited = inherited_socket

        def prepare_child():
            # Runs in the child between fork and exec: the systemd
            # convention puts the listening socket at descriptor 3 and names
            # the process that must take it.
            for key, value in environment.items():
                os.environ[key] = value
            if inherited is not None:
                os.dup2(inherited.fileno(), 3)
                os.set_inheritable(3, True)
                os.environ["LISTEN_FDS"] = "1"
                os.environ["LISTEN_FDNAMES"] = fdnames or f"smtp-{self.port}"
                os.environ["LISTEN_PID"] = str(os.getpid())
            if descriptors is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

        self.process = subprocess.Popen([executable("smtp-listen")], stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=prepare_child,
                                        close_fds=inherited is None)
        if wait:
            wait_until(self.ready, 30, f"smtp-listen to listen on port {self.port}")

    def ready(self):
        if self.process.poll() is not None:
            raise AssertionError(f"smtp-listen exited with {self.process.returncode}:\n{self.log_text()}")
        return f"listening for smtp on 127.0.0.1:{self.port}" in self.log_text()

    def log_text(self):
        return (self.directory / "smtp-listen.log").read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        self.queue.close()
        return self.process.returncode


@pytest.fixture
def listener(workdir):
    require_build("smtp-listen")
    instance = Listener(workdir)
    yield instance
    code = instance.stop()
    assert code == 0, f"smtp-listen exited with {code}:\n{instance.log_text()}"
    assert instance.queue.errors == []


def test_smtplib_message_reaches_the_queue_with_envelope_and_received(listener):
    with smtplib.SMTP("127.0.0.1", listener.port, local_hostname="client.e2e.test", timeout=60) as client:
        code, text = client.ehlo()
        assert code == 250
        assert client.has_extn("pipelining") and client.has_extn("size") and client.has_extn("8bitmime")
        refused = client.sendmail("alice@example.org", ["bob@e2e.test", "carol@localhost"],
                                  b"Subject: e2e\r\n\r\nHello over SMTP.\r\n.starts with a dot\r\n",
                                  mail_options=["BODY=8BITMIME"], rcpt_options=["NOTIFY=FAILURE"])
        assert refused == {}
    messages = listener.queue.messages
    assert len(messages) == 1
    message = messages[0]
    assert message["mail"]["sender"] == "alice@example.org"
    assert message["mail"]["client-address"] == "127.0.0.1"
    assert message["mail"]["client-name"] == "localhost"
    assert message["mail"]["helo"] == "client.e2e.test"
    assert message["mail"]["protocol"] == "ESMTP"
    assert message["mail"]["body-type"] == "8BITMIME"
    assert [r["address"] for r in message["rcpts"]] == ["bob@e2e.test", "carol@localhost"]
    assert all(r["notify"] == "FAILURE" for r in message["rcpts"])
    body = message["body"]
    assert message["mail"]["announce-id"] is True
    # The Received line names the ID the queue announced at MAIL.
    assert body.startswith(b"Received: from client.e2e.test (localhost [127.0.0.1])\r\n"
                           b"\tby mx.e2e.test (Sealpost) with ESMTP id " + message["id"].encode() + b";")
    assert body.endswith(b"\r\nSubject: e2e\r\n\r\nHello over SMTP.\r\n.starts with a dot\r\n")
    log = wait_until(lambda: "disconnect from" in listener.log_text() and listener.log_text(), 30, "the disconnect line")
    assert "smtp-listen[" in log
    assert "connect from localhost[127.0.0.1]" in log
    assert f"{message['id']}: client=localhost[127.0.0.1]" in log
    assert "disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6" in log


def test_client_without_a_verified_name_is_unknown(listener):
    """127.0.0.5 has no PTR record (libunbound's local 127.in-addr.arpa
    zone): the logs and the Received header say "unknown", as Postfix does."""
    with smtplib.SMTP("127.0.0.1", listener.port, local_hostname="nameless.e2e.test", timeout=60,
                      source_address=("127.0.0.5", 0)) as client:
        assert client.sendmail("a@example.org", ["b@e2e.test"], b"Subject: x\r\n\r\nx\r\n") == {}
    message = listener.queue.messages[0]
    assert message["mail"]["client-address"] == "127.0.0.5"
    assert message["mail"]["client-name"] == "unknown"
    assert message["body"].startswith(b"Received: from nameless.e2e.test (unknown [127.0.0.5])\r\n")
    log = wait_until(lambda: "disconnect from unknown[127.0.0.5]" in listener.log_text() and listener.log_text(),
                     30, "the disconnect line")
    assert "connect from unknown[127.0.0.5]" in log


@pytest.mark.parametrize("ending", ["quit", "half-close"])
def test_replies_stay_in_order_when_the_client_reads_late(listener, ending):
    """smtp-listen sends a reply itself (send(2)) while the socket takes it
    and hands it to NIO's buffer once the socket is full; after that every
    reply goes through NIO until NIO has written what it holds. A client
    that pipelines thousands of commands and reads nothing until it has
    sent them all (a small receive buffer, so the server's socket fills
    early) must get every reply, whole and in order.

    Ending with a half-close instead of QUIT (shutdown(SHUT_WR), then
    reading, slowly): smtp-listen sees the end of input while NIO still
    holds replies, and must close only once they are written; a close at
    once would discard them (in real life, the 250 for a queued message,
    which the client would then send again)."""
    # The half-close variant three times: whether smtp-listen reads the end
    # of input while NIO holds replies depends on how far this client has
    # read (most rounds, not all), and a regression should not slip by.
    for round_number in range(1 if ending == "quit" else 3):
        count = 60000
        commands = b"".join(b"EHLO c%d.e2e.test\r\nMAIL FROM:<s%d@example.org>\r\n" % (i, i) for i in range(count))
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(120)
            client.connect(("127.0.0.1", listener.port))
            greeting = b""
            while not greeting.endswith(b"\r\n"):
                greeting += client.recv(1)
            assert greeting.startswith(b"220 ")
            sent = threading.Event()
            failures = []

            def send_all():
                try:
                    if ending == "quit":
                        client.sendall(commands + b"QUIT\r\n")
                    else:
                        client.sendall(commands)
                        client.shutdown(socket.SHUT_WR)
                except OSError as error:
                    failures.append(error)
                sent.set()

            threading.Thread(target=send_all, daemon=True).start()
            # Nothing read for a while: 8 MB of replies fill the server's
            # socket (its send buffer, and this one's 8 KiB), so that NIO takes
            # the rest and smtp-listen stops reading (seen with ss: the
            # server's Recv-Q full, this client's Send-Q holding the rest of
            # the commands). Whether a reply would overtake what NIO holds
            # (smtp-listen must not send one itself then) is a matter of
            # timing that this cannot force; the order is checked all the same.
            sent.wait(3)
            received = bytearray()
            while True:
                chunk = client.recv(65536 if ending == "quit" else 4096)
                if not chunk:
                    break
                received += chunk
                if ending == "half-close":
                    # Slower than smtp-listen writes: when it reads the end of
                    # input, its socket is full and NIO holds the last replies.
                    time.sleep(0.001)
            assert sent.wait(30) and failures == []
        lines = bytes(received).split(b"\r\n")
        assert lines.pop() == b""
        if ending == "quit":
            assert lines.pop() == b"221 2.0.0 Bye"
        replies = []   # each reply's lines, by its last line
        current = []
        for line in lines:
            current.append(line)
            if line[3:4] == b" ":
                replies.append(current)
                current = []
        assert current == []
        assert len(replies) == 2 * count
        for i in range(count):
            ehlo, mail = replies[2 * i], replies[2 * i + 1]
            assert ehlo[0].startswith(b"250-") and all(line.startswith(b"250") for line in ehlo), (i, ehlo)
            assert len(ehlo) > 1, (i, ehlo)
            assert mail == [b"250 2.1.0 Ok"], (i, mail)
        if ending == "half-close":
            wait_until(lambda: len(re.findall(r"lost connection after MAIL from \S+\[127\.0\.0\.1\]", listener.log_text())) == round_number + 1,
                       30, "the lost connection line")


def test_swaks_with_pipelining(listener):
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed")
    result = subprocess.run(["swaks", "--server", f"127.0.0.1:{listener.port}", "--pipeline",
                             "--from", "sender@example.org", "--to", "user@e2e.test",
                             "--helo", "swaks.e2e.test", "--header", "Subject: swaks"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert len(listener.queue.messages) == 1
    assert b"Subject: swaks" in listener.queue.messages[0]["body"]


def test_connections_wait_while_descriptors_run_out(workdir):
    """With no descriptor left, accept fails (EMFILE): logged, and the
    connections wait in the backlog until sessions end; then they are
    served, none is dropped."""
    require_build("smtp-listen")
    # No session limit: by default it would be lowered to what 64
    # descriptors carry (test_the_session_limit_follows_the_descriptors).
    instance = Listener(workdir, descriptors=64, smtp="session_limit = 0\n")
    try:
        held = []
        def greeted(connection):
            connection.settimeout(60)
            return connection.recv(512).startswith(b"220 ")
        # Idle sessions until one is not greeted: its accept failed.
        while "Too many open files" not in instance.log_text():
            assert len(held) < 64, instance.log_text()
            connection = socket.create_connection(("127.0.0.1", instance.port), timeout=60)
            held.append(connection)
            connection.settimeout(0.5)
            try:
                connection.recv(512)
            except TimeoutError:
                pass
        waiting = [socket.create_connection(("127.0.0.1", instance.port), timeout=60) for _ in range(3)]
        if shutil.which("ss"):   # iproute2, which Pipeline/test installs
            # The backlog they wait in: the system's maximum, also once NIO
            # took the socket over (it would listen again with 128).
            listing = subprocess.run(["ss", "-ltnH", f"sport = :{instance.port}"], capture_output=True, text=True)
            maximum = min(4096, int(pathlib.Path("/proc/sys/net/core/somaxconn").read_text()))
            assert [line.split()[2] for line in listing.stdout.splitlines()] == [str(maximum)], listing.stdout
        # While the connections wait, accepting pauses instead of failing
        # again and again: a busy loop would take a core (a bound against
        # spinning, far from the CPU a correct pause uses).
        def cpu_seconds():
            fields = pathlib.Path(f"/proc/{instance.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        cpu_before, wall_before = cpu_seconds(), time.monotonic()
        time.sleep(2)
        spent, elapsed = cpu_seconds() - cpu_before, time.monotonic() - wall_before
        assert spent < elapsed / 2, f"smtp-listen used {spent:.2f} s of CPU in {elapsed:.2f} s while out of descriptors\n" + instance.log_text()[-3000:]
        for connection in held[:5]:
            connection.sendall(b"QUIT\r\n")
            connection.close()
        assert all(greeted(connection) for connection in waiting)
        for connection in waiting:
            connection.sendall(b"QUIT\r\n")
            assert connection.recv(512).startswith(b"221 ")
            connection.close()
        log = instance.log_text()
        assert re.search(r"warning: smtp listener on 127\.0\.0\.1:\d+: accept: Too many open files", log), log
    finally:
        for connection in held:
            connection.close()
        code = instance.stop()
    assert code == 0, instance.log_text()


def test_the_session_limit_follows_the_descriptors(workdir):
    """With 600 descriptors, the default session_limit (10,000) becomes
    172 (two per session beyond 256), said at start; the 173rd session
    gets 421 4.3.2, before any descriptor ran out."""
    require_build("smtp-listen")
    instance = Listener(workdir, descriptors=600)
    held = []
    try:
        log = instance.log_text()
        assert "warning: session_limit 10000 lowered to 172: the descriptor limit is 600" in log, log
        for number in range(172):
            connection = socket.create_connection(("127.0.0.1", instance.port), timeout=60)
            held.append(connection)
            assert connection.recv(512).startswith(b"220 "), number
        refused = socket.create_connection(("127.0.0.1", instance.port), timeout=60)
        reply = refused.recv(512)
        assert reply == b"421 4.3.2 mx.e2e.test Error: too many sessions, try again later\r\n", reply
        assert refused.recv(512) == b""
        refused.close()
        # A session that ends makes room.
        held.pop().sendall(b"QUIT\r\n")
        wait_until(lambda: instance.log_text().count("disconnect from") >= 1, 30, "the QUIT's disconnect")
        again = socket.create_connection(("127.0.0.1", instance.port), timeout=60)
        held.append(again)
        assert again.recv(512).startswith(b"220 ")
        log = instance.log_text()
        assert re.search(r"warning: Session limit 172 reached: refused \S+\[127\.0\.0\.1\] for service smtp", log), log
        assert "Too many open files" not in log, log
    finally:
        for connection in held:
            connection.close()
        code = instance.stop()
    assert code == 0, instance.log_text()


def test_queue_refusal_and_absence_reach_the_client(workdir):
    require_build("smtp-listen")
    # The queue is tried again for queue_restart_wait (10 s by default).
    listener = Listener(workdir, smtp='queue_restart_wait = "1s"\n')
    try:
        listener.queue.refusal = (452, "4.3.1", "Insufficient system storage")
        with smtplib.SMTP("127.0.0.1", listener.port, timeout=60) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@example.org", ["b@e2e.test"], b"Subject: x\r\n\r\nx\r\n")
            assert refused.value.smtp_code == 452
            # The queue goes away: 451, never 250.
            listener.queue.go_away()
            with pytest.raises(smtplib.SMTPDataError) as unavailable:
                client.sendmail("a@example.org", ["b@e2e.test"], b"Subject: y\r\n\r\ny\r\n")
            assert unavailable.value.smtp_code == 451
        assert listener.queue.messages == []
        assert re.search(r"queue inject failed for \S+\[127\.0\.0\.1\]: connect to \S+: .* \(tried again for 1 s\)",
                         listener.log_text()), listener.log_text()
    finally:
        assert listener.stop() == 0, listener.log_text()
        assert listener.queue.errors == []


def test_submission_port_requires_authentication(listener):
    with smtplib.SMTP("127.0.0.1", listener.submission_port, timeout=60) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.org", ["b@e2e.test"], b"x\r\n")
        assert refused.value.smtp_code == 530


@pytest.mark.skipif(not IS_ROOT, reason="needs root: privilege drop and chroot")
def test_runs_as_its_user_in_a_chroot(listener):
    status = pathlib.Path(f"/proc/{listener.process.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    nobody = pwd.getpwnam("nobody").pw_uid
    assert uids == [str(nobody)] * 4
    assert os.readlink(f"/proc/{listener.process.pid}/root") == str(listener.data)
    # And it still works after the chroot (inject socket path, dates).
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=60) as client:
        client.sendmail("a@example.org", ["b@e2e.test"], b"Subject: chroot\r\n\r\nx\r\n")
    assert len(listener.queue.messages) == 1


def test_socket_activation_adopts_descriptor_3(workdir):
    require_build("smtp-listen")
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)
    instance = Listener(workdir, inherited_socket=inherited)
    try:
        inherited.close()   # smtp-listen holds its own copy now
        with smtplib.SMTP("127.0.0.1", instance.port, timeout=60) as client:
            assert client.noop()[0] == 250
            client.sendmail("a@example.org", ["b@e2e.test"], b"Subject: activated\r\n\r\nx\r\n")
        assert len(instance.queue.messages) == 1
        assert f"adopted listening socket 3 (smtp-{instance.port}) for smtp on 127.0.0.1:{instance.port}" \
            in instance.log_text()
    finally:
        assert instance.stop() == 0, instance.log_text()


@pytest.mark.parametrize("fdnames, complaint", [
    ("smtp-1", "matches no listener of the configuration's [smtp] section"),
    ("submission", "matches no listener"),
    ("imap", "names no listener"),
])
def test_socket_activation_refuses_a_descriptor_no_listener_wants(workdir, fdnames, complaint):
    require_build("smtp-listen")
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)
    instance = Listener(workdir, inherited_socket=inherited, fdnames=fdnames, wait=False)
    try:
        assert instance.process.wait(timeout=60) == 78
        assert complaint in instance.log_text(), instance.log_text()
        assert "fatal: LISTEN_" in instance.log_text()
    finally:
        inherited.close()
        instance.stop()


def test_whole_pipeline_smtp_to_maildir(workdir):
    require_build("queue", "local-deliver", "smtp-listen")
    port = free_port()
    pipeline = Pipeline(workdir, config_overrides={
        "listen": f'["127.0.0.1:{port}"]',
        "submission": f'["127.0.0.1:{free_port()}"]',
        "smtps": f'["127.0.0.1:{free_port()}"]',
    }).start()
    try:
        user = local_user()

        def connected():
            try:
                return smtplib.SMTP("127.0.0.1", port, timeout=60)
            except OSError:
                return None

        client = wait_until(connected, 60, f"smtp-listen on port {port}")
        with client:
            client.ehlo()
            client.mail("sender@example.org")
            client.rcpt(f"{user}@localhost")
            code, reply = client.data(b"Subject: via smtp\r\n\r\nover the wire\r\n")
            assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[-1]
        assert re.fullmatch(r"[0-9A-F]{12}", queue_id), reply
        files = wait_until(lambda: pipeline.delivered(user), 60, f"a message in {pipeline.maildir_new(user)}")
        message = parse_message(files[0])
        assert message["Subject"] == "via smtp"
        received = message.get_all("Received")
        # smtp-listen's Received line carries the queue ID of the 250 reply.
        assert any("(localhost [127.0.0.1])" in value and f"with ESMTP id {queue_id}" in value for value in received), received
        # One grep for the ID follows the message from the SMTP client to
        # the Maildir: smtp-listen's client= line, the queue's, the delivery.
        def log_text():
            try:
                return pipeline.log_file.read_text(errors="replace")
            except FileNotFoundError:
                return ""
        log = wait_until(lambda: f"{queue_id}: removed" in log_text() and log_text(), 60, "the removed line")
        lines = [line for line in log.splitlines() if queue_id in line]
        assert any("smtp-listen[" in line and f"{queue_id}: client=localhost[127.0.0.1]" in line for line in lines), lines
        assert any("queue[" in line and f"{queue_id}: client=localhost[127.0.0.1]" in line for line in lines), lines
        # The delivery is logged once, by local-deliver: a count of
        # "status=sent" (grep -c, pflogsumm) counts each delivery once.
        assert [line for line in lines if "status=sent" in line and "local-deliver[" in line] == \
            [line for line in lines if "status=sent" in line], lines
        assert len([line for line in lines if "status=sent" in line]) == 1, lines
        assert "over the wire" in message.get_content()
    finally:
        code = pipeline.stop()
        assert code == 0, pipeline.supervisor_output()


def test_a_message_of_exactly_the_advertised_size_is_queued(workdir):
    """SIZE advertises message_size_limit for the client's content; the
    queue counts smtp-listen's Received field too and must not refuse a
    message the client was told fits (it did, 552 5.3.4, before)."""
    require_build("queue", "smtp-listen")
    port = free_port()
    pipeline = Pipeline(workdir, stages=f"queue {executable('queue')}\nsmtp-listen {executable('smtp-listen')}\n",
                        config_overrides={"listen": f'["127.0.0.1:{port}"]', "message_size_limit": "4000"}).start()
    try:
        wait_for_listener("127.0.0.1", port, timeout=60, process=pipeline.process)
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.ehlo()
            assert client.esmtp_features.get("size") == "4000"
            head = b"Subject: exactly the limit\r\n\r\n"
            lines = b"x" * 78 + b"\r\n"
            content = head + lines * ((4000 - len(head)) // len(lines))
            content += b"y" * (4000 - len(content) - 2) + b"\r\n"
            assert len(content) == 4000
            client.mail("sender@example.org", ["SIZE=4000"])
            client.rcpt("someone@localhost")
            code, reply = client.data(content)
            assert code == 250, reply
            client.mail("sender@example.org")
            client.rcpt("someone@localhost")
            code, reply = client.data(content + b"z\r\n")
            assert code == 552, reply
    finally:
        pipeline.stop()
