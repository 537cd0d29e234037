"""A Redis that lies changes no answer: the differential hostile-cache test.

Two independent deployments (each its own database, the same keys, the same clock), one
with a Redis this test owns and one with none, receive the same request stream. Between
requests the Redis is flushed, restarted, rolled back to an older copy of every key,
has its values swapped between keys, is filled with garbage and with forged lockouts.
Every answer must be identical in both: decision, reason, flags, seq, receipt, alert_id.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import redis.asyncio as aioredis

from replayguard.core.credentials import nonce_digest
from replayguard.fanout import ALERT_CHANNEL
from replayguard.http.state import ANALYSTS
from replayguard.settings import Secret
from tests.conftest import REDIS_URL, Api, FakeClock, uid
from tests.integration.owned_servers import OwnedRedis
from tests.waiting import until

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
A_YEAR_US = 365 * 86400 * 1_000_000


@dataclass
class Twins:
    """The same request to both deployments; their answers must be equal."""

    cached: Api
    plain: Api
    receipts: dict[str, list[str]] = field(default_factory=dict)  # per VM, oldest first

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        (s1, a1), (s2, a2) = await self.cached.post(path, body), await self.plain.post(path, body)
        assert (s1, a1) == (s2, a2), (body, a1, a2)
        assert s1 == 200, a1
        assert isinstance(a1["seq"], int) and isinstance(a1["receipt"], str), a1
        self.receipts.setdefault(body["vm_id"], []).append(a1["receipt"])
        return dict(a1)

    async def nonce(self, vm: str, nonce: str, receipt: str | None = None, **extra: Any) -> dict[str, Any]:
        body = {"vm_id": vm, "scope": "hostile", "nonce": nonce, **extra}
        if receipt is not None:
            body["receipt"] = receipt
        return await self.post("/v1/nonces/consume", body)

    async def otp(self, vm: str, principal: str, code: str, receipt: str | None = None) -> dict[str, Any]:
        body = {"vm_id": vm, "principal": principal, "otp": code}
        if receipt is not None:
            body["receipt"] = receipt
        return await self.post("/v1/otp/verify", body)


async def start_twins(api_factory: Callable[..., Any], fresh_database: Callable[[], Any],
                      redis_url: str, tmp_path: Path) -> Twins:
    clock = FakeClock()
    data_dir = tmp_path / "shared-keys"  # the first start writes the keys, the second reads them
    cached = await api_factory(clock, redis_url=Secret(redis_url), data_dir=data_dir,
                               database_url=Secret(await fresh_database()))
    plain = await api_factory(clock, data_dir=data_dir, database_url=Secret(await fresh_database()))
    assert cached.runtime.keys.pepper == plain.runtime.keys.pepper
    return Twins(cached, plain)


Dump = dict[bytes | str, bytes]  # each key's DUMP payload (keys come back as bytes: no decode_responses)


async def dump_all(client: aioredis.Redis) -> Dump:
    copy: Dump = {}
    for key in await client.keys("*"):
        dumped = await client.dump(key)
        assert dumped is not None, key  # listed a moment ago: restore could not put back a missing key
        copy[key] = dumped
    return copy


async def restore_all(client: aioredis.Redis, copy: Dump) -> None:
    await client.flushall()
    for key, value in copy.items():
        await client.restore(key, 0, value, replace=True)


async def swap_values(client: aioredis.Redis) -> None:
    """Every string key gets another key's value (a rotation)."""
    keys = [k for k in await client.keys("*") if await client.type(k) == b"string"]
    if len(keys) < 2:
        return
    values: list[bytes | str] = []
    for k in keys:
        value = await client.get(k)
        assert value is not None, k  # listed a moment ago: Redis cannot set a key to nothing
        values.append(value)
    for key, value in zip(keys, values[1:] + values[:1], strict=True):
        await client.set(key, value)


