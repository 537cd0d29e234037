"""HTTP for FreeRADIUS (role ``callout``): ``rlm_rest``'s JSON body onto the OTP decision.

``rlm_rest`` with ``body = 'json'`` posts every request attribute as
``{"User-Name": {"type": "string", "value": ["alice"]}, …}`` and turns the HTTP status into
a module code: 2xx with attributes in the body → ``updated``, 401 → ``reject`` with the
body's reply attributes, 5xx → ``fail``. An accept is a 200 whose body sets the control
attribute ``Tmp-String-0`` to ``replayguard-accept``; the shipped site
(``deploy/freeradius``) accepts only on that marker after ``updated``, so an empty or HTML
200, a 204 or anything a stand-in on the path might answer is an Access-Reject. A reject
is a 401 whose only attribute is a ``Reply-Message``; a ledger that cannot be written
stays the 503 the middleware renders, which ``rlm_rest`` turns into a failure.

The VM is ``NAS-Identifier``, which the shipped site overwrites with the RADIUS client's
own ``vm_id`` from clients.conf (a NAS cannot name another VM); a NAS cannot keep
receipts, so none is sent. The Reply-Message says no more than the reason, and merges
reasons that would tell an attacker something (an unknown user reads as a wrong code; a
replay caught by a rollback window reads as a plain reuse).

Text: ``rlm_rest`` writes every byte of an attribute above 0x7F as its own ``\\u00XX``
escape, so ``ü`` (UTF-8 ``C3 BC``) arrives as the two code points U+00C3 U+00BC. Each
string is therefore read back as bytes (one code point per byte) and decoded as UTF-8; a
string with a code point above U+00FF did not come from ``rlm_rest`` and is a 400, as are
bytes that are not UTF-8. Names are not Unicode-normalised: a precomposed ``ü`` and
``u`` + U+0308 are different principals, exactly as ``/v1/otp/verify`` treats them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core import validation
from ..core.decisions import DecisionResult, Reason, Verdict
from ..core.validation import OtpRequest
from ..errors import InvalidRequest
from ..runtime import Runtime
from ..services.apitokens import Caller
from .callouts import render
from .common import Route, read_json
from .state import CALLER, RUNTIME

VM_ATTRIBUTE = "NAS-Identifier"
CONTEXT_ATTRIBUTES = {"remote_addr": "Calling-Station-Id", "nas_port": "NAS-Port"}
MAX_OTP = 64
ACCEPT_MARKER = "replayguard-accept"
ACCEPT_BODY = {"control:Tmp-String-0": ACCEPT_MARKER}

REPLY_MESSAGES: dict[Reason, str] = {
    Reason.INVALID: "Invalid one-time password",
    Reason.NO_TOKEN: "Invalid one-time password",
    Reason.REUSED: "One-time password already used",
    Reason.REPLAY_AFTER_ROLLBACK: "One-time password already used",
    Reason.LOCKED_OUT: "Too many failed attempts; try again later",
    Reason.EXPIRED: "One-time password expired",
}
FALLBACK_MESSAGE = "Authentication refused"


def _values(attribute: object, name: str) -> list[object]:
    """The value list of one ``rlm_rest`` attribute, accepting a bare scalar too."""
    if isinstance(attribute, dict):
        if "value" not in attribute:
            raise InvalidRequest(f"{name} must have a value", field=name)
        attribute = attribute["value"]
    values = attribute if isinstance(attribute, list) else [attribute]
    if len(values) != 1:
        raise InvalidRequest(f"{name} must have exactly one value", field=name)
    return values


def rlm_rest_text(value: str, name: str) -> str:
    """A string as ``rlm_rest`` escaped it (one code point per byte) back to its UTF-8 text."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} has a character above U+00FF: rlm_rest sends each byte "
                             "as one \\u00XX escape", field=name) from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} is not UTF-8", field=name) from None


