"""Bad input never gets past validation, and never as a 5xx: the contract's error body, always.

A table of malformed requests, each with the status, code and field the contract asks
for; then a bounded hypothesis fuzz over the two decision endpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Api, uid

OTP = "/v1/otp/verify"
NONCE = "/v1/nonces/consume"
ENROLL = "/v1/principals/bad-input-admin/tokens"
JSON = "application/json"
GOOD_OTP = {"vm_id": "vm-bad", "principal": "nobody-bad-input", "otp": "123456"}
GOOD_NONCE = {"vm_id": "vm-bad", "scope": "bad-input", "nonce": "n"}
_UNSET = object()


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any  # a JSON value, or bytes sent as they are
    status: int
    code: str
    field: str | None = None
    method: str = "POST"
    role: str | None = "callout"  # None: no Authorization header
    authorization: str | None = None  # overrides the role's header
    content_type: str | None = JSON

    def raw(self) -> bytes | None:
        if self.body is _UNSET:
            return None
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def otp(**changes: Any) -> dict[str, Any]:
    body = {**GOOD_OTP, **changes}
    return {k: v for k, v in body.items() if v is not _UNSET}


def nonce(**changes: Any) -> dict[str, Any]:
    body = {**GOOD_NONCE, **changes}
    return {k: v for k, v in body.items() if v is not _UNSET}


def bad(name: str, path: str, body: Any, field: str | None = None, role: str = "callout") -> Case:
    return Case(name, path, body, 400, "invalid_request", field, role=role)


CASES = [
    # Not JSON, or not an object.
    bad("truncated json", OTP, b'{"vm_id": '),
    bad("vm_id '..' (no URL path can name it)", NONCE, nonce(vm_id=".."), "vm_id"),
    bad("principal '.' (no URL path can name it)", OTP, otp(principal="."), "principal"),
    bad("event vm_id '..'", "/v1/hypervisor/events",
        {"event_id": "e-dots", "type": "vm.started", "vm_id": "..", "occurred_at": 1_790_000_000}, "vm_id",
        role="hypervisor"),
    bad("empty body", NONCE, b""),
    bad("invalid utf-8", OTP, b'{"vm_id": "\xff\xfe"}'),
    bad("trailing garbage", NONCE, b'{"vm_id": "a"} x'),
    bad("json array", OTP, []),
    bad("json string", NONCE, "vm_id"),
    bad("json number", OTP, 42),
    bad("json null", NONCE, None),
    # Missing fields.
    bad("otp without vm_id", OTP, otp(vm_id=_UNSET), "vm_id"),
    bad("otp without principal", OTP, otp(principal=_UNSET), "principal"),
    bad("otp without otp", OTP, otp(otp=_UNSET), "otp"),
    bad("nonce without vm_id", NONCE, nonce(vm_id=_UNSET), "vm_id"),
    bad("nonce without scope", NONCE, nonce(scope=_UNSET), "scope"),
    bad("nonce without nonce", NONCE, nonce(nonce=_UNSET), "nonce"),
    bad("otp with null vm_id", OTP, otp(vm_id=None), "vm_id"),
    # Mistyped fields.
    bad("vm_id a number", OTP, otp(vm_id=5), "vm_id"),
    bad("principal an object", OTP, otp(principal={"a": 1}), "principal"),
    bad("otp a number", OTP, otp(otp=123456), "otp"),
    bad("otp empty", OTP, otp(otp=""), "otp"),
    bad("otp 65 characters", OTP, otp(otp="1" * 65), "otp"),
    bad("receipt a number", OTP, otp(receipt=7), "receipt"),
    bad("receipt too long", NONCE, nonce(receipt="r" * 2049), "receipt"),
    bad("context a string", OTP, otp(context="sshd"), "context"),
    bad("context value a list", OTP, otp(context={"service": ["sshd"]}), "context.service"),
    bad("context value a boolean", OTP, otp(context={"service": True}), "context.service"),
    bad("context with 17 keys", OTP, otp(context={f"k{i}": "v" for i in range(17)}), "context"),
    bad("context key with control char", OTP, otp(context={"a\nb": "v"}), "context"),
    bad("nonce a number", NONCE, nonce(nonce=5), "nonce"),
    bad("nonce empty", NONCE, nonce(nonce=""), "nonce"),
    bad("scope a list", NONCE, nonce(scope=["s"]), "scope"),
    bad("ttl_s a string", NONCE, nonce(ttl_s="300"), "ttl_s"),
    bad("ttl_s a boolean", NONCE, nonce(ttl_s=True), "ttl_s"),
    bad("ttl_s a float", NONCE, nonce(ttl_s=1.5), "ttl_s"),
    bad("ttl_s zero", NONCE, nonce(ttl_s=0), "ttl_s"),
    bad("ttl_s negative", NONCE, nonce(ttl_s=-1), "ttl_s"),
    bad("ttl_s beyond the maximum", NONCE, nonce(ttl_s=10**9), "ttl_s"),
    bad("issued_at not a time", NONCE, nonce(issued_at="yesterday"), "issued_at"),
    bad("issued_at impossible date", NONCE, nonce(issued_at="2026-02-30T10:00:00Z"), "issued_at"),
    bad("issued_at a list", NONCE, nonce(issued_at=[1]), "issued_at"),
    bad("issued_at a boolean", NONCE, nonce(issued_at=True), "issued_at"),
    bad("issued_at negative", NONCE, nonce(issued_at=-1), "issued_at"),
    bad("issued_at far future", NONCE, nonce(issued_at=1e300), "issued_at"),
    bad("issued_at past year 9999 in UTC", NONCE, nonce(issued_at="9999-12-31T23:59:59-01:00"), "issued_at"),
    bad("issued_at before year 1 in UTC", NONCE, nonce(issued_at="0001-01-01T00:00:00+01:00"), "issued_at"),
    # Identifiers: control characters and length.
    bad("vm_id with NUL", OTP, otp(vm_id="vm\x00x"), "vm_id"),
    bad("principal with newline", OTP, otp(principal="alice\nroot"), "principal"),
    bad("scope with tab", NONCE, nonce(scope="s\tt"), "scope"),
    bad("vm_id with DEL", NONCE, nonce(vm_id="vm\x7f"), "vm_id"),
    bad("vm_id with escape", OTP, otp(vm_id="\x1b[31mred"), "vm_id"),
    bad("principal with line separator", OTP, otp(principal="a\u2028b"), "principal"),
    bad("vm_id empty", OTP, otp(vm_id=""), "vm_id"),
    bad("vm_id 257 characters", OTP, otp(vm_id="v" * 257), "vm_id"),
    bad("principal 257 characters", OTP, otp(principal="p" * 257), "principal"),
    bad("scope 257 characters", NONCE, nonce(scope="s" * 257), "scope"),
    bad("nonce vm_id 257 characters", NONCE, nonce(vm_id="v" * 257), "vm_id"),
    # Nonce size is in bytes.
    bad("nonce 1025 bytes", NONCE, nonce(nonce="n" * 1025), "nonce"),
    bad("nonce 342 three-byte characters", NONCE, nonce(nonce="\u20ac" * 342), "nonce"),
    # Size and media type.
    Case("body over 64 KiB", OTP, otp(context={"pad": "x" * 70_000}), 413, "payload_too_large"),
    Case("raw body over 64 KiB", NONCE, b"x" * (64 * 1024 + 1), 413, "payload_too_large"),
    Case("text/plain", OTP, otp(), 415, "unsupported_media_type", content_type="text/plain"),
    Case("form encoded", NONCE, b"vm_id=a", 415, "unsupported_media_type",
         content_type="application/x-www-form-urlencoded"),
    Case("no content type", NONCE, nonce(), 415, "unsupported_media_type", content_type=None),
    # Authorization.
    Case("no authorization", OTP, otp(), 401, "unauthorized", role=None),
    Case("basic scheme", OTP, otp(), 401, "unauthorized", authorization="Basic dXNlcjpwYXNz"),
    Case("bearer without token", NONCE, nonce(), 401, "unauthorized", authorization="Bearer"),
    Case("bearer blank token", NONCE, nonce(), 401, "unauthorized", authorization="Bearer    "),
    Case("unknown token", OTP, otp(), 401, "unauthorized", authorization="Bearer rgt_" + "A" * 43),
    Case("not a token", NONCE, nonce(), 401, "unauthorized", authorization="Bearer hunter2"),
    Case("oversized token", NONCE, nonce(), 401, "unauthorized", authorization="Bearer rgt_" + "A" * 4000),
    Case("analyst verifies", OTP, otp(), 403, "forbidden", role="analyst"),
    Case("hypervisor consumes", NONCE, nonce(), 403, "forbidden", role="hypervisor"),
    Case("callout enrolls", ENROLL, {}, 403, "forbidden", role="callout"),
    # Routes.
    Case("unknown route", "/v1/nope", {}, 404, "not_found"),
    Case("unknown route under verify", OTP + "/extra", otp(), 404, "not_found"),
    Case("unknown route without token", "/v2/otp/verify", otp(), 404, "not_found", role=None),
    Case("wrong method", OTP, _UNSET, 405, "method_not_allowed", method="GET", content_type=None),
    # Enrollment input.
    bad("enroll unknown type", ENROLL, {"type": "sms"}, "type", role="admin"),
    bad("enroll short secret", ENROLL, {"secret": "JBSWY3DP"}, "secret", role="admin"),
    bad("enroll secret not base32", ENROLL, {"secret": "not base32 at all!!"}, "secret", role="admin"),
    bad("enroll nine digits", ENROLL, {"digits": 9}, "digits", role="admin"),
    bad("enroll unknown algorithm", ENROLL, {"algorithm": "MD5"}, "algorithm", role="admin"),
    bad("enroll principal 257 characters", "/v1/principals/" + "p" * 257 + "/tokens", {}, "principal", role="admin"),
]


def assert_error_body(body: Any, code: str, field: str | None) -> None:
    """The contract's error body: {"error": {"code", "message", "field"?}}, nothing else."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"code", "message", "field"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    if field is None:
        assert "field" not in error, error
    else:
        assert error.get("field") == field, error


