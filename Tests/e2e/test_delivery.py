"""Mail through the whole pipeline: queue-inject -> queue -> local-deliver -> Maildir."""

import shutil

import pytest

from conftest import CHECKOUT, Pipeline, local_user, parse_message, require_build, wait_until


def test_first_message_lands_in_the_maildir_with_trace_headers(pipeline):
    user = local_user()
    result = pipeline.queue_inject("-f", "me@localhost", f"{user}@localhost",
                                   message=b"Subject: hi\n\nbody\n")
    assert result.returncode == 0, result.stderr.decode()
    files = wait_until(lambda: pipeline.delivered(user), 60, f"a message in {pipeline.maildir_new(user)}")
    assert len(files) == 1
    message = parse_message(files[0])
    assert message["Subject"] == "hi"
    assert message["Received"] is not None
    assert message["Date"] is not None
    assert message["Message-ID"] is not None
    assert message.get_content().strip() == "body"
    raw = files[0].read_bytes()
    assert b"\nbody" in raw


def test_unknown_local_user_bounces_a_dsn_to_the_sender(pipeline):
    user = local_user()
    result = pipeline.queue_inject("-f", f"{user}@localhost", "no-such-user-e2e@localhost",
                                   message=b"Subject: lost\n\nto nobody\n")
    assert result.returncode == 0, result.stderr.decode()
    files = wait_until(lambda: pipeline.delivered(user), 60, "the DSN in the sender's Maildir")
    report = parse_message(files[0])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = [part.get_content_type() for part in report.iter_parts()]
    assert "message/delivery-status" in parts, parts
    status = next(p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "no-such-user-e2e@localhost" in text
    assert "Action: failed" in text
    assert "Status: 5." in text


def test_local_deliver_swapped_for_a_python_program(workdir):
    """Pipeline/PROTOCOL.md is all a stage needs: the Python deliver.py,
    written from that page, takes local-deliver's place in the stages file."""
    fixture = CHECKOUT / "Tests" / "PipelineTests" / "Fixtures" / "deliver.py"
    if not fixture.exists():
        pytest.skip(f"{fixture.relative_to(CHECKOUT)} has not landed yet (branch localdel)")
    require_build("queue", "queue-inject")
    python = shutil.which("python3") or "/usr/bin/python3"
    stages = f"queue queue\nlocal-deliver {python} {fixture}\n"
    pipeline = Pipeline(workdir, stages=stages).start()
    try:
        user = local_user()
        result = pipeline.queue_inject("-f", "me@localhost", f"{user}@localhost",
                                       message=b"Subject: via python\n\nswapped\n")
        assert result.returncode == 0, result.stderr.decode()
        # deliver.py writes the same Maildir layout as local-deliver.
        files = wait_until(lambda: pipeline.delivered(user), 60,
                           f"deliver.py to deliver into {pipeline.maildir_new(user)}")
        assert parse_message(files[0])["Subject"] == "via python"
        pipeline.log_with("local-deliver[")
    finally:
        assert pipeline.stop() == 0
