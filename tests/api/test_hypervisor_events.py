"""Hypervisor events through the HTTP API: idempotency, ordering, native forms, errors, roles."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from replayguard.core.windows import to_us
from replayguard.hypervisors import PARSERS
from replayguard.relay.libvirt_events import Kind, SnapshotRef, event_body
from replayguard.settings import Secret
from tests.api.test_rollback_attack import alice, login
from tests.conftest import Api, FakeClock, uid

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "hypervisors"
AFTER_SAMPLES = 1_796_000_000.0  # the samples' events (2026-11-29 10:00-11:00) lie before this


def generic(vm_id: str, **fields: Any) -> dict[str, Any]:
    body = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm_id, "snapshot_id": "pre-patch",
            "snapshot_created_at": "2026-09-21T13:00:00Z", "occurred_at": "2026-09-21T13:05:00Z",
            "host": "hv-03", "source_vm_id": None}
    body.update(fields)
    return body


def us(text: str) -> int:
    return to_us(datetime.fromisoformat(text.replace("Z", "+00:00")))


def sample(source: str, name: str) -> Any:
    return json.loads((SAMPLES / source / name).read_text())


async def windows_of(api: Api, vm_id: str) -> list[tuple[int | None, int, str]]:
    async with api.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT start_us, end_us, cause FROM rollback_windows WHERE vm_id = $1 ORDER BY id",
                                vm_id)
    return [(r["start_us"], r["end_us"], r["cause"]) for r in rows]


async def event_rows(api: Api, event_id: str) -> list[dict[str, Any]]:
    async with api.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT h.type, h.vm_id, l.kind, l.subject, l.payload FROM hypervisor_events h"
            " JOIN ledger l ON l.seq = h.seq WHERE h.event_id = $1", event_id)
    return [dict(r.items()) for r in rows]


async def test_event_accepted_then_duplicate(api: Api) -> None:
    """The same event twice is recorded once; the second answer says duplicate."""
    body = generic(uid("vm"))
    assert await api.post("/v1/hypervisor/events", body, role="hypervisor") == (
        202, {"accepted": True, "duplicate": False, "events": 1})
    assert await api.post("/v1/hypervisor/events", body, role="hypervisor") == (
        202, {"accepted": True, "duplicate": True, "events": 1})
    rows = await event_rows(api, body["event_id"])
    assert len(rows) == 1 and rows[0]["kind"] == "event" and rows[0]["payload"]["type"] == "snapshot.reverted"


async def test_same_event_in_another_wire_form_is_a_duplicate(api: Api) -> None:
    """A resend with times as Unix seconds instead of RFC 3339 is the same event, not a conflict."""
    body = generic(uid("vm"))
    assert (await api.post("/v1/hypervisor/events", body, role="hypervisor"))[0] == 202
    resend = {**body, "occurred_at": 1_789_995_900, "snapshot_created_at": 1_789_995_600}
    status, answer = await api.post("/v1/hypervisor/events", resend, role="hypervisor")
    assert status == 202 and answer["duplicate"] is True


async def test_conflicting_event_is_409(api: Api) -> None:
    """The same event id with a different body is refused with 409 conflict, and nothing changes."""
    vm_id = uid("vm")
    body = generic(vm_id)
    await api.post("/v1/hypervisor/events", body, role="hypervisor")
    status, answer = await api.post("/v1/hypervisor/events", {**body, "snapshot_id": "other"}, role="hypervisor")
    assert status == 409
    assert answer["error"]["code"] == "conflict" and answer["error"]["field"] == "event_id"
    assert len(await windows_of(api, vm_id)) == 1


async def test_revert_opens_window_and_bumps_epoch(api: Api) -> None:
    """A revert opens [T, R] on its VM from the payload's times and starts a new epoch."""
    vm_id = uid("vm")
    await api.post("/v1/hypervisor/events", generic(vm_id), role="hypervisor")
    assert await windows_of(api, vm_id) == [
        (us("2026-09-21T13:00:00Z"), us("2026-09-21T13:05:00Z"), "snapshot.reverted")]
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT epoch FROM vms WHERE vm_id = $1", vm_id) == 1


