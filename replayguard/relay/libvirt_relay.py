"""The libvirt relay: libvirt events and snapshot polling → replayguard, durably.

libvirt tells a watcher about lifecycle changes (a revert shows as STOPPED/STARTED with a
FROM_SNAPSHOT detail) but says nothing when a snapshot is created or deleted, and an
in-place revert of a running QEMU guest can emit no event at all. So the relay does two
things: it forwards every lifecycle event, and it polls every domain's snapshot list and
current snapshot to synthesise ``snapshot_created``, ``snapshot_deleted`` and
``silent_revert`` (the current snapshot moved to another existing one with no
FROM_SNAPSHOT event seen).

Every event gets its id when it is born and is written to a spool directory (one JSON file
per event, tmp + fsync + rename) before anything is sent, so a dead service or a
``kill -9`` of the relay delays an event but never loses it, and re-posting it is
idempotent on the service side. The pure parts (ids, bodies, snapshot diffing, backoff,
status classification) are plain functions tested without libvirt; libvirt itself is
imported only by the code that talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import math
import os
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog

from ..settings import Secret

SOURCE = "libvirt"
EVENTS_PATH = "/v1/hypervisor/events?source=libvirt"
SYNTHETIC = -1  # "event"/"detail" of events libvirt never emitted (found by polling)
MAX_EVENT_ID = 256  # CONTRACT §3: identifiers are 1–256 printable characters
# (virDomainEventType, detail) pairs that mean "this happened because of a snapshot":
# RESUMED/FROM_SNAPSHOT, STARTED/FROM_SNAPSHOT, SUSPENDED/FROM_SNAPSHOT, STOPPED/FROM_SNAPSHOT.
FROM_SNAPSHOT = frozenset({(4, 2), (2, 3), (3, 5), (5, 6)})
STATE_FILE = "poll-state.json"

log = structlog.get_logger("replayguard.relay.libvirt")


class Kind(str, enum.Enum):
    LIFECYCLE = "lifecycle"
    SNAPSHOT_CREATED = "snapshot_created"
    SNAPSHOT_DELETED = "snapshot_deleted"
    SILENT_REVERT = "silent_revert"


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 2xx, or 409: the service already holds this id
    RETRY = "retry"  # service down, 5xx, 408, 429: keep the event and back off
    DEAD = "dead"  # any other answer: retrying cannot help, park it in dead/


@dataclass(frozen=True)
class RelayConfig:
    uri: str
    service_url: str
    token: Secret
    spool_dir: Path
    poll_interval: float = 5.0
    host: str = "localhost"


@dataclass(frozen=True)
class SnapshotRef:
    name: str
    creation_time: int | None


@dataclass(frozen=True)
class DomainView:
    """What one poll saw of one domain: snapshot name → creation time, and the current one."""

    uuid: str
    name: str
    snapshots: Mapping[str, int | None]
    current: str | None


@dataclass(frozen=True)
class SnapshotChange:
    kind: Kind
    snapshot: SnapshotRef
    previous: str | None = None  # silent_revert: the snapshot that was current before


# ---------------------------------------------------------------- pure functions


def rfc3339(ts: float) -> str:
    """Unix seconds as the RFC 3339 UTC string the service expects."""
    stamp = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def make_event_id(*parts: object) -> str:
    """Join the parts with ':'; hash the tail when the id would break the contract's limits.

    Snapshot names are chosen by users, so they may be long or hold odd characters; the
    hash keeps the id unique and stable while the prefix stays readable.
    """
    raw = ":".join(str(p) for p in parts)
    if len(raw) <= MAX_EVENT_ID and raw.isprintable():
        return raw
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    readable = "".join(c if c.isprintable() else "?" for c in raw)
    return f"{readable[: MAX_EVENT_ID - len(digest) - 1]}~{digest}"


def is_from_snapshot(event: int, detail: int) -> bool:
    """True for lifecycle events libvirt attributes to a snapshot revert."""
    return (event, detail) in FROM_SNAPSHOT


def lifecycle_event_id(host: str, uuid: str, event: int, detail: int, boot_id: str, n: int) -> str:
    """Id of a lifecycle event: the relay's boot id and a counter make it unique forever."""
    return make_event_id(host, uuid, Kind.LIFECYCLE.value, event, detail, f"{boot_id}.{n}")


