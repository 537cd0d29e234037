"""A relay's spool against the real service when one event is refused and the next is not.

A hypervisor token bound to some VMs (``token create --vm PATTERN``) is answered 403 for an
event of any other VM on the same host, and an event over 64 KiB is answered 413: such a
refusal belongs to that one event. The events behind it in the spool must still arrive.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from replayguard.relay.libvirt_events import Kind, SnapshotRef, event_body
from replayguard.relay.spool import Answer, Retry, Spool, drain, post_json
from replayguard.settings import Secret
from tests.conftest import Api, uid

UUIDS = {"scratch": "0f3c2b1a-1d52-d8f3-2516-782e98ab3fa0", "web": "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"}


def _revert(event_id: str, vm: str, uuid: str) -> dict[str, object]:
    return event_body(event_id=event_id, uri="qemu:///system", host="hv-03", domain=(vm, uuid),
                      kind=Kind.LIFECYCLE, event=2, detail=3, occurred_at=1_790_000_000.0,
                      snapshot=SnapshotRef("pre-patch", 1_789_990_000))


@pytest.mark.parametrize("blocker", ["unbound_vm", "too_large"])
async def test_a_refused_event_does_not_hold_back_the_ones_behind_it(
    api: Api, tmp_path: Path, blocker: str
) -> None:
    """The oldest event in the spool is refused for itself (403: its VM is not one the
    token is bound to; 413: its body is over the limit); the revert of a bound VM spooled
    after it is delivered and recorded, and the refused one stays in the spool. (Delivery
    retried the head of the spool forever and nothing behind it ever arrived: every later
    revert of every VM on the host, and its rollback window, was held back without bound.)"""
    _, token = await api.runtime.api_tokens.create("hypervisor", uid("bound-hv"), ("web-*",))
    web = uid("web")
    spool = Spool(tmp_path)
    head_id = uid("evt")
    head = _revert(head_id, uid("scratch"), UUIDS["scratch"])
    if blocker == "too_large":
        head = _revert(head_id, web, UUIDS["web"]) | {"uri": "x" * 70_000}
    spool.put(head)
    wanted = _revert(uid("evt"), web, UUIDS["web"])
    spool.put(wanted)
    url = str(api.client.make_url("/v1/hypervisor/events?source=libvirt"))
    async with aiohttp.ClientSession() as session:

        async def post(data: bytes) -> Answer:
            return await post_json(session, url, Secret(token), data)

        assert await drain(spool, post, "event_id", Retry(attempts=3, base=0.001)) == 1
    async with api.runtime.pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM hypervisor_events WHERE event_id = $1",
                                     wanted["event_id"])
    assert stored == 1
    (left,) = spool.pending()
    assert head_id.encode() in left.read_bytes()
