"""Parser for the JSON our own libvirt relay posts.

libvirt has no webhook, so a small relay on each host listens for domain lifecycle
events (``virConnectDomainEventRegisterAny``) and watches the snapshot list, and posts
one JSON object per observation::

    {
      "source": "libvirt",                  # constant, required
      "event_id": "hv-03:1f0c9a2e",         # identifier, unique per observation, required
      "uri": "qemu:///system",              # connection URI the relay used, required
      "host": "hv-03",                      # identifier of the hypervisor host, required
      "domain": {"name": "web-01",          # identifier, required: becomes vm_id
                 "uuid": "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"},   # required
      "event": 2,                           # virDomainEventType        } required for
      "detail": 3,                          # vir*DetailType of 'event' } kind=lifecycle
      "occurred_at": "2026-11-29T10:05:00Z",  # RFC 3339, when the relay saw it, required
      "snapshot": {"name": "pre-patch",     # string, as libvirt names the snapshot
                   "creation_time": 1796032800 | null} | null,   # Unix seconds (<creationTime>;
                                            # null: the relay could not read it)
      "kind": "lifecycle",                  # optional, default "lifecycle"; or
                                            # "snapshot_created" | "snapshot_deleted" |
                                            # "silent_revert"
      "snapshot_create_halt": true          # optional, STOPPED/FROM_SNAPSHOT only: the
                                            # relay found it is snapshot-create --halt
    }

``snapshot`` is the domain's current snapshot as the relay read it right after the event
(``virDomainSnapshotCurrent`` and its XML ``<name>``/``<creationTime>``); it is required
for the three snapshot kinds and optional otherwise. ``event``/``detail`` are not read for
the snapshot kinds (libvirt emits no event for creating or deleting a snapshot).

Choices:

- ``vm_id`` is the domain **name**: that is what operators and guests call the VM, and
  it is what the guest agent registers with. The UUID goes to ``extra["domain_uuid"]``.
- Every FROM_SNAPSHOT lifecycle event is a ``snapshot.reverted``: STOPPED, STARTED,
  SUSPENDED, RESUMED and DEFINED. A revert of a running domain to a snapshot taken while
  it was shut off emits STOPPED/FROM_SNAPSHOT alone (no start follows; DEFINED follows
  only when QEMU rewrites a persistent domain's config), so no half of a revert can be
  left out. One revert may therefore give two or three ``snapshot.reverted`` events with
  the same snapshot, which open the same window twice: harmless.
- Taking a snapshot with ``--halt`` emits STOPPED/FROM_SNAPSHOT too. The relay tells it
  from a revert by what it reads right after the event (``relay/libvirt_events.py``,
  ``halted_by_snapshot``) and then sends ``snapshot_create_halt: true``: that event is a
  ``vm.stopped``, and the snapshot reaches the service as ``snapshot_created``. Whoever
  holds a hypervisor token can leave any revert unreported anyway, so the flag gives it
  nothing more; without the flag, or with it on any other event, STOPPED/FROM_SNAPSHOT is
  a revert.
- In-place reverts of running QEMU guests can emit no lifecycle event at all; the relay
  reports those as ``silent_revert`` when the current snapshot moves back under it, or
  the domain's state says it runs from a revert the relay had not seen.
- A ``snapshot_created`` whose ``creation_time`` is null carries the relay's poll time as
  ``occurred_at``, which is not when the snapshot was taken (a relay started after it):
  the event is recorded without ``occurred_at``, so the service records the snapshot's
  creation time as unknown and a revert to it covers every earlier use.
- SUSPENDED/RESTORED (restore from a *paused* state file) is mapped to ``vm.restored``
  like STARTED/RESTORED: both put the guest back to a saved state.

Enum values are those of libvirt's include/libvirt/libvirt-domain.h.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import NamedTuple

from replayguard.core.events import EventType, GenericEvent, IgnoredPayload, MalformedPayload
from replayguard.hypervisors import _common as c

# virDomainEventType
DEFINED = 0  # VIR_DOMAIN_EVENT_DEFINED
STARTED = 2  # VIR_DOMAIN_EVENT_STARTED
SUSPENDED = 3  # VIR_DOMAIN_EVENT_SUSPENDED
RESUMED = 4  # VIR_DOMAIN_EVENT_RESUMED
STOPPED = 5  # VIR_DOMAIN_EVENT_STOPPED

# virDomainEventDefinedDetailType
DEFINED_FROM_SNAPSHOT = 3  # VIR_DOMAIN_EVENT_DEFINED_FROM_SNAPSHOT (libvirt 1.3.3)
# virDomainEventStartedDetailType
STARTED_BOOTED = 0  # VIR_DOMAIN_EVENT_STARTED_BOOTED
STARTED_MIGRATED = 1  # VIR_DOMAIN_EVENT_STARTED_MIGRATED
STARTED_RESTORED = 2  # VIR_DOMAIN_EVENT_STARTED_RESTORED
STARTED_FROM_SNAPSHOT = 3  # VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT
# virDomainEventSuspendedDetailType
SUSPENDED_RESTORED = 4  # VIR_DOMAIN_EVENT_SUSPENDED_RESTORED ("from paused state file")
SUSPENDED_FROM_SNAPSHOT = 5  # VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT
# virDomainEventResumedDetailType
RESUMED_MIGRATED = 1  # VIR_DOMAIN_EVENT_RESUMED_MIGRATED
RESUMED_FROM_SNAPSHOT = 2  # VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT
# virDomainEventStoppedDetailType
STOPPED_FROM_SNAPSHOT = 6  # VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT

# (event, detail) -> type; pairs not listed are ignored, except STOPPED (see _lifecycle_type:
# every STOPPED is vm.stopped, but STOPPED/FROM_SNAPSHOT is a revert unless the relay found
# it is snapshot-create --halt).
_LIFECYCLE: dict[tuple[int, int], EventType] = {
    (DEFINED, DEFINED_FROM_SNAPSHOT): EventType.SNAPSHOT_REVERTED,
    (STARTED, STARTED_BOOTED): EventType.VM_STARTED,
    (STARTED, STARTED_MIGRATED): EventType.VM_MIGRATED,
    (STARTED, STARTED_RESTORED): EventType.VM_RESTORED,
    (STARTED, STARTED_FROM_SNAPSHOT): EventType.SNAPSHOT_REVERTED,
    (SUSPENDED, SUSPENDED_RESTORED): EventType.VM_RESTORED,
    (SUSPENDED, SUSPENDED_FROM_SNAPSHOT): EventType.SNAPSHOT_REVERTED,
    (RESUMED, RESUMED_MIGRATED): EventType.VM_MIGRATED,
    (RESUMED, RESUMED_FROM_SNAPSHOT): EventType.SNAPSHOT_REVERTED,
}

LIFECYCLE = "lifecycle"
_KINDS: dict[str, EventType] = {
    "snapshot_created": EventType.SNAPSHOT_CREATED,
    "snapshot_deleted": EventType.SNAPSHOT_DELETED,
    "silent_revert": EventType.SNAPSHOT_REVERTED,
}

_SNAPSHOT_TYPES = frozenset(
    {EventType.SNAPSHOT_CREATED, EventType.SNAPSHOT_DELETED, EventType.SNAPSHOT_REVERTED}
)

# Enum values are small; anything larger is a broken relay, not a new libvirt event.
_MAX_ENUM = 255
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class _Observed(NamedTuple):
    """The fields every kind of observation carries."""

    event_id: str
    vm_id: str
    occurred_at: datetime
    host: str
    extra: dict[str, str]


def parse(payload: object) -> list[GenericEvent]:
    """One relay observation as one generic event, or IgnoredPayload.

    The whole payload is validated before deciding to ignore it, so a broken relay is
    noticed even while it only sends events we skip.
    """
    body = c.as_mapping(payload, c.ROOT)
    if body.get("source") != "libvirt":
        raise MalformedPayload("source must be 'libvirt'", "source")
    kind = _kind(body)
    pair = _lifecycle_pair(body) if kind == LIFECYCLE else None
    halted = _halted(body)
    snapshot = _snapshot(body, required=kind != LIFECYCLE)
    seen = _observed(body)
    event_type = _KINDS[kind] if pair is None else _lifecycle_type(pair, halted)
    if event_type not in _SNAPSHOT_TYPES:
        snapshot = None  # the current snapshot says nothing about a boot or a restore
    occurred_at: datetime | None = seen.occurred_at
    if event_type is EventType.SNAPSHOT_CREATED and snapshot is not None and snapshot[1] is None:
        occurred_at = None  # the relay's poll, not the creation: its time stays unknown
    return [
        GenericEvent(
            event_id=seen.event_id,
            type=event_type,
            vm_id=seen.vm_id,
            occurred_at=occurred_at,
            snapshot_id=snapshot[0] if snapshot else None,
            snapshot_created_at=snapshot[1] if snapshot else None,
            host=seen.host,
            extra=seen.extra,
        )
    ]


def _kind(body: dict[str, object]) -> str:
    """The observation's kind; a missing or null kind means a lifecycle event."""
    kind = body.get("kind")
    if kind is None:
        return LIFECYCLE
    if not isinstance(kind, str) or (kind != LIFECYCLE and kind not in _KINDS):
        raise MalformedPayload(f"kind must be {LIFECYCLE!r} or one of {sorted(_KINDS)}", "kind")
    return kind


