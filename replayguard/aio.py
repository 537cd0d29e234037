"""The running event loop without a system call per lookup, and background tasks tied to a block.

``asyncio.get_running_loop()`` calls ``getpid()`` every time in CPython 3.11 (it checks
that the process did not fork), and glibc (2.25 and later) does not cache the pid: on the
decision path, which looks the loop up several times per request, a native profile puts
4 % of a worker's samples in that system call. ``running_loop`` remembers the loop last found and
the thread it runs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any

_last: list[object] = [None, 0]  # the loop last found, and the thread it was found in


def running_loop() -> asyncio.AbstractEventLoop:
    """The event loop running in this thread; ``RuntimeError`` when there is none."""
    loop, thread = _last
    if loop is not None and thread == threading.get_ident() and loop.is_running():  # type: ignore[attr-defined]
        return loop  # type: ignore[return-value]
    found = asyncio.get_running_loop()
    _last[:] = [found, threading.get_ident()]
    return found


@contextlib.asynccontextmanager
async def in_background(work: Coroutine[Any, Any, object], name: str) -> AsyncIterator[asyncio.Task[object]]:
    """``work`` runs as a task while the block runs; it is cancelled, and awaited, as the block ends."""
    task = asyncio.create_task(work, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
