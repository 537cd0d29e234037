"""HTTP for analysts (role ``analyst``; CONTRACT §6): alerts, their live stream, VMs,
timelines, the ledger, its verification, checkpoints and the checkpoint public key.

The services and the alert feed are ``app[ANALYSTS]``, built and started by the app
factory (``http/app.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from .. import __version__
from ..core import cursors, stream_ids, validation
from ..core.ledger_check import Problem
from ..errors import InvalidRequest, Unavailable
from ..services.alertfeed_streams import CATCH_UP, PAGE, Subscriber
from ..services.alerts import (
    parse_alert_id,
    parse_filter,
    parse_note,
    query_time,
    render,
)
from ..services.continuity import ContinuityGuard
from .common import Route, json_response, query_int, read_json, stops_with_client
from .state import ANALYSTS, CALLER, RUNTIME, Analysts

ROLES = ("analyst",)
WRITE_TIMEOUT_S = 10.0
RIDE_OUT_MAX_S = 30.0  # how long an open stream waits for a database it cannot reach
T = TypeVar("T")


def _svc(request: web.Request) -> Analysts:
    return request.app[ANALYSTS]


# --- alerts ---------------------------------------------------------------------------

async def list_alerts(request: web.Request) -> web.Response:
    f = parse_filter(request.query, query_int(request, "limit", 50, 1, 500), _svc(request).alerts.cursor_key)
    items, cursor = await _svc(request).alerts.search(f)
    return json_response({"items": items, "next_cursor": cursor})


async def get_alert(request: web.Request) -> web.Response:
    alert_id = parse_alert_id(request.match_info["id"])
    return json_response(await _svc(request).alerts.get(alert_id))


async def acknowledge(request: web.Request) -> web.Response:
    alert_id = parse_alert_id(request.match_info["id"])
    note = parse_note(await read_json(request))
    runtime = request.app[RUNTIME]
    body = await _svc(request).alerts.acknowledge(alert_id, request[CALLER], note, runtime.now_us())
    if runtime.fanout is not None:
        await runtime.fanout.publish_alert(alert_id)  # the other instances' streams
    return json_response(body)


# --- the live stream ------------------------------------------------------------------

def _last_event_id(request: web.Request) -> stream_ids.EventId | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw is None or raw == "":
        return None
    try:
        return stream_ids.parse(raw)
    except ValueError:
        raise InvalidRequest("Last-Event-ID must be an event id this stream sent", field="Last-Event-ID") from None


def _frame(alert: dict[str, Any]) -> bytes:
    return b"id: %s\nevent: alert\ndata: %s\n\n" % (stream_ids.of_alert(alert).encode(), orjson.dumps(alert))


async def _held_at(request: web.Request, upto: int | None) -> tuple[int, str]:
    """The stream's position: the change the database holds at or below ``upto`` (None: its
    last) and the id that names it, so a client resumed from it is checked like one resumed
    from an event's id (0: the start)."""
    _, held = await _svc(request).alerts.held_at(upto)
    return stream_ids.position(held)


async def _position(request: web.Request, resp: web.StreamResponse, upto: int | None) -> int:
    """Sends the stream's position (``_held_at``) as an id-only frame; returns its change."""
    change, event_id = await _riding_out(request, lambda: _held_at(request, upto))
    await _send_position(resp, event_id)
    return change


async def _send_position(resp: web.StreamResponse, event_id: str) -> None:
    await _send(resp, b"id: %s\n\n" % event_id.encode())


async def _send(resp: web.StreamResponse, data: bytes) -> None:
    """A write that gives up on a client that stopped reading, instead of waiting forever."""
    await asyncio.wait_for(resp.write(data), WRITE_TIMEOUT_S)


async def _catch_up(request: web.Request, resp: web.StreamResponse, last: int) -> int:
    """Sends every change after ``last`` from the database; returns the highest change sent,
    or ``last`` when there was none."""
    while True:
        records = await _svc(request).alerts.changes(last, PAGE)
        for record in records:
            await _send(resp, _frame(render(record)))
            last = max(last, record["change_seq"])
        if len(records) < PAGE:
            return last


def _token(request: web.Request) -> str:
    """The bearer token the ``authorise`` middleware accepted for this request."""
    return request.headers.get("Authorization", "").partition(" ")[2].strip()


async def _token_valid(request: web.Request) -> bool:
    """Whether the token that opened the stream is still valid (revoked: the stream ends).
    Cheap: the API token cache answers until a token change is announced or it ages out."""
    return await _riding_out(request, lambda: request.app[RUNTIME].api_tokens.authenticate(_token(request))) \
        is not None


