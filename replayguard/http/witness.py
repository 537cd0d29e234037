"""HTTP for other deployments (role ``witness``; CONTRACT §10): hold their checkpoints.

``setup`` also runs this deployment's own continuity guard: the first comparison with the
witnesses completes before the service answers anything, then one every ``CHECK_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from ..errors import NotFound
from ..services.continuity import _DOWN
from ..services.witness_store import WitnessStore
from .common import Route, json_response, read_json
from .state import RUNTIME

log = structlog.get_logger(__name__)

STORE = web.AppKey("witness_store", WitnessStore)


def _deployment(request: web.Request) -> str:
    value = request.match_info["deployment_id"]
    if not (1 <= len(value) <= 64 and value.isascii() and value.isalnum()):
        raise NotFound("no such deployment")
    return value


async def put_checkpoint(request: web.Request) -> web.Response:
    deployment = _deployment(request)
    payload = await read_json(request)
    body = await request.app[STORE].offer(deployment, payload, request.app[RUNTIME].now_us())
    return json_response(body)


async def get_checkpoint(request: web.Request) -> web.Response:
    held = await request.app[STORE].get(_deployment(request))
    if held is None:
        raise NotFound("this witness holds nothing for that deployment")
    return json_response(held)


async def _guard_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    app[STORE] = WitnessStore(runtime.pool)
    try:
        await runtime.continuity.check()
    except _DOWN as exc:
        log.warning("continuity_check_failed", error=type(exc).__name__)
    task = asyncio.create_task(runtime.continuity.run(), name="continuity-guard")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_guard_ctx)


_RECORD: dict[str, Any] = {"type": "object", "required": ["deployment_id", "public_key_pem", "checkpoint"]}

ROUTES = [
    Route("PUT", "/v1/witness/{deployment_id}", put_checkpoint, ("witness",),
          "Hold another deployment's newest signed checkpoint (refuses one that steps back or forks)",
          "witness", _RECORD, {"type": "object"}, errors=((409, "conflict"),)),
    Route("GET", "/v1/witness/{deployment_id}", get_checkpoint, ("witness",),
          "The checkpoint this witness holds for a deployment", "witness", None, _RECORD),
]