async def test_snapshot_time_from_earlier_created_event(api: Api) -> None:
    """A revert without the snapshot's time takes it from that snapshot's earlier snapshot.created."""
    vm_id = uid("vm")
    created = generic(vm_id, type="snapshot.created", snapshot_created_at=None, occurred_at="2026-09-21T12:00:00Z")
    await api.post("/v1/hypervisor/events", created, role="hypervisor")
    await api.post("/v1/hypervisor/events", generic(vm_id, snapshot_created_at=None), role="hypervisor")
    assert await windows_of(api, vm_id) == [
        (us("2026-09-21T12:00:00Z"), us("2026-09-21T13:05:00Z"), "snapshot.reverted")]


async def test_out_of_order_revert_before_its_snapshot(api: Api) -> None:
    """A revert that arrives before its snapshot.created opens a window with an unknown start."""
    vm_id = uid("vm")
    await api.post("/v1/hypervisor/events", generic(vm_id, snapshot_created_at=None), role="hypervisor")
    created = generic(vm_id, type="snapshot.created", snapshot_created_at=None, occurred_at="2026-09-21T12:00:00Z")
    status, answer = await api.post("/v1/hypervisor/events", created, role="hypervisor")
    assert status == 202 and answer["duplicate"] is False
    assert await windows_of(api, vm_id) == [(None, us("2026-09-21T13:05:00Z"), "snapshot.reverted")]


async def test_late_event_window_ends_when_the_revert_happened(api: Api) -> None:
    """An event arriving an hour late still ends its window at the revert, not at its arrival."""
    vm_id = uid("vm")
    api.clock.advance(3600)
    await api.post("/v1/hypervisor/events", generic(vm_id), role="hypervisor")
    assert (await windows_of(api, vm_id))[0][1] == us("2026-09-21T13:05:00Z")


async def test_clone_event_opens_window_on_source(api: Api) -> None:
    """A vm.cloned event opens the window on the parent and records the lineage."""
    parent, child = uid("vm"), uid("vm")
    body = generic(child, type="vm.cloned", source_vm_id=parent)
    assert (await api.post("/v1/hypervisor/events", body, role="hypervisor"))[0] == 202
    assert await windows_of(api, parent) == [
        (us("2026-09-21T13:00:00Z"), us("2026-09-21T13:05:00Z"), "vm.cloned")]
    assert await windows_of(api, child) == []


async def test_revert_of_a_clone_to_an_older_snapshot_reaches_the_parent(api: Api) -> None:
    """Reverting a clone to a state older than the clone also puts the parent's uses since then at risk."""
    parent, child = uid("vm"), uid("vm")
    clone = generic(child, type="vm.cloned", source_vm_id=parent, snapshot_created_at=None,
                    snapshot_id=None, occurred_at="2026-09-21T13:00:00Z")
    await api.post("/v1/hypervisor/events", clone, role="hypervisor")
    revert = generic(child, snapshot_created_at="2026-09-21T12:00:00Z", occurred_at="2026-09-21T14:00:00Z")
    await api.post("/v1/hypervisor/events", revert, role="hypervisor")
    assert await windows_of(api, child) == [
        (us("2026-09-21T12:00:00Z"), us("2026-09-21T14:00:00Z"), "snapshot.reverted")]
    assert (us("2026-09-21T12:00:00Z"), us("2026-09-21T13:00:00Z"), "snapshot.reverted:lineage") in \
        await windows_of(api, parent)


@pytest.mark.parametrize("kind", ["snapshot.deleted", "vm.migrated", "vm.started", "vm.stopped"])
async def test_non_rollback_types_are_recorded_without_window(api: Api, kind: str) -> None:
    """Every other type of §5 is accepted and recorded in the ledger, and opens no window."""
    vm_id = uid("vm")
    body = generic(vm_id, type=kind)
    assert (await api.post("/v1/hypervisor/events", body, role="hypervisor"))[0] == 202
    assert await windows_of(api, vm_id) == []
    assert (await event_rows(api, body["event_id"]))[0]["type"] == kind


NATIVE_REVERTS = [
    ("libvirt", "revert_started_from_snapshot.json"),
    ("vsphere", "revert_router_eventex.json"),
    ("proxmox", "qmrollback.json"),
    ("openstack", "rebuild_end.json"),
]


