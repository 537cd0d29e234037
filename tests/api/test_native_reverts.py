"""Native hypervisor events: reverts whose details are odd still open their windows."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from replayguard.relay.libvirt_events import Kind, SnapshotRef, event_body
from replayguard.relay.spool import Outcome, classify_status
from tests.api.test_hypervisor_events import sample, windows_of
from tests.api.test_rollback_attack import alice, login
from tests.conftest import Api, uid

UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
# Names a user can give a snapshot (virsh snapshot-create-as, the vSphere client) that are
# not "identifiers": a no-break space pasted from a document, a long descriptive name.
ODD_NAMES = ["pre\u00a0patch", "release 4.2 \u2014 before the upgrade of the payment stack " * 6]


@pytest.mark.parametrize("name", ODD_NAMES, ids=["nbsp", "long"])
@pytest.mark.parametrize("kind", [Kind.LIFECYCLE, Kind.SILENT_REVERT])
async def test_libvirt_revert_to_a_snapshot_with_an_odd_name_opens_a_window(api: Api, name: str, kind: Kind) -> None:
    """A revert to a snapshot whose name is no identifier (a no-break space, over 256
    characters) is taken, under a name derived from it: a 400 would park it in the relay's
    dead/ and open no window; the name is only a hint beside the creation time."""
    vm_id = uid("dom")
    lifecycle = kind is Kind.LIFECYCLE
    body = event_body(event_id=uid("hv-03"), uri="qemu:///system", host="hv-03", domain=(vm_id, UUID),
                      kind=kind, event=2 if lifecycle else -1, detail=3 if lifecycle else -1,
                      occurred_at=api.clock.now - 5, snapshot=SnapshotRef(name, int(api.clock.now) - 600))
    status, answer = await api.post("/v1/hypervisor/events?source=libvirt", body, role="hypervisor")
    assert classify_status(status) is not Outcome.DEAD, (status, answer)
    assert status == 202, answer
    assert [cause for _, _, cause in await windows_of(api, vm_id)] == ["snapshot.reverted"]


@pytest.mark.parametrize("name", ODD_NAMES, ids=["nbsp", "long"])
async def test_vsphere_revert_to_a_snapshot_with_an_odd_name_opens_a_window(api: Api, name: str) -> None:
    """A vSphere revert naming a snapshot that is no identifier in FullFormattedMessage
    is taken (the forwarder would park a 400 in dead/ and answer VEBA 200: no window)."""
    payload = copy.deepcopy(sample("vsphere", "revert_knative_type.json"))
    vm_id = uid("web")
    payload["id"] = uid("ce")
    payload["data"]["Vm"]["Name"] = vm_id
    payload["data"]["CreatedTime"] = datetime.fromtimestamp(api.clock.now - 5, UTC).isoformat()
    payload["data"]["FullFormattedMessage"] = (
        f"{vm_id} on esx-01.lab.example in DC1 has been reverted to the state of snapshot {name}, with ID 3")
    status, answer = await api.post("/v1/hypervisor/events?source=vsphere", payload, role="hypervisor")
    assert classify_status(status) is not Outcome.DEAD, (status, answer)
    assert status == 202, answer
    assert [cause for _, _, cause in await windows_of(api, vm_id)] == ["snapshot.reverted"]


def _nova(name: str, event_type: str, at: float, uuid: str, image: str) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(sample("openstack", name))
    body["message_id"], body["event_type"] = uid("msg"), event_type
    body["timestamp"] = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    data = body["payload"]["nova_object.data"]
    data["uuid"] = uuid
    data["snapshot_image_id" if "snapshot" in event_type else "image_uuid"] = image
    return body


async def test_openstack_rebuild_from_a_snapshot_puts_uses_made_while_it_was_taken_at_risk(api: Api) -> None:
    """An OpenStack snapshot's time is ``instance.snapshot.start``'s: a login made while the
    image was taken (before ``.end``) may be missing from it, so a rebuild from that image
    puts it at risk (a window may widen, never narrow)."""
    vm_id = "178b0921-8f85-4257-88b6-" + uid("")[-12:].rjust(12, "0")
    image = "d2aae36f-785c-4518-8016-bc9534d9fc7f"
    principal, totp = await alice(api)
    start = api.clock.now
    status, _ = await api.post("/v1/hypervisor/events?source=openstack",
                               _nova("snapshot_start.json", "instance.snapshot.start", start, vm_id, image),
                               role="hypervisor")
    assert status == 202
    api.clock.advance(10)
    code = totp.at(api.clock.now)
    first = await login(api, vm_id, principal, code)
    assert first["decision"] == "accept"
    api.clock.advance(20)  # the image upload ends
    status, _ = await api.post("/v1/hypervisor/events?source=openstack",
                               _nova("snapshot_end_ignored.json", "instance.snapshot.end", api.clock.now, vm_id, image),
                               role="hypervisor")
    assert status == 202
    api.clock.advance(5)
    status, _ = await api.post("/v1/hypervisor/events?source=openstack",
                               _nova("rebuild_end.json", "instance.rebuild.end", api.clock.now, vm_id, image),
                               role="hypervisor")
    assert status == 202
    replay = await login(api, vm_id, principal, code)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay


async def test_libvirt_revert_to_a_snapshot_of_unread_creation_time_covers_uses_before_the_poll(api: Api) -> None:
    """A snapshot whose creation time the relay could not read keeps an unknown time (not
    the relay's poll time): a revert to it puts every earlier use at risk, including a
    login made after the snapshot and before the relay saw it."""
    vm_id = uid("dom")
    principal, totp = await alice(api)
    code = totp.at(api.clock.now)
    first = await login(api, vm_id, principal, code)  # after the snapshot was taken, before the relay saw it
    assert first["decision"] == "accept"
    api.clock.advance(10)
    created = event_body(event_id=uid("hv-03"), uri="qemu:///system", host="hv-03", domain=(vm_id, UUID),
                         kind=Kind.SNAPSHOT_CREATED, event=-1, detail=-1, occurred_at=api.clock.now,
                         snapshot=SnapshotRef("pre-patch", None))
    assert (await api.post("/v1/hypervisor/events?source=libvirt", created, role="hypervisor"))[0] == 202
    api.clock.advance(10)
    reverted = event_body(event_id=uid("hv-03"), uri="qemu:///system", host="hv-03", domain=(vm_id, UUID),
                          kind=Kind.LIFECYCLE, event=2, detail=3, occurred_at=api.clock.now,
                          snapshot=SnapshotRef("pre-patch", None))
    assert (await api.post("/v1/hypervisor/events?source=libvirt", reverted, role="hypervisor"))[0] == 202
    replay = await login(api, vm_id, principal, code)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay


@pytest.mark.parametrize("name", [".", ".."])
async def test_a_native_event_cannot_name_a_vm_no_url_can_reach(api: Api, name: str) -> None:
    """Native events refuse VM ids '.' and '..' as the generic form does (no URL path can
    name them, so no analyst could open that VM's timeline)."""
    body = copy.deepcopy(sample("libvirt", "booted.json"))
    body["domain"]["name"], body["event_id"] = name, uid("hv")
    status, answer = await api.post("/v1/hypervisor/events?source=libvirt", body, role="hypervisor")
    assert status == 400, answer
