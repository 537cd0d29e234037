"""Redis at the edge: the hot replay cache and the lockout cache.

Redis only ever makes a *reject* cheaper; it never decides an accept. Every value here is
written after PostgreSQL committed the fact it mirrors, and any Redis error is a miss,
so a Redis that is down, restarted or flushed changes speed, never a decision.

Keys: ``rg:use:<digest hex>`` → {"vm", "epoch", "seq"} of a credential's first use;
``rg:vm:<vm_id>`` → {"epoch", "rseq"} the VM's epoch and receipt position;
``rg:lock:<principal>`` → locked-until (µs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from .aio import running_loop

log = structlog.get_logger(__name__)

ALERT_CHANNEL = b"replayguard:alerts"
MAX_PIPELINE = 512


class Pipeliner:
    """Redis commands issued together share one pipeline: one round trip, one connection.

    A lone command goes at once; while a pipeline is in flight, newer commands queue and
    go together in the next one (the group commit of the hot path). A pipeline that fails
    fails every command in it with the Redis error (callers treat that as a miss).
    """

    def __init__(self, client: aioredis.Redis, on_pipeline: Callable[[int], None] | None = None) -> None:
        self._redis = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._on_pipeline = on_pipeline
        self.pipelines = 0  # how many round trips were made

    def submit(self, *command: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = running_loop().create_future()
        self._queue.append((command, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return future

    async def call(self, *command: Any) -> Any:
        return await self.submit(*command)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_PIPELINE], self._queue[MAX_PIPELINE:]
                await self._send(batch)
        finally:
            self._task = None

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        self.pipelines += 1
        if self._on_pipeline is not None:
            self._on_pipeline(len(batch))
        try:
            if len(batch) == 1:  # a pipeline of one costs a third more than the command
                try:
                    results = [await self._redis.execute_command(*batch[0][0])]  # type: ignore[no-untyped-call]
                except ResponseError as exc:  # refused by Redis: fails alone, as in a pipeline
                    results = [exc]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for command, _ in batch:
                        pipe.execute_command(*command)
                    results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                if not future.done():
                    future.set_exception(RedisError("the Redis pipeline was interrupted"))
            raise
        for (_, future), result in zip(batch, results):
            if future.done():
                continue  # its caller gave up (cancelled)
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class HotHit:
    """A credential Redis knows was used, and the VM state the hot path needs."""

    digest: bytes
    first_vm: str
    first_epoch: int
    vm_epoch: int
    vm_rseq: int


@dataclass(frozen=True, slots=True)
class HotLookup:
    hit: HotHit | None
    locked_until_us: int


def _first_hit(digests: list[bytes], uses: list[bytes | None], vm_raw: bytes | None) -> HotHit | None:
    if vm_raw is None:
        return None
    vm = orjson.loads(vm_raw)
    for digest, raw in zip(digests, uses):
        if raw is not None:
            use = orjson.loads(raw)
            return HotHit(digest, use["vm"], use["epoch"], vm["epoch"], vm["rseq"])
    return None


class HotCache:
    VM_REFRESH_S = 60.0

    def __init__(self, client: aioredis.Redis, ttl_s: int = 3600,
                 on_pipeline: Callable[[int], None] | None = None) -> None:
        self._redis = client
        self._pipe = Pipeliner(client, on_pipeline)
        self._ttl = ttl_s
        self.healthy = True
        # What this process last wrote for each VM, so that an unchanged state is not
        # written again on every decision (rewritten after VM_REFRESH_S, in case of a flush).
        self._written: dict[str, tuple[int, int, float]] = {}

    @classmethod
    def from_url(cls, url: str, on_pipeline: Callable[[int], None] | None = None) -> HotCache:
        client = aioredis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25, retry_on_timeout=False)
        return cls(client, on_pipeline=on_pipeline)

    async def close(self) -> None:
        await self._pipe.close()
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

    async def lookup(self, digests: list[bytes], vm_id: str, principal: str | None = None) -> HotLookup:
        """One round trip: which of ``digests`` Redis has seen used (with the VM's current
        state), and until when ``principal`` is locked out."""
        keys = [b"rg:use:" + d.hex().encode() for d in digests] + [b"rg:vm:" + vm_id.encode()]
        if principal is not None:
            keys.append(b"rg:lock:" + principal.encode())
        try:
            values: list[bytes | None] = cast("list[bytes | None]", await self._pipe.call("MGET", *keys))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return HotLookup(None, 0)
        self.healthy = True
        lock_raw = values.pop() if principal is not None else None
        vm_raw = values.pop()
        return HotLookup(_first_hit(digests, values, vm_raw), int(lock_raw) if lock_raw is not None else 0)

    async def record(
        self, *, vm_id: str, epoch: int, rseq: int, digest: bytes | None, seq: int,
        ttl_s: int | None = None,
    ) -> None:
        """Mirrors what PostgreSQL just committed; errors are logged and forgotten."""
        now = time.monotonic()
        last = self._written.get(vm_id)
        vm_changed = last is None or last[:2] != (epoch, rseq) or now - last[2] > self.VM_REFRESH_S
        if not vm_changed and digest is None:
            return
        writes = []
        if vm_changed:
            writes.append(self._pipe.submit(
                "SET", b"rg:vm:" + vm_id.encode(), orjson.dumps({"epoch": epoch, "rseq": rseq}), "EX", self._ttl))
        if digest is not None:
            value = orjson.dumps({"vm": vm_id, "epoch": epoch, "seq": seq})
            writes.append(self._pipe.submit("SET", b"rg:use:" + digest.hex().encode(), value, "EX", ttl_s or self._ttl))
        failures = [r for r in await asyncio.gather(*writes, return_exceptions=True) if isinstance(r, BaseException)]
        if failures:
            if not isinstance(failures[0], (RedisError, OSError)):
                raise failures[0]
            self._failed(failures[0])
            self._written.pop(vm_id, None)
            return
        if vm_changed:
            if len(self._written) > 100_000:
                self._written.clear()
            self._written[vm_id] = (epoch, rseq, now)

    async def set_lock(self, principal: str, locked_until_us: int, now_us: int) -> None:
        ttl_ms = (locked_until_us - now_us) // 1000
        if ttl_ms <= 0:
            return
        try:
            await self._pipe.call("SET", b"rg:lock:" + principal.encode(), str(locked_until_us), "PX", ttl_ms)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def clear_lock(self, principal: str) -> None:
        """Forgets the principal's lockout (an administrator unlocked it in the ledger)."""
        try:
            await self._pipe.call("DEL", b"rg:lock:" + principal.encode())
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def publish_alert(self, alert_id: int) -> None:
        """Tells every instance an alert changed (fan-out of the live stream)."""
        try:
            await self._pipe.call("PUBLISH", ALERT_CHANNEL, str(alert_id))
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def alert_ids(self) -> AsyncIterator[int]:
        """Alert ids as instances publish them; raises RedisError/OSError when Redis goes."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(ALERT_CHANNEL)
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and bytes(message["data"]).isdigit():
                    yield int(message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    async def forget_vm(self, vm_id: str) -> None:
        """Drops a VM's cached state (its epoch changed: hot answers must go to PostgreSQL)."""
        self._written.pop(vm_id, None)
        try:
            await self._pipe.call("DEL", b"rg:vm:" + vm_id.encode())
        except (RedisError, OSError) as exc:
            self._failed(exc)
