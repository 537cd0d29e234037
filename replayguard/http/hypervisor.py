"""HTTP for hypervisor event relays (role ``hypervisor``), and the admin's release of a VM.

``POST /v1/hypervisor/events`` takes the generic body of CONTRACT §5, or with
``?source=libvirt|vsphere|proxmox|openstack`` a native payload that the pure parser of
that source turns into generic events. An irrelevant native payload is answered 202 with
``ignored: true`` and its reason (logged, never stored); a malformed one is a 400 naming
the field at fault.
"""

from __future__ import annotations

import structlog
from aiohttp import web

from ..core import event_input, validation
from ..core.events import EventType, GenericEvent, IgnoredPayload, MalformedPayload
from ..errors import InvalidRequest
from ..hypervisors import PARSERS
from .common import Route, json_response, read_json
from .event_auth import check_event_signature
from .state import CALLER, EVENTS

log = structlog.get_logger(__name__)

MAX_NOTE = 1024


def _native(source: str, body: object) -> list[GenericEvent]:
    parser = PARSERS.get(source)
    if parser is None:
        raise InvalidRequest(f"source must be one of generic, {', '.join(sorted(PARSERS))}", field="source")
    try:
        return parser(body)
    except MalformedPayload as exc:
        raise InvalidRequest(exc.message, field=exc.field) from None


async def post_events(request: web.Request) -> web.Response:
    await check_event_signature(request)  # before parsing: unsigned input gets no further
    body = await read_json(request)
    source = request.query.get("source", "generic")
    try:
        events = [event_input.parse_generic(body)] if source == "generic" else _native(source, body)
    except IgnoredPayload as exc:
        log.info("hypervisor_event_ignored", source=source, reason=exc.reason)
        return json_response({"accepted": True, "ignored": True, "reason": exc.reason}, status=202)
    if not events:
        return json_response({"accepted": True, "ignored": True, "reason": "no event to act on"}, status=202)
    done = await request.app[EVENTS].ingest(events, source, request[CALLER])
    return json_response({"accepted": True, "duplicate": all(item.duplicate for item in done),
                          "events": len(done)}, status=202)


def _note(raw: object) -> str:
    body = validation.require_object(raw)
    note = body.get("note")
    if not isinstance(note, str) or not 1 <= len(note) <= MAX_NOTE or not note.isprintable():
        raise InvalidRequest(f"note must be 1 to {MAX_NOTE} printable characters", field="note")
    return note


async def clear_vm(request: web.Request) -> web.Response:
    vm_id = validation.check_identifier(request.match_info["vm_id"], "vm_id")
    note = _note(await read_json(request))
    cleared = await request.app[EVENTS].clear_vm(vm_id, note, request[CALLER].token_id)
    return json_response({"vm_id": cleared.vm_id, "refusing": False, "was_refusing": cleared.was_refusing,
                          "refusing_reason": cleared.reason, "seq": cleared.seq})


_ID = {"type": "string", "minLength": 1, "maxLength": 256, "not": {"enum": list(validation.DOT_SEGMENTS)}}
_TIME = {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]}
EVENT_SCHEMA = {
    "type": "object",
    "description": "The generic form; with ?source= the body is that hypervisor's native payload",
    "required": ["event_id", "type", "vm_id"],
    "properties": {
        "event_id": _ID, "vm_id": _ID, "snapshot_id": _ID, "host": _ID,
        "source_vm_id": {**_ID, "description": "the parent VM; required for vm.cloned"},
        "type": {"type": "string", "enum": [t.value for t in EventType]},
        "snapshot_created_at": _TIME, "occurred_at": _TIME,
    },
}
ACCEPTED_SCHEMA = {
    "type": "object", "required": ["accepted"],
    "properties": {"accepted": {"type": "boolean"}, "duplicate": {"type": "boolean"},
                   "events": {"type": "integer"}, "ignored": {"type": "boolean"},
                   "reason": {"type": "string"}},
}
CLEAR_SCHEMA = {
    "type": "object", "required": ["note"],
    "properties": {"note": {"type": "string", "minLength": 1, "maxLength": MAX_NOTE}},
}
CLEARED_SCHEMA = {
    "type": "object", "required": ["vm_id", "refusing", "seq"],
    "properties": {"vm_id": {"type": "string"}, "refusing": {"type": "boolean"},
                   "was_refusing": {"type": "boolean"}, "refusing_reason": {"type": ["string", "null"]},
                   "seq": {"type": "integer"}},
}

ROUTES = [
    Route("POST", "/v1/hypervisor/events", post_events, ("hypervisor",),
          "Report a hypervisor event (generic, or native with ?source=)", "hypervisor",
          EVENT_SCHEMA, ACCEPTED_SCHEMA, status=202, query=("source",),
          errors=((409, "The same event_id was reported with a different body"),)),
    Route("POST", "/v1/vms/{vm_id}/clear", clear_vm, ("admin",),
          "Lift a VM's refusal after a detected rollback or clone, with a note", "admin",
          CLEAR_SCHEMA, CLEARED_SCHEMA),
]
