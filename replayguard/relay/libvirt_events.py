"""What the libvirt relay posts: event ids, bodies and snapshot diffing, as pure functions.

libvirt tells a watcher about lifecycle changes (a revert shows as STOPPED/STARTED with a
FROM_SNAPSHOT detail) but says nothing when a snapshot is created or deleted, and an
in-place revert of a running QEMU guest can emit no event at all. So the relay also polls
every domain's snapshot list, current snapshot and state; this module turns two polls
into ``snapshot_created``, ``snapshot_deleted`` and ``silent_revert`` changes (the current
snapshot moved back, or the domain runs from a revert the previous poll did not see, with
no FROM_SNAPSHOT event seen), tells ``snapshot-create --halt`` from a revert (both emit
STOPPED/FROM_SNAPSHOT: ``halted_by_snapshot``), and gives every event an id and a body.
No libvirt, no I/O, no clock: times are parameters.
"""

from __future__ import annotations

import enum
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ..settings import Secret

SOURCE = "libvirt"
SYNTHETIC = -1  # "event"/"detail" of events libvirt never emitted (found by polling)
MAX_EVENT_ID = 256  # CONTRACT §3: identifiers are 1 to 256 printable characters
# (virDomainEventType, detail) pairs that mean "this happened because of a snapshot":
# RESUMED/FROM_SNAPSHOT, STARTED/FROM_SNAPSHOT, SUSPENDED/FROM_SNAPSHOT, STOPPED/FROM_SNAPSHOT,
# DEFINED/FROM_SNAPSHOT (a shut-off domain reverted to a shut-off snapshot), the pairs the
# service reads as a revert.
FROM_SNAPSHOT = frozenset({(4, 2), (2, 3), (3, 5), (5, 6), (0, 3)})
# virDomainGetState's (state, reason) that only a revert sets: VIR_DOMAIN_RUNNING with
# VIR_DOMAIN_RUNNING_FROM_SNAPSHOT. PAUSED/FROM_SNAPSHOT (7) and SHUTOFF/FROM_SNAPSHOT (7)
# are not: QEMU also sets them when it takes a snapshot (of a pm-suspended domain with
# its memory; with --halt).
RUNNING_FROM_SNAPSHOT = (1, 4)
# STOPPED/FROM_SNAPSHOT is also what ``virsh snapshot-create --halt`` emits (QEMU's
# qemuSnapshotCreateActiveInternal/External and the test driver): the snapshot is taken,
# then the domain is stopped, SHUTOFF/FROM_SNAPSHOT (5, 7). See ``halted_by_snapshot``.
STOPPED_FROM_SNAPSHOT = (5, 6)
SHUTOFF_FROM_SNAPSHOT = (5, 7)
# <state> of a snapshot taken of a live domain: a revert to one leaves the domain live.
LIVE_SNAPSHOT_STATES = frozenset({"running", "paused"})
MAX_ANCESTRY = 64  # ancestors of the current snapshot read per poll


class Kind(str, enum.Enum):
    LIFECYCLE = "lifecycle"
    SNAPSHOT_CREATED = "snapshot_created"
    SNAPSHOT_DELETED = "snapshot_deleted"
    SILENT_REVERT = "silent_revert"


@dataclass(frozen=True)
class RelayConfig:
    uri: str
    service_url: str
    token: Secret
    spool_dir: Path
    poll_interval: float = 5.0
    host: str = "localhost"
    event_secret: Secret | None = None  # the service's event_hmac_secret: sign every event


@dataclass(frozen=True)
class SnapshotRef:
    name: str
    creation_time: int | None


@dataclass(frozen=True)
class RunState:
    """``virDomainGetState``'s state and reason, and the domain's id (-1 while not running)."""

    state: int
    reason: int
    domain_id: int

    @property
    def from_snapshot(self) -> bool:
        """Running, and the last state change was a revert (``RUNNING_FROM_SNAPSHOT``)."""
        return (self.state, self.reason) == RUNNING_FROM_SNAPSHOT


@dataclass(frozen=True)
class DomainView:
    """What one poll saw of one domain: snapshot name → creation time, the current one, the
    current one's ancestors, nearest first (at most ``MAX_ANCESTRY``), its descendants, and
    the domain's state (each None: not read, a poll state from before it was kept)."""

    uuid: str
    name: str
    snapshots: Mapping[str, int | None]
    current: str | None
    ancestry: tuple[str, ...] | None = None
    descendants: tuple[str, ...] | None = None
    run: RunState | None = None


@dataclass(frozen=True)
class AtStop:
    """What the relay read right after a STOPPED/FROM_SNAPSHOT event: the domain's state,
    its current snapshot, that snapshot's ``<state>`` and number of children (None: not
    read), and whether another lifecycle event of the domain arrived after this one by
    the time the reading was done."""

    run: RunState | None
    current: SnapshotRef | None
    current_state: str | None
    children: int | None
    later_events: bool


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


