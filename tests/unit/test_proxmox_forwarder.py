"""The Proxmox task poller's pure parts: task selection, cursor, records, fed recorded PVE output."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from replayguard.core.events import EventType
from replayguard.errors import ConfigError
from replayguard.hypervisors import proxmox as parser
from replayguard.relay.proxmox import (
    CLONE_LOG_PATIENCE_S,
    CURSOR_FILE,
    Cursor,
    NoLookup,
    Outbox,
    build_record,
    clone_target,
    due,
    list_gaps,
    load_config,
    parent_may_have_moved,
    poll_once,
    read_tasks,
    restore_source,
    snapshot_fields,
)
from replayguard.relay.proxmox_lookup import ArchiveUnreadable

DATA = Path(__file__).resolve().parents[1] / "data" / "proxmox"
LISTING: list[dict[str, Any]] = orjson.loads((DATA / "cluster-tasks.json").read_bytes())
SNAPSHOTS: list[dict[str, Any]] = orjson.loads((DATA / "snapshot-pve1-101.json").read_bytes())
CLONE_LOG: list[dict[str, Any]] = orjson.loads((DATA / "task-log-qmclone.json").read_bytes())
VMA_LOG: list[dict[str, Any]] = orjson.loads((DATA / "task-log-qmrestore-vma.json").read_bytes())
PBS_LOG: list[dict[str, Any]] = orjson.loads((DATA / "task-log-qmrestore-pbs.json").read_bytes())
T0 = 1795942800  # 2026-11-29T09:00:00Z, the recorded listing's origin
# vzdump-qemu-101-2026_11_29-09_30_00: node-local wall time, read at UTC+14:00, the earliest
# instant it can name; vm/102/2026-11-29T08:00:00Z (Proxmox Backup Server) is UTC.
VMA_TIME = T0 + 1800 - 14 * 3600
PBS_TIME = T0 - 3600
TASKS = read_tasks(LISTING)
# Containers (LXC), from 2026-11-29T12:00:00Z: CT 120 snapshotted, rolled back, cloned to 121
# and backed up (vzdump 11:30) then restored as 122; CT 124 restored in place from PBS.
CT_LISTING: list[dict[str, Any]] = orjson.loads((DATA / "cluster-tasks-lxc.json").read_bytes())
CT_SNAPSHOTS: list[dict[str, Any]] = orjson.loads((DATA / "snapshot-pve1-120.json").read_bytes())
CT_CLONE_LOG: list[dict[str, Any]] = orjson.loads((DATA / "task-log-vzclone.json").read_bytes())
TAR_LOG: list[dict[str, Any]] = orjson.loads((DATA / "task-log-vzrestore-tar.json").read_bytes())
CT_PBS_LOG: list[dict[str, Any]] = orjson.loads((DATA / "task-log-vzrestore-pbs.json").read_bytes())
LINKED_LOG: list[dict[str, Any]] = orjson.loads((DATA / "task-log-vzclone-linked.json").read_bytes())
T1 = T0 + 3 * 3600
TAR_TIME = T1 - 1800 - 14 * 3600  # vzdump-lxc-120-2026_11_29-11_30_00, read at UTC+14:00
CT_PBS_TIME = T1 - 7200  # ct/124/2026-11-29T10:00:00Z
CT_TASKS = read_tasks(CT_LISTING)


def upid(task_type: str, vmid: str) -> str:
    """The UPID of the one recorded task of that type on that VM."""
    (found,) = [t["upid"] for t in LISTING if t["type"] == task_type and t["id"] == vmid
                and t.get("status") != "snapshot 'nightly' does not exist"]
    return str(found)


def task(task_type: str, vmid: str) -> Any:
    (found,) = [t for t in TASKS if t.upid.text == upid(task_type, vmid)]
    return found


def ct_upid(task_type: str, vmid: str) -> str:
    """The UPID of the one recorded (successful or running) container task of that type on that CT."""
    (found,) = [t["upid"] for t in CT_LISTING if t["type"] == task_type and t["id"] == vmid
                and not str(t.get("status", "")).startswith("snapshot ")]
    return str(found)


def ct_task(task_type: str, vmid: str) -> Any:
    (found,) = [t for t in CT_TASKS if t.upid.text == ct_upid(task_type, vmid)]
    return found


class RecordedLookup:
    """Answers lookups from the recorded pvesh output; None for anything not recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def snapshots(self, node: str, vmid: str, kind: str) -> object | None:
        self.calls.append(("snapshots", node, vmid))
        return {("pve1", "101", "qemu"): SNAPSHOTS, ("pve1", "120", "lxc"): CT_SNAPSHOTS}.get((node, vmid, kind))

    async def task_log(self, node: str, upid_text: str) -> object | None:
        self.calls.append(("log", node, upid_text))
        logs = {upid("qmclone", "101"): CLONE_LOG, upid("qmrestore", "311"): VMA_LOG,
                upid("qmrestore", "102"): PBS_LOG, ct_upid("vzclone", "120"): CT_CLONE_LOG,
                ct_upid("vzrestore", "122"): TAR_LOG, ct_upid("vzrestore", "124"): CT_PBS_LOG}
        return logs.get(upid_text)

    async def task_archive(self, node: str, since: int) -> list[object] | None:
        return None  # no archive recorded: like --lookup none, a gap is logged and the listed tasks posted


# ---------------------------------------------------------------- reading the task list


def test_read_tasks_takes_pvesh_list_and_api_envelope_alike() -> None:
    """`pvesh` prints a bare list and the REST API wraps it in data: both read the same."""
    assert read_tasks({"data": LISTING}) == read_tasks(LISTING) == TASKS
    assert len(TASKS) == len(LISTING)


def test_read_tasks_skips_entries_without_a_valid_upid() -> None:
    """An entry that is not an object or has a malformed UPID is skipped, not fatal."""
    broken = [{"upid": "UPID:pve1:123:0001E3A7:6B0BF41C:qmstart:101:root@pam:"}, "x", {}]
    assert read_tasks(broken + LISTING[:1]) == TASKS[:1]


