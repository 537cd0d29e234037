"""Secrets at enrolment: one that cannot be decoded is refused, and keys that HMAC treats
alike are one credential."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pyotp
import pytest

from replayguard.core.credentials import secret_fingerprint, secret_fingerprint_as_enrolled
from replayguard.core.otp import hotp_matches, totp_matches
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


async def test_a_secret_enrolled_under_its_bytes_fingerprint_keeps_its_credential(api: Api) -> None:
    """A credential enrolled before fingerprints named the key HMAC uses carries the
    fingerprint of the secret's bytes as they are: the same secret enrolled again finds it,
    and the code it accepted stays ``reused``."""
    secret = _b32(os.urandom(19) + b"\x00")  # a secret whose bytes end in a zero byte
    alice, bob = uid("alice"), uid("bob")
    enrolled = await api.enroll(alice, type="hotp", secret=secret)
    used = pyotp.HOTP(secret).at(0)
    assert (await _verify(api, alice, used))["decision"] == "accept"
    pepper = api.runtime.keys.pepper
    old = secret_fingerprint_as_enrolled(pepper, "hotp", "SHA1", 30, secret)
    new = secret_fingerprint(pepper, "hotp", "SHA1", 30, secret)
    assert old != new
    async with api.runtime.pool.acquire() as conn:  # as an enrolment before the change left it
        await conn.execute("INSERT INTO otp_credentials SELECT $2, last_counter FROM otp_credentials"
                           " WHERE fingerprint = $1", new, old)
        await conn.execute("UPDATE otp_tokens SET fingerprint = $2 WHERE fingerprint = $1", new, old)
        await conn.execute("DELETE FROM otp_credentials WHERE fingerprint = $1", new)
    await _delete(api, alice, enrolled["token_id"])
    await api.enroll(bob, type="hotp", secret=secret)
    again = await _verify(api, bob, used)
    assert (again["decision"], again["reason"]) == ("reject", "reused"), again
