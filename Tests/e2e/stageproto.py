"""A client of the Sealpost stage protocol, written from Pipeline/PROTOCOL.md.

Only what the end-to-end tests need: the inject protocol (HELLO, MAIL, RCPT,
BODY, END -> ACCEPTED/REFUSED) and the control protocol (REQUEST -> ENTRY...,
DONE). Strict like the real decoders: a frame must be consumed exactly.
"""

import socket
import struct

HELLO, ERROR = 1, 2
MAIL, RCPT, BODY, END, ABORT, ACCEPTED, REFUSED, QUEUE_ID = 16, 17, 18, 19, 20, 21, 22, 23
REQUEST, ENTRY, ENTRY_RCPT, DONE = 48, 49, 50, 51

UINT, TEXT, BYTES, BOOL = 1, 2, 3, 4
MAX_FRAME = 262144


class ProtocolError(Exception):
    pass


class Refused(Exception):
    """The queue answered END with REFUSED."""

    def __init__(self, code, status, text):
        super().__init__(f"{code} {status} {text}")
        self.code, self.status, self.text = code, status, text


def encode(frame_type, attributes=()):
    body = bytearray(struct.pack(">H", frame_type))
    for name, value in attributes:
        raw_name = name.encode()
        if isinstance(value, bool):
            kind, raw = BOOL, bytes([1 if value else 0])
        elif isinstance(value, int):
            kind, raw = UINT, struct.pack(">Q", value)
        elif isinstance(value, str):
            kind, raw = TEXT, value.encode()
        else:
            kind, raw = BYTES, bytes(value)
        body += bytes([len(raw_name)]) + raw_name + bytes([kind]) + struct.pack(">I", len(raw)) + raw
    return struct.pack(">I", len(body)) + bytes(body)


def decode_attributes(payload):
    attributes = {}
    offset = 0
    while offset < len(payload):
        k = payload[offset]
        offset += 1
        name = payload[offset:offset + k].decode()
        offset += k
        if offset + 5 > len(payload):
            raise ProtocolError("attribute runs past the frame")
        kind = payload[offset]
        (length,) = struct.unpack(">I", payload[offset + 1:offset + 5])
        offset += 5
        raw = payload[offset:offset + length]
        if len(raw) != length:
            raise ProtocolError("attribute value runs past the frame")
        offset += length
        if kind == UINT:
            value = struct.unpack(">Q", raw)[0]
        elif kind == TEXT:
            value = raw.decode()
        elif kind == BOOL:
            value = raw == b"\x01"
        else:
            value = raw
        attributes[name] = value
    return attributes


class Connection:
    def __init__(self, path, protocol, timeout=120):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buffer = b""
        try:
            self.send(HELLO, [("protocol", protocol), ("version", 1), ("software", "sealpost-e2e 1")])
            frame_type, attributes = self.receive()
            if frame_type != HELLO or attributes.get("protocol") != protocol:
                raise ProtocolError(f"bad HELLO answer: {frame_type} {attributes}")
        except BaseException:
            self.sock.close()
            raise

    def send(self, frame_type, attributes=()):
        self.sock.sendall(encode(frame_type, attributes))

    def receive(self):
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if not 2 <= length <= MAX_FRAME:
                    raise ProtocolError(f"bad frame length {length}")
                if len(self.buffer) >= 4 + length:
                    frame = self.buffer[4:4 + length]
                    self.buffer = self.buffer[4 + length:]
                    (frame_type,) = struct.unpack(">H", frame[:2])
                    return frame_type, decode_attributes(frame[2:])
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buffer += chunk

    def close(self):
        self.sock.close()


class Injector(Connection):
    def __init__(self, path, timeout=120):
        super().__init__(path, "inject", timeout)

    def inject(self, sender, recipients, message):
        """Returns the queue id; raises Refused, or OSError/ConnectionError
        when the connection failed (the outcome is then unknown)."""
        self.send(MAIL, [("sender", sender), ("protocol", "local")])
        for recipient in recipients:
            self.send(RCPT, [("address", recipient)])
        for offset in range(0, len(message), 65536):
            self.send(BODY, [("data", message[offset:offset + 65536])])
        self.send(END)
        frame_type, attributes = self.receive()
        if frame_type == ACCEPTED:
            return attributes["queue-id"]
        if frame_type == REFUSED:
            raise Refused(attributes.get("code"), attributes.get("status"), attributes.get("text"))
        raise ProtocolError(f"unexpected answer {frame_type} {attributes}")


def control(path, verb, **extra):
    """One control REQUEST; returns (entries, done_attributes)."""
    connection = Connection(path, "control")
    try:
        attributes = [("verb", verb)] + [(k.replace("_", "-"), v) for k, v in extra.items()]
        connection.send(REQUEST, attributes)
        entries = []
        while True:
            frame_type, attributes = connection.receive()
            if frame_type == DONE:
                return entries, attributes
            if frame_type == ENTRY:
                entries.append({"entry": attributes, "recipients": []})
            elif frame_type == ENTRY_RCPT and entries:
                entries[-1]["recipients"].append(attributes)
            elif frame_type == ERROR:
                raise ProtocolError(f"ERROR {attributes}")
    finally:
        connection.close()
