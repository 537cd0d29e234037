"""Native hypervisor parsers: sample payloads, malformed fields, and arbitrary input."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core.events import EventType, GenericEvent, IgnoredPayload, MalformedPayload
from replayguard.hypervisors import PARSERS, _common, libvirt, openstack, proxmox, vsphere

DATA = Path(__file__).resolve().parent.parent / "data" / "hypervisors"
SOURCES = ("libvirt", "vsphere", "proxmox", "openstack")


def _load() -> dict[str, dict[str, Any]]:
    """Every sample file, keyed by 'source/file.json', read once."""
    return {
        f"{source}/{path.name}": json.loads(path.read_text(encoding="utf-8"))
        for source in SOURCES
        for path in sorted((DATA / source).glob("*.json"))
    }


SAMPLES = _load()


def utc(text: str) -> datetime:
    """An aware UTC datetime from an ISO string written without offset."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Expected:
    """The parts of a parsed event that a sample pins down."""

    type: EventType
    vm_id: str
    occurred_at: datetime | None
    snapshot_id: str | None = None
    snapshot_created_at: datetime | None = None
    host: str | None = None
    source_vm_id: str | None = None


R, C, D = EventType.SNAPSHOT_REVERTED, EventType.SNAPSHOT_CREATED, EventType.SNAPSHOT_DELETED
T0 = utc("2026-11-29T10:00:00")  # when the 'pre-patch' snapshot was taken
NOVA_VM = "178b0921-8f85-4257-88b6-2e743b5a975c"
NOVA_IMAGE = "d2aae36f-785c-4518-8016-bc9534d9fc7f"