async def _riding_out(request: web.Request, read: Callable[[], Awaitable[T]]) -> T:
    """``read``, a read of the database, tried again while the database cannot be reached,
    for up to the stream's heartbeat interval (at most ``RIDE_OUT_MAX_S``): an open stream
    rides out a blip (a restart, a restore, a failover, when its token must be checked again
    and its position read) and sends nothing meanwhile. A longer outage ends it
    (``Unavailable``); its client resumes with Last-Event-ID."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(request.app[RUNTIME].settings.sse_heartbeat_s, RIDE_OUT_MAX_S)
    delay = 0.05
    while True:
        try:
            return await read()
        except Unavailable:
            if loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def _resume_from(request: web.Request, claimed: stream_ids.EventId) -> int:
    """Where a stream resumed with ``claimed`` goes on (``core/stream_ids.py``): after its
    change when the database holds it as the client got it, or holds its alert changed
    again since; from the start when the database went back."""
    alerts = _svc(request).alerts
    if claimed.alert is None:
        return stream_ids.resume_after(claimed, None, None, await alerts.last_change())
    last, at, named = await alerts.held_for(claimed.change, claimed.alert)
    return stream_ids.resume_after(claimed, at, named, last)


async def _pump(request: web.Request, resp: web.StreamResponse, sub: Subscriber,
                start: stream_ids.EventId | tuple[int, str]) -> None:
    """The stream's position first (a new stream: ``start``, the current change and its id,
    read after subscribing and before the answer's headers, so no change falls between and
    every change made once the client has the headers is sent; a stream resumed from
    ``start``, the client's Last-Event-ID: after replaying what was missed),
    then every live change above it, while the caller's token stays valid. A live change at
    or below the position is one the client has (or an alert's older state): never sent.
    A Last-Event-ID whose alert only changed again since resumes after it. One that shows
    the database went back in time (a restore, a failover to a standby behind: it holds
    another alert or other content at the client's change, or not the client's alert as
    raised at or after it; ``core/stream_ids.py``) names a point the service cannot place
    in the database's history, so the stream replays every change the database holds,
    from the start; so does a bare change number past the database's last change. A stream
    resumed from the start opens with an id-only frame ``0`` (below the client's id, like
    a go-back frame), so a client that keeps what it got knows that the changes which
    follow may be another history."""
    heartbeat = request.app[RUNTIME].settings.sse_heartbeat_s
    await _send(resp, b"retry: 2000\n\n")
    if isinstance(start, stream_ids.EventId):
        after = await _resume_from(request, start)
        if after < start.change:  # from the start: an id-only frame ``0`` first, as a go-back frame
            await _send_position(resp, stream_ids.position(None)[1])
        last = sub.position = await _position(request, resp, await _catch_up(request, resp, after))
    else:
        last = sub.position = start[0]
        await _send_position(resp, start[1])
    while not sub.dropped:
        try:
            item = await asyncio.wait_for(sub.queue.get(), heartbeat)
        except TimeoutError:
            if not await _token_valid(request):
                return
            await _send(resp, b": heartbeat\n\n")
            continue
        if item is None:
            return
        change, alert = item
        if alert is None:  # the database went back to ``change``: what it numbers after comes again
            if change < last:
                last = sub.position = await _position(request, resp, change)
            continue
        if alert is CATCH_UP:  # the queue overflowed: what it dropped is read from the database
            if not await _token_valid(request):
                return
            last = sub.position = await _catch_up(request, resp, last)
            continue
        if change <= last:
            continue
        if not await _token_valid(request):
            return
        await _send(resp, _frame(alert))
        last = sub.position = change


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: one ``alert`` event per new or updated alert, its id the change
    number, the alert's id and digests of the alert at that change and of what raised it
    (``core/stream_ids.py``); every stream
    opens with its position (an ``id:`` line), so a client resumes from it even when it
    dropped before any alert."""
    last = _last_event_id(request)
    feed = _svc(request).feed
    sub = feed.streams.subscribe()
    try:
        # A new stream's position is read before its headers go: a 503 while the database
        # cannot be reached, and a client that has the headers gets every later change.
        start = last if last is not None else await _held_at(request, None)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        # The client left or stalled, the database went, or the token was revoked: it
        # reconnects with Last-Event-ID (a revoked token is refused then). A stream only
        # reads and sends: it stops when its client leaves, so a stream nobody reads does
        # not hold its place under max_sse_subscribers until its next heartbeat.
        with contextlib.suppress(ConnectionError, TimeoutError, Unavailable), stops_with_client(request):
            await _pump(request, resp, sub, start)
    finally:
        feed.streams.unsubscribe(sub)
    return resp


# --- VMs, timelines, the ledger ---------------------------------------------------------

def _vm_cursor(request: web.Request) -> str | None:
    raw = request.query.get("cursor")
    if not raw:
        return None
    value = cursors.open_cursor(_svc(request).alerts.cursor_key, "vms", raw)
    return validation.check_identifier(value, "cursor")


async def list_vms(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 100, 1, 1000)
    items, after = await _svc(request).timeline.vms(_vm_cursor(request), limit)
    cursor = cursors.issue(_svc(request).alerts.cursor_key, "vms", after) if after else None
    return json_response({"items": items, "next_cursor": cursor})


async def vm_timeline(request: web.Request) -> web.Response:
    vm_id = validation.check_identifier(request.match_info["vm_id"], "vm_id")
    since, until = query_time(request.query, "since"), query_time(request.query, "until")
    timeline = _svc(request).timeline
    page = await timeline.timeline(vm_id, query_int(request, "after_seq", 0, 0, 2**62), since, until,
                                   query_int(request, "limit", 200, 1, 1000))
    return json_response({"vm_id": vm_id, "items": page[0], "next_after_seq": page[1],
                          "rollback_windows": await timeline.windows(vm_id, since, until)})


async def ledger_entries(request: web.Request) -> web.Response:
    raw_vm = request.query.get("vm_id")
    vm_id = validation.check_identifier(raw_vm, "vm_id") if raw_vm else None
    items, after = await _svc(request).timeline.ledger(
        vm_id, query_int(request, "after_seq", 0, 0, 2**62), query_int(request, "limit", 100, 1, 1000))
    return json_response({"items": items, "next_after_seq": after})


async def ledger_verify(request: web.Request) -> web.Response:
    ledger = _svc(request).ledger
    guard = request.app[RUNTIME].continuity
    rollback = await guard.check()  # shared with the guard's own rounds: not cut short
    # The whole chain is long work, read-only: it stops when the client goes away (the
    # analyst left the ledger page) rather than hold the one chain check at a time for nobody.
    with stops_with_client(request):
        report = await ledger.verify(rollback=rollback, now_us=request.app[RUNTIME].now_us())
    if report.finding is not None and report.finding.problem is not Problem.LEDGER_ROLLBACK:
        await ledger.raise_tamper_alert(report.finding, request.app[RUNTIME].now_us(), report.state)
    return json_response(report.to_json())


async def ledger_checkpoints(request: web.Request) -> web.Response:
    before = request.query.get("before_seq")
    limit = query_int(request, "limit", 100, 1, 1000)
    before_seq = query_int(request, "before_seq", 0, 1, 2**62) if before else None
    ledger = _svc(request).ledger
    items = await ledger.list_checkpoints(before_seq, limit)
    return json_response({"items": items, "key_id": ledger.key_id})


async def ledger_public_key(request: web.Request) -> web.Response:
    return json_response(_svc(request).ledger.public_key_json())


def _shown(name: str) -> str:
    """A witness's name without userinfo, query or fragment (a URL may carry credentials)."""
    if not name.startswith(("http://", "https://")):
        return name
    parts = urlsplit(name)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _witnesses(guard: ContinuityGuard) -> dict[str, Any]:
    """The continuity verdict and, per witness, whether it answered and what it holds."""
    items = [{"name": _shown(name), "state": "unknown" if st.up is None else "up" if st.up else "unreachable",
              "held_seq": st.held.seq if st.held is not None else None,
              "verdict": st.verdict.value if st.verdict is not None else None}
             for name, st in guard.states.items()]
    return {"status": guard.status(), "witnesses": items,
            "rollback": guard.rollback.to_json() if guard.rollback is not None else None}


async def status(request: web.Request) -> web.Response:
    """The ledger's head and last checkpoint, continuity and witnesses, this instance's feed
    role and sink backlogs, and the caller's role."""
    svc = _svc(request)
    last = await svc.ledger.list_checkpoints(None, 1)
    dispatcher = svc.feed.sinks.dispatcher
    sinks = [{"name": name, "backlog": st.backlog, "delivered": st.delivered, "failed_attempts": st.failed_attempts,
              "rejected": st.rejected, "dropped": st.dropped, "last_error": st.last_error}
             for name, st in (dispatcher.stats().items() if dispatcher is not None else ())]
    continuity = _witnesses(request.app[RUNTIME].continuity)
    return json_response({
        "version": __version__, "leader": svc.feed.leader,
        "ledger": {"head": await svc.ledger.head(), "last_checkpoint": last[0] if last else None},
        "continuity": continuity["status"], "rollback": continuity["rollback"],
        "witnesses": continuity["witnesses"],
        "sinks": sinks, "sse_subscribers": len(svc.feed.streams.open),
        "caller": {"role": request[CALLER].role, "name": request[CALLER].name},
    })


_OBJ: dict[str, Any] = {"type": "object"}
_LIST = {"type": "object", "required": ["items"], "properties": {
    "items": {"type": "array", "items": _OBJ}, "next_cursor": {"type": ["string", "null"]}}}
_PAGE_PROPERTIES: dict[str, Any] = {
    "items": {"type": "array", "items": _OBJ}, "next_after_seq": {"type": ["integer", "null"]}}
_PAGE = {"type": "object", "required": ["items"], "properties": _PAGE_PROPERTIES}
_TIMELINE = {"type": "object", "required": ["vm_id", "items", "rollback_windows"], "properties": {
    **_PAGE_PROPERTIES, "vm_id": {"type": "string"},
    "rollback_windows": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "vm_id": {"type": "string"}, "start": {"type": ["string", "null"]},
        "end": {"type": "string"}, "cause": {"type": "string"}, "event_id": {"type": ["string", "null"]},
        "seq": {"type": "integer"}}}}}}
