"""The administrator's `sealpost queue` commands on a real queue, as
Postfix's postsuper takes its arguments: several IDs, ALL, or "-"."""

import re
import subprocess

from conftest import Pipeline, executable, local_user, make_message, require_build, running, \
    sequences_delivered, stages_without, wait_until

ID = re.compile(r"^([0-9A-F]{12})(!?)\s", re.M)


def listed(pipe):
    """{queue ID: held} from `sealpost queue list`."""
    result = pipe.sealpost("queue", "list")
    assert result.returncode == 0, result.stderr
    return {m.group(1): m.group(2) == "!" for m in ID.finditer(result.stdout)}


def sealpost_with_input(pipe, text, *arguments):
    return subprocess.run([executable("sealpost"), *arguments], input=text, env=pipe.env(),
                          capture_output=True, text=True, timeout=60)


def test_hold_release_and_delete_by_ids_all_and_standard_input(workdir):
    require_build("queue", "local-deliver", "queue-inject", "sealpost")
    user = local_user()
    # No delivery stage at first: the messages wait in the queue.
    with running(Pipeline(workdir, stages=stages_without("local-deliver", "remote-deliver"))) as pipe:
        for sequence in range(6):
            assert pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost",
                                     message=make_message(sequence, user)).returncode == 0
        ids = sorted(listed(pipe))
        assert len(ids) == 6

        held = pipe.sealpost("queue", "hold", "ALL")
        assert held.returncode == 0 and held.stdout == "held 6 messages\n", held
        assert all(listed(pipe).values())

        # Two by name, two from standard input (lower case is fine).
        released = pipe.sealpost("queue", "release", ids[0], ids[1])
        assert released.returncode == 0 and released.stdout.count(": released") == 2, released
        released = sealpost_with_input(pipe, f"{ids[2].lower()}\n\n  {ids[3]}  \n", "queue", "release", "-")
        assert released.returncode == 0 and released.stdout.count(": released") == 2, released
        assert listed(pipe) == {i: i in ids[4:] for i in ids}

        # One unknown ID among good ones: the good ones are done, exit 69.
        deleted = pipe.sealpost("queue", "delete", ids[0], "0123456789AB", ids[1])
        assert deleted.returncode == 69, deleted
        assert deleted.stdout.count(": deleted") == 2, deleted
        assert "0123456789AB" in deleted.stderr and "1 of 3 messages not changed" in deleted.stderr, deleted
        assert sorted(listed(pipe)) == ids[2:]

        # Bad arguments change nothing.
        assert pipe.sealpost("queue", "delete", "ALL", ids[2]).returncode == 64
        assert pipe.sealpost("queue", "delete", "not-an-id").returncode == 64
        assert sealpost_with_input(pipe, "garbage\n", "queue", "delete", "-").returncode == 64
        assert sorted(listed(pipe)) == ids[2:]

        deleted = pipe.sealpost("queue", "delete", "ALL")
        assert deleted.returncode == 0 and deleted.stdout == "deleted 4 messages\n", deleted
        assert listed(pipe) == {}

    # Deleted is gone: the whole pipeline on the same data delivers nothing.
    with running(Pipeline(workdir)) as pipe:
        assert pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost",
                                 message=make_message(99, user)).returncode == 0
        wait_until(lambda: sequences_delivered(pipe, user), 60, "the new message")
        assert sequences_delivered(pipe, user) == {99: 1}


def test_show_escapes_what_a_terminal_would_obey(workdir):
    # A message body is the sender's: ESC sequences in it would reach the
    # administrator's terminal (retitle it, rewrite the screen), bidi
    # controls reorder what is shown. `queue show` escapes them all;
    # --raw prints the message exactly as queued.
    require_build("queue", "queue-inject", "sealpost")
    user = local_user()
    body = "Subject: \u202etxt.exe\n\nred \x1b[31mtext\x1b]0;owned\x07 and \x9b bell\n".encode() + b"bad \xff byte\n"
    with running(Pipeline(workdir, stages=stages_without("local-deliver", "remote-deliver"))) as pipe:
        assert pipe.queue_inject("-f", "sender@localhost", f"{user}@localhost", message=body).returncode == 0
        (queue_id,) = listed(pipe)
        shown = subprocess.run([executable("sealpost"), "queue", "show", queue_id], env=pipe.env(),
                               capture_output=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        out = shown.stdout
        assert b"\x1b" not in out and b"\x07" not in out and "\u202e".encode() not in out and b"\xff" not in out, out
        assert b"red \\u{1b}[31mtext\\u{1b}]0;owned\\u{7} and \\u{9b} bell\n" in out, out
        assert b"Subject: \\u{202e}txt.exe\n" in out and b"bad \\xff byte\n" in out, out
        raw = subprocess.run([executable("sealpost"), "queue", "show", "--raw", queue_id], env=pipe.env(),
                             capture_output=True, timeout=60)
        assert raw.returncode == 0 and b"red \x1b[31mtext\x1b]0;owned\x07" in raw.stdout, raw


def test_queue_inject_stops_reading_a_message_over_the_size_limit(workdir):
    # The queue would refuse it at END; queue-inject stops at the limit
    # instead of spooling endless input (`yes | sendmail`) into $TMPDIR.
    require_build("queue", "queue-inject", "sealpost")
    user = local_user()
    with running(Pipeline(workdir, stages=stages_without("local-deliver", "remote-deliver"),
                          config_overrides={"message_size_limit": "100000"})) as pipe:
        endless = subprocess.Popen(["yes", "a line of a message that never ends"], stdout=subprocess.PIPE)
        try:
            result = subprocess.run([executable("queue-inject"), f"{user}@localhost"], stdin=endless.stdout,
                                    env=pipe.env(), capture_output=True, timeout=60)
        finally:
            endless.kill()
            endless.wait()
        assert result.returncode == 65, result.stderr
        assert b"message too large: over 108192 bytes" in result.stderr, result.stderr
        assert listed(pipe) == {}
