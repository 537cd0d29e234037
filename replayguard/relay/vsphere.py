"""The vSphere forwarder: a VEBA (VMware Event Broker Appliance) Knative function.

VEBA's Knative broker delivers each vCenter event as a CloudEvent, in binary mode
(``ce-id``/``ce-type``/``ce-source``/``ce-time`` headers, the vim25 event as the JSON
body) or structured mode (``application/cloudevents+json``). This small HTTP handler turns
either into the structured JSON ``replayguard/hypervisors/vsphere.py`` parses and posts it
unchanged (same attributes, same ``data``) to ``POST /v1/hypervisor/events?source=vsphere``
with a Bearer token of role ``hypervisor``.

VEBA gets a 2xx only once the event is safe: 200 when the service took it (2xx, or 409:
it already holds that id) or found it malformed for good (400 and other 4xx: kept in
``dead/`` for the operator, logged as an error); 202 when the service could not be
reached and the event is fsynced in the spool, from which a background task resends it
with backoff. A 401, 403 or 413 from the service (a wrong token, a missing or wrong event
signature), or a redirect, 404 or 405 (a service URL that misses the events endpoint), is
the operator's to fix: the event stays in the spool for resending and VEBA
gets a 502, so the broker's own retries and alarms see the failure too. If even the
spool cannot be written the answer is 503, so the broker retries.

The service takes bodies up to 64 KiB. An event whose structured form is larger is cut
down to the attributes and ``data`` fields the service's vSphere parser reads (the VM,
hosts, source VM, time, revert message and task description); one still larger is
answered 413 and logged as an error, never forwarded to be refused there. VEBA's own
deliveries are read up to 1 MiB. Filtering is the service's job: an event it does not act
on is answered ``ignored`` there, not here.

``GET /metrics`` gives the events waiting in the spool, the letters in ``dead/`` and
those dropped to keep ``dead/`` within its bound, as Prometheus gauges and counters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
import structlog
from aiohttp import web

from ..aio import in_background
from ..errors import ConfigError
from ..settings import Secret
from .options import (
    Parser,
    add_secret_flag,
    checked_service_url,
    configure_logging,
    event_secret,
    pick,
    prepare_spool,
    read_token,
    required,
)
from .spool import (
    Answer,
    Outcome,
    Post,
    Retry,
    Spool,
    drain,
    post_json,
    refused_hint,
    service_reason,
    settle,
)

EVENTS_PATH = "/v1/hypervisor/events?source=vsphere"
STRUCTURED = "application/cloudevents+json"
REQUIRED = ("specversion", "id", "source", "type")
MAX_BODY = 1024 * 1024  # what VEBA may deliver
SERVICE_MAX_BODY = 64 * 1024  # what the service takes (http/common.py)
# The attributes and data fields replayguard/hypervisors/vsphere.py reads; the rest is cut
# from an event too large for the service.
KEPT_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype")
KEPT_DATA: dict[str, tuple[str, ...] | None] = {
    "CreatedTime": None, "EventTypeId": None, "FullFormattedMessage": None,
    "Vm": ("Name", "Vm"), "SourceVm": ("Name", "Vm"), "Host": ("Name",), "SourceHost": ("Name",),
    "Info": ("DescriptionId",),
}

log = structlog.get_logger("replayguard.relay.vsphere")


class InvalidCloudEvent(Exception):
    """The request is not a CloudEvent 1.0 with JSON data; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


# ---------------------------------------------------------------- pure: CloudEvents


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type in ("", "application/json", "text/json") or media_type.endswith("+json")


