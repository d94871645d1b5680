#!/usr/bin/env python3
"""A stand-in for Sealpost's local-deliver, written from Pipeline/PROTOCOL.md.

It proves that a pipeline stage can be replaced by any program that speaks
the documented stage protocol: a test puts this file in Pipeline/stages in
place of local-deliver.

    deliver.py [DELIVER-SOCKET]

Without an argument, the socket is run/deliver under the data directory of
the configuration named by SEALPOST_CONFIG (data_directory, relative to the
file's directory), else of Config/sealpost.toml in this checkout.

It connects (reconnecting with a growing pause when the queue is away), says
HELLO (protocol deliver, transport local, max-jobs 1), then for every job
writes the message once per recipient into
<data>/mail/<user>/Maildir/new/ through tmp/ (user: the local part,
lower-cased, without a "+extension"), and answers RESULT for each recipient
then JOB-DONE. No aliases, no user database: a test fixture, not an MTA.
Python 3 standard library only.
"""

import errno
import os
import pwd
import signal
import socket
import struct
import sys
import time

try:
    import tomllib
except ImportError:  # Python < 3.11: fall back to a minimal reader
    tomllib = None

# The supervisor names the stage in SEALPOST_STAGE; log lines carry it.
PROG = os.environ.get("SEALPOST_STAGE") or "deliver.py"

# --- Frames (PROTOCOL.md sections 2 and 4) -------------------------------

MAX_FRAME = 262144
MAX_TEXT = 8192
MAX_BYTES = 65536
UINT, TEXT, BYTES, BOOL, FD = 1, 2, 3, 4, 5

HELLO, ERROR = 1, 2
BODY = 18
JOB, JOB_RCPT, JOB_END, RESULT, JOB_DONE = 32, 33, 34, 35, 36
KNOWN_TYPES = {1, 2, 16, 17, 18, 19, 20, 21, 22, 32, 33, 34, 35, 36, 48, 49, 50, 51}
NAMES = {HELLO: "HELLO", ERROR: "ERROR", BODY: "BODY", JOB: "JOB",
         JOB_RCPT: "JOB-RCPT", JOB_END: "JOB-END", RESULT: "RESULT", JOB_DONE: "JOB-DONE"}

# What the queue may send us in `deliver`, with each attribute's type and
# whether it is required.
SERVER_SCHEMA = {
    HELLO: {"protocol": (TEXT, True), "version": (UINT, True), "software": (TEXT, False)},
    ERROR: {"status": (TEXT, True), "text": (TEXT, True)},
    JOB: {"job": (UINT, True), "queue-id": (TEXT, True), "sender": (TEXT, True),
          "arrival": (UINT, True), "size": (UINT, True), "attempt": (UINT, True),
          "ret": (TEXT, False), "envid": (TEXT, False), "requiretls": (BOOL, False),
          "smtputf8": (BOOL, False), "body-type": (TEXT, False), "nexthop": (TEXT, False)},
    JOB_RCPT: {"index": (UINT, True), "address": (TEXT, True),
               "notify": (TEXT, False), "orcpt": (TEXT, False)},
    BODY: {"data": (BYTES, True)},
    JOB_END: {"job": (UINT, True)},
}


class ProtocolError(Exception):
    pass


def encode(frame_type, attributes):
    """attributes: list of (name, kind, value)."""
    out = bytearray(struct.pack(">H", frame_type))
    for name, kind, value in attributes:
        raw_name = name.encode("ascii")
        if kind == UINT:
            raw = struct.pack(">Q", value)
        elif kind == TEXT:
            raw = value.replace("\r", " ").replace("\n", " ").replace("\0", " ").encode("utf-8")
            if len(raw) > MAX_TEXT:
                raw = raw[:MAX_TEXT].decode("utf-8", "ignore").encode("utf-8")
        elif kind == BYTES:
            raw = bytes(value)
        elif kind == BOOL:
            raw = b"\x01" if value else b"\x00"
        else:
            raise ValueError("cannot send kind %d" % kind)
        out += bytes([len(raw_name)]) + raw_name + bytes([kind]) + struct.pack(">I", len(raw)) + raw
    return struct.pack(">I", len(out)) + bytes(out)


def valid_name(name):
    if not 1 <= len(name) <= 32 or not (b"a"[0] <= name[0] <= b"z"[0]):
        return False
    return all(c in b"abcdefghijklmnopqrstuvwxyz0123456789-" for c in name)


