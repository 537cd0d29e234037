"""Redis at the edge: the hot replay cache and the lockout cache.

Redis only ever makes a *reject* cheaper; it never decides an accept. Every value here is
written after PostgreSQL committed the fact it mirrors, and any Redis error is a miss,
so a Redis that is down, restarted or flushed changes speed, never a decision.

Keys: ``rg:use:<digest hex>`` → {"vm", "epoch", "seq"} of a credential's first use;
``rg:vm:<vm_id>`` → {"epoch", "rseq"} the VM's epoch and receipt position;
``rg:lock:<principal>`` → locked-until (µs).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class HotHit:
    """A credential Redis knows was used, and the VM state the hot path needs."""

    digest: bytes
    first_vm: str
    first_epoch: int
    vm_epoch: int
    vm_rseq: int


class HotCache:
    def __init__(self, client: aioredis.Redis, ttl_s: int = 3600) -> None:
        self._redis = client
        self._ttl = ttl_s
        self.healthy = True

    @classmethod
    def from_url(cls, url: str) -> HotCache:
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

    async def lookup(self, digests: list[bytes], vm_id: str) -> HotHit | None:
        """The first of ``digests`` Redis has seen used, with the VM's current state."""
        if not digests:
            return None
        keys = [b"rg:use:" + d.hex().encode() for d in digests] + [b"rg:vm:" + vm_id.encode()]
        try:
            values = await self._redis.mget(keys)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self.healthy = True
        vm_raw = values[-1]
        if vm_raw is None:
            return None
        vm = orjson.loads(vm_raw)
        for digest, raw in zip(digests, values[:-1]):
            if raw is not None:
                use = orjson.loads(raw)
                return HotHit(digest, use["vm"], use["epoch"], vm["epoch"], vm["rseq"])
        return None

    async def locked_until(self, principal: str) -> int:
        try:
            raw = await self._redis.get(b"rg:lock:" + principal.encode())
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return 0
        return int(raw) if raw is not None else 0

    async def record(
        self, *, vm_id: str, epoch: int, rseq: int, digest: bytes | None, seq: int,
        ttl_s: int | None = None,
    ) -> None:
        """Mirrors what PostgreSQL just committed; errors are logged and forgotten."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(b"rg:vm:" + vm_id.encode(), orjson.dumps({"epoch": epoch, "rseq": rseq}), ex=self._ttl)
                if digest is not None:
                    value = orjson.dumps({"vm": vm_id, "epoch": epoch, "seq": seq})
                    pipe.set(b"rg:use:" + digest.hex().encode(), value, ex=ttl_s or self._ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def set_lock(self, principal: str, locked_until_us: int, now_us: int) -> None:
        ttl_ms = (locked_until_us - now_us) // 1000
        if ttl_ms <= 0:
            return
        try:
            await self._redis.set(b"rg:lock:" + principal.encode(), str(locked_until_us), px=ttl_ms)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def forget_vm(self, vm_id: str) -> None:
        """Drops a VM's cached state (its epoch changed: hot answers must go to PostgreSQL)."""
        try:
            await self._redis.delete(b"rg:vm:" + vm_id.encode())
        except (RedisError, OSError) as exc:
            self._failed(exc)