ACCEPTED: dict[str, Expected] = {
    "libvirt/revert_started_from_snapshot.json":
        Expected(R, "web-01", utc("2026-11-29T10:05:00"), "pre-patch", T0, "hv-03"),
    "libvirt/revert_paused_suspended_from_snapshot.json":
        Expected(R, "web-01", utc("2026-11-29T10:05:00"), "pre-patch", T0, "hv-03"),
    "libvirt/revert_resumed_from_snapshot.json":
        Expected(R, "web-01", utc("2026-11-29T10:05:00"), "pre-patch", T0, "hv-03"),
    "libvirt/revert_defined_from_snapshot.json":
        Expected(R, "web-01", utc("2026-11-29T09:05:00.250"), "pre-patch", T0, "hv-03"),
    "libvirt/revert_stopped_from_snapshot.json":
        Expected(R, "web-01", utc("2026-11-29T10:05:00"), "pre-patch", T0, "hv-03"),
    "libvirt/silent_revert.json":
        Expected(R, "web-01", utc("2026-11-29T10:05:00"), "pre-patch", T0, "hv-03"),
    "libvirt/restored_from_state_file.json":
        Expected(EventType.VM_RESTORED, "web-01", utc("2026-11-29T10:05:00"), host="hv-03"),
    "libvirt/migrated_incoming.json":
        Expected(EventType.VM_MIGRATED, "web-01", utc("2026-11-29T10:05:00"), host="hv-03"),
    "libvirt/booted.json":
        Expected(EventType.VM_STARTED, "web-01", utc("2026-11-29T10:05:00"), host="hv-03"),
    "libvirt/destroyed.json":
        Expected(EventType.VM_STOPPED, "web-01", utc("2026-11-29T10:05:00"), host="hv-03"),
    "libvirt/snapshot_created.json":
        Expected(C, "web-01", utc("2026-11-29T10:00:02"), "pre-patch", T0, "hv-03"),
    "libvirt/snapshot_deleted.json":
        Expected(D, "web-01", utc("2026-11-29T11:00:00"), "pre-patch", T0, "hv-03"),
    "vsphere/revert_router_eventex.json":
        Expected(R, "web-01", utc("2026-11-29T10:05:00.052003"), "pre-patch", None,
                 "esx-01.lab.example"),
    "vsphere/revert_knative_type.json":
        Expected(R, "web-01", utc("2026-11-29T10:05:00.052003"), "pre-patch", None,
                 "esx-01.lab.example"),
    "vsphere/cloned.json":
        Expected(EventType.VM_CLONED, "web-01-clone", utc("2026-11-29T10:07:41.113"),
                 host="esx-01.lab.example", source_vm_id="web-01"),
    "vsphere/drs_migrated.json":
        Expected(EventType.VM_MIGRATED, "web-01", utc("2026-11-29T10:09:12.5"),
                 host="esx-02.lab.example"),
    "vsphere/task_create_snapshot.json":
        Expected(C, "web-01", utc("2026-11-29T09:59:58.731"), None,
                 utc("2026-11-29T09:59:58.731"), "esx-01.lab.example"),
    "vsphere/powered_on.json":
        Expected(EventType.VM_STARTED, "web-01", utc("2026-11-29T10:05:03.063"),
                 host="esx-01.lab.example"),
    "vsphere/powered_off_envelope_time.json":
        Expected(EventType.VM_STOPPED, "web-01", utc("2026-11-29T11:00:00.5"),
                 host="esx-01.lab.example"),
    "proxmox/qmrollback.json":
        Expected(R, "101", utc("2026-11-29T10:05:00"), "pre-patch", T0, "pve1"),
    "proxmox/qmsnapshot.json":
        Expected(C, "101", utc("2026-11-29T10:00:10"), "pre-patch", T0, "pve1"),
    "proxmox/qmdelsnapshot.json":
        Expected(D, "101", utc("2026-11-29T11:00:10"), "pre-patch", None, "pve1"),
    "proxmox/qmclone.json":
        Expected(EventType.VM_CLONED, "205", utc("2026-11-29T10:13:20"), host="pve1",
                 source_vm_id="101"),
    "proxmox/qmigrate_with_warnings.json":
        Expected(EventType.VM_MIGRATED, "101", utc("2026-11-29T10:21:40"), host="pve1"),
    "proxmox/qmrestore_cluster.json":
        Expected(EventType.VM_RESTORED, "prod-eu/310", utc("2026-11-29T10:31:40"), None,
                 utc("2026-11-28T02:00:00"), "pve2"),
    "proxmox/qmrestore_into_new_vmid.json":
        Expected(EventType.VM_CLONED, "311", utc("2026-11-29T10:28:10"),
                 "vzdump-qemu-101-2026_11_29-09_30_00.vma.zst", utc("2026-11-29T09:30:00"),
                 "pve1", "101"),
    "proxmox/qmrestore_same_vmid.json":
        Expected(EventType.VM_RESTORED, "101", utc("2026-11-29T10:28:10"),
                 "vm/101/2026-11-29T09:30:00Z", utc("2026-11-29T09:30:00"), "pve1"),
    "proxmox/qmsnapshot_without_time.json":
        Expected(C, "101", utc("2026-11-29T10:00:10"), "pre-patch", utc("2026-11-29T09:59:20"), "pve1"),
    "proxmox/qmstart.json":
        Expected(EventType.VM_STARTED, "101", utc("2026-11-29T10:05:40"), host="pve1"),
    "proxmox/qmshutdown.json":
        Expected(EventType.VM_STOPPED, "101", utc("2026-11-29T11:16:40"), host="pve1"),
    "proxmox/vzsnapshot.json":
        Expected(C, "120", utc("2026-11-29T12:10:04"), "pre-upgrade", utc("2026-11-29T12:10:01"), "pve1"),
    "proxmox/vzsnapshot_without_time.json":
        Expected(C, "120", utc("2026-11-29T12:10:04"), "pre-upgrade", utc("2026-11-29T12:10:00"), "pve1"),
    "proxmox/vzrollback.json":
        Expected(R, "120", utc("2026-11-29T12:20:09"), "pre-upgrade", utc("2026-11-29T12:10:01"), "pve1"),
    "proxmox/vzdelsnapshot.json":
        Expected(D, "120", utc("2026-11-29T12:30:03"), "pre-upgrade", None, "pve1"),
    "proxmox/vzclone.json":
        Expected(EventType.VM_CLONED, "121", utc("2026-11-29T12:41:00"), host="pve1",
                 source_vm_id="120"),
    "proxmox/vzrestore_into_new_vmid.json":
        Expected(EventType.VM_CLONED, "122", utc("2026-11-29T12:51:15"),
                 "vzdump-lxc-120-2026_11_29-11_30_00.tar.zst", utc("2026-11-28T21:30:00"),
                 "pve1", "120"),
    "proxmox/vzmigrate.json":
        Expected(EventType.VM_MIGRATED, "121", utc("2026-11-29T13:00:40"), host="pve1"),
    "openstack/snapshot_start.json":
        Expected(C, NOVA_VM, utc("2026-11-29T10:00:00.018311"), NOVA_IMAGE,
                 utc("2026-11-29T10:00:00.018311"), "compute-07"),
    "openstack/rebuild_end.json":
        Expected(EventType.VM_RESTORED, NOVA_VM, utc("2026-11-29T10:05:00"), NOVA_IMAGE,
                 None, "compute-07"),
    "openstack/live_migration_post_end.json":
        Expected(EventType.VM_MIGRATED, NOVA_VM, utc("2026-11-29T10:20:06.912"),
                 host="compute-07"),
    "openstack/live_migration_post_dest_end.json":
        Expected(EventType.VM_MIGRATED, NOVA_VM, utc("2026-11-29T10:20:07.551002"),
                 host="compute-09"),
    "openstack/power_on_end.json":
        Expected(EventType.VM_STARTED, NOVA_VM, utc("2026-11-29T10:30:00.5"), host="compute-07"),
    "openstack/power_off_end.json":
        Expected(EventType.VM_STOPPED, NOVA_VM, utc("2026-11-29T10:25:00.000001"),
                 host="compute-07"),
    "openstack/power_off_end_messagingv2_wire.json":
        Expected(EventType.VM_STOPPED, NOVA_VM, utc("2026-11-29T10:40:00"), host="compute-07"),
}

IGNORED = [
    "libvirt/undefined_ignored.json",
    "vsphere/task_reconfigure_ignored.json",
    "vsphere/user_login_ignored.json",
    "proxmox/qmrollback_failed_ignored.json",
    "proxmox/vzdump_ignored.json",
    "proxmox/vzcreate_ignored.json",
    "openstack/snapshot_end_ignored.json",
    "openstack/reboot_error_ignored.json",
]

