"""Redis at the edge: it tells the other instances that an alert changed, and nothing else.

No decision, reason or flag ever depends on what Redis holds: the service reads nothing
from Redis on the decision path, so a Redis that is down, flushed, restarted, rolled back
or written by someone else changes no answer (tests/integration/test_hostile_cache.py).
What it carries is a wake-up: a subscriber that misses one still finds the alert in
PostgreSQL at its next poll (``services/alertfeed.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

ALERT_CHANNEL = b"replayguard:alerts"
MAX_ALERT_ID = 2**63 - 1  # alerts.id is a bigint


class AlertFanout:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self.healthy = True

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
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self.healthy = True
        return True

    async def publish_alert(self, alert_id: int) -> None:
        """Tells every instance an alert changed (fan-out of the live stream)."""
        try:
            await self._redis.publish(ALERT_CHANNEL, str(alert_id))
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def alert_ids(self) -> AsyncIterator[int]:
        """Alert ids as instances publish them; raises RedisError/OSError when Redis goes."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(ALERT_CHANNEL)
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                data = bytes(message["data"])
                # Anyone who can write to Redis writes here: only an id PostgreSQL can hold is
                # passed on (a longer one would fail the feed's query, and end its session).
                if len(data) <= 19 and data.isdigit() and int(data) <= MAX_ALERT_ID:
                    yield int(data)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # annotated only in newer redis-py
