"""Native hypervisor payloads → ``GenericEvent``: one pure parser per source.

Each parser is ``parse(payload: object) -> list[GenericEvent]``: it takes whatever the
JSON decoder produced, does no I/O and reads no clock, and raises ``MalformedPayload``
(with the path of the field at fault) or ``IgnoredPayload`` (well formed, nothing to
act on). ``PARSERS`` is the one place that names the sources the HTTP layer accepts.
"""

from __future__ import annotations

from collections.abc import Callable

from replayguard.core.events import GenericEvent
from replayguard.hypervisors import libvirt, openstack, proxmox, vsphere

Parser = Callable[[object], list[GenericEvent]]

PARSERS: dict[str, Parser] = {
    "libvirt": libvirt.parse,
    "vsphere": vsphere.parse,
    "proxmox": proxmox.parse,
    "openstack": openstack.parse,
}

__all__ = ["PARSERS", "Parser"]
