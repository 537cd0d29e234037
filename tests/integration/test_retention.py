"""Retention: expired OTP uses are forgotten; live ones, spent nonces and the ledger are kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyotp

from replayguard.pg import connections
from replayguard.services.retention import purge_expired
from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, uid


async def test_purge_removes_only_expired_uses(fresh_database: Callable[[], Any]) -> None:
    """Uses past expires_us go, in batches, oldest first; unexpired and never-expiring ones stay."""
    dsn = await fresh_database()
    conn = await connections.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO uses SELECT decode(lpad(to_hex(i), 64, '0'), 'hex'), 'otp', 'vm', 's', i, i,"
            " CASE WHEN i <= 30 THEN 1000 + i WHEN i <= 40 THEN 10000000 ELSE NULL END"
            " FROM generate_series(1, 50) i")
        pool = await connections.create_pool(dsn, size=2, statement_timeout_ms=5000)
        try:
            assert await purge_expired(pool, now_us=5000, limit=20) == 20
            assert await purge_expired(pool, now_us=5000, limit=20) == 10
            assert await purge_expired(pool, now_us=5000, limit=20) == 0
        finally:
            await pool.close()
        left = await conn.fetchval("SELECT count(*) FROM uses")
    finally:
        await conn.close()
    assert left == 20


async def test_purged_nonce_with_issued_at_is_still_refused(api: Api) -> None:
    """After retention ran past its expiry, a nonce presented again with its issued_at (so
    expired) is still named a replay: `reused`, with a reuse alert (only a nonce never
    consumed is `expired`)."""
    vm, scope, nonce = uid("vm"), uid("scope"), uid("nonce")
    body = {"vm_id": vm, "scope": scope, "nonce": nonce, "ttl_s": 60, "issued_at": api.clock.now}
    status, first = await api.post("/v1/nonces/consume", body)
    assert (status, first["decision"]) == (200, "accept")
    api.clock.advance(3600)
    await purge_expired(api.runtime.pool, api.runtime.now_us())  # the leader may have purged it already
    assert await _uses_of(api, scope) == 0  # a nonce has no use row: its spent digest refuses it
    status, again = await api.post("/v1/nonces/consume", body)
    assert (status, again["decision"], again["reason"]) == (200, "reject", "reused"), again
    assert again.get("alert_id") is not None, again


async def test_nonce_without_issued_at_is_remembered_for_nonce_max_ttl_not_its_ttl(api: Api) -> None:
    """A nonce consumed without issued_at is still refused as reused after retention runs at 61 s,
    an hour and just short of nonce_max_ttl_s, long after its own ttl_s."""
    vm, scope, nonce = uid("vm"), uid("scope"), uid("nonce")
    body = {"vm_id": vm, "scope": scope, "nonce": nonce, "ttl_s": 60}
    status, first = await api.post("/v1/nonces/consume", body)
    assert (status, first["decision"]) == (200, "accept")
    max_ttl_s = api.runtime.settings.nonce_max_ttl_s
    assert max_ttl_s > 3600
    start = api.clock.now
    for elapsed in (61, 3600, max_ttl_s - 1):
        api.clock.now = start + elapsed
        await purge_expired(api.runtime.pool, api.runtime.now_us())
        status, again = await api.post("/v1/nonces/consume", body)
        assert (status, again["decision"], again["reason"]) == (200, "reject", "reused"), elapsed


async def test_purged_totp_use_is_still_refused(api: Api) -> None:
    """A TOTP code whose use record is purged stays refused by its token's high-water mark."""
    principal = uid("alice")
    secret = (await api.enroll(principal))["secret"]
    code = pyotp.TOTP(secret).at(api.clock.now)
    body = {"vm_id": uid("vm"), "principal": principal, "otp": code}
    assert (await api.post("/v1/otp/verify", body))[1]["decision"] == "accept"
    # Past the use's retention, by the clock (editing its expires_us would be tampering,
    # which ledger verify reports): the high-water alone must refuse the code now.
    now_us = api.runtime.now_us() + (api.runtime.settings.nonce_max_ttl_s + 1) * 1_000_000
    await purge_expired(api.runtime.pool, now_us)  # the leader may have purged it already
    assert await _uses_of(api, principal) == 0
    status, again = await api.post("/v1/otp/verify", body)
    assert (status, again["decision"], again["reason"]) == (200, "reject", "reused")


async def _uses_of(api: Api, subject: str) -> int:
    async with api.runtime.pool.acquire() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM uses WHERE subject = $1", subject)
    return count


async def test_a_totp_code_still_valid_keeps_its_replay_classification_with_a_short_nonce_max_ttl(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """With nonce_max_ttl_s = 30, a TOTP code 35 s after its accept is still within the drift
    window, so its use row outlives the retention (kept until the code stops being accepted):
    replayed after a revert of the VM to a snapshot before the login, it is
    `replay_after_rollback`, not a bare `reused`."""
    clock = FakeClock(30 * 59_666_667 + 1.0)  # 1 s into a step
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()), nonce_max_ttl_s=30)
    principal = uid("alice")
    totp = pyotp.TOTP((await api.enroll(principal))["secret"])
    vm = uid("vm")

    async def event(kind: str, **fields: Any) -> None:
        body = {"event_id": uid("evt"), "type": kind, "vm_id": vm, "occurred_at": clock.now, "snapshot_id": "s1",
                **fields}
        status, answer = await api.post("/v1/hypervisor/events", body, role="hypervisor")
        assert status == 202, answer

    await event("snapshot.created", snapshot_created_at=clock.now)
    clock.advance(2)
    code = totp.at(clock.now)
    body = {"vm_id": vm, "principal": principal, "otp": code}
    assert (await api.post("/v1/otp/verify", body))[1]["decision"] == "accept"
    clock.advance(35)  # the next step: the code is still within the drift window
    while await purge_expired(api.runtime.pool, api.runtime.now_us(), limit=1000) > 0:
        pass
    assert await _uses_of(api, principal) == 1
    await event("snapshot.reverted", snapshot_created_at=clock.now - 37)
    status, replay = await api.post("/v1/otp/verify", body)
    assert (status, replay["decision"], replay["reason"]) == (200, "reject", "replay_after_rollback"), replay
