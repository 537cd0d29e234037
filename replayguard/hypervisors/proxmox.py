"""Parser for Proxmox VE task records, as our poller or hookscript posts them.

A finished PVE task is posted as (the fields of ``GET /nodes/{node}/tasks`` plus ours)::

    {"upid": "UPID:pve1:000A1B2C:0001E240:6756F1A0:qmrollback:101:root@pam:",
     "status": "OK",                    # or "WARNINGS: 2", or the error text
     "endtime": 1733751200,             # Unix seconds, required once the task ended
     "node": "pve1",                    # optional, must match the UPID's node
     "cluster": "prod",                 # optional, see vm_id below
     "snapshot": "pre-patch",           # optional: snapshot name (qmsnapshot, qmrollback...)
     "snapshot_created_at": 1733700000, # optional: Unix seconds or RFC 3339 (PVE snaptime)
     "target_vmid": 205,                # required for qmclone/vzclone: the new guest
     "backup_vmid": 101}                # optional for qmrestore/vzrestore: the guest backed up

Task types: QEMU VMs' (qemu-server) ``qmsnapshot``, ``qmdelsnapshot``, ``qmrollback``,
``qmclone``, ``qmrestore``, ``qmigrate``, ``qmstart``, ``qmstop``, ``qmshutdown``, and
LXC containers' (pve-container) ``vzsnapshot``, ``vzdelsnapshot``, ``vzrollback``,
``vzclone``, ``vzrestore`` (``pct restore``, or ``pct create --restore``), ``vzmigrate``,
``vzstart``, ``vzstop``, ``vzshutdown``, each read as its QEMU counterpart. Any other type
(``vzcreate``: a container made from a template, ``vzdump``...) is ignored.

The UPID is decoded exactly as ``PVE::Tools::upid_decode`` does:
``UPID:$node:$pid:$pstart:$starttime:$type:$id:$user:`` with pid and starttime 8 hex
digits, pstart 8 or 9 hex digits.

Choices:

- ``event_id`` is the UPID: unique per task on a cluster, and stable when the poller
  posts the same task again.
- ``vm_id`` is the numeric vmid as a string, or ``"<cluster>/<vmid>"`` when the record
  names a cluster: vmids are unique only within one PVE cluster, where VMs and containers
  share one vmid space (a vmid names one guest of either kind), so a container's vm_id is
  built the same way and never names a VM that exists at the same time.
- ``host`` is the node that ran the task (for a migration: the source node).
- A ``qmrestore`` (or ``vzrestore``) runs under the vmid restored into. When
  ``backup_vmid`` names another VM, the new VM starts from that VM's disks as they were at the backup's time, so the
  task is ``vm.cloned`` of ``backup_vmid`` (same cluster), and ``snapshot_created_at``
  is the backup's time: the source's uses since the backup are put at risk. With the
  same vmid, or without ``backup_vmid`` (the backup's VM unknown), it is ``vm.restored``
  of the vmid restored into.
- A ``qmsnapshot`` (or ``vzsnapshot``) without ``snapshot_created_at`` was taken at the
  task's start at the latest that is safe to assume: PVE stamps ``snaptime`` after the task starts, and a
  later time (the end) would leave the uses made while it ran out of a rollback's window.
- ``snapshot`` is only a hint (``snapshot_created_at`` places the state): a name that is
  not an identifier becomes ``sha256:`` and the hex SHA-256 of its UTF-8 bytes, the same
  for the qmsnapshot and the qmrollback, and the task is kept.
- A task succeeded when its status is ``OK`` or ``WARNINGS: <n>``, as in
  ``PVE::Tools::upid_status_is_error``: a rollback that finished with warnings still
  rolled the VM back. Any other status is ``IgnoredPayload("task failed")``; a record
  without a status (task still running) is ignored too.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import NamedTuple

from replayguard.core.events import EventType, GenericEvent, IgnoredPayload, MalformedPayload
from replayguard.hypervisors import _common as c

# PVE::Tools::upid_decode
_UPID = re.compile(
    r"UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):([0-9A-Fa-f]{8,9}):"
    r"([0-9A-Fa-f]{8}):([^:\s]+):([^:\s]*):([^:\s]+):"
)
_WARNINGS = re.compile(r"WARNINGS: [0-9]+")
# PVE accepts vmids 100 .. 999999999 (pve-vmid format).
_VMID = re.compile(r"[1-9][0-9]{2,8}")
_MAX_VMID = 999_999_999

TASK_TYPES: dict[str, EventType] = {
    "qmsnapshot": EventType.SNAPSHOT_CREATED,
    "qmdelsnapshot": EventType.SNAPSHOT_DELETED,
    "qmrollback": EventType.SNAPSHOT_REVERTED,
    "qmclone": EventType.VM_CLONED,
    "qmrestore": EventType.VM_RESTORED,
    "qmigrate": EventType.VM_MIGRATED,
    "qmstart": EventType.VM_STARTED,
    "qmstop": EventType.VM_STOPPED,
    "qmshutdown": EventType.VM_STOPPED,
    "vzsnapshot": EventType.SNAPSHOT_CREATED,
    "vzdelsnapshot": EventType.SNAPSHOT_DELETED,
    "vzrollback": EventType.SNAPSHOT_REVERTED,
    "vzclone": EventType.VM_CLONED,
    "vzrestore": EventType.VM_RESTORED,
    "vzmigrate": EventType.VM_MIGRATED,
    "vzstart": EventType.VM_STARTED,
    "vzstop": EventType.VM_STOPPED,
    "vzshutdown": EventType.VM_STOPPED,
}
_SNAPSHOT_TASKS = frozenset({"qmsnapshot", "vzsnapshot"})


class Upid(NamedTuple):
    """A decoded Proxmox unique process id (``text`` is the UPID as given)."""

    text: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str


def decode_upid(value: object, path: str = "upid") -> Upid:
    """Split a UPID into its fields, or MalformedPayload naming ``path``."""
    text = c.check_identifier(value, path)
    match = _UPID.fullmatch(text)
    if match is None:
        raise MalformedPayload("not a Proxmox UPID", path)
    node, _, pid, pstart, starttime, task_type, task_id, user = match.groups()
    return Upid(
        text, node, int(pid, 16), int(pstart, 16), int(starttime, 16), task_type, task_id, user
    )


def parse(payload: object) -> list[GenericEvent]:
    """One finished PVE task as one generic event, or IgnoredPayload."""
    record = c.as_mapping(payload, c.ROOT)
    upid = decode_upid(c.field(record, "upid", c.ROOT))
    node = c.optional_identifier(record, "node", c.ROOT)
    if node is not None and node != upid.node:
        raise MalformedPayload("node does not match the UPID", "node")
    event_type = TASK_TYPES.get(upid.type)
    if event_type is None:
        raise IgnoredPayload(f"Proxmox task type {upid.type} is not acted on")
    _require_success(record)
    return [_event(record, upid, event_type)]


def _require_success(record: dict[str, object]) -> None:
    status = c.optional_string(record, "status", c.ROOT)
    if status is None:
        raise IgnoredPayload("task still running")
    if status != "OK" and not _WARNINGS.fullmatch(status):
        raise IgnoredPayload("task failed")


def _event(record: dict[str, object], upid: Upid, event_type: EventType) -> GenericEvent:
    cluster = c.optional_identifier(record, "cluster", c.ROOT)
    vmid = _vmid(upid.id, "upid")
    source_vm_id = None
    if event_type is EventType.VM_CLONED:
        source_vm_id = _vm_id(cluster, vmid)
        vmid = _vmid(c.field(record, "target_vmid", c.ROOT), "target_vmid")
    elif event_type is EventType.VM_RESTORED and record.get("backup_vmid") is not None:
        backup_vmid = _vmid(record["backup_vmid"], "backup_vmid")
        if backup_vmid != vmid:
            event_type, source_vm_id = EventType.VM_CLONED, _vm_id(cluster, backup_vmid)
    created = _snapshot_time(record)
    if created is None and upid.type in _SNAPSHOT_TASKS:
        created = c.unix_time(upid.starttime, "upid")
    return GenericEvent(
        event_id=upid.text,
        type=event_type,
        vm_id=_vm_id(cluster, vmid),
        occurred_at=c.unix_time(c.field(record, "endtime", c.ROOT), "endtime"),
        snapshot_id=c.optional_name_identifier(record, "snapshot", c.ROOT),
        snapshot_created_at=created,
        host=upid.node,
        source_vm_id=source_vm_id,
        extra={"user": upid.user, "task_type": upid.type, "starttime": str(upid.starttime)},
    )


def _vmid(value: object, path: str) -> str:
    """A PVE vmid (JSON integer or decimal string) as its canonical decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value) if 0 <= value <= _MAX_VMID else ""  # str() of a huge int raises
    if not isinstance(value, str) or not _VMID.fullmatch(value):
        raise MalformedPayload("not a Proxmox vmid (100-999999999)", path)
    return value


def _vm_id(cluster: str | None, vmid: str) -> str:
    return vmid if cluster is None else c.check_identifier(f"{cluster}/{vmid}", "cluster")


def _snapshot_time(record: dict[str, object]) -> datetime | None:
    value = record.get("snapshot_created_at")
    return None if value is None else c.any_time(value, "snapshot_created_at")
