"""Lockout (RFC 4226 §7.3 throttling) at its edges: the threshold-th failure locks, for exactly the period."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyotp

from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, uid


def _wrong(totp: pyotp.TOTP, now: float) -> str:
    near = {totp.at(now + k * 30) for k in (-1, 0, 1)}
    return next(code for code in ("000000", "111111", "222222", "333333") if code not in near)


async def test_the_threshold_th_failure_locks_for_exactly_the_period(api_factory: Callable[..., Any]) -> None:
    """With threshold 3: three wrong codes are invalid, then even the right code is locked_out, still
    1 s before the period ends, and accepted once it has."""
    api: Api = await api_factory(FakeClock(), lockout_threshold=3, lockout_period_s=300)
    principal, vm_id = uid("alice"), uid("vm")
    secret = (await api.enroll(principal))["secret"]
    totp = pyotp.TOTP(secret)

    async def attempt(code: str) -> str:
        status, answer = await api.post("/v1/otp/verify", {"vm_id": vm_id, "principal": principal, "otp": code})
        assert status == 200, answer
        return str(answer["reason"])

    reasons = [await attempt(_wrong(totp, api.clock.now)) for _ in range(3)]
    assert reasons == ["invalid", "invalid", "invalid"]
    assert await attempt(totp.at(api.clock.now)) == "locked_out"
    api.clock.advance(299)
    assert await attempt(totp.at(api.clock.now)) == "locked_out"
    api.clock.advance(1)
    assert await attempt(totp.at(api.clock.now)) == "ok"


async def test_an_hotp_code_far_behind_counts_as_a_failure_unless_its_use_is_recorded(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """HOTP, look-ahead 3, counters 0 to 9 accepted except 1 (skipped by a look-ahead jump):
    counter 0's code, far behind, is a replay (`reused`, not counted); counter 1's code, as
    far behind but never used, is `invalid` and counts towards the lockout."""
    api: Api = await api_factory(FakeClock(), database_url=Secret(await fresh_database()), hotp_look_ahead=3,
                                 lockout_threshold=5)
    principal, vm_id = uid("alice"), uid("vm")
    hotp = pyotp.HOTP((await api.enroll(principal, type="hotp"))["secret"])

    async def attempt(counter: int) -> str:
        status, answer = await api.post("/v1/otp/verify",
                                        {"vm_id": vm_id, "principal": principal, "otp": hotp.at(counter)})
        assert status == 200, answer
        return str(answer["reason"])

    assert [await attempt(c) for c in (0, *range(2, 10))] == ["ok"] * 9
    assert await attempt(0) == "reused"
    assert await attempt(1) == "invalid"
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT fail_count FROM principals WHERE name = $1", principal) == 1