MALFORMED: dict[str, str] = {
    "libvirt/malformed_domain_name_control_char.json": "domain.name",
    "libvirt/malformed_snapshot_time_string.json": "snapshot.creation_time",
    "vsphere/malformed_clone_without_source.json": "data.SourceVm",
    "vsphere/malformed_created_time.json": "data.CreatedTime",
    "proxmox/malformed_upid_short_pid.json": "upid",
    "proxmox/malformed_clone_without_target.json": "target_vmid",
    "openstack/malformed_snapshot_without_image.json":
        'payload["nova_object.data"].snapshot_image_id',
    "openstack/malformed_timestamp.json": "timestamp",
}


def parse_sample(name: str) -> list[GenericEvent]:
    """Run the parser of the sample's source on a fresh copy of it."""
    return PARSERS[name.split("/")[0]](copy.deepcopy(SAMPLES[name]))


def sample(name: str, **changes: Any) -> dict[str, Any]:
    """A copy of a sample with top-level fields replaced (None deletes)."""
    body = copy.deepcopy(SAMPLES[name])
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


# --- the sample table ----------------------------------------------------------------


def test_every_sample_is_in_exactly_one_table() -> None:
    """Each sample file has an expectation, so a new file cannot go untested."""
    listed = [*ACCEPTED, *IGNORED, *MALFORMED]
    assert sorted(listed) == sorted(SAMPLES)
    for source in SOURCES:
        names = [n for n in SAMPLES if n.startswith(source + "/")]
        assert len(names) >= 4 and any(n in IGNORED for n in names)
        assert any(n in MALFORMED for n in names)


def test_registry_names_the_four_sources() -> None:
    """The HTTP layer finds every native parser by its source name."""
    assert {
        "libvirt": libvirt.parse, "vsphere": vsphere.parse,
        "proxmox": proxmox.parse, "openstack": openstack.parse,
    } == PARSERS


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_sample_parses_to_expected_event(name: str) -> None:
    """A relevant sample gives one event with the expected type, VM, snapshot and times."""
    events = parse_sample(name)
    assert len(events) == 1
    event, want = events[0], ACCEPTED[name]
    got = Expected(event.type, event.vm_id, event.occurred_at, event.snapshot_id,
                   event.snapshot_created_at, event.host, event.source_vm_id)
    assert got == want
    assert event.event_id
    assert_well_formed(events)


@pytest.mark.parametrize("name", IGNORED)
def test_irrelevant_sample_is_ignored(name: str) -> None:
    """A well-formed sample that carries nothing to act on raises IgnoredPayload."""
    with pytest.raises(IgnoredPayload) as info:
        parse_sample(name)
    assert info.value.reason


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_sample_names_the_field(name: str) -> None:
    """A broken sample raises MalformedPayload naming the field at fault."""
    with pytest.raises(MalformedPayload) as info:
        parse_sample(name)
    assert info.value.field == MALFORMED[name]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("payload", [None, [], "x", 3, 1.5, True])
def test_non_object_payload_is_malformed_at_root(source: str, payload: object) -> None:
    """A payload that is not a JSON object is rejected as a whole."""
    with pytest.raises(MalformedPayload) as info:
        PARSERS[source](payload)
    assert info.value.field == _common.ROOT


# --- shared helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2026-11-29T10:05:00Z", utc("2026-11-29T10:05:00")),
        ("2026-11-29t10:05:00z", utc("2026-11-29T10:05:00")),
        ("2026-11-29 10:05:00+02:00", utc("2026-11-29T08:05:00")),
        ("2026-11-29T10:05:00.123456789-01:30", utc("2026-11-29T11:35:00.123456")),
        ("1970-01-01T00:00:00Z", utc("1970-01-01T00:00:00")),
    ],
)
def test_rfc3339_times_become_aware_utc(text: str, want: datetime) -> None:
    """RFC 3339 timestamps with any offset come out as the same instant in UTC."""
    got = _common.rfc3339_time(text, "t")
    assert got == want and got.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    ["2026-11-29", "2026-11-29T10:05:00", "20261129T100500Z", "2026-13-01T00:00:00Z",
     "2026-11-29T24:00:00Z", "2026-11-29T10:05:00+2:00", "1969-12-31T23:59:59Z",
     "0001-01-01T00:00:00+01:00", "2026-11-29T10:05:00Z ", "٢٠٢٦-11-29T10:05:00Z",
     "2026-11-29T10:05:00." + "1" * 60 + "Z"],
)
def test_non_rfc3339_times_are_malformed(text: str) -> None:
    """Dates, naive times, basic format and out-of-range values are refused."""
    with pytest.raises(MalformedPayload) as info:
        _common.rfc3339_time(text, "t")
    assert info.value.field == "t"


def test_naive_time_is_utc_only_when_asked() -> None:
    """A timestamp without offset is read as UTC only for senders documented to do so."""
    assert _common.rfc3339_time("2026-11-29 10:05:00.5", "t", assume_utc=True) == utc(
        "2026-11-29T10:05:00.5")
    with pytest.raises(MalformedPayload):
        _common.rfc3339_time("2026-11-29 10:05:00.5", "t")


