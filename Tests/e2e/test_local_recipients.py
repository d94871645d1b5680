"""Unknown local recipients are refused at RCPT, not bounced later.

local-deliver, which alone reads the accounts and the aliases file, writes
the local recipient table (local/recipients under the data directory) when
it starts and at each reload; smtp-listen, chrooted into the same data
directory as another user, reads it and refuses a local part that is
neither a user nor an alias with Postfix's 550 5.1.1. A message to an
unknown user from the network used to be accepted and bounced, most often
to a forged sender (backscatter)."""

import os
import pwd
import re
import signal
import socket
import stat

from conftest import IS_ROOT, Pipeline, connect_smtp, free_tcp_port, require_build, running, wait_until

STAGES = "queue queue\nsmtp-listen smtp-listen\nlocal-deliver local-deliver\n"



def rcpt_replies(port, recipients):
    with connect_smtp(port) as client:
        client.ehlo()
        assert client.mail("sender@example.org")[0] == 250
        return {r: client.rcpt(r) for r in recipients}


def test_unknown_local_recipients_get_550_and_a_reload_brings_new_aliases(workdir):
    require_build("queue", "smtp-listen", "local-deliver")
    port = free_tcp_port()
    pipe = Pipeline(workdir, stages=STAGES, config_overrides={
        "listen": f'["127.0.0.1:{port}"]', "accounts": '"listed"', "users": '["alpha"]'})
    aliases = workdir / "aliases"
    aliases.write_text("team: alpha\n")
    with running(pipe):
        # At once: smtp-listen starts only once local-deliver has written
        # the table, so not even the first RCPT goes without it.
        assert rcpt_replies(port, ["nobody-e2e@localhost"])["nobody-e2e@localhost"][0] == 550
        log = pipe.log_with(re.compile(r"local-deliver \(pid \d+\) reported ready; starting stage smtp-listen"))
        assert "stage smtp-listen starts once local-deliver reported ready" in log
        assert log.index("reported ready; starting stage smtp-listen") < log.index("started stage smtp-listen")
        assert "no local recipient table" not in log
        # "alpha", "team" and nothing else: "postmaster" is always accepted.
        pipe.log_with(re.compile(r"smtp-listen\[\d+\]: local recipient table loaded: 2 names from \S*local/recipients"))
        table = pipe.data / "local" / "recipients"
        assert table.read_text() == "sealpost-local-recipients 1\nalpha\nteam\n"
        info = os.stat(table)
        assert stat.S_IMODE(info.st_mode) == 0o644
        if IS_ROOT:
            # Written by local-deliver's user, read by smtp-listen's.
            assert pwd.getpwuid(info.st_uid).pw_name == "sealpost-local-deliver"
            assert pwd.getpwuid(os.stat(table.parent).st_uid).pw_name == "sealpost-local-deliver"

        replies = rcpt_replies(port, ["nobody-e2e@localhost", "ALPHA+news@localhost", "team@localhost",
                                      "postmaster@localhost", "someone@remote.example"])
        assert replies["nobody-e2e@localhost"] == (
            550, b"5.1.1 <nobody-e2e@localhost>: Recipient address rejected: User unknown in local recipient table")
        assert replies["ALPHA+news@localhost"][0] == 250
        assert replies["team@localhost"][0] == 250
        assert replies["postmaster@localhost"][0] == 250
        # Not a local domain: relay control decides (the client is trusted).
        assert replies["someone@remote.example"][0] == 250
        pipe.log_with(re.compile(r"smtp-listen\[\d+\]: NOQUEUE: reject: RCPT from \S+\[127\.0\.0\.1\]: 550 5\.1\.1 "
                                 r"<nobody-e2e@localhost>: Recipient address rejected: User unknown in local recipient "
                                 r"table; from=<sender@example\.org> to=<nobody-e2e@localhost>"))

        # A message with one known and one unknown recipient goes to the
        # known one only, and nothing bounces.
        with connect_smtp(port) as client:
            refused = client.sendmail("sender@example.org", ["alpha@localhost", "nobody-e2e@localhost"],
                                      b"Subject: half known\r\n\r\nhi\r\n")
        assert refused == {"nobody-e2e@localhost": (550, b"5.1.1 <nobody-e2e@localhost>: Recipient address rejected: "
                                                         b"User unknown in local recipient table")}
        wait_until(lambda: pipe.delivered("alpha"), 60, "the message in alpha's Maildir")

        # A new alias, a reload: the new local-deliver writes the table and
        # smtp-listen, which cannot read the aliases file, takes it.
        aliases.write_text("team: alpha\nsales: alpha\n")
        os.kill(pipe.process.pid, signal.SIGHUP)
        pipe.log_with(re.compile(r"local-deliver\[\d+\]: reloaded \(SIGHUP\)"),
                      re.compile(r"smtp-listen\[\d+\]: local recipient table loaded: 3 names"), timeout=60)
        assert rcpt_replies(port, ["sales@localhost"])["sales@localhost"][0] == 250
        assert "status=bounced" not in pipe.log_text()


