"""The supervisor: restarts, status, configuration errors, privileges, and
queue-inject's patience while the queue is away."""

import grp
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import (BUILD, CHECKOUT, IS_ROOT, Pipeline, as_user, executable, local_user, make_config,
                      parse_message, port_of, require_build, running, stages_without, wait_until)


def test_a_killed_stage_is_restarted_and_pipeline_status_shows_it(pipeline):
    old = pipeline.running_pid("queue")
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (p := pipeline.stage_pid("queue")) and p != old and p, 30,
                     "the queue to be restarted")
    state, pid, _, restarts = pipeline.status()["queue"]
    assert (state, pid) == ("running", new)
    assert restarts >= 1
    assert f"warning: stage queue (pid {old}) killed by signal 9; restarting in 1 s" in pipeline.log_text()
    pipeline.wait_for_queue()
    status = subprocess.run([str(CHECKOUT / "Pipeline" / "status")], env=pipeline.env(),
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"supervise pid {pipeline.process.pid}" in status.stdout
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines() if line.split()}
    assert lines["queue"][1:3] == ["running", str(new)]
    assert lines["local-deliver"][1] == "running"
    # And mail still flows.
    user = local_user()
    assert pipeline.queue_inject(f"{user}@localhost").returncode == 0
    wait_until(lambda: pipeline.delivered(user), 60, "delivery after the restart")


def test_the_stages_end_with_a_killed_supervisor_and_a_new_one_starts(workdir):
    """kill -9 of the supervisor: its stages stop too (SIGTERM from the
    kernel, PR_SET_PDEATHSIG) instead of running unsupervised with the
    spool lock and the ports, so the next supervisor, on the same
    configuration and ports, starts them all."""
    require_build("queue", "local-deliver", "queue-inject", "smtp-listen", "crypto-negotiate", "remote-deliver")
    user = local_user()
    pipe = Pipeline(workdir).start()
    names = pipe.stage_names()
    stages = {}

    def alive(pid):
        try:
            os.kill(pid, 0)
            # A zombie (not reaped: its parent is gone) has ended.
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            return False

    try:
        stages = {name: pipe.running_pid(name) for name in names}
        assert pipe.queue_inject(f"{user}@localhost", message=b"Subject: before\n\nx\n").returncode == 0
        wait_until(lambda: pipe.delivered(user), 60, "delivery before the kill")
        pipe.process.kill()
        pipe.process.wait()
        wait_until(lambda: not any(alive(pid) for pid in stages.values()), 60, "the stages to end")
    finally:
        pipe.stop()
        for pid in stages.values():   # what a failure left behind (each has a group of its own)
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)

    config = pipe.config.read_text()   # the same ports: the old stages must have let go of them
    again = Pipeline(workdir)
    again.config.write_text(config)
    with running(again):
        def all_running():
            status = again.status()
            return sorted(status) == sorted(names) and all(state[0] == "running" for state in status.values())

        wait_until(all_running, 60, "every stage running")
        assert again.queue_inject(f"{user}@localhost", message=b"Subject: after\n\nx\n").returncode == 0
        wait_until(lambda: len(again.delivered(user)) == 2, 60, "delivery after the new start")


def test_log_lines_are_timestamped_and_attributed(pipeline):
    pipeline.running_pid("local-deliver")
    text = pipeline.log_text()
    lines = text.splitlines()
    assert lines, "empty log"
    import re
    syslog = re.compile(r"^[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d \S+ [\w./-]+\[\d+\]: ")
    bad = [line for line in lines if not syslog.match(line)]
    assert not bad, bad[:5]
    assert re.search(r"supervise\[\d+\]: started stage queue \(pid \d+\)", text)


def test_sigterm_stops_the_stages_and_removes_the_pid_file(pipeline):
    pids = [pipeline.running_pid("queue"), pipeline.running_pid("local-deliver")]
    assert (pipeline.data / "supervise" / "supervise.pid").read_text().strip() == str(pipeline.process.pid)
    assert pipeline.stop() == 0
    for pid in pids:
        assert not pathlib.Path(f"/proc/{pid}").exists() or \
            "zombie" in pathlib.Path(f"/proc/{pid}/status").read_text()
    assert not (pipeline.data / "supervise" / "supervise.pid").exists()
    assert all(state[0] == "stopped" for state in pipeline.status().values())
    text = pipeline.log_text()
    # Reverse order of the stages file: local-deliver first, then the queue.
    after = text[text.index("received signal 15 (SIGTERM); stopping"):]
    assert after.index(f"stage local-deliver (pid {pids[1]})") < after.index(f"stage queue (pid {pids[0]})")
    assert "restarting" not in after


