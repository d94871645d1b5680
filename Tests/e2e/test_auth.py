"""SMTP AUTH end to end: accounts made with `sealpost user add`, the whole
pipeline (supervise, queue, smtp-listen, local-deliver), Python's smtplib
as the mail client on the submission port over loopback.

Loopback is taken out of trusted_networks here, so that relaying depends
on authentication alone.
"""

import os
import re
import smtplib
import stat
import subprocess

import pytest

from conftest import IS_ROOT, Pipeline, connect_smtp, executable, local_user, parse_message, port_of, require_build, wait_until

PASSWORD = "correct horse battery"


def add_user(pipe, name, password, *extra):
    return subprocess.run([executable("sealpost"), "user", "add", *extra, name], input=password + "\n",
                          env=pipe.env(), capture_output=True, text=True, timeout=60)



def login(client, mechanism, user="alice", password=PASSWORD):
    client.ehlo()
    client.user, client.password = user, password
    if mechanism == "PLAIN":
        return client.auth("PLAIN", client.auth_plain)
    # LOGIN without an initial response: the server prompts for both fields.
    return client.auth("LOGIN", client.auth_login, initial_response_ok=False)


@pytest.fixture
def auth_pipeline(workdir):
    require_build("queue", "local-deliver", "smtp-listen", "sealpost")
    pipe = Pipeline(workdir, config_overrides={"trusted_networks": '["192.0.2.0/24"]'})
    added = add_user(pipe, "alice", PASSWORD)
    assert added.returncode == 0, added.stderr
    assert "user alice added" in added.stdout
    pipe.start()
    yield pipe
    code = pipe.stop()
    assert code == 0, f"supervise exited with {code}:\n{pipe.supervisor_output()}"


def test_user_commands_write_a_private_file(workdir):
    require_build("sealpost")
    pipe = Pipeline(workdir)
    users = workdir / "users"
    assert add_user(pipe, "alice", PASSWORD).returncode == 0
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    line = users.read_text().splitlines()[0]
    assert line.startswith("alice:$argon2id$v=19$m=65536,t=2,p=1$")
    again = add_user(pipe, "alice", "other")
    assert again.returncode == 65 and "already exists" in again.stderr
    assert add_user(pipe, "bob", "", "--sender", "bob@example.org").returncode == 64   # empty password
    assert add_user(pipe, "bob", "pw", "--sender", "bob@example.org").returncode == 0
    listed = pipe.sealpost("user", "list")
    assert listed.returncode == 0
    assert "bob\tbob@example.org\n" in listed.stdout
    assert listed.stdout.startswith("alice\talice@localhost,")
    changed = subprocess.run([executable("sealpost"), "user", "passwd", "alice"], input="new one\n",
                             env=pipe.env(), capture_output=True, text=True, timeout=60)
    assert changed.returncode == 0, changed.stderr
    assert users.read_text().splitlines()[0] != line
    assert pipe.sealpost("user", "delete", "bob").returncode == 0
    assert pipe.sealpost("user", "delete", "bob").returncode == 67
    assert [l.split(":")[0] for l in users.read_text().splitlines()] == ["alice"]


def test_user_commands_refuse_what_no_client_could_use(workdir):
    """A password that is not UTF-8 (Latin-1 from a script) would match
    nothing an SMTP client can send: refused. A users.tmp a crash left is
    replaced under the lock, not a reason to refuse every change. As root:
    a users file whose owner the command cannot keep (another user who may
    write the directory) stays as it is, since smtp-listen would refuse a
    file of the wrong owner at its next start."""
    require_build("sealpost")
    pipe = Pipeline(workdir)
    users = workdir / "users"
    latin1 = subprocess.run([executable("sealpost"), "user", "add", "alice"], input=b"p\xe4ssword\n",
                            env=pipe.env(), capture_output=True, timeout=60)
    assert latin1.returncode == 65 and b"not valid UTF-8" in latin1.stderr, latin1.stderr
    assert not users.exists()
    (workdir / "users.tmp").write_text("left by a crash\n")
    assert add_user(pipe, "alice", PASSWORD).returncode == 0
    assert not (workdir / "users.tmp").exists()
    if not IS_ROOT:
        return
    before = users.read_bytes()
    os.chown(users, 0, 65534)
    os.chmod(users, 0o640)
    os.chmod(workdir, 0o777)
    (workdir / "users.lock").unlink()
    changed = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                              executable("sealpost"), "user", "passwd", "alice"], input="other\n",
                             env=pipe.env(), capture_output=True, text=True, timeout=60)
    assert changed.returncode != 0 and "cannot keep its owner 0:65534" in changed.stderr, changed.stderr
    assert users.read_bytes() == before and os.stat(users).st_uid == 0