_ACK = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 2000}}}
_VERIFY = {"type": "object", "required": ["ok", "checked", "head"], "properties": {
    "ok": {"type": "boolean"}, "checked": {"type": "integer"}, "first_bad_seq": {"type": "integer"},
    "problem": {"type": "string"}, "head": {"type": "object", "properties": {
        "seq": {"type": "integer"}, "hash": {"type": "string"}}},
    "state": {"type": "object", "required": ["ok", "checked"], "properties": {
        "ok": {"type": "boolean"}, "checked": {"type": "integer"},
        "first_disagreement": {"type": "object", "properties": {
            "seq": {"type": "integer"}, "table": {"type": "string"}, "key_digest": {"type": "string"}}}}}}}
_STATUS = {"type": "object", "required": ["version", "leader", "ledger", "sinks"], "properties": {
    "version": {"type": "string"}, "leader": {"type": "boolean"}, "sse_subscribers": {"type": "integer"},
    "caller": {"type": "object", "properties": {"role": {"type": "string"}, "name": {"type": "string"}}},
    "ledger": {"type": "object", "properties": {"head": {"type": "object"},
                                                "last_checkpoint": {"type": ["object", "null"]}}},
    "sinks": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "backlog": {"type": "integer"}, "delivered": {"type": "integer"},
        "failed_attempts": {"type": "integer"}, "last_error": {"type": ["string", "null"]}}}},
    "continuity": {"type": "string", "enum": ["ok", "unchecked", "witness_unreachable", "ledger_rollback"]},
    "rollback": {"type": ["object", "null"]},
    "witnesses": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "state": {"type": "string", "enum": ["up", "unreachable", "unknown"]},
        "held_seq": {"type": ["integer", "null"]}, "verdict": {"type": ["string", "null"]}}}}}}
