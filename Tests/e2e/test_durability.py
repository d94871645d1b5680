"""Durable acceptance, and storage that fails under the spool and the Maildirs.

The 250 to the end of data follows the queue's completed sync (strace of
the queue and smtp-listen together). A full disk under the spool: every injection path gets 452 4.3.1 (never a
250, never a lost message), the queue keeps running and takes mail again as
soon as there is room, and every message it accepted is delivered once.
A full disk under the Maildirs: local-deliver defers (4.3.1), leaves nothing
half written, and delivers each message once when there is room. A failing
fdatasync (libfiu): 451 4.3.0, never a 250, and the queue goes on once the
disk syncs again.

Needs root: a small tmpfs is mounted for the disk-full tests, so that the disk
really fills (ENOSPC from the kernel, not a limit of Sealpost's own); the
fdatasync test sets up a pipeline that runs as "nobody"."""

import contextlib
import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess

import pytest

from conftest import CHECKOUT, IS_ROOT, SEQUENCE, Pipeline, as_user, executable, local_user, make_message, \
    port_of, require_build, running, sequences_delivered, stages_without, wait_until

# 64 KiB of body per message: the 8 MiB spool fills after about a hundred.
PADDING = (b"x" * 998 + b"\r\n") * 64


@contextlib.contextmanager
def small_disk(directory, size):
    """A tmpfs of `size` on `directory` (created), a disk that fills."""
    if not IS_ROOT:
        pytest.skip(f"needs root: mounts a tmpfs on {directory.name}/")
    directory.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def small_spool(workdir):
    with small_disk(workdir / "data" / "queue", "8m") as spool:
        yield spool


def test_a_full_disk_refuses_with_452_and_loses_nothing(workdir, small_spool):
    require_build("queue", "local-deliver", "queue-inject", "smtp-listen")
    user = local_user()
    # Room that the test frees later, as an administrator would.
    filler = small_spool / "filler"
    filler.write_bytes(b"\0" * (2 << 20))
    # No delivery stage: what is accepted stays in the spool and fills it.
    accepted = []
    with running(Pipeline(workdir, stages=stages_without("local-deliver", "remote-deliver"))) as pipe:
        sequence = 0
        refusals = []
        while len(refusals) < 3:
            assert sequence < 1000, "8 MiB never filled up"
            result = pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost",
                                       message=make_message(sequence, user) + PADDING)
            if result.returncode == 0:
                assert not refusals, "accepted after a refusal while the disk is still full"
                accepted.append(sequence)
            else:
                refusals.append((result.returncode, result.stderr.decode(errors="replace")))
            sequence += 1
        assert accepted, "nothing fit in the spool"
        for code, stderr in refusals:
            assert code == 75, refusals   # EX_TEMPFAIL: the sender keeps it and tries later
            assert "452 4.3.1" in stderr, refusals

        # The same over SMTP: the reply to the end of data is 452 4.3.1.
        with smtplib.SMTP("127.0.0.1", port_of(pipe, "listen"), timeout=60) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("sender@localhost", [f"{user}@localhost"], make_message(sequence, user) + PADDING)
            assert refused.value.smtp_code == 452
            assert refused.value.smtp_error.startswith(b"4.3.1"), refused.value.smtp_error
        sequence += 1

        # The queue still runs and answers the administrator.
        assert pipe.status()["queue"][3] == 0, pipe.status()   # no restart
        listing = pipe.sealpost("queue", "list")
        assert listing.returncode == 0, listing.stderr
        pipe.log_with("spool full")

        # Room again: the next message is taken without a restart.
        filler.unlink()
        result = pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost",
                                   message=make_message(sequence, user) + PADDING)
        assert result.returncode == 0, result.stderr
        accepted.append(sequence)

    # The whole pipeline on the same data: each accepted message once.
    with running(Pipeline(workdir)) as pipe:
        wait_until(lambda: len(sequences_delivered(pipe, user)) >= len(accepted), 120,
                   f"{len(accepted)} messages in the Maildir")
        delivered = sequences_delivered(pipe, user)
        assert sorted(delivered) == accepted, (sorted(delivered), accepted)
        assert set(delivered.values()) == {1}, delivered


