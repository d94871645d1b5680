"""Mail through the whole pipeline: queue-inject -> queue -> local-deliver -> Maildir."""

import os
import pwd
import re
import shutil
import subprocess

import pytest

from conftest import CHECKOUT, IS_ROOT, Pipeline, executable, local_user, parse_message, require_build, wait_until


def test_first_message_lands_in_the_maildir_with_trace_headers(pipeline):
    user = local_user()
    result = pipeline.queue_inject("-f", "me@localhost", f"{user}@localhost",
                                   message=b"Subject: hi\n\nbody\n")
    assert result.returncode == 0, result.stderr.decode()
    files = wait_until(lambda: pipeline.delivered(user), 60, f"a message in {pipeline.maildir_new(user)}")
    assert len(files) == 1
    message = parse_message(files[0])
    assert message["Subject"] == "hi"
    assert message["Received"] is not None
    assert message["Date"] is not None
    assert message["Message-ID"] is not None
    assert message.get_content().strip() == "body"
    raw = files[0].read_bytes()
    assert b"\nbody" in raw


def test_unknown_local_user_bounces_a_dsn_to_the_sender(pipeline):
    user = local_user()
    result = pipeline.queue_inject("-f", f"{user}@localhost", "no-such-user-e2e@localhost",
                                   message=b"Subject: lost\n\nto nobody\n")
    assert result.returncode == 0, result.stderr.decode()
    files = wait_until(lambda: pipeline.delivered(user), 60, "the DSN in the sender's Maildir")
    report = parse_message(files[0])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = [part.get_content_type() for part in report.iter_parts()]
    assert "message/delivery-status" in parts, parts
    status = next(p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "no-such-user-e2e@localhost" in text
    assert "Action: failed" in text
    assert "Status: 5." in text


def test_local_deliver_swapped_for_a_python_program(workdir):
    """Pipeline/PROTOCOL.md is all a stage needs: the Python deliver.py,
    written from that page, takes local-deliver's place in the stages file."""
    fixture = CHECKOUT / "Tests" / "PipelineTests" / "Fixtures" / "deliver.py"
    if not fixture.exists():
        pytest.skip(f"{fixture.relative_to(CHECKOUT)} has not landed yet (branch localdel)")
    require_build("queue", "queue-inject")
    python = shutil.which("python3") or "/usr/bin/python3"
    stages = f"queue queue\nlocal-deliver {python} {fixture}\n"
    pipeline = Pipeline(workdir, stages=stages).start()
    try:
        user = local_user()
        result = pipeline.queue_inject("-f", "me@localhost", f"{user}@localhost",
                                       message=b"Subject: via python\n\nswapped\n")
        assert result.returncode == 0, result.stderr.decode()
        # deliver.py writes the same Maildir layout as local-deliver.
        files = wait_until(lambda: pipeline.delivered(user), 60,
                           f"deliver.py to deliver into {pipeline.maildir_new(user)}")
        assert parse_message(files[0])["Subject"] == "via python"
        pipeline.log_with("local-deliver[")
    finally:
        assert pipeline.stop() == 0


@pytest.mark.skipif(not IS_ROOT, reason="running as a uid without a passwd entry needs root")
def test_a_uid_without_passwd_entry_sends_as_its_plain_logname(pipeline):
    """A container user without a passwd entry: queue-inject takes LOGNAME
    as the sender's local part, but only a plain user name: anything else
    is EX_NOUSER before the queue is asked, not a malformed envelope
    retried for half a minute. A duplicate -N keyword is a usage error."""
    ghost = 54321
    try:
        pwd.getpwuid(ghost)
        pytest.skip(f"uid {ghost} has a passwd entry here")
    except KeyError:
        pass
    if subprocess.run(["setpriv", f"--reuid={ghost}", f"--regid={ghost}", "--clear-groups", "--",
                       "test", "-x", executable("queue-inject")]).returncode != 0:
        pytest.skip(f"{executable('queue-inject')} is not executable by uid {ghost}")
    user = local_user()

    def inject(logname, *arguments):
        command = ["setpriv", f"--reuid={ghost}", f"--regid={ghost}", "--clear-groups", "--",
                   executable("queue-inject"), *arguments, f"{user}@localhost"]
        return subprocess.run(command, input=b"Subject: ghost\n\nbody\n", env=pipeline.env(LOGNAME=logname),
                              capture_output=True, timeout=120)

    for bad in ["two words", "a\tb", "<x>", "-flag", "x" * 65]:
        result = inject(bad)
        assert result.returncode == 67, (bad, result.stderr.decode())
        assert b"not a plain user name" in result.stderr
    result = inject("ghost", "-N", "success,success")
    assert result.returncode == 64 and b"names a keyword twice" in result.stderr, result.stderr.decode()
    result = inject("ghost")
    assert result.returncode == 0, result.stderr.decode()
    files = wait_until(lambda: pipeline.delivered(user), 60, "the ghost's message")
    message = parse_message(files[0])
    assert message["Subject"] == "ghost"
    assert message["From"].startswith("ghost@") or "<ghost@" in message["From"], message["From"]
    assert message["Return-Path"].startswith("<ghost@"), message["Return-Path"]


def test_sendmail_bs_with_swaks(pipeline):
    """`sendmail -bs` (Symfony Mailer's and Laravel's default transport):
    swaks speaks SMTP to queue-inject over a pipe, pipelining, a dot-stuffed
    line, a second message in the same session; both reach the Maildir
    with smtp-listen's kind of Received field, and the 250 names the queue
    ID the queue logged."""
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed")
    user = local_user()
    command = f"{executable('queue-inject')} -bs -i"
    first = subprocess.run(["swaks", "--pipe", command, "--pipeline", "--from", "app@localhost",
                            "--to", f"{user}@localhost", "--helo", "app.example", "--header", "Subject: via -bs",
                            "--body", "first line\n.leading dot\nlast line"],
                           env=pipeline.env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    queued = re.search(r"<-\s+250 2\.0\.0 Ok: queued as ([0-9A-F]+)", first.stdout)
    assert queued, first.stdout
    assert "STARTTLS" not in first.stdout and "AUTH" not in first.stdout
    files = wait_until(lambda: pipeline.delivered(user), 60, "the -bs message in the Maildir")
    message = parse_message(files[0])
    assert message["Subject"] == "via -bs"
    received = " ".join(message.get_all("Received")[0].split())
    assert received.startswith("from app.example (localhost [127.0.0.1]) by "), received
    assert f"id {queued.group(1)}" in received, received
    assert ".leading dot" in message.get_content()
    pipeline.log_with(f"{queued.group(1)}: client=localhost[127.0.0.1] uid={os.geteuid()}")
    # The null sender (a bounce an application sends), another session.
    second = subprocess.run(["swaks", "--pipe", command, "--from", "<>", "--to", f"{user}@localhost",
                             "--header", "Subject: null sender"],
                            env=pipeline.env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    wait_until(lambda: len(pipeline.delivered(user)) == 2, 60, "the second -bs message")
    # A message with no From, Date or Message-ID (swaks adds them unless
    # given the data whole): the header gets them, as Postfix's does.
    third = subprocess.run(["swaks", "--pipe", command, "--from", "app@localhost", "--to", f"{user}@localhost",
                            "--data", "Subject: bare header\n\nno originator fields\n"],
                           env=pipeline.env(), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stdout + third.stderr
    files = wait_until(lambda: [f for f in pipeline.delivered(user)
                                if parse_message(f)["Subject"] == "bare header"], 60, "the third -bs message")
    bare = parse_message(files[0])
    assert bare["From"] == "app@localhost", bare.as_string()
    assert bare["Date"] and bare["Message-ID"].endswith(">"), bare.as_string()
    assert bare.get_content().strip() == "no originator fields"
