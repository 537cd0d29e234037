"""The token cache against a real PostgreSQL: what a code that matches no cached token costs.

A second ``TokenStore`` over the same database stands for another instance: its
enrolments do not touch this process's cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.core.validation import EnrollRequest
from replayguard.http.state import ANALYSTS
from replayguard.services import announced, tokens
from replayguard.services.tokens import TokenStore
from tests.conftest import Api, uid
from tests.waiting import until

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



def other_store(api: Api) -> TokenStore:
    """A token store of another process on the same database."""
    return TokenStore(api.runtime.pool, api.runtime.keys, drift_steps=api.runtime.settings.totp_drift_steps)


async def test_a_token_enrolled_elsewhere_counts_at_once(api: Api) -> None:
    """The principal is cached here; another instance enrols a second token; its first code is accepted."""
    principal = uid("carol")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"  # cached now
    elsewhere = await other_store(api).enroll(principal, TOTP, 0)
    assert await verify(api, principal, pyotp.TOTP(elsewhere.secret_b32).at(api.clock.now + 30)) == "ok"


async def listening(api: Api) -> None:
    store = api.runtime.tokens
    await until(lambda: store.listening_now, "the alert feed's LISTEN on token changes")


async def test_wrong_codes_cost_no_read_while_token_changes_are_heard(api_factory: Callable[..., Any]) -> None:
    """Tokens read while the LISTEN on token changes is in effect are current: after one read
    confirmed a miss, wrong codes are refused from the cache with no read at all, a
    principal with no token is not read twice, and a token enrolled through another
    instance counts as soon as its announcement arrives."""
    api = await api_factory(lockout_threshold=1000)  # wrong codes stay "invalid"
    await listening(api)
    principal = uid("gina")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"  # read, cached
    before = await token_reads(api)
    for _ in range(10):
        assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    assert await token_reads(api) == before + 1  # the first miss was read again, no other

    nobody = uid("nobody")
    for _ in range(3):
        assert await verify(api, nobody, "123456") == "no_token"
    assert await token_reads(api) == before + 2  # read once, "no token" cached

    heard = api.runtime.tokens.changes_heard
    elsewhere = await other_store(api).enroll(principal, TOTP, 0)
    await until(lambda: (api.runtime.tokens.changes_heard > heard), "the enrolment's announcement")
    assert await verify(api, principal, pyotp.TOTP(elsewhere.secret_b32).at(api.clock.now + 30)) == "ok"
    assert await token_reads(api) == before + 3
    later = await other_store(api).enroll(nobody, TOTP, 0)
    await until(lambda: (api.runtime.tokens.changes_heard > heard + 1), "the second announcement")
    assert await verify(api, nobody, pyotp.TOTP(later.secret_b32).at(api.clock.now)) == "ok"


async def test_a_lost_listen_connection_is_noticed_and_older_reads_are_not_trusted(api: Api) -> None:
    """The LISTEN connection's backend is terminated: the store stops trusting its lists at
    once; the feed reconnects, and a list read before that is read again on a miss."""
    await listening(api)
    principal = uid("hank")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"
    feed = api.client.app[ANALYSTS].feed
    assert feed._listen_conn is not None  # listening(api) waited for it
    old_pid = feed._listen_conn.get_server_pid()
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)
    await until(lambda: (feed._listen_conn is not None and feed._listen_conn.get_server_pid() != old_pid
                              and api.runtime.tokens.listening_now), "the feed to listen again")
    before = await token_reads(api)
    assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    assert await token_reads(api) == before + 1  # read before the new LISTEN: read again
    assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    assert await token_reads(api) == before + 1  # that read is current


async def test_a_stuck_listen_connection_stops_the_trust(api_factory: Callable[..., Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed's queries hang (its alert read waits on a lock) while its connection stays
    up: once HEARD_WITHIN_S passes without an answer, misses are read again; when the feed
    answers again, they are not."""
    monkeypatch.setattr(announced, "HEARD_WITHIN_S", 0.5)
    api = await api_factory(lockout_threshold=1000)
    await listening(api)
    principal = uid("ivy")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"
    before = await token_reads(api)
    for _ in range(2):
        assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    assert await token_reads(api) == before + 1  # the first miss read again, confirmed
    async with api.runtime.pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("LOCK TABLE alerts IN ACCESS EXCLUSIVE MODE")
        await asyncio.sleep(1.6)  # the feed reads alerts at least once a second: it is now waiting
        assert api.runtime.tokens.listening_now  # the connection is up, its queries are not answered
        assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
        assert await token_reads(api) == before + 2  # a second after the confirmation: read
    heard = api.runtime.tokens._heard_until
    await until(lambda: (api.runtime.tokens._heard_until > heard), "the feed to answer again")
    assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    assert await token_reads(api) == before + 2


async def test_wrong_codes_for_a_principal_cost_one_read_a_window(api_factory: Callable[..., Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """While token changes are not heard: after a read confirmed a miss, more wrong codes
    are refused from the cache until MISS_RECHECK_S has passed; a token enrolled elsewhere
    meanwhile counts once it has."""
    api = await api_factory(lockout_threshold=1000)  # wrong codes stay "invalid"
    await listening(api)
    api.runtime.tokens.listening(False)  # as between the feed's connection going down and its return
    monkeypatch.setattr(api.runtime.tokens, "changed", lambda principal: None)  # announcements lost
    principal = uid("dave")
    first = (await api.enroll(principal))["secret"]
    assert await verify(api, principal, pyotp.TOTP(first).at(api.clock.now)) == "ok"
    before = await token_reads(api)
    assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"  # read, confirmed
    assert await token_reads(api) == before + 1
    for _ in range(10):
        assert await verify(api, principal, wrong_code(first, at=api.clock.now)) == "invalid"
    assert await token_reads(api) == before + 1  # none of the ten was read again

    elsewhere = await other_store(api).enroll(principal, TOTP, 0)
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