def test_a_full_mailbox_disk_defers_and_delivers_each_message_once_when_there_is_room(workdir):
    require_build("queue", "local-deliver", "queue-inject")
    user = local_user()
    with small_disk(workdir / "data" / "mail", "1m"), running(Pipeline(workdir)) as pipe:
        count = 30   # 64 KiB each: about 15 fit in 1 MiB
        for sequence in range(count):
            result = pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost",
                                       message=make_message(sequence, user) + PADDING)
            assert result.returncode == 0, result.stderr
        deferral = re.compile(r"local-deliver\[\d+\]: \w+: to=<[^>]+>, relay=local, delay=\d+, dsn=4\.3\.1, "
                              r"status=deferred \(cannot write .*No space left on device\)")
        wait_until(lambda: deferral.search(pipe.log_text()), 60, "a deferral for the full disk")
        maildir = pipe.maildir_new(user).parent
        # Nothing half-written is left behind in tmp/ (a retry may be
        # writing there at this moment: it must clean up after itself).
        wait_until(lambda: not list((maildir / "tmp").iterdir()), 60, "an empty tmp/")
        # The user makes room: the delivered files go elsewhere (another
        # file system: the tmpfs is what is full).
        kept = workdir / "kept"
        kept.mkdir()
        for path in pipe.delivered(user):
            shutil.move(str(path), str(kept / path.name))
        early = {}
        for path in kept.iterdir():
            number = int(SEQUENCE.search(path.read_bytes()).group(1))
            early[number] = early.get(number, 0) + 1
        assert 0 < len(early) < count and set(early.values()) == {1}, early
        # A flush retries the deferred ones at once.
        flushed = pipe.sealpost("queue", "flush")
        assert flushed.returncode == 0, flushed.stderr
        wait_until(lambda: len(sequences_delivered(pipe, user)) >= count - len(early), 120,
                   "the deferred messages in the Maildir")
        late = sequences_delivered(pipe, user)
        assert set(early).isdisjoint(late) and set(early) | set(late) == set(range(count)), (early, late)
        assert set(late.values()) == {1}, late
        assert list((maildir / "tmp").iterdir()) == []

FIU_RUN = shutil.which("fiu-run") or "/usr/bin/fiu-run"
FIU_CTRL = shutil.which("fiu-ctrl") or "/usr/bin/fiu-ctrl"
FDATASYNC = "posix/io/sync/fdatasync"


