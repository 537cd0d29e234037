"""Parser for vCenter events as the VMware Event Broker Appliance (VEBA) posts them.

VEBA wraps each vCenter event in a CloudEvents 1.0 envelope (structured JSON mode)::

    {"specversion": "1.0", "id": "08179137-...", "source": "https://vcenter-01:443/sdk",
     "type": ..., "subject": ..., "time": "2021-09-27T19:02:54.063Z",
     "data": {"Key": 23192, "CreatedTime": "...", "UserName": "...",
              "Host": {"Name": "esx-01", "Host": {"Type": "HostSystem", "Value": "host-33"}},
              "Vm": {"Name": "web-01", "Vm": {"Type": "VirtualMachine", "Value": "vm-45"}},
              "FullFormattedMessage": "...", ...}}

``data`` is the vim25 event object with Go-style capitalised field names. The event class
is found from ``type``, in the three forms seen in the wild:

- VEBA event router <= v0.7: ``type = "com.vmware.event.router/event"`` and the class in
  ``subject`` (``VmPoweredOnEvent``, or an EventEx id such as
  ``com.vmware.vc.vm.VmStateRevertedToSnapshot``);
- VEBA >= v0.7 (Knative vSphere source): ``type = "com.vmware.vsphere.<Class>.v0"``;
- the class itself as ``type``.

Choices:

- ``vm_id`` is ``data.Vm.Name`` (the VM's name, what the guest registers with); the
  managed object id (``vm-45``) goes to ``extra["vm_moref"]`` and the vCenter URL to
  ``extra["vcenter"]``. ``event_id`` is the CloudEvents ``id``.
- ``occurred_at`` is vCenter's ``data.CreatedTime`` (else the envelope ``time``).
- vCenter has no "snapshot created" event class; snapshot creation is seen as the
  ``TaskEvent`` of ``VirtualMachine.createSnapshot``. That event is logged when the task
  is *queued*, so its time is slightly before the snapshot is taken: used as the
  snapshot time it widens a rollback window, never narrows it. It does not name the
  snapshot.
- A revert (``com.vmware.vc.vm.VmStateRevertedToSnapshot``) names the snapshot only in
  its message ("... has been reverted to the state of snapshot NAME, with ID N"); the name
  becomes ``snapshot_id`` when it can be read, else the window's start stays unknown
  (which is the safe default). The name is only a hint: one that is not an identifier
  (a no-break space, over 256 characters) becomes ``sha256:`` and the hex SHA-256 of its
  UTF-8 bytes, and the revert is taken all the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from replayguard.core.events import EventType, GenericEvent, IgnoredPayload, MalformedPayload
from replayguard.hypervisors import _common as c

ROUTER_TYPE = "com.vmware.event.router/event"
REVERTED = "com.vmware.vc.vm.VmStateRevertedToSnapshot"
CREATE_SNAPSHOT_TASK = "VirtualMachine.createSnapshot"

_VSPHERE_TYPE = re.compile(r"com\.vmware\.vsphere\.(.+)\.v[0-9]+")
_REVERT_MESSAGE = re.compile(r"reverted to the state of snapshot (.+), with ID ([0-9]+)\s*$")
_MAX_MESSAGE = 4096

_SIMPLE: dict[str, EventType] = {
    "VmRelocatedEvent": EventType.VM_MIGRATED,
    "VmMigratedEvent": EventType.VM_MIGRATED,
    "DrsVmMigratedEvent": EventType.VM_MIGRATED,  # subclass of VmMigratedEvent
    "VmPoweredOnEvent": EventType.VM_STARTED,
    "DrsVmPoweredOnEvent": EventType.VM_STARTED,  # subclass of VmPoweredOnEvent
    "VmPoweredOffEvent": EventType.VM_STOPPED,
}


@dataclass(frozen=True, slots=True)
class _Details:
    """What one event class adds to the fields every VM event carries."""

    type: EventType
    snapshot_id: str | None = None
    snapshot_created_at: datetime | None = None
    source_vm_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


_Handler = Callable[[dict[str, object], datetime], _Details]


def parse(payload: object) -> list[GenericEvent]:
    """One VEBA CloudEvent as one generic event, or IgnoredPayload."""
    envelope = c.as_mapping(payload, c.ROOT)
    if envelope.get("specversion") != "1.0":
        raise MalformedPayload("specversion must be '1.0'", "specversion")
    event_id = c.identifier(envelope, "id", c.ROOT)
    extra = {"vcenter": c.identifier(envelope, "source", c.ROOT)}
    event_class = _event_class(envelope)
    data = c.sub_mapping(envelope, "data", c.ROOT)
    if event_class == "EventEx":
        event_class = c.identifier(data, "EventTypeId", "data")
    handler = _HANDLERS.get(event_class)
    if handler is None:
        raise IgnoredPayload(f"vCenter event {event_class} is not acted on")
    occurred_at = _created_time(envelope, data)
    details = handler(data, occurred_at)  # may still ignore (tasks other than snapshots)
    vm = c.sub_mapping(data, "Vm", "data")
    return [
        GenericEvent(
            event_id=event_id,
            type=details.type,
            vm_id=c.identifier(vm, "Name", "data.Vm"),
            occurred_at=occurred_at,
            snapshot_id=details.snapshot_id,
            snapshot_created_at=details.snapshot_created_at,
            host=_host_name(data, "Host"),
            source_vm_id=details.source_vm_id,
            extra={**extra, **_moref(vm, "Vm", "data.Vm"), **details.extra},
        )
    ]


def _event_class(envelope: dict[str, object]) -> str:
    """The vim25 event class (or EventEx id) named by the envelope."""
    ce_type = c.identifier(envelope, "type", c.ROOT)
    if ce_type == ROUTER_TYPE:
        return c.identifier(envelope, "subject", c.ROOT)
    match = _VSPHERE_TYPE.fullmatch(ce_type)
    return match.group(1) if match else ce_type


def _created_time(envelope: dict[str, object], data: dict[str, object]) -> datetime:
    """vCenter's own time of the event, else the time VEBA stamped on the envelope."""
    if data.get("CreatedTime") is not None:
        return c.rfc3339_time(data["CreatedTime"], "data.CreatedTime")
    if envelope.get("time") is not None:
        return c.rfc3339_time(envelope["time"], "time")
    raise MalformedPayload("missing required field 'CreatedTime'", "data.CreatedTime")


