"""End-to-end fixtures: a private Sealpost pipeline per test.

Each test gets a temporary directory holding a copy of Config/sealpost.toml
(data_directory pointing into the temporary directory, short backoffs) and a
stages file, and a real `supervise --foreground` started on them. Nothing is
mocked: the stages are the release executables (SEALPOST_BUILD, default
.build/release), the sockets and the LMDB files are real.
"""

import contextlib
import getpass
import os
import pathlib
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time

import pytest

import stageproto

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("SEALPOST_BUILD", CHECKOUT / ".build" / "release"))
IS_ROOT = os.geteuid() == 0


def executable(name):
    return str(BUILD / name)


def require_build(*names):
    for name in ("supervise",) + names:
        if not os.access(executable(name), os.X_OK):
            pytest.skip(f"{executable(name)} is not built (run: swift build -c release)")


# Numbered messages, for load tests that count what was delivered.
SEQUENCE = re.compile(rb"^X-E2E-Sequence: (\d+)\r?$", re.M)


def make_message(sequence, user):
    return (f"From: e2e@localhost\r\nTo: {user}@localhost\r\nSubject: load {sequence}\r\n"
            f"X-E2E-Sequence: {sequence}\r\n\r\nmessage number {sequence}\r\n").encode()


def sequences_delivered(pipeline, user):
    """{sequence number: how many copies} in the user's Maildir."""
    counts = {}
    for path in pipeline.delivered(user):
        match = SEQUENCE.search(path.read_bytes())
        if match:
            number = int(match.group(1))
            counts[number] = counts.get(number, 0) + 1
    return counts