def test_a_failing_fdatasync_gets_451_never_250_and_the_queue_goes_on(workdir):
    """The queue runs under libfiu's fiu-run; fiu-ctrl makes every
    fdatasync(2) fail (EIO and the other errors POSIX allows), then stops.
    The pipeline runs as "nobody": a chrooted queue could not reopen
    fiu-run's control FIFOs, which live outside its root."""
    if not IS_ROOT:
        pytest.skip("needs root: runs the pipeline as nobody")
    if not (os.access(FIU_RUN, os.X_OK) and os.access(FIU_CTRL, os.X_OK)):
        pytest.skip("libfiu's fiu-run is missing (Debian: fiu-utils, which Pipeline/test installs)")
    require_build("queue", "local-deliver", "queue-inject", "smtp-listen")
    user = "nobody"
    entry = pwd.getpwnam(user)
    if subprocess.run(as_user(user, ["test", "-x", executable("queue")])).returncode != 0:
        pytest.skip(f"{executable('queue')} is not readable by {user}")
    os.chown(workdir, entry.pw_uid, entry.pw_gid)
    control = workdir / "fiu"
    stages = "\n".join(f"queue {FIU_RUN} -x -f {control} {executable('queue')}" if line.split()[:1] == ["queue"] else line
                       for line in (CHECKOUT / "Pipeline" / "stages").read_text().splitlines())
    pipe = Pipeline(workdir, stages=stages, run_as=user)
    for path in workdir.iterdir():
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def inject(sequence):
        return subprocess.run(as_user(user, [executable("queue-inject"), "-f", "sender@localhost", f"{user}@localhost"]),
                              input=make_message(sequence, user), env=pipe.env(), capture_output=True, timeout=120)

    def fail_syncs(command):
        result = subprocess.run([FIU_CTRL, "-f", str(control), "-c", f"{command} name={FDATASYNC}",
                                 str(pipe.running_pid("queue"))], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    with running(pipe):
        assert inject(0).returncode == 0
        fail_syncs("enable")
        for sequence in (1, 2, 3):
            result = inject(sequence)
            assert result.returncode == 75, result   # EX_TEMPFAIL: the sender keeps the message
            assert b"451 4.3.0" in result.stderr, result.stderr
        with smtplib.SMTP("127.0.0.1", port_of(pipe, "listen"), timeout=60) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("sender@localhost", [f"{user}@localhost"], make_message(4, user))
            assert refused.value.smtp_code == 451 and refused.value.smtp_error.startswith(b"4.3.0"), refused.value
        pipe.log_with("cannot queue the message: spool I/O error: mdb_txn_commit")
        fail_syncs("disable")
        # The same process, no restart: the disk syncs, mail is taken again.
        assert pipe.status()["queue"][3] == 0, pipe.status()
        assert inject(5).returncode == 0
        wait_until(lambda: len(sequences_delivered(pipe, user)) >= 2, 60, "the two accepted messages")
        # Only what got its 0 (or 250) is delivered, each once.
        assert sequences_delivered(pipe, user) == {0: 1, 5: 1}


def test_a_meta_page_write_that_fails_restarts_the_queue_from_the_last_commit(workdir):
    """LMDB writes a commit's meta page last, with pwrite(2) on a descriptor
    opened O_DSYNC; when that write fails it gives up on the environment
    (every later transaction: MDB_PANIC). The queue then answers the
    message 451 (never 250), exits 74 and is started again by the
    supervisor, which reopens the spool at the last commit on disk: mail
    is taken again, and what was accepted before is delivered once. Before,
    the queue ran on refusing every message and delivering nothing. The
    fault: meta_write_fault.c, preloaded into the queue (libfiu cannot
    fail the meta page's pwrite alone: LMDB writes single data pages with
    pwrite too)."""
    compiler = shutil.which("cc") or shutil.which("clang")
    if not compiler:
        pytest.skip("no C compiler for the preloaded fault")
    require_build("queue", "local-deliver", "queue-inject")
    fault = workdir / "meta_write_fault.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(fault),
                    str(CHECKOUT / "Tests" / "e2e" / "meta_write_fault.c"), "-ldl"], check=True)
    os.chmod(fault, 0o755)
    # As root the queue runs chrooted in its data directory, where the
    # fault finds "fail-meta-write" by a relative path; otherwise it is
    # told the absolute one.
    trigger = workdir / "data" / "fail-meta-write"
    environment = f"LD_PRELOAD={fault}" + ("" if IS_ROOT else f" SEALPOST_FAULT_TRIGGER={trigger}")
    stages = "\n".join(f"queue /usr/bin/env {environment} {executable('queue')}" if line.split()[:1] == ["queue"] else line
                       for line in (CHECKOUT / "Pipeline" / "stages").read_text().splitlines()
                       if line.split()[:1] != ["remote-deliver"])
    pipe = Pipeline(workdir, stages=stages)
    assert pipe.data == trigger.parent
    user = local_user()

    def inject(sequence):
        return pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost", message=make_message(sequence, user),
                                 SEALPOST_INJECT_WAIT="0")

    with running(pipe):
        assert inject(0).returncode == 0
        wait_until(lambda: sequences_delivered(pipe, user) == {0: 1}, 60, "the first message")
        # Its removal committed (a removal may wait for the next commit, and
        # one lost with it means a second delivery, by design).
        pipe.log_with(re.compile(r"queue\[\d+\]: [0-9A-F]+: removed"))
        first = pipe.running_pid("queue")
        trigger.write_text(f"{first}\n")
        os.chmod(trigger, 0o644)
        failed = inject(1)
        assert failed.returncode == 75, failed   # EX_TEMPFAIL: the sender keeps the message
        assert b"250" not in failed.stderr, failed.stderr
        pipe.log_with("spool unusable: the last commit's meta page was not written",
                      "stopping, to start again from the last commit on disk")
        wait_until(lambda: pipe.stage_pid("queue") not in (None, first), 60, "the supervisor to start the queue again")
        wait_until(lambda: inject(2).returncode == 0, 60, "the new queue to take mail")
        wait_until(lambda: 2 in sequences_delivered(pipe, user), 60, "the message after the restart")
        assert sequences_delivered(pipe, user) == {0: 1, 2: 1}


STRACE = shutil.which("strace") or "/usr/bin/strace"


def o_dsync_descriptors(pid):
    """The queue's descriptors opened with O_DSYNC (LMDB writes its meta
    page through one: that write is the commit's last, durable step)."""
    found = set()
    for entry in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{entry}") as info:
                flags = next(line for line in info if line.startswith("flags:")).split()[1]
        except FileNotFoundError:   # closed meanwhile
            continue
        if int(flags, 8) & os.O_DSYNC:
            found.add(int(entry))
    return found


def threads(pid):
    return set(map(int, os.listdir(f"/proc/{pid}/task")))


