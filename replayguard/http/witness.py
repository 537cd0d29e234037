"""HTTP for other deployments (role ``witness``; CONTRACT §10): hold their checkpoints.

This deployment's own continuity guard (``services/continuity.py``) is started by the app
factory (``http/app.py``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import NotFound
from .common import Route, json_response, read_json
from .state import RUNTIME, WITNESS_STORE


def _deployment(request: web.Request) -> str:
    value = request.match_info["deployment_id"]
    if not (1 <= len(value) <= 64 and value.isascii() and value.isalnum()):
        raise NotFound("no such deployment")
    return value


async def put_checkpoint(request: web.Request) -> web.Response:
    deployment = _deployment(request)
    payload = await read_json(request)
    body = await request.app[WITNESS_STORE].offer(deployment, payload, request.app[RUNTIME].now_us())
    return json_response(body)


async def get_checkpoint(request: web.Request) -> web.Response:
    held = await request.app[WITNESS_STORE].get(_deployment(request))
    if held is None:
        raise NotFound("this witness holds nothing for that deployment")
    return json_response(held)


_RECORD: dict[str, Any] = {"type": "object", "required": ["deployment_id", "public_key_pem", "checkpoint"]}

ROUTES = [
    Route("PUT", "/v1/witness/{deployment_id}", put_checkpoint, ("witness",),
          "Hold another deployment's newest signed checkpoint (refuses one that steps back or forks)",
          "witness", _RECORD, {"type": "object"}, errors=((409, "conflict"),)),
    Route("GET", "/v1/witness/{deployment_id}", get_checkpoint, ("witness",),
          "The checkpoint this witness holds for a deployment", "witness", None, _RECORD),
]
