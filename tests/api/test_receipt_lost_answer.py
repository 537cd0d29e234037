"""A receipt whose answer never reached the guest is not a rollback; a disk gone back still is.

A caller that keeps receipts names each request (``receipt_request``, stored before it
sends it) and, when an answer never came, sends that id as ``receipt_unanswered`` with the
receipt it presented then. Only that pair, for the request that last moved the VM's
position, is a lost answer: an old receipt with any other id, or none, is
``rollback_detected`` as before.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.conftest import Api, uid


def request_id() -> str:
    return secrets.token_urlsafe(24)


async def consume(api: Api, vm_id: str, receipt: str | None = None, **ids: str) -> dict[str, Any]:
    body: dict[str, Any] = {"vm_id": vm_id, "scope": "lost", "nonce": uid("n"), "receipt_kept": True, **ids}
    if receipt is not None:
        body["receipt"] = receipt
    status, answer = await api.post("/v1/nonces/consume", body)
    assert status == 200, answer
    return dict(answer)


async def ledger_payload(api: Api, seq: int) -> dict[str, Any]:
    async with api.runtime.pool.acquire() as conn:
        return dict(await conn.fetchval("SELECT payload FROM ledger WHERE seq = $1", seq))


async def test_an_answer_lost_after_the_host_decided_is_not_a_rollback(api: Api) -> None:
    """Request X presented receipt A and its answer was lost: A again, with X as unanswered,
    is accepted with no flag and no alert (the ledger entry says receipt_resent), and the
    guest carries on from the new receipt; twice lost in a row is still no rollback."""
    vm_id = uid("vm")
    a = (await consume(api, vm_id))["receipt"]
    a = (await consume(api, vm_id, a))["receipt"]  # the VM's position is at a receipt the guest holds
    x = request_id()
    lost = await consume(api, vm_id, a, receipt_request=x)  # decided; the guest never sees the answer
    assert lost["flags"] == []
    y = request_id()
    again = await consume(api, vm_id, a, receipt_request=y, receipt_unanswered=x)
    assert (again["decision"], again["flags"], again.get("alert_id")) == ("accept", [], None), again
    assert (await ledger_payload(api, again["seq"]))["receipt_resent"] is True
    z = request_id()
    twice = await consume(api, vm_id, a, receipt_request=z, receipt_unanswered=y)  # y's answer lost too
    assert (twice["flags"], twice.get("alert_id")) == ([], None), twice
    after = await consume(api, vm_id, twice["receipt"], receipt_request=request_id())
    assert after["flags"] == [], after
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM alerts WHERE vm_id = $1", vm_id) == 0


@pytest.mark.parametrize("case", ["no id", "a guessed id", "an older request's id", "another receipt",
                                  "a guessed id, the newest request unnamed"])
async def test_an_old_receipt_is_a_rollback_unless_it_is_the_lost_answer(api: Api, case: str) -> None:
    """A disk gone back presents an older receipt: with no unanswered id, a guessed one, the
    id of a request that did get its answer, or X's id with a receipt other than the one X
    presented, it is rollback_detected with a critical alert; so is any id when the newest
    request named none (a caller that does not name its requests)."""
    vm_id = uid("vm")
    first = (await consume(api, vm_id))["receipt"]
    a = (await consume(api, vm_id, first))["receipt"]
    w = request_id()
    b = (await consume(api, vm_id, a, receipt_request=w))["receipt"]  # answered: the guest stores b
    x = request_id()
    named = {} if case.endswith("unnamed") else {"receipt_request": x}
    await consume(api, vm_id, b, **named)  # the newest request; its answer is the lost one
    presented, unanswered = {
        "no id": (b, None),
        "a guessed id": (b, request_id()),
        "an older request's id": (a, w),
        "another receipt": (a, x),
        "a guessed id, the newest request unnamed": (b, request_id()),
    }[case]
    ids = {"receipt_request": request_id()} | ({} if unanswered is None else {"receipt_unanswered": unanswered})
    back = await consume(api, vm_id, presented, **ids)
    assert back["flags"] == ["rollback_detected"] and back.get("alert_id"), back
    status, alert = await api.get(f"/v1/alerts/{back['alert_id']}")
    assert (status, alert["kind"], alert["severity"]) == (200, "rollback_detected", "critical")


@pytest.mark.parametrize("value", ["short", "x" * 129, "has a space in it..", "é" * 20, 12345678901234567])
@pytest.mark.parametrize("field", ["receipt_request", "receipt_unanswered"])
async def test_a_request_id_that_is_not_16_to_128_printable_ascii_is_a_400(api: Api, field: str,
                                                                          value: object) -> None:
    """A request id that is too short, too long, has a space, is not ASCII or not a string is
    400 invalid_request naming the field, and nothing is consumed."""
    body = {"vm_id": uid("vm"), "scope": "lost", "nonce": uid("n"), field: value}
    status, answer = await api.post("/v1/nonces/consume", body)
    assert (status, answer["error"]["code"], answer["error"]["field"]) == (400, "invalid_request", field), answer
    status, answer = await api.post("/v1/nonces/consume", {k: v for k, v in body.items() if k != field})
    assert (status, answer["decision"]) == (200, "accept"), answer
