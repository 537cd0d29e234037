"""The libvirt relay end to end: a private libvirtd, the relay as its own process, a stand-in service.

libvirt's ``test`` driver keeps its state inside one process, so the test starts a private
``libvirtd`` (own config and socket directory, no TCP/TLS, no auth, and
``LIBVIRT_DRIVER_DIR`` pointing at an empty folder so that only the built-in test driver
loads) and both the relay and this test talk to it over
``test+unix:///default?socket=DIR/libvirt-sock``. The stand-in for replayguard's events
endpoint is a small aiohttp app that records what it is sent.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from replayguard.relay.libvirt_relay import is_from_snapshot, parse_creation_time
from tests.integration.libvirt_support import DOMAIN_XML, libvirt, requires_libvirt
from tests.integration.libvirt_support import private_libvirtd as _libvirtd

pytestmark = requires_libvirt

REPO = Path(__file__).resolve().parents[2]
TOKEN = "relay-test-token-4f9d2c"
HOST = "hv-test"
POLL = "0.5"
WAIT = 30.0  # every wait is bounded; pytest-timeout is the outer bound

# ---------------------------------------------------------------- private libvirtd


@pytest.fixture(scope="module")
def libvirt_uri() -> Iterator[str]:
    """The URI of a private libvirtd shared by the module's tests (each uses its own domain)."""
    with _libvirtd() as daemon:
        yield daemon.uri


def _started_domain(uri: str) -> Any:
    """A fresh running domain on the shared test driver, unique to the calling test."""
    conn = libvirt.open(uri)
    dom = conn.defineXML(DOMAIN_XML.format(name=f"rg-{uuid.uuid4().hex[:8]}"))
    dom.create()
    return dom


def _snapshot(dom: Any, name: str) -> tuple[Any, int]:
    snap = dom.snapshotCreateXML(f"<domainsnapshot><name>{name}</name></domainsnapshot>")
    ctime = parse_creation_time(snap.getXMLDesc(0))
    assert ctime is not None
    return snap, ctime


# ---------------------------------------------------------------- stand-in service


@dataclass
class StandIn:
    """replayguard's events endpoint, reduced to recording and the idempotency rule."""

    port: int
    fail_first: int = 0
    attempts: int = 0
    failures: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "unauthorized"}}, status=401)
        if request.query.get("source") != "libvirt":
            return web.json_response({"error": {"code": "invalid_request"}}, status=400)
        if self.failures < self.fail_first:
            self.failures += 1
            return web.json_response({"error": {"code": "unavailable"}}, status=503)
        body = orjson.loads(await request.read())
        earlier = [b for b in self.accepted if b["event_id"] == body["event_id"]]
        if earlier:
            self.duplicates.append(body["event_id"])
            if earlier[0] != body:
                return web.json_response({"error": {"code": "conflict"}}, status=409)
            return web.json_response({"accepted": True, "duplicate": True}, status=202)
        self.accepted.append(body)
        return web.json_response({"accepted": True, "duplicate": False}, status=202)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/hypervisor/events", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def of_domain(self, dom_uuid: str) -> list[dict[str, Any]]:
        return [b for b in self.accepted if b["domain"]["uuid"] == dom_uuid]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    """A stand-in on a fixed free port that answers 503 three times before accepting."""
    service = StandIn(port=_free_port(), fail_first=3)
    await service.start()
    yield service
    await service.stop()


# ---------------------------------------------------------------- the relay process


@dataclass
class Relays:
    """Starts relay processes and kills whatever is left of them at the end."""

    uri: str
    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def start(self, port: int) -> tuple[subprocess.Popen[bytes], Path]:
        token_file = self.root / "token"
        token_file.write_text(TOKEN + "\n")
        log = self.root / f"relay-{len(self.procs)}.log"
        cmd = [sys.executable, "-m", "replayguard.relay.cli", "libvirt", "--uri", self.uri,
               "--service-url", f"http://127.0.0.1:{port}", "--token-file", str(token_file),
               "--spool-dir", str(self.spool), "--poll-interval", POLL, "--host", HOST]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@pytest.fixture
