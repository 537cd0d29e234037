"""With ``receipt_reaction = "refuse"``, a reported revert or restore accounts for the stale
receipt the reverted guest presents next, when the revert explains it: the guest's disk
went back to the state of the snapshot, so it holds the receipt it had then (or one issued
between the snapshot and the revert). That receipt re-syncs the guest, once, without a new
flag or refusal, so an administrator may clear the VM before or after the guest's first
request. Any other stale receipt (older than the snapshot's, a second one, one after the
guest re-synced, or one after the guest already spoke following the revert) is still
``rollback_detected`` and refuses the VM again. Flag mode is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.api.refuse_mode import clear, consume, event, vm_row
from tests.conftest import Api, FakeClock, uid


async def rollback_alerts(api: Api, vm_id: str) -> int:
    async with api.runtime.pool.acquire() as conn:
        return int(await conn.fetchval(
            "SELECT count(*) FROM alerts WHERE vm_id = $1 AND kind = 'rollback_detected'", vm_id))


async def reverted_guest(api: Api) -> tuple[str, list[str]]:
    """A guest that presented receipts r0, r1 (its state when snapshot s1 is taken), then r2
    and r3 after it; the VM is reverted to s1 (reported), so its disk holds r1 again.
    Returns the VM and [r0, r1, r2, r3] (r3: the latest issued)."""
    vm_id = uid("web-01")
    receipts = [(await consume(api, vm_id))["receipt"]]
    api.clock.advance(5)
    receipts.append((await consume(api, vm_id, receipts[-1]))["receipt"])
    api.clock.advance(5)
    taken = api.clock.now
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=taken)
    for _ in range(2):
        api.clock.advance(5)
        answer = await consume(api, vm_id, receipts[-1])
        assert (answer["decision"], answer["flags"]) == ("accept", []), answer
        receipts.append(answer["receipt"])
    api.clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1", snapshot_created_at=taken)
    return vm_id, receipts


async def test_a_vm_cleared_before_its_guests_first_request_after_a_reported_revert_is_served(
    api_factory: Callable[..., Any],
) -> None:
    """Revert reported, VM refused, cleared; the guest's first request presents the receipt
    its disk went back to: accepted, no flag, no new alert, the VM not refusing; its next
    request with the fresh receipt is accepted too."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id, receipts = await reverted_guest(api)
    api.clock.advance(5)
    assert (await consume(api, vm_id))["reason"] == "locked_out"  # a RADIUS callout, no receipt
    assert (await clear(api, vm_id))["refusing_reason"] == "snapshot.reverted"
    api.clock.advance(5)
    first = await consume(api, vm_id, receipts[1])
    assert (first["decision"], first["reason"], first["flags"]) == ("accept", "ok", []), first
    assert (await vm_row(api, vm_id))["refusing"] is False
    assert await rollback_alerts(api, vm_id) == 0
    async with api.runtime.pool.acquire() as conn:
        payload = await conn.fetchval("SELECT payload FROM ledger WHERE seq = $1", first["seq"])
    assert "receipt_explained_by" in payload, payload
    api.clock.advance(5)
    after = await consume(api, vm_id, first["receipt"])
    assert (after["decision"], after["flags"]) == ("accept", []), after


async def test_the_guests_first_request_before_the_clear_raises_no_second_refusal(
    api_factory: Callable[..., Any],
) -> None:
    """The guest speaks first, with the receipt the revert explains: refused (the VM is
    still refusing because of the event) but not flagged, and its refusing_reason stays the
    event's; after the clear, the receipt that answer carried is accepted."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id, receipts = await reverted_guest(api)
    api.clock.advance(5)
    first = await consume(api, vm_id, receipts[1])
    assert (first["reason"], first["flags"]) == ("locked_out", []), first
    assert (await vm_row(api, vm_id))["refusing_reason"] == "snapshot.reverted"
    assert (await clear(api, vm_id))["refusing_reason"] == "snapshot.reverted"
    api.clock.advance(5)
    after = await consume(api, vm_id, first["receipt"])
    assert (after["decision"], after["flags"]) == ("accept", []), after
    assert await rollback_alerts(api, vm_id) == 0


async def test_a_second_unreported_revert_after_the_clear_is_still_refused(api_factory: Callable[..., Any]) -> None:
    """After the guest re-synced with the receipt the reported revert explains, the same old
    receipt again (the attacker reverted the VM once more, unreported) is rollback_detected
    and refuses the VM: the reported revert explains one stale receipt, once."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id, receipts = await reverted_guest(api)
    await clear(api, vm_id)
    api.clock.advance(5)
    assert (await consume(api, vm_id, receipts[1]))["decision"] == "accept"
    api.clock.advance(5)
    again = await consume(api, vm_id, receipts[1])
    assert (again["reason"], again["flags"]) == ("locked_out", ["rollback_detected"]), again
    assert await vm_row(api, vm_id) == {"refusing": True, "refusing_reason": "rollback_detected"}
    api.clock.advance(5)
    assert (await consume(api, vm_id, again["receipt"]))["reason"] == "locked_out"