def test_the_250_follows_the_queue_s_completed_sync(pipeline):
    """strace of both processes in one output, in the order the kernel saw
    the calls: the message reaches the queue (smtp-listen's write to the
    inject socket), the queue's fdatasync returns 0 and its O_DSYNC meta
    page write returns, then the queue writes ACCEPTED, and only then does
    smtp-listen write the 250."""
    if not os.access(STRACE, os.X_OK):
        pytest.skip("strace is missing (Pipeline/test installs it)")
    require_build("smtp-listen")
    queue, listen = pipeline.running_pid("queue"), pipeline.running_pid("smtp-listen")
    queue_threads, listen_threads = threads(queue), threads(listen)
    meta = o_dsync_descriptors(queue)
    assert meta, "the queue holds no O_DSYNC descriptor (LMDB's meta page)"
    output, messages = pipeline.directory / "strace.out", pipeline.directory / "strace.err"
    with open(messages, "wb") as errors:
        # -s 4096: smtp-listen sends the whole small message to the queue
        # in one buffer (envelope, Received header, body, END), and the
        # marker below must be within what strace shows of it. sendto:
        # smtp-listen sends its replies and inject frames with send(2)
        # while the socket takes them at once (DirectSocketWriter).
        tracer = subprocess.Popen([STRACE, "-f", "-s", "4096", "-o", str(output),
                                   "-e", "trace=fdatasync,pwrite64,write,writev,sendmsg,sendto",
                                   "-p", str(queue), "-p", str(listen)], stderr=errors)
    try:
        wait_until(lambda: all(f"Process {pid} attached" in messages.read_text() for pid in (queue, listen))
                   or tracer.poll() is not None, 30, "strace to attach")
        if tracer.poll() is not None:
            if "Operation not permitted" in messages.read_text():
                pytest.skip(f"strace may not attach here: {messages.read_text().strip()}")
            raise AssertionError(messages.read_text())
        marker = "durable-order-" + os.urandom(6).hex()
        with smtplib.SMTP("127.0.0.1", port_of(pipeline, "listen"), timeout=60) as client:
            client.sendmail("sender@localhost", [f"{local_user()}@localhost"],
                            f"Subject: {marker}\r\n\r\nbody\r\n".encode())
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
    lines = output.read_text(errors="replace").splitlines()
    # strace -f names each thread by its ID: those from before and after.
    queue_threads |= threads(queue)
    listen_threads |= threads(listen)

    def thread(line):
        return int(line.split(None, 1)[0])

    def completed(index, threads, call, descriptor=None):
        """Whether line `index` is where `call` of one of `threads`
        returned a success."""
        line = lines[index]
        if thread(line) not in threads:
            return False
        whole = re.search(rf"\b{call}\((\d+)\b.*\)\s+=\s+\d+$", line)
        resumed = re.search(rf"<\.\.\. {call} resumed>.*\s=\s+\d+$", line)
        if whole:
            return descriptor is None or int(whole.group(1)) in descriptor
        if resumed:
            # The descriptor is on the same thread's "unfinished" line.
            for earlier in range(index - 1, -1, -1):
                start = re.match(rf"{thread(line)} +{call}\((\d+)", lines[earlier])
                if start:
                    return descriptor is None or int(start.group(1)) in descriptor
        return False

    sent = next(i for i, line in enumerate(lines) if thread(line) in listen_threads and marker in line)
    reply = next(i for i, line in enumerate(lines)
                 if i > sent and thread(line) in listen_threads and "250 2.0.0 Ok: queued as" in line)
    queue_id = re.search(r"queued as ([0-9A-F]{12})", lines[reply]).group(1)
    # The queue's ACCEPTED (frame type 21, "\0\25") for this message.
    accepted = next(i for i, line in enumerate(lines)
                    if sent < i < reply and thread(line) in queue_threads
                    and re.search(r"\\0\\25\\10queue-id\\2\\0\\0\\0\\f" + queue_id, line))
    between = "\n".join(line[:100] for line in lines[sent:reply + 1])
    assert any(completed(i, queue_threads, "fdatasync") for i in range(sent, accepted)), between
    assert any(completed(i, queue_threads, "pwrite64", meta) for i in range(sent, accepted)), between


