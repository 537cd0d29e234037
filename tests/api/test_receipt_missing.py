"""A caller that keeps receipts (``receipt_kept``) but sends none, on a VM that presented one before.

The guest's disk went back past its first receipt, or someone removed the file: the
decision carries the flag ``receipt_missing`` and a warning alert is raised. A VM's first
login, and callers that do not keep receipts (RADIUS, most nonce clients), raise nothing.
"""

from __future__ import annotations

from typing import Any

import pyotp

from tests.conftest import Api, uid


async def verify(api: Api, vm_id: str, principal: str, code: str, **extra: Any) -> dict[str, Any]:
    status, answer = await api.post("/v1/otp/verify", {"vm_id": vm_id, "principal": principal, "otp": code, **extra})
    assert status == 200, answer
    return dict(answer)


async def test_a_lost_receipt_is_flagged_and_alerted(api: Api) -> None:
    """After a login with a receipt, a receipt-keeping login without one is flagged receipt_missing with an alert."""
    vm_id, principal = uid("vm"), uid("p")
    totp = pyotp.TOTP((await api.enroll(principal))["secret"])
    first = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt_kept=True)
    assert first["flags"] == [] and first["decision"] == "accept"
    api.clock.advance(30)
    second = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt=first["receipt"], receipt_kept=True)
    assert second["flags"] == [] and second["decision"] == "accept"
    api.clock.advance(30)
    lost = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt_kept=True)
    assert lost["flags"] == ["receipt_missing"] and "alert_id" in lost
    assert lost["decision"] == "accept"  # a warning, not a lock: whoever can delete the file must not lock the VM
    async with api.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT kind, severity FROM alerts WHERE vm_id = $1", vm_id)
        kinds = [(r["kind"], r["severity"]) for r in rows]
    assert kinds == [("receipt_missing", "warning")]


async def test_no_receipt_without_receipt_kept_raises_nothing(api: Api) -> None:
    """A caller that does not declare receipt_kept (e.g. RADIUS on the same VM) sends none without a flag."""
    vm_id, principal = uid("vm"), uid("p")
    totp = pyotp.TOTP((await api.enroll(principal))["secret"])
    first = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt_kept=True)
    api.clock.advance(30)
    await verify(api, vm_id, principal, totp.at(api.clock.now), receipt=first["receipt"], receipt_kept=True)
    api.clock.advance(30)
    other = await verify(api, vm_id, principal, totp.at(api.clock.now))
    assert other["flags"] == []


async def test_a_new_vm_without_receipt_is_not_flagged(api: Api) -> None:
    """A VM's first receipt-keeping login has no receipt yet, and is not flagged."""
    principal = uid("p")
    totp = pyotp.TOTP((await api.enroll(principal))["secret"])
    answer = await verify(api, uid("vm"), principal, totp.at(api.clock.now), receipt_kept=True)
    assert answer["flags"] == [] and answer["decision"] == "accept"


async def test_receipt_kept_must_be_a_boolean(api: Api) -> None:
    """receipt_kept that is not true or false is a 400 naming the field."""
    status, answer = await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": "p", "otp": "123456",
                                                       "receipt_kept": "yes"})
    assert status == 400 and answer["error"]["field"] == "receipt_kept"


async def test_a_vm_with_the_longest_id_presents_its_receipts_back(api: Api) -> None:
    """A VM id of 256 characters outside the BMP is valid; the receipts it gets are taken
    back (no 400, no receipt_invalid), and an older one is still found to be a rollback."""
    vm_id = uid("vm")[-8:] + "\U0001F600" * 248
    assert len(vm_id) == 256
    principal = uid("p")
    totp = pyotp.TOTP((await api.enroll(principal))["secret"])
    first = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt_kept=True)
    api.clock.advance(30)
    second = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt=first["receipt"], receipt_kept=True)
    assert second["flags"] == [] and second["decision"] == "accept"
    api.clock.advance(30)
    third = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt=second["receipt"], receipt_kept=True)
    assert third["flags"] == [] and third["decision"] == "accept"
    api.clock.advance(30)
    rolled = await verify(api, vm_id, principal, totp.at(api.clock.now), receipt=first["receipt"], receipt_kept=True)
    assert rolled["flags"] == ["rollback_detected"]