def test_read_tasks_refuses_what_is_not_a_task_list() -> None:
    """Anything but a list (or an object holding one in data) is a TypeError."""
    with pytest.raises(TypeError):
        read_tasks({"errors": {"permission": "denied"}})


def test_due_is_finished_unseen_tasks_oldest_end_first() -> None:
    """The running qmsnapshot waits; the rest come in end-time order; seen ones never again."""
    fresh = due(TASKS, Cursor())
    assert upid("qmsnapshot", "102") not in [t.upid.text for t in fresh]
    ends = [t.raw["endtime"] for t in fresh]
    assert ends == sorted(ends) and len(fresh) == len(LISTING) - 1
    cursor = Cursor()
    for t in fresh[:5]:
        cursor.add(t)
    assert due(TASKS, cursor) == fresh[5:]


@pytest.mark.parametrize(("task_type", "vmid", "forwarded"), [
    ("qmstart", "101", True), ("qmdelsnapshot", "101", True), ("qmsnapshot", "101", True),
    ("qmrollback", "101", True), ("qmclone", "101", True), ("qmigrate", "205", True),
    ("qmshutdown", "102", True), ("qmstop", "205", True), ("qmrestore", "311", True),
    ("qmrestore", "102", True),
    ("vzdump", "101", False), ("vncproxy", "101", False), ("aptupdate", "", False),
])
def test_which_recorded_tasks_are_forwarded(task_type: str, vmid: str, forwarded: bool) -> None:
    """Successful VM tasks of the parser's types are forwarded (WARNINGS count as success)."""
    assert task(task_type, vmid).forwarded is forwarded


def test_a_failed_rollback_is_not_forwarded() -> None:
    """A task whose status is an error text did not happen, so it is not posted."""
    (failed,) = [t for t in TASKS if t.upid.type == "qmrollback" and t.upid.id == "102"]
    assert failed.finished and not failed.succeeded and not failed.forwarded


# ---------------------------------------------------------------- the cursor


def test_cursor_round_trips_through_json() -> None:
    """The cursor file read back holds the same UPIDs and start times."""
    cursor = Cursor()
    for t in TASKS:
        cursor.add(t)
    assert Cursor.from_json(cursor.to_json()) == cursor


def test_cursor_remembers_running_tasks_and_reads_one_written_without_them() -> None:
    """Tasks seen running round-trip with the handled ones; a cursor file from before
    running tasks were kept reads as having none."""
    running = {**_finished("pve1", 9, 300), "endtime": None, "status": None}
    cursor = Cursor()
    assert cursor.note_running(read_tasks([running, _finished("pve1", 1, 100)])) == []
    assert cursor.running == {running["upid"]: 300}
    assert Cursor.from_json(cursor.to_json()) == cursor
    assert Cursor.from_json(b'{"seen": {"u": 1}}') == Cursor({"u": 1})


def test_cursor_prune_forgets_only_old_unlisted_upids() -> None:
    """A UPID is forgotten once it is older than the horizon and PVE no longer lists it."""
    cursor = Cursor({"old-listed": 10, "old-gone": 10, "new-gone": 500})
    cursor.prune(["old-listed"], before=100)
    assert cursor.seen == {"old-listed": 10, "new-gone": 500}


def _finished(node: str, n: int, start: int) -> dict[str, Any]:
    return {"upid": f"UPID:{node}:{0x10000 + n:08X}:00020B15:{start:08X}:vncproxy:101:ops@pve:",
            "node": node, "starttime": start, "endtime": start + 1, "status": "OK"}


def test_list_gaps_names_nodes_whose_list_does_not_reach_back_to_the_cursor() -> None:
    """pve1 lists nothing the cursor handled (gap from its newest handled start); pve2's list
    overlaps the cursor; pve3 is unknown to the cursor; pve4 lists only a running task."""
    handled = [_finished("pve1", 1, 100), _finished("pve1", 2, 150), _finished("pve2", 3, 100),
               _finished("pve4", 4, 100)]
    cursor = Cursor()
    for t in read_tasks(handled):
        cursor.add(t)
    running = {**_finished("pve4", 9, 300), "endtime": None, "status": None}
    listing = [_finished("pve1", 5, 200), handled[2], _finished("pve2", 6, 200), _finished("pve3", 7, 200), running]
    assert list_gaps(read_tasks(listing), cursor) == {"pve1": 150}
    assert list_gaps(read_tasks(handled), cursor) == {}
    assert list_gaps(read_tasks(listing), Cursor()) == {}


async def test_an_unreadable_task_archive_fails_the_poll_and_keeps_the_cursor(tmp_path: Path) -> None:
    """When the list shows a gap and the archive cannot be read, the poll raises (logged and
    tried again by the poller) and the cursor stays where it was, so the gap is read later."""

    class NoArchive(RecordedLookup):
        async def task_archive(self, node: str, since: int) -> list[object] | None:
            raise ArchiveUnreadable(node)

    outbox = Outbox(tmp_path)
    await poll_once([_finished("pve1", 1, 100)], state_dir=tmp_path, outbox=outbox, lookup=NoArchive(),
                    cluster=None, now=200, retention_s=86400)
    before = (tmp_path / CURSOR_FILE).read_bytes()
    with pytest.raises(ValueError, match="pve1"):
        await poll_once([_finished("pve1", 2, 300)], state_dir=tmp_path, outbox=outbox, lookup=NoArchive(),
                        cluster=None, now=400, retention_s=86400)
    assert (tmp_path / CURSOR_FILE).read_bytes() == before


