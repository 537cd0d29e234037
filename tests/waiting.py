"""Waiting on observable conditions with a bounded deadline (never on a fixed time)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, overload

T = TypeVar("T")


# Two signatures, not one taking ``Awaitable[T] | T``: mypy cannot solve T against that union
# (it infers Never), and only a truthy value is returned, so a probe answering ``X | None``
# yields an ``X``.
@overload
async def until(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = ..., every: float = ...
) -> T: ...
@overload
async def until(probe: Callable[[], T | None], what: str, timeout: float = ..., every: float = ...) -> T: ...
async def until(probe: Callable[[], Any], what: str, timeout: float = 10.0, every: float = 0.01) -> Any:
    """Polls ``probe`` (a plain or an async callable) until it returns something truthy and
    returns that; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


async def blocked_by(monitor: Any, blocker_pid: int, timeout: float = 10.0) -> list[int]:
    """Waits until some backend waits on a lock held by ``blocker_pid`` (pg_blocking_pids); returns their pids.

    ``monitor`` must be a connection outside any transaction: pg_stat_activity is a
    per-transaction snapshot.
    """
    async def waiting() -> list[int]:
        rows = await monitor.fetch(
            "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
            " AND wait_event_type = 'Lock'", blocker_pid)
        return [row["pid"] for row in rows]

    return await until(waiting, f"a backend blocked by pid {blocker_pid}", timeout)


class CountedLock(asyncio.Lock):
    """A lock that says how many wait for it (a probe: the locking is asyncio's)."""

    waiting = 0

    async def acquire(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1