async def send(api: Api, case: Case) -> tuple[int, Any]:
    headers: dict[str, str] = {}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    if case.authorization is not None:
        headers["Authorization"] = case.authorization
    elif case.role is not None:
        headers.update(api.auth(case.role))
    resp = await api.client.request(case.method, case.path, data=case.raw(), headers=headers,
                                    skip_auto_headers=("Content-Type",))
    assert resp.content_type == JSON
    return resp.status, await resp.json()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input_gets_contract_error(api: Api, case: Case) -> None:
    """Each malformed request gets its contract status and error body, with the field at fault."""
    status, body = await send(api, case)
    assert status == case.status, body
    assert_error_body(body, case.code, case.field)


async def test_chunked_body_over_64_kib_is_413(api: Api) -> None:
    """A body over 64 KiB sent without Content-Length is refused with 413 too."""

    async def chunks() -> Any:
        for _ in range(80):
            yield b" " * 1024

    resp = await api.client.post(NONCE, data=chunks(), headers={**api.auth("callout"), "Content-Type": JSON})
    assert resp.status == 413
    assert_error_body(await resp.json(), "payload_too_large", None)


@pytest.mark.parametrize(("path", "body"), [
    (OTP, otp(vm_id="v" * 256, principal="p" * 256)),
    (NONCE, nonce(scope="s" * 256, nonce="n" * 1024)),
    (NONCE, nonce(nonce="\u20ac" * 341 + "n")),
    (OTP, otp(otp="not-a-code")),
], ids=["256-char identifiers", "1024-byte nonce", "1024-byte multibyte nonce", "non-numeric otp"])
async def test_limits_are_inclusive(api: Api, path: str, body: dict[str, Any]) -> None:
    """Values exactly at the limits are well-formed: 200 with a decision, not an error."""
    status, answer = await api.post(path, body)
    assert status == 200, answer
    assert answer["decision"] in ("accept", "reject")


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
async def test_405_on_a_decision_route_names_the_allowed_method(
        api_factory: Callable[..., Any], front: str, method: str) -> None:
    """A decision route asked with another method answers 405 with the contract body and an
    `Allow` header naming POST (RFC 9110 §15.5.6: the server "MUST generate an Allow header
    field"), on either front: the fast front hands such a request to aiohttp, whose 405 the
    contract body is built from."""
    api: Api = await api_factory(http_front=front)
    resp = await api.client.request(method, OTP, headers=api.auth("callout"))
    assert resp.status == 405
    assert_error_body(await resp.json(), "method_not_allowed", None)
    assert "POST" in resp.headers.get("Allow", ""), dict(resp.headers)


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_an_integral_ttl_written_as_a_float_is_a_well_formed_request(
        api_factory: Callable[..., Any], front: str) -> None:
    """`"ttl_s": 300.0` is a well-formed request answered 200: the served OpenAPI 3.1 document
    declares ttl_s an integer, and JSON Schema 2020-12 counts any number with a zero
    fractional part as one (a guest computing `5 * 60.0` is not refused)."""
    api: Api = await api_factory(http_front=front)
    resp = await api.client.get("/v1/openapi.json")
    schema = (await resp.json())["paths"][NONCE]["post"]["requestBody"]["content"][JSON]["schema"]
    assert schema["properties"]["ttl_s"]["type"] == "integer"
    status, body = await api.post(NONCE, {"vm_id": uid("vm"), "scope": uid("s"), "nonce": uid("n"), "ttl_s": 300.0})
    assert status == 200, body
    assert body["decision"] == "accept"


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
@pytest.mark.parametrize("authorization", [None, "Bearer rgt_" + "A" * 43, "Basic dXNlcjpwYXNz"])
async def test_a_401_on_a_decision_route_names_the_bearer_scheme(
        api_factory: Callable[..., Any], front: str, authorization: str | None) -> None:
    """A decision route refused for a missing, unknown or non-Bearer token answers 401
    `unauthorized` with `WWW-Authenticate: Bearer` (RFC 9110 §15.5.2, RFC 6750 §3), on
    either front."""
    api: Api = await api_factory(http_front=front)
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = await api.client.post(OTP, json={"vm_id": "v", "principal": "p", "otp": "1"}, headers=headers)
    assert resp.status == 401
    assert_error_body(await resp.json(), "unauthorized", None)
    assert resp.headers.get("WWW-Authenticate", "").lower().startswith("bearer"), dict(resp.headers)


