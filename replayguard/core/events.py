"""Generic hypervisor events: the one shape every native form is parsed into.

The HTTP layer accepts the generic JSON of CONTRACT §5 and native payloads of real
hypervisors; each native parser is a pure function from a decoded payload to a list of
``GenericEvent`` (empty when the payload is irrelevant). Nothing here does I/O or reads
the clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class EventType(str, enum.Enum):
    SNAPSHOT_CREATED = "snapshot.created"
    SNAPSHOT_DELETED = "snapshot.deleted"
    SNAPSHOT_REVERTED = "snapshot.reverted"
    VM_RESTORED = "vm.restored"
    VM_CLONED = "vm.cloned"
    VM_MIGRATED = "vm.migrated"
    VM_STARTED = "vm.started"
    VM_STOPPED = "vm.stopped"

    @property
    def rolls_back(self) -> bool:
        """True for the types that put a VM's state back in time (they open a window)."""
        return self in (EventType.SNAPSHOT_REVERTED, EventType.VM_RESTORED, EventType.VM_CLONED)


@dataclass(frozen=True, slots=True)
class GenericEvent:
    """One hypervisor event in the contract's generic form (CONTRACT §5).

    ``snapshot_created_at`` is the time the restored state was taken (T of the window),
    ``occurred_at`` the time of the revert/restore/clone itself (R). Both are aware UTC
    datetimes or None.
    """

    event_id: str
    type: EventType
    vm_id: str
    occurred_at: datetime | None = None
    snapshot_id: str | None = None
    snapshot_created_at: datetime | None = None
    host: str | None = None
    source_vm_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class IgnoredPayload(Exception):
    """A native payload that is well formed but carries nothing replayguard acts on.

    ``reason`` is recorded; the HTTP layer answers 202 with ``ignored: true``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedPayload(Exception):
    """A native payload that cannot be understood; ``field`` names the part at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
