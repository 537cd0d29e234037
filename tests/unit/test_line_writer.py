"""The log line writer: routine lines batched, warnings at once, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import io
import json

import structlog

from replayguard import logging as rglog


def _logger(buffer: io.StringIO) -> tuple[rglog.LineWriter, structlog.typing.FilteringBoundLogger]:
    writer = rglog.LineWriter(buffer)
    logger = structlog.wrap_logger(
        writer, processors=rglog.processors(), wrapper_class=structlog.make_filtering_bound_logger(0),
    )
    return writer, logger


def _events(buffer: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in buffer.getvalue().splitlines()]


def test_without_an_event_loop_every_line_is_written_at_once() -> None:
    """Outside an event loop a routine line is written at once, not buffered."""
    buffer = io.StringIO()
    _, log = _logger(buffer)
    log.info("one")
    assert _events(buffer) == ["one"]


async def test_routine_lines_wait_for_the_timer_warnings_do_not() -> None:
    """Routine lines wait for the flush timer; a warning is written at once, after the lines buffered before it."""
    buffer = io.StringIO()
    _, log = _logger(buffer)
    log.info("first")
    log.debug("second")
    assert buffer.getvalue() == ""
    log.warning("third")  # written at once, after what was buffered before it
    assert _events(buffer) == ["first", "second", "third"]
    log.info("fourth")
    await asyncio.sleep(rglog.FLUSH_S * 3)
    assert _events(buffer) == ["first", "second", "third", "fourth"]


async def test_a_full_buffer_is_written_without_waiting() -> None:
    """MAX_BUFFERED routine lines are written without waiting for the timer."""
    buffer = io.StringIO()
    _, log = _logger(buffer)
    for i in range(rglog.MAX_BUFFERED):
        log.info(f"line{i}")
    assert len(_events(buffer)) == rglog.MAX_BUFFERED


async def test_lines_buffered_on_a_loop_that_ended_still_come_out() -> None:
    """A line buffered on a loop that ended before its timer fired comes out with the next loop's flush."""
    buffer = io.StringIO()
    writer, log = _logger(buffer)

    async def inner() -> None:
        log.info("on another loop")

    await asyncio.to_thread(asyncio.run, inner())  # that loop ends before its timer fires
    log.info("on this loop")
    await asyncio.sleep(rglog.FLUSH_S * 3)
    writer.flush()
    assert sorted(_events(buffer)) == ["on another loop", "on this loop"]


def test_request_context_is_merged_and_ends_with_the_request() -> None:
    """Request fields are merged into lines logged inside the request, explicit fields win, none leak after."""
    buffer = io.StringIO()
    _, log = _logger(buffer)
    token = rglog.REQUEST_CONTEXT.set({"request_id": "r1", "caller": "tok_1"})
    log.info("inside", caller="explicit")
    rglog.REQUEST_CONTEXT.reset(token)
    log.info("outside")
    inside, outside = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert inside["request_id"] == "r1" and inside["caller"] == "explicit"
    assert "request_id" not in outside and "caller" not in outside


def test_timestamps_are_iso_utc_with_microseconds() -> None:
    """Timestamps are ISO 8601 UTC with microseconds and never go backwards."""
    import re

    stamps = [rglog.timestamp(None, "info", {})["timestamp"] for _ in range(3)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", s) for s in stamps)
    assert stamps == sorted(stamps)
