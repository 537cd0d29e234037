"""No OTP, nonce, TOTP secret or API token ever reaches a log line (CONTRACT §9).

The service is driven through accepts, rejects, lockouts, enrolment, bad input and bad
tokens while its real logging pipeline (``replayguard.logging.processors``) writes JSON
lines to a buffer; then every credential it saw is searched for in every line. The raw
events (before redaction) are checked too: the code should not even hand them over.
``redact`` itself is tested from a table.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pyotp
import pytest
from structlog.testing import capture_logs

from replayguard import logging as rglog
from tests.conftest import Api, uid

REQUEST_ID = "redaction-test"  # letters only, so no credential can hide in it


async def _call(api: Api, method: str, path: str, body: Any = None, role: str | None = "callout",
                authorization: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"X-Request-Id": REQUEST_ID, "Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif role is not None:
        headers.update(api.auth(role))
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    resp = await api.client.request(method, path, data=data, headers=headers)
    return resp.status, await resp.json()


async def _drive(api: Api) -> list[str]:
    """Runs every kind of request that handles a credential; returns the credentials seen."""
    principal, vm, scope = uid("logs"), uid("vm"), uid("scope")
    nonce = "nonce-" + uid("secretvalue")
    status, token = await _call(api, "POST", f"/v1/principals/{principal}/tokens", {}, role="admin")
    assert status == 201
    secret = token["secret"]
    totp = pyotp.TOTP(secret)
    code = totp.at(api.clock.now)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    _, fresh_api_token = await api.runtime.api_tokens.create("callout", uid("fresh"))
    unknown_token = "rgt_" + "Z" * 43
    otp = {"vm_id": vm, "principal": principal, "otp": code, "context": {"service": "sshd"}}
    answers = [
        await _call(api, "POST", "/v1/otp/verify", otp),  # accept
        await _call(api, "POST", "/v1/otp/verify", otp),  # reused
        await _call(api, "POST", "/v1/otp/verify", {**otp, "otp": wrong}),  # invalid
        await _call(api, "POST", "/v1/nonces/consume", {"vm_id": vm, "scope": scope, "nonce": nonce}),
        await _call(api, "POST", "/v1/nonces/consume", {"vm_id": vm, "scope": scope, "nonce": nonce},
                    authorization=f"Bearer {fresh_api_token}"),
        # Bad input that carries credentials next to the field at fault.
        await _call(api, "POST", "/v1/nonces/consume", {"vm_id": vm, "scope": scope, "nonce": nonce, "ttl_s": "x"}),
        await _call(api, "POST", "/v1/otp/verify", raw=('{"otp": "' + code + '", "vm_id": ').encode()),
        await _call(api, "POST", "/v1/otp/verify", {**otp, "vm_id": "bad\nvm"}),
        # Bad and wrong tokens.
        await _call(api, "POST", "/v1/otp/verify", otp, authorization=f"Bearer {unknown_token}"),
        await _call(api, "POST", "/v1/otp/verify", otp, authorization=f"Basic {fresh_api_token}"),
        await _call(api, "POST", "/v1/otp/verify", otp, role="analyst"),
        await _call(api, "GET", f"/v1/principals/{principal}/tokens", role="admin"),
    ]
    for _ in range(5):  # into lockout
        answers.append(await _call(api, "POST", "/v1/otp/verify", {**otp, "otp": wrong}))
    answers.append(await _call(api, "POST", "/v1/otp/verify", otp))
    statuses = [status for status, _ in answers]
    assert statuses[:5] == [200] * 5 and statuses[5:8] == [400] * 3 and statuses[8:11] == [401, 401, 403]
    assert answers[-1][1]["reason"] == "locked_out"
    await api.runtime.appender.wait_idle()
    return [code, wrong, nonce, secret, fresh_api_token, unknown_token,
            *(api.tokens[role] for role in ("callout", "admin", "analyst"))]


def _scrubbed_lines(text: str) -> list[str]:
    """Each JSON line without the fields the service makes up itself (clock and timing)."""
    lines = []
    for line in text.splitlines():
        event = json.loads(line)
        for own in ("timestamp", "duration_ms"):
            event.pop(own, None)
        lines.append(json.dumps(event))
    return lines


def _leaks(credentials: list[str], lines: list[str]) -> list[tuple[str, str]]:
    found = []
    for credential in credentials:
        # Digits-only credentials (OTP codes) are matched as whole numbers.
        escaped = re.escape(credential)
        pattern = re.compile(rf"(?<!\d){escaped}(?!\d)" if credential.isdigit() else escaped)
        found += [(credential, line) for line in lines if pattern.search(line)]
    return found


async def test_no_credential_in_rendered_log_lines(api: Api, log_buffer: io.StringIO) -> None:
    """Across accepts, rejects, lockout, enrolment and bad tokens, no credential is logged."""
    credentials = await _drive(api)
    lines = _scrubbed_lines(log_buffer.getvalue())
    requests = [line for line in lines if json.loads(line)["event"] == "request"]
    assert len(requests) >= 17, "the log pipeline captured nothing: the test would prove nothing"
    assert any('"decision": "accept"' in line for line in requests)
    assert _leaks(credentials, lines) == []


async def test_no_credential_handed_to_the_logger(api: Api) -> None:
    """The raw events, before redaction, carry no credential either."""
    with capture_logs() as events:
        credentials = await _drive(api)
    assert any(event["event"] == "request" for event in events)
    lines = [json.dumps({k: v for k, v in e.items() if k not in ("duration_ms",)}, default=str) for e in events]
    assert _leaks(credentials, lines) == []


# --- redact, the processor -----------------------------------------------------------------

R = rglog.REDACTED
TOKEN = "rgt_" + "a1B2-c3_D4" * 4


@pytest.mark.parametrize(("event", "expected"), [
    ({"event": "x", "otp": "492039"}, {"event": "x", "otp": R}),
    ({"event": "x", "nonce": "n-1"}, {"event": "x", "nonce": R}),
    ({"event": "x", "secret": "JBSWY3DPEHPK3PXP"}, {"event": "x", "secret": R}),
    ({"event": "x", "token": TOKEN}, {"event": "x", "token": R}),
    ({"event": "x", "Authorization": "Bearer abc"}, {"event": "x", "Authorization": R}),
    ({"event": "x", "OTP": "1", "Nonce": "2", "API_TOKEN": "3"}, {"event": "x", "OTP": R, "Nonce": R, "API_TOKEN": R}),
    ({"event": "x", "receipt": "r", "pepper": "p", "key": "k", "password": "pw", "code": "123456"},
     {"event": "x", "receipt": R, "pepper": R, "key": R, "password": R, "code": R}),
    ({"event": "x", "body": {"otp": "492039", "vm_id": "web-01"}},
     {"event": "x", "body": {"otp": R, "vm_id": "web-01"}}),
    ({"event": "x", "items": [{"nonce": "a"}, {"secret": "b"}, "plain"]},
     {"event": "x", "items": [{"nonce": R}, {"secret": R}, "plain"]}),
    ({"event": "x", "deep": {"a": {"b": [{"User-Password": "pw"}]}}},
     {"event": "x", "deep": {"a": {"b": [{"User-Password": R}]}}}),
    ({"event": "x", "header": "Bearer " + TOKEN}, {"event": "x", "header": "Bearer " + R}),
    ({"event": "x", "header": "bearer   something"}, {"event": "x", "header": "Bearer " + R}),
    ({"event": f"failed with {TOKEN} given"}, {"event": f"failed with {R} given"}),
    ({"event": "x", "argv": ("token", TOKEN)}, {"event": "x", "argv": ["token", R]}),
    ({"event": "x", "uri": "otpauth://totp/rg:alice?secret=JBSWY3DPEHPK3PXP&issuer=rg"},
     {"event": "x", "uri": f"otpauth://totp/rg:alice?secret={R}&issuer=rg"}),
    ({"event": "request", "vm_id": "web-01", "reason": "reused", "status": 200, "seq": 12},
     {"event": "request", "vm_id": "web-01", "reason": "reused", "status": 200, "seq": 12}),
], ids=lambda value: None)
def test_redact_table(event: dict[str, Any], expected: dict[str, Any]) -> None:
    """redact masks credential-named keys at any depth and token-shaped values anywhere."""
    assert dict(rglog.redact(None, "info", dict(event))) == expected


def test_redact_leaves_short_rgt_prefix_and_other_values_alone() -> None:
    """Words that merely start like a token, numbers and None are not touched."""
    event = {"event": "rgt_ is our prefix", "count": 3, "ratio": 0.5, "none": None, "flag": True}
    assert dict(rglog.redact(None, "info", dict(event))) == event


def test_redact_runs_before_rendering() -> None:
    """In the configured pipeline redaction comes before the JSON renderer."""
    names = [getattr(p, "__name__", type(p).__name__) for p in rglog.processors()]
    assert names.index("redact") < names.index("JSONRenderer")