def _lifecycle_pair(body: dict[str, object]) -> tuple[int, int]:
    """The validated (virDomainEventType, detail) of a lifecycle observation."""
    event = c.integer(body, "event", c.ROOT, low=0, high=_MAX_ENUM)
    detail = c.integer(body, "detail", c.ROOT, low=0, high=_MAX_ENUM)
    return event, detail


def _halted(body: dict[str, object]) -> bool:
    """The relay's ``snapshot_create_halt``: true, false, or absent (or null: false)."""
    halted = body.get("snapshot_create_halt")
    if halted is None:
        return False
    if not isinstance(halted, bool):
        raise MalformedPayload("snapshot_create_halt must be true or false", "snapshot_create_halt")
    return halted


def _lifecycle_type(pair: tuple[int, int], halted: bool = False) -> EventType:
    """The generic type of a lifecycle (event, detail) pair, or IgnoredPayload; ``halted``:
    the relay's ``snapshot_create_halt``, which makes STOPPED/FROM_SNAPSHOT a plain stop."""
    event, detail = pair
    if event == STOPPED:
        reverted = detail == STOPPED_FROM_SNAPSHOT and not halted
        return EventType.SNAPSHOT_REVERTED if reverted else EventType.VM_STOPPED
    mapped = _LIFECYCLE.get(pair)
    if mapped is None:
        raise IgnoredPayload(f"libvirt lifecycle event {event}/{detail} is not acted on")
    return mapped


