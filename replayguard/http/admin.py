"""HTTP for administrators (role ``admin``): enrolment of OTP tokens, principals and unlock."""

from __future__ import annotations

import structlog
from aiohttp import web

from ..core import validation
from ..core.cursors import cursor_key
from ..services.alerts import parse_note
from ..services.principals import PrincipalService, decode_cursor
from .common import Route, json_response, query_int, read_json
from .state import CALLER, RUNTIME

log = structlog.get_logger("replayguard.admin")


def _principal(request: web.Request) -> str:
    return validation.check_identifier(request.match_info["principal"], "principal")


async def enroll(request: web.Request) -> web.Response:
    principal = _principal(request)
    req = validation.enroll_request(await read_json(request))
    runtime = request.app[RUNTIME]
    enrolled = await runtime.tokens.enroll(principal, req, runtime.now_us())
    return json_response({
        "token_id": enrolled.token_id, "principal": principal, "type": enrolled.type,
        "secret": enrolled.secret_b32, "provisioning_uri": enrolled.provisioning_uri,
    }, status=201, headers={"Cache-Control": "no-store"})


async def list_tokens(request: web.Request) -> web.Response:
    principal = _principal(request)
    return json_response({"items": await request.app[RUNTIME].tokens.listing(principal)})


async def delete_token(request: web.Request) -> web.Response:
    principal = _principal(request)
    token_id = validation.check_identifier(request.match_info["token_id"], "token_id")
    runtime = request.app[RUNTIME]
    await runtime.tokens.delete(principal, token_id, runtime.now_us())
    return web.Response(status=204)


async def list_principals(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 100, 1, 500)
    raw = request.query.get("cursor")
    runtime = request.app[RUNTIME]
    service = PrincipalService(runtime.pool, cursor_key(runtime.keys.pepper))
    after = decode_cursor(service.cursor_key, raw) if raw else None
    items, cursor = await service.page(after, limit, runtime.now_us())
    return json_response({"items": items, "next_cursor": cursor})


async def unlock(request: web.Request) -> web.Response:
    principal = _principal(request)
    note = parse_note(await read_json(request))
    runtime = request.app[RUNTIME]
    service = PrincipalService(runtime.pool, on_recorded=runtime.continuity.recorded)
    done = await service.unlock(principal, note, request[CALLER], runtime.now_us())
    log.info("principal_unlocked", principal=principal, was_locked=done.was_locked, seq=done.seq)
    return json_response({"principal": principal, "locked": False, "failures": 0,
                          "was_locked": done.was_locked, "failures_before": done.failures, "seq": done.seq})


ENROLL_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["totp", "hotp"], "default": "totp"},
        "secret": {"type": "string", "description": "base32, 128 bits or more (RFC 4226); generated when absent"},
        "digits": {"type": "integer", "minimum": 6, "maximum": 8, "default": 6},
        "period": {"type": "integer", "minimum": 10, "maximum": 120, "default": 30},
        "algorithm": {"type": "string", "enum": ["SHA1", "SHA256", "SHA512"], "default": "SHA1"},
    },
}
ENROLLED_SCHEMA = {
    "type": "object", "required": ["token_id", "secret", "provisioning_uri"],
    "properties": {"token_id": {"type": "string"}, "principal": {"type": "string"}, "type": {"type": "string"},
                   "secret": {"type": "string"}, "provisioning_uri": {"type": "string"}},
}
PRINCIPAL_SCHEMA = {
    "type": "object", "required": ["principal", "failures", "locked", "tokens"],
    "properties": {
        "principal": {"type": "string"}, "failures": {"type": "integer"}, "locked": {"type": "boolean"},
        "locked_until": {"type": ["string", "null"], "format": "date-time"},
        "tokens": {"type": "array", "items": {"type": "object", "properties": {
            "token_id": {"type": "string"}, "type": {"type": "string", "enum": ["totp", "hotp"]},
            "state": {"type": "string", "enum": ["active", "deleted"]},
            "created_at": {"type": ["string", "null"]}, "deleted_at": {"type": ["string", "null"]}}}},
    },
}
PRINCIPAL_LIST_SCHEMA = {"type": "object", "required": ["items", "next_cursor"], "properties": {
    "items": {"type": "array", "items": PRINCIPAL_SCHEMA}, "next_cursor": {"type": ["string", "null"]}}}
UNLOCK_SCHEMA = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 2000}}}
UNLOCKED_SCHEMA = {"type": "object", "required": ["principal", "locked", "seq"], "properties": {
    "principal": {"type": "string"}, "locked": {"type": "boolean"}, "failures": {"type": "integer"},
    "was_locked": {"type": "boolean"}, "failures_before": {"type": "integer"}, "seq": {"type": "integer"}}}
TOKEN_LIST_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object"}}}}

ROUTES = [
    Route("POST", "/v1/principals/{principal}/tokens", enroll, ("admin",),
          "Enroll a TOTP or HOTP token; the secret is shown this once", "admin",
          ENROLL_SCHEMA, ENROLLED_SCHEMA, status=201),
    Route("GET", "/v1/principals/{principal}/tokens", list_tokens, ("admin",),
          "List a principal's active tokens (never their secrets)", "admin", None, TOKEN_LIST_SCHEMA),
    Route("DELETE", "/v1/principals/{principal}/tokens/{token_id}", delete_token, ("admin",),
          "Delete a token", "admin", None, None, status=204),
    Route("GET", "/v1/principals", list_principals, ("admin",),
          "List principals with their tokens' state, failure count and lockout, by name", "admin",
          None, PRINCIPAL_LIST_SCHEMA, query=("limit", "cursor")),
    Route("POST", "/v1/principals/{principal}/unlock", unlock, ("admin",),
          "End a principal's lockout and reset its failure count (written to the ledger)", "admin",
          UNLOCK_SCHEMA, UNLOCKED_SCHEMA),
]
