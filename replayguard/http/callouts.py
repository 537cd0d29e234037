"""HTTP for guests' authentication stacks (role ``callout``): verify and consume."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core import receipts, validation
from ..core.decisions import DecisionResult, Flag, Reason, Verdict
from ..runtime import Runtime
from ..services.apitokens import Caller
from .common import Route, json_response, note_decision, read_json
from .state import CALLER, RUNTIME


async def answer_otp(runtime: Runtime, caller: Caller, payload: Any) -> tuple[int, Any, DecisionResult]:
    floor = runtime.continuity.admit_decisions()
    result = await runtime.decisions.verify_otp(validation.otp_request(payload), caller)
    runtime.continuity.confirm(floor, result.seq)
    return 200, result.to_json(), result


async def answer_nonce(runtime: Runtime, caller: Caller, payload: Any) -> tuple[int, Any, DecisionResult]:
    floor = runtime.continuity.admit_decisions()
    req = validation.nonce_request(payload, runtime.settings.nonce_max_ttl_s)
    result = await runtime.decisions.consume_nonce(req, caller)
    runtime.continuity.confirm(floor, result.seq)
    return 200, result.to_json(), result


def render(request: web.Request, answer: tuple[int, Any, DecisionResult]) -> web.Response:
    """An answer (status, body or None, decision) as aiohttp's response."""
    status, body, result = answer
    note_decision(request, result.verdict.value, result.reason.value)
    return web.Response(status=status) if body is None else json_response(body, status=status)


async def verify_otp(request: web.Request) -> web.Response:
    return render(request, await answer_otp(request.app[RUNTIME], request[CALLER], await read_json(request)))


async def consume_nonce(request: web.Request) -> web.Response:
    return render(request, await answer_nonce(request.app[RUNTIME], request[CALLER], await read_json(request)))


_ID = {"type": "string", "minLength": 1, "maxLength": 256, "not": {"enum": list(validation.DOT_SEGMENTS)}}
_RECEIPT = {"type": "string", "maxLength": receipts.MAX_LENGTH}
_RECEIPT_KEPT = {"type": "boolean", "default": False,
                 "description": "the caller keeps receipts: sending none means it lost the one it stored"}
_REQUEST_ID = {"type": "string", "minLength": validation.MIN_REQUEST_ID, "maxLength": validation.MAX_REQUEST_ID,
               "pattern": "^[!-~]+$"}
_RECEIPT_REQUESTS = {
    "receipt_request": {**_REQUEST_ID, "description": "an id the caller chose for this request and stored"
                        " before sending it"},
    "receipt_unanswered": {**_REQUEST_ID, "description": "the receipt_request of the caller's previous request,"
                           " whose answer it never got (with the receipt it presented then)"},
}
DECISION_SCHEMA = {
    "type": "object",
    "required": ["decision", "reason", "flags", "seq", "receipt"],
    "properties": {
        "decision": {"type": "string", "enum": [v.value for v in Verdict]},
        "reason": {"type": "string", "enum": [r.value for r in Reason]},
        "flags": {"type": "array", "items": {"type": "string", "enum": [f.value for f in Flag]}},
        "seq": {"type": "integer"},
        "receipt": {"type": "string"},
        "alert_id": {"type": "string"},
    },
}
OTP_SCHEMA = {
    "type": "object", "required": ["vm_id", "principal", "otp"],
    "properties": {
        "vm_id": _ID, "principal": _ID, "otp": {"type": "string", "minLength": 1, "maxLength": 64},
        "receipt": _RECEIPT, "receipt_kept": _RECEIPT_KEPT, **_RECEIPT_REQUESTS,
        "context": {"type": "object", "maxProperties": 16,
                    "additionalProperties": {"type": ["string", "number"], "maxLength": 256}},
    },
}
NONCE_SCHEMA = {
    "type": "object", "required": ["vm_id", "scope", "nonce"],
    "properties": {
        "vm_id": _ID, "scope": _ID, "nonce": {"type": "string", "minLength": 1, "maxLength": 1024},
        "ttl_s": {"type": "integer", "minimum": 1, "default": validation.DEFAULT_TTL_S},
        "issued_at": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]},
        "receipt": _RECEIPT, "receipt_kept": _RECEIPT_KEPT, **_RECEIPT_REQUESTS,
    },
}

# The routes the fast front (http/front.py) may answer itself, and how.
FAST = {"/v1/otp/verify": answer_otp, "/v1/nonces/consume": answer_nonce}

ROUTES = [
    Route("POST", "/v1/otp/verify", verify_otp, ("callout",), "Verify and consume a one-time password",
          "callouts", OTP_SCHEMA, DECISION_SCHEMA),
    Route("POST", "/v1/nonces/consume", consume_nonce, ("callout",), "Consume a nonce exactly once",
          "callouts", NONCE_SCHEMA, DECISION_SCHEMA),
]
