"""The application factory: routes, middleware and resources, wired in one place.

Middleware order, outermost first: ``edge`` (request id, access log, metrics, and the
only catch-all that turns any error into the contract's error body), then ``authorise``
(bearer token and role, from the route table).

Resources, opened in this order on start-up and closed in reverse (``_resources_ctx``):
the runtime (pool, appender, token store, decision service, continuity guard), the
services the handlers call, the alert feed (live streams; on the one instance holding
the leader lock, checkpoints, sinks, purge and the state check), then the continuity
guard's first comparison with the witnesses, before anything is answered, and its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..aio import in_background
from ..core import cursors
from ..errors import (
    ClientError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ReplayGuardError,
    Unauthorized,
    Unavailable,
)
from ..logging import REQUEST_CONTEXT, request_line
from ..metrics import Metrics
from ..metrics_shared import PUBLISH_S
from ..pg.connections import SESSION_REFUSED_ERRORS, UNAVAILABLE_ERRORS
from ..runtime import Runtime, open_runtime
from ..services.alertfeed import AlertFeed
from ..services.alertfeed_sinks import build_dispatcher
from ..services.alerts import AlertService
from ..services.apitokens import Caller
from ..services.chain_reader import ChainProcess
from ..services.continuity import ContinuityGuard
from ..services.continuity_rollback import DOWN
from ..services.events import EventService
from ..services.ledger import LedgerService
from ..services.timeline import TimelineService
from ..services.witness_store import WitnessStore
from ..settings import Settings
from . import admin, analysts, callouts, console, hypervisor, openapi, ops, radius, witness
from .common import BEARER_CHALLENGE, MAX_BODY, Handler, Route, json_response, set_answer_headers
from .state import (
    ANALYSTS,
    CALLER,
    CLIENT_LEFT,
    DECISION,
    EVENTS,
    REASON,
    ROUTE,
    RUNTIME,
    WITNESS_STORE,
    Analysts,
)

log = structlog.get_logger("replayguard.http")

# Every audience module, imported plainly: a module that fails to import is a start-up
# error, never a service that quietly lacks its routes.
AUDIENCE_MODULES: list[ModuleType] = [callouts, admin, ops, hypervisor, analysts, radius, witness, console]
ROUTE_TABLE = web.AppKey("route_table", dict)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Generated request ids: a random per-process prefix and a counter (unique, and cheap;
# they need not be unpredictable).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def all_routes() -> list[Route]:
    return [route for module in AUDIENCE_MODULES for route in module.ROUTES]


def _route_of(request: web.Request) -> Route | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    table: dict[tuple[str, str], Route] = request.app[ROUTE_TABLE]
    return table.get((request.method, resource.canonical))


def _unlisted_path(request: web.Request) -> str:
    """The label of a request no API route took: the console's own paths, else "unmatched"."""
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical.startswith("/console"):
        return resource.canonical
    return "unmatched"


def _http_error(exc: web.HTTPException) -> ReplayGuardError:
    if exc.status == 404:
        return NotFound("no such resource")
    if exc.status == 405:
        return MethodNotAllowed("this method is not allowed on this resource")
    if exc.status == 413:
        return PayloadTooLarge(f"the request body must be at most {MAX_BODY} bytes")
    error = ClientError(exc.reason or "bad request")
    error.status = exc.status if 400 <= exc.status < 500 else 400
    return error


def request_id_for(header: str | None) -> str:
    """The client's X-Request-Id when it is a sane one, else a generated id."""
    if header and _REQUEST_ID.match(header):
        return header
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


