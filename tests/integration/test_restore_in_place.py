"""The database restored in place under running services (a backup put back, a lagging
standby promoted behind the same URL): what the running process notices by itself."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg

from replayguard.settings import Secret
from tests.conftest import Api
from tests.integration.db_restore import restore, scratch_dbs, settled, snapshot
from tests.waiting import blocked_by, until

__all__ = ["scratch_dbs"]  # a fixture
QUIET = {"checkpoint_every": 1000, "checkpoint_interval_s": 3600}  # no checkpoint to compare with


async def nonce(api: Api, value: str) -> tuple[int, Any]:
    return await api.post("/v1/nonces/consume", {"vm_id": "vm-1", "scope": "s", "nonce": value})


async def ready(api: Api) -> bool:
    return (await api.client.get("/readyz")).status == 200


async def after_next_check(api: Api) -> None:
    """Returns once this instance's guard finished another periodic check."""
    runs = api.runtime.continuity.background.runs
    before = runs.get("continuity", 0)
    await until(lambda: runs.get("continuity", 0) > before, "the next continuity check", timeout=10)


async def test_a_replay_in_flight_with_the_decision_that_reveals_the_restore_is_refused(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Nonce N accepted, then the database restored to a copy from just before it. Two
    decisions in flight together, an unrelated nonce and then N: the first commits at the
    floor and is refused 503 ledger_rollback; N commits right after it, past the floor it
    was admitted with, and is refused too, since the process already knew."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **QUIET)
    for _ in range(3):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    scratch_dbs.append(await snapshot(dsn))
    await until(lambda: ready(api), "the service to be ready again", timeout=15)
    lost = secrets.token_hex(8)
    status, body = await settled(lambda: nonce(api, lost))
    assert (status, body["decision"]) == (200, "accept"), body
    await after_next_check(api)
    scratch_dbs.append(await restore(dsn, scratch_dbs[0]))
    scratch_dbs.remove(scratch_dbs[0])

    holder, monitor = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT seq FROM ledger_head WHERE id FOR UPDATE")  # the head lock, held a moment
            first = asyncio.create_task(settled(lambda: nonce(api, secrets.token_hex(8))))
            await blocked_by(monitor, holder.get_server_pid())
            replay = asyncio.create_task(nonce(api, lost))
            await until(lambda: len(api.runtime.appender._queue) > 0, "the replay queued behind the first")
        (s1, b1), (s2, b2) = await asyncio.gather(first, replay)
    finally:
        await holder.close()
        await monitor.close()
    assert (s1, b1["error"]["code"]) == (503, "ledger_rollback"), b1
    assert s2 == 503 and b2.get("error", {}).get("code") == "ledger_rollback", b2  # not an accept of N
    assert not await ready(api)