def decode(frame_type, payload):
    """Strict decoding of the attributes; returns {name: value}."""
    if frame_type not in KNOWN_TYPES:
        raise ProtocolError("unknown frame type %d" % frame_type)
    attributes = {}
    pos = 0
    while pos < len(payload):
        k = payload[pos]
        pos += 1
        name = payload[pos:pos + k]
        if len(name) != k or not valid_name(name):
            raise ProtocolError("bad attribute name %r" % name)
        pos += k
        if pos + 5 > len(payload):
            raise ProtocolError("attribute %s runs past the frame" % name.decode())
        kind = payload[pos]
        (length,) = struct.unpack(">I", payload[pos + 1:pos + 5])
        pos += 5
        if pos + length > len(payload):
            raise ProtocolError("attribute %s runs past the frame" % name.decode())
        raw = payload[pos:pos + length]
        pos += length
        if kind == UINT:
            if length != 8:
                raise ProtocolError("uint %s: length %d" % (name.decode(), length))
            value = struct.unpack(">Q", raw)[0]
        elif kind == TEXT:
            if length > MAX_TEXT:
                raise ProtocolError("text %s too long" % name.decode())
            value = raw.decode("utf-8")  # raises on invalid UTF-8
            if "\0" in value or "\r" in value or "\n" in value:
                raise ProtocolError("text %s holds NUL, CR or LF" % name.decode())
        elif kind == BYTES:
            if length > MAX_BYTES:
                raise ProtocolError("bytes %s too long" % name.decode())
            value = bytes(raw)
        elif kind == BOOL:
            if length != 1 or raw[0] not in (0, 1):
                raise ProtocolError("bad bool %s" % name.decode())
            value = raw[0] == 1
        elif kind == FD:
            raise ProtocolError("no frame of the deliver protocol carries a descriptor")
        else:
            raise ProtocolError("unknown value type %d" % kind)
        key = name.decode()
        if key in attributes:
            raise ProtocolError("attribute %s twice" % key)
        attributes[key] = (kind, value)

    schema = SERVER_SCHEMA.get(frame_type)
    if schema is None:
        raise ProtocolError("frame type %d not allowed from the queue in deliver" % frame_type)
    result = {}
    for key, (kind, value) in attributes.items():
        if key not in schema:
            raise ProtocolError("%s: unknown attribute %s" % (NAMES.get(frame_type), key))
        if schema[key][0] != kind:
            raise ProtocolError("%s: attribute %s has the wrong type" % (NAMES.get(frame_type), key))
        result[key] = value
    for key, (_, required) in schema.items():
        if required and key not in result:
            raise ProtocolError("%s: missing attribute %s" % (NAMES.get(frame_type), key))
    return result