async def garbage(client: aioredis.Redis, vms: list[str], principals: list[str], digests: list[bytes],
                  now_us: int) -> None:
    """Values a careless or hostile writer could leave under every name the service ever used."""
    for vm in vms:
        await client.set(f"rg:vm:{vm}", b'{"epoch": 999, "rseq": 999999999}')
    for principal in principals:
        await client.set(f"rg:lock:{principal}", str(now_us + A_YEAR_US))
    for digest in digests:
        await client.set(b"rg:use:" + digest.hex().encode(), b'{"vm": "elsewhere", "epoch": 0, "seq": 1}')
    for _ in range(20):
        await client.set(b"rg:" + secrets.token_bytes(8), secrets.token_bytes(40))
    await client.set("rg:vm:" + vms[0], b"\xff\xfe not json")


async def test_reproduction_1_a_rolled_back_redis_does_not_hide_a_guest_rollback(
    owned_redis: OwnedRedis, fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Issue 15, reproduction 1: Redis restored to an older copy answers n1
    with the stale r1 as flagged rollback_detected, as without Redis."""
    twins = await start_twins(api_factory, fresh_database, owned_redis.url, tmp_path)
    client = aioredis.from_url(owned_redis.url)
    try:
        vm = uid("vm")
        first = await twins.nonce(vm, "n1")
        assert first["decision"] == "accept"
        r1 = first["receipt"]
        again = await twins.nonce(vm, "n1", r1)
        assert (again["decision"], again["reason"]) == ("reject", "reused")
        copy = await dump_all(client)
        receipt = again["receipt"]
        for nonce in ("n2", "n3"):
            receipt = (await twins.nonce(vm, nonce, receipt))["receipt"]
        await restore_all(client, copy)
        stale = await twins.nonce(vm, "n1", r1)  # its first use fell in the window it opens
        assert (stale["decision"], stale["reason"]) == ("reject", "replay_after_rollback")
        assert stale["flags"] == ["rollback_detected"] and stale["alert_id"] is not None
    finally:
        await client.aclose()


async def test_reproduction_1_a_forged_lock_in_redis_refuses_no_valid_code(
    owned_redis: OwnedRedis, fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Issue 15, reproduction 1: SET rg:lock:<principal> a year ahead
    does not lock out a principal PostgreSQL holds no lock for."""
    twins = await start_twins(api_factory, fresh_database, owned_redis.url, tmp_path)
    principal, vm = uid("lock"), uid("vm")
    for api in (twins.cached, twins.plain):
        await api.enroll(principal, secret=SECRET)
    client = aioredis.from_url(owned_redis.url)
    try:
        now_us = int(twins.cached.clock.now * 1e6)
        await client.set(f"rg:lock:{principal}", str(now_us + A_YEAR_US))
        answer = await twins.otp(vm, principal, pyotp.TOTP(SECRET).at(twins.cached.clock.now))
        assert (answer["decision"], answer["reason"]) == ("accept", "ok")
    finally:
        await client.aclose()


async def test_a_hostile_redis_gives_the_same_answers_as_no_redis(
    owned_redis: OwnedRedis, fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Flushed, restarted, rolled back, swapped, garbage and forged locks in
    Redis between requests: every answer equals the Redis-less deployment's."""
    twins = await start_twins(api_factory, fresh_database, owned_redis.url, tmp_path)
    clock = twins.cached.clock
    totp_user, hotp_user = uid("totp"), uid("hotp")
    for api in (twins.cached, twins.plain):
        await api.enroll(totp_user, secret=SECRET)
        await api.enroll(hotp_user, secret=SECRET, type="hotp")
    totp, hotp = pyotp.TOTP(SECRET), pyotp.HOTP(SECRET)
    vms = [uid("vm"), uid("vm")]
    pepper = twins.cached.runtime.keys.pepper
    client = aioredis.from_url(owned_redis.url)
    copies: list[Dump] = []

    async def hostile(round_: int) -> None:
        nonlocal client
        now_us = int(clock.now * 1e6)
        digests = [nonce_digest(pepper, "hostile", f"n{i}".encode()) for i in range(round_ + 1)]
        action = round_ % 6
        if action == 0:
            copies.append(await dump_all(client))
            await client.flushall()
        elif action == 1:
            await client.aclose()
            await asyncio.to_thread(owned_redis.stop)
            await asyncio.to_thread(owned_redis.start)
            client = aioredis.from_url(owned_redis.url)
        elif action == 2 and copies:
            await restore_all(client, copies[0])
        elif action == 3:
            await swap_values(client)
        elif action == 4:
            await garbage(client, vms, [totp_user, hotp_user], digests, now_us)
        else:
            await client.set(f"rg:lock:{totp_user}", str(now_us + A_YEAR_US))
            await client.set(f"rg:lock:{hotp_user}", str(now_us + A_YEAR_US))

    def round_steps(round_: int) -> list[Callable[[], Awaitable[dict[str, Any]]]]:
        """The round's requests, each made when the loop awaits it (the TOTP codes at that moment)."""
        vm = vms[round_ % 2]
        other = vms[(round_ + 1) % 2]
        kept = twins.receipts.get(vm, [])
        latest, oldest = (kept[-1], kept[0]) if kept else (None, None)
        return [
            lambda: twins.nonce(vm, f"n{round_}", latest),                 # fresh
            lambda: twins.nonce(vm, f"n{round_}", latest),                 # replay, same VM
            lambda: twins.nonce(other, f"n{round_}"),                      # replay, other VM
            lambda: twins.nonce(vm, f"n{max(round_ - 1, 0)}", oldest),     # stale receipt
            lambda: twins.otp(vm, totp_user, totp.at(clock.now)),           # TOTP (once per step)
            lambda: twins.otp(vm, totp_user, totp.at(clock.now)),           # its replay
            lambda: twins.otp(vm, hotp_user, hotp.at(round_)),              # HOTP
            lambda: twins.otp(other, hotp_user, hotp.at(round_)),           # its replay elsewhere
            lambda: twins.otp(vm, totp_user, "000000"),                     # (almost surely) wrong
        ]

    try:
        await garbage(client, vms, [totp_user, hotp_user], [], int(clock.now * 1e6))
        seen: list[tuple[str, str, tuple[str, ...]]] = []
        for round_ in range(12):
            for step in round_steps(round_):
                answer = await step()
                seen.append((answer["decision"], answer["reason"], tuple(answer["flags"])))
                await hostile(round_ + len(seen))
            clock.advance(31)
        reasons = {reason for _, reason, _ in seen}
        assert {"ok", "reused", "invalid"} <= reasons, reasons
        assert any("rollback_detected" in flags for _, _, flags in seen)
    finally:
        await client.aclose()


async def test_alert_ids_no_bigint_holds_on_the_channel_do_not_end_the_feed_session(
        api_factory: Callable[..., Any], log_buffer: io.StringIO) -> None:
    """Whoever can write to Redis publishes ids past a bigint (20 digits, 2^63, 5,000 digits,
    which Python will not even convert) on the alert channel: each only wakes the feed, which
    reads PostgreSQL, and the feed keeps its session there, so the leader keeps its lock."""
    api: Api = await api_factory(redis_url=Secret(REDIS_URL))
    feed = api.client.app[ANALYSTS].feed
    await until(lambda: feed.leader, "the feed's leadership", timeout=30)
    session = feed._session_id
    client = aioredis.from_url(REDIS_URL)
    try:
        fanout = api.runtime.fanout
        assert fanout is not None
        await until(lambda: fanout.subscribed, "the feed subscribed to the alert channel")
        for data in ("99999999999999999999", str(2**63), "9" * 5000, str(2**63 - 1)):
            await client.publish(ALERT_CHANNEL, data)
        ticks = feed.duties.state_ticks
        await until(lambda: feed.duties.state_ticks >= ticks + 2, "two more ticks of the leader", timeout=30)
    finally:
        await client.aclose()
    assert [line for line in log_buffer.getvalue().splitlines() if "alert_feed_interrupted" in line] == []
    assert feed._session_id == session and feed.leader