async def test_without_an_archive_source_the_listed_tasks_are_still_posted(tmp_path: Path) -> None:
    """A lookup with no way to read the archive (--lookup none): the gap is logged as an error
    and the tasks listed are handled as usual."""
    outbox = Outbox(tmp_path)
    args: dict[str, Any] = {"state_dir": tmp_path, "outbox": outbox, "lookup": NoLookup(), "cluster": None,
                            "now": 400, "retention_s": 86400}
    await poll_once([_finished("pve1", 1, 100)], **args)
    await poll_once([_finished("pve1", 2, 300)], **args)
    assert len(Cursor.from_json((tmp_path / CURSOR_FILE).read_bytes()).seen) == 2


@pytest.mark.parametrize("data", [b"", b"[]", b'{"seen": []}', b'{"seen": {"u": "x"}}', b"{}",
                                  b'{"seen": {}, "running": []}', b'{"seen": {}, "running": {"u": "x"}}'])
def test_unreadable_cursor_is_an_error_not_a_fresh_start(data: bytes) -> None:
    """A damaged cursor raises ValueError rather than silently re-posting the whole list."""
    with pytest.raises(ValueError):
        Cursor.from_json(data)


# ---------------------------------------------------------------- lookups → record fields


def test_snapshot_task_is_matched_by_snaptime_inside_the_task() -> None:
    """A qmsnapshot gets the one snapshot whose snaptime lies between its start and end."""
    fields = snapshot_fields(task("qmsnapshot", "101"), SNAPSHOTS, moved=False)
    assert fields == {"snapshot": "pre-patch", "snapshot_created_at": T0 + 1203}


def test_rollback_takes_the_parent_of_current_with_its_snaptime() -> None:
    """A qmrollback gets current.parent when no later task can have moved it."""
    rollback = task("qmrollback", "101")
    assert not parent_may_have_moved(rollback, TASKS)
    assert snapshot_fields(rollback, SNAPSHOTS, moved=False) == {
        "snapshot": "pre-patch", "snapshot_created_at": T0 + 1203}


def test_rollback_followed_by_a_snapshot_task_gets_no_snapshot_name() -> None:
    """A later qmsnapshot (even a running one) moves current.parent, so the name is left out."""
    rollback = task("qmrollback", "101")
    later = {**LISTING[0], "upid": LISTING[0]["upid"].replace(":102:", ":101:"), "id": "101"}
    tasks = read_tasks([*LISTING, later])
    assert parent_may_have_moved(rollback, tasks)
    assert snapshot_fields(rollback, SNAPSHOTS, moved=True) == {}


@pytest.mark.parametrize("snapshots", [None, {"data": 1}, [], [{"name": "current"}]])
def test_missing_or_odd_snapshot_lists_add_nothing(snapshots: object) -> None:
    """A failed lookup or a list without a match leaves the snapshot fields out."""
    assert snapshot_fields(task("qmsnapshot", "101"), snapshots, moved=False) == {}
    assert snapshot_fields(task("qmrollback", "101"), snapshots, moved=False) == {}


def test_two_snapshots_inside_one_task_are_ambiguous() -> None:
    """When two snaptimes fall inside the task, neither is claimed."""
    twin = {**SNAPSHOTS[1], "name": "twin"}
    assert snapshot_fields(task("qmsnapshot", "101"), [*SNAPSHOTS, twin], moved=False) == {}


def test_clone_target_is_read_from_the_recorded_task_log() -> None:
    """The full-clone log names vm-205 disks, so 205 is the new VM."""
    assert clone_target(CLONE_LOG, "101") == 205
    assert clone_target({"data": CLONE_LOG}, "101") == 205


@pytest.mark.parametrize("lines", [
    [], None, [{"t": "create linked clone of drive scsi0 (local-lvm:base-101-disk-0)"}],
    [{"t": "vm-205-disk-0"}, {"t": "vm-206-disk-0"}],
])
def test_clone_target_unknown_when_the_log_does_not_name_one_vm(lines: object) -> None:
    """No other VM's disk, or two of them, means the target is unknown."""
    assert clone_target(lines, "101") is None


def test_restore_source_is_read_from_a_vzdump_archive_name_in_the_task_log() -> None:
    """A restore of a vzdump archive names the backup's VM and its wall-clock time; that
    time is the node's local time with no zone, so it is placed at the earliest instant it
    can name (UTC+14:00): a later guess would narrow the window."""
    assert restore_source(VMA_LOG) == restore_source({"data": VMA_LOG}) == (
        101, VMA_TIME, "vzdump-qemu-101-2026_11_29-09_30_00.vma.zst")


def test_restore_source_is_read_from_a_backup_server_snapshot_in_the_task_log() -> None:
    """A Proxmox Backup Server snapshot is named vm/VMID/TIME with TIME in UTC: exact."""
    assert restore_source(PBS_LOG) == (102, PBS_TIME, "vm/102/2026-11-29T08:00:00Z")


def test_restore_source_names_one_backup_however_often_the_log_prints_it() -> None:
    """The same archive printed with and without its path or extension is one backup."""
    lines = [{"t": "restore vma archive: zstd -q -d -c /mnt/dump/vzdump-qemu-101-2026_11_29-09_30_00.vma.zst"},
             {"t": "reading vzdump-qemu-101-2026_11_29-09_30_00"}]
    assert restore_source(lines) == (101, VMA_TIME, "vzdump-qemu-101-2026_11_29-09_30_00.vma.zst")


async def test_restore_of_a_backup_named_before_1970_is_placed_at_the_epoch() -> None:
    """A name whose earliest reading precedes Unix time becomes time 0 (the widest window the
    service takes), not a record the service refuses as malformed and the relay parks."""
    backup = restore_source([{"t": "vm/101/1969-07-20T20:17:40Z"}])
    assert backup == (101, 0, "vm/101/1969-07-20T20:17:40Z")
    record = await build_record(task("qmrestore", "311"), TASKS, RecordedLookup(), None)
    assert record is not None
    (event,) = parser.parse({**record, "snapshot_created_at": backup.time})
    assert event.snapshot_created_at is not None and event.snapshot_created_at.timestamp() == 0


