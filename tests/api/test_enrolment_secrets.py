"""Secrets at enrolment: one that cannot be decoded is refused, and keys that HMAC treats
alike are one credential."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.core.credentials import otp_digest, secret_fingerprint, secret_fingerprint_as_enrolled
from replayguard.core.otp import hotp_matches, totp_matches
from replayguard.settings import Secret
from tests.conftest import Api, uid

# 27 base32 characters: the alphabet and the length (26 or more) are right, but base32 has
# no text of that length (pyotp and base64.b32decode refuse it).
BAD_LENGTH = "JBSWY3DPEHPK3PXPJBSWY3DPEHP"


@pytest.mark.parametrize("secret", [BAD_LENGTH, "A" * 26 + "=" * 7, "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP\n"],
                         ids=["27 characters", "too much padding", "trailing newline"])
async def test_an_undecodable_secret_is_a_400_and_enrols_nothing(api: Api, secret: str) -> None:
    """A secret base32 cannot decode is 400 invalid_request naming `secret`; no token is left
    behind, and the principal's callouts keep answering 200."""
    principal = uid("p")
    status, body = await api.post(f"/v1/principals/{principal}/tokens", {"type": "totp", "secret": secret},
                                  role="admin")
    assert (status, body["error"]["code"], body["error"]["field"]) == (400, "invalid_request", "secret"), body
    assert secret.strip() not in str(body)
    _, listing = await api.get(f"/v1/principals/{principal}/tokens", role="admin")
    assert listing["items"] == [], listing
    status, body = await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": "123456"})
    assert status == 200, body


def test_a_stored_secret_that_does_not_decode_matches_no_code() -> None:
    """A token stored before enrolment checked its secret has no codes: matching one answers
    no step (the code is invalid and counts towards the lockout) instead of raising."""
    assert totp_matches(BAD_LENGTH, "123456", now_s=1_790_000_000) == []
    assert hotp_matches(BAD_LENGTH, "123456", last_counter=-1) == []
    good = pyotp.random_base32()
    assert totp_matches(good, pyotp.TOTP(good).at(1_790_000_000), now_s=1_790_000_000) != []


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


async def _verify(api: Api, principal: str, code: str) -> dict[str, Any]:
    status, body = await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": code})
    assert status == 200, body
    return dict(body)


async def _delete(api: Api, principal: str, token_id: str) -> None:
    resp = await api.client.delete(f"/v1/principals/{principal}/tokens/{token_id}", headers=api.auth("admin"))
    assert resp.status == 204, await resp.text()


@pytest.mark.parametrize("variant", ["zero padded", "hashed long key"])
async def test_a_key_hmac_treats_alike_is_the_same_credential(api: Api, variant: str) -> None:
    """HMAC pads a key shorter than its block with zero bytes and hashes a longer one (RFC
    2104 §2), so K and K‖00…00, or L (over 64 bytes) and SHA-1(L), give every code alike.
    Enrolled again in the other form, for another principal, the HOTP code already used is
    ``reused`` (it was accepted again: each form was a credential of its own)."""
    key = os.urandom(20 if variant == "zero padded" else 100)
    first = _b32(key)
    second = _b32(key + b"\x00" * 5) if variant == "zero padded" else _b32(hashlib.sha1(key).digest())  # noqa: S324
    used = pyotp.HOTP(first).at(0)
    assert pyotp.HOTP(second).at(0) == used
    alice, bob = uid("alice"), uid("bob")
    enrolled = await api.enroll(alice, type="hotp", secret=first)
    assert (await _verify(api, alice, used))["decision"] == "accept"
    await _delete(api, alice, enrolled["token_id"])
    await api.enroll(bob, type="hotp", secret=second)
    again = await _verify(api, bob, used)
    assert (again["decision"], again["reason"]) == ("reject", "reused"), again


async def as_enrolled_before_030(api: Api, secret: str, otp_type: str = "hotp") -> None:
    """Puts ``secret``'s credential, tokens and uses in the state a deployment from before
    credentials named the key HMAC uses left them: keyed by the secret's bytes as they are."""
    pepper = api.runtime.keys.pepper
    old = secret_fingerprint_as_enrolled(pepper, otp_type, "SHA1", 30, secret)
    new = secret_fingerprint(pepper, otp_type, "SHA1", 30, secret)
    assert old != new
    async with api.runtime.pool.acquire() as conn:
        await conn.execute("INSERT INTO otp_credentials SELECT $2, last_counter FROM otp_credentials"
                           " WHERE fingerprint = $1", new, old)
        await conn.execute("UPDATE otp_tokens SET fingerprint = $2, canonical = false WHERE fingerprint = $1",
                           new, old)
        await conn.execute("DELETE FROM otp_credentials WHERE fingerprint = $1", new)
        for counter in range(4):
            await conn.execute("UPDATE uses SET digest = $2 WHERE digest = $1",
                               otp_digest(pepper, new.hex(), counter), otp_digest(pepper, old.hex(), counter))


@pytest.mark.parametrize("form", ["the same bytes", "without the zero bytes"])
async def test_a_credential_enrolled_under_its_bytes_fingerprint_is_one_with_every_form_of_its_key(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], form: str) -> None:
    """A credential enrolled before fingerprints named the key HMAC uses carries the
    fingerprint of the secret's bytes as they are; after a restart, the token is deleted and
    the same secret, or its form without the trailing zero bytes, is enrolled for another
    principal: the code it accepted stays ``reused``, and the ledger still verifies."""
    key = os.urandom(19).rstrip(b"\x00") + b"\x01"
    secret = _b32(key + b"\x00" * 5)
    again_secret = secret if form == "the same bytes" else _b32(key)
    dsn = Secret(await fresh_database())
    before = await api_factory(database_url=dsn)
    alice, bob = uid("alice"), uid("bob")
    enrolled = await before.enroll(alice, type="hotp", secret=secret)
    used = pyotp.HOTP(secret).at(1)
    assert (await _verify(before, alice, used))["decision"] == "accept"
    await as_enrolled_before_030(before, secret)
    api = await api_factory(database_url=dsn)  # the upgraded service starts
    await _delete(api, alice, enrolled["token_id"])
    await api.enroll(bob, type="hotp", secret=again_secret)
    again = await _verify(api, bob, used)
    assert (again["decision"], again["reason"]) == ("reject", "reused"), again
    assert (await _verify(api, bob, pyotp.HOTP(secret).at(0)))["reason"] == "reused"  # below the high-water
    status, report = await api.get("/v1/ledger/verify")
    assert status == 200 and report["ok"] is True, report
