"""Certificate reload after the privilege drop (issue 4): crypto-negotiate
runs chrooted as its own user and cannot reopen its key files; the
supervisor (root) opens them and passes the descriptors over the
certificate channel (Pipeline/PROTOCOL.md section 7), on SIGHUP and when a
file changes. New handshakes get the new certificate; a session opened
before keeps working; a bad file keeps the certificates in use."""

import hashlib
import os
import pathlib
import signal
import smtplib
import ssl
import subprocess


from conftest import IS_ROOT, local_user, port_of, wait_until
from test_starttls import client_context, tls_pipeline  # noqa: F401 (fixture)

PAIRS = [("self-signed-ecdsa.crt", "self-signed-ecdsa.key", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
         ("self-signed-rsa.crt", "self-signed-rsa.key", ["-newkey", "rsa:2048"])]


def fingerprint_of_file(path):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pathlib.Path(path).read_text())).hexdigest()


def replace_certificates(pipe, tag):
    """New self-signed pairs written next to the old and renamed over them
    (as certbot and editors do), owned by root, keys 0600: crypto-negotiate's
    user could not read them even without its chroot. Returns the new
    certificates' fingerprints."""
    directory = pipe.data / "tls"
    fingerprints = set()
    for cert, key, algorithm in PAIRS:
        subprocess.run(["openssl", "req", "-x509", *algorithm, "-nodes", "-days", "30",
                        "-subj", f"/CN={tag}.reload.test", "-keyout", str(directory / (key + ".new")),
                        "-out", str(directory / (cert + ".new"))], check=True, capture_output=True)
        os.chmod(directory / (key + ".new"), 0o600)
        os.rename(directory / (key + ".new"), directory / key)
        os.rename(directory / (cert + ".new"), directory / cert)
        fingerprints.add(fingerprint_of_file(directory / cert))
    return fingerprints


class Session:
    """An SMTP session under STARTTLS, kept open."""

    def __init__(self, port):
        self.client = smtplib.SMTP("127.0.0.1", port, timeout=60)
        self.client.ehlo("client.example")
        self.client.starttls(context=client_context())
        self.client.ehlo("client.example")
        self.fingerprint = hashlib.sha256(self.client.sock.getpeercert(binary_form=True)).hexdigest()

    def close(self):
        try:
            self.client.quit()
        except (smtplib.SMTPException, OSError):
            pass


def presented(port):
    """The fingerprint of the certificate a new STARTTLS handshake shows."""
    session = Session(port)
    session.close()
    return session.fingerprint


def test_new_certificates_reach_a_chrooted_crypto_negotiate_without_dropping_sessions(tls_pipeline):
    pipe = tls_pipeline
    port = port_of(pipe, "listen")
    pid = pipe.running_pid("crypto-negotiate")
    if IS_ROOT:
        # Chrooted into an empty directory, its own user: the tls/ files are
        # out of its reach (test_isolation checks the confinement itself).
        assert os.readlink(f"/proc/{pid}/root") == str(pipe.data / "empty")
    environment = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"SEALPOST_CERTIFICATE_FD=3" in environment
    original = {fingerprint_of_file(pipe.data / "tls" / cert) for cert, _, _ in PAIRS}
    before = Session(port)
    try:
        assert before.fingerprint in original

        # SIGHUP: the supervisor sends the new files.
        new = replace_certificates(pipe, "first")
        pipe.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded 2 certificate(s) from the supervisor (SIGHUP)" in pipe.log_text(), 60,
                   f"crypto-negotiate to reload\n{pipe.log_tail()}")
        after = presented(port)
        assert after in new and after not in original

        # The session opened before still works (on its own certificate).
        assert before.client.sendmail("a@example.org", [f"{local_user()}@localhost"],
                                      b"Subject: across the reload\r\n\r\nstill here\r\n") == {}
        wait_until(lambda: pipe.delivered(local_user()), 60, "delivery of the message sent across the reload")

        # A change alone (no signal) is noticed by the supervisor.
        newer = replace_certificates(pipe, "second")
        wait_until(lambda: presented(port) in newer, 90, f"the changed files to be served\n{pipe.log_tail()}")
        assert "from the supervisor (changed: " in pipe.log_text()

        # A broken file: the certificates in use stay, with a warning.
        broken = pipe.data / "tls" / "self-signed-ecdsa.crt.new"
        broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        os.rename(broken, pipe.data / "tls" / "self-signed-ecdsa.crt")
        pipe.process.send_signal(signal.SIGHUP)
        wait_until(lambda: pipe.log_text().count("reload failed, keeping the certificates loaded before") >= 1, 60,
                   f"the warning about the broken file\n{pipe.log_tail()}")
        assert presented(port) in newer
        assert pipe.stage_pid("crypto-negotiate") == pid, "no restart was needed"
    finally:
        before.close()