def relays(libvirt_uri: str, tmp_path: Path) -> Iterator[Relays]:
    """Relay processes against the private libvirtd, all stopped after the test."""
    manager = Relays(libvirt_uri, tmp_path)
    yield manager
    manager.stop_all()


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait up to WAIT seconds for ``predicate()``; TimeoutError if it never holds."""
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.1)


async def _connected(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the relay has its libvirt callbacks registered."""
    try:
        await _until(lambda: b"libvirt_connected" in log.read_bytes() or proc.poll() is not None)
    except TimeoutError:
        pytest.fail(f"relay never connected: {log.read_text()}")
    assert proc.poll() is None, f"relay exited with {proc.returncode}: {log.read_text()}"


def _reverted_lifecycle(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in bodies if b["kind"] == "lifecycle" and is_from_snapshot(b["event"], b["detail"])]


# ---------------------------------------------------------------- tests


async def test_revert_reaches_the_service_once_after_retries(
    libvirt_uri: str, standin: StandIn, relays: Relays
) -> None:
    """A snapshot and a real revert arrive, despite 503s, each event_id exactly once."""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    snap, ctime = _snapshot(dom, "pre-login")
    _snapshot(dom, "after-login")
    dom.revertToSnapshot(snap)
    dom_uuid = dom.UUIDString()

    def arrived() -> bool:
        mine = standin.of_domain(dom_uuid)
        created = {b["snapshot"]["name"] for b in mine if b["kind"] == "snapshot_created"}
        return {"pre-login", "after-login"} <= created and len(_reverted_lifecycle(mine)) >= 2

    try:
        await _until(arrived)
    except TimeoutError:
        pytest.fail(f"events missing: {standin.of_domain(dom_uuid)}\nrelay log: {log.read_text()}")

    mine = standin.of_domain(dom_uuid)
    assert standin.failures == 3 and standin.attempts > len(standin.accepted)
    assert standin.duplicates == []
    assert all(n == 1 for n in Counter(b["event_id"] for b in standin.accepted).values())
    created = next(b for b in mine if b["kind"] == "snapshot_created" and b["snapshot"]["name"] == "pre-login")
    assert created["snapshot"] == {"name": "pre-login", "creation_time": ctime}
    for body in _reverted_lifecycle(mine):
        assert body["snapshot"] == {"name": "pre-login", "creation_time": ctime}
        assert (body["source"], body["uri"], body["host"]) == ("libvirt", libvirt_uri, HOST)
        assert body["domain"] == {"name": dom.name(), "uuid": dom_uuid}
        assert body["occurred_at"].endswith("Z")
    assert {(b["event"], b["detail"]) for b in _reverted_lifecycle(mine)} >= {(5, 6), (2, 3)}
    assert not [b for b in mine if b["kind"] == "silent_revert"], "the revert had its events"
    assert TOKEN not in log.read_text()


async def test_spooled_event_survives_kill_9_of_the_relay(
    libvirt_uri: str, standin: StandIn, relays: Relays
) -> None:
    """A revert spooled while the service is down is delivered by the next relay after kill -9."""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    snap, ctime = _snapshot(dom, "before")
    await _until(lambda: any(b["kind"] == "snapshot_created" for b in standin.of_domain(dom_uuid)))
    await standin.stop()

    dom.revertToSnapshot(snap)

    def spooled() -> list[dict[str, Any]]:
        bodies = [orjson.loads(p.read_bytes()) for p in relays.spool.glob("evt-*.json")]
        return _reverted_lifecycle([b for b in bodies if b["domain"]["uuid"] == dom_uuid])

    await _until(lambda: len(spooled()) >= 2)
    waiting = {b["event_id"] for b in spooled()}
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    proc2, log2 = relays.start(standin.port)
    await _connected(proc2, log2)
    await standin.start()
    try:
        await _until(lambda: waiting <= {b["event_id"] for b in standin.accepted})
    except TimeoutError:
        pytest.fail(f"spooled events lost: {waiting}\nrelay log: {log2.read_text()}")
    delivered = [b for b in standin.accepted if b["event_id"] in waiting]
    assert all(b["snapshot"] == {"name": "before", "creation_time": ctime} for b in delivered)
    assert len(delivered) == len(waiting)