def test_sighup_is_forwarded_to_the_stages_and_reopens_the_log(pipeline):
    pids = {name: pipeline.running_pid(name) for name in ("queue", "local-deliver", "crypto-negotiate")}
    # crypto-negotiate takes SIGHUP once it is ready (before, SIGHUP would
    # still be fatal to it, and the supervisor rightly spares it).
    wait_until(lambda: re.search(r"crypto-negotiate\[\d+\]: listening on", pipeline.log_text()), 60,
               "crypto-negotiate to be ready")
    rotated = pipeline.log_file.with_suffix(".log.1")
    pipeline.log_file.rename(rotated)
    pipeline.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "received SIGHUP" in pipeline.log_text(), 30, "the SIGHUP line in the new log")
    assert "received SIGHUP" not in rotated.read_text()
    # Forwarded to the stages that handle it (crypto-negotiate reloads its
    # certificates); the others, for which it would be fatal, are spared:
    # a log rotation restarts nothing.
    line = next(l for l in pipeline.log_text().splitlines() if "received SIGHUP" in l)
    assert "forwarded to crypto-negotiate" in line, line
    assert "(not to queue" in line and "SIGHUP would terminate them" in line, line
    # local-deliver is reloaded instead (test_local_reload): a new instance
    # reads its files, the old one finishes its deliveries and exits 0.
    assert "reloading local-deliver by replacing it" in line, line
    pipeline.log_with(re.compile(rf"reloaded stage local-deliver: pid \d+ replaces pid {pids['local-deliver']},"))
    user = local_user()
    assert pipeline.queue_inject(f"{user}@localhost").returncode == 0
    wait_until(lambda: pipeline.delivered(user), 60, "delivery after the SIGHUP")
    kept = {name: pid for name, pid in pids.items() if name != "local-deliver"}
    assert {name: pipeline.stage_pid(name) for name in kept} == kept
    assert "killed by signal 1" not in pipeline.log_text() + rotated.read_text()


def bad_config(workdir, key, value):
    path = make_config(workdir, workdir / "data", {key: value})
    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.startswith(f"{key} ="))
    return path, line


