"""Forged receipts: a receipt the host did not issue is flagged receipt_invalid and raises an alert.

A guest (or an attacker inside it) that sends a receipt failing the MAC must never be
treated like a guest that sent none: the decision carries the flag ``receipt_invalid``
and an alert of that kind, on both decision endpoints, and whatever a Redis cache holds.
"""

from __future__ import annotations

from typing import Any

import pytest

from replayguard.settings import Secret
from tests.conftest import REDIS_URL, Api, FakeClock, uid

FORGERIES = {
    "MAC flipped": None,  # built from a receipt the service issued
    "random rg1 shape": "rg1.eyJ2bSI6Im5vIn0.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "not a receipt": "receipt-from-nowhere",
}


def _flip_mac(receipt: str) -> str:
    head, mac = receipt.rsplit(".", 1)
    last = "A" if mac[-2] != "A" else "B"  # the second-to-last char: all of its bits are in the MAC
    return f"{head}.{mac[:-2]}{last}{mac[-1]}"


async def _nonce(api: Api, vm_id: str, receipt: str | None = None, nonce: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"vm_id": vm_id, "scope": "forged", "nonce": nonce or uid("n"), "ttl_s": 300}
    if receipt is not None:
        body["receipt"] = receipt
    status, answer = await api.post("/v1/nonces/consume", body)
    assert status == 200, answer
    return dict(answer)


async def _assert_flagged_with_alert(api: Api, answer: dict[str, Any], vm_id: str) -> None:
    assert "receipt_invalid" in answer["flags"], answer
    assert answer.get("alert_id"), answer  # the decision raised or joined an alert
    status, page = await api.get(f"/v1/alerts?vm_id={vm_id}&kind=receipt_invalid")
    assert status == 200, page
    assert [item["vm_id"] for item in page["items"]] == [vm_id], page


@pytest.mark.parametrize("forgery", FORGERIES, ids=list(FORGERIES))
async def test_forged_receipt_on_nonce_consume_is_flagged_with_an_alert(api: Api, forgery: str) -> None:
    """A nonce decision with a receipt the host did not issue carries receipt_invalid and an alert."""
    vm_id = uid("vm")
    issued = (await _nonce(api, vm_id))["receipt"]
    receipt = FORGERIES[forgery] or _flip_mac(issued)
    answer = await _nonce(api, vm_id, receipt)
    await _assert_flagged_with_alert(api, answer, vm_id)


async def test_forged_receipt_on_otp_verify_is_flagged_with_an_alert(api: Api) -> None:
    """An OTP decision with a tampered receipt carries receipt_invalid and an alert, not the absent path."""
    vm_id, principal = uid("vm"), uid("alice")
    await api.enroll(principal)
    issued = (await _nonce(api, vm_id))["receipt"]
    status, answer = await api.post("/v1/otp/verify", {"vm_id": vm_id, "principal": principal, "otp": "000000",
                                                       "receipt": _flip_mac(issued)})
    assert status == 200, answer
    await _assert_flagged_with_alert(api, answer, vm_id)


async def test_valid_receipt_is_not_flagged(api: Api) -> None:
    """The receipt the host just issued, sent back, raises no receipt_invalid (the check is not blanket)."""
    vm_id = uid("vm")
    issued = (await _nonce(api, vm_id))["receipt"]
    assert "receipt_invalid" not in (await _nonce(api, vm_id, issued))["flags"]


async def test_forged_receipt_is_flagged_with_redis_configured(api_factory: Any) -> None:
    """A replayed nonce with a forged receipt carries receipt_invalid and an alert with Redis configured too."""
    api: Api = await api_factory(FakeClock(), redis_url=Secret(REDIS_URL))
    vm_id, nonce = uid("vm"), uid("n")
    first = await _nonce(api, vm_id, nonce=nonce)
    assert first["decision"] == "accept"
    again = await _nonce(api, vm_id, _flip_mac(first["receipt"]), nonce=nonce)
    assert (again["decision"], again["reason"]) == ("reject", "reused")
    await _assert_flagged_with_alert(api, again, vm_id)