def attribute_text(body: dict[str, Any], name: str) -> str | None:
    """One attribute's single value as text; ``None`` when the attribute is absent."""
    if body.get(name) is None:
        return None
    (value,) = _values(body[name], name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRequest(f"{name} must be a string", field=name)
    return rlm_rest_text(value, name) if isinstance(value, str) else str(value)


def _vm_id(body: dict[str, Any]) -> str:
    value = attribute_text(body, VM_ATTRIBUTE)
    if value is None:
        raise InvalidRequest("NAS-Identifier (the client's vm_id, set by the site) is required",
                             field=VM_ATTRIBUTE)
    return validation.check_identifier(value, VM_ATTRIBUTE)


def _password(body: dict[str, Any]) -> str:
    value = attribute_text(body, "User-Password")
    if value is None:
        raise InvalidRequest("User-Password is required", field="User-Password")
    if not 1 <= len(value) <= MAX_OTP or not value.isprintable():
        raise InvalidRequest(f"User-Password must be 1 to {MAX_OTP} printable characters", field="User-Password")
    return value


def _context(body: dict[str, Any]) -> dict[str, str]:
    """What the analysts see of where the login came from; dropped when unusable."""
    context = {"service": "radius"}
    for key, name in CONTEXT_ATTRIBUTES.items():
        try:
            value = attribute_text(body, name)
        except InvalidRequest:
            continue
        if value and len(value) <= validation.MAX_CONTEXT_VALUE and value.isprintable():
            context[key] = value
    return context


def radius_request(raw: object) -> OtpRequest:
    """``rlm_rest``'s JSON body as an OTP request; every fault names its attribute."""
    body = validation.require_object(raw)
    principal = attribute_text(body, "User-Name")
    if principal is None:
        raise InvalidRequest("User-Name is required", field="User-Name")
    return OtpRequest(
        vm_id=_vm_id(body),
        principal=validation.check_identifier(principal, "User-Name"),
        otp=_password(body),
        receipt=None,
        context=_context(body),
    )


async def answer(runtime: Runtime, caller: Caller, payload: Any) -> tuple[int, Any, DecisionResult]:
    """The same decision as ``/v1/otp/verify``, spoken in rlm_rest's terms: a 200 with the
    accept marker accepts, a 401 with a Reply-Message rejects."""
    floor = runtime.continuity.admit_decisions()
    result = await runtime.decisions.verify_otp(radius_request(payload), caller)
    runtime.continuity.confirm(floor, result.seq)
    if result.verdict is Verdict.ACCEPT:
        return 200, ACCEPT_BODY, result
    return 401, {"reply:Reply-Message": REPLY_MESSAGES.get(result.reason, FALLBACK_MESSAGE)}, result


async def authenticate(request: web.Request) -> web.Response:
    return render(request, await answer(request.app[RUNTIME], request[CALLER], await read_json(request)))


# The route the fast front (http/front.py) may answer itself, and how.
FAST = {"/v1/radius/authenticate": answer}


_ATTRIBUTE = {
    "type": "object", "required": ["value"],
    "properties": {"type": {"type": "string"}, "value": {"type": "array", "minItems": 1, "maxItems": 1}},
}
RADIUS_SCHEMA = {
    "type": "object", "required": ["User-Name", "User-Password", VM_ATTRIBUTE],
    "description": "rlm_rest's body = 'json' (bytes above 0x7F as \\u00XX); the VM is NAS-Identifier",
    "properties": dict.fromkeys(("User-Name", "User-Password", VM_ATTRIBUTE), _ATTRIBUTE),
}
ACCEPT_SCHEMA = {
    "type": "object", "required": ["control:Tmp-String-0"],
    "properties": {"control:Tmp-String-0": {"type": "string", "enum": [ACCEPT_MARKER]}},
}

ROUTES = [
    Route("POST", "/v1/radius/authenticate", authenticate, ("callout",),
          "FreeRADIUS rlm_rest: 200 with the accept marker accepts, 401 with a Reply-Message rejects",
          "callouts", RADIUS_SCHEMA, ACCEPT_SCHEMA, status=200, responses=((401, {
              "description": "Access-Reject (with a Reply-Message), or a missing or unknown token",
              "content": {"application/json": {"schema": {"oneOf": [
                  {"$ref": "#/components/schemas/Error"},
                  {"type": "object", "required": ["reply:Reply-Message"],
                   "properties": {"reply:Reply-Message": {"type": "string"}}},
              ]}}},
          }),)),
]