async def test_a_receipt_older_than_the_snapshot_is_still_refused(api_factory: Callable[..., Any]) -> None:
    """After the clear, the guest presents a receipt older than the one it held when the
    snapshot was taken: its state went back further than the reported revert says, so it
    is rollback_detected and the VM refuses again."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id, receipts = await reverted_guest(api)
    await clear(api, vm_id)
    api.clock.advance(5)
    older = await consume(api, vm_id, receipts[0])
    assert (older["reason"], older["flags"]) == ("locked_out", ["rollback_detected"]), older
    assert (await vm_row(api, vm_id))["refusing"] is True


async def test_a_receipt_between_the_snapshot_and_the_revert_is_explained(api_factory: Callable[..., Any]) -> None:
    """A receipt issued after the snapshot and before the revert shows no use the revert's
    window does not already cover: explained too (once)."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id, receipts = await reverted_guest(api)
    await clear(api, vm_id)
    api.clock.advance(5)
    first = await consume(api, vm_id, receipts[2])
    assert (first["decision"], first["flags"]) == ("accept", []), first


async def test_a_stale_receipt_after_a_fresh_one_is_still_refused(api_factory: Callable[..., Any]) -> None:
    """A revert to a snapshot taken after the guest's last request leaves its receipt
    current: the guest presents it (nothing to explain), and a stale receipt after that is
    rollback_detected."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id = uid("web-01")
    old = (await consume(api, vm_id))["receipt"]
    api.clock.advance(5)
    current = (await consume(api, vm_id, old))["receipt"]
    api.clock.advance(5)
    taken = api.clock.now
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=taken)
    api.clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1", snapshot_created_at=taken)
    await clear(api, vm_id)
    api.clock.advance(5)
    fresh = await consume(api, vm_id, current)
    assert (fresh["decision"], fresh["flags"]) == ("accept", []), fresh
    api.clock.advance(5)
    stale = await consume(api, vm_id, current)
    assert (stale["reason"], stale["flags"]) == ("locked_out", ["rollback_detected"]), stale


@pytest.mark.parametrize("report", ["revert_time", "no_time", "seen_as_it_spoke", "seen_after_it_spoke"])
async def test_a_revert_reported_after_the_guest_spoke_explains_nothing(
        api_factory: Callable[..., Any], report: str) -> None:
    """The revert's report arrives after the guest already presented its stale receipt
    following the revert (flagged then): the guest already came back from a revert, so the
    event explains no later stale receipt, and the old one presented again after the clear
    is rollback_detected, whatever time the report gives: the revert's own
    (``revert_time``), none (``no_time``: its arrival says nothing), or when a polling relay
    saw it (the libvirt relay's occurred_at), as the guest spoke or after."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id = uid("web-01")
    held = (await consume(api, vm_id))["receipt"]
    api.clock.advance(5)
    taken = api.clock.now
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=taken)
    api.clock.advance(5)
    await consume(api, vm_id, held)
    api.clock.advance(5)
    reverted_at = api.clock.now
    api.clock.advance(5)
    spoke = await consume(api, vm_id, held)  # the guest's first request after the revert
    assert spoke["flags"] == ["rollback_detected"], spoke
    api.clock.advance(0 if report == "seen_as_it_spoke" else 5)
    occurred_at = {"revert_time": reverted_at, "no_time": None}.get(report, api.clock.now)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1", snapshot_created_at=taken, occurred_at=occurred_at)
    await clear(api, vm_id)
    api.clock.advance(5)
    again = await consume(api, vm_id, held)
    assert (again["reason"], again["flags"]) == ("locked_out", ["rollback_detected"]), again


async def test_a_report_after_a_detected_rollback_keeps_the_refusals_reason(api_factory: Callable[..., Any]) -> None:
    """A VM refused for a rollback its receipts showed (rollback_detected) and then reported
    reverted keeps rollback_detected as the reason of its refusal: the report must not make
    the detected rollback read as a planned one to the administrator who clears it."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id = uid("web-01")
    held = (await consume(api, vm_id))["receipt"]
    api.clock.advance(5)
    taken = api.clock.now
    await consume(api, vm_id, held)
    api.clock.advance(5)
    detected = await consume(api, vm_id, held)
    assert (detected["reason"], detected["flags"]) == ("locked_out", ["rollback_detected"]), detected
    api.clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1", snapshot_created_at=taken)
    assert await vm_row(api, vm_id) == {"refusing": True, "refusing_reason": "rollback_detected"}


async def test_flag_mode_still_flags_the_receipt_a_reported_revert_explains(api: Api) -> None:
    """With receipt_reaction=flag the guest's stale receipt after a reported revert is
    rollback_detected as before (and the VM keeps serving)."""
    vm_id, receipts = await reverted_guest(api)
    api.clock.advance(5)
    first = await consume(api, vm_id, receipts[1])
    assert (first["decision"], first["flags"]) == ("accept", ["rollback_detected"]), first


async def test_a_restore_to_an_unknown_time_explains_any_one_stale_receipt(api_factory: Callable[..., Any]) -> None:
    """A restore whose state time is unknown opens a window over every earlier use, so any
    one stale receipt of the VM is the guest coming back from it: accepted after the clear;
    a second stale receipt is rollback_detected."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id = uid("web-01")
    receipts = [(await consume(api, vm_id))["receipt"]]
    for _ in range(2):
        api.clock.advance(5)
        receipts.append((await consume(api, vm_id, receipts[-1]))["receipt"])
    api.clock.advance(5)
    await event(api, vm_id, "vm.restored")
    await clear(api, vm_id)
    api.clock.advance(5)
    first = await consume(api, vm_id, receipts[0])
    assert (first["decision"], first["flags"]) == ("accept", []), first
    api.clock.advance(5)
    second = await consume(api, vm_id, receipts[1])
    assert (second["reason"], second["flags"]) == ("locked_out", ["rollback_detected"]), second
