"""The generic event body of CONTRACT §5 in, a ``GenericEvent`` out, and its digest.

The digest is what makes ``event_id`` idempotent: it is taken over the parsed event, not
the raw bytes, so a relay that resends the same event with its keys in another order or
a time written as Unix seconds instead of RFC 3339 is a duplicate, not a conflict.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from ..errors import InvalidRequest
from . import validation
from .events import EventType, GenericEvent
from .windows import to_us

_TYPES = {t.value: t for t in EventType}
_NEEDS_SNAPSHOT = (EventType.SNAPSHOT_CREATED, EventType.SNAPSHOT_DELETED)


def _optional_id(body: dict[str, Any], name: str) -> str | None:
    return None if body.get(name) is None else validation.check_identifier(body[name], name)


def _optional_time(body: dict[str, Any], name: str) -> Any:
    return None if body.get(name) is None else validation.parse_time(body[name], name)


def _event_type(body: dict[str, Any]) -> EventType:
    raw = body.get("type")
    if not isinstance(raw, str) or raw not in _TYPES:
        raise InvalidRequest(f"type must be one of {', '.join(_TYPES)}", field="type")
    return _TYPES[raw]


def check_clone(event: GenericEvent) -> None:
    """The rule every event keeps, whichever parser made it: a clone names another VM (a VM
    its own parent would copy its windows onto itself at each clone event)."""
    if event.type is EventType.VM_CLONED and event.source_vm_id == event.vm_id:
        raise InvalidRequest("a VM cannot be a clone of itself", field="source_vm_id")


def _check_shape(event: GenericEvent) -> None:
    if event.type is EventType.VM_CLONED and event.source_vm_id is None:
        raise InvalidRequest("vm.cloned needs source_vm_id, the parent VM", field="source_vm_id")
    check_clone(event)
    if event.type in _NEEDS_SNAPSHOT and event.snapshot_id is None:
        raise InvalidRequest(f"{event.type.value} needs snapshot_id", field="snapshot_id")


def parse_generic(raw: object) -> GenericEvent:
    """Validates the generic body; every problem names its field."""
    body = validation.require_object(raw)
    event = GenericEvent(
        event_id=validation.identifier(body, "event_id"),
        type=_event_type(body),
        vm_id=validation.identifier(body, "vm_id"),
        occurred_at=_optional_time(body, "occurred_at"),
        snapshot_id=_optional_id(body, "snapshot_id"),
        snapshot_created_at=_optional_time(body, "snapshot_created_at"),
        host=_optional_id(body, "host"),
        source_vm_id=_optional_id(body, "source_vm_id"),
    )
    _check_shape(event)
    return event


def to_record(event: GenericEvent) -> dict[str, Any]:
    """The event as stored in the ledger and ``hypervisor_events``: times in µs, no Nones."""
    record: dict[str, Any] = {
        "event_id": event.event_id, "type": event.type.value, "vm_id": event.vm_id,
        "occurred_us": None if event.occurred_at is None else to_us(event.occurred_at),
        "snapshot_id": event.snapshot_id,
        "snapshot_created_us": None if event.snapshot_created_at is None else to_us(event.snapshot_created_at),
        "host": event.host, "source_vm_id": event.source_vm_id,
        "extra": dict(sorted(event.extra.items())) or None,
    }
    return {key: value for key, value in record.items() if value is not None}


def body_digest(event: GenericEvent) -> bytes:
    """SHA-256 of the event's canonical record: equal for equal events, whatever the wire form."""
    return hashlib.sha256(orjson.dumps(to_record(event), option=orjson.OPT_SORT_KEYS)).digest()
