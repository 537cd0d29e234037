"""The libvirt side of the relay: one read-only connection, its callbacks and snapshot reads.

libvirt is imported only here and in the runner, inside functions, so the rest of the
relay (and its tests) never need the bindings.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from .libvirt_events import (
    MAX_ANCESTRY,
    STOPPED_FROM_SNAPSHOT,
    DomainView,
    RelayConfig,
    RunState,
    SnapshotRef,
    is_from_snapshot,
    lifecycle_event_id,
    parse_creation_time,
    parse_snapshot_state,
)
from .spool import Spool

log = structlog.get_logger("replayguard.relay.libvirt")


@dataclass
class Pending:
    """A lifecycle event as the callback saw it, id already fixed, snapshot not yet read."""

    event_id: str
    dom: Any
    event: int
    detail: int
    occurred_at: float
    n: int = 0  # the relay's count of lifecycle events when this one arrived
    monotonic: float = 0.0  # when it arrived, by time.monotonic()
    polled: DomainView | None = None  # the domain as the last poll recorded before it arrived


@dataclass
class RelayState:
    """State shared by the relay's tasks across libvirt reconnections."""

    config: RelayConfig
    spool: Spool
    wake: asyncio.Event
    boot_id: str
    state: dict[str, DomainView]
    lifecycle: asyncio.Queue[Pending] = field(default_factory=asyncio.Queue)
    held: deque[dict[str, Any]] = field(default_factory=deque)  # lifecycle bodies not yet spooled
    counter: int = 0

    def spool_event(self, body: Mapping[str, Any]) -> None:
        self.spool.put(body)
        self.wake.set()
        log.info("event_spooled", event_id=body["event_id"], kind=body["kind"])


def _ancestry(snap: Any) -> tuple[str, ...]:
    """The names of a snapshot's ancestors, nearest first (at most ``MAX_ANCESTRY``)."""
    import libvirt

    names: list[str] = []
    while len(names) < MAX_ANCESTRY:
        try:
            snap = snap.getParent(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                break  # a root
            raise
        names.append(snap.getName())
    return tuple(names)


class Watcher:
    """One libvirt connection: the lifecycle and close callbacks, and snapshot reads.

    Every call happens on the event-loop thread: libvirtaio is not thread-safe, and a
    short blocking RPC on a local socket is cheaper than the hazards of threads.
    """

    def __init__(self, relay: RelayState) -> None:
        import libvirt

        self.relay = relay
        self.closed = asyncio.Event()
        self.from_snapshot_seen: dict[str, float] = {}
        self.last_event: dict[str, int] = {}  # domain uuid -> n of its newest lifecycle event
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
        now = time.monotonic()
        # A STOPPED/FROM_SNAPSHOT counts as a reported revert once the worker found it is
        # not snapshot-create --halt (``saw_revert``): a halt must not hide a silent revert.
        if is_from_snapshot(event, detail) and (event, detail) != STOPPED_FROM_SNAPSHOT:
            self.from_snapshot_seen[uuid] = now
        relay.counter += 1
        self.last_event[uuid] = relay.counter
        event_id = lifecycle_event_id(
            relay.config.host, uuid, event, detail, relay.boot_id, relay.counter
        )
        relay.lifecycle.put_nowait(Pending(event_id, dom, event, detail, time.time(), relay.counter, now,
                                           relay.state.get(uuid)))

    def saw_revert(self, dom: Any, monotonic: float) -> None:
        """A FROM_SNAPSHOT event reported as a revert arrived at ``monotonic``: the poll
        that covers it does not report the same move again as ``silent_revert``."""
        uuid = dom.UUIDString()
        self.from_snapshot_seen[uuid] = max(self.from_snapshot_seen.get(uuid, monotonic), monotonic)

    def events_after(self, dom: Any, n: int) -> bool:
        """Another lifecycle event of ``dom`` arrived after its event number ``n``."""
        return self.last_event.get(dom.UUIDString(), n) != n

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

    def at_stop(self, dom: Any) -> tuple[RunState | None, SnapshotRef | None, str | None, int | None]:
        """The domain's state, current snapshot, that snapshot's ``<state>`` and number of
        children, read now (after a STOPPED/FROM_SNAPSHOT event); None where unreadable."""
        import libvirt

        try:
            state, reason = dom.state(0)
            run = RunState(state, reason, dom.ID())
            if not dom.hasCurrentSnapshot(0):
                return run, None, None, None
            snap = dom.snapshotCurrent(0)
            xml = snap.getXMLDesc(0)
            current = SnapshotRef(snap.getName(), parse_creation_time(xml))
            self.ctimes[(dom.UUIDString(), current.name)] = current.creation_time
            return run, current, parse_snapshot_state(xml), snap.numChildren(0)
        except libvirt.libvirtError as exc:
            log.warning("current_snapshot_unreadable", domain=dom.name(), error=str(exc))
            return None, None, None, None

    def read_views(self) -> tuple[dict[str, DomainView], frozenset[str]]:
        """One poll: every domain's snapshots and current snapshot, and the UUIDs of the
        domains listed but unreadable this time (their last view stands)."""
        import libvirt

        views: dict[str, DomainView] = {}
        unreadable: set[str] = set()
        for dom in self.conn.listAllDomains(0):
            try:
                view = self._view(dom)
            except libvirt.libvirtError as exc:
                if self.conn.isAlive() != 1:
                    raise
                log.warning("domain_unreadable", domain=dom.name(), error=str(exc))
                unreadable.add(dom.UUIDString())
                continue
            views[view.uuid] = view
        return views, frozenset(unreadable)

    def _view(self, dom: Any) -> DomainView:
        import libvirt

        uuid = dom.UUIDString()
        # The state first: a revert made while the snapshots are read then shows in the
        # current snapshot now and in the state next time, both naming the snapshot it went to.
        state, reason = dom.state(0)
        run = RunState(state, reason, dom.ID())
        snaps = {s.getName(): self.creation_time(uuid, s) for s in dom.listAllSnapshots(0)}
        for key in [k for k in self.ctimes if k[0] == uuid and k[1] not in snaps]:
            del self.ctimes[key]  # a later snapshot of the same name has its own time
        current: str | None = None
        ancestry: tuple[str, ...] = ()
        descendants: tuple[str, ...] = ()
        if dom.hasCurrentSnapshot(0):
            # Read afresh each poll: a name deleted and taken again between two polls is a
            # new snapshot (its own time), not the one cached, which became current again.
            snap = dom.snapshotCurrent(0)
            current = snap.getName()
            snaps[current] = self.creation_time(uuid, snap, fresh=True)
            ancestry = _ancestry(snap)
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS
            descendants = tuple(s.getName() for s in snap.listAllChildren(flags))
        return DomainView(uuid, dom.name(), snaps, current, ancestry, descendants, run)
