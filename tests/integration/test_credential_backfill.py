"""Migration 010 carries OTP state recorded under token ids over to credentials.

A database restored from the frozen 007 schema gets tokens, accepted HOTP counters and
TOTP steps through that version's own ``rg_decide`` (uses keyed by token id, the
high-water on the token row); one token is then deleted. The service, started on it,
migrates and backfills: the same secret enrolled again refuses every accepted code, and a
replay still finds its first use.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pyotp

from replayguard.core.credentials import otp_digest
from replayguard.keys import load_keys
from replayguard.services.tokens import _encrypt
from replayguard.settings import Secret
from tests.conftest import FakeClock, uid

FROZEN = Path(__file__).resolve().parents[1] / "data" / "schema" / "v007.sql"
PERIOD = 30


def old_item(ts_us: int, principal: str, token_id: str, counter: int, pepper: bytes, totp: bool) -> dict[str, Any]:
    """A decision item as the 007 service built it (digest under the token id)."""
    item: dict[str, Any] = {
        "k": "otp", "ts": ts_us, "vm": "vm-old", "sub": principal, "tok": token_id, "steps": [counter],
        "dg": {str(counter): otp_digest(pepper, token_id, counter).hex()}, "rc": "absent",
        "exp": ts_us + 7 * 86400 * 1_000_000, "p": {"context": {}}}
    if totp:
        item.update(tp=PERIOD, dr=1, cg="old-scope")
    return item


async def test_state_recorded_before_010_carries_over_to_re_enrolments(
    fresh_database: Callable[[], Any], make_settings: Callable[..., Any], api_factory: Callable[..., Any],
) -> None:
    """Codes accepted under the 007 schema stay refused after upgrade, deletion
    and re-enrolment of the same secret, for the same principal and another."""
    clock = FakeClock()
    dsn = await fresh_database()  # migrated: drop everything and restore the 007 dump instead
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await conn.execute(FROZEN.read_text())
    finally:
        await conn.close()
    settings = make_settings(database_url=Secret(dsn))
    keys = load_keys(settings)
    hotp_secret, totp_secret = pyotp.random_base32(), pyotp.random_base32()
    alice, bob = uid("alice"), uid("bob")
    step = int(clock.now // PERIOD)
    conn = await asyncpg.connect(dsn)
    try:
        for token_id, kind, secret in (("otp_oldhotp" + secrets.token_hex(4), "hotp", hotp_secret),
                                       ("otp_oldtotp" + secrets.token_hex(4), "totp", totp_secret)):
            await conn.execute(
                "INSERT INTO otp_tokens (id, principal, type, secret_ct, digits, period, algorithm)"
                " VALUES ($1, $2, $3, $4, 6, 30, 'SHA1')", token_id, alice, kind,
                _encrypt(keys, token_id, secret))
            counters = [0, 1] if kind == "hotp" else [step]
            for n, counter in enumerate(counters):
                items = [old_item(int(clock.now * 1e6) + n, alice, token_id, counter, keys.pepper, kind == "totp")]
                row = await conn.fetchrow("SELECT * FROM public.rg_decide($1::jsonb, 5, 60000000, false)",
                                          json.dumps(items))
                assert row["r_verdict"] == "accept", row
            if kind == "hotp":
                await conn.execute("UPDATE otp_tokens SET deleted_at = now() WHERE id = $1", token_id)
    finally:
        await conn.close()

    api = await api_factory(clock, database_url=Secret(dsn))
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM otp_tokens WHERE fingerprint IS NULL") == 0

    async def verify(principal: str, code: str) -> dict[str, Any]:
        status, body = await api.post("/v1/otp/verify", {"vm_id": "vm-new", "principal": principal, "otp": code})
        assert status == 200, body
        return dict(body)

    # HOTP: deleted before the upgrade, enrolled again for Alice and for Bob.
    await api.enroll(alice, type="hotp", secret=hotp_secret)
    await api.enroll(bob, type="hotp", secret=hotp_secret)
    hotp = pyotp.HOTP(hotp_secret)
    for principal in (alice, bob):
        for counter in (0, 1):
            answer = await verify(principal, hotp.at(counter))
            assert (answer["decision"], answer["reason"]) == ("reject", "reused")
            assert answer["alert_id"] is not None  # the re-keyed first use was found
    assert (await verify(bob, hotp.at(2)))["decision"] == "accept"
    # TOTP: still active from before the upgrade; the same secret enrolled for Bob too.
    await api.enroll(bob, secret=totp_secret)
    code = pyotp.TOTP(totp_secret).at(clock.now)
    for principal in (alice, bob):
        answer = await verify(principal, code)
        assert (answer["decision"], answer["reason"]) == ("reject", "reused")
    clock.advance(PERIOD)
    assert (await verify(bob, pyotp.TOTP(totp_secret).at(clock.now)))["decision"] == "accept"