@pytest.mark.parametrize(("source", "name"), NATIVE_REVERTS)
async def test_native_revert_through_the_endpoint(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any], source: str, name: str,
) -> None:
    """A native revert or rebuild is parsed, recorded under its own event id and opens a window."""
    # A database of its own: the samples name fixed VMs (web-01, 101) other tests must not inherit.
    api = await api_factory(FakeClock(AFTER_SAMPLES), database_url=Secret(await fresh_database()))
    payload = sample(source, name)
    expected = PARSERS[source](payload)
    status, answer = await api.post(f"/v1/hypervisor/events?source={source}", payload, role="hypervisor")
    assert status == 202 and answer["accepted"] is True
    rows = await event_rows(api, expected[0].event_id)
    assert rows and rows[0]["vm_id"] == expected[0].vm_id and rows[0]["payload"]["source"] == source
    assert await windows_of(api, expected[0].vm_id)


async def test_native_libvirt_window_uses_snapshot_time(api_factory: Callable[..., Any]) -> None:
    """The libvirt relay's snapshot creationTime and event time become [T, R]."""
    api = await api_factory(FakeClock(AFTER_SAMPLES))
    payload = sample("libvirt", "revert_started_from_snapshot.json")
    vm_id = uid("dom")
    payload["domain"]["name"], payload["event_id"] = vm_id, uid("hv-03")
    assert (await api.post("/v1/hypervisor/events?source=libvirt", payload, role="hypervisor"))[0] == 202
    assert await windows_of(api, vm_id) == [
        (us("2026-11-29T10:00:00Z"), us("2026-11-29T10:05:00Z"), "snapshot.reverted")]


@pytest.mark.parametrize("kind", ["lifecycle", "silent_revert"])
async def test_a_libvirt_revert_to_a_snapshot_of_unread_creation_time_opens_a_window_from_ever(
        api: Api, kind: str) -> None:
    """The relay sends ``creation_time: null`` for a snapshot whose ``<creationTime>`` it could
    not read: a revert to it (STARTED/FROM_SNAPSHOT, or the poller's silent_revert) is taken,
    with its state's time unknown, so its window covers every earlier use (it was a 400, and
    the relay parked the revert in dead/)."""
    body = event_body(event_id=uid("hv-03"), uri="qemu:///system", host="hv-03",
                      domain=(vm_id := uid("dom"), "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"),
                      kind=Kind.LIFECYCLE if kind == "lifecycle" else Kind.SILENT_REVERT,
                      event=2 if kind == "lifecycle" else -1, detail=3 if kind == "lifecycle" else -1,
                      occurred_at=api.clock.now - 5, snapshot=SnapshotRef("pre-patch", None))
    status, answer = await api.post("/v1/hypervisor/events?source=libvirt", body, role="hypervisor")
    assert status == 202, answer
    [(start, _, cause)] = await windows_of(api, vm_id)
    assert (start, cause) == (None, "snapshot.reverted")


async def test_a_snapshot_created_at_no_known_time_leaves_a_revert_to_it_unknown(api: Api) -> None:
    """A snapshot.created with neither snapshot_created_at nor occurred_at records no creation
    time (not its arrival, not 0): a revert to that snapshot has an unknown start, while a
    known earlier creation of the same name still gives one."""
    vm_id = uid("vm")
    created = {"event_id": uid("evt"), "type": "snapshot.created", "vm_id": vm_id, "snapshot_id": "cold"}
    assert (await api.post("/v1/hypervisor/events", created, role="hypervisor"))[0] == 202
    revert = generic(vm_id, snapshot_id="cold", snapshot_created_at=None, occurred_at=None)
    assert (await api.post("/v1/hypervisor/events", revert, role="hypervisor"))[0] == 202
    [(start, _, _)] = await windows_of(api, vm_id)
    assert start is None
    known = {**created, "event_id": uid("evt"), "snapshot_created_at": "2026-09-21T12:00:00Z"}
    assert (await api.post("/v1/hypervisor/events", known, role="hypervisor"))[0] == 202
    again = {**revert, "event_id": uid("evt")}
    assert (await api.post("/v1/hypervisor/events", again, role="hypervisor"))[0] == 202
    assert (await windows_of(api, vm_id))[-1][0] == us("2026-09-21T12:00:00Z")


