"""STARTTLS (RFC 3207) and implicit TLS (RFC 8314) through the whole
pipeline: smtp-listen hands the client's socket to crypto-negotiate and
carries on over the plaintext socket it gets back.

Real clients only: Python's smtplib and ssl, swaks, openssl s_client, and
(as root) a private Postfix instance that insists on encryption. The
default configuration is used as shipped: the self-signed pair that
Pipeline/start creates (here: the fixture, with the same shell function).
"""

import os
import pathlib
import pwd
import re
import resource
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess

import pytest

import stageproto
from conftest import (IS_ROOT, CHECKOUT, Pipeline, executable, local_user, parse_message, port_of, require_build,
                      running, stages_without, wait_until)


def client_context():
    # The self-signed certificate: SMTP between MTAs encrypts without
    # verifying (RFC 7435) unless DANE or MTA-STS says otherwise.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def tls_pipeline(pipeline):
    require_build("smtp-listen", "crypto-negotiate")
    port = port_of(pipeline, "listen")
    # Wait until smtp-listen offers STARTTLS (it connects to crypto-negotiate
    # once both run): the session's EHLO says so.
    def offers():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("probe.example")
                return client.has_extn("starttls")
        except OSError:
            return False
    try:
        wait_until(offers, 60, "smtp-listen to offer STARTTLS")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{pipeline.log_tail()}") from None
    return pipeline


def delivered_messages(pipe, count, timeout=60):
    user = local_user()
    return wait_until(lambda: len(pipe.delivered(user)) >= count and pipe.delivered(user), timeout,
                      f"{count} message(s) in the Maildir of {user}")


def expect_tls_received(path):
    message = parse_message(path)
    received = message.get_all("Received")[0]
    assert "with ESMTPS" in received, received
    assert re.search(r"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+", received), received
    return message


def test_smtplib_starttls_delivers_and_advertises_requiretls_only_under_tls(tls_pipeline):
    port = port_of(tls_pipeline, "listen")
    user = local_user()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls")
        assert not client.has_extn("requiretls"), "REQUIRETLS is offered only with TLS active"
        code, reply = client.starttls(context=client_context())
        assert code == 220, reply
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("client.example")
        assert not client.has_extn("starttls"), "no STARTTLS under TLS"
        assert client.has_extn("requiretls")
        client.sendmail("sender@client.example", [f"{user}@localhost"],
                        b"Subject: over STARTTLS\r\n\r\nencrypted all the way\r\n")
    message = expect_tls_received(delivered_messages(tls_pipeline, 1)[0])
    assert message["Subject"] == "over STARTTLS"
    tls_pipeline.log_with("STARTTLS: TLSv1.", "crypto-negotiate[")


def test_requiretls_message_over_starttls(tls_pipeline):
    port = port_of(tls_pipeline, "listen")
    user = local_user()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=client_context())
        client.ehlo("client.example")
        client.sendmail("sender@client.example", [f"{user}@localhost"],
                        b"Subject: requiretls\r\n\r\nmust stay encrypted\r\n", mail_options=["REQUIRETLS"])
    expect_tls_received(delivered_messages(tls_pipeline, 1)[0])


def test_swaks_tls(tls_pipeline):
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed")
    port = port_of(tls_pipeline, "listen")
    user = local_user()
    result = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--tls",
                             "--from", "swaks@client.example", "--to", f"{user}@localhost",
                             "--header", "Subject: swaks over TLS", "--body", "hello from swaks"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout, result.stdout
    expect_tls_received(delivered_messages(tls_pipeline, 1)[0])


def s_client(arguments, commands, timeout=60):
    """openssl s_client with SMTP commands on stdin (CRLF line ends),
    waiting for the server to close the connection after QUIT."""
    return subprocess.run(["openssl", "s_client", "-quiet", "-crlf", *arguments],
                          input=commands, capture_output=True, text=True, timeout=timeout)