HUGE = pytest.param(10**5000, id="huge")  # str() of it raises, so it gets an explicit id


@pytest.mark.parametrize("value", [-1, 253402300800, HUGE, True, 1.5, "1795946400", None])
def test_unix_time_rejects_non_integers_and_out_of_range(value: object) -> None:
    """Unix seconds must be a JSON integer between 1970 and year 9999."""
    with pytest.raises(MalformedPayload):
        _common.unix_time(value, "t")


def test_unix_time_bounds_are_accepted() -> None:
    """The first and last representable seconds both parse."""
    assert _common.unix_time(0, "t") == utc("1970-01-01T00:00:00")
    assert _common.unix_time(253402300799, "t") == utc("9999-12-31T23:59:59")


@pytest.mark.parametrize("value", ["", "x" * 257, "a\nb", "tab\there", "del\x7f", "\u200b", 7, ".", ".."])
def test_bad_identifiers_are_malformed(value: object) -> None:
    """Identifiers must be 1-256 printable characters, and not a dot segment no URL can name."""
    with pytest.raises(MalformedPayload):
        _common.check_identifier(value, "id")


def test_identifier_limits_are_inclusive() -> None:
    """One and 256 printable characters, spaces and non-ASCII included, are accepted."""
    for value in ("a", "x" * 256, "web 01", "sérveur-ü"):
        assert _common.check_identifier(value, "id") == value


@pytest.mark.parametrize("name", ["pre\u00a0patch", "x" * 257, "", ".", "..", "sha256:pre-patch"])
def test_a_name_that_is_not_an_identifier_becomes_its_sha256(name: str) -> None:
    """A snapshot name is only a hint: one that is not an identifier (or that looks like a
    derived one) becomes ``sha256:`` and the hex digest of its UTF-8 bytes, an identifier."""
    want = "sha256:" + hashlib.sha256(name.encode("utf-8")).hexdigest()
    assert _common.name_identifier(name, "n") == want
    assert _common.check_identifier(want, "n") == want


def test_a_name_that_is_an_identifier_is_kept_and_a_non_string_is_malformed() -> None:
    """A usual snapshot name is its own identifier; a name that is not a string is a broken sender."""
    assert _common.name_identifier("pre-patch", "n") == "pre-patch"
    with pytest.raises(MalformedPayload) as info:
        _common.name_identifier(["pre-patch"], "n")
    assert info.value.field == "n"


@pytest.mark.parametrize(
    ("path", "key", "want"),
    [("$", "domain", "domain"), ("domain", "name", "domain.name"),
     ("payload", "nova_object.data", 'payload["nova_object.data"]'),
     ("$", "oslo.message", '["oslo.message"]')],
)
def test_field_paths_quote_dotted_keys(path: str, key: str, want: str) -> None:
    """Paths stay unambiguous when a key itself contains a dot."""
    assert _common.child(path, key) == want


# --- libvirt -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "detail", "want"),
    [
        (0, 3, R), (2, 0, EventType.VM_STARTED), (2, 1, EventType.VM_MIGRATED),
        (2, 2, EventType.VM_RESTORED), (2, 3, R), (3, 4, EventType.VM_RESTORED), (3, 5, R),
        (4, 1, EventType.VM_MIGRATED), (4, 2, R), (5, 0, EventType.VM_STOPPED),
        (5, 3, EventType.VM_STOPPED), (5, 4, EventType.VM_STOPPED),
        (0, 0, None), (0, 1, None), (2, 4, None), (3, 0, None), (4, 0, None), (4, 3, None),
        (5, 6, R), (6, 0, None), (7, 0, None), (8, 0, None), (200, 0, None),
    ],
)
def test_libvirt_lifecycle_table(event: int, detail: int, want: EventType | None) -> None:
    """Each libvirt (event, detail) pair maps to its generic type or is ignored."""
    body = sample("libvirt/booted.json", event=event, detail=detail)
    if want is None:
        with pytest.raises(IgnoredPayload):
            libvirt.parse(body)
    else:
        assert libvirt.parse(body)[0].type is want


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event": 256}, "event"), ({"event": True}, "event"), ({"detail": -1}, "detail"),
        ({"detail": None}, "detail"), ({"source": "qemu"}, "source"),
        ({"kind": "revert"}, "kind"), ({"kind": ["lifecycle"]}, "kind"),
        ({"domain": {"name": "web-01", "uuid": "not-a-uuid"}}, "domain.uuid"),
        ({"domain": "web-01"}, "domain"), ({"occurred_at": 1795946700}, "occurred_at"),
        ({"snapshot": {"name": 7, "creation_time": 0}}, "snapshot.name"),
        ({"snapshot": {"creation_time": 0}}, "snapshot.name"),
        ({"host": None}, "host"), ({"uri": "u" * 300}, "uri"), ({"event_id": None}, "event_id"),
    ],
)
def test_libvirt_malformed_fields(changes: dict[str, Any], field: str) -> None:
    """A broken relay field is reported by its path."""
    with pytest.raises(MalformedPayload) as info:
        libvirt.parse(sample("libvirt/revert_started_from_snapshot.json", **changes))
    assert info.value.field == field