class Connection:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buffer = bytearray()

    def send(self, frame_type, attributes):
        self.sock.sendall(encode(frame_type, attributes))

    def _fill(self, n):
        while len(self.buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                if self.buffer:
                    raise ProtocolError("connection closed in the middle of a frame")
                return False
            self.buffer += data
        return True

    def receive(self):
        """(type, attributes), or None on EOF between frames."""
        if not self._fill(4):
            return None
        (length,) = struct.unpack(">I", self.buffer[:4])
        if not 2 <= length <= MAX_FRAME:
            raise ProtocolError("frame length %d" % length)
        if not self._fill(4 + length):
            raise ProtocolError("connection closed in the middle of a frame")
        frame = bytes(self.buffer[4:4 + length])
        del self.buffer[:4 + length]
        (frame_type,) = struct.unpack(">H", frame[:2])
        return frame_type, decode(frame_type, frame[2:])

    def close(self):
        self.sock.close()


# --- Configuration --------------------------------------------------------

def data_directory():
    config = os.environ.get("SEALPOST_CONFIG")
    if not config:
        here = os.path.dirname(os.path.realpath(__file__))
        config = os.path.join(here, "..", "..", "..", "Config", "sealpost.toml")
    config = os.path.realpath(config)
    with open(config, "rb") as f:
        text = f.read()
    value = None
    if tomllib is not None:
        value = tomllib.loads(text.decode("utf-8")).get("sealpost", {}).get("data_directory")
    else:
        for line in text.decode("utf-8").splitlines():
            line = line.strip()
            if line.startswith("data_directory") and "=" in line:
                value = line.split("=", 1)[1].split("#")[0].strip().strip('"')
    if not value:
        value = "../var"
    return os.path.normpath(os.path.join(os.path.dirname(config), value))


# --- Maildir --------------------------------------------------------------

HOSTNAME = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"
counter = 0


def unique_name():
    global counter
    counter += 1
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1000000)
    return "%d.M%dP%dQ%d.%s" % (seconds, micros, os.getpid(), counter, HOSTNAME)


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver_maildir(maildir, content):
    for sub in ("", "tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    while True:
        name = unique_name()
        tmp = os.path.join(maildir, "tmp", name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            continue
    try:
        try:
            view = memoryview(content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        while True:
            try:
                os.link(tmp, os.path.join(maildir, "new", name))  # never overwrites
                break
            except FileExistsError:
                name = unique_name()
        fsync_directory(os.path.join(maildir, "new"))
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def mailbox_user(address):
    local = address.rsplit("@", 1)[0].lower()
    if "+" in local[1:]:
        local = local[:local.index("+", 1)]
    if not local or local.startswith(".") or "/" in local or "\0" in local:
        return None
    return local


def drop_privileges():
    """Started as root by the supervisor: become SEALPOST_USER (the stage's
    own account, which owns the mailboxes), as local-deliver does (without
    its chroot)."""
    user = os.environ.get("SEALPOST_USER")
    if os.geteuid() != 0 or not user:
        return  # a test fixture: run as whoever started it
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        log("fatal: SEALPOST_USER %s: no such user" % user)
        sys.exit(67)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def log(line):
    sys.stderr.write("%s[%d]: %s\n" % (PROG, os.getpid(), line))
    sys.stderr.flush()


# --- The deliver protocol -------------------------------------------------

def receive_job(conn, first):
    kind, attrs = first
    if kind == ERROR:
        raise ProtocolError("queue said %s %s" % (attrs["status"], attrs["text"]))
    if kind != JOB:
        raise ProtocolError("expected JOB, got frame type %d" % kind)
    job = dict(attrs)
    recipients = []
    body = bytearray()
    while True:
        frame = conn.receive()
        if frame is None:
            raise ProtocolError("connection closed inside job %d" % job["job"])
        kind, attrs = frame
        if kind == JOB_RCPT:
            recipients.append((attrs["index"], attrs["address"]))
        elif kind == BODY:
            body += attrs["data"]
        elif kind == JOB_END:
            if attrs["job"] != job["job"]:
                raise ProtocolError("JOB-END for another job")
            return job, recipients, bytes(body)
        else:
            raise ProtocolError("unexpected frame type %d inside a job" % kind)


def handle(conn, data, job, recipients, body):
    message = body.replace(b"\r\n", b"\n")
    for index, address in recipients:
        user = mailbox_user(address)
        if user is None:
            status, dsn, text = "bounced", "5.1.1", 'unknown user: "%s"' % address
        else:
            header = ("Return-Path: <%s>\nDelivered-To: %s\n" % (job["sender"], address)).encode("utf-8")
            try:
                deliver_maildir(os.path.join(data, "mail", user, "Maildir"), header + message)
                status, dsn, text = "sent", "2.0.0", "delivered to maildir"
            except OSError as e:
                status, dsn = "deferred", ("4.3.1" if e.errno == errno.ENOSPC else "4.3.0")
                text = "cannot deliver to maildir: %s" % os.strerror(e.errno or errno.EIO)
        delay = max(0, int(time.time()) - job["arrival"])   # whole seconds, as the arrival
        log("%s: to=<%s>, relay=local, delay=%d, dsn=%s, status=%s (%s)"
            % (job["queue-id"], address, delay, dsn, status, text))
        conn.send(RESULT, [("job", UINT, job["job"]), ("index", UINT, index),
                           ("status", TEXT, status), ("dsn", TEXT, dsn), ("text", TEXT, text),
                           ("relay", TEXT, "maildir")])
    conn.send(JOB_DONE, [("job", UINT, job["job"])])


def session(path, data):
    conn = Connection(path)
    try:
        conn.send(HELLO, [("protocol", TEXT, "deliver"), ("version", UINT, 1),
                          ("software", TEXT, "deliver.py 1"), ("transport", TEXT, "local"),
                          ("max-jobs", UINT, 1)])
        reply = conn.receive()
        if reply is None:
            raise ProtocolError("the queue closed the connection before its HELLO")
        kind, attrs = reply
        if kind == ERROR:
            raise ProtocolError("queue refused HELLO: %s %s" % (attrs["status"], attrs["text"]))
        if kind != HELLO or attrs["protocol"] != "deliver" or attrs["version"] != 1:
            raise ProtocolError("unexpected HELLO reply")
        log("connected to %s" % path)
        while True:
            first = conn.receive()
            if first is None:
                return
            job, recipients, body = receive_job(conn, first)
            handle(conn, data, job, recipients, body)
    finally:
        conn.close()


def main():
    data = data_directory() if len(sys.argv) < 2 or os.environ.get("SEALPOST_CONFIG") else None
    if len(sys.argv) >= 2:
        path = sys.argv[1]
        if data is None:
            # <data>/run/deliver
            data = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    else:
        path = os.path.join(data, "run", "deliver")
    os.umask(0o077)
    drop_privileges()
    # A parent may have left signals blocked (some process launchers do):
    # the supervisor must be able to stop this stage with SIGTERM.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    pause = 0.1
    failing = False
    while True:
        try:
            session(path, data)
            pause = 0.1
            failing = False
        except (OSError, ProtocolError, UnicodeDecodeError) as e:
            if not failing:  # once per outage, not every few seconds
                log("warning: %s: %s; reconnecting" % (path, e))
                failing = True
        time.sleep(pause)
        pause = min(pause * 2, 5.0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