def test_openssl_s_client_starttls(tls_pipeline):
    port = port_of(tls_pipeline, "listen")
    user = local_user()
    # s_client has done EHLO and STARTTLS; the session starts afresh.
    commands = (f"EHLO client.example\nMAIL FROM:<s_client@client.example>\nRCPT TO:<{user}@localhost>\nDATA\n"
                "Subject: s_client starttls\n\nvia openssl\n.\nQUIT\n")
    result = s_client(["-starttls", "smtp", "-connect", f"127.0.0.1:{port}"], commands)
    assert "250 2.0.0 Ok: queued as" in result.stdout, result.stdout + result.stderr
    assert "221" in result.stdout
    expect_tls_received(delivered_messages(tls_pipeline, 1)[0])


def test_openssl_s_client_implicit_tls_on_smtps(tls_pipeline):
    port = port_of(tls_pipeline, "smtps")
    for version in ("-tls1_3", "-tls1_2"):
        commands = "EHLO client.example\nMAIL FROM:<s_client@client.example>\nQUIT\n"
        result = s_client([version, "-connect", f"127.0.0.1:{port}"], commands)
        out = result.stdout
        # Greeted over TLS, EHLO under TLS: no STARTTLS, REQUIRETLS offered.
        assert re.search(r"(?m)^220 \S+ ESMTP Sealpost", out), out + result.stderr
        assert "250-REQUIRETLS" in out or "250 REQUIRETLS" in out, out
        assert "STARTTLS" not in out, out
        # Port 465 is submission (RFC 8314): authentication is required
        # (no account here; test_auth.py delivers over 465 with AUTH).
        assert "530 5.7.0 Authentication required" in out, out
        assert "221" in out
    tls_pipeline.log_with("TLS: TLSv1.3 with cipher", "TLS: TLSv1.2 with cipher")


def read_reply(stream):
    lines = []
    while True:
        line = stream.readline()
        assert line, f"connection closed after {lines}"
        lines.append(line.decode().rstrip("\r\n"))
        if len(line) >= 4 and line[3:4] == b" ":
            return lines


def test_plaintext_pipelined_after_starttls_is_discarded(tls_pipeline):
    """CVE-2011-0411: "STARTTLS\\r\\nRSET\\r\\n" in one write; the RSET must not
    be answered, neither in clear text nor under TLS."""
    port = port_of(tls_pipeline, "listen")
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    stream = raw.makefile("rb")
    assert read_reply(stream)[0].startswith("220 ")
    raw.sendall(b"EHLO client.example\r\n")
    assert any(line[4:] == "STARTTLS" for line in read_reply(stream))
    raw.sendall(b"STARTTLS\r\nRSET\r\n")
    assert read_reply(stream) == ["220 2.0.0 Ready to start TLS"]
    # Nothing more comes in clear text: a "250" for RSET here would be read
    # as the server's handshake and break it.
    tls = client_context().wrap_socket(raw, server_hostname=None)
    tls_stream = tls.makefile("rb")
    tls.sendall(b"EHLO client.example\r\n")
    reply = read_reply(tls_stream)
    # The first reply under TLS answers EHLO: the RSET was discarded.
    assert reply[0].startswith("250-"), reply
    assert any("REQUIRETLS" in line for line in reply), reply
    tls.sendall(b"QUIT\r\n")
    assert read_reply(tls_stream)[0].startswith("221")
    tls.close()
    wait_until(lambda: "bytes sent after STARTTLS discarded" in tls_pipeline.log_text(), 30,
               "the discarded bytes in the log")


def test_starttls_garbage_instead_of_handshake_ends_the_session(tls_pipeline):
    port = port_of(tls_pipeline, "listen")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        stream = raw.makefile("rb")
        read_reply(stream)
        raw.sendall(b"EHLO client.example\r\n")
        read_reply(stream)
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(stream) == ["220 2.0.0 Ready to start TLS"]
        raw.sendall(b"MAIL FROM:<x@client.example>\r\n")
        # crypto-negotiate fails the handshake and closes (perhaps after a
        # TLS alert, perhaps with a reset); no SMTP reply comes in clear text.
        try:
            data = stream.read()
        except ConnectionResetError:
            data = b""
        assert not re.match(rb"\d{3}[ -]", data), data
    wait_until(lambda: "STARTTLS failed" in tls_pipeline.log_text(), 30, "the failed handshake in the log")