def test_a_full_log_disk_does_not_stop_the_mail(workdir):
    """The log on a full disk: the supervisor keeps draining the stages'
    output, so mail flows as before; once there is room, the first line
    says how many lines did not reach the log, and the count is exact."""
    require_build("queue", "local-deliver", "queue-inject")
    user = local_user()
    with small_disk(workdir / "data" / "log", "64k") as log:
        with running(Pipeline(workdir)) as pipe:
            filler = log / "filler"
            with pytest.raises(OSError):   # the disk is full once this fails
                filler.write_bytes(b"\0" * (1 << 20))
            count = 300   # a few hundred log lines, far more than the pipes hold
            for sequence in range(count):
                result = pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost",
                                           message=make_message(sequence, user), timeout=60)
                assert result.returncode == 0, (sequence, result.stderr)
            wait_until(lambda: len(sequences_delivered(pipe, user)) >= count, 120, f"{count} messages delivered")
            assert set(sequences_delivered(pipe, user).values()) == {1}
            filler.unlink()
            assert pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost",
                                     message=make_message(count, user)).returncode == 0
            wait_until(lambda: "log lines not written since" in pipe.log_text(), 60, "the notice")
        # Stopped: every line is out. --foreground echoes each line on
        # standard output (supervise.out), which is not full: the notices
        # count exactly what is there and not in the log.
        lines = pipe.log_text().splitlines()
        notice = re.compile(r"supervise\[\d+\]: warning: (\d+) log lines? not written since .*: No space left on device$")
        counts = [int(m.group(1)) for m in map(notice.search, lines) if m]
        assert counts and all(counts), lines[-5:]
        echoed = pipe.supervisor_output().splitlines()
        assert len(echoed) == len(lines) - len(counts) + sum(counts), (len(echoed), len(lines), counts)
        stamp = re.compile(r"\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ [\w-]+\[\d+\]: ")
        cut = " [cut: log write failed]"
        for line in lines:
            if line.endswith(cut):
                # A line the full disk cut short: the start of a real line,
                # ended there, never run into the next one.
                fragment = line[:-len(cut)]
                assert any(whole.startswith(fragment) for whole in echoed), line
                assert not stamp.search(fragment, 1), line
            else:
                # Each other line whole: one stamp at its start, none inside.
                assert stamp.match(line) and not stamp.search(line, 1), line


def test_a_restarted_queue_listens_before_it_reads_the_spool(pipeline):
    """Reading the spool takes seconds when it is large (the schedule of
    every message is loaded), and smtp-listen, whose pooled connections
    broke, connects again at once: the queue listens on its sockets first,
    so those connections wait in the backlog for the load instead of being
    refused (their clients would get 451). strace -f of the supervisor
    follows the queue it starts after a kill: the new queue's three
    listen(2) calls come before its "spool: ..." line (the end of the
    load)."""
    if not os.access(STRACE, os.X_OK):
        pytest.skip("strace is missing (Pipeline/test installs it)")
    supervisor = pipeline.process.pid
    old = pipeline.running_pid("queue")
    output, messages = pipeline.directory / "strace.out", pipeline.directory / "strace.err"
    with open(messages, "wb") as errors:
        tracer = subprocess.Popen([STRACE, "-f", "-s", "200", "-o", str(output), "-e", "trace=listen,write",
                                   "-p", str(supervisor)], stderr=errors)
    try:
        wait_until(lambda: f"Process {supervisor} attached" in messages.read_text() or tracer.poll() is not None,
                   30, "strace to attach")
        if tracer.poll() is not None:
            if "Operation not permitted" in messages.read_text():
                pytest.skip(f"strace may not attach here: {messages.read_text().strip()}")
            raise AssertionError(messages.read_text())
        os.kill(old, signal.SIGKILL)
        new = wait_until(lambda: (p := pipeline.stage_pid("queue")) and p != old and p, 30,
                         "the queue to be restarted")
        wait_until(lambda: f"queue[{new}]: spool: " in output.read_text(errors="replace"), 60,
                   "the new queue to read the spool")
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
    queue_threads = {str(tid) for tid in threads(new)}
    lines = [line for line in output.read_text(errors="replace").splitlines() if line.split(None, 1)[0] in queue_threads]
    # Each listen(2) in the order the calls returned: strace splits a call
    # that another thread's line interrupts into "listen(10, 256
    # <unfinished ...>" and "<... listen resumed>) = 0".
    listens, started = [], {}
    for i, line in enumerate(lines):
        tid = line.split(None, 1)[0]
        if found := re.search(r"\blisten\((\d+), (\d+)", line):
            if "<unfinished" in line:
                started[tid] = found.groups()
            else:
                listens.append((i, *found.groups()))
        elif "<... listen resumed>" in line and tid in started:
            listens.append((i, *started.pop(tid)))
    loaded = next(i for i, line in enumerate(lines) if f"queue[{new}]: spool: " in line)
    assert len([i for i, _, backlog in listens if i < loaded and backlog == "256"]) == 3, \
        "\n".join(line[:120] for line in lines)
    # Once NIO has a socket it listens again, with 128: the queue's 256
    # must be the last word on each.
    last = {fd: backlog for _, fd, backlog in listens}
    assert list(last.values()) == ["256"] * 3, "\n".join(line[:120] for line in lines)
    pipeline.wait_for_queue()
    assert pipeline.queue_inject(f"{local_user()}@localhost").returncode == 0
