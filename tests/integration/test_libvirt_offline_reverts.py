"""Reverts the libvirt relay finds on its next poll: made while it was stopped, or between
snapshots whose one-second creation times are equal.

A private libvirtd (test driver) shared with the relay process, and the stand-in service,
as in ``test_libvirt_relay.py``. The relay is stopped (SIGTERM) while the domain is
changed, so the poll that starts the next relay compares with the poll state the last one
saved; libvirt does not replay the events it emitted meanwhile.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.libvirt_support import libvirt, requires_libvirt
from tests.integration.test_libvirt_relay import (  # noqa: F401 - fixtures
    Relays,
    StandIn,
    _connected,
    _snapshot,
    _started_domain,
    _the_silent_revert,
    _until,
    libvirt_uri,
    relays,
    standin,
)

pytestmark = requires_libvirt

def _created(service: StandIn, dom_uuid: str) -> set[str]:
    return {b["snapshot"]["name"] for b in service.of_domain(dom_uuid) if b["kind"] == "snapshot_created"}


def _silent(service: StandIn, dom_uuid: str) -> list[dict[str, Any]]:
    return [b for b in service.of_domain(dom_uuid) if b["kind"] == "silent_revert"]


async def _restart(manager: Relays, service: StandIn) -> Path:
    """Start a relay again (the last one stopped) and wait until it is connected; its log."""
    proc, log = manager.start(service.port)
    await _connected(proc, log)
    return log


async def _seen(service: StandIn, dom_uuid: str, names: set[str], log: Path) -> None:
    try:
        await _until(lambda: names <= _created(service, dom_uuid))
    except TimeoutError:
        pytest.fail(f"creations {names} missing: {service.of_domain(dom_uuid)}\nrelay log: {log.read_text()}")


def _redefine_current(dom: Any, xml: str) -> Any:
    """Define snapshot metadata as given and make it current: no lifecycle event, no state change."""
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    return dom.snapshotCreateXML(xml, flags)


@pytest.mark.parametrize("delete_current", [False, True])
async def test_a_revert_leaving_the_current_snapshot_in_place_while_the_relay_is_stopped_is_reported(
    libvirt_uri: str, standin: StandIn, relays: Relays, delete_current: bool  # noqa: F811
) -> None:
    """Snapshots a, then b (b current); the relay stops; the domain is reverted to b (the
    current snapshot), or to a followed by deleting b (which alone would make a current):
    no snapshot pointer moved unexplained, but libvirt now gives the domain the
    FROM_SNAPSHOT state reason, which the last poll did not see, so the next relay reports
    a silent_revert to the current snapshot. Restarting the relay again reports nothing more."""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    a, a_time = _snapshot(dom, "a")
    b, b_time = _snapshot(dom, "b")
    await _seen(standin, dom_uuid, {"a", "b"}, log)
    relays.stop_all()

    if delete_current:
        dom.revertToSnapshot(a)
        b.delete(0)
    else:
        dom.revertToSnapshot(b)
    assert dom.state(0) == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_FROM_SNAPSHOT]

    log = await _restart(relays, standin)
    body = await _the_silent_revert(standin, dom_uuid, log)
    expected = {"name": "a", "creation_time": a_time} if delete_current else {"name": "b", "creation_time": b_time}
    assert body["snapshot"] == expected

    relays.stop_all()  # an ordinary restart: the same FROM_SNAPSHOT state, already reported
    log = await _restart(relays, standin)
    _snapshot(dom, "after")
    await _seen(standin, dom_uuid, {"after"}, log)
    assert len(_silent(standin, dom_uuid)) == 1, standin.of_domain(dom_uuid)


async def test_a_revert_between_snapshots_taken_in_the_same_second_is_reported(
    libvirt_uri: str, standin: StandIn, relays: Relays  # noqa: F811
) -> None:
    """While the relay is stopped, c and then d (d the child of c) are taken within one
    second, and the domain goes back to c with no lifecycle event and no state change
    (made with REDEFINE | CURRENT, as an in-place revert can look): their creation times
    are equal, but d descends from c, so the next relay reports a silent_revert to c.
    (Ordered by creation time alone, neither was taken after the other: no revert.)"""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    _snapshot(dom, "a")
    await _seen(standin, dom_uuid, {"a"}, log)
    relays.stop_all()

    while time.time() % 1 > 0.5:  # both snapshots early in one second
        time.sleep(0.05)
    c, c_time = _snapshot(dom, "c")
    _, d_time = _snapshot(dom, "d")
    assert c_time == d_time
    _redefine_current(dom, c.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE))
    assert dom.snapshotCurrent(0).getName() == "c"

    log = await _restart(relays, standin)
    body = await _the_silent_revert(standin, dom_uuid, log)
    assert body["snapshot"] == {"name": "c", "creation_time": c_time}


async def test_a_snapshot_deleted_and_taken_again_in_the_same_second_is_no_revert(
    libvirt_uri: str, standin: StandIn, relays: Relays  # noqa: F811
) -> None:
    """Snapshots a, then b (its child, current); while the relay is stopped a is deleted and
    taken again within the same second as the first (made with REDEFINE | CURRENT, keeping
    a's creation time, under b). Name and time are those of the old a, but the new a
    descends from b, which descended from the old one: a new snapshot became current, no
    revert. (Taken for the old a come back, it was reported as a silent_revert, which
    refuses the guest under receipt_reaction = refuse.)"""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    a, _ = _snapshot(dom, "a")
    _snapshot(dom, "b")
    await _seen(standin, dom_uuid, {"a", "b"}, log)
    relays.stop_all()

    old = a.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
    a.delete(0)
    retaken = re.sub(r"(</state>)", r"\1<parent><name>b</name></parent>", old, count=1)
    assert _redefine_current(dom, retaken).getParent(0).getName() == "b"

    log = await _restart(relays, standin)
    _snapshot(dom, "c")  # a later poll's worth of events: the one that saw the new a came first
    await _seen(standin, dom_uuid, {"c"}, log)
    assert _silent(standin, dom_uuid) == [], standin.of_domain(dom_uuid)