def test_no_starttls_when_crypto_negotiate_is_gone(tls_pipeline):
    port = port_of(tls_pipeline, "listen")
    # Kill the stage (the supervisor restarts it): sessions opened while it
    # is down are answered, without STARTTLS or with it, never hang.
    pid = tls_pipeline.running_pid("crypto-negotiate")
    lost_before = tls_pipeline.log_text().count("lost crypto-negotiate")
    os.kill(pid, 9)
    # kill() returns before the process is gone: until smtp-listen has seen
    # the control connection close, it still (rightly) offers STARTTLS.
    wait_until(lambda: tls_pipeline.log_text().count("lost crypto-negotiate") > lost_before, 30,
               "smtp-listen to notice that crypto-negotiate is gone")

    def plain_only():
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.example")
            return not client.has_extn("starttls")
    for _ in range(3):
        plain_only()
    wait_until(lambda: not plain_only(), 60, "STARTTLS to be offered again after crypto-negotiate restarted")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=client_context())
        client.ehlo("client.example")
        client.sendmail("sender@client.example", [f"{local_user()}@localhost"], b"Subject: again\r\n\r\nok\r\n")
    expect_tls_received(delivered_messages(tls_pipeline, 1)[0])


def test_crypto_negotiate_accepts_again_after_running_out_of_descriptors(workdir):
    """crypto-negotiate at its limit of open files (64, set by prlimit in
    the stages file): clients of run/tls (root may be one) take its
    descriptors until accept(2) fails with EMFILE and a connection stays in
    the backlog, which an edge-triggered listener hears of no more; once
    descriptors are free again the listener's one-second retry takes it
    (its HELLO is answered) without another client having to come."""
    require_build("crypto-negotiate")
    prlimit = shutil.which("prlimit")
    if not prlimit:
        pytest.skip("prlimit (util-linux) is missing")
    stages = stages_without("crypto-negotiate", "remote-deliver", "local-deliver") + \
        f"\ncrypto-negotiate {prlimit} --nofile=64:64 -- {executable('crypto-negotiate')}\n"
    tls_socket = None
    clients = []

    def hello():
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(tls_socket)
        client.sendall(stageproto.encode(stageproto.HELLO, [("protocol", "tls"), ("version", 1),
                                                            ("software", "sealpost-e2e 1")]))
        clients.append(client)
        return client

    def answered(client, timeout):
        client.settimeout(timeout)
        answer = b""
        try:
            while len(answer) < 6:
                chunk = client.recv(4096)
                assert chunk, "crypto-negotiate closed the connection instead of answering HELLO"
                answer += chunk
        except socket.timeout:
            return False
        (frame_type,) = struct.unpack(">H", answer[4:6])
        assert frame_type == stageproto.HELLO, answer
        return True

    with running(Pipeline(workdir, stages=stages)) as pipe:
        pid = pipe.running_pid("crypto-negotiate")
        tls_socket = str(pipe.data / "run" / "tls")
        wait_until(lambda: os.path.exists(tls_socket), 30, "run/tls")
        try:
            # Each answered client holds one of its descriptors; 64 at most.
            # A HELLO unanswered for 5 s is the one in the backlog once the
            # log says so (on a slow machine it may just be slow).
            for _ in range(80):
                client = hello()
                if answered(client, 5):
                    continue
                try:
                    pipe.log_with("crypto-negotiate[", "accept: Too many open files; trying again every second")
                    break
                except AssertionError:
                    assert answered(client, 60), "a HELLO unanswered with descriptors to spare"
            else:
                raise AssertionError("80 clients answered: the limit of 64 descriptors did not apply")
            waiting = clients[-1]
            for client in clients[:8]:
                client.close()
            assert answered(waiting, 60), "the client left in the backlog was never accepted"
            pipe.log_with("accept: accepting again")
            assert pipe.stage_pid("crypto-negotiate") == pid
        finally:
            for client in clients:
                client.close()


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {root}
myhostname = postfix-client.localdomain
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
master_service_disable = inet
relayhost = [127.0.0.1]:{port}
smtp_tls_security_level = encrypt
smtp_tls_loglevel = 1
alias_maps =
alias_database =
smtputf8_enable = no
"""


@pytest.mark.skipif(not IS_ROOT, reason="a private Postfix instance needs root")
def test_postfix_with_mandatory_encryption_delivers_through_sealpost(tls_pipeline, workdir):
    if not os.path.exists("/usr/sbin/postfix"):
        pytest.skip("Postfix is not installed")
    port = port_of(tls_pipeline, "listen")
    user = local_user()
    # Under the 0755 work directory: Postfix's own users must reach it.
    root = workdir / "postfix"
    config, queue, data = root / "etc", root / "spool", root / "data"
    for directory in (config, queue, data):
        directory.mkdir(parents=True)
    os.chmod(root, 0o755)
    postfix_user = pwd.getpwnam("postfix")
    os.chown(data, postfix_user.pw_uid, postfix_user.pw_gid)
    master = pathlib.Path("/usr/share/postfix/master.cf.dist")
    if not master.exists():
        master = pathlib.Path("/etc/postfix/master.cf")
    shutil.copy(master, config / "master.cf")
    maillog = root / "maillog"
    (config / "main.cf").write_text(POSTFIX_MAIN.format(queue=queue, data=data, maillog=maillog, root=root, port=port))
    subprocess.run(["postconf", "-c", str(config), "-F", "*/*/chroot = n"], check=True)
    env = dict(os.environ, MAIL_CONFIG=str(config))
    for verb in ("check", "start"):
        result = subprocess.run(["script", "-qec", f"postfix -c {config} {verb}", "/dev/null"],
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"postfix {verb}: {result.stdout} {result.stderr}"
    try:
        result = subprocess.run(["/usr/sbin/sendmail", "-C", str(config), "-f", "postfix@client.example",
                                 f"{user}@localhost"], input=b"Subject: from Postfix\n\nencrypt or nothing\n",
                                env=env, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        path = delivered_messages(tls_pipeline, 1, timeout=120)[0]
    except AssertionError:
        log = maillog.read_text(errors="replace") if maillog.exists() else ""
        raise AssertionError(f"postfix log:\n{log[-3000:]}\nsealpost log:\n{tls_pipeline.log_tail()}")
    finally:
        subprocess.run(["postfix", "-c", str(config), "stop"], env=env, capture_output=True)
    message = expect_tls_received(path)
    assert message["Subject"] == "from Postfix"
    log = maillog.read_text(errors="replace")
    assert re.search(r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: TLSv1\.[23]", log), log[-3000:]
    assert "status=sent" in log, log[-3000:]


def test_without_crypto_negotiate_no_starttls_and_smtps_refused(workdir):
    """crypto-negotiate not running: STARTTLS is not offered (and refused if
    tried), and port 465 closes connections at once; nothing hangs."""
    from conftest import Pipeline
    require_build("queue", "local-deliver", "smtp-listen")
    stages = "\n".join(line for line in (CHECKOUT / "Pipeline" / "stages").read_text().splitlines()
                       if not line.startswith("crypto-negotiate"))
    pipe = Pipeline(workdir, stages=stages + "\n").start()
    try:
        port = port_of(pipe, "listen")
        def session():
            try:
                return smtplib.SMTP("127.0.0.1", port, timeout=30)
            except OSError:
                return None
        client = wait_until(session, 60, "smtp-listen to accept")
        with client:
            client.ehlo("client.example")
            assert not client.has_extn("starttls")
            code, reply = client.docmd("STARTTLS")
            assert code == 502, reply
            client.sendmail("sender@client.example", [f"{local_user()}@localhost"], b"Subject: clear\r\n\r\ntext\r\n")
        message = parse_message(delivered_messages(pipe, 1)[0])
        assert re.search(r"with ESMTP\s", message.get_all("Received")[0])
        with socket.create_connection(("127.0.0.1", port_of(pipe, "smtps")), timeout=30) as raw:
            assert raw.recv(100) == b""
        assert "crypto-negotiate unavailable" in pipe.log_text()
    finally:
        assert pipe.stop() == 0, pipe.supervisor_output()
