"""Redis at the edge: it tells the other instances that an alert changed, and nothing else.

No decision, reason or flag ever depends on what Redis holds: the service reads nothing
from Redis on the decision path, so a Redis that is down, flushed, restarted, rolled back
or written by someone else changes no answer (tests/integration/test_hostile_cache.py).
What it carries is a wake-up: a subscriber that misses one still finds the alert in
PostgreSQL at its next poll (``services/alertfeed.py``), and what a message says is never
read, since anyone who can write to Redis (another deployment on the same server: pub/sub
ignores the DB number) can publish on the channel. A server that answers something
malformed is a Redis that is down: redis-py raises what it likes then (``ValueError``,
``AttributeError``), and none of it may reach a decision's answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import structlog

log = structlog.get_logger(__name__)

ALERT_CHANNEL = b"replayguard:alerts"


class AlertFanout:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self.healthy = True
        self.subscribed = False  # whether ``wakeups`` is subscribed to the alert channel now

    @classmethod
    def from_url(cls, url: str) -> AlertFanout:
        client = aioredis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25, retry_on_timeout=False)
        return cls(client)

    async def close(self) -> None:
        await self._redis.aclose()

    def _failed(self, exc: BaseException) -> None:
        if self.healthy:
            log.warning("redis_unavailable", error=type(exc).__name__)
        self.healthy = False

    async def ping(self) -> bool:
        try:
            await self._redis.ping()
        except Exception as exc:  # noqa: BLE001 - whatever a broken server makes redis-py raise
            self._failed(exc)
            return False
        self.healthy = True
        return True

    async def publish_alert(self, alert_id: int) -> None:
        """Tells every instance an alert changed (fan-out of the live stream)."""
        try:
            await self._redis.publish(ALERT_CHANNEL, str(alert_id))
        except Exception as exc:  # noqa: BLE001 - the decision is committed: its answer must not fail here
            self._failed(exc)

    async def wakeups(self) -> AsyncIterator[None]:
        """One item per message on the alert channel, whatever it says; raises when Redis goes."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(ALERT_CHANNEL)
            self.subscribed = True
            while True:
                if await pubsub.get_message(timeout=1.0) is not None:
                    yield None
        finally:
            self.subscribed = False
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # annotated only in newer redis-py