def log_request(method: str, status: int, elapsed: float, decision: str | None, reason: str | None) -> None:
    """The one access-log line of a request (both fronts write it)."""
    fields: dict[str, object] = {"method": method, "status": status, "duration_ms": round(elapsed * 1000, 3)}
    if decision is not None:
        fields["decision"] = decision
        fields["reason"] = reason
    request_line(fields)


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, one access-log line, metrics, and errors rendered as the contract says."""
    request_id = request_id_for(request.headers.get("X-Request-Id"))
    route = _route_of(request)
    request[ROUTE] = route  # resolved once; authorise reads it
    path = route.path if route is not None else _unlisted_path(request)
    start = time.perf_counter()
    # One dict per request (authorise adds the caller); every log line of the request
    # carries it, and nothing of it outlives the request on a kept-alive connection.
    reset = REQUEST_CONTEXT.set({"request_id": request_id, "route": path,
                                 "audience": route.audience if route else None})
    try:
        response = await _guarded(request, handler)
        response.headers["X-Request-Id"] = request_id
        if response.status == 401:  # every 401, whoever raised it (RFC 9110 §15.5.2, RFC 6750 §3)
            response.headers.setdefault("WWW-Authenticate", BEARER_CHALLENGE)
        status = response.status
    except asyncio.CancelledError:
        if request.get(CLIENT_LEFT):  # a stream or verification stopped with its client
            _record(request, path, CLIENT_CLOSED_REQUEST, time.perf_counter() - start)
        raise
    else:
        _record(request, path, status, time.perf_counter() - start)
    finally:
        REQUEST_CONTEXT.reset(reset)
    return response


# nginx's status for a request whose client closed the connection before the answer:
# never sent, only logged and counted.
CLIENT_CLOSED_REQUEST = 499


def _record(request: web.Request, path: str, status: int, elapsed: float) -> None:
    """The request's access-log line (inside its log context) and its metrics."""
    log_request(request.method, status, elapsed, request.get(DECISION), request.get(REASON))
    request.app[RUNTIME].metrics.http_request(path, request.method, status, elapsed)


