"""``replayguard alerts follow`` over a stream that replays from the start: what it prints."""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from replayguard.cli import operator
from replayguard.cli.service_client import EXIT_OK


def _alert(alert_id: str, change: int, status: str = "open") -> dict[str, Any]:
    return {"id": alert_id, "change": change, "status": status}


class _Stream:
    """A stand-in for the service's stream: one scripted connection per call, each a list of
    (id, alert or None) frames; records the Last-Event-ID each connection resumed from."""

    def __init__(self, *connections: list[tuple[str, dict[str, Any] | None]]) -> None:
        self._connections = list(connections)
        self.resumed_from: list[str | None] = []

    def events(self, last_id: str | None) -> Iterator[tuple[str | None, dict[str, Any] | None]]:
        self.resumed_from.append(last_id)
        yield from self._connections.pop(0)


def _follow(stream: _Stream, count: int, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # the module operator waits with
    out = io.StringIO()
    args = argparse.Namespace(last_event_id=None, count=count, json=True)
    assert operator.alerts_follow(stream, args, out) == EXIT_OK  # type: ignore[arg-type]  # a scripted stream
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_replay_from_the_start_prints_only_what_follow_had_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream drops; resumed, it goes back to the start (``id: 0``) and sends every alert
    again: the ones printed already, as they were, are not printed twice; an alert's newer
    state and an alert never seen are."""
    stream = _Stream(
        [("3.aaaaaaaaaaaaaaaa", None), ("4.bbbbbbbbbbbbbbbb", _alert("1", 4)),
         ("5.cccccccccccccccc", _alert("2", 5))],
        [("0", None), ("4.bbbbbbbbbbbbbbbb", _alert("1", 4)), ("6.dddddddddddddddd", _alert("3", 6)),
         ("7.eeeeeeeeeeeeeeee", _alert("2", 7, "acknowledged"))],
    )
    printed = _follow(stream, 4, monkeypatch)
    assert [(a["id"], a["change"]) for a in printed] == [("1", 4), ("2", 5), ("3", 6), ("2", 7)]
    assert stream.resumed_from == [None, "5.cccccccccccccccc"]


def test_bare_change_numbers_are_never_taken_for_alerts_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare number names no content (after a restore, another alert may come under it): an
    event under a number printed before is printed again."""
    stream = _Stream([("4", _alert("1", 4))], [("2", None), ("4", _alert("9", 4))])
    assert [a["id"] for a in _follow(stream, 2, monkeypatch)] == ["1", "9"]
