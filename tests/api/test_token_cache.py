"""The token cache against a real PostgreSQL: what a code that matches no cached token costs.

A second ``TokenStore`` over the same database stands for another instance: its
enrolments do not touch this process's cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pyotp

from replayguard.core.validation import EnrollRequest
from replayguard.services import tokens
from replayguard.services.tokens import TokenStore
from tests.conftest import Api, uid

TOTP = EnrollRequest(type="totp", secret=None, digits=6, period=30, algorithm="SHA1")


async def token_reads(api: Api) -> float:
    text = await (await api.client.get("/metrics")).text()
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("replayguard_token_read_batch_size_count"))


async def verify(api: Api, principal: str, code: str) -> str:
    status, data = await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": code})
    assert status == 200, data
    return str(data["reason"])


def wrong_code(*secrets: str, at: float) -> str:
    near = {pyotp.TOTP(secret).at(at + k * 30) for secret in secrets for k in range(-3, 4)}
    return next(code for code in (f"{n:06d}" for n in range(1_000_000)) if code not in near)


async def test_a_token_enrolled_elsewhere_counts_at_once(api: Api) -> None:
    """The principal is cached here; another instance enrols a second token; its first code is accepted."""
    principal = uid("carol")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"  # cached now
    elsewhere = await TokenStore(api.runtime.pool, api.runtime.keys).enroll(principal, TOTP, 0)
    assert await verify(api, principal, pyotp.TOTP(elsewhere.secret_b32).at(api.clock.now + 30)) == "ok"


async def test_wrong_codes_for_a_principal_cost_one_read_a_window(api_factory: Callable[..., Any]) -> None:
    """After a read confirmed a miss, more wrong codes are refused from the cache until
    MISS_RECHECK_S has passed; a token enrolled elsewhere meanwhile counts once it has."""
    api = await api_factory(lockout_threshold=1000)  # wrong codes stay "invalid"
    principal = uid("dave")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"
    before = await token_reads(api)
    assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"  # read, confirmed
    assert await token_reads(api) == before + 1
    for _ in range(10):
        assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    assert await token_reads(api) == before + 1  # none of the ten was read again

    elsewhere = await TokenStore(api.runtime.pool, api.runtime.keys).enroll(principal, TOTP, 0)
    code = pyotp.TOTP(elsewhere.secret_b32).at(api.clock.now)
    assert await verify(api, principal, code) == "invalid"  # inside the window: not seen yet
    await asyncio.sleep(tokens.MISS_RECHECK_S + 0.1)
    assert await verify(api, principal, code) == "ok"  # the window passed: read, and accepted
    assert await token_reads(api) == before + 2


async def test_an_enrolment_here_ends_the_window(api: Api) -> None:
    """An enrolment through this process makes the new secret's codes valid at once."""
    principal = uid("erin")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"
    assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    second = (await api.enroll(principal))["secret"]  # through this process
    assert await verify(api, principal, pyotp.TOTP(second).at(api.clock.now)) == "ok"


async def test_hotp_misses_are_always_read_again(api: Api) -> None:
    """An HOTP counter may move through another instance: every miss is checked afresh."""
    principal = uid("frank")
    secret = (await api.enroll(principal, type="hotp"))["secret"]
    hotp = pyotp.HOTP(secret)
    assert await verify(api, principal, hotp.at(1)) == "ok"  # cached, counter 1
    near = {hotp.at(c) for c in range(40)}
    wrong = next(code for code in (f"{n:06d}" for n in range(1_000_000)) if code not in near)
    before = await token_reads(api)
    for _ in range(3):
        assert await verify(api, principal, wrong) == "invalid"
    assert await token_reads(api) == before + 3