def _snapshot(body: dict[str, object], *, required: bool) -> tuple[str, datetime | None] | None:
    """(identifier, creation time) of the snapshot the relay reported, if any.

    The name is only a hint (the creation time places the state): one that is not an
    identifier becomes ``sha256:<hex>`` (``_common.name_identifier``), the same in every
    kind, so the event is kept and a revert still finds the snapshot's creation. A null
    creation time is one the relay could not read: the state's time is unknown, which the
    windows read as every earlier use."""
    snap = c.optional_mapping(body, "snapshot", c.ROOT)
    if snap is None:
        if required:
            raise MalformedPayload("snapshot is required for this kind", "snapshot")
        return None
    name = c.name_identifier(c.field(snap, "name", "snapshot"), "snapshot.name")
    raw = snap.get("creation_time")
    created = None if raw is None else c.unix_time(raw, "snapshot.creation_time")
    return name, created


def _observed(body: dict[str, object]) -> _Observed:
    domain = c.sub_mapping(body, "domain", c.ROOT)
    uuid = c.identifier(domain, "uuid", "domain")
    if not _UUID.fullmatch(uuid):
        raise MalformedPayload("not a UUID", "domain.uuid")
    return _Observed(
        event_id=c.identifier(body, "event_id", c.ROOT),
        vm_id=c.identifier(domain, "name", "domain"),
        occurred_at=c.rfc3339_time(c.field(body, "occurred_at", c.ROOT), "occurred_at"),
        host=c.identifier(body, "host", c.ROOT),
        extra={"domain_uuid": uuid.lower(), "uri": c.identifier(body, "uri", c.ROOT)},
    )
