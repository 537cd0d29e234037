"""Two instances over one database: a token list cached on one must not outlive a change it did not hear."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.http.state import ANALYSTS
from replayguard.pg import connections
from replayguard.services import alertfeed
from tests.conftest import Api, uid
from tests.waiting import until


async def _verify(api: Api, principal: str, code: str) -> dict[str, Any]:
    status, data = await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": code})
    assert status == 200, data
    return dict(data)


async def test_a_token_re_enrolled_while_the_other_instance_was_not_listening_is_accepted_there(
        api_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Instance B's alert-feed connection drops for a moment; meanwhile an admin on instance A deletes
    a principal's TOTP token and enrols the same secret again; once B listens again, B accepts the
    next valid code, as A would (not `no_token` from the deleted token it still has cached)."""
    a = await api_factory()
    b = await api_factory()
    feed = b.client.app[ANALYSTS].feed
    await until(lambda: b.runtime.tokens.listening_now and feed._listen_conn is not None, "B listening")
    principal = uid("dora")
    enrolled = await a.enroll(principal, type="totp")
    secret = enrolled["secret"]
    assert (await _verify(b, principal, pyotp.TOTP(secret).at(b.clock.now)))["decision"] == "accept"  # B caches it

    # B's feed connection is lost, and its reconnection fails for a while (a network blip).
    down = True

    async def connect(dsn: str, **kwargs: Any) -> Any:
        if down:
            raise OSError("network unreachable")
        return await connections.connect(dsn, **kwargs)

    monkeypatch.setattr(alertfeed, "connections", types.SimpleNamespace(connect=connect))
    old_pid = feed._listen_conn.get_server_pid()
    async with b.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)
    await until(lambda: not b.runtime.tokens.listening_now, "B to notice its LISTEN is gone")

    # Meanwhile, on A: the token is deleted and the same secret enrolled again.
    resp = await a.client.delete(f"/v1/principals/{principal}/tokens/{enrolled['token_id']}", headers=a.auth("admin"))
    assert resp.status in (200, 204), await resp.text()
    again = await a.enroll(principal, type="totp", secret=secret)
    assert again["token_id"] != enrolled["token_id"]

    down = False
    await until(lambda: b.runtime.tokens.listening_now and feed._listen_conn is not None
                and feed._listen_conn.get_server_pid() != old_pid, "B to listen again")
    for api in (a, b):
        api.clock.advance(30)
    answer = await _verify(b, principal, pyotp.TOTP(secret).at(b.clock.now))
    assert answer["decision"] == "accept", answer