async def test_current_snapshot_moved_without_event_is_a_silent_revert(
    libvirt_uri: str, standin: StandIn, relays: Relays
) -> None:
    """A current snapshot moved back with no lifecycle event is reported as silent_revert."""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    old, ctime = _snapshot(dom, "old")
    _snapshot(dom, "new")
    await _until(lambda: len([b for b in standin.of_domain(dom_uuid) if b["kind"] == "snapshot_created"]) == 2)

    # Redefining "old" as current moves the pointer with no lifecycle event, as an in-place
    # revert of a running QEMU guest can.
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    dom.snapshotCreateXML(old.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE), flags)

    body = await _the_silent_revert(standin, dom_uuid, log)
    assert body["snapshot"] == {"name": "old", "creation_time": ctime}
    assert (body["event"], body["detail"]) == (-1, -1)
    assert not _reverted_lifecycle(standin.of_domain(dom_uuid))


async def test_relay_reconnects_when_libvirtd_restarts(standin: StandIn, tmp_path: Path) -> None:
    """After libvirtd goes away and comes back, the relay reconnects and reports again."""
    with _libvirtd() as daemon:
        relays = Relays(daemon.uri, tmp_path)
        try:
            proc, log = relays.start(standin.port)
            await _connected(proc, log)
            daemon.stop()
            daemon.start()
            try:
                await _until(lambda: log.read_bytes().count(b"libvirt_connected") >= 2)
            except TimeoutError:
                pytest.fail(f"relay did not reconnect: {log.read_text()}")
            dom = _started_domain(daemon.uri)
            _snapshot(dom, "after-restart")
            await _until(lambda: any(b["kind"] == "snapshot_created"
                                     for b in standin.of_domain(dom.UUIDString())))
            assert b"libvirt_disconnected" in log.read_bytes()
        finally:
            relays.stop_all()


async def test_a_snapshot_deleted_and_taken_again_under_its_name_is_no_revert(
    libvirt_uri: str, standin: StandIn, relays: Relays
) -> None:
    """A script that rotates fixed snapshot names deletes "a" and takes it again: the new
    "a" is current, with a later creation time, while "b" still exists. That is a creation
    (the old "a" deleted, the new one created), not a revert: a silent_revert here would
    make the service refuse the guest in refuse mode. (The relay kept the old "a"'s time,
    saw an existing snapshot become current and reported a silent revert.)"""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    _, first = _snapshot(dom, "a")
    _snapshot(dom, "b")
    await _until(lambda: len([b for b in standin.of_domain(dom_uuid) if b["kind"] == "snapshot_created"]) == 2)
    while time.time() < first + 1.5:  # the new "a" gets a later creation second
        await asyncio.sleep(0.1)
    dom.snapshotLookupByName("a").delete(0)
    _, second = _snapshot(dom, "a")
    assert second > first

    def created(name: str, ctime: int) -> bool:
        return any(b["kind"] == "snapshot_created" and b["snapshot"] == {"name": name, "creation_time": ctime}
                   for b in standin.of_domain(dom_uuid))

    try:
        await _until(lambda: created("a", second))
    except TimeoutError:
        pytest.fail(f"no creation of the new a: {standin.of_domain(dom_uuid)}\nrelay log: {log.read_text()}")
    _snapshot(dom, "c")  # one more poll's worth of events, after which a revert would have been sent
    await _until(lambda: created("c", parse_creation_time(dom.snapshotLookupByName("c").getXMLDesc(0)) or 0))
    assert [b for b in standin.of_domain(dom_uuid) if b["kind"] == "silent_revert"] == []


