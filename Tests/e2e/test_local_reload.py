"""local-deliver picks up a changed aliases file without a restart by hand.

As root, local-deliver reads the aliases file and the accounts at start,
then chroots into the data directory and runs as its own user: it cannot
read them again. A reload (SIGHUP to the supervisor, or the supervisor
seeing the files change) starts a new local-deliver that loads everything
as a first start does; the old one stops once the new one is ready. A new
one that cannot load its aliases or its configuration logs one warning
and exits, and the old one goes on with the last tables that loaded."""

import os
import re
import signal

import pytest

from conftest import IS_ROOT, Pipeline, make_message, require_build, running, sequences_delivered, wait_until


def write_aliases(path, text):
    """As an editor does: a new file renamed over the old."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.chmod(temporary, 0o600)   # root's alone: the stage's user could not read it
    os.rename(temporary, path)


def send(pipe, sequence, recipient="team@localhost"):
    result = pipe.queue_inject(recipient, message=make_message(sequence, "team"))
    assert result.returncode == 0, result.stderr.decode()


def delivered_to(pipe, user, sequence):
    return wait_until(lambda: sequence in sequences_delivered(pipe, user), 60,
                      f"message {sequence} in {user}'s Maildir\n{pipe.log_tail()}")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not IS_ROOT, reason="needs root: local-deliver chroots and drops privileges only when started as root")
def test_sighup_reloads_the_aliases_and_a_malformed_file_keeps_the_last_good_table(workdir):
    require_build("queue", "local-deliver", "queue-inject")
    pipe = Pipeline(workdir, stages="queue queue\nlocal-deliver local-deliver\n",
                    config_overrides={"users": '["alpha", "beta"]'})
    aliases = workdir / "aliases"
    write_aliases(aliases, "team: alpha\n")
    with running(pipe):
        first = pipe.running_pid("local-deliver")
        # Confined: chrooted into the data directory, its own user.
        wait_until(lambda: os.readlink(f"/proc/{first}/root") == str(pipe.data), 30, "local-deliver's chroot")
        send(pipe, 1)
        delivered_to(pipe, "alpha", 1)

        # The alias now points elsewhere; the administrator sends SIGHUP.
        write_aliases(aliases, "team: beta\n")
        os.kill(pipe.process.pid, signal.SIGHUP)
        pipe.log_with(re.compile(r"local-deliver\[\d+\]: reloaded \(SIGHUP\): \d+ workers, \d+ local users, 1 aliases"),
                      re.compile(rf"stage local-deliver \(pid {first}\), replaced by a reload, exited with status 0"))
        second = pipe.running_pid("local-deliver")
        assert second != first and not alive(first)
        assert os.readlink(f"/proc/{second}/root") == str(pipe.data)
        send(pipe, 2)
        delivered_to(pipe, "beta", 2)
        assert 2 not in sequences_delivered(pipe, "alpha")

        # A malformed file: one warning with file, line and reason; the
        # running local-deliver keeps the table it has, and mail flows.
        write_aliases(aliases, "team: alpha\nbroken line without a colon\n")
        os.kill(pipe.process.pid, signal.SIGHUP)
        text = pipe.log_with(f"warning: aliases not reloaded: {aliases}:2: expected \"name: target, ...\", found no \":\"",
                             re.compile(rf"local-deliver not reloaded: the new instance \(pid \d+\) exited with status 78; "
                                        rf"pid {second} goes on"))
        assert len(re.findall(r"warning: aliases not reloaded", text)) == 1
        assert pipe.stage_pid("local-deliver") == second and alive(second)
        send(pipe, 3)
        delivered_to(pipe, "beta", 3)
        assert 3 not in sequences_delivered(pipe, "alpha")

        # Mended, without a SIGHUP: the supervisor sees the file change.
        write_aliases(aliases, "team: alpha\n")
        pipe.log_with(re.compile(rf"local-deliver\[\d+\]: reloaded \(changed: {re.escape(str(aliases))}\): "),
                      re.compile(rf"stage local-deliver \(pid {second}\), replaced by a reload, exited with status 0"))
        send(pipe, 4)
        delivered_to(pipe, "alpha", 4)
        third = pipe.running_pid("local-deliver")

        # A configuration file that does not parse: the new instance says
        # so in a warning (not a fatal error: nothing stops), and the
        # running one goes on.
        good = pipe.config.read_text()
        pipe.config.write_text(good + "\n[queue\n")
        text = pipe.log_with(re.compile(rf"local-deliver\[\d+\]: warning: configuration not reloaded: .*"
                                        rf"\(the running local-deliver keeps the one it has\)"),
                             re.compile(rf"local-deliver not reloaded: the new instance \(pid \d+\) exited with status 78; "
                                        rf"pid {third} goes on"))
        assert not re.search(r"local-deliver\[\d+\]: fatal:", text)
        assert pipe.stage_pid("local-deliver") == third and alive(third)
        pipe.config.write_text(good)
        pipe.log_with(re.compile(rf"local-deliver\[\d+\]: reloaded \(changed: {re.escape(str(pipe.config))}\): "),
                      re.compile(rf"stage local-deliver \(pid {third}\), replaced by a reload, exited with status 0"))
        send(pipe, 5)
        delivered_to(pipe, "alpha", 5)
        # Nothing was lost or delivered twice on the way.
        assert sequences_delivered(pipe, "alpha") == {1: 1, 4: 1, 5: 1}
        assert sequences_delivered(pipe, "beta") == {2: 1, 3: 1}