def test_libvirt_ignored_event_is_still_validated() -> None:
    """A relay that sends a broken body is noticed even for an event that is skipped."""
    body = sample("libvirt/undefined_ignored.json", domain={"name": "x"})
    with pytest.raises(MalformedPayload):
        libvirt.parse(body)


@pytest.mark.parametrize("name", ["revert_started_from_snapshot", "revert_stopped_from_snapshot",
                                  "snapshot_created", "silent_revert"])
def test_libvirt_odd_snapshot_name_is_hashed_the_same_in_every_kind(name: str) -> None:
    """A snapshot name with a no-break space or over 256 characters is not refused: every
    kind gives the same ``sha256:`` identifier, so a revert still finds the creation."""
    odd = "release 4.2\u00a0" + "x" * 300
    body = sample(f"libvirt/{name}.json")
    body["snapshot"]["name"] = odd
    event = libvirt.parse(body)[0]
    assert event.snapshot_id == "sha256:" + hashlib.sha256(odd.encode("utf-8")).hexdigest()
    assert event.snapshot_created_at == T0


def test_libvirt_creation_of_unread_time_has_no_time() -> None:
    """A snapshot_created whose creation_time is null carries the relay's poll time as
    occurred_at; the event keeps neither, so the creation time stays unknown."""
    body = sample("libvirt/snapshot_created.json")
    body["snapshot"]["creation_time"] = None
    event = libvirt.parse(body)[0]
    assert (event.type, event.occurred_at, event.snapshot_created_at) == (C, None, None)


def test_libvirt_snapshot_kinds_require_the_snapshot() -> None:
    """A snapshot observation without its snapshot cannot be placed in time."""
    for name in ("snapshot_created", "snapshot_deleted", "silent_revert"):
        body = sample(f"libvirt/{name}.json", snapshot=None)
        with pytest.raises(MalformedPayload) as info:
            libvirt.parse(body)
        assert info.value.field == "snapshot"


def test_libvirt_keeps_uuid_and_uri_in_extra() -> None:
    """The domain UUID and the connection URI travel with the event for the analyst."""
    event = parse_sample("libvirt/revert_started_from_snapshot.json")[0]
    assert event.extra == {"domain_uuid": "4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
                           "uri": "qemu:///system"}
    assert event.event_id == "hv-03:8f1c2a01"


def test_libvirt_current_snapshot_is_not_attached_to_a_boot() -> None:
    """Only snapshot events carry the snapshot; a boot is not a revert to it."""
    event = parse_sample("libvirt/booted.json")[0]
    assert event.snapshot_id is None and event.snapshot_created_at is None


# --- vSphere -------------------------------------------------------------------------


def test_vsphere_eventex_class_comes_from_event_type_id() -> None:
    """An envelope naming the generic EventEx class is resolved through data.EventTypeId."""
    body = sample("vsphere/revert_knative_type.json", type="com.vmware.vsphere.EventEx.v0")
    assert vsphere.parse(body)[0].type is R


def test_vsphere_bare_class_type_is_accepted() -> None:
    """A CloudEvent whose type is the vCenter event id itself is understood."""
    body = sample("vsphere/revert_knative_type.json", type=vsphere.REVERTED)
    assert vsphere.parse(body)[0].snapshot_id == "pre-patch"


def test_vsphere_revert_without_readable_snapshot_keeps_window_open() -> None:
    """A revert message that does not name the snapshot leaves snapshot_id unknown."""
    body = sample("vsphere/revert_router_eventex.json")
    body["data"]["FullFormattedMessage"] = "web-01 was reverted"
    event = vsphere.parse(body)[0]
    assert event.type is R and event.snapshot_id is None


@pytest.mark.parametrize("message", [None, 7, "x" * 4097, "web-01 reverted to the state of snapshot a, with ID "
                                     + "9" * 300])
def test_vsphere_revert_with_an_unreadable_message_is_kept(message: object) -> None:
    """The message only hints at the snapshot: one that is not a string or is too long to
    read leaves the snapshot unknown (and an ID too long to be one is left out)."""
    body = sample("vsphere/revert_router_eventex.json")
    body["data"]["FullFormattedMessage"] = message
    event = vsphere.parse(body)[0]
    assert event.type is R and "snapshot_number" not in event.extra


def test_proxmox_odd_snapshot_name_is_hashed_the_same_in_snapshot_and_rollback() -> None:
    """A snapshot name that is not an identifier is only a hint: the qmsnapshot and the
    qmrollback derive the same ``sha256:`` identifier, and neither is refused."""
    odd = "pre\u00a0patch"
    ids = [proxmox.parse(sample(f"proxmox/{name}.json", snapshot=odd))[0].snapshot_id
           for name in ("qmsnapshot", "qmrollback")]
    assert ids == ["sha256:" + hashlib.sha256(odd.encode("utf-8")).hexdigest()] * 2