def test_a_table_left_by_an_earlier_run_is_never_used(workdir):
    """A user added while Sealpost was stopped must not get a 550 from the
    last run's table: the supervisor removes it at start. Here
    local-deliver cannot start at all (its aliases file is malformed), so
    the old table would be used for as long as that lasts; smtp-listen
    starts at local-deliver's exit, without a table, and accepts every
    local part."""
    require_build("queue", "smtp-listen", "local-deliver")
    port = free_tcp_port()
    pipe = Pipeline(workdir, stages=STAGES, config_overrides={
        "listen": f'["127.0.0.1:{port}"]', "accounts": '"listed"', "users": '["alpha", "beta"]'})
    (workdir / "aliases").write_text("broken line without a colon\n")
    (pipe.data / "local").mkdir(parents=True)
    (pipe.data / "local" / "recipients").write_text("sealpost-local-recipients 1\nalpha\n")
    with running(pipe):
        pipe.log_with(re.compile(r"smtp-listen\[\d+\]: no local recipient table at \S+ yet"),
                      re.compile(r"stage local-deliver \(pid \d+\) exited with status 78"),
                      # It does not wait for a local-deliver that is not coming.
                      re.compile(r"local-deliver \(pid \d+\) (exited before it|closed its ready pipe without) "
                                 r"report(ed|ing) ready; starting stage smtp-listen"))
        assert not (pipe.data / "local" / "recipients").exists()
        assert rcpt_replies(port, ["beta@localhost"])["beta@localhost"][0] == 250


def test_without_local_deliver_every_local_part_is_accepted(workdir):
    require_build("queue", "smtp-listen")
    port = free_tcp_port()
    pipe = Pipeline(workdir, stages="queue queue\nsmtp-listen smtp-listen\n",
                    config_overrides={"listen": f'["127.0.0.1:{port}"]'})
    (pipe.data / "local").mkdir(parents=True)
    (pipe.data / "local" / "recipients").write_text("sealpost-local-recipients 1\nalpha\n")
    with running(pipe):
        pipe.log_with(re.compile(r"smtp-listen\[\d+\]: no local recipient table at \S+ yet"))
        assert not (pipe.data / "local" / "recipients").exists()
        assert rcpt_replies(port, ["nobody-e2e@localhost"])["nobody-e2e@localhost"][0] == 250


def test_the_check_can_be_turned_off(workdir):
    require_build("queue", "smtp-listen", "local-deliver")
    port = free_tcp_port()
    pipe = Pipeline(workdir, stages=STAGES, config_overrides={
        "listen": f'["127.0.0.1:{port}"]', "accounts": '"listed"', "users": '["alpha"]',
        "reject_unknown_local_recipients": "false"})
    with running(pipe):
        wait_until(lambda: (pipe.data / "local" / "recipients").exists(), 60, "local-deliver's table")
        assert rcpt_replies(port, ["nobody-e2e@localhost"])["nobody-e2e@localhost"][0] == 250
        assert "local recipient table" not in pipe.log_text()


def test_a_local_delivery_program_that_never_reports_ready_delays_smtp_listen_ten_seconds(workdir):
    """A program in local-deliver's place that ignores SEALPOST_READY_FD
    (here sleep(1), which neither reports nor exits) holds smtp-listen's
    first start for 10 s, no longer; connections of those seconds wait in
    the backlog and are then served."""
    require_build("queue", "smtp-listen")
    port = free_tcp_port()
    pipe = Pipeline(workdir, stages="queue queue\nsmtp-listen smtp-listen\nlocal-deliver /bin/sleep 600\n",
                    config_overrides={"listen": f'["127.0.0.1:{port}"]'})
    with running(pipe):
        # One connection, not retried: the port is bound before the wait,
        # so it waits in the backlog (refused, it would raise) and gets
        # its greeting once smtp-listen runs.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
            assert raw.recv(512).startswith(b"220 ")
        assert rcpt_replies(port, ["nobody-e2e@localhost"])["nobody-e2e@localhost"][0] == 250
        warning = "warning: local-deliver did not report ready within 10 s; starting stage smtp-listen"
        log = pipe.log_with(warning, "no local recipient table")
        assert log.index(f"bound smtp-{port} for smtp on 127.0.0.1:{port}") < log.index(warning)
        assert log.index("stage smtp-listen starts once local-deliver reported ready") < log.index(warning)
        assert log.index(warning) < log.index("started stage smtp-listen")
        assert pipe.status()["smtp-listen"][0] == "running"