def error_answer(exc: Exception) -> tuple[int, dict[str, object]]:
    """The status and contract error body for an error a handler raised.

    ``ReplayGuardError`` says its own; a dependency that went away is 503 (nothing was
    accepted); anything else is logged with its traceback and answered 500 with no detail.
    """
    if isinstance(exc, ReplayGuardError):
        return exc.status, exc.body()
    if isinstance(exc, (*UNAVAILABLE_ERRORS, *SESSION_REFUSED_ERRORS)):
        log.warning("dependency_unavailable", error=type(exc).__name__)
        return 503, Unavailable("a dependency is unavailable; nothing was accepted").body()
    log.exception("unhandled_error", exc_info=exc)
    return 500, ReplayGuardError("internal error").body()


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        error = _http_error(exc)
        # aiohttp's 405 names the route's methods in Allow, which RFC 9110 §15.5.6 requires.
        allow = exc.headers.get("Allow") if error.status == 405 else None
        return json_response(error.body(), status=error.status, headers=None if allow is None else {"Allow": allow})
    except Exception as exc:  # noqa: BLE001 - the one catch-all: no input may produce a traceback
        status, body = error_answer(exc)
        return json_response(body, status=status)


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if header is None:
        raise Unauthorized("a bearer token is required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


async def authorised_caller(runtime: Runtime, route: Route, header: str | None) -> Caller:
    """The caller a bearer token names, if the route's roles admit it; else 401 or 403."""
    caller: Caller | None = await runtime.api_tokens.authenticate(bearer(header))
    if caller is None:
        raise Unauthorized("unknown or revoked token")
    if not route.allows(caller.role):
        raise Forbidden(f"role {caller.role!r} may not use this endpoint")
    fields = REQUEST_CONTEXT.get()
    if fields is not None:
        fields["caller"] = caller.token_id
    return caller


@web.middleware
async def authorise(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Checks the bearer token and the route's roles before the handler runs."""
    route: Route | None = request.get(ROUTE)
    if route is None or route.roles is None:
        return await handler(request)
    request[CALLER] = await authorised_caller(request.app[RUNTIME], route, request.headers.get("Authorization"))
    return await handler(request)


def _analysts(runtime: Runtime) -> Analysts:
    alerts = AlertService(runtime.pool, cursors.cursor_key(runtime.keys.pepper), runtime.continuity.recorded)
    ledger = LedgerService(runtime.pool, runtime.keys, runtime.settings.nonce_max_ttl_s,
                           ChainProcess(runtime.dsn, runtime.settings.statement_timeout_ms), serving=True,
                           signers=runtime.continuity.signers)
    feed = AlertFeed(runtime, alerts, ledger, build_dispatcher(runtime), runtime.settings.max_sse_subscribers)
    return Analysts(alerts=alerts, ledger=ledger, timeline=TimelineService(runtime.pool), feed=feed)


def _feed_gauges(registry: CollectorRegistry, feed: AlertFeed) -> None:
    Gauge("replayguard_sse_subscribers", "Open alert streams", registry=registry).set_function(
        lambda: len(feed.streams.open))
    Gauge("replayguard_alert_feed_leader", "1 on the instance feeding sinks and signing checkpoints",
          registry=registry).set_function(lambda: 1 if feed.leader else 0)
    Gauge("replayguard_sink_backlog", "Records waiting in the sinks' outboxes (this instance)",
          registry=registry).set_function(
        lambda: sum(s.backlog for s in feed.sinks.dispatcher.stats().values()) if feed.sinks.dispatcher else 0)


@contextlib.asynccontextmanager
async def _guarding(guard: ContinuityGuard) -> AsyncIterator[None]:
    """The guard's first comparison with the witnesses, then one every ``CHECK_S`` until closed."""
    try:
        await guard.check()
    except DOWN as exc:
        log.warning("continuity_check_failed", error=type(exc).__name__)
    async with in_background(guard.run(), "continuity-guard"):
        yield


@contextlib.asynccontextmanager
async def _writing_back(settings: Settings, registry: CollectorRegistry) -> AsyncIterator[None]:
    """With the embedded server, the write-back of its growing data files as they grow
    (``pg/writeback.py``); nothing with an external one, whose counter stays at 0."""
    files = Counter("replayguard_embedded_writeback_files",
                    "Data files of the embedded PostgreSQL whose write-back this process started", registry=registry)
    if not settings.embedded:
        yield
        return
    from ..pg.embedded import data_writeback

    writeback = data_writeback(settings.data_dir, on_pass=files.inc)
    writeback.start()
    try:
        yield
    finally:
        await asyncio.to_thread(writeback.stop)


@contextlib.asynccontextmanager
async def _sharing_metrics(metrics: Metrics, directory: Path | None) -> AsyncIterator[None]:
    """One of several workers (``directory``: theirs, made by ``serve``): this worker's figures
    for the others' scrapes every ``PUBLISH_S``, and a scrape here reports every worker."""
    if directory is None:
        yield
        return
    metrics.share(directory)

    async def publish() -> None:
        while True:
            try:
                with metrics.background.timed("metrics_share"):
                    await metrics.publish_in_thread()
            except OSError as exc:
                log.warning("metrics_share_failed", error=type(exc).__name__)
            await asyncio.sleep(PUBLISH_S)

    async with in_background(publish(), "metrics-publish"):
        yield


def _resources_ctx(settings: Settings, clock: Callable[[], float], dsn: str | None,  # type: ignore[no-untyped-def]
                   metrics_dir: Path | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_runtime(settings, clock=clock, dsn=dsn) as runtime:
            app[RUNTIME] = runtime
            app[EVENTS] = EventService(runtime.pool, runtime.clock, runtime.fanout,
                                       refuse_on_rollback=settings.receipt_reaction == "refuse",
                                       on_recorded=runtime.continuity.recorded)
            app[WITNESS_STORE] = WitnessStore(runtime.pool)
            app[ANALYSTS] = analyst_services = _analysts(runtime)
            _feed_gauges(runtime.metrics.registry, analyst_services.feed)
            await analyst_services.feed.start()
            try:
                async with (_guarding(runtime.continuity), _writing_back(settings, runtime.metrics.registry),
                            _sharing_metrics(runtime.metrics, metrics_dir)):
                    yield
            finally:
                await analyst_services.feed.stop()
                analyst_services.ledger.close()

    return ctx


async def _end_streams(app: web.Application) -> None:
    """Ends open alert streams at shutdown, so no handler keeps the service waiting."""
    if ANALYSTS in app:
        app[ANALYSTS].feed.streams.close()


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time,
               dsn: str | None = None, metrics_dir: Path | None = None) -> web.Application:
    """The whole service as an aiohttp application; resources open on startup. ``metrics_dir``:
    one of ``serve --workers N``'s workers, whose /metrics reports them all (``metrics_shared``)."""
    app = web.Application(middlewares=[edge, authorise], client_max_size=MAX_BODY + 1024)
    app.cleanup_ctx.append(_resources_ctx(settings, clock, dsn, metrics_dir))
    app.on_shutdown.append(_end_streams)
    app.on_response_prepare.append(set_answer_headers)
    routes = all_routes()
    table: dict[tuple[str, str], Route] = {}
    resources: dict[str, web.Resource] = {}
    for route in routes:
        resource = resources.get(route.path) or app.router.add_resource(route.path)
        resources[route.path] = resource
        resource.add_route(route.method, route.handler)
        table[(route.method, resource.canonical)] = route
    app[ROUTE_TABLE] = table
    app[ops.OPENAPI] = openapi.build(routes)
    console.setup(app)
    return app