@pytest.mark.parametrize(("source", "name"), [
    ("libvirt", "undefined_ignored.json"), ("vsphere", "user_login_ignored.json"),
    ("proxmox", "vzdump_ignored.json"), ("openstack", "snapshot_end_ignored.json"),
])
async def test_irrelevant_native_event_is_ignored(api: Api, source: str, name: str) -> None:
    """An irrelevant native event is answered 202 ignored, with its reason."""
    status, answer = await api.post(f"/v1/hypervisor/events?source={source}", sample(source, name), role="hypervisor")
    assert status == 202 and answer["accepted"] is True and answer["ignored"] is True and answer["reason"]


@pytest.mark.parametrize(("source", "name", "field"), [
    ("libvirt", "malformed_snapshot_time_string.json", "snapshot.creation_time"),
    ("vsphere", "malformed_clone_without_source.json", "data.SourceVm"),
    ("proxmox", "malformed_clone_without_target.json", "target_vmid"),
    ("openstack", "malformed_timestamp.json", "timestamp"),
])
async def test_malformed_native_event_is_400_with_field(api: Api, source: str, name: str, field: str) -> None:
    """A malformed native payload is a 400 naming the field at fault."""
    status, answer = await api.post(f"/v1/hypervisor/events?source={source}", sample(source, name), role="hypervisor")
    assert status == 400 and answer["error"]["code"] == "invalid_request" and answer["error"]["field"] == field


@pytest.mark.parametrize(("change", "field"), [
    ({"type": "snapshot.exploded"}, "type"),
    ({"type": None}, "type"),
    ({"event_id": None}, "event_id"),
    ({"event_id": ""}, "event_id"),
    ({"vm_id": "web\x00-01"}, "vm_id"),
    ({"vm_id": 7}, "vm_id"),
    ({"vm_id": "x" * 257}, "vm_id"),
    ({"occurred_at": "yesterday"}, "occurred_at"),
    ({"snapshot_created_at": [1]}, "snapshot_created_at"),
    ({"snapshot_created_at": -5}, "snapshot_created_at"),
    ({"snapshot_id": {"a": 1}}, "snapshot_id"),
    ({"type": "vm.cloned"}, "source_vm_id"),
    ({"type": "snapshot.created", "snapshot_id": None}, "snapshot_id"),
    ({"host": "\n"}, "host"),
])
async def test_malformed_generic_event_is_400_with_field(api: Api, change: dict[str, Any], field: str) -> None:
    """A malformed generic event is a 400 naming the field at fault, never a 500."""
    status, answer = await api.post("/v1/hypervisor/events", {**generic(uid("vm")), **change}, role="hypervisor")
    assert status == 400 and answer["error"]["field"] == field


async def test_clone_of_itself_is_400(api: Api) -> None:
    """A vm.cloned whose parent is itself is refused, naming source_vm_id."""
    vm_id = uid("vm")
    status, answer = await api.post("/v1/hypervisor/events", generic(vm_id, type="vm.cloned", source_vm_id=vm_id),
                                    role="hypervisor")
    assert status == 400 and answer["error"]["field"] == "source_vm_id"


@pytest.mark.parametrize("body", [[], "text", 3, True])
async def test_non_object_body_is_400(api: Api, body: Any) -> None:
    """A body that is not a JSON object is a 400 for the generic form and every native form."""
    for source in ("generic", "libvirt", "vsphere", "proxmox", "openstack"):
        status, _ = await api.post(f"/v1/hypervisor/events?source={source}", body, role="hypervisor")
        assert status == 400


async def test_unknown_source_is_400(api: Api) -> None:
    """An unknown ?source= is a 400 naming source."""
    status, answer = await api.post("/v1/hypervisor/events?source=xen", {}, role="hypervisor")
    assert status == 400 and answer["error"]["field"] == "source"


