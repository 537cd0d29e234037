"""Decisions through the HTTP API: the contract's happy paths and its refusals."""

from __future__ import annotations

import pyotp

from tests.conftest import Api, uid


async def test_totp_accepted_once_then_reused(api: Api) -> None:
    """A valid TOTP code is accepted once; the same code again is refused as reused."""
    principal = uid("alice")
    token = await api.enroll(principal)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    body = {"vm_id": uid("vm"), "principal": principal, "otp": code}
    status, first = await api.post("/v1/otp/verify", body)
    assert status == 200 and first["decision"] == "accept" and first["reason"] == "ok"
    status, second = await api.post("/v1/otp/verify", body)
    assert status == 200 and second["decision"] == "reject" and second["reason"] == "reused"
    assert second["seq"] > first["seq"]
    assert second["alert_id"]
