"""``aio.running_loop``: the loop ``asyncio.get_running_loop`` would give, remembered."""

from __future__ import annotations

import asyncio
import threading

import pytest
import uvloop

from replayguard.aio import running_loop


async def _found() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
    return running_loop(), running_loop(), asyncio.get_running_loop()


def test_outside_a_loop_it_raises_like_asyncio() -> None:
    """Outside a running loop, running_loop raises RuntimeError like asyncio does, even after a loop was remembered."""
    asyncio.run(_found())  # remembers a loop that is now closed
    with pytest.raises(RuntimeError):
        running_loop()


def test_each_new_loop_in_a_thread_is_found() -> None:
    """Each new loop run in a thread (asyncio's or uvloop's) is the one running_loop gives."""
    for runner in (asyncio.run, uvloop.run, asyncio.run):
        first, second, actual = runner(_found())
        assert first is second is actual


def test_a_loop_in_another_thread_is_never_given_out() -> None:
    """running_loop never gives one thread the loop another thread is running."""
    seen: dict[str, tuple[object, object]] = {}
    started, release = threading.Event(), threading.Event()

    async def hold(name: str) -> None:
        loop, _, actual = await _found()
        seen[name] = (loop, actual)
        started.set()
        await asyncio.to_thread(release.wait)
        loop, _, actual = await _found()  # after the other thread looked its own loop up
        seen[name + "-again"] = (loop, actual)

    other = threading.Thread(target=asyncio.run, args=(hold("other"),))
    other.start()
    started.wait(5)
    mine = asyncio.run(_found())
    release.set()
    other.join(5)
    assert mine[0] is mine[2]
    assert all(loop is actual for loop, actual in seen.values())
    assert seen["other"][0] is not mine[0]