def halted_by_snapshot(event: int, detail: int, occurred_at: float, seen: AtStop,
                       prev: DomainView | None) -> bool:
    """A STOPPED/FROM_SNAPSHOT event that is ``snapshot-create --halt``, not a revert.

    Both stop the domain with SHUTOFF/FROM_SNAPSHOT. A revert that leaves the domain shut
    off goes to a snapshot taken while it was shut off (``<state>shutoff``): one of a live
    domain (``running``, ``paused``) leaves it running or paused. Taking a snapshot with
    --halt leaves it shut off under a snapshot of the live domain, new (the previous poll
    did not see it), taken no later than the event, with no children. Only all of that
    together, with no other lifecycle event of the domain in between, is a halt; anything
    unread or unsure is a revert (a false revert costs an operator's look, a missed one a
    replay)."""
    if (event, detail) != STOPPED_FROM_SNAPSHOT or prev is None or seen.later_events:
        return False
    if seen.run is None or (seen.run.state, seen.run.reason) != SHUTOFF_FROM_SNAPSHOT:
        return False
    current = seen.current
    if current is None or current.creation_time is None or current.creation_time > occurred_at:
        return False
    if seen.current_state not in LIVE_SNAPSHOT_STATES or seen.children != 0:
        return False
    if current.name not in prev.snapshots:
        return True
    before = prev.snapshots[current.name]  # the name seen before: new only with another time
    return before is not None and before != current.creation_time


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
    snapshot_create_halt: bool = False,
) -> dict[str, Any]:
    """The JSON the relay posts; ``domain`` is (name, uuid). ``snapshot_create_halt``: a
    STOPPED/FROM_SNAPSHOT judged to be ``snapshot-create --halt`` (``halted_by_snapshot``)."""
    extra: dict[str, Any] = {"snapshot_create_halt": True} if snapshot_create_halt else {}
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
        **extra,
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
    """The current snapshot moved to one that already existed, and not by a deletion; or
    to one taken since the previous poll while a snapshot taken after it still exists.

    A newly created snapshot becoming current is a creation, and deleting the current
    snapshot may make its parent current: neither is a revert. But taking a snapshot makes
    it current, so when several were taken since the previous poll (or while the relay was
    stopped) and the current one is not the last taken, the domain went back to it. A
    snapshot whose name the previous poll saw with another creation time, or under the
    snapshot then current although it was that one's ancestor, is a new one (the old one
    deleted, the name taken again). Deleting the current snapshot makes its nearest
    surviving ancestor current: any other existing snapshot current then is a revert.
    """
    target = cur.current
    if target is None or target == prev.current:
        return False
    if not _existed(prev, cur, target) or _retaken_under_previous(prev, cur, target):
        return _taken_after_exists(prev, cur, target)
    if prev.current is None or prev.current in cur.snapshots:
        return True
    if prev.ancestry is None:  # the deletion may explain the move: nothing says otherwise
        return False
    survivor = next((name for name in prev.ancestry if _existed(prev, cur, name)), None)
    return target != survivor


def _retaken_under_previous(prev: DomainView, cur: DomainView, target: str) -> bool:
    """``target`` is a new snapshot under an old name: the previous poll saw it as an
    ancestor of the snapshot then current, which is now an ancestor of it. A snapshot
    never gains an ancestor (deleting one hands its children to its parent), so these are
    two snapshots: the name was deleted and taken again, within one second (its creation
    time is unchanged)."""
    if prev.ancestry is None or cur.ancestry is None or prev.current is None:
        return False
    return target in prev.ancestry and prev.current in cur.ancestry


def _taken_after_exists(prev: DomainView, cur: DomainView, target: str) -> bool:
    """A snapshot taken since the previous poll, after ``target``, still exists: one that
    descends from it (a snapshot is taken under the current one, so after its ancestors,
    whatever the one-second creation times say), or one with a later creation time."""
    taken = cur.snapshots.get(target)
    descendants = cur.descendants or ()
    return any(
        name in descendants or (taken is not None and when is not None and when > taken)
        for name, when in cur.snapshots.items()
        if name != target and not _existed(prev, cur, name)
    )


def reverted_by_state(prev: DomainView, cur: DomainView) -> bool:
    """The domain runs from a revert the previous poll did not see running: a revert since,
    even one that moved no snapshot pointer (to the snapshot already current, or to the one
    that deleting the current one makes current).

    Only a revert sets RUNNING/FROM_SNAPSHOT, and it stays until the next state change. The
    same state with the same domain id (what a restarted relay sees) may be the revert seen
    before, or another made in place (QEMU keeps its process, so the id): it says nothing,
    nor does a previous poll that did not read the state.
    """
    before, now = prev.run, cur.run
    if before is None or now is None or not now.from_snapshot:
        return False
    return not before.from_snapshot or before.domain_id != now.domain_id