def _host_name(data: dict[str, object], key: str) -> str | None:
    """The name in an optional HostEventArgument (``{"Name": ..., "Host": {...}}``)."""
    host = c.optional_mapping(data, key, "data")
    return None if host is None else c.identifier(host, "Name", c.child("data", key))


def _moref(vm: dict[str, object], key: str, path: str) -> dict[str, str]:
    """``{"vm_moref": "vm-45"}`` from a VmEventArgument, or nothing if it has no ref."""
    ref = c.optional_mapping(vm, key, path)
    return {} if ref is None else {"vm_moref": c.identifier(ref, "Value", c.child(path, key))}


def _simple(event_type: EventType) -> _Handler:
    """A handler for classes that carry nothing beyond the VM, host and time."""

    def handle(data: dict[str, object], occurred_at: datetime) -> _Details:
        source = _host_name(data, "SourceHost")  # migrations name the host the VM left
        return _Details(event_type, extra={"source_host": source} if source else {})

    return handle


def _reverted(data: dict[str, object], occurred_at: datetime) -> _Details:
    """Reverts name the snapshot only inside the formatted message, which is only a hint:
    a message that cannot be read leaves the snapshot unknown, and a name that is not an
    identifier becomes ``sha256:<hex>`` (``_common.name_identifier``); the revert is kept."""
    message = data.get("FullFormattedMessage")
    if not isinstance(message, str) or len(message) > _MAX_MESSAGE:
        return _Details(EventType.SNAPSHOT_REVERTED)
    match = _REVERT_MESSAGE.search(message)
    if match is None:
        return _Details(EventType.SNAPSHOT_REVERTED)
    name = c.name_identifier(match.group(1), "data.FullFormattedMessage")
    number = match.group(2)
    extra = {"snapshot_number": number} if len(number) <= c.MAX_IDENTIFIER else {}
    return _Details(EventType.SNAPSHOT_REVERTED, snapshot_id=name, extra=extra)


def _cloned(data: dict[str, object], occurred_at: datetime) -> _Details:
    """VmClonedEvent: ``Vm`` is the new VM, ``SourceVm`` the one it was cloned from."""
    source = c.sub_mapping(data, "SourceVm", "data")
    return _Details(EventType.VM_CLONED, source_vm_id=c.identifier(source, "Name", "data.SourceVm"))


def _task(data: dict[str, object], occurred_at: datetime) -> _Details:
    """Only the createSnapshot task matters; its queue time stands for the snapshot time."""
    info = c.sub_mapping(data, "Info", "data")
    description = c.string(info, "DescriptionId", "data.Info", max_len=256)
    if description != CREATE_SNAPSHOT_TASK:
        raise IgnoredPayload(f"vCenter task {description} is not acted on")
    return _Details(EventType.SNAPSHOT_CREATED, snapshot_created_at=occurred_at)


_HANDLERS: dict[str, _Handler] = {
    REVERTED: _reverted,
    "VmClonedEvent": _cloned,
    "TaskEvent": _task,
    **{name: _simple(event_type) for name, event_type in _SIMPLE.items()},
}
