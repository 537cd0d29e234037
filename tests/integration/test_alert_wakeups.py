"""Redis pub/sub wake-ups must never put anything on an alert stream that PostgreSQL did not change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from replayguard.settings import Secret
from tests.conftest import REDIS_URL, Api, uid
from tests.waiting import until

OTHER_DB_REDIS = REDIS_URL.rpartition("/")[0] + "/6"  # the same Redis server, another DB number


async def _open_stream(api: Api) -> aiohttp.ClientResponse:
    resp = await api.client.get("/v1/alerts/stream", headers=api.auth("analyst"))
    assert resp.status == 200
    assert (await resp.content.readline()).startswith(b"retry:")  # subscribed to the feed by now
    return resp


async def _reuse_alert(api: Api) -> str:
    """Raises a fresh `reuse` alert through ``api``; returns its id."""
    vm_id, scope, nonce = uid("vm"), uid("scope"), uid("nonce")
    status, first = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
    assert status == 200 and first["decision"] == "accept", first
    status, again = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
    assert status == 200 and again["reason"] == "reused" and again.get("alert_id"), again
    return str(again["alert_id"])


async def _frames_until(resp: aiohttp.ClientResponse, alert_id: str, seen: list[dict[str, Any]]) -> None:
    async def read() -> None:
        while True:
            line = await resp.content.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                data = orjson.loads(line[6:])
                seen.append(data)
                if data["id"] == alert_id:
                    return

    await asyncio.wait_for(read(), 20)


async def test_another_deployments_alert_on_a_shared_redis_does_not_replay_our_old_alert(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """An alert id published by another deployment sharing the Redis server (another database,
    another Redis DB number) is not ours: our stream shows no event for our unchanged alert of that id."""
    ours = await fresh_database()
    theirs = await fresh_database()
    # Our deployment: an alert raised some time ago (by an instance without Redis).
    earlier = await api_factory(database_url=Secret(ours))
    old_alert = await _reuse_alert(earlier)
    # Our instance with Redis, started after it: its stream opens on an unchanged alert table.
    instance = await api_factory(database_url=Secret(ours), redis_url=Secret(REDIS_URL))
    fanout = instance.runtime.fanout
    assert fanout is not None
    await until(lambda: fanout.subscribed, "our instance subscribed to the alert channel")
    resp = await _open_stream(instance)
    # Another tenant's deployment on the same Redis server, its own database and DB number,
    # raises its own alert: its first alert has the id of ours.
    neighbour = await api_factory(database_url=Secret(theirs), redis_url=Secret(OTHER_DB_REDIS))
    assert await _reuse_alert(neighbour) == old_alert
    seen: list[dict[str, Any]] = []
    try:
        # Two genuine changes of ours after it, each awaited on the stream.
        await _frames_until(resp, await _reuse_alert(instance), seen)
        await _frames_until(resp, await _reuse_alert(instance), seen)
    finally:
        resp.close()
    replayed = [frame for frame in seen if frame["id"] == old_alert]
    assert not replayed, f"our unchanged alert {old_alert} was streamed as a change: {replayed}"