def wait_until(predicate, timeout, what, interval=0.05):
    """Polls `predicate` until it returns something true; fails after
    `timeout` seconds (a bound against hanging, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def connect_smtp(port):
    """An smtplib client of smtp-listen on loopback `port` (EHLO name
    client.e2e.test), once it accepts connections."""
    def attempt():
        try:
            return smtplib.SMTP("127.0.0.1", port, local_hostname="client.e2e.test", timeout=60)
        except OSError:
            return None
    return wait_until(attempt, 60, f"smtp-listen on port {port}")


def as_user(user, command, groups="clear"):
    """`command` run as `user` (a name) through setpriv: with no
    supplementary groups ("clear") or with the user's own ("init", as a
    stage started by the supervisor has them)."""
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", f"--{groups}-groups", "--"] + list(command)


def local_user():
    """The local account mail is delivered to in the tests."""
    return pwd.getpwuid(os.geteuid()).pw_name if IS_ROOT else getpass.getuser()


_ports_handed_out = set()


def free_tcp_port():
    """A loopback TCP port free at this moment, and not handed out before
    by this process: the kernel may give a port that was just probed and
    closed to the next probe (two listeners of one configuration then
    got the same port, and smtp-listen refused it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port


def make_config(directory, data_directory, overrides=None):
    """Copies Config/sealpost.toml with data_directory and short timers."""
    text = (CHECKOUT / "Config" / "sealpost.toml").read_text()
    settings = {
        "data_directory": f'"{data_directory}"',
        "minimal_backoff_time": '"1s"',
        "maximal_backoff_time": '"2s"',
        "queue_run_delay": '"1s"',
        # Ports of their own: never the 2525/2587/2465 of a running Sealpost.
        "listen": f'["127.0.0.1:{free_tcp_port()}"]',
        "submission": f'["127.0.0.1:{free_tcp_port()}"]',
        "smtps": f'["127.0.0.1:{free_tcp_port()}"]',
    }
    settings.update(overrides or {})
    for key, value in settings.items():
        text, count = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        if count == 0:
            # A setting the shipped file shows commented out ("# key = ...").
            text, count = re.subn(rf"(?m)^# {key}\s*=.*$", f"{key} = {value}", text)
        assert count == 1, f"{key} not found in Config/sealpost.toml"
    path = pathlib.Path(directory) / "sealpost.toml"
    path.write_text(text)
    aliases = CHECKOUT / "Config" / "aliases"
    if aliases.exists():
        shutil.copy(aliases, pathlib.Path(directory) / "aliases")
    else:
        (pathlib.Path(directory) / "aliases").write_text("")
    return path


def drop_server_certificates(path):
    """Removes the [[tls.certificates]] tables of a configuration made by
    make_config, for a pipeline without crypto-negotiate (the benches):
    with certificates, smtp-listen would wait for it at start and keep
    trying to reach it."""
    path = pathlib.Path(path)
    text = re.sub(r"(?ms)^\[\[tls\.certificates\]\].*?(?=^\[)", "", path.read_text())
    path.write_text(text.replace("\n[tls]\n", "\n[tls]\ncertificates = []\n", 1))


class Pipeline:
    """A supervisor and its stages on a private data directory."""

    def __init__(self, directory, stages=None, config_overrides=None, run_as=None):
        self.directory = pathlib.Path(directory)
        self.data = self.directory / "data"
        self.config = make_config(self.directory, self.data, config_overrides)
        self.stages_file = self.directory / "stages"
        self.stages_file.write_text(stages or (CHECKOUT / "Pipeline" / "stages").read_text())
        self.run_as = run_as
        self.process = None
        self.output = None

    # Paths
    @property
    def inject_socket(self):
        return str(self.data / "run" / "inject")

    @property
    def control_socket(self):
        return str(self.data / "run" / "control")

    @property
    def log_file(self):
        return self.data / "log" / "sealpost.log"

    @property
    def status_file(self):
        return self.data / "supervise" / "supervise.status"

    def maildir_new(self, user):
        return self.data / "mail" / user / "Maildir" / "new"

    def delivered(self, user):
        directory = self.maildir_new(user)
        try:
            return sorted(directory.iterdir())
        except FileNotFoundError:
            return []

    def env(self, **extra):
        env = dict(os.environ)
        env["SEALPOST_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    # Life cycle
    def ensure_certificates(self):
        """What Pipeline/start does before the first start: the self-signed
        pair the default [tls] section names, in <data>/tls/."""
        command = ["bash", "-c", '. "$checkout/Pipeline/common.sh" && ensure_self_signed_certificates "$1" "$2"',
                   "ensure", str(self.data / "tls"), socket.gethostname().lower()]
        if self.run_as:   # as the user that runs the pipeline, who owns data/
            command = as_user(self.run_as, command)
        subprocess.run(command, env=dict(os.environ, checkout=str(CHECKOUT)), check=True, capture_output=True)

    def start(self, wait=True):
        self.ensure_certificates()
        command = [executable("supervise"), "--foreground", "--stages", str(self.stages_file)]
        if self.run_as:
            command = as_user(self.run_as, command)
        self.output = open(self.directory / "supervise.out", "wb")
        self.process = subprocess.Popen(command, env=self.env(), stdout=self.output,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_for_queue()
        return self

    def accepting(self):
        """Whether the queue serves its inject socket: it answers a HELLO.
        A connection alone is not enough: the queue listens before it loads
        the spool and serves only after the load."""
        if self.process.poll() is not None:
            raise AssertionError(f"supervise exited with {self.process.returncode}:\n{self.supervisor_output()}")
        try:
            stageproto.Connection(str(self.inject_socket), "inject", timeout=2).close()
            return True
        except (OSError, ValueError, stageproto.ProtocolError):
            return False

    def wait_for_queue(self, timeout=60):
        try:
            wait_until(self.accepting, timeout, f"{self.inject_socket} to answer a HELLO")
        except AssertionError as error:
            raise AssertionError(f"{error}\nlog:\n{self.log_tail()}") from None

    def stop(self):
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()
        return self.process.returncode

    def supervisor_output(self):
        try:
            return (self.directory / "supervise.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_text(self):
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_with(self, *expected, timeout=30):
        """The log once it holds every expected string or compiled regex:
        the supervisor writes the stages' lines in rounds (up to
        logGatherInterval apart), so a line can trail what it reports."""
        def holds(text):
            return all(e.search(text) if isinstance(e, re.Pattern) else e in text for e in expected)
        try:
            return wait_until(lambda: (text := self.log_text()) and holds(text) and text, timeout,
                              f"the log to show {expected}")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.log_tail()}") from None

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    # Stages
    def status(self):
        """{name: (state, pid, since, restarts)} from the status file."""
        result = {}
        try:
            text = self.status_file.read_text()
        except FileNotFoundError:
            return result
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, state, pid, since, restarts = line.split()
            result[name] = (state, int(pid), int(since), int(restarts))
        return result

    def stage_names(self):
        """The NAMEs of the stages file (each runs as sealpost-NAME as root)."""
        lines = (line.split("#", 1)[0].split() for line in self.stages_file.read_text().splitlines())
        return [fields[0] for fields in lines if fields]

    def stage_pid(self, name):
        state = self.status().get(name)
        return state[1] if state and state[0] == "running" else None

    def running_pid(self, name, timeout=30):
        return wait_until(lambda: self.stage_pid(name), timeout, f"stage {name} to run")

    # Injection
    def queue_inject(self, *arguments, message=b"Subject: test\n\nbody\n", timeout=120, **env):
        return subprocess.run([executable("queue-inject"), *arguments], input=message,
                              env=self.env(**env), capture_output=True, timeout=timeout)

    def sealpost(self, *arguments, timeout=60):
        return subprocess.run([executable("sealpost"), *arguments], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)


def port_of(pipe, key):
    """The loopback port of `key` (listen, submission, smtps) in `pipe`'s
    configuration."""
    match = re.search(rf'(?m)^{key} = \["127\.0\.0\.1:(\d+)"\]', pipe.config.read_text())
    assert match, f"{key} not in {pipe.config}"
    return int(match.group(1))


def stages_without(*names):
    """The default stages file less the stages `names` (say, no delivery
    stage, so that what is accepted stays in the queue)."""
    return "\n".join(line for line in (CHECKOUT / "Pipeline" / "stages").read_text().splitlines()
                     if line.split()[:1] not in ([name] for name in names))


@contextlib.contextmanager
def running(pipe):
    """`pipe` started for the block, then stopped: it must exit with 0."""
    pipe.start()
    try:
        yield pipe
    finally:
        code = pipe.stop()
    assert code == 0, pipe.supervisor_output()


@pytest.fixture
def workdir():
    directory = tempfile.mkdtemp(prefix="sealpost-e2e-")
    # The stages drop to their own users (as root) and must reach the data
    # directory: the temporary directory is 0700 by default.
    os.chmod(directory, 0o755)
    yield pathlib.Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pipeline(workdir):
    require_build("queue", "local-deliver", "queue-inject")
    pipe = Pipeline(workdir).start()
    yield pipe
    code = pipe.stop()
    assert code == 0, f"supervise exited with {code}:\n{pipe.supervisor_output()}"


def parse_message(path):
    import email
    import email.policy
    with open(path, "rb") as handle:
        return email.message_from_binary_file(handle, policy=email.policy.default)
