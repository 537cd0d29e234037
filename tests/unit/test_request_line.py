"""The access line (``logging.request_line``) is the line ``log.info("request", ...)`` writes.

It skips structlog's per-call wrapping while ``logging.configure``'s set-up is in force,
and must then write the same fields, honour the level, mask what the redactor masks, and
step aside for any other configuration (such as ``capture_logs``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from replayguard import logging as rglog

TOKEN = "rgt_" + "a1B2-c3_D4" * 4


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    old, access = structlog.get_config(), list(rglog._ACCESS)
    buffer = io.StringIO()
    rglog.configure("info", buffer)
    reset = rglog.REQUEST_CONTEXT.set({"request_id": "req-1", "route": "/v1/otp/verify"})
    yield buffer
    rglog.REQUEST_CONTEXT.reset(reset)
    structlog.configure(**old)
    rglog._ACCESS[:] = access


def _request_fields() -> dict[str, Any]:
    """The current request's fields (``configured`` sets them)."""
    fields = rglog.REQUEST_CONTEXT.get()
    assert fields is not None
    return fields


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    rglog._ACCESS[1].flush()
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def _fields(**extra: Any) -> dict[str, Any]:
    return {"method": "POST", "status": 200, "duration_ms": 1.5, **extra}


def test_it_writes_what_log_info_writes(configured: io.StringIO) -> None:
    """request_line writes the same JSON line as a structlog info call with the same fields."""
    structlog.get_logger("replayguard.http").info("request", **_fields(decision="accept"))
    rglog.request_line(_fields(decision="accept"))
    slow, fast = _lines(configured)
    assert slow.pop("timestamp") and fast.pop("timestamp")
    assert fast == slow == {"method": "POST", "status": 200, "duration_ms": 1.5, "decision": "accept",
                            "event": "request", "request_id": "req-1", "route": "/v1/otp/verify",
                            "level": "info"}


def test_it_masks_a_token_a_client_put_in_a_field(configured: io.StringIO) -> None:
    """request_line redacts a token a client put in any field, also when the same value comes again."""
    _request_fields()["request_id"] = TOKEN
    rglog.request_line(_fields(method=TOKEN.upper().replace("RGT_", "rgt_")))
    rglog.request_line(_fields())  # the same key again, after it was seen clean
    text = configured.getvalue() + json.dumps(_lines(configured))
    assert "a1B2" not in text and "A1B2" not in text
    assert [line["request_id"] for line in _lines(configured)] == [rglog.REDACTED] * 2


def test_it_honours_the_configured_level(configured: io.StringIO) -> None:
    """request_line writes nothing when the configured level is above info."""
    buffer = io.StringIO()
    rglog.configure("warning", buffer)
    rglog.request_line(_fields())
    rglog._ACCESS[1].flush()
    assert buffer.getvalue() == ""


def test_it_gives_way_to_capture_logs(configured: io.StringIO) -> None:
    """Inside structlog's capture_logs, request_line's events are captured and not written."""
    with capture_logs() as events:
        rglog.request_line(_fields(reason="ok"))
    assert [(e["event"], e["reason"]) for e in events] == [("request", "ok")]
    assert _lines(configured) == []


def test_stdlib_records_become_redacted_json_lines_without_tracebacks(configured: io.StringIO) -> None:
    """A library's log record (aiohttp's parse errors quote the header line they refuse)
    is one JSON line through the same redaction, its exception named by type only."""
    logger = logging.getLogger("tests.bridge")
    bridge = rglog.StdlibBridge()
    logger.addHandler(bridge)
    logger.propagate = False
    try:
        try:
            raise ValueError(f"Invalid header value char: b'Authorization: Bearer {TOKEN}\\x01'")
        except ValueError:
            logger.exception("Error handling request %s", f"Bearer {TOKEN}")
    finally:
        logger.removeHandler(bridge)
        logger.propagate = True
    text = configured.getvalue() + "".join(json.dumps(line) for line in _lines(configured))
    lines = _lines(configured)
    assert len(lines) == 1 and lines[0]["level"] == "error" and lines[0]["error"] == "ValueError"
    assert lines[0]["logger"] == "tests.bridge"
    assert TOKEN not in text and "Traceback" not in text and "Invalid header" not in text


def test_its_line_is_the_chains_byte_for_byte(configured: io.StringIO) -> None:
    """The access line's text, key order included, is what ``log.info`` writes through the
    configured processors, but for the time: with the request's fields merged after the
    line's own (a field of the line keeps its value), the level, and what is redacted."""
    _request_fields()["status"] = 599
    _request_fields()["caller"] = "tok_x"
    fields = _fields(decision="reject", reason="invalid", note="Bearer " + TOKEN)
    structlog.get_logger("replayguard.http").info("request", **dict(fields))
    rglog.request_line(dict(fields))
    rglog._ACCESS[1].flush()
    slow, fast = (line.rsplit(',"timestamp":', 1)[0] for line in configured.getvalue().splitlines())
    assert fast == slow
    assert '"status":200' in fast and '"caller":"tok_x"' in fast and TOKEN not in fast