async def test_a_revert_followed_by_deleting_the_snapshot_it_left_is_a_silent_revert(
    libvirt_uri: str, standin: StandIn, relays: Relays
) -> None:
    """Snapshots a, c, b (a chain; b current). The current snapshot moves back to a with no
    lifecycle event (as an in-place revert can) and b is deleted before the next poll:
    deleting b alone would have made c current, so a being current is a silent revert.
    (With the snapshot current before deleted, any move was taken for the deletion's.)"""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    a, ctime = _snapshot(dom, "a")
    _snapshot(dom, "c")
    _snapshot(dom, "b")
    await _until(lambda: len([b for b in standin.of_domain(dom_uuid) if b["kind"] == "snapshot_created"]) == 3)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    dom.snapshotCreateXML(a.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE), flags)
    dom.snapshotLookupByName("b").delete(0)

    body = await _the_silent_revert(standin, dom_uuid, log)
    assert body["snapshot"] == {"name": "a", "creation_time": ctime}


async def _the_silent_revert(standin: StandIn, dom_uuid: str, log: Path) -> dict[str, Any]:
    """The domain's one silent_revert the relay posted, once it came (the relay's log on failure)."""

    def silent() -> list[dict[str, Any]]:
        return [b for b in standin.of_domain(dom_uuid) if b["kind"] == "silent_revert"]

    try:
        await _until(lambda: bool(silent()))
    except TimeoutError:
        pytest.fail(f"no silent_revert: {standin.of_domain(dom_uuid)}\nrelay log: {log.read_text()}")
    [body] = silent()
    return body


def _stops(standin: StandIn, dom_uuid: str) -> list[dict[str, Any]]:
    """The domain's STOPPED/FROM_SNAPSHOT bodies, in the order the relay posted them."""
    return [b for b in standin.of_domain(dom_uuid) if (b["kind"], b["event"], b["detail"]) == ("lifecycle", 5, 6)]


async def test_a_snapshot_taken_with_halt_is_no_revert_and_reverts_around_it_still_are(
    libvirt_uri: str, standin: StandIn, relays: Relays
) -> None:
    """``snapshot-create --halt`` makes libvirt emit STOPPED/FROM_SNAPSHOT, as a revert does:
    the relay posts it with ``snapshot_create_halt`` (the domain is shut off from a snapshot
    of the live domain, just taken, with no children), so it is no revert. A revert to that
    snapshot right after, and one of the running domain to a shut-off snapshot taken just before it (new
    to the relay too, and childless), still come without the flag."""
    proc, log = relays.start(standin.port)
    await _connected(proc, log)
    dom = _started_domain(libvirt_uri)
    dom_uuid = dom.UUIDString()
    _snapshot(dom, "base")  # the relay's poll has seen the domain once this is reported
    await _until(lambda: any(b["kind"] == "snapshot_created" for b in standin.of_domain(dom_uuid)))

    halted = dom.snapshotCreateXML("<domainsnapshot><name>halted</name></domainsnapshot>",
                                   libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_HALT)
    ctime = parse_creation_time(halted.getXMLDesc(0))
    await _until(lambda: len(_stops(standin, dom_uuid)) == 1)
    [stop] = _stops(standin, dom_uuid)
    assert stop.get("snapshot_create_halt") is True, (stop, log.read_text())
    assert stop["snapshot"] == {"name": "halted", "creation_time": ctime}

    dom.create()
    dom.revertToSnapshot(halted)  # running -> the live state of the snapshot just taken
    await _until(lambda: len(_stops(standin, dom_uuid)) == 2)
    dom.destroy()
    cold, _ = _snapshot(dom, "cold")  # of the shut-off domain
    dom.create()
    dom.revertToSnapshot(cold)  # running -> shut off, before any poll saw "cold"
    await _until(lambda: len(_stops(standin, dom_uuid)) == 3)
    reverts = _stops(standin, dom_uuid)[1:]
    assert [b.get("snapshot_create_halt") for b in reverts] == [None, None], reverts
    assert [b["snapshot"]["name"] for b in reverts] == ["halted", "cold"]