@pytest.mark.parametrize("lines", [
    None, [], {"data": None}, CLONE_LOG, [{"t": "TASK OK"}],
    [{"t": "restore vma archive: zstd -q -d -c /mnt/dump/vzdump-qemu-101-2026_11_29-09_30_00.vma.zst"},
     {"t": "restore vma archive: zstd -q -d -c /mnt/dump/vzdump-qemu-104-2026_11_29-09_30_00.vma.zst"}],
    [{"t": "vzdump-qemu-101-2026_11_29-09_30_00.vma.zst"}, {"t": "vm/101/2026-11-29T09:00:00Z"}],
    [{"t": "restore vma archive: vzdump-qemu-101-2026_13_29-09_30_00.vma.zst"}],
    [{"t": "restore vma archive: /mnt/dump/backup-of-web.vma.zst"}],
])
def test_restore_source_unknown_when_the_log_names_no_single_backup(lines: object) -> None:
    """No archive name, an impossible date, or two different backups (VM or time): unknown."""
    assert restore_source(lines) is None


@pytest.mark.parametrize(("zone", "expected"), [
    ("UTC", T0 + 1800),  # the recorded node runs UTC
    ("Europe/Vienna", T0 + 1800 - 3600),  # CET in November
    ("America/New_York", T0 + 1800 + 5 * 3600),  # EST: later than the UTC+14:00 reading by 19 h
    ("Pacific/Kiritimati", VMA_TIME),  # UTC+14:00 itself
])
async def test_a_vzdump_archive_name_is_read_in_the_nodes_time_zone(zone: str, expected: int) -> None:
    """With --node-timezone the archive's zone-less wall time is the instant it names there,
    exact, and the restore's record carries it (without it the earliest reading, UTC+14:00,
    opens the window up to 26 hours early and flags honest uses made in between)."""
    backup = restore_source(VMA_LOG, zone=ZoneInfo(zone))
    assert backup == (101, expected, "vzdump-qemu-101-2026_11_29-09_30_00.vma.zst")
    record = await build_record(task("qmrestore", "311"), TASKS, RecordedLookup(), None, ZoneInfo(zone))
    (event,) = parser.parse(record)
    assert event.snapshot_created_at == datetime.fromtimestamp(expected, UTC)
    assert restore_source(PBS_LOG, zone=ZoneInfo(zone)) == (102, PBS_TIME, "vm/102/2026-11-29T08:00:00Z")