def test_user_changes_take_turns(workdir):
    # Two changes at once would both read the old file, and the second
    # rename would drop the first one's account: a change holds
    # users.lock from before it reads until it exits. Here the test holds
    # it, as a change in progress would.
    import fcntl
    require_build("sealpost")
    pipe = Pipeline(workdir)
    assert add_user(pipe, "alice", PASSWORD).returncode == 0
    with open(workdir / "users.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = add_user(pipe, "bob", PASSWORD)
        assert busy.returncode == 75 and "another sealpost user command is changing" in busy.stderr, busy
        assert pipe.sealpost("user", "delete", "alice").returncode == 75
        assert pipe.sealpost("user", "list").returncode == 0   # reading needs no turn
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert add_user(pipe, "bob", PASSWORD).returncode == 0
    assert [l.split(":")[0] for l in (workdir / "users").read_text().splitlines()] == ["alice", "bob"]


def test_ctrl_c_at_the_password_prompt_gives_the_terminal_its_echo_back(workdir):
    # The prompt turns echo off; Ctrl-C there used to leave it off.
    import fcntl
    import pty
    import select
    import termios
    require_build("sealpost")
    pipe = Pipeline(workdir)
    master, slave = pty.openpty()

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    child = subprocess.Popen([executable("sealpost"), "user", "add", "carol"], stdin=slave, stdout=slave,
                             stderr=slave, env=pipe.env(), preexec_fn=controlling_terminal)
    try:
        seen = b""
        while b"Password: " not in seen:
            assert child.poll() is None, seen
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 1024)
        # Echo is off once the prompt is out and the process reads.
        wait_until(lambda: not termios.tcgetattr(slave)[3] & termios.ECHO, 30, "echo to be off")
        os.write(master, b"\x03")
        assert child.wait(timeout=30) == -2   # died of SIGINT
        assert termios.tcgetattr(slave)[3] & termios.ECHO, "echo still off after Ctrl-C"
    finally:
        child.kill()
        os.close(master)
        os.close(slave)
    assert not (workdir / "users").exists() or "carol" not in (workdir / "users").read_text()