def _state_revert_target(prev: DomainView, cur: DomainView) -> str | None:
    """The snapshot to report a revert the state shows as going to: the current one, or,
    when that one was taken since the previous poll (perhaps after the revert, under the
    snapshot reverted to), its nearest ancestor that poll saw, which is no later than the
    snapshot reverted to, so the window covers at least the true one's."""
    target = cur.current
    if target is None or _existed(prev, cur, target):
        return target
    return next((a for a in cur.ancestry or () if _existed(prev, cur, a)), target)


def _existed(prev: DomainView, cur: DomainView, name: str) -> bool:
    """``cur``'s snapshot ``name`` is the one ``prev`` saw (same name, no other known time)."""
    if name not in prev.snapshots or name not in cur.snapshots:
        return False
    before, now = prev.snapshots[name], cur.snapshots[name]
    return before is None or now is None or before == now


def diff_domain(prev: DomainView | None, cur: DomainView, lifecycle_seen: bool) -> list[SnapshotChange]:
    """Changes between two polls of one domain, creations oldest first.

    ``lifecycle_seen``: a FROM_SNAPSHOT lifecycle event arrived for the domain since the
    previous poll, so a move of the current snapshot is already reported. With no
    previous poll nothing can be called a revert.
    """
    before: Mapping[str, int | None] = prev.snapshots if prev is not None else {}
    # a name seen before with another creation time: that snapshot deleted, a new one taken
    retaken = {n for n in cur.snapshots if prev is not None and n in before and not _existed(prev, cur, n)}
    created = sorted(
        (SnapshotRef(n, t) for n, t in cur.snapshots.items() if n not in before or n in retaken),
        key=lambda s: (s.creation_time or 0, s.name),
    )
    changes = [SnapshotChange(Kind.SNAPSHOT_CREATED, s) for s in created]
    changes += [
        SnapshotChange(Kind.SNAPSHOT_DELETED, SnapshotRef(n, t))
        for n, t in sorted(before.items())
        if n not in cur.snapshots or n in retaken
    ]
    if prev is None or lifecycle_seen:
        return changes
    target = cur.current if is_silent_revert(prev, cur) else None
    if target is None and reverted_by_state(prev, cur):
        target = _state_revert_target(prev, cur)
    if target is not None:
        snapshot = SnapshotRef(target, cur.snapshots.get(target))
        changes.append(SnapshotChange(Kind.SILENT_REVERT, snapshot, previous=prev.current))
    return changes


def parse_creation_time(xml: str) -> int | None:
    """``<creationTime>`` of a snapshot's XML: the T of the rollback window."""
    try:
        text = ET.fromstring(xml).findtext("creationTime")  # noqa: S314 - libvirtd's own snapshot XML; expat resolves no external entities and caps expansion
        return int(text.strip()) if text else None
    except (ET.ParseError, ValueError):
        return None


def parse_snapshot_state(xml: str) -> str | None:
    """``<state>`` of a snapshot's XML: the domain's state when it was taken."""
    try:
        text = ET.fromstring(xml).findtext("state")  # noqa: S314 - as in parse_creation_time
    except ET.ParseError:
        return None
    return text.strip() if text else None


def views_to_json(views: Mapping[str, DomainView]) -> bytes:
    """Poll state as bytes, so a restarted relay still knows the last current snapshot."""
    return orjson.dumps(
        {
            u: {"name": v.name, "snapshots": dict(v.snapshots), "current": v.current,
                "ancestry": None if v.ancestry is None else list(v.ancestry),
                "descendants": None if v.descendants is None else list(v.descendants),
                "run": None if v.run is None else [v.run.state, v.run.reason, v.run.domain_id]}
            for u, v in sorted(views.items())
        },
        option=orjson.OPT_SORT_KEYS,
    )


def _names(raw: Any) -> tuple[str, ...] | None:
    return None if raw is None else tuple(str(n) for n in raw)


def _run(raw: Any) -> RunState | None:
    return None if raw is None else RunState(*(int(x) for x in raw))


def views_from_json(data: bytes) -> dict[str, DomainView]:
    """Inverse of ``views_to_json``; unreadable state is forgotten, not fatal."""
    try:
        raw = orjson.loads(data)
        return {
            u: DomainView(u, v["name"], dict(v["snapshots"]), v["current"], _names(v.get("ancestry")),
                          _names(v.get("descendants")), _run(v.get("run")))
            for u, v in raw.items()
        }
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return {}
