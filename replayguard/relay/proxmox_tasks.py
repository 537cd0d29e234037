"""Proxmox VE's cluster task list as values: which tasks to post, and the record of each.

Pure functions over the JSON ``pvesh get /cluster/tasks`` prints (or the API's
``{"data": [...]}``): the UPID cursor that makes each finished task posted once, the
selection of due tasks, and the snapshot, clone and restore fields the lookups' answers add.
QEMU VMs (``qm*`` tasks) and LXC containers (``vz*`` tasks, as pve-container names them)
are read alike; a container's snapshot list is under ``/nodes/{node}/lxc/{vmid}``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

import orjson

from ..core.events import MalformedPayload
from ..hypervisors.proxmox import TASK_TYPES, Upid, decode_upid

CURSOR_FILE = "proxmox-cursor.json"
RECORD_FIELDS = ("upid", "node", "pid", "pstart", "starttime", "type", "id", "user", "status", "endtime")
# The task types of each kind, QEMU's (qemu-server) and LXC's (pve-container).
SNAPSHOTS = frozenset({"qmsnapshot", "vzsnapshot"})
ROLLBACKS = frozenset({"qmrollback", "vzrollback"})
CLONES = frozenset({"qmclone", "vzclone"})
RESTORES = frozenset({"qmrestore", "vzrestore"})
_CONTAINER_TASKS = frozenset({"vzsnapshot", "vzrollback", "vzdelsnapshot", "vzclone", "vzrestore"})
# Tasks after which a guest's current.parent may no longer be the snapshot a rollback went to.
MOVES_PARENT = SNAPSHOTS | ROLLBACKS | RESTORES | {"qmdelsnapshot", "vzdelsnapshot"}
_WARNINGS = re.compile(r"WARNINGS: [0-9]+")
# A guest's volume names: vm-/base- (images, and containers on LVM, RBD, dir), subvol-/basevol-
# (container root file systems on ZFS and dir-like storages).
_DISK = re.compile(r"\b(?:vm|base|subvol|basevol)-([1-9][0-9]{2,8})-(?:disk|cloudinit|state)\b")
# What a container clone's task log says of its new container (pve-container since March 2026).
_CT_CLONE = re.compile(r"\bcreating a clone of container ([1-9][0-9]{2,8}) with ID ([1-9][0-9]{2,8})\b")
# What a restore's task log prints of its backup: a vzdump archive's file name (qmrestore:
# ``restore vma archive: zstd -q -d -c /var/lib/vz/dump/vzdump-qemu-101-2026_11_29-09_30_00.vma.zst
# | vma extract ...``; vzrestore: ``extracting archive '/var/lib/vz/dump/vzdump-lxc-120-….tar.zst'``),
# whose time vzdump writes with strftime(localtime), or a Proxmox Backup Server snapshot
# (``pbs-restore ... vm/101/2026-11-29T09:30:00Z drive-scsi0.img.fidx``; a container's is
# ``ct/120/…``), in UTC. Each restore reads only its own kind's names.
_VZDUMP = {kind: re.compile(rf"\bvzdump-{kind}-([1-9][0-9]{{2,8}})-"
                            r"(\d{4})_(\d{2})_(\d{2})-(\d{2})_(\d{2})_(\d{2})(?:\.[a-z0-9]{1,4}){0,2}", re.ASCII)
           for kind in ("qemu", "lxc")}
_PBS = {kind: re.compile(rf"\b{kind}/([1-9][0-9]{{2,8}})/"
                         r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z", re.ASCII)
        for kind in ("vm", "ct")}
# A wall-clock time without its zone names instants from UTC-12:00 to UTC+14:00; the
# earliest is 14 hours before the same digits read as UTC.
_EARLIEST_ZONE_S = 14 * 3600


class Task(NamedTuple):
    """One entry of the cluster task list with its decoded UPID."""

    upid: Upid
    raw: Mapping[str, Any]

    @property
    def finished(self) -> bool:
        return self.raw.get("endtime") is not None

    @property
    def succeeded(self) -> bool:
        """OK or ``WARNINGS: n``, as ``PVE::Tools::upid_status_is_error`` sees it."""
        status = self.raw.get("status")
        return status == "OK" or (isinstance(status, str) and bool(_WARNINGS.fullmatch(status)))

    @property
    def forwarded(self) -> bool:
        return self.upid.type in TASK_TYPES and self.succeeded


def read_tasks(listing: object) -> list[Task]:
    """Entries with a valid UPID from ``pvesh`` output (a list) or the API's ``{"data": [...]}``."""
    if isinstance(listing, dict):
        listing = listing.get("data")
    if not isinstance(listing, list):
        raise TypeError("a task list is a JSON array (or an object with 'data')")
    tasks = []
    for entry in listing:
        if isinstance(entry, dict):
            with contextlib.suppress(MalformedPayload):
                tasks.append(Task(decode_upid(entry.get("upid")), entry))
    return tasks


