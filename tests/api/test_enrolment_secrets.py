"""Secrets at enrolment: one that cannot be decoded is refused, and keys that HMAC treats
alike are one credential."""

from __future__ import annotations

import pyotp
import pytest

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