@pytest.mark.parametrize(("name", "earliest"), [
    # 02:30 happens twice in Vienna on 2026-10-25 (CEST, then CET): the first is taken.
    ("vzdump-qemu-101-2026_10_25-02_30_00.vma.zst", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
    # 02:30 never happens there on 2026-03-29 (vzdump cannot print it): the earlier reading.
    ("vzdump-qemu-101-2026_03_29-02_30_00.vma.zst", datetime(2026, 3, 29, 0, 30, tzinfo=UTC)),
    ("vzdump-qemu-101-2026_10_25-03_30_00.vma.zst", datetime(2026, 10, 25, 2, 30, tzinfo=UTC)),
])
def test_a_wall_time_the_zone_repeats_or_skips_is_read_as_its_earliest_instant(
    name: str, earliest: datetime
) -> None:
    """Around a daylight-saving change a wall time may name two instants or none: the
    earlier reading is taken, so the window never starts late."""
    backup = restore_source([{"t": f"restore vma archive: zstd -q -d -c /mnt/dump/{name}"}],
                            zone=ZoneInfo("Europe/Vienna"))
    assert backup is not None and backup.time == int(earliest.timestamp())


# ---------------------------------------------------------------- records → the service's parser

EXPECTED = {  # (type, vmid): (event type, vm_id, snapshot, snapshot_created_at, source_vm_id)
    ("qmstart", "101"): (EventType.VM_STARTED, "101", None, None, None),
    ("qmdelsnapshot", "101"): (EventType.SNAPSHOT_DELETED, "101", None, None, None),
    ("qmsnapshot", "101"): (EventType.SNAPSHOT_CREATED, "101", "pre-patch", T0 + 1203, None),
    ("qmrollback", "101"): (EventType.SNAPSHOT_REVERTED, "101", "pre-patch", T0 + 1203, None),
    ("qmclone", "101"): (EventType.VM_CLONED, "205", None, None, "101"),
    ("qmigrate", "205"): (EventType.VM_MIGRATED, "205", None, None, None),
    ("qmshutdown", "102"): (EventType.VM_STOPPED, "102", None, None, None),
    ("qmstop", "205"): (EventType.VM_STOPPED, "205", None, None, None),
    ("qmrestore", "311"): (EventType.VM_CLONED, "311", "vzdump-qemu-101-2026_11_29-09_30_00.vma.zst",
                           VMA_TIME, "101"),
    ("qmrestore", "102"): (EventType.VM_RESTORED, "102", "vm/102/2026-11-29T08:00:00Z", PBS_TIME, None),
}


@pytest.mark.parametrize(("key", "expected"), EXPECTED.items(), ids=[f"{k[0]}-{k[1]}" for k in EXPECTED])
async def test_recorded_task_becomes_a_record_the_service_parses(
    key: tuple[str, str], expected: tuple[Any, ...]
) -> None:
    """Each forwarded recorded task's record parses, via the service's own parser, to the right event."""
    record = await build_record(task(*key), TASKS, RecordedLookup(), None)
    assert record is not None
    (event,) = parser.parse(orjson.loads(orjson.dumps(record)))
    created = None if event.snapshot_created_at is None else int(event.snapshot_created_at.timestamp())
    assert (event.type, event.vm_id, event.snapshot_id, created, event.source_vm_id) == expected
    assert event.event_id == record["upid"] and event.host == task(*key).upid.node


async def test_record_keeps_pve_fields_and_adds_the_cluster() -> None:
    """The record carries PVE's task fields unchanged, and vm ids are scoped by --cluster."""
    source = next(t for t in LISTING if t["upid"] == upid("qmrollback", "101"))
    record = await build_record(task("qmrollback", "101"), TASKS, RecordedLookup(), "prod")
    assert record is not None
    assert {k: record[k] for k in source} == source
    assert parser.parse(record)[0].vm_id == "prod/101"


async def test_only_snapshot_clone_and_restore_tasks_trigger_lookups() -> None:
    """Starts, stops and migrations are posted from the task list alone."""
    lookup = RecordedLookup()
    for key in EXPECTED:
        await build_record(task(*key), TASKS, lookup, None)
    assert sorted(kind for kind, *_ in lookup.calls) == ["log", "log", "log", "snapshots", "snapshots"]


async def test_restore_with_an_unknown_backup_is_posted_as_a_restore_and_logged(
    log_buffer: Any,
) -> None:
    """When the task log cannot be read (or names no backup) the restore is posted as
    vm.restored of the new VM with no state time, the widest window the record can still
    name, and the poller logs that the backup's VM is unknown (its uses are not put at risk
    by this event; a guest presenting that VM's receipt is still flagged clone_detected)."""

    class Blind(RecordedLookup):
        async def task_log(self, node: str, upid_text: str) -> object | None:
            return None

    record = await build_record(task("qmrestore", "311"), TASKS, Blind(), None)
    (event,) = parser.parse(record)
    assert (event.type, event.vm_id, event.snapshot_created_at, event.source_vm_id) == (
        EventType.VM_RESTORED, "311", None, None)
    lines = [orjson.loads(line) for line in log_buffer.getvalue().splitlines()]
    assert [line["upid"] for line in lines if line.get("event") == "proxmox_restore_source_unknown"] == [
        upid("qmrestore", "311")]


async def test_snapshot_whose_snaptime_cannot_be_read_is_placed_at_the_task_start() -> None:
    """With the snapshot list away, the record has no snapshot_created_at and the service
    places the snapshot at the task's start, not its end."""

    class Blind(RecordedLookup):
        async def snapshots(self, node: str, vmid: str, kind: str) -> object | None:
            return None

    snap = task("qmsnapshot", "101")
    (event,) = parser.parse(await build_record(snap, TASKS, Blind(), None))
    assert event.snapshot_created_at is not None
    assert int(event.snapshot_created_at.timestamp()) == snap.upid.starttime


async def test_poll_once_spools_then_advances_the_cursor(tmp_path: Path) -> None:
    """One poll spools the ten forwarded tasks; a second poll of the same list spools none."""
    outbox = Outbox(tmp_path)
    args: dict[str, Any] = {"state_dir": tmp_path, "outbox": outbox, "lookup": RecordedLookup(),
                            "cluster": None, "now": T0 + 4000, "retention_s": 86400}
    assert await poll_once(LISTING, **args) == len(EXPECTED)
    assert await poll_once(LISTING, **args) == 0
    bodies = [orjson.loads(p.read_bytes()) for p in outbox.pending()]
    assert sorted(b["upid"] for b in bodies) == sorted(upid(*k) for k in EXPECTED)


async def test_clone_with_unknown_target_is_not_spooled_until_pve_answers(tmp_path: Path) -> None:
    """A clone whose new VM cannot be found (PVE's task log away) is logged and skipped, not
    parked as malformed, and stays due: the next poll, with PVE answering, spools it (it
    entered the cursor, and its window on the source VM was never opened)."""

    class Blind(RecordedLookup):
        async def task_log(self, node: str, upid_text: str) -> object | None:
            return None

    outbox = Outbox(tmp_path)
    await poll_once(LISTING, state_dir=tmp_path, outbox=outbox, lookup=Blind(), cluster=None,
                    now=T0, retention_s=86400)
    assert upid("qmclone", "101") not in [orjson.loads(p.read_bytes())["upid"] for p in outbox.pending()]
    await poll_once(LISTING, state_dir=tmp_path, outbox=outbox, lookup=RecordedLookup(), cluster=None,
                    now=T0 + 10, retention_s=86400)
    assert upid("qmclone", "101") in [orjson.loads(p.read_bytes())["upid"] for p in outbox.pending()]


# ---------------------------------------------------------------- containers (LXC)

CT_EXPECTED = {  # (type, vmid): (event type, vm_id, snapshot, snapshot_created_at, source_vm_id)
    ("vzdelsnapshot", "120"): (EventType.SNAPSHOT_DELETED, "120", None, None, None),
    ("vzsnapshot", "120"): (EventType.SNAPSHOT_CREATED, "120", "pre-upgrade", T1 + 601, None),
    ("vzstart", "120"): (EventType.VM_STARTED, "120", None, None, None),
    ("vzrollback", "120"): (EventType.SNAPSHOT_REVERTED, "120", "pre-upgrade", T1 + 601, None),
    ("vzclone", "120"): (EventType.VM_CLONED, "121", None, None, "120"),
    ("vzrestore", "122"): (EventType.VM_CLONED, "122", "vzdump-lxc-120-2026_11_29-11_30_00.tar.zst",
                           TAR_TIME, "120"),
    ("vzrestore", "124"): (EventType.VM_RESTORED, "124", "ct/124/2026-11-29T10:00:00Z", CT_PBS_TIME, None),
    ("vzmigrate", "121"): (EventType.VM_MIGRATED, "121", None, None, None),
    ("vzshutdown", "121"): (EventType.VM_STOPPED, "121", None, None, None),
    ("vzstop", "124"): (EventType.VM_STOPPED, "124", None, None, None),
}


@pytest.mark.parametrize(("task_type", "vmid", "forwarded"), [
    *((t, v, True) for t, v in CT_EXPECTED), ("vzcreate", "120", False), ("vzdump", "120", False),
])
def test_which_recorded_container_tasks_are_forwarded(task_type: str, vmid: str, forwarded: bool) -> None:
    """Containers' snapshot, rollback, clone, restore, migration and power tasks are
    forwarded; a container made from a template (vzcreate) and a backup are not."""
    assert ct_task(task_type, vmid).forwarded is forwarded


def test_a_failed_container_rollback_is_not_forwarded() -> None:
    """A vzrollback that ended with an error text did not roll the container back."""
    (failed,) = [t for t in CT_TASKS if t.upid.type == "vzrollback" and not t.succeeded]
    assert failed.finished and not failed.forwarded


@pytest.mark.parametrize(("key", "expected"), CT_EXPECTED.items(), ids=[f"{k[0]}-{k[1]}" for k in CT_EXPECTED])
async def test_recorded_container_task_becomes_the_record_of_its_qemu_counterpart(
    key: tuple[str, str], expected: tuple[Any, ...]
) -> None:
    """Each forwarded container task's record parses to the event its QEMU counterpart
    gives: a rollback reverts to the snapshot the container's own snapshot list names, a
    clone names the new container, a restore into another vmid is a clone of the backup's
    container from the backup's time."""
    record = await build_record(ct_task(*key), CT_TASKS, RecordedLookup(), None)
    assert record is not None
    (event,) = parser.parse(orjson.loads(orjson.dumps(record)))
    created = None if event.snapshot_created_at is None else int(event.snapshot_created_at.timestamp())
    assert (event.type, event.vm_id, event.snapshot_id, created, event.source_vm_id) == expected
    assert event.event_id == record["upid"] and event.extra["task_type"] == key[0]


async def test_container_snapshots_are_read_from_the_containers_snapshot_list() -> None:
    """A container's snapshot and rollback ask for its own list (lxc), not a VM's (qemu):
    the recorded lookup answers 120's list only as a container's."""
    calls: list[tuple[str, str, str]] = []

    class Kinds(RecordedLookup):
        async def snapshots(self, node: str, vmid: str, kind: str) -> object | None:
            calls.append((node, vmid, kind))
            return await super().snapshots(node, vmid, kind)

    for key in (("vzsnapshot", "120"), ("vzrollback", "120")):
        await build_record(ct_task(*key), CT_TASKS, Kinds(), None)
    await build_record(task("qmrollback", "101"), TASKS, Kinds(), None)
    assert calls == [("pve1", "120", "lxc"), ("pve1", "120", "lxc"), ("pve1", "101", "qemu")]


def test_a_container_rollback_followed_by_a_container_task_gets_no_snapshot_name() -> None:
    """A vzsnapshot after a vzrollback may have moved current.parent: not trusted."""
    rollback = ct_task("vzrollback", "120")
    later = {**ct_task("vzsnapshot", "120").raw, "starttime": rollback.upid.starttime + 5,
             "upid": rollback.upid.text.replace(f"{rollback.upid.starttime:08X}:vzrollback",
                                                f"{rollback.upid.starttime + 5:08X}:vzsnapshot")}
    assert parent_may_have_moved(rollback, [*CT_TASKS, *read_tasks([later])])
    assert snapshot_fields(rollback, CT_SNAPSHOTS, moved=True) == {}


@pytest.mark.parametrize(("lines", "target"), [
    (CT_CLONE_LOG, 121),
    ([{"t": "create full clone of mountpoint rootfs (local-lvm:vm-120-disk-0)"},
      {"t": '  Logical volume "vm-121-disk-0" created.'}], 121),  # PVE before the "creating" line
    ([{"t": "create full clone of mountpoint rootfs (local-zfs:subvol-120-disk-0)"},
      {"t": "subvol-121-disk-0"}], 121),
    ([{"t": "creating a clone of container 120 with ID 121"}, {"t": "vm-125-disk-0"}], 121),
    ([{"t": "create linked clone of mount point rootfs (local-zfs:basevol-120-disk-0)"}], None),
    ([{"t": "creating a clone of container 119 with ID 121"}], None),
])
def test_container_clone_target_is_read_from_its_task_log(lines: object, target: int | None) -> None:
    """A vzclone's log names the new container ("creating a clone of container 120 with ID
    121") or prints its volumes (vm-, subvol-); a linked clone on older PVE names neither,
    and a line about another source container is not this clone's."""
    assert clone_target(lines, "120") == target


def test_container_restore_source_is_read_from_its_archive_or_backup_server_snapshot() -> None:
    """A vzrestore's log names a vzdump-lxc archive (node-local time, read at its earliest
    instant) or a Proxmox Backup Server ct/ snapshot (UTC)."""
    assert restore_source(TAR_LOG, "lxc") == (120, TAR_TIME, "vzdump-lxc-120-2026_11_29-11_30_00.tar.zst")
    assert restore_source(CT_PBS_LOG, "lxc") == (124, CT_PBS_TIME, "ct/124/2026-11-29T10:00:00Z")


def test_a_restore_reads_only_backups_of_its_own_kind() -> None:
    """A VM's restore takes no container backup name and a container's no VM backup name."""
    assert restore_source(TAR_LOG) is None and restore_source(CT_PBS_LOG, "qemu") is None
    assert restore_source(VMA_LOG, "lxc") is None and restore_source(PBS_LOG, "lxc") is None


async def test_poll_once_spools_container_tasks_once(tmp_path: Path) -> None:
    """One poll of the container listing spools each forwarded container task; a second
    poll spools none."""
    outbox = Outbox(tmp_path)
    args: dict[str, Any] = {"state_dir": tmp_path, "outbox": outbox, "lookup": RecordedLookup(),
                            "cluster": None, "now": T1 + 4000, "retention_s": 86400}
    assert await poll_once(CT_LISTING, **args) == len(CT_EXPECTED)
    assert await poll_once(CT_LISTING, **args) == 0
    bodies = [orjson.loads(p.read_bytes()) for p in outbox.pending()]
    assert sorted(b["upid"] for b in bodies) == sorted(ct_upid(*k) for k in CT_EXPECTED)


async def test_container_clone_with_unknown_target_waits_for_pve(tmp_path: Path) -> None:
    """A vzclone whose new container cannot be read is not spooled (nor parked as
    malformed) and is spooled by the next poll that reads it."""

    class Blind(RecordedLookup):
        async def task_log(self, node: str, upid_text: str) -> object | None:
            return None

    outbox = Outbox(tmp_path)
    await poll_once(CT_LISTING, state_dir=tmp_path, outbox=outbox, lookup=Blind(), cluster=None,
                    now=T1, retention_s=86400)
    assert ct_upid("vzclone", "120") not in [orjson.loads(p.read_bytes())["upid"] for p in outbox.pending()]
    await poll_once(CT_LISTING, state_dir=tmp_path, outbox=outbox, lookup=RecordedLookup(), cluster=None,
                    now=T1 + 10, retention_s=86400)
    assert ct_upid("vzclone", "120") in [orjson.loads(p.read_bytes())["upid"] for p in outbox.pending()]


def _linked_clone() -> dict[str, Any]:
    """A vzclone of container template 130 (the recorded vzclone's fields, another vmid)."""
    (clone,) = [t for t in CT_LISTING if t["type"] == "vzclone"]
    return {**clone, "upid": clone["upid"].replace(":vzclone:120:", ":vzclone:130:"), "id": "130"}


class LinkedLookup(RecordedLookup):
    """PVE before March 2026: a linked container clone's log names only its template's volume."""

    async def task_log(self, node: str, upid_text: str) -> object | None:
        return LINKED_LOG if ":vzclone:130:" in upid_text else await super().task_log(node, upid_text)


def _json_lines(buffer: Any) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


async def test_a_clone_whose_log_names_no_new_guest_is_set_aside_once(tmp_path: Path, log_buffer: Any) -> None:
    """A linked clone of a container template on an older PVE prints only the template's
    volume, so its new container cannot be known: its record (without target_vmid, which
    the service requires) is set aside in dead/, its UPID enters the cursor, and one error
    line says how to finish it; the next poll neither asks nor logs again. (It stayed due:
    every poll read its log and warned, forever, and once PVE stopped listing it, it was
    gone without a word.)"""
    outbox, clone = Outbox(tmp_path), _linked_clone()
    args: dict[str, Any] = {"state_dir": tmp_path, "outbox": outbox, "lookup": LinkedLookup(),
                            "cluster": None, "now": T1 + 4000, "retention_s": 86400}
    assert await poll_once([*CT_LISTING, clone], **args) == len(CT_EXPECTED)
    (letter,) = outbox.dead_letters()
    record = orjson.loads(letter.read_bytes())
    assert record["upid"] == clone["upid"] and "target_vmid" not in record
    assert clone["upid"] in Cursor.from_json((tmp_path / CURSOR_FILE).read_bytes())
    (line,) = [e for e in _json_lines(log_buffer) if e.get("event") == "proxmox_clone_target_unknown"]
    assert line["level"] == "error" and line["upid"] == clone["upid"] and line["source_vmid"] == "130"
    assert line["set_aside"] == f"dead/{letter.name}" and "target_vmid" in line["hint"]
    assert await poll_once([*CT_LISTING, clone], **args) == 0
    assert len(outbox.dead_letters()) == 1
    assert [e.get("event") for e in _json_lines(log_buffer)].count("proxmox_clone_target_unknown") == 1


async def test_without_lookups_a_clone_is_set_aside_at_once(tmp_path: Path) -> None:
    """With --lookup none no task log will ever be read: the clone is set aside by the first
    poll instead of being skipped at every poll."""
    outbox = Outbox(tmp_path)
    await poll_once(LISTING, state_dir=tmp_path, outbox=outbox, lookup=NoLookup(), cluster=None,
                    now=T0 + 4000, retention_s=86400)
    assert [orjson.loads(p.read_bytes())["upid"] for p in outbox.dead_letters()] == [upid("qmclone", "101")]
    assert upid("qmclone", "101") in Cursor.from_json((tmp_path / CURSOR_FILE).read_bytes())


async def test_a_clone_whose_log_stays_unreadable_is_set_aside_after_a_day(tmp_path: Path) -> None:
    """A clone whose task log PVE does not answer is asked for again at each poll, but not
    for ever: a day after it ended its record is set aside and the cursor moves on."""

    class Blind(RecordedLookup):
        async def task_log(self, node: str, upid_text: str) -> object | None:
            return None

    outbox, clone = Outbox(tmp_path), task("qmclone", "101")
    args: dict[str, Any] = {"state_dir": tmp_path, "outbox": outbox, "lookup": Blind(), "cluster": None,
                            "retention_s": 7 * 86400}
    await poll_once(LISTING, now=clone.raw["endtime"] + CLONE_LOG_PATIENCE_S - 1, **args)
    assert not outbox.dead_letters()
    assert clone.upid.text not in Cursor.from_json((tmp_path / CURSOR_FILE).read_bytes())
    await poll_once(LISTING, now=clone.raw["endtime"] + CLONE_LOG_PATIENCE_S, **args)
    assert [orjson.loads(p.read_bytes())["upid"] for p in outbox.dead_letters()] == [clone.upid.text]
    assert clone.upid.text in Cursor.from_json((tmp_path / CURSOR_FILE).read_bytes())


async def test_a_clone_waiting_for_its_log_that_leaves_the_list_is_read_from_the_archive(tmp_path: Path) -> None:
    """A clone whose task log could not be read is remembered as not handled: when newer
    tasks push it off /cluster/tasks before PVE answers, its node's archive is read and it
    is posted. (It was forgotten: neither in the cursor nor remembered, never posted.)"""
    clone = next(t for t in CT_LISTING if t["type"] == "vzclone")

    class Archive(RecordedLookup):
        def __init__(self) -> None:
            super().__init__()
            self.answering = False

        async def task_log(self, node: str, upid_text: str) -> object | None:
            return await super().task_log(node, upid_text) if self.answering else None

        async def task_archive(self, node: str, since: int) -> list[object] | None:
            return [t for t in CT_LISTING if t["node"] == node and t["starttime"] >= since]

    lookup, outbox = Archive(), Outbox(tmp_path)
    args: dict[str, Any] = {"state_dir": tmp_path, "outbox": outbox, "lookup": lookup, "cluster": None,
                            "retention_s": 86400}
    await poll_once(CT_LISTING, now=T1 + 4000, **args)
    lookup.answering = True
    later = [_finished("pve1", 40 + n, T1 + 5000 + n) for n in range(3)]
    await poll_once([t for t in CT_LISTING if t["upid"] != clone["upid"]] + later, now=T1 + 6000, **args)
    spooled = {orjson.loads(p.read_bytes())["upid"]: orjson.loads(p.read_bytes()) for p in outbox.pending()}
    assert spooled[clone["upid"]]["target_vmid"] == 121


# ---------------------------------------------------------------- configuration


def test_config_needs_an_api_or_stdin(tmp_path: Path) -> None:
    """Without --api-url/--api-token-file the poller only runs with --from-stdin."""
    env = {"REPLAYGUARD_RELAY_TOKEN": "t"}
    base = ["--service-url", "http://127.0.0.1:1", "--spool-dir", str(tmp_path)]
    with pytest.raises(ConfigError):
        load_config(base, env)
    config, from_stdin = load_config([*base, "--from-stdin", "--lookup", "none"], env)
    assert from_stdin and config.once and config.lookup == "none"


def test_config_reads_the_api_token_file_and_hides_it(tmp_path: Path) -> None:
    """The PVE token comes from its file, and the config's repr never shows it."""
    token = tmp_path / "pve.token"
    token.write_text("replayguard@pve!poller=9f3c2f44-1c7e-4c0b-9a55-3b1e1f0c6a11\n")
    config, _ = load_config(["--service-url", "http://127.0.0.1:1", "--spool-dir", str(tmp_path),
                             "--api-url", "https://pve1:8006", "--api-token-file", str(token)],
                            {"REPLAYGUARD_RELAY_TOKEN": "t"})
    assert config.api_token is not None and config.api_token.reveal().startswith("replayguard@pve!")
    assert "9f3c2f44" not in repr(config) and config.lookup == "api"


async def test_a_running_task_of_a_node_that_lists_nothing_waits_for_the_node(tmp_path: Path) -> None:
    """A rollback on pve2 is running when pve2 drops out of /cluster/tasks (offline: its list
    is no longer broadcast, and its archive cannot be read). The poll of pve1's tasks goes
    on, nothing is read for pve2 and the rollback is remembered; once pve2 lists tasks again,
    its archive is read from the rollback's start and the rollback is posted."""
    started = _finished("pve2", 9, 300)
    rollback = {**started, "upid": started["upid"].replace("vncproxy", "qmrollback"), "endtime": None, "status": None}

    class Archive(RecordedLookup):
        def __init__(self) -> None:
            super().__init__()
            self.online = True
            self.tasks: list[dict[str, Any]] = []

        async def task_archive(self, node: str, since: int) -> list[object] | None:
            if node == "pve2" and not self.online:
                raise ArchiveUnreadable(node)
            return [t for t in self.tasks if t["node"] == node and t["starttime"] >= since]

    lookup, outbox = Archive(), Outbox(tmp_path)
    args: dict[str, Any] = {"state_dir": tmp_path, "outbox": outbox, "lookup": lookup, "cluster": None,
                            "retention_s": 86400}
    await poll_once([_finished("pve1", 1, 100), _finished("pve2", 2, 310), rollback], now=400, **args)
    lookup.online = False
    await poll_once([_finished("pve1", 1, 100), _finished("pve1", 3, 500)], now=600, **args)
    assert rollback["upid"] in Cursor.from_json((tmp_path / CURSOR_FILE).read_bytes()).running
    lookup.online = True
    lookup.tasks = [{**rollback, "endtime": 700, "status": "OK"}, _finished("pve2", 2, 310)]
    later = [_finished("pve2", 10 + n, 800 + n) for n in range(3)]
    await poll_once([_finished("pve1", 3, 500), *later], now=900, **args)
    spooled = [orjson.loads(p.read_bytes())["upid"] for p in outbox.pending()]
    assert rollback["upid"] in spooled


@pytest.mark.parametrize("env", [{}, {"REPLAYGUARD_RELAY_NODE_TIMEZONE": "Europe/Vienna"}])
def test_config_reads_the_node_time_zone(tmp_path: Path, env: dict[str, str]) -> None:
    """--node-timezone (or REPLAYGUARD_RELAY_NODE_TIMEZONE) is an IANA zone; unset, it is unknown."""
    base = ["--service-url", "http://127.0.0.1:1", "--spool-dir", str(tmp_path), "--from-stdin"]
    flag = [] if env else ["--node-timezone", "Europe/Vienna"]
    config, _ = load_config([*base, *flag], {"REPLAYGUARD_RELAY_TOKEN": "t", **env})
    assert config.node_timezone == ZoneInfo("Europe/Vienna")
    config, _ = load_config(base, {"REPLAYGUARD_RELAY_TOKEN": "t"})
    assert config.node_timezone is None


@pytest.mark.parametrize("zone", ["Mars/Olympus", "CEST", "+01:00", "localtime", "../../etc/passwd", "/etc/localtime",
                                  "zone.tab", ""])
def test_config_refuses_a_node_time_zone_that_is_not_one(tmp_path: Path, zone: str) -> None:
    """A name that is no IANA zone this host knows (an abbreviation, an offset, a path, this
    host's own "localtime") stops the start with one line naming the flag, not a guess."""
    base = ["--service-url", "http://127.0.0.1:1", "--spool-dir", str(tmp_path), "--from-stdin"]
    with pytest.raises(ConfigError) as caught:
        load_config([*base, "--node-timezone", zone], {"REPLAYGUARD_RELAY_TOKEN": "t"})
    assert caught.value.message.startswith("--node-timezone") and "IANA" in caught.value.message