@dataclass
class Cursor:
    """UPIDs already handled (→ their start time), so each finished task is posted once,
    and those seen still running and not handled since (→ their start time): one that
    leaves the list before a poll sees it finished is read from its node's archive."""

    seen: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)

    def __contains__(self, upid: str) -> bool:
        return upid in self.seen

    def add(self, task: Task) -> None:
        self.seen[task.upid.text] = task.upid.starttime
        self.running.pop(task.upid.text, None)

    def note_running(self, tasks: Sequence[Task], waiting: Iterable[Task] = ()) -> list[str]:
        """Remember the tasks running in this poll's tasks (the list and any archive read),
        and the finished ones ``waiting`` for a lookup, as not handled yet; returns those
        remembered before that this poll neither found nor handled although their node
        lists tasks (not in its archive either: looked for once, then forgotten). Those of
        a node listing no finished task (offline) are kept until it does."""
        running = {t.upid.text: t.upid.starttime for t in tasks if not t.finished and t.upid.text not in self.seen}
        running |= {t.upid.text: t.upid.starttime for t in waiting if t.upid.text not in self.seen}
        present, looked = {t.upid.text for t in tasks}, _listing_nodes(tasks)
        lost = []
        for text, start in self.running.items():
            if text in present or text in self.seen or text in running:
                continue
            if _node_of(text) in looked:
                lost.append(text)
            else:
                running[text] = start
        self.running = running
        return sorted(lost)

    def prune(self, listed: Iterable[str], before: int) -> None:
        """Forget UPIDs older than ``before`` that PVE no longer lists: they cannot return."""
        keep = set(listed)
        self.seen = {u: t for u, t in self.seen.items() if t >= before or u in keep}
        self.running = {u: t for u, t in self.running.items() if t >= before or u in keep}

    def to_json(self) -> bytes:
        return orjson.dumps({"seen": self.seen, "running": self.running}, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> Cursor:
        """Inverse of ``to_json``; an unreadable cursor raises, never silently re-posts all.
        A cursor without ``running`` (written before it was kept) has none."""
        try:
            raw = orjson.loads(data)
            seen, running = raw["seen"], raw.get("running", {})
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"unreadable {CURSOR_FILE}: {type(exc).__name__}") from exc
        for name, value in (("seen", seen), ("running", running)):
            if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
                raise ValueError(f"{CURSOR_FILE}: {name!r} must map UPIDs to start times")
        return cls(dict(seen), dict(running))


def due(tasks: Sequence[Task], cursor: Cursor) -> list[Task]:
    """Finished tasks not handled yet, oldest end first (running ones wait for a later poll)."""
    fresh = [t for t in tasks if t.finished and t.upid.text not in cursor]
    return sorted(fresh, key=lambda t: (t.raw.get("endtime") or 0, t.upid.text))


