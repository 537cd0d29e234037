"""HTTP for operators: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from ..runtime import ledger_writable
from .common import Route, json_response
from .state import RUNTIME

OPENAPI = web.AppKey("openapi", dict)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def _sync(count: int | None) -> str:
    """Whether a synchronous standby acknowledges commits (never a reason to be unready)."""
    return "unknown" if count is None else "yes" if count > 0 else "no"


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    ledger = await ledger_writable(runtime.pool)
    runtime.metrics.ledger_up.set(1 if ledger else 0)
    checks: dict[str, str] = {"ledger": "ok" if ledger else "unavailable",
                              "continuity": runtime.continuity.status(),
                              "sync_standby": _sync(runtime.continuity.sync_standbys)}
    ready = ledger and runtime.continuity.ready()
    if runtime.fanout is not None:
        redis_ok = await runtime.fanout.ping()
        if runtime.metrics.redis_up is not None:
            runtime.metrics.redis_up.set(1 if redis_ok else 0)
        checks["redis"] = "ok" if redis_ok else "unavailable"
        ready = ready and redis_ok
    return json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


_STATUS = {"type": "object"}

ROUTES = [
    Route("GET", "/healthz", healthz, None, "The process is up", "ops", None, _STATUS),
    Route("GET", "/readyz", readyz, None, "The ledger is writable (and Redis reachable when configured)",
          "ops", None, _STATUS),
    Route("GET", "/metrics", metrics, None, "Prometheus metrics", "ops", None, None),
    Route("GET", "/v1/openapi.json", openapi, None, "This API's OpenAPI 3.1 document", "ops", None, _STATUS),
]
