"""HTTP for administrators (role ``admin``): enrolment of OTP tokens."""

from __future__ import annotations

from aiohttp import web

from ..core import validation
from .common import Route, json_response, read_json
from .state import RUNTIME


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


ENROLL_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["totp", "hotp"], "default": "totp"},
        "secret": {"type": "string", "description": "base32, 80 bits or more; generated when absent"},
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
TOKEN_LIST_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object"}}}}

ROUTES = [
    Route("POST", "/v1/principals/{principal}/tokens", enroll, ("admin",),
          "Enroll a TOTP or HOTP token; the secret is shown this once", "admin",
          ENROLL_SCHEMA, ENROLLED_SCHEMA, status=201),
    Route("GET", "/v1/principals/{principal}/tokens", list_tokens, ("admin",),
          "List a principal's active tokens (never their secrets)", "admin", None, TOKEN_LIST_SCHEMA),
    Route("DELETE", "/v1/principals/{principal}/tokens/{token_id}", delete_token, ("admin",),
          "Delete a token", "admin", None, None, status=204),
]