def list_gaps(tasks: Sequence[Task], cursor: Cursor) -> dict[str, int]:
    """Nodes whose listed tasks may not reach back to the cursor: node → the start time
    from which that node's task archive must be read.

    ``/cluster/tasks`` holds each node's running tasks and only its newest finished ones
    (25 in PVE's ``active_workers``). When a node's listed finished tasks include none the
    cursor handled, while the cursor handled tasks of that node, more may have finished
    since than the list holds (a poller stopped or slow for a while): those fell off the
    list unseen, from the newest handled task's start on. A node listing no finished task
    says nothing (its list is not broadcast). And a task the cursor saw running that its
    node, listing tasks, no longer lists nor was handled finished and fell off unseen (the
    list keeps the newest by start, so a long task goes first, however often the poller
    reads): from its start on.
    """
    handled: dict[str, int] = {}
    for text, start in cursor.seen.items():
        with contextlib.suppress(MalformedPayload):
            node = decode_upid(text).node
            handled[node] = max(start, handled.get(node, start))
    listed: dict[str, bool] = {}
    for task in tasks:
        if task.finished:
            listed[task.upid.node] = listed.get(task.upid.node, False) or task.upid.text in cursor
    gaps = {node: handled[node] for node, overlaps in listed.items() if node in handled and not overlaps}
    present = {task.upid.text for task in tasks}
    for text, start in cursor.running.items():
        of = _node_of(text)
        if of is not None and of in listed and text not in present and text not in cursor.seen:
            gaps[of] = min(start, gaps.get(of, start))
    return gaps


def _listing_nodes(tasks: Iterable[Task]) -> set[str]:
    """Nodes that list finished tasks (a node listing none is offline or not broadcast)."""
    return {task.upid.node for task in tasks if task.finished}


def _node_of(upid: str) -> str | None:
    try:
        return decode_upid(upid).node
    except MalformedPayload:
        return None


def guest_kind(task_type: str) -> str:
    """``lxc`` for a container's task, ``qemu`` for a VM's: the API path of its snapshots."""
    return "lxc" if task_type in _CONTAINER_TASKS else "qemu"


def parent_may_have_moved(task: Task, tasks: Sequence[Task]) -> bool:
    """A later (or still running) task on the same VM may have changed ``current.parent``."""
    return any(
        other.upid.id == task.upid.id and other.upid.type in MOVES_PARENT
        and other.upid.starttime >= task.upid.starttime and other.upid.text != task.upid.text
        for other in tasks
    )


def snapshot_fields(task: Task, snapshots: object, moved: bool) -> dict[str, Any]:
    """``snapshot`` and ``snapshot_created_at`` of a snapshot or rollback task (VM or
    container), as far as known.

    Snapshot: the one snapshot whose ``snaptime`` falls inside the task. Rollback: the
    ``parent`` of the pseudo-snapshot ``current``, unless ``moved``.
    """
    if not isinstance(snapshots, list):
        return {}
    named = {s["name"]: s for s in snapshots if isinstance(s, dict) and isinstance(s.get("name"), str)}
    if task.upid.type in SNAPSHOTS:
        end = task.raw.get("endtime")
        inside = [s for n, s in named.items() if n != "current" and isinstance(s.get("snaptime"), int)
                  and isinstance(end, int) and task.upid.starttime <= s["snaptime"] <= end]
        chosen = inside[0] if len(inside) == 1 else None
    elif task.upid.type in ROLLBACKS and not moved:
        parent = (named.get("current") or {}).get("parent")
        chosen = named.get(parent) if isinstance(parent, str) and parent != "current" else None
    else:
        chosen = None
    if chosen is None:
        return {}
    when = chosen.get("snaptime")
    return {"snapshot": chosen["name"], **({"snapshot_created_at": when} if isinstance(when, int) else {})}


