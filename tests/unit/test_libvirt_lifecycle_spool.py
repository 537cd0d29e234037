"""The libvirt relay's lifecycle worker keeps an event its spool could not write."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from replayguard.relay import libvirt_relay
from replayguard.relay.libvirt_events import RelayConfig, SnapshotRef
from replayguard.relay.libvirt_watcher import Pending, RelayState
from replayguard.relay.spool import Spool
from replayguard.settings import Secret
from tests.waiting import until


class _Domain:
    def name(self) -> str:
        return "web-01"

    def UUIDString(self) -> str:
        return "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


class _Watcher:
    def current_snapshot(self, dom: Any) -> SnapshotRef:
        return SnapshotRef("pre-patch", 1_789_990_000)


class _FullTwice(Spool):
    """A spool whose first two writes fail as a full disk does."""

    failures = 2

    def put(self, body: Any, id_key: str = "event_id") -> Path:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().put(body, id_key)


async def test_a_revert_survives_failed_spool_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A STARTED/FROM_SNAPSHOT event whose spool write fails twice (a full disk, then room):
    the worker keeps it and writes it once there is room, and goes on with the next event.
    (It dropped the event and died, ending the relay; libvirt does not send it again.)"""
    monkeypatch.setattr(libvirt_relay, "SPOOL_RETRY_S", 0.01)
    config = RelayConfig(uri="qemu:///system", service_url="http://127.0.0.1:9", token=Secret("t"),
                         spool_dir=tmp_path / "spool", host="hv-03")
    spool = _FullTwice(tmp_path / "spool")
    relay = RelayState(config=config, spool=spool, wake=asyncio.Event(), boot_id="b", state={})
    relay.lifecycle.put_nowait(Pending("hv-03:rev-1", _Domain(), 2, 3, 1_790_000_000.0))
    relay.lifecycle.put_nowait(Pending("hv-03:start-2", _Domain(), 2, 0, 1_790_000_001.0))
    worker = asyncio.create_task(libvirt_relay._lifecycle_worker(relay, _Watcher()))  # type: ignore[arg-type]
    try:
        await until(lambda: len(spool.pending()) == 2, "both events in the spool")
        assert not worker.done()
    finally:
        worker.cancel()