def test_a_bad_configuration_names_file_line_and_key_and_starts_nothing(workdir):
    require_build()
    path, line = bad_config(workdir, "minimal_backoff_time", '"5x"')
    env = dict(os.environ, SEALPOST_CONFIG=str(path))
    result = subprocess.run([executable("supervise"), "--foreground"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert f"{path}:{line}:" in result.stderr
    assert "queue.minimal_backoff_time" in result.stderr
    assert not (workdir / "data").exists(), "something started"
    # Pipeline/start refuses the same way (it builds first: up to date here).
    start = subprocess.run([str(CHECKOUT / "Pipeline" / "start")], env=env,
                           capture_output=True, text=True, timeout=1200)
    assert start.returncode != 0
    assert f"{path}:{line}:" in start.stderr and "queue.minimal_backoff_time" in start.stderr
    assert not (workdir / "data").exists(), "something started"


def test_pipeline_start_fails_when_a_stage_cannot_start(workdir):
    """The SMTP port is held by another program: Pipeline/start says which
    stage does not run and why, and exits 1 instead of "running"."""
    require_build("queue", "smtp-listen")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = make_config(workdir, workdir / "data", {"listen": f'["127.0.0.1:{port}"]'})
        env = dict(os.environ, SEALPOST_CONFIG=str(path))
        try:
            start = subprocess.run([str(CHECKOUT / "Pipeline" / "start")], env=env,
                                   capture_output=True, text=True, timeout=1200)
            assert start.returncode == 1, start
            assert "not every stage is up" in start.stderr and "smtp-listen: restarting" in start.stderr, start.stderr
            assert f"cannot listen for smtp on 127.0.0.1:{port}: bind: Address already in use" in start.stderr, start.stderr
            # Asked again, it does not call the half-started pipeline fine either.
            again = subprocess.run([str(CHECKOUT / "Pipeline" / "start")], env=env,
                                   capture_output=True, text=True, timeout=1200)
            assert again.returncode == 1 and "already running" in again.stdout, again
            assert "smtp-listen: restarting" in again.stderr, again.stderr
        finally:
            stop = subprocess.run([str(CHECKOUT / "Pipeline" / "stop")], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop


def test_a_bad_stages_file_names_file_and_line(workdir):
    require_build()
    path = make_config(workdir, workdir / "data")
    stages = workdir / "stages"
    stages.write_text("# stages\nqueue queue\nQueue queue\n")
    env = dict(os.environ, SEALPOST_CONFIG=str(path))
    result = subprocess.run([executable("supervise"), "--stages", str(stages)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert f"{stages}:3: bad stage name" in result.stderr
    stages.write_text("queue no-such-program\n")
    result = subprocess.run([executable("supervise"), "--stages", str(stages)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert f"{stages}:1: stage \"queue\": cannot execute {os.path.realpath(BUILD)}/no-such-program" in result.stderr
    assert not (workdir / "data").exists()


def test_queue_inject_waits_for_a_queue_that_comes_late(workdir):
    require_build("queue", "local-deliver", "queue-inject")
    late = workdir / "late-queue"
    late.write_text(f"#!/bin/sh\n# The queue, 3 s late.\nsleep 3\nexec {executable('queue')} \"$@\"\n")
    late.chmod(0o755)
    pipeline = Pipeline(workdir, stages=f"queue {late}\nlocal-deliver local-deliver\n").start(wait=False)
    try:
        user = local_user()
        result = pipeline.queue_inject(f"{user}@localhost", message=b"Subject: patience\n\nwaited\n")
        assert result.returncode == 0, result.stderr.decode()
        files = wait_until(lambda: pipeline.delivered(user), 60, "the message sent before the queue ran")
        assert parse_message(files[0])["Subject"] == "patience"
    finally:
        assert pipeline.stop() == 0


def test_queue_inject_gives_up_with_75_when_no_queue_comes(workdir):
    require_build("queue-inject")
    path = make_config(workdir, workdir / "data")
    (workdir / "data" / "run").mkdir(parents=True)
    env = dict(os.environ, SEALPOST_CONFIG=str(path), SEALPOST_INJECT_WAIT="2")
    started = time.monotonic()
    result = subprocess.run([executable("queue-inject"), "someone@localhost"], input=b"Subject: x\n\ny\n",
                            env=env, capture_output=True, timeout=120)
    assert result.returncode == 75, result.stderr
    assert time.monotonic() - started >= 2


def test_queue_inject_gives_up_on_a_queue_that_does_not_answer(pipeline):
    # A queue that is alive but stuck (here stopped) must not keep a cron
    # job waiting forever: each step waits SEALPOST_INJECT_TIMEOUT, then
    # the attempt counts as failed, and after SEALPOST_INJECT_WAIT of
    # attempts queue-inject exits 75 (EX_TEMPFAIL).
    queue = pipeline.running_pid("queue")
    os.kill(queue, signal.SIGSTOP)
    try:
        result = pipeline.queue_inject(f"{local_user()}@localhost", timeout=60,
                                       SEALPOST_INJECT_TIMEOUT="0.5", SEALPOST_INJECT_WAIT="1")
    finally:
        os.kill(queue, signal.SIGCONT)
    assert result.returncode == 75, result.stderr
    assert b"Connection timed out" in result.stderr or b"Resource temporarily unavailable" in result.stderr, result.stderr


def uid_of(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(value) for value in line.split()[1:]]
    raise AssertionError(f"no Uid in /proc/{pid}/status")


@pytest.mark.skipif(not IS_ROOT, reason="privilege separation needs root")
def test_as_root_each_stage_runs_as_its_own_user(pipeline):
    for name in ("queue", "local-deliver"):
        pid = pipeline.running_pid(name)
        entry = pwd.getpwnam(f"sealpost-{name}")
        # A stage starts as root and drops its privileges itself, soon.
        wait_until(lambda: uid_of(pid) == [entry.pw_uid] * 4, 30, f"{name} (pid {pid}) to become {entry.pw_name}")
        assert entry.pw_dir == "/nonexistent"
        assert entry.pw_shell.endswith("nologin")
    run = os.stat(pipeline.data / "run")
    assert oct(run.st_mode & 0o7777) == "0o755"
    assert run.st_uid == pwd.getpwnam("sealpost-queue").pw_uid
    assert run.st_gid == grp.getgrnam("sealpost").gr_gid
    # The queue made its sockets there after dropping root; no other
    # stage's user can add a file (and so take a socket's name while the
    # queue restarts).
    wait_until(lambda: (pipeline.data / "run" / "inject").is_socket(), 30, "the inject socket")
    assert os.stat(pipeline.data / "run" / "inject").st_uid == pwd.getpwnam("sealpost-queue").pw_uid
    others = [name for name in pipeline.stage_names() if name != "queue"]
    assert "local-deliver" in others
    for name in others:
        squat = subprocess.run(as_user(f"sealpost-{name}", ["touch", str(pipeline.data / "run" / "squat")], "init"),
                               capture_output=True, text=True)
        assert squat.returncode != 0 and "Permission denied" in squat.stderr, (name, squat)
    assert not (pipeline.data / "run" / "squat").exists()
    # The log names every address: root's alone.
    log = pipeline.data / "log"
    assert oct(os.stat(log).st_mode & 0o7777) == "0o750" and os.stat(log).st_uid == 0
    assert oct(os.stat(log / "sealpost.log").st_mode & 0o777) == "0o640"
    for name in others:
        peek = subprocess.run(as_user(f"sealpost-{name}", ["cat", str(log / "sealpost.log")], "init"),
                              capture_output=True, text=True)
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, (name, peek)
    assert os.stat(pipeline.data / "queue").st_uid == pwd.getpwnam("sealpost-queue").pw_uid
    assert os.stat(pipeline.data / "mail").st_uid == pwd.getpwnam("sealpost-local-deliver").pw_uid
    # Still works end to end with the separated users.
    assert pipeline.queue_inject("root@localhost").returncode == 0
    wait_until(lambda: pipeline.delivered("root"), 60, "delivery to root")


@pytest.mark.skipif(not IS_ROOT, reason="switching to an unprivileged user needs root (as a user, every test runs unprivileged)")
def test_as_a_normal_user_everything_runs_as_that_user(workdir):
    """The same pipeline started by an unprivileged user: no users created,
    directories owned by that user, mail delivered to that user."""
    require_build("queue", "local-deliver", "queue-inject")
    user = "nobody"
    entry = pwd.getpwnam(user)
    os.chown(workdir, entry.pw_uid, entry.pw_gid)
    if not os.access(executable("supervise"), os.X_OK) or \
            subprocess.run(as_user(user, ["test", "-x", executable("queue")])).returncode != 0:
        pytest.skip(f"{BUILD} is not readable by {user}")
    pipeline = Pipeline(workdir, run_as=user)
    for path in workdir.iterdir():
        os.chown(path, entry.pw_uid, entry.pw_gid)
    pipeline.start()
    try:
        for name in ("queue", "local-deliver"):
            assert uid_of(pipeline.running_pid(name))[0] == entry.pw_uid
        assert os.stat(pipeline.data / "run").st_uid == entry.pw_uid
        result = subprocess.run(as_user(user, [executable("queue-inject"), f"{user}@localhost"]),
                                input=b"Subject: plain\n\nuser\n",
                                env=pipeline.env(), capture_output=True, timeout=120)
        assert result.returncode == 0, result.stderr.decode()
        files = wait_until(lambda: pipeline.delivered(user), 60, f"delivery to {user}")
        assert parse_message(files[0])["Subject"] == "plain"
        assert os.stat(files[0]).st_uid == entry.pw_uid
    finally:
        assert pipeline.stop() == 0


def socket_inodes(pid):
    """{fd: inode} of the sockets a process holds."""
    result = {}
    for entry in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            result[int(entry.name)] = int(target[len("socket:["):-1])
    return result


def environ_of(pid):
    """The environment a process was started with (/proc/PID/environ: what
    execve gave it, whatever it unset since)."""
    raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def free_privileged_address():
    """A loopback address where ports 25 and 587 are free (127.0.0.0/8 is
    all loopback on Linux); each test run takes its own."""
    import socket
    for last in range(47, 250):
        address = f"127.0.{os.getpid() % 200}.{last}"
        try:
            for port in (25, 587):
                with socket.socket() as probe:
                    probe.bind((address, port))
            return address
        except OSError:
            continue
    pytest.skip("no loopback address with ports 25 and 587 free")


@pytest.mark.skipif(not IS_ROOT, reason="binding ports below 1024 needs root")
def test_smtp_listen_adopts_privileged_sockets_the_supervisor_bound(workdir):
    """The supervisor (root) binds port 25 and 587 and hands them over as
    systemd does (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES); smtp-listen runs as
    its own user and serves them; when it dies, the supervisor keeps the
    sockets, so a connection made while smtp-listen is down waits instead of
    being refused, and is served by the next instance."""
    import smtplib
    import socket
    require_build("queue", "local-deliver", "smtp-listen", "crypto-negotiate")
    address = free_privileged_address()
    pipeline = Pipeline(workdir, config_overrides={
        "listen": f'["{address}:25"]', "submission": f'["{address}:587"]'})
    pipeline.start()
    try:
        pid = pipeline.running_pid("smtp-listen")
        wait_until(lambda: f"listening for submission on {address}:587" in pipeline.log_text(), 60,
                   "smtp-listen to listen")
        # Its own user, with no way back to root.
        entry = pwd.getpwnam("sealpost-smtp-listen")
        assert uid_of(pid) == [entry.pw_uid] * 4
        # Socket-activated: LISTEN_PID is its own pid (written by the child
        # between fork and exec), the names say kind and port.
        environment = environ_of(pid)
        assert environment["LISTEN_PID"] == str(pid)
        assert environment["LISTEN_FDS"] == "3"   # smtp, submission, smtps (a certificate is configured)
        names = environment["LISTEN_FDNAMES"].split(":")
        assert names[:2] == ["smtp-25", "submission-587"] and names[2].startswith("smtps-")
        text = pipeline.log_text()
        assert f"adopted listening socket 3 (smtp-25) for smtp on {address}:25" in text
        assert f"adopted listening socket 4 (submission-587) for submission on {address}:587" in text
        assert f"bound smtp-25 for smtp on {address}:25" in text
        # The descriptors 3 and 4 of smtp-listen are sockets the supervisor holds.
        inherited = socket_inodes(pid)
        held = set(socket_inodes(pipeline.process.pid).values())
        assert inherited[3] in held and inherited[4] in held
        # Mail on port 25 flows to the Maildir.
        with smtplib.SMTP(address, 25, timeout=60) as client:
            client.sendmail("a@example.org", ["root@localhost"], b"Subject: port 25\r\n\r\nactivated\r\n")
        files = wait_until(lambda: pipeline.delivered("root"), 60, "delivery to root")
        assert parse_message(files[0])["Subject"] == "port 25"

        # smtp-listen dies. Every connection attempt until the next one runs
        # must be accepted by the kernel (the supervisor's socket keeps
        # listening), and at least one is made while no smtp-listen exists.
        os.kill(pid, signal.SIGKILL)
        waiting = []
        while True:
            state, current, _, _ = pipeline.status()["smtp-listen"]
            if state == "running" and current != pid:
                break
            connection = socket.create_connection((address, 25), timeout=60)   # refused: ConnectionRefusedError
            waiting.append((connection, state))
            time.sleep(0.02)
        assert any(state == "restarting" for _, state in waiting), "no connection made while smtp-listen was down"
        for connection, _ in waiting:
            reader = connection.makefile("rb")
            assert reader.readline().startswith(b"220 "), "the next smtp-listen greets the waiting client"
            connection.sendall(b"QUIT\r\n")
            assert reader.readline().startswith(b"221 ")
            reader.close()
            connection.close()
        new = pipeline.running_pid("smtp-listen")
        assert environ_of(new)["LISTEN_PID"] == str(new)
        assert socket_inodes(new)[3] == inherited[3], "the same listening socket again"
    finally:
        assert pipeline.stop() == 0


@pytest.mark.skipif(not IS_ROOT, reason="stage users need root")
def test_a_local_user_cannot_pass_a_message_off_as_one_from_the_network(pipeline):
    # The inject socket is open to every local user, who may claim any
    # client address: the queue's log line then names the uid as well.
    from stageproto import ACCEPTED, BODY, END, MAIL, RCPT, Injector
    nobody = pwd.getpwnam("nobody").pw_uid
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([])
            os.setgid(pwd.getpwnam("nobody").pw_gid)
            os.setuid(nobody)
            injector = Injector(str(pipeline.inject_socket))
            injector.send(MAIL, [("sender", "forged@example.org"), ("protocol", "ESMTP"),
                              ("client-address", "203.0.113.5"), ("client-name", "mx.example.net")])
            injector.send(RCPT, [("address", f"{local_user()}@localhost")])
            injector.send(BODY, [("data", b"Subject: forged\r\n\r\nbody\r\n")])
            injector.send(END)
            frame_type, _ = injector.receive()
            os._exit(0 if frame_type == ACCEPTED else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0
    pipeline.log_with(f"client=mx.example.net[203.0.113.5] uid={nobody} from=<forged@example.org>")


@pytest.mark.skipif(not IS_ROOT, reason="destroying another process's socket (ss -K) needs CAP_NET_ADMIN")
def test_a_listening_socket_the_kernel_ended_is_bound_again(pipeline):
    """`ss -K` (SOCK_DESTROY) ends smtp-listen's SMTP listener, which the
    supervisor holds: accept(2) fails with EINVAL from then on, smtp-listen
    exits 71 to be started again, and the supervisor, instead of handing
    the dead socket to every next instance for ever, binds the port again.
    Mail then flows on that port as before."""
    import smtplib
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    port = port_of(pipeline, "listen")
    old = pipeline.running_pid("smtp-listen")
    # A session first: smtp-listen's accept loop is running. (A socket
    # destroyed before smtp-listen starts accepting is listened on again by
    # its own listen(2) at adoption, and no restart happens.)
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.noop()
    killed = subprocess.run(["ss", "-K", "-t", "-l", "src", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == 0, killed.stderr
    if f":{port}" not in killed.stdout:
        pytest.skip("the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY)")
    wait_until(lambda: f"stage smtp-listen (pid {old}) exited with status 71" in pipeline.log_text(), 60,
               "smtp-listen to exit 71")
    wait_until(lambda: "no longer listened: bound again" in pipeline.log_text(), 60,
               "the supervisor to bind the port again")
    new = wait_until(lambda: (p := pipeline.stage_pid("smtp-listen")) and p != old and p, 60,
                     "smtp-listen to be started again")
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.sendmail("a@example.org", [f"{local_user()}@localhost"],
                        b"Subject: after ss -K\r\n\r\nthe port was bound again\r\n")
    files = wait_until(lambda: pipeline.delivered(local_user()), 60, "delivery")
    assert parse_message(files[0])["Subject"] == "after ss -K"
    assert pipeline.running_pid("smtp-listen") == new, "no restart loop"


def test_a_restart_with_a_backlog_does_not_report_every_message_suspended(workdir):
    """The delivery stages start after the queue. A start with messages
    waiting used to log each of them as deferred ("delivery temporarily
    suspended: no local-deliver stage connected") in the moment before
    local-deliver connected; the queue now waits for a transport to have no
    stage for 10 s before saying so."""
    require_build("queue", "local-deliver", "queue-inject", "smtp-listen", "crypto-negotiate", "remote-deliver")
    user = local_user()
    with running(Pipeline(workdir, stages=stages_without("local-deliver", "remote-deliver"))) as pipe:
        for n in range(3):
            assert pipe.queue_inject(f"{user}@localhost").returncode == 0
        assert "temporarily suspended" not in pipe.log_text()
    with running(Pipeline(workdir)) as pipe:
        files = wait_until(lambda: (f := pipe.delivered(user)) and len(f) == 3 and f, 60, "the backlog delivered")
        assert len(files) == 3
        assert "temporarily suspended" not in pipe.log_text()


def test_one_supervisor_per_data_directory_even_without_its_pid_file(pipeline):
    """The pid file check leaves a window between two starts; the lock on
    supervise/supervise.lock does not: with the pid file gone (as between
    the check and the write of a second start), a second supervisor for
    the same data directory exits 75 and starts nothing."""
    pid_file = pipeline.data / "supervise" / "supervise.pid"
    assert pid_file.exists()
    table = pipeline.data / "local" / "recipients"
    wait_until(table.exists, 60, "local-deliver's recipient table")
    pid_file.unlink()
    second = subprocess.run([executable("supervise"), "--foreground", "--stages", str(pipeline.stages_file)],
                            env=pipeline.env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert second.returncode == 75, second
    assert "already running" in second.stderr + second.stdout, second
    # It changed nothing first (each start removes local/recipients, which
    # the running local-deliver wrote), and the first one goes on.
    assert table.exists()
    assert pipeline.process.poll() is None
    assert pipeline.accepting()