def test_vsphere_extra_names_vcenter_moref_and_source_host() -> None:
    """The vCenter URL, the VM's moref and the host a VM migrated from are kept."""
    event = parse_sample("vsphere/drs_migrated.json")[0]
    assert event.extra == {"vcenter": "https://vcenter-01.lab.example:443/sdk",
                           "vm_moref": "vm-45", "source_host": "esx-01.lab.example"}
    assert event.event_id == "5b4a4cc3-2a63-4a8f-9f0e-0a1d4e1c2b20"


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"specversion": "0.3"}, "specversion"), ({"id": ""}, "id"), ({"type": 5}, "type"),
     ({"subject": None}, "subject"), ({"data": []}, "data"), ({"source": None}, "source")],
)
def test_vsphere_malformed_envelope(changes: dict[str, Any], field: str) -> None:
    """A broken CloudEvents envelope is reported by its attribute."""
    with pytest.raises(MalformedPayload) as info:
        vsphere.parse(sample("vsphere/powered_on.json", **changes))
    assert info.value.field == field


def test_vsphere_handled_event_without_vm_is_malformed() -> None:
    """A power-on event that does not say which VM is refused, not guessed."""
    body = sample("vsphere/powered_on.json")
    body["data"]["Vm"] = None
    with pytest.raises(MalformedPayload) as info:
        vsphere.parse(body)
    assert info.value.field == "data.Vm"


# --- Proxmox -------------------------------------------------------------------------


def test_proxmox_upid_fields_are_hex_decoded() -> None:
    """pid, pstart and starttime of a UPID are hexadecimal, as in PVE::Tools."""
    upid = proxmox.decode_upid("UPID:pve-1:000A1B2C:1A0001E24:6B0BF8AE:qmrollback:101:root@pam:")
    assert (upid.node, upid.pid, upid.pstart, upid.starttime) == (
        "pve-1", 0x000A1B2C, 0x1A0001E24, 0x6B0BF8AE)
    assert (upid.type, upid.id, upid.user) == ("qmrollback", "101", "root@pam")


@pytest.mark.parametrize(
    "upid",
    ["UPID:pve1:000A1B2C:0001E240:6B0BF8AE:qmrollback:101:root@pam",  # no trailing colon
     "UPID:-pve:000A1B2C:0001E240:6B0BF8AE:qmrollback:101:root@pam:",  # bad node
     "UPID:pve1:000A1B2C:0001E240:6B0BF8A:qmrollback:101:root@pam:",  # 7-digit starttime
     "UPID:pve1:000A1B2C:0001E240:6B0BF8AE:qm rollback:101:root@pam:",
     "upid:pve1:000A1B2C:0001E240:6B0BF8AE:qmrollback:101:root@pam:"],
)
def test_proxmox_bad_upids_are_malformed(upid: str) -> None:
    """Anything PVE::Tools::upid_decode would refuse is refused."""
    with pytest.raises(MalformedPayload) as info:
        proxmox.parse(sample("proxmox/qmrollback.json", upid=upid))
    assert info.value.field == "upid"


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"node": "pve9"}, "node"), ({"endtime": None}, "endtime"),
     ({"endtime": "1795946700"}, "endtime"), ({"snapshot": 5}, "snapshot"),
     ({"snapshot_created_at": "yesterday"}, "snapshot_created_at"),
     ({"cluster": ""}, "cluster")],
)
def test_proxmox_malformed_fields(changes: dict[str, Any], field: str) -> None:
    """A broken task record is reported by its field."""
    with pytest.raises(MalformedPayload) as info:
        proxmox.parse(sample("proxmox/qmrollback.json", **changes))
    assert info.value.field == field


@pytest.mark.parametrize("target", [99, 10**9, HUGE, "0205", "205 ", True, 2.5])
def test_proxmox_clone_target_must_be_a_vmid(target: object) -> None:
    """A clone's target must be a PVE vmid (100-999999999), however it is written."""
    with pytest.raises(MalformedPayload) as info:
        proxmox.parse(sample("proxmox/qmclone.json", target_vmid=target))
    assert info.value.field == "target_vmid"


def test_proxmox_clone_target_may_be_a_string() -> None:
    """A vmid sent as a decimal string is the same VM as the integer."""
    event = proxmox.parse(sample("proxmox/qmclone.json", target_vmid="205"))[0]
    assert event.vm_id == "205"


@pytest.mark.parametrize("backup_vmid", [99, "0101", True, 2.5, [101]])
def test_proxmox_restore_backup_vmid_must_be_a_vmid(backup_vmid: object) -> None:
    """The backup's VM of a restore must be a PVE vmid: a wrong one is not guessed at."""
    with pytest.raises(MalformedPayload) as info:
        proxmox.parse(sample("proxmox/qmrestore_into_new_vmid.json", backup_vmid=backup_vmid))
    assert info.value.field == "backup_vmid"


def test_proxmox_restore_into_a_new_vmid_is_a_clone_of_the_backups_vm_in_its_cluster() -> None:
    """A restore of VM 101's backup as VM 311 starts 311 from 101's state at the backup's
    time, so it is posted as 311 cloned from 101 (scoped by the cluster like the target);
    without the backup's VM (a record that does not say) it stays a restore of 311."""
    clone = proxmox.parse(sample("proxmox/qmrestore_into_new_vmid.json", cluster="prod"))[0]
    assert (clone.type, clone.vm_id, clone.source_vm_id) == (EventType.VM_CLONED, "prod/311", "prod/101")
    unknown = proxmox.parse(sample("proxmox/qmrestore_into_new_vmid.json", backup_vmid=None))[0]
    assert (unknown.type, unknown.vm_id, unknown.source_vm_id) == (EventType.VM_RESTORED, "311", None)