_FILTERS = ("vm_id", "principal", "kind", "severity", "status", "since", "until", "limit", "cursor")


def _r(method: str, path: str, handler: Any, summary: str, response: dict[str, Any] | None = _OBJ,
       request: dict[str, Any] | None = None, query: tuple[str, ...] = ()) -> Route:
    return Route(method, path, handler, ROLES, summary, "analysts", request, response, query=query)


ROUTES = [
    _r("GET", "/v1/alerts", list_alerts, "List alerts, newest first, with filters and a cursor", _LIST,
       query=_FILTERS),
    _r("GET", "/v1/alerts/stream", stream,
       "Server-Sent Events: one event per new or updated alert (Last-Event-ID resumes)", None,
       query=("last_event_id",)),
    _r("GET", "/v1/alerts/{id}", get_alert, "An alert with the ledger entries and hypervisor events behind it"),
    _r("POST", "/v1/alerts/{id}/acknowledge", acknowledge, "Acknowledge an alert (written to the ledger)",
       request=_ACK),
    _r("GET", "/v1/vms", list_vms, "List VMs with their open alerts and rollbacks", _LIST,
       query=("limit", "cursor")),
    _r("GET", "/v1/vms/{vm_id}/timeline", vm_timeline,
       "A VM's snapshots, reverts, decisions and alerts in ledger order, and its rollback windows", _TIMELINE,
       query=("since", "until", "after_seq", "limit")),
    _r("GET", "/v1/ledger", ledger_entries, "Ledger entries (digests, never raw credentials)", _PAGE,
       query=("vm_id", "after_seq", "limit")),
    _r("GET", "/v1/ledger/verify", ledger_verify,
       "Recompute the whole hash chain; check the state tables against it", _VERIFY),
    _r("GET", "/v1/ledger/checkpoints", ledger_checkpoints, "Signed checkpoints, newest first", _LIST,
       query=("before_seq", "limit")),
    _r("GET", "/v1/ledger/public-key", ledger_public_key, "The Ed25519 key that signs checkpoints"),
    _r("GET", "/v1/status", status,
       "Ledger head and last checkpoint; this instance's alert-feed role and sink backlogs; the caller's role",
       _STATUS),
]
