"""The libvirt relay keeps the events its spool could not write (a full disk) until it can."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import orjson
import pytest

from replayguard.relay import libvirt_relay
from replayguard.relay.libvirt_events import DomainView, RelayConfig, SnapshotRef
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


class _Full(Spool):
    """A spool on a full disk until ``room`` is set."""

    room = False
    failures = 0

    def put(self, body: Any, id_key: str = "event_id") -> Path:
        if not self.room:
            self.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().put(body, id_key)


def _relay(tmp_path: Path, spool: Spool, poll_interval: float = 5.0) -> RelayState:
    config = RelayConfig(uri="qemu:///system", service_url="http://127.0.0.1:9", token=Secret("t"),
                         spool_dir=tmp_path / "spool", host="hv-03", poll_interval=poll_interval)
    return RelayState(config=config, spool=spool, wake=asyncio.Event(), boot_id="b", state={})


async def test_a_revert_survives_a_reconnection_while_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker holding a revert it cannot spool yet (a full disk) is cancelled, as a
    reconnection to libvirtd cancels it; the next connection's worker spools that revert
    once there is room. (The revert had been taken off the queue and was lost with the
    cancelled worker; libvirt does not send it again.)"""
    monkeypatch.setattr(libvirt_relay, "SPOOL_RETRY_S", 0.01)
    spool = _Full(tmp_path / "spool")
    relay = _relay(tmp_path, spool)
    relay.lifecycle.put_nowait(Pending("hv-03:rev-1", _Domain(), 5, 6, 1_790_000_000.0))
    first = asyncio.create_task(libvirt_relay._lifecycle_worker(relay, _Watcher()))  # type: ignore[arg-type]
    await until(lambda: spool.failures >= 2, "the worker retrying the write")
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    spool.room = True
    second = asyncio.create_task(libvirt_relay._lifecycle_worker(relay, _Watcher()))  # type: ignore[arg-type]
    try:
        await until(lambda: len(spool.pending()) == 1, "the revert in the spool")
        (path,) = spool.pending()
        assert orjson.loads(path.read_bytes())["event_id"] == "hv-03:rev-1"
    finally:
        second.cancel()


class _PollWatcher(_Watcher):
    """A connection whose every poll sees one domain with a new snapshot, current."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.from_snapshot_seen: dict[str, float] = {}

    def read_views(self) -> tuple[dict[str, DomainView], frozenset[str]]:
        uuid = _Domain().UUIDString()
        return {uuid: DomainView(uuid, "web-01", {"pre-patch": 1_789_990_000}, "pre-patch")}, frozenset()


async def test_a_full_disk_does_not_end_the_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the disk full, a poll that finds a new snapshot cannot spool it: the poll is
    tried again and the connection's tasks go on, so the revert waiting in memory is
    spooled once there is room, and so is the snapshot. (The poll's OSError ended the
    watch and the relay with it, losing every lifecycle event not yet spooled.)"""
    monkeypatch.setattr(libvirt_relay, "SPOOL_RETRY_S", 0.01)
    spool = _Full(tmp_path / "spool")
    relay = _relay(tmp_path, spool, poll_interval=0.04)
    relay.lifecycle.put_nowait(Pending("hv-03:rev-1", _Domain(), 5, 6, 1_790_000_000.0))
    watch = asyncio.create_task(libvirt_relay._run_watcher(relay, _PollWatcher(), asyncio.Event()))  # type: ignore[arg-type]
    try:
        await until(lambda: spool.failures >= 4 or watch.done(), "writes failing")
        await asyncio.sleep(0.1)  # several polls on the full disk
        assert not watch.done(), watch.exception()
        spool.room = True
        await until(lambda: len(spool.pending()) == 2, "the revert and the snapshot in the spool")
        kinds = sorted(orjson.loads(p.read_bytes())["kind"] for p in spool.pending())
        assert kinds == ["lifecycle", "snapshot_created"]
        await until(lambda: (tmp_path / "spool" / libvirt_relay.STATE_FILE).exists(), "the poll state saved")
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


class _Polls:
    """A connection whose polls see, in turn, the views given (None: the domain unreadable)."""

    def __init__(self, *polls: DomainView | None) -> None:
        self.polls = list(polls)
        self.closed = asyncio.Event()
        self.from_snapshot_seen: dict[str, float] = {}

    def read_views(self) -> tuple[dict[str, DomainView], frozenset[str]]:
        view = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        uuid = _Domain().UUIDString()
        return ({uuid: view}, frozenset()) if view is not None else ({}, frozenset({uuid}))


async def test_a_silent_revert_across_an_unreadable_poll_is_reported(tmp_path: Path) -> None:
    """A domain whose snapshots cannot be read in one poll (a libvirt call failing while the
    connection stays up) keeps its last view: the silent revert from ``a`` to ``b`` seen
    by the poll after is reported. (The unreadable domain was dropped from the poll state,
    so the next poll had nothing to compare with and called nothing a revert.)"""
    uuid = _Domain().UUIDString()
    before = DomainView(uuid, "web-01", {"a": 1_789_990_000, "b": 1_789_980_000}, "a")
    after = DomainView(uuid, "web-01", {"a": 1_789_990_000, "b": 1_789_980_000}, "b")
    spool = Spool(tmp_path / "spool")
    relay = _relay(tmp_path, spool, poll_interval=0.04)
    poller = asyncio.create_task(libvirt_relay._poll_forever(relay, _Polls(before, None, after)))  # type: ignore[arg-type]
    try:
        await until(lambda: relay.state.get(uuid) == after, "the poll that sees b current")
        kinds = sorted(orjson.loads(p.read_bytes())["kind"] for p in spool.pending())
        assert kinds == ["silent_revert", "snapshot_created", "snapshot_created"]
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)


async def test_a_defined_from_snapshot_revert_names_its_snapshot(tmp_path: Path) -> None:
    """DEFINED/FROM_SNAPSHOT (0/3) is what QEMU emits for a revert of a shut-off domain to a
    shut-off snapshot, and the service reads it as a revert: the relay sends the current
    snapshot with it, so the window starts at that snapshot's creation. (It sent no
    snapshot, so the service opened the window from ever, putting every earlier use at
    risk.)"""
    spool = Spool(tmp_path / "spool")
    relay = _relay(tmp_path, spool)
    relay.lifecycle.put_nowait(Pending("hv-03:def-1", _Domain(), 0, 3, 1_790_000_000.0))
    worker = asyncio.create_task(libvirt_relay._lifecycle_worker(relay, _Watcher()))  # type: ignore[arg-type]
    try:
        await until(lambda: len(spool.pending()) == 1, "the revert in the spool")
        (path,) = spool.pending()
        assert orjson.loads(path.read_bytes())["snapshot"] == {"name": "pre-patch", "creation_time": 1_789_990_000}
    finally:
        worker.cancel()
