"""What the tests of ``receipt_reaction = "refuse"`` share: a guest's nonce with its receipt,
a hypervisor's event, an administrator's clear, and a VM's refusal as stored."""

from __future__ import annotations

from typing import Any

from tests.conftest import Api, uid


async def consume(api: Api, vm_id: str, receipt: str | None = None) -> dict[str, Any]:
    """A fresh nonce of ``vm_id``, presenting ``receipt`` when given; the 200 answer."""
    body: dict[str, Any] = {"vm_id": vm_id, "scope": "refuse", "nonce": uid("n")}
    if receipt is not None:
        body["receipt"] = receipt
    status, answer = await api.post("/v1/nonces/consume", body)
    assert status == 200, answer
    return dict(answer)


async def event(api: Api, vm_id: str, kind: str, **fields: Any) -> None:
    """Posts the event, occurred now unless ``fields`` say otherwise (``occurred_at=None``
    leaves the time of the change out); it must be new and accepted."""
    body = {"event_id": uid("evt"), "type": kind, "vm_id": vm_id, "occurred_at": api.clock.now, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    status, answer = await api.post("/v1/hypervisor/events", body, role="hypervisor")
    assert status == 202 and answer["duplicate"] is False, answer


async def clear(api: Api, vm_id: str) -> dict[str, Any]:
    """An administrator lifts the VM's refusal."""
    status, cleared = await api.post(f"/v1/vms/{vm_id}/clear", {"note": "planned"}, role="admin")
    assert status == 200, cleared
    return dict(cleared)


async def vm_row(api: Api, vm_id: str) -> dict[str, Any]:
    """The VM's refusal as stored: ``refusing`` and ``refusing_reason``."""
    async with api.runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT refusing, refusing_reason FROM vms WHERE vm_id = $1", vm_id)
    assert row is not None
    return dict(row.items())