async def test_events_need_a_hypervisor_token(api: Api) -> None:
    """No token is 401; a callout or analyst token is 403; hypervisor and admin may post."""
    resp = await api.client.post("/v1/hypervisor/events", json=generic(uid("vm")))
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    for role in ("callout", "analyst"):
        status, answer = await api.post("/v1/hypervisor/events", generic(uid("vm")), role=role)
        assert status == 403 and answer["error"]["code"] == "forbidden"
    for role in ("hypervisor", "admin"):
        assert (await api.post("/v1/hypervisor/events", generic(uid("vm")), role=role))[0] == 202


async def test_clear_needs_an_admin_token(api: Api) -> None:
    """Only an administrator may clear a VM; the hypervisor relay may not."""
    resp = await api.client.post(f"/v1/vms/{uid('vm')}/clear", json={"note": "x"})
    assert resp.status == 401
    for role in ("callout", "hypervisor", "analyst"):
        assert (await api.post(f"/v1/vms/{uid('vm')}/clear", {"note": "x"}, role=role))[0] == 403


async def test_clear_unknown_vm_is_404_and_note_is_required(api: Api) -> None:
    """Clearing a VM never seen is 404; a clear without a note is 400 naming note."""
    status, answer = await api.post(f"/v1/vms/{uid('vm')}/clear", {"note": "checked"}, role="admin")
    assert status == 404 and answer["error"]["code"] == "not_found"
    vm_id = uid("vm")
    await api.post("/v1/hypervisor/events", generic(vm_id, type="vm.started"), role="hypervisor")
    for body in ({}, {"note": ""}, {"note": 5}, {"note": "a\x07b"}):
        status, answer = await api.post(f"/v1/vms/{vm_id}/clear", body, role="admin")
        assert status == 400 and answer["error"]["field"] == "note"


async def _post_event(api: Api, body: dict[str, Any]) -> None:
    status, answer = await api.post("/v1/hypervisor/events", body, role="hypervisor")
    assert status == 202 and answer["duplicate"] is False, answer


@pytest.mark.parametrize("order", ["clone_then_revert", "revert_then_clone"])
async def test_replay_of_parent_use_after_revert_of_clone(api: Api, order: str) -> None:
    """Parent P uses a code at base+10; clone C of P carries P's state of base+20; C is then
    reverted to a state of base (older than the clone). The code replayed is
    replay_after_rollback whatever order the two events arrive in (with the revert first, the
    clone event did not look at the window C already had, and the replay was reused)."""
    parent, child = uid("vmP"), uid("vmC")
    principal, totp = await alice(api)
    base = api.clock.now
    api.clock.advance(10)
    code = totp.at(api.clock.now)
    first = await login(api, parent, principal, code)
    assert first["decision"] == "accept"
    api.clock.advance(15)  # base + 25
    clone = {"event_id": uid("evt"), "type": "vm.cloned", "vm_id": child, "source_vm_id": parent,
             "snapshot_created_at": base + 20, "occurred_at": base + 20}
    revert = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": child, "snapshot_id": "old",
              "snapshot_created_at": base, "occurred_at": base + 24}
    for body in ([clone, revert] if order == "clone_then_revert" else [revert, clone]):
        await _post_event(api, body)
    replay = await login(api, uid("vmX"), principal, code)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), order


@pytest.mark.parametrize("order", ["parent_clone_first", "grandchild_clone_first"])
async def test_clone_of_a_clone_reaches_the_grandparent_in_any_order(api: Api, order: str) -> None:
    """C1 is cloned from P with P's state of base+20; C2 is cloned from C1 with a snapshot of
    C1 taken at base (older than C1's split, so P's state of base). A code P used at
    base+10 is not in C2's state: replayed, it is replay_after_rollback, whichever of the
    two clone events arrives first (with C2's first, C1's did not carry C2's window up to P)."""
    parent, c1, c2 = uid("vmP"), uid("vmC1"), uid("vmC2")
    principal, totp = await alice(api)
    base = api.clock.now
    api.clock.advance(10)
    code = totp.at(api.clock.now)
    assert (await login(api, parent, principal, code))["decision"] == "accept"
    api.clock.advance(15)
    clone1 = {"event_id": uid("evt"), "type": "vm.cloned", "vm_id": c1, "source_vm_id": parent,
              "snapshot_created_at": base + 20, "occurred_at": base + 20}
    clone2 = {"event_id": uid("evt"), "type": "vm.cloned", "vm_id": c2, "source_vm_id": c1,
              "snapshot_created_at": base, "occurred_at": base + 24}
    for body in ([clone1, clone2] if order == "parent_clone_first" else [clone2, clone1]):
        await _post_event(api, body)
    replay = await login(api, uid("vmX"), principal, code)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), order