def change_event_id(host: str, uuid: str, change: SnapshotChange, observed_at: float) -> str:
    """Id of a polled change; creation/deletion ids are pure functions of the snapshot.

    So a relay that restarts without its poll state and re-announces every snapshot
    produces the same ids and the service answers ``duplicate``.
    """
    snap = f"{change.snapshot.name}@{change.snapshot.creation_time}"
    if change.kind is Kind.SILENT_REVERT:
        snap = f"{snap}:from={change.previous}:at={int(observed_at)}"
    return make_event_id(host, uuid, change.kind.value, SYNTHETIC, SYNTHETIC, snap)


def _snapshot_json(snapshot: SnapshotRef | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {"name": snapshot.name, "creation_time": snapshot.creation_time}


def event_body(
    *,
    event_id: str,
    uri: str,
    host: str,
    domain: tuple[str, str],
    kind: Kind,
    event: int,
    detail: int,
    occurred_at: float,
    snapshot: SnapshotRef | None,
) -> dict[str, Any]:
    """The JSON the relay posts; ``domain`` is (name, uuid)."""
    return {
        "source": SOURCE,
        "event_id": event_id,
        "uri": uri,
        "host": host,
        "domain": {"name": domain[0], "uuid": domain[1]},
        "event": event,
        "detail": detail,
        "occurred_at": rfc3339(occurred_at),
        "snapshot": _snapshot_json(snapshot),
        "kind": kind.value,
    }


def change_body(
    *, uri: str, host: str, view: DomainView, change: SnapshotChange, observed_at: float
) -> dict[str, Any]:
    """Body of a polled change; a creation happened at the snapshot's own creation time."""
    occurred = observed_at
    if change.kind is Kind.SNAPSHOT_CREATED and change.snapshot.creation_time is not None:
        occurred = float(change.snapshot.creation_time)
    return event_body(
        event_id=change_event_id(host, view.uuid, change, observed_at),
        uri=uri,
        host=host,
        domain=(view.name, view.uuid),
        kind=change.kind,
        event=SYNTHETIC,
        detail=SYNTHETIC,
        occurred_at=occurred,
        snapshot=change.snapshot,
    )


def is_silent_revert(prev: DomainView, cur: DomainView) -> bool:
    """The current snapshot moved to one that already existed, and not by a deletion.

    A newly created snapshot becoming current is a creation, and deleting the current
    snapshot may make its parent current: neither is a revert.
    """
    target = cur.current
    if target is None or target == prev.current or target not in prev.snapshots:
        return False
    return prev.current is None or prev.current in cur.snapshots


def diff_domain(prev: DomainView | None, cur: DomainView, lifecycle_seen: bool) -> list[SnapshotChange]:
    """Changes between two polls of one domain, creations oldest first.

    ``lifecycle_seen``: a FROM_SNAPSHOT lifecycle event arrived for the domain since the
    previous poll, so a move of the current snapshot is already reported. With no
    previous poll nothing can be called a revert.
    """
    before: Mapping[str, int | None] = prev.snapshots if prev is not None else {}
    created = sorted(
        (SnapshotRef(n, t) for n, t in cur.snapshots.items() if n not in before),
        key=lambda s: (s.creation_time or 0, s.name),
    )
    changes = [SnapshotChange(Kind.SNAPSHOT_CREATED, s) for s in created]
    changes += [
        SnapshotChange(Kind.SNAPSHOT_DELETED, SnapshotRef(n, t))
        for n, t in sorted(before.items())
        if n not in cur.snapshots
    ]
    if prev is not None and not lifecycle_seen and is_silent_revert(prev, cur):
        assert cur.current is not None
        target = SnapshotRef(cur.current, cur.snapshots[cur.current])
        changes.append(SnapshotChange(Kind.SILENT_REVERT, target, previous=prev.current))
    return changes


def parse_creation_time(xml: str) -> int | None:
    """``<creationTime>`` of a snapshot's XML: the T of the rollback window."""
    try:
        text = ET.fromstring(xml).findtext("creationTime")
        return int(text.strip()) if text else None
    except (ET.ParseError, ValueError):
        return None


def backoff_delay(attempt: int, rand: float, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with jitter in [ceiling/2, ceiling), ceiling capped at ``cap``.

    ``rand`` is a number in [0, 1) so the schedule is testable; jitter keeps many relays
    from hammering a recovering service in step.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + 0.5 * min(max(rand, 0.0), 1.0))


def classify_status(status: int | None) -> Outcome:
    """What an HTTP answer (None: no answer at all) means for a spooled event."""
    if status is None or status in (408, 429) or status >= 500:
        return Outcome.RETRY
    if 200 <= status < 300 or status == 409:
        return Outcome.DELIVERED
    return Outcome.DEAD


def views_to_json(views: Mapping[str, DomainView]) -> bytes:
    """Poll state as bytes, so a restarted relay still knows the last current snapshot."""
    return orjson.dumps(
        {
            u: {"name": v.name, "snapshots": dict(v.snapshots), "current": v.current}
            for u, v in sorted(views.items())
        },
        option=orjson.OPT_SORT_KEYS,
    )


def views_from_json(data: bytes) -> dict[str, DomainView]:
    """Inverse of ``views_to_json``; unreadable state is forgotten, not fatal."""
    try:
        raw = orjson.loads(data)
        return {
            u: DomainView(u, v["name"], dict(v["snapshots"]), v["current"]) for u, v in raw.items()
        }
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return {}


# ---------------------------------------------------------------- the spool


def atomic_write(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: tmp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A directory of events waiting for the service: ``evt-<ns>-<hash>.json``, oldest first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dead = root / "dead"
        self.dead.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in root.glob(".*.tmp"):  # half-written by a crash: never renamed
            leftover.unlink(missing_ok=True)

    def put(self, body: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(str(body["event_id"]).encode()).hexdigest()[:16]
        path = self.root / f"evt-{time.time_ns():020d}-{digest}.json"
        atomic_write(path, orjson.dumps(body))
        return path

    def pending(self) -> list[Path]:
        return sorted(self.root.glob("evt-*.json"))

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        _fsync_dir(self.root)

    def bury(self, path: Path) -> None:
        os.replace(path, self.dead / path.name)
        _fsync_dir(self.dead)
        _fsync_dir(self.root)


# ---------------------------------------------------------------- delivery

Post = Callable[[bytes], Awaitable[int | None]]


async def post_event(session: aiohttp.ClientSession, url: str, token: Secret, body: bytes) -> int | None:
    """POST one event; None when the service could not be reached or did not answer."""
    headers = {"Authorization": f"Bearer {token.reveal()}", "Content-Type": "application/json"}
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def deliver_one(spool: Spool, path: Path, post: Post) -> Outcome:
    """Send one spooled event and settle its file according to the answer."""
    try:
        data = path.read_bytes()
        event_id = orjson.loads(data)["event_id"]
    except FileNotFoundError:
        return Outcome.DELIVERED
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.error("spool_file_corrupt", file=path.name)
        spool.bury(path)
        return Outcome.DEAD
    status = await post(data)
    outcome = classify_status(status)
    if outcome is Outcome.DELIVERED:
        spool.remove(path)
        log.info("event_delivered", event_id=event_id, status=status)
    elif outcome is Outcome.DEAD:
        spool.bury(path)
        log.error("event_rejected", event_id=event_id, status=status, moved_to="dead/")
    else:
        log.warning("event_delivery_failed", event_id=event_id, status=status)
    return outcome


async def deliver_forever(
    spool: Spool, post: Post, wake: asyncio.Event, rand: Callable[[], float] = random.random
) -> None:
    """Drain the spool in order, forever; back off while the service cannot take events."""
    attempt = 0
    while True:
        batch = spool.pending()
        if not batch:
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            continue
        for path in batch:
            if await deliver_one(spool, path, post) is Outcome.RETRY:
                await asyncio.sleep(backoff_delay(attempt, rand()))
                attempt += 1
                break
            attempt = 0


# ---------------------------------------------------------------- libvirt


@dataclass
class _Pending:
    """A lifecycle event as the callback saw it, id already fixed, snapshot not yet read."""

    event_id: str
    dom: Any
    event: int
    detail: int
    occurred_at: float


@dataclass
class _Relay:
    """State shared by the relay's tasks across libvirt reconnections."""

    config: RelayConfig
    spool: Spool
    wake: asyncio.Event
    boot_id: str
    state: dict[str, DomainView]
    lifecycle: asyncio.Queue[_Pending] = field(default_factory=asyncio.Queue)
    counter: int = 0

    def spool_event(self, body: Mapping[str, Any]) -> None:
        self.spool.put(body)
        self.wake.set()
        log.info("event_spooled", event_id=body["event_id"], kind=body["kind"])


class _Watcher:
    """One libvirt connection: the lifecycle and close callbacks, and snapshot reads.

    Every call happens on the event-loop thread: libvirtaio is not thread-safe, and a
    short blocking RPC on a local socket is cheaper than the hazards of threads.
    """

    def __init__(self, relay: _Relay) -> None:
        import libvirt

        self.relay = relay
        self.closed = asyncio.Event()
        self.from_snapshot_seen: dict[str, float] = {}
        self.ctimes: dict[tuple[str, str], int | None] = {}
        # Read-only: the relay only watches, and a read-write libvirt socket is root-equivalent.
        self.conn = libvirt.openReadOnly(relay.config.uri)
        with contextlib.suppress(libvirt.libvirtError):  # local drivers have no keepalive
            self.conn.setKeepAlive(5, 3)
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.registerCloseCallback(self._on_close, None)
        try:
            self.callback_id = self.conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        except libvirt.libvirtError:
            self.conn.close()
            raise

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        log.warning("libvirt_connection_closed", reason=reason)
        self.closed.set()

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        relay = self.relay
        uuid = dom.UUIDString()
        if is_from_snapshot(event, detail):
            self.from_snapshot_seen[uuid] = time.monotonic()
        relay.counter += 1
        event_id = lifecycle_event_id(
            relay.config.host, uuid, event, detail, relay.boot_id, relay.counter
        )
        relay.lifecycle.put_nowait(_Pending(event_id, dom, event, detail, time.time()))

    def close(self) -> None:
        import libvirt

        for step in (
            lambda: self.conn.domainEventDeregisterAny(self.callback_id),
            self.conn.unregisterCloseCallback,
            self.conn.close,
        ):
            with contextlib.suppress(libvirt.libvirtError):
                step()

    def creation_time(self, uuid: str, snap: Any, *, fresh: bool = False) -> int | None:
        key = (uuid, snap.getName())
        if fresh or key not in self.ctimes:
            self.ctimes[key] = parse_creation_time(snap.getXMLDesc(0))
        return self.ctimes[key]

    def current_snapshot(self, dom: Any) -> SnapshotRef | None:
        """The domain's current snapshot, read now (after a FROM_SNAPSHOT event)."""
        import libvirt

        try:
            if not dom.hasCurrentSnapshot(0):
                return None
            snap = dom.snapshotCurrent(0)
            return SnapshotRef(snap.getName(), self.creation_time(dom.UUIDString(), snap, fresh=True))
        except libvirt.libvirtError as exc:
            log.warning("current_snapshot_unreadable", domain=dom.name(), error=str(exc))
            return None

    def read_views(self) -> dict[str, DomainView]:
        """One poll: every domain's snapshots and current snapshot."""
        import libvirt

        views: dict[str, DomainView] = {}
        for dom in self.conn.listAllDomains(0):
            try:
                view = self._view(dom)
            except libvirt.libvirtError as exc:
                if self.conn.isAlive() != 1:
                    raise
                log.warning("domain_unreadable", domain=dom.name(), error=str(exc))
                continue
            views[view.uuid] = view
        return views

    def _view(self, dom: Any) -> DomainView:
        uuid = dom.UUIDString()
        snaps = {s.getName(): self.creation_time(uuid, s) for s in dom.listAllSnapshots(0)}
        for key in [k for k in self.ctimes if k[0] == uuid and k[1] not in snaps]:
            del self.ctimes[key]  # a later snapshot of the same name has its own time
        current = dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None
        return DomainView(uuid, dom.name(), snaps, current)


async def _lifecycle_worker(relay: _Relay, watcher: _Watcher) -> None:
    """Complete queued lifecycle events with the current snapshot and spool them."""
    cfg = relay.config
    while True:
        p = await relay.lifecycle.get()
        snap = watcher.current_snapshot(p.dom) if is_from_snapshot(p.event, p.detail) else None
        relay.spool_event(
            event_body(
                event_id=p.event_id,
                uri=cfg.uri,
                host=cfg.host,
                domain=(p.dom.name(), p.dom.UUIDString()),
                kind=Kind.LIFECYCLE,
                event=p.event,
                detail=p.detail,
                occurred_at=p.occurred_at,
                snapshot=snap,
            )
        )


async def _poll_forever(relay: _Relay, watcher: _Watcher) -> None:
    """Poll snapshots; a short settle lets events already received reach their callback."""
    interval = relay.config.poll_interval
    settle = min(0.5, interval / 4)
    previous_start = time.monotonic()
    while True:
        started = time.monotonic()
        views = watcher.read_views()
        await asyncio.sleep(settle)
        observed = time.time()
        for uuid, view in views.items():
            seen = watcher.from_snapshot_seen.get(uuid, -math.inf) >= previous_start
            for change in diff_domain(relay.state.get(uuid), view, seen):
                relay.spool_event(
                    change_body(uri=relay.config.uri, host=relay.config.host, view=view,
                                change=change, observed_at=observed)
                )
        if views_to_json(views) != views_to_json(relay.state):
            atomic_write(relay.config.spool_dir / STATE_FILE, views_to_json(views))
        relay.state = views
        previous_start = started
        await asyncio.sleep(max(0.0, interval - settle))


async def _run_watcher(relay: _Relay, watcher: _Watcher, stop: asyncio.Event) -> None:
    """Run one connection until it closes, a read fails, or the relay is stopped."""
    import libvirt

    tasks = [
        asyncio.create_task(_poll_forever(relay, watcher)),
        asyncio.create_task(_lifecycle_worker(relay, watcher)),
        asyncio.create_task(watcher.closed.wait()),
        asyncio.create_task(stop.wait()),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        exc = task.exception()
        if isinstance(exc, libvirt.libvirtError):
            log.warning("libvirt_call_failed", error=str(exc))
        elif exc is not None:
            raise exc


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay)


async def _watch_libvirt(relay: _Relay, stop: asyncio.Event) -> None:
    """Keep a libvirt connection open, reconnecting with backoff whenever it drops.

    The backoff resets only after a connection that lasted a minute, so a connection
    that opens and then fails at once (a broken driver) cannot spin.
    """
    import libvirt

    attempt = 0
    while not stop.is_set():
        began = time.monotonic()
        try:
            watcher = _Watcher(relay)
        except libvirt.libvirtError as exc:
            log.warning("libvirt_connect_failed", uri=relay.config.uri, error=str(exc))
        else:
            log.info("libvirt_connected", uri=relay.config.uri)
            try:
                await _run_watcher(relay, watcher, stop)
            finally:
                watcher.close()
            if stop.is_set():
                break
            log.warning("libvirt_disconnected", uri=relay.config.uri)
        if time.monotonic() - began > 60:
            attempt = 0
        await _sleep_or_stop(stop, backoff_delay(attempt, random.random()))
        attempt += 1


def _load_state(spool_dir: Path) -> dict[str, DomainView]:
    try:
        return views_from_json((spool_dir / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return {}


async def run_relay(config: RelayConfig, stop: asyncio.Event | None = None) -> None:
    """Run the relay until ``stop`` is set: watch libvirt, spool events, deliver them."""
    import libvirt
    import libvirtaio

    libvirtaio.virEventRegisterAsyncIOImpl()  # before any connection is opened
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we log errors ourselves
    stop = stop or asyncio.Event()
    relay = _Relay(
        config=config,
        spool=Spool(config.spool_dir),
        wake=asyncio.Event(),
        boot_id=format(time.time_ns(), "x"),
        state=_load_state(config.spool_dir),
    )
    url = config.service_url.rstrip("/") + EVENTS_PATH
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def post(body: bytes) -> int | None:
            return await post_event(session, url, config.token, body)

        log.info("relay_started", uri=config.uri, service_url=config.service_url,
                 spool_dir=str(config.spool_dir), poll_interval=config.poll_interval)
        tasks = [
            asyncio.create_task(deliver_forever(relay.spool, post, relay.wake)),
            asyncio.create_task(_watch_libvirt(relay, stop)),
        ]
        try:  # either ends only by stop or by a bug/disk error, which must end the process
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if (exc := task.exception()) is not None:
                raise exc
    log.info("relay_stopped")