def _json(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidCloudEvent(f"{what} is not JSON") from None


def to_structured(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """A CloudEvent in either HTTP mode as one structured-mode JSON object.

    Binary mode: every ``ce-*`` header is an attribute (lower-cased, percent-decoded as
    the HTTP binding requires), ``Content-Type`` is ``datacontenttype`` and the body is
    ``data``. A JSON body that already holds ``specversion`` with no ``ce-`` headers is
    taken as structured too, as some senders label it plain ``application/json``.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    media_type = _media_type(lowered.get("content-type"))
    attributes = {k[3:]: unquote(v) for k, v in lowered.items() if k.startswith("ce-") and len(k) > 3}
    if media_type == STRUCTURED or (not attributes and _is_json(media_type)):
        event = _json(body, "the structured CloudEvent")
        if not isinstance(event, dict):
            raise InvalidCloudEvent("a structured CloudEvent is a JSON object")
    else:
        if not _is_json(media_type):
            raise InvalidCloudEvent(f"data of type {media_type} is not JSON", status=415)
        event = {**attributes, "data": _json(body, "the CloudEvent data")}
        if lowered.get("content-type"):
            event["datacontenttype"] = lowered["content-type"]
    _check(event)
    try:  # orjson reads 1,024 levels of nesting but writes 254: refuse what cannot be forwarded
        orjson.dumps(event)
    except orjson.JSONEncodeError:
        raise InvalidCloudEvent("the CloudEvent is nested too deeply to forward") from None
    return event


def _check(event: Mapping[str, Any]) -> None:
    for name in REQUIRED:
        if not isinstance(event.get(name), str) or not event[name]:
            raise InvalidCloudEvent(f"missing CloudEvents attribute {name!r}")
    if event["specversion"] != "1.0":
        raise InvalidCloudEvent("only CloudEvents specversion 1.0 is understood")


def trimmed(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event with only what the service's parser reads (for bodies over its limit)."""
    out = {k: event[k] for k in KEPT_ATTRIBUTES if k in event}
    data = event.get("data")
    if isinstance(data, dict):
        kept: dict[str, Any] = {}
        for key, fields in KEPT_DATA.items():
            value = data.get(key)
            if value is None:
                continue
            if fields is not None and isinstance(value, dict):
                value = {f: value[f] for f in fields if f in value}
            kept[key] = value
        out["data"] = kept
    return out


def service_body(event: Mapping[str, Any]) -> bytes | None:
    """The JSON to post: the event itself, else trimmed; None when even that is too large."""
    data = orjson.dumps(event)
    if len(data) <= SERVICE_MAX_BODY:
        return data
    data = orjson.dumps(trimmed(event))
    return data if len(data) <= SERVICE_MAX_BODY else None


# ---------------------------------------------------------------- forwarding


@dataclass(frozen=True)
class ForwarderConfig:
    service_url: str
    token: Secret
    spool_dir: Path
    retry_base: float = 0.5
    event_secret: Secret | None = None  # the service's event_hmac_secret: sign every event


@dataclass
class Forwarder:
    """Posts one event now; keeps it in the outbox when the service cannot take it yet."""

    outbox: Spool
    post: Post
    wake: asyncio.Event

    async def forward(self, event: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """The HTTP status and body to answer VEBA with, once the event is safe."""
        data = service_body(event)
        if data is None:
            log.error("event_too_large", event_id=event["id"], limit=SERVICE_MAX_BODY,
                      hint="the event's VM, host and message fields alone exceed the service's limit")
            return 413, {"forwarded": False, "error": f"the event is over {SERVICE_MAX_BODY} bytes "
                         "even with only the fields replayguard reads"}
        answer: Answer = await self.post(data)
        outcome = settle(answer)
        if outcome is Outcome.DELIVERED:
            log.info("event_forwarded", event_id=event["id"], status=answer.status)
            return 200, {"forwarded": True, "status": answer.status, "service": answer.body}
        path = self.outbox.put_bytes(str(event["id"]), data)
        if outcome is Outcome.DEAD:
            self.outbox.bury(path)
            log.error("event_rejected", event_id=event["id"], status=answer.status, moved_to="dead/",
                      dead_letters=len(self.outbox.dead_letters()), service_error=service_reason(answer.body))
            return 200, {"forwarded": False, "status": answer.status, "service": answer.body,
                         "parked": "dead/"}
        self.wake.set()
        if outcome is Outcome.REFUSED:
            log.error("event_refused", event_id=event["id"], status=answer.status, kept="spool",
                      hint=refused_hint(answer.status), service_error=service_reason(answer.body))
            return 502, {"forwarded": False, "spooled": True, "status": answer.status}
        log.warning("event_spooled", event_id=event["id"], status=answer.status)
        return 202, {"forwarded": False, "spooled": True}


FORWARDER = web.AppKey("forwarder", Forwarder)
CONFIG = web.AppKey("config", ForwarderConfig)


async def receive(request: web.Request) -> web.Response:
    """VEBA's delivery of one CloudEvent."""
    try:
        event = to_structured(request.headers, await request.read())
    except InvalidCloudEvent as exc:
        log.warning("cloudevent_invalid", reason=exc.message)
        return web.json_response({"error": exc.message}, status=exc.status)
    try:
        status, body = await request.app[FORWARDER].forward(event)
    except OSError as exc:  # spool unwritable: VEBA must keep the event and retry
        log.error("spool_write_failed", event_id=event["id"], error=str(exc))
        return web.json_response({"error": "cannot store the event"}, status=503)
    return web.json_response(body, status=status)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def metrics(request: web.Request) -> web.Response:
    """The spool's depth, ``dead/``'s letters and the letters dropped from it."""
    outbox = request.app[FORWARDER].outbox
    lines = [
        "# HELP replayguard_relay_spooled_events Events waiting in the spool for the service.",
        "# TYPE replayguard_relay_spooled_events gauge",
        f"replayguard_relay_spooled_events {len(outbox.pending())}",
        "# HELP replayguard_relay_dead_letters Events the service refused for good, kept in dead/.",
        "# TYPE replayguard_relay_dead_letters gauge",
        f"replayguard_relay_dead_letters {len(outbox.dead_letters())}",
        "# HELP replayguard_relay_dead_letters_dropped_total Letters removed to keep dead/ bounded.",
        "# TYPE replayguard_relay_dead_letters_dropped_total counter",
        f"replayguard_relay_dead_letters_dropped_total {outbox.dead_dropped}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def _forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the client session and the outbox drain; close both at shutdown."""
    config = app[CONFIG]
    url = config.service_url.rstrip("/") + EVENTS_PATH
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def post(data: bytes) -> Answer:
            return await post_json(session, url, config.token, data, config.event_secret)

        forwarder = Forwarder(Spool(config.spool_dir), post, asyncio.Event())
        app[FORWARDER] = forwarder
        async with in_background(drain(forwarder.outbox, post, "id", Retry(base=config.retry_base), forwarder.wake),
                                 "vsphere-drain"):
            yield


def create_app(config: ForwarderConfig) -> web.Application:
    """The function's app: ``POST /`` (what a Knative trigger calls) and ``GET /healthz``."""
    app = web.Application(client_max_size=MAX_BODY)
    app[CONFIG] = config
    app.cleanup_ctx.append(_forwarder_ctx)
    app.router.add_post("/", receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="replayguard-relay vsphere", description="Forward VEBA CloudEvents to replayguard.")
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", help="port to listen on (default: $PORT, as Knative sets it, else 8080)")
    p.add_argument("--service-url", help="replayguard base URL")
    p.add_argument("--token-file", help="file holding a replayguard token of role hypervisor")
    p.add_argument("--spool-dir", help="directory of events not yet acknowledged")
    add_secret_flag(p)
    return p


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> tuple[ForwarderConfig, str, int]:
    """Flags and ``REPLAYGUARD_RELAY_*`` → (config, listen address, port); problems are ConfigError."""
    args = _parser().parse_args(list(argv))
    port_text = args.port or env.get("PORT") or "8080"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--port must be 1-65535, got {port_text!r}", field="port")
    config = ForwarderConfig(
        service_url=checked_service_url(required(pick(args.service_url, env, "service-url"), "service-url")),
        token=read_token(pick(args.token_file, env, "token-file"), env),
        spool_dir=Path(required(pick(args.spool_dir, env, "spool-dir"), "spool-dir")),
        event_secret=event_secret(pick(args.event_hmac_secret_file, env, "event-hmac-secret-file"), env),
    )
    return config, args.listen, int(port_text)


def main(argv: list[str] | None = None) -> int:
    """``replayguard-relay vsphere …`` (or ``python -m replayguard.relay.vsphere``); returns the exit status."""
    try:
        config, host, port = load_config(sys.argv[1:] if argv is None else argv, os.environ)
        prepare_spool(config.spool_dir)
    except ConfigError as exc:
        print(f"replayguard-relay vsphere: error: {exc.message}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    configure_logging()
    web.run_app(create_app(config), host=host, port=port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