async def _window_count(api: Api, *vm_ids: str) -> int:
    async with api.runtime.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM rollback_windows WHERE vm_id = ANY($1)", list(vm_ids)))


async def test_a_native_clone_named_as_its_source_is_refused(api: Api) -> None:
    """A vSphere VmClonedEvent whose clone has its source's name (two VMs of one name in
    two folders) is a 400, as the generic form's self-clone is: a VM its own parent would
    copy its windows onto itself at every further clone event."""
    vm_id = uid("web")
    for _ in range(3):
        payload = json.loads(json.dumps(sample("vsphere", "cloned.json")))
        payload["id"] = uid("ce")
        payload["data"]["Vm"]["Name"] = payload["data"]["SourceVm"]["Name"] = vm_id
        status, answer = await api.post("/v1/hypervisor/events?source=vsphere", payload, role="hypervisor")
        assert (status, answer["error"]["field"]) == (400, "source_vm_id"), answer
    assert await _window_count(api, vm_id) == 0


async def test_a_clone_cycle_does_not_multiply_windows(api: Api) -> None:
    """'a is a clone of b', then 'b is a clone of a', and so on (names reused, or a relay's
    mistake): each clone event carries the clone's windows to its source, and a window
    another already contains is not opened again, so the windows grow with the events,
    not geometrically (they tripled with each event, stalling every decision behind the
    head lock)."""
    a, b = uid("a"), uid("b")
    events = 10
    for i in range(events):
        vm_id, source = (a, b) if i % 2 == 0 else (b, a)
        api.clock.advance(1)
        body = {"event_id": uid("evt"), "type": "vm.cloned", "vm_id": vm_id, "source_vm_id": source,
                "occurred_at": api.clock.now}
        status, answer = await api.post("/v1/hypervisor/events", body, role="hypervisor")
        assert status == 202, answer
    assert await _window_count(api, a, b) <= 4 * events


def _pve_task(task_type: str, vmid: int, start: int, end: int, **fields: Any) -> dict[str, Any]:
    """A finished Proxmox task record as the poller posts it, with a UPID of its own."""
    pid = int(uid("").encode().hex()[-7:], 16)
    return {"upid": f"UPID:pve1:{pid:08X}:0001E240:{start:08X}:{task_type}:{vmid}:root@pam:",
            "node": "pve1", "starttime": start, "type": task_type, "id": str(vmid),
            "user": "root@pam", "status": "OK", "endtime": end, **fields}


async def test_proxmox_snapshot_of_unknown_time_puts_the_uses_during_its_task_at_risk(api: Api) -> None:
    """A qmsnapshot posted without snapshot_created_at (the poller could not read the
    snapshot list, or a hand-written record) is placed at its task's start: a nonce the VM
    used while the task ran may be in the snapshot, so after a rollback to that snapshot
    its replay is replay_after_rollback (placed at the task's end, it was plain reused)."""
    cluster = uid("pve")
    vm_id = f"{cluster}/101"
    start = int(api.clock.now)
    api.clock.advance(10)
    nonce = uid("n")
    status, used = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "pve", "nonce": nonce})
    assert (status, used["decision"]) == (200, "accept"), used
    api.clock.advance(200)
    for body in (_pve_task("qmsnapshot", 101, start, start + 50, snapshot="pre-patch", cluster=cluster),
                 _pve_task("qmrollback", 101, start + 100, start + 110, snapshot="pre-patch", cluster=cluster)):
        status, answer = await api.post("/v1/hypervisor/events?source=proxmox", body, role="hypervisor")
        assert status == 202, answer
    status, replay = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "pve", "nonce": nonce})
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay
