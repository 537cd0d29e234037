"""Parser for OpenStack Nova versioned notifications (oslo.messaging envelope).

The envelope, as oslo.messaging's notifier builds it::

    {"message_id": "0f3b...", "publisher_id": "nova-compute:compute-07",
     "event_type": "instance.snapshot.start", "priority": "INFO",
     "timestamp": "2026-11-29 10:05:00.123456",          # str(utcnow()): UTC, no offset
     "payload": {"nova_object.name": "InstanceActionSnapshotPayload",
                 "nova_object.namespace": "nova", "nova_object.version": "1.10",
                 "nova_object.data": {"uuid": "178b0921-...", "host": "compute-07",
                                      "snapshot_image_id": "d2aae36f-...", ...}}}

The ``messagingv2`` driver's wire form ``{"oslo.version": "2.0", "oslo.message": "<the
envelope as a JSON string>"}`` is unwrapped first. Field names are those of Nova's
``doc/notification_samples``.

Choices:

- ``vm_id`` is the instance ``uuid``; ``host`` is the payload's ``host`` (the compute
  service host; after ``live_migration_post_dest`` it is the destination).
- ``event_id`` is the envelope's ``message_id``; ``occurred_at`` its ``timestamp``.
- ``instance.snapshot.start`` → ``snapshot.created`` with ``snapshot_id`` =
  ``snapshot_image_id`` (Nova has already created the image record, so ``.start`` names
  it) and ``snapshot_created_at`` = the notification time. The image is captured after
  ``.start`` and before ``.end`` (a live snapshot's upload can take minutes), so a use
  made in between may be missing from it: the earliest bound is the state's time, and
  a window starting there may widen, never narrow. ``instance.snapshot.end`` is ignored:
  recorded as another creation of the image, its later time would be the one a
  rebuild's window starts at (the latest creation at or before the rebuild counts).
- ``instance.rebuild.end`` → ``vm.restored`` with ``snapshot_id`` = ``image_uuid``: a
  rebuild puts the disk back to an image, which is a rollback when that image is a
  snapshot of this instance (then the matching ``snapshot.created`` gives its time);
  when it is a plain image the window's start is unknown, which over-protects.
- The image id is only a hint (the windows match a rebuild to its snapshot by it): one
  that is not an identifier becomes ``sha256:`` and the hex SHA-256 of its UTF-8 bytes,
  the same in both notifications, and the notification is kept.
- Every other ``*.start`` (and ``instance.snapshot.end``), ``*.error`` and priority
  ``ERROR`` notifications are ignored.
"""

from __future__ import annotations

import json

from replayguard.core.events import EventType, GenericEvent, IgnoredPayload, MalformedPayload
from replayguard.hypervisors import _common as c

EVENT_TYPES: dict[str, EventType] = {
    "instance.snapshot.start": EventType.SNAPSHOT_CREATED,
    "instance.rebuild.end": EventType.VM_RESTORED,
    "instance.live_migration_post.end": EventType.VM_MIGRATED,
    "instance.live_migration_post_dest.end": EventType.VM_MIGRATED,
    "instance.power_on.end": EventType.VM_STARTED,
    "instance.power_off.end": EventType.VM_STOPPED,
}

# Which payload field names the image, per type; None: the event names no image.
_IMAGE_FIELD: dict[EventType, str] = {
    EventType.SNAPSHOT_CREATED: "snapshot_image_id",
    EventType.VM_RESTORED: "image_uuid",
}

DATA = "nova_object.data"
_MAX_WIRE_MESSAGE = 1 << 20


def parse(payload: object) -> list[GenericEvent]:
    """One Nova notification as one generic event, or IgnoredPayload."""
    envelope = _unwrap(c.as_mapping(payload, c.ROOT))
    event_type_text = c.identifier(envelope, "event_type", c.ROOT)
    message_id = c.identifier(envelope, "message_id", c.ROOT)
    occurred_at = c.rfc3339_time(c.field(envelope, "timestamp", c.ROOT), "timestamp",
                                 assume_utc=True)
    priority = c.optional_string(envelope, "priority", c.ROOT, max_len=32)
    if priority is not None and priority.upper() == "ERROR":
        raise IgnoredPayload("error notification")
    event_type = EVENT_TYPES.get(event_type_text)
    if event_type is None:
        raise IgnoredPayload(f"Nova notification {event_type_text} is not acted on")
    data_path = c.child("payload", DATA)
    data = c.sub_mapping(c.sub_mapping(envelope, "payload", c.ROOT), DATA, "payload")
    image_field = _IMAGE_FIELD.get(event_type)
    snapshot_id = None
    if image_field:
        snapshot_id = c.name_identifier(c.field(data, image_field, data_path), c.child(data_path, image_field))
    return [
        GenericEvent(
            event_id=message_id,
            type=event_type,
            vm_id=c.identifier(data, "uuid", data_path),
            occurred_at=occurred_at,
            snapshot_id=snapshot_id,
            snapshot_created_at=occurred_at if event_type is EventType.SNAPSHOT_CREATED else None,
            host=c.optional_identifier(data, "host", data_path),
            extra=_extra(envelope),
        )
    ]


def _unwrap(envelope: dict[str, object]) -> dict[str, object]:
    """The notification inside a ``messagingv2`` wire message, or the envelope itself."""
    if "oslo.message" not in envelope:
        return envelope
    text = c.string(envelope, "oslo.message", c.ROOT, max_len=_MAX_WIRE_MESSAGE)
    path = c.child(c.ROOT, "oslo.message")
    try:
        inner = json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedPayload("not a JSON document", path) from None
    return c.as_mapping(inner, path)


def _extra(envelope: dict[str, object]) -> dict[str, str]:
    publisher = c.optional_identifier(envelope, "publisher_id", c.ROOT)
    return {} if publisher is None else {"publisher_id": publisher}