def test_smtp_listen_refuses_a_readable_password_file(workdir):
    require_build("smtp-listen", "sealpost")
    pipe = Pipeline(workdir)
    assert add_user(pipe, "alice", PASSWORD).returncode == 0
    os.chmod(workdir / "users", 0o644)
    env = pipe.env(SEALPOST_USER="nobody")
    result = subprocess.run([executable("smtp-listen")], env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 78, result.stderr
    assert "mode 0644 lets every user read the password hashes" in result.stderr


def test_plain_and_login_relay_and_local_delivery(auth_pipeline):
    pipe = auth_pipeline
    submission = port_of(pipe, "submission")
    user = local_user()
    with connect_smtp(submission) as client:
        code, _ = login(client, "PLAIN")
        assert code == 235
        # Relaying to a remote domain is allowed once authenticated.
        refused = client.sendmail("alice@localhost", ["someone@remote.example", f"{user}@localhost"],
                                  b"Subject: via submission\r\n\r\nauthenticated\r\n")
        assert refused == {}
    files = wait_until(lambda: pipe.delivered(user), 60, f"a message in {pipe.maildir_new(user)}")
    message = parse_message(files[0])
    assert message["Subject"] == "via submission"
    received = message.get_all("Received")
    assert any("with ESMTPA" in value for value in received), received

    with connect_smtp(submission) as client:
        code, _ = login(client, "LOGIN")
        assert code == 235
        code, _ = client.mail("alice@localhost")
        assert code == 250
    # The lines reach the log through the supervisor, a moment after the
    # replies reach the client.
    log = wait_until(lambda: "sasl_method=LOGIN, sasl_username=alice" in pipe.log_text() and pipe.log_text(),
                     30, "the AUTH LOGIN line in the log")
    assert "sasl_method=PLAIN, sasl_username=alice" in log


def test_wrong_password_and_unknown_user_get_535(auth_pipeline):
    submission = port_of(auth_pipeline, "submission")
    for user, password in (("alice", "wrong"), ("mallory", PASSWORD)):
        with connect_smtp(submission) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
                login(client, "PLAIN", user, password)
            assert failure.value.smtp_code == 535
            assert failure.value.smtp_error.startswith(b"5.7.8")
    wait_until(lambda: "SASL PLAIN authentication failed: user=mallory" in auth_pipeline.log_text(), 30,
               "the failed AUTH in the log")


def test_without_authentication_relay_is_refused(auth_pipeline):
    pipe = auth_pipeline
    with connect_smtp(port_of(pipe, "listen")) as client:
        client.ehlo()
        assert "auth" not in client.esmtp_features   # AUTH only on submission
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("x@remote.example", ["someone@remote.example"], b"Subject: relay\r\n\r\nno\r\n")
        code, text = refused.value.recipients["someone@remote.example"]
        assert (code, text) == (554, b"5.7.1 Relay access denied")
    with connect_smtp(port_of(pipe, "submission")) as client:
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        code, text = client.mail("alice@localhost")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_sender_must_belong_to_the_user(auth_pipeline):
    with connect_smtp(port_of(auth_pipeline, "submission")) as client:
        login(client, "PLAIN")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("bob@localhost", ["someone@remote.example"], b"Subject: forged\r\n\r\nno\r\n")
        assert refused.value.smtp_code == 553
        assert refused.value.smtp_error.startswith(b"5.7.1")
        client.rset()
        code, _ = client.mail("ALICE@localhost")
        assert code == 250


# Implicit TLS on port 465 (RFC 8314) with AUTH ----------------------------------
#
# The smtps listener hands each connection to crypto-negotiate at accept;
# the session under TLS offers AUTH (submission) and no STARTTLS. Mail to
# a local user lands in the Maildir; mail to remote.example is relayed,
# through the transport table, to an aiosmtpd peer on loopback (no DNS).
# Both copies carry smtp-listen's Received field, which must say ESMTPSA
# (RFC 3848: ESMTP, TLS, authenticated) and name the TLS version and cipher.

import base64
import shutil
import ssl

from conftest import free_tcp_port
import mtapeers


def smtps_context():
    # The self-signed pair Pipeline/start makes: encrypt, do not verify.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def expect_esmtpsa(received):
    assert "with ESMTPSA" in received, received
    assert re.search(r"\(using TLSv1\.3 with cipher TLS_[A-Z0-9_]+", received), received


@pytest.fixture
def smtps_pipeline(workdir):
    """auth_pipeline's set-up (alice, loopback not trusted) plus a relay peer
    for remote.example, waiting until port 465 completes a TLS handshake."""
    require_build("queue", "local-deliver", "smtp-listen", "sealpost", "crypto-negotiate", "remote-deliver")
    try:
        peer = mtapeers.AiosmtpdPeer("127.0.0.1", free_tcp_port(), workdir / "peer").start()
    except mtapeers.Unavailable as error:
        pytest.skip(str(error))
    pipe = Pipeline(workdir, config_overrides={"trusted_networks": '["192.0.2.0/24"]'})
    (workdir / "transport").write_text(f"remote.example smtp:[127.0.0.1]:{peer.port} tls=none\n")
    added = add_user(pipe, "alice", PASSWORD)
    assert added.returncode == 0, added.stderr
    pipe.peer = peer
    try:
        pipe.start()
        port = port_of(pipe, "smtps")

        def greets():
            try:
                with smtplib.SMTP_SSL("127.0.0.1", port, context=smtps_context(), timeout=10) as client:
                    return client.noop()[0] == 250
            except (OSError, smtplib.SMTPException):
                return False
        try:
            wait_until(greets, 60, "port 465 to greet over TLS")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{pipe.log_tail()}") from None
        yield pipe
    finally:
        peer.stop()
        code = pipe.stop()
    assert code == 0, f"supervise exited with {code}:\n{pipe.supervisor_output()}"


def smtps_connect(pipe):
    return smtplib.SMTP_SSL("127.0.0.1", port_of(pipe, "smtps"), local_hostname="client.e2e.test",
                            context=smtps_context(), timeout=60)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtps_auth_delivers_locally_and_relays(smtps_pipeline, mechanism):
    pipe = smtps_pipeline
    user = local_user()
    with smtps_connect(pipe) as client:
        assert client.sock.version() == "TLSv1.3"
        client.ehlo()
        assert not client.has_extn("starttls"), "no STARTTLS under implicit TLS"
        assert client.has_extn("requiretls")
        assert {"PLAIN", "LOGIN"} <= set(client.esmtp_features["auth"].split())
        # 465 is submission: nothing before AUTH.
        code, text = client.mail("alice@localhost")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        client.rset()
        code, _ = login(client, mechanism)
        assert code == 235
        refused = client.sendmail("alice@localhost", [f"{user}@localhost"],
                                  f"Subject: 465 local {mechanism}\r\n\r\nover implicit TLS\r\n".encode())
        assert refused == {}
        refused = client.sendmail("alice@localhost", ["someone@remote.example"],
                                  f"Subject: 465 relay {mechanism}\r\n\r\nrelayed\r\n".encode())
        assert refused == {}

    local = parse_message(wait_until(lambda: pipe.delivered(user), 60, f"a message in {pipe.maildir_new(user)}")[0])
    assert local["Subject"] == f"465 local {mechanism}"
    expect_esmtpsa(local.get_all("Received")[0])

    try:
        relayed_path = wait_until(pipe.peer.messages, 120, "the relayed message at the peer")[0]
    except AssertionError as error:
        raise AssertionError(f"{error}\n{pipe.log_tail()}") from None
    relayed = parse_message(relayed_path)
    assert relayed["X-Peer-Rcpt-To"] == "someone@remote.example"
    assert relayed["Subject"] == f"465 relay {mechanism}"
    expect_esmtpsa(relayed.get_all("Received")[0])
    pipe.log_with(f"sasl_method={mechanism}, sasl_username=alice", "TLS: TLSv1.3 with cipher")


def test_smtps_auth_with_openssl_s_client(smtps_pipeline):
    pipe = smtps_pipeline
    user = local_user()
    token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    commands = (f"EHLO client.example\nAUTH PLAIN {token}\nMAIL FROM:<alice@localhost>\nRCPT TO:<{user}@localhost>\n"
                "DATA\nSubject: s_client on 465\n\nauthenticated, implicit TLS\n.\nQUIT\n")
    result = subprocess.run(["openssl", "s_client", "-quiet", "-crlf", "-tls1_3",
                             "-connect", f"127.0.0.1:{port_of(pipe, 'smtps')}"],
                            input=commands, capture_output=True, text=True, timeout=60)
    out = result.stdout
    assert "235 2.7.0" in out, out + result.stderr
    assert "250 2.0.0 Ok: queued as" in out, out
    message = parse_message(wait_until(lambda: pipe.delivered(user), 60, "the s_client message")[0])
    assert message["Subject"] == "s_client on 465"
    expect_esmtpsa(message.get_all("Received")[0])


def test_smtps_auth_with_swaks(smtps_pipeline):
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed")
    pipe = smtps_pipeline
    user = local_user()
    result = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port_of(pipe, "smtps")), "--tlsc",
                             "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
                             "--from", "alice@localhost", "--to", f"{user}@localhost",
                             "--header", "Subject: swaks on 465", "--body", "hello"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "=== TLS started with cipher TLSv1.3" in result.stdout, result.stdout
    assert "<~  235 2.7.0" in result.stdout, result.stdout
    message = parse_message(wait_until(lambda: pipe.delivered(user), 60, "the swaks message")[0])
    expect_esmtpsa(message.get_all("Received")[0])
