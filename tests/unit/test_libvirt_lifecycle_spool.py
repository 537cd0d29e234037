"""The libvirt relay keeps the events its spool could not write (a full disk) until it can."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import orjson
import pytest

from replayguard.relay import libvirt_relay, libvirt_watcher
from replayguard.relay.libvirt_events import DomainView, RelayConfig, RunState, SnapshotRef
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
    """Reads what a revert to the shut-off snapshot "pre-patch" leaves."""

    def current_snapshot(self, dom: Any) -> SnapshotRef:
        return SnapshotRef("pre-patch", 1_789_990_000)

    def at_stop(self, dom: Any) -> tuple[RunState, SnapshotRef, str, int]:
        return RunState(5, 7, -1), self.current_snapshot(dom), "shutoff", 0

    def events_after(self, dom: Any, n: int) -> bool:
        return False

    def saw_revert(self, dom: Any, monotonic: float) -> None:
        pass


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


class _HaltWatcher:
    """Reads what ``snapshot-create --halt`` leaves: shut off from a new live snapshot."""

    def __init__(self, later: bool) -> None:
        self.later = later
        self.reverts: list[float] = []

    def at_stop(self, dom: Any) -> tuple[RunState, SnapshotRef, str, int]:
        return RunState(5, 7, -1), SnapshotRef("halted", 1_790_000_000), "running", 0

    def events_after(self, dom: Any, n: int) -> bool:
        return self.later

    def saw_revert(self, dom: Any, monotonic: float) -> None:
        self.reverts.append(monotonic)


@pytest.mark.parametrize(("later", "flag"), [(False, True), (True, None)])
async def test_a_stop_from_a_halting_snapshot_is_flagged_unless_the_domain_moved_on(
        later: bool, flag: bool | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A STOPPED/FROM_SNAPSHOT after which the domain is shut off under a new snapshot of
    the live domain is spooled with ``snapshot_create_halt`` and does not count as a revert
    the next poll need not report again; when another lifecycle event of the domain
    arrived by then (a revert, a start and a halt in a row), it is spooled without the flag
    and counts as a revert."""
    monkeypatch.setattr(libvirt_relay, "HALT_SETTLE_S", 0.0)
    spool = Spool(tmp_path / "spool")
    relay = _relay(tmp_path, spool)
    polled = DomainView(_Domain().UUIDString(), "web-01", {"base": 1_789_990_000}, "base", (), (), RunState(1, 1, 3))
    relay.lifecycle.put_nowait(Pending("hv-03:stop-1", _Domain(), 5, 6, 1_790_000_000.5, 1, 42.0, polled))
    watcher = _HaltWatcher(later)
    worker = asyncio.create_task(libvirt_relay._lifecycle_worker(relay, watcher))  # type: ignore[arg-type]
    try:
        await until(lambda: len(spool.pending()) == 1, "the stop in the spool")
        (path,) = spool.pending()
        body = orjson.loads(path.read_bytes())
        assert body.get("snapshot_create_halt") is flag
        assert body["snapshot"] == {"name": "halted", "creation_time": 1_790_000_000}
        assert watcher.reverts == ([] if flag else [42.0])
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


def test_only_a_stop_found_to_be_a_revert_hides_a_silent_revert_from_the_poll(tmp_path: Path) -> None:
    """The watcher counts a FROM_SNAPSHOT event as a reported revert (the poll covering it
    reports no ``silent_revert``) at once, except STOPPED/FROM_SNAPSHOT, which counts only
    once the worker found it is no ``snapshot-create --halt`` (``saw_revert``); every event
    carries the domain as the last recorded poll saw it."""
    relay = _relay(tmp_path, Spool(tmp_path / "spool"))
    uuid = _Domain().UUIDString()
    relay.state = {uuid: DomainView(uuid, "web-01", {"base": 1}, "base")}
    watcher = libvirt_watcher.Watcher.__new__(libvirt_watcher.Watcher)
    watcher.relay, watcher.from_snapshot_seen, watcher.last_event = relay, {}, {}
    watcher._on_lifecycle(None, _Domain(), 5, 6, None)
    stop = relay.lifecycle.get_nowait()
    assert uuid not in watcher.from_snapshot_seen and stop.polled == relay.state[uuid]
    watcher.saw_revert(_Domain(), stop.monotonic)
    assert watcher.from_snapshot_seen[uuid] == stop.monotonic
    watcher._on_lifecycle(None, _Domain(), 2, 3, None)
    assert watcher.from_snapshot_seen[uuid] == relay.lifecycle.get_nowait().monotonic >= stop.monotonic
    assert watcher.events_after(_Domain(), stop.n) and not watcher.events_after(_Domain(), stop.n + 1)
