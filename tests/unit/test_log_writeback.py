"""The service's log, written to a file, has its write-back started as it is written
(``replayguard/logging.py``, ``LogWriteback``), so the kernel does not gather half a
minute of it to write back in one burst in front of the WAL's flush."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import pytest

from replayguard import logging as rglog
from replayguard import page_cache
from tests.waiting import until

pytestmark = pytest.mark.skipif(not page_cache.available(), reason="sync_file_range is Linux's")


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Each fd the log's write-back hands to the kernel, with what the real call answered."""
    calls: list[tuple[int, bool]] = []
    real = page_cache.start_writeback_fd

    def recording(fd: int) -> bool:
        answered = real(fd)
        calls.append((fd, answered))
        return answered

    monkeypatch.setattr(page_cache, "start_writeback_fd", recording)
    return calls


def test_a_log_written_to_a_file_is_handed_to_the_kernel_after_its_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines written to a regular file start its write-back within the interval, on the
    file's own descriptor, and the kernel accepts the call."""
    calls = _calls(monkeypatch)
    with (tmp_path / "service.log").open("w") as stream:
        writer = rglog.LineWriter(stream)
        fd = stream.fileno()
        assert writer.writeback is not None and writer.writeback.fd == fd
        writer.writeback.interval_s = 0.01
        writer.info('{"event": "request"}')  # no event loop here: written at once
        asyncio.run(until(lambda: calls, "a write-back pass"))
    assert calls[0] == (fd, True)
    assert (tmp_path / "service.log").read_text() == '{"event": "request"}\n'


def test_an_idle_log_is_not_handed_to_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass follows written lines only: none while nothing is written, one more after the
    next line."""
    calls = _calls(monkeypatch)
    with (tmp_path / "service.log").open("w") as stream:
        writer = rglog.LineWriter(stream)
        assert writer.writeback is not None
        writer.writeback.interval_s = 0.01
        writer.warning('{"event": "first"}')
        asyncio.run(until(lambda: calls, "the first pass"))
        time.sleep(0.2)  # twenty intervals with nothing written
        assert len(calls) == 1
        writer.warning('{"event": "second"}')
        asyncio.run(until(lambda: len(calls) == 2, "the second pass"))


def test_a_log_that_is_no_regular_file_has_no_write_back(tmp_path: Path) -> None:
    """A pipe (journald, a supervisor), a character device or a stream in memory: nothing to
    write back, and nothing is started."""
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "w") as pipe, open(os.devnull, "w") as null:
            assert rglog.log_writeback(pipe) is None
            assert rglog.log_writeback(null) is None
            assert rglog.log_writeback(io.StringIO()) is None
            assert rglog.LineWriter(pipe).writeback is None
    finally:
        os.close(read_end)
    with (tmp_path / "a.log").open("w") as regular:
        assert rglog.log_writeback(regular) is not None
