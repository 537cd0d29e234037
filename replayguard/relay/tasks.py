"""Running a relay's long-lived tasks together: when one ends, they all end.

Each task is meant to run until the relay is stopped; one that ends early (a bug, a full
disk, a closed connection) must end its siblings too, instead of leaving the relay half
alive, and what it raised must reach the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def until_first_done(*coros: Coroutine[Any, Any, object]) -> None:
    """Run the coroutines until one ends, cancel the rest, and re-raise what it raised."""
    done = await first_done(*coros)
    for task in done:
        if (exc := task.exception()) is not None:
            raise exc


async def first_done(*coros: Coroutine[Any, Any, object]) -> set[asyncio.Task[object]]:
    """Run the coroutines until one ends; cancel and await the rest; return the finished."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done