def clone_target(task_log: object, source_vmid: str) -> int | None:
    """The new guest of a qmclone or vzclone: the one a container clone's log names
    (``creating a clone of container 120 with ID 121``), else the one other guest whose
    volume names the log prints; None when that is not exactly one."""
    if isinstance(task_log, dict):
        task_log = task_log.get("data")
    if not isinstance(task_log, list):
        return None
    texts = [line["t"] for line in task_log if isinstance(line, dict) and isinstance(line.get("t"), str)]
    named = {new for text in texts for source, new in _CT_CLONE.findall(text) if source == source_vmid}
    found = named or {m for text in texts for m in _DISK.findall(text)}
    found -= {source_vmid}
    return int(found.pop()) if len(found) == 1 else None


class Backup(NamedTuple):
    """The backup a restore read: its guest, its time (Unix seconds, no later than the
    backup was taken), and its name as the task log gives it (an archive or a snapshot)."""

    vmid: int
    time: int
    name: str


def restore_source(task_log: object, kind: str = "qemu", zone: tzinfo | None = None) -> Backup | None:
    """The one backup of ``kind`` (``qemu``: a qmrestore; ``lxc``: a vzrestore) a restore's
    task log names, or None (no name, two different backups, or a name whose date is impossible).

    A vzdump archive name carries the node's local time with no zone: read in ``zone`` (the
    nodes' time zone, ``--node-timezone``) when given, else placed at the earliest instant
    it can name (as if written at UTC+14:00), so the window on the backup's VM may start up
    to a day early, never late. A Proxmox Backup Server snapshot is in UTC.
    """
    if isinstance(task_log, dict):
        task_log = task_log.get("data")
    if not isinstance(task_log, list):
        return None
    vzdump, pbs = _VZDUMP[kind], _PBS["ct" if kind == "lxc" else "vm"]
    found: dict[tuple[int, int] | None, Backup | None] = {}  # one per VM and time: the first name
    for line in task_log:
        text = line.get("t") if isinstance(line, dict) else None
        if isinstance(text, str):
            for backup in [*(_backup(m, zone) for m in vzdump.finditer(text)),
                           *(_backup(m, UTC) for m in pbs.finditer(text))]:
                found.setdefault(None if backup is None else (backup.vmid, backup.time), backup)
    return next(iter(found.values())) if len(found) == 1 else None


def _backup(match: re.Match[str], zone: tzinfo | None) -> Backup | None:
    vmid, year, month, day, hour, minute, second = (int(p) for p in match.groups())
    try:
        wall = datetime(year, month, day, hour, minute, second)  # zone-less: earliest_instant reads it
    except ValueError:
        return None
    # Before 1970 is no Unix time the service takes: the epoch is the earliest it can say.
    return Backup(vmid, max(0, earliest_instant(wall, zone)), match.group(0))


def earliest_instant(wall: datetime, zone: tzinfo | None) -> int:
    """The earliest Unix time a zone-less wall-clock time can name in ``zone``, or in any
    zone (UTC+14:00) when ``zone`` is None.

    A wall time a zone repeats (the hour clocks go back) names two instants: the earlier
    is taken. One it skips (the hour clocks go forward), which ``localtime`` never prints,
    is read with both offsets and the earlier taken too.
    """
    if zone is None:
        return int(wall.replace(tzinfo=UTC).timestamp()) - _EARLIEST_ZONE_S
    return min(int(wall.replace(tzinfo=zone, fold=fold).timestamp()) for fold in (0, 1))


def restore_fields(backup: Backup) -> dict[str, Any]:
    """``backup_vmid``, ``snapshot`` and ``snapshot_created_at`` of a restore."""
    return {"backup_vmid": backup.vmid, "snapshot": backup.name, "snapshot_created_at": backup.time}


def task_record(task: Task, cluster: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The body posted for one task: PVE's own fields, then ours."""
    record = {k: task.raw[k] for k in RECORD_FIELDS if task.raw.get(k) is not None}
    if cluster is not None:
        record["cluster"] = cluster
    return {**record, **extra}
