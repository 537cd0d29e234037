"""The host clock guard: a host clock that steps back never re-opens TOTP steps already passed.

Each test has a database of its own: the high-water is the deployment's, and these tests
move the clock where no other test should follow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, uid
from tests.waiting import until


async def verify(api: Api, principal: str, code: str) -> dict[str, Any]:
    status, answer = await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": code})
    assert status == 200, answer
    return dict(answer)


async def enroll(api: Api) -> tuple[str, pyotp.TOTP]:
    principal = uid("user")
    return principal, pyotp.TOTP((await api.enroll(principal))["secret"])


async def high_water(api: Api) -> int:
    async with api.runtime.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT max(high_us) FROM clock_guard"))


async def test_clock_stepping_back_refuses_old_steps_and_alerts(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """After the clock goes back an hour, no TOTP is accepted and a critical clock_regression is raised."""
    clock = FakeClock()
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()))
    alice, alice_totp = await enroll(api)
    bob, bob_totp = await enroll(api)
    assert (await verify(api, alice, alice_totp.at(clock.now)))["decision"] == "accept"
    mark = await high_water(api)
    clock.advance(-3600)
    refused = await verify(api, bob, bob_totp.at(clock.now))
    assert (refused["decision"], refused["reason"]) == ("reject", "invalid")
    async with api.runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT kind, severity FROM alerts WHERE id = $1", int(refused["alert_id"]))
        # No row at all means no failure was ever counted for bob.
        fails = await conn.fetchval("SELECT coalesce(max(fail_count), 0) FROM principals WHERE name = $1", bob)
    assert (row["kind"], row["severity"]) == ("clock_regression", "critical")
    assert fails == 0, "the guard's refusal is not the user's failure"
    assert (await verify(api, alice, alice_totp.at(clock.now)))["decision"] == "reject"
    assert await high_water(api) == mark


async def test_small_step_back_within_drift_is_tolerated(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """A clock that steps back by less than the drift window keeps accepting fresh codes."""
    clock = FakeClock()
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()))
    alice, alice_totp = await enroll(api)
    bob, bob_totp = await enroll(api)
    assert (await verify(api, alice, alice_totp.at(clock.now)))["decision"] == "accept"
    clock.advance(-20)
    assert (await verify(api, bob, bob_totp.at(clock.now)))["decision"] == "accept"


async def test_high_water_survives_a_restart_and_clears_when_time_catches_up(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """The high-water lives in the database: a restarted service behind it still refuses, until time passes it."""
    dsn = await fresh_database()
    clock = FakeClock()
    first: Api = await api_factory(clock, database_url=Secret(dsn))
    alice, alice_totp = await enroll(first)
    assert (await verify(first, alice, alice_totp.at(clock.now)))["decision"] == "accept"
    await first.client.close()
    behind = FakeClock(clock.now - 86400)
    restarted: Api = await api_factory(behind, database_url=Secret(dsn))
    bob, bob_totp = await enroll(restarted)
    assert (await verify(restarted, bob, bob_totp.at(behind.now)))["reason"] == "invalid"
    behind.advance(86400 + 60)
    assert (await verify(restarted, bob, bob_totp.at(behind.now)))["decision"] == "accept"


async def test_a_long_period_code_accepted_ahead_does_not_refuse_shorter_periods(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """One second after a 120 s boundary, a period-120 token's code for its next step is accepted
    (within the drift). The guard keeps the host's clock for it, not the step's start 119 s
    ahead, so a period-30 token's current code right after is accepted: no false
    clock_regression. The same code presented again is still refused (the credential's
    high-water), and a real step back of an hour still is."""
    clock = FakeClock()
    clock.now = 120 * 14_916_667 + 1
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()))
    carol, dave = uid("carol"), uid("dave")
    carol_totp = pyotp.TOTP((await api.enroll(carol, period=120))["secret"], interval=120)
    dave_totp = pyotp.TOTP((await api.enroll(dave))["secret"])
    ahead = carol_totp.at(clock.now + 120)
    assert (await verify(api, carol, ahead))["decision"] == "accept"
    assert await high_water(api) == int(clock.now * 1_000_000)
    clock.advance(1)
    answer = await verify(api, dave, dave_totp.at(clock.now))
    assert (answer["decision"], answer["reason"], answer.get("alert_id")) == ("accept", "ok", None), answer
    assert (await verify(api, carol, ahead))["reason"] == "reused"
    clock.advance(-3600)
    refused = await verify(api, carol, carol_totp.at(clock.now))  # older than her accepted step
    assert (refused["decision"], refused["reason"]) == ("reject", "reused")
    status, alert = await api.get(f"/v1/alerts/{refused['alert_id']}")
    assert (status, alert["kind"]) == (200, "clock_regression")
    status, report = await api.get("/v1/ledger/verify")
    assert status == 200 and report["ok"] is True, report  # the state check expects the host's time


async def test_an_older_code_still_valid_after_the_clock_went_back_is_reused(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """After the host clock steps back 90 s, alice's code for the new current step is valid by
    the drift window and older than the step she had accepted: reused (CONTRACT §4), not
    invalid, with the clock_regression alert; bob, who accepted nothing, gets invalid."""
    clock = FakeClock()
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()))
    alice, alice_totp = await enroll(api)
    bob, bob_totp = await enroll(api)
    assert (await verify(api, alice, alice_totp.at(clock.now)))["decision"] == "accept"
    clock.advance(-90)
    older = await verify(api, alice, alice_totp.at(clock.now))
    assert (older["decision"], older["reason"]) == ("reject", "reused"), older
    _, alert = await api.get(f"/v1/alerts/{older['alert_id']}")
    assert alert["kind"] == "clock_regression"
    assert (await verify(api, bob, bob_totp.at(clock.now)))["reason"] == "invalid"


async def test_a_login_decided_after_a_later_one_is_not_a_clock_regression(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With drift 0, alice's login reads the clock 1 ms before a step boundary and waits on a
    slow token read while bob's is accepted 1 ms after it: alice's code is accepted, with no
    clock_regression alert (the host clock only moved forward)."""
    boundary = 1_790_000_010.0  # a multiple of 30
    clock = FakeClock(boundary - 0.001)
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()), totp_drift_steps=0)
    alice, alice_totp = await enroll(api)
    bob, bob_totp = await enroll(api)
    reader = api.runtime.tokens._reader
    original, release, waiting = reader.read, asyncio.Event(), asyncio.Event()

    async def slow_read(principal: str) -> Any:
        if principal == alice:
            waiting.set()
            await release.wait()
        return await original(principal)

    monkeypatch.setattr(reader, "read", slow_read)
    api.runtime.tokens.changed(alice)  # her list is read from PostgreSQL, slowly
    first = asyncio.create_task(verify(api, alice, alice_totp.at(clock.now)))
    await until(waiting.is_set, "alice's token read to start")
    clock.now = boundary + 0.001
    assert (await verify(api, bob, bob_totp.at(clock.now)))["decision"] == "accept"
    release.set()
    answer = await first
    assert (answer["decision"], answer.get("alert_id")) == ("accept", None), answer
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM alerts WHERE kind = 'clock_regression'") == 0