def test_proxmox_container_tasks_name_the_container_as_a_vms_name_the_vm() -> None:
    """VMs and containers share one vmid space per PVE cluster, so a container's vm_id is
    its vmid scoped by the cluster like a VM's; a restore of container 120's backup as 122
    is a clone of 120, and one into 120 itself a restore of 120."""
    clone = proxmox.parse(sample("proxmox/vzrestore_into_new_vmid.json", cluster="prod"))[0]
    assert (clone.type, clone.vm_id, clone.source_vm_id) == (EventType.VM_CLONED, "prod/122", "prod/120")
    in_place = proxmox.parse(sample("proxmox/vzrestore_into_new_vmid.json", backup_vmid=122))[0]
    assert (in_place.type, in_place.vm_id, in_place.source_vm_id) == (EventType.VM_RESTORED, "122", None)
    rollback = proxmox.parse(sample("proxmox/vzrollback.json", cluster="prod"))[0]
    assert (rollback.vm_id, rollback.extra["task_type"]) == ("prod/120", "vzrollback")


def test_proxmox_container_created_from_a_template_is_ignored() -> None:
    """A vzcreate (pct create without --restore: a new container from a template) has no
    earlier state to return to; a create from a backup is a vzrestore."""
    with pytest.raises(IgnoredPayload):
        proxmox.parse(sample("proxmox/vzcreate_ignored.json"))


def test_proxmox_snapshot_without_a_time_was_taken_no_later_than_the_task_started() -> None:
    """PVE sets a snapshot's snaptime after its task starts: the start is the latest time
    the snapshot's state can be placed at without losing the uses made while the task ran.
    The end would leave them out of a later rollback's window."""
    event = parse_sample("proxmox/qmsnapshot_without_time.json")[0]
    start = SAMPLES["proxmox/qmsnapshot_without_time.json"]["starttime"]
    assert event.snapshot_created_at is not None and event.occurred_at is not None
    assert int(event.snapshot_created_at.timestamp()) == start < int(event.occurred_at.timestamp())


def test_proxmox_running_task_is_ignored() -> None:
    """A task record without a status has not finished and changes nothing yet."""
    with pytest.raises(IgnoredPayload):
        proxmox.parse(sample("proxmox/qmrollback.json", status=None, endtime=None))


def test_proxmox_event_id_is_the_upid() -> None:
    """The UPID identifies the task, so a re-posted task is the same event."""
    event = parse_sample("proxmox/qmrollback.json")[0]
    assert event.event_id == SAMPLES["proxmox/qmrollback.json"]["upid"]
    assert event.extra["user"] == "root@pam"


# --- OpenStack -----------------------------------------------------------------------


def test_openstack_event_id_and_publisher() -> None:
    """The oslo.messaging message_id is the event id; the publisher goes to extra."""
    event = parse_sample("openstack/snapshot_start.json")[0]
    assert event.event_id == "8d2f6a8e-5c3b-4f5e-9c7a-0e4c1b2a3d00"
    assert event.extra == {"publisher_id": "nova-compute:compute-07"}


def test_openstack_snapshot_time_is_the_start_and_the_end_is_ignored() -> None:
    """The image is captured after instance.snapshot.start: its time is the snapshot's, and
    the .end (later by the upload) is ignored so that it cannot narrow a rebuild's window."""
    event = parse_sample("openstack/snapshot_start.json")[0]
    assert (event.type, event.snapshot_created_at) == (C, utc("2026-11-29T10:00:00.018311"))
    with pytest.raises(IgnoredPayload):
        parse_sample("openstack/snapshot_end_ignored.json")


def test_openstack_odd_image_id_is_hashed_the_same_in_snapshot_and_rebuild() -> None:
    """An image id that is not an identifier is only a hint: the snapshot and the rebuild
    derive the same ``sha256:`` identifier from it, and neither is refused."""
    odd = "image\u00a0" + "x" * 300
    ids = []
    for name in ("openstack/snapshot_start.json", "openstack/rebuild_end.json"):
        body = sample(name)
        data = body["payload"]["nova_object.data"]
        data["snapshot_image_id" if "snapshot" in name else "image_uuid"] = odd
        ids.append(openstack.parse(body)[0].snapshot_id)
    assert ids == ["sha256:" + hashlib.sha256(odd.encode("utf-8")).hexdigest()] * 2


@pytest.mark.parametrize("inner", ["{not json", "[1, 2]", "[" * 100_000])
def test_openstack_broken_wire_message_is_malformed(inner: str) -> None:
    """A messagingv2 wrapper whose inner message is not a JSON object is refused."""
    with pytest.raises(MalformedPayload) as info:
        openstack.parse({"oslo.version": "2.0", "oslo.message": inner})
    assert info.value.field == '["oslo.message"]'


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"message_id": None}, "message_id"), ({"event_type": 3}, "event_type"),
     ({"priority": 5}, "priority"), ({"payload": "x"}, "payload"),
     ({"timestamp": "2026-11-29"}, "timestamp")],
)
def test_openstack_malformed_envelope(changes: dict[str, Any], field: str) -> None:
    """A broken notification envelope is reported by its field."""
    with pytest.raises(MalformedPayload) as info:
        openstack.parse(sample("openstack/power_on_end.json", **changes))
    assert info.value.field == field