# --- fuzz ------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_idish = st.text(max_size=300) | st.sampled_from(["vm-1", "alice", "api", "v" * 256, "v" * 257]) | _json
_FIELDS = ["vm_id", "principal", "otp", "scope", "nonce", "ttl_s", "issued_at", "receipt", "context"]


def _bodies(required: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    shaped = st.fixed_dictionaries(required, optional={
        "receipt": st.text(max_size=64) | _json, "context": _json | st.dictionaries(st.text(max_size=70), _json),
        "ttl_s": st.integers() | _json, "issued_at": st.text(max_size=40) | st.integers() | st.floats() | _json,
    }).map(lambda body: json.dumps(body).encode())
    loose = st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), _json).map(
        lambda body: json.dumps(body).encode())
    return shaped | loose | _json.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=256)


_OTP_BODIES = _bodies({"vm_id": _idish, "principal": _idish,
                       "otp": st.from_regex(r"\A[0-9]{6}\Z") | st.text(max_size=70) | _json})
_NONCE_BODIES = _bodies({"vm_id": _idish, "scope": _idish,
                         "nonce": st.text(max_size=1100) | st.binary(max_size=64).map(lambda b: b.hex()) | _json})
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(raw=_OTP_BODIES)
async def test_fuzz_otp_verify_never_5xx(api: Api, raw: bytes) -> None:
    """No body sent to /v1/otp/verify produces a 5xx; every error is the contract's body."""
    resp = await api.client.post(OTP, data=raw, headers={**api.auth("callout"), "Content-Type": JSON})
    assert resp.status < 500, await resp.text()
    body = await resp.json()
    if resp.status != 200:
        assert set(body) == {"error"} and body["error"]["code"] == "invalid_request"


@FUZZ
@given(raw=_NONCE_BODIES)
async def test_fuzz_nonce_consume_never_5xx(api: Api, raw: bytes) -> None:
    """No body sent to /v1/nonces/consume produces a 5xx; every error is the contract's body."""
    resp = await api.client.post(NONCE, data=raw, headers={**api.auth("callout"), "Content-Type": JSON})
    assert resp.status < 500, await resp.text()
    body = await resp.json()
    if resp.status != 200:
        assert set(body) == {"error"} and body["error"]["code"] == "invalid_request"
