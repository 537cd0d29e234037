"""Concurrent hot-cache commands share Redis pipelines, against a real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from replayguard.cache import HotCache, Pipeliner
from tests.integration.owned_servers import OwnedRedis


async def test_concurrent_commands_share_round_trips(owned_redis: OwnedRedis) -> None:
    client = aioredis.from_url(owned_redis.url)
    sizes: list[int] = []
    pipe = Pipeliner(client, sizes.append)
    try:
        await asyncio.gather(*(pipe.call("SET", f"k{i}", str(i)) for i in range(200)))
        values = await asyncio.gather(*(pipe.call("MGET", f"k{i}", f"k{i + 1}", "nope") for i in range(199)))
        assert values[7] == [b"7", b"8", None]
        assert pipe.pipelines <= 4 and sum(sizes) == 399  # 399 commands, not 399 round trips
        rounds = pipe.pipelines
        # A lone command goes without a pipeline, with the same answers and failures.
        with pytest.raises(RedisError):  # a command Redis refuses fails alone
            await pipe.call("INCR", "k1", "extra-argument")
        assert await pipe.call("GET", "k1") == b"1"
        assert await pipe.call("MGET", "k1", "nope") == [b"1", None]
        assert pipe.pipelines == rounds + 3
    finally:
        await pipe.close()
        await client.aclose()


async def test_a_cancelled_caller_does_not_disturb_the_others(owned_redis: OwnedRedis) -> None:
    client = aioredis.from_url(owned_redis.url)
    pipe = Pipeliner(client)
    try:
        gone = asyncio.ensure_future(pipe.call("SET", "a", "1"))
        kept = asyncio.ensure_future(pipe.call("SET", "b", "2"))
        await asyncio.sleep(0)
        gone.cancel()
        assert await kept is True
        assert await pipe.call("MGET", "a", "b") == [b"1", b"2"]  # the cancelled write still went
    finally:
        await pipe.close()
        await client.aclose()


async def test_redis_down_is_a_miss_then_recovers(owned_redis: OwnedRedis) -> None:
    cache = HotCache.from_url(owned_redis.url)
    try:
        await cache.record(vm_id="vm-1", epoch=3, rseq=9, digest=b"\x01" * 32, seq=5)
        found = await cache.lookup([b"\x01" * 32], "vm-1")
        assert found.hit is not None and (found.hit.first_vm, found.hit.vm_epoch) == ("vm-1", 3)
        await asyncio.to_thread(owned_redis.stop)
        lookups = await asyncio.gather(*(cache.lookup([b"\x01" * 32], "vm-1", "alice") for _ in range(5)))
        assert all(found.hit is None and found.locked_until_us == 0 for found in lookups)
        await cache.record(vm_id="vm-1", epoch=4, rseq=10, digest=None, seq=6)  # logged, forgotten
        assert not cache.healthy
        await asyncio.to_thread(owned_redis.start)
        assert await cache.ping()
        await cache.record(vm_id="vm-1", epoch=4, rseq=10, digest=b"\x02" * 32, seq=7)
        found = await cache.lookup([b"\x02" * 32], "vm-1")
        assert found.hit is not None and found.hit.vm_epoch == 4
    finally:
        await cache.close()