def test_openstack_instance_uuid_is_required() -> None:
    """A notification about no instance is refused with the payload path."""
    body = sample("openstack/power_on_end.json")
    del body["payload"]["nova_object.data"]["uuid"]
    with pytest.raises(MalformedPayload) as info:
        openstack.parse(body)
    assert info.value.field == 'payload["nova_object.data"].uuid'


# --- arbitrary input -----------------------------------------------------------------

JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
    | st.sampled_from(["2026-11-29T10:05:00Z", "UPID:a:00000001:00000001:00000001:qmstart:1:u:",
                      "lifecycle", "silent_revert", "OK", "1.0", "TaskEvent", "EventEx"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20,
)
_DELETE = object()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value nested inside ``value``."""
    found: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else []
    for key, child in items:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


@st.composite
def mutated_samples(draw: st.DrawFn, source: str) -> object:
    """A sample of ``source`` with one nested value replaced by arbitrary JSON, or removed."""
    names = sorted(n for n in SAMPLES if n.startswith(source + "/"))
    body = copy.deepcopy(SAMPLES[draw(st.sampled_from(names))])
    path = draw(st.sampled_from(_paths(body)))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    replacement = draw(JSON_VALUES | st.just(_DELETE))
    if replacement is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return body


def assert_well_formed(events: object) -> None:
    """Parser output is a list of events with valid ids and aware UTC times."""
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, GenericEvent) and isinstance(event.type, EventType)
        for value in (event.event_id, event.vm_id, event.snapshot_id, event.host,
                      event.source_vm_id):
            assert value is None or _common.check_identifier(value, "x") == value
        for moment in (event.occurred_at, event.snapshot_created_at):
            assert moment is None or moment.utcoffset() == timedelta(0)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in event.extra.items())


def run_arbitrary(source: str, payload: object) -> None:
    """Feed one payload; only the parser's own outcomes may come out."""
    try:
        events = PARSERS[source](payload)
    except MalformedPayload as exc:
        assert exc.field is None or isinstance(exc.field, str)
    except IgnoredPayload as exc:
        assert isinstance(exc.reason, str)
    else:
        assert_well_formed(events)


@settings(max_examples=200, deadline=None)
@given(payload=JSON_VALUES | mutated_samples("libvirt"))
def test_libvirt_survives_arbitrary_input(payload: object) -> None:
    """Arbitrary JSON gives an event list, IgnoredPayload or MalformedPayload, nothing else."""
    run_arbitrary("libvirt", payload)


@settings(max_examples=200, deadline=None)
@given(payload=JSON_VALUES | mutated_samples("vsphere"))
def test_vsphere_survives_arbitrary_input(payload: object) -> None:
    """Arbitrary JSON gives an event list, IgnoredPayload or MalformedPayload, nothing else."""
    run_arbitrary("vsphere", payload)


@settings(max_examples=200, deadline=None)
@given(payload=JSON_VALUES | mutated_samples("proxmox"))
def test_proxmox_survives_arbitrary_input(payload: object) -> None:
    """Arbitrary JSON gives an event list, IgnoredPayload or MalformedPayload, nothing else."""
    run_arbitrary("proxmox", payload)


@settings(max_examples=200, deadline=None)
@given(payload=JSON_VALUES | mutated_samples("openstack"))
def test_openstack_survives_arbitrary_input(payload: object) -> None:
    """Arbitrary JSON gives an event list, IgnoredPayload or MalformedPayload, nothing else."""
    run_arbitrary("openstack", payload)


@pytest.mark.parametrize(("halt", "event", "detail", "want"), [
    (True, 5, 6, EventType.VM_STOPPED), (False, 5, 6, R), (None, 5, 6, R), ("null", 5, 6, R),
    (True, 2, 3, R), (True, 4, 2, R), (True, 0, 3, R), (True, 5, 0, EventType.VM_STOPPED),
])
def test_libvirt_stop_of_a_halting_snapshot_is_no_revert(halt: bool | str | None, event: int, detail: int,
                                                          want: EventType) -> None:
    """STOPPED/FROM_SNAPSHOT the relay marks ``snapshot_create_halt`` (``snapshot-create
    --halt``) is a plain stop; unmarked (absent, false or null), or marked on any other
    FROM_SNAPSHOT event, it is a revert."""
    body = sample("libvirt/revert_stopped_from_snapshot.json", event=event, detail=detail)
    if halt is not None:
        body["snapshot_create_halt"] = None if halt == "null" else halt
    assert libvirt.parse(body)[0].type is want


@pytest.mark.parametrize("halt", [1, 0, "true", [True], {}])
def test_libvirt_snapshot_create_halt_must_be_a_boolean(halt: object) -> None:
    """A ``snapshot_create_halt`` that is not true or false is a broken relay, reported by its path."""
    body = sample("libvirt/revert_stopped_from_snapshot.json", snapshot_create_halt=halt)
    with pytest.raises(MalformedPayload) as info:
        libvirt.parse(body)
    assert info.value.field == "snapshot_create_halt"
