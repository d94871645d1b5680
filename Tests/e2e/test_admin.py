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
