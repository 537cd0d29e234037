"""`POST /v1/radius/authenticate` without FreeRADIUS: rlm_rest's body onto the OTP decision."""

from __future__ import annotations

from typing import Any

import orjson
import pyotp
import pytest

from tests.conftest import Api, uid

PATH = "/v1/radius/authenticate"


def attr(value: Any, kind: str = "string") -> dict[str, Any]:
    return {"type": kind, "value": [value]}


def rest_body(user: str, password: str, **extra: Any) -> dict[str, Any]:
    body = {"User-Name": attr(user), "User-Password": attr(password)}
    body.update(extra)
    return body


async def post(api: Api, body: Any, role: str = "callout") -> tuple[int, bytes, str]:
    resp = await api.client.post(PATH, json=body, headers=api.auth(role))
    return resp.status, await resp.read(), resp.content_type


async def enrolled(api: Api) -> tuple[str, str]:
    principal = uid("rad")
    token = await api.enroll(principal)
    return principal, pyotp.TOTP(token["secret"]).at(api.clock.now)


ACCEPTED = (200, {"control:Tmp-String-0": "replayguard-accept"})


async def accepted(api: Api, body: Any) -> bool:
    status, raw, _ = await post(api, body)
    return (status, orjson.loads(raw) if raw else None) == ACCEPTED


async def test_accept_is_200_with_the_accept_marker(api: Api) -> None:
    """A valid code answers 200 with the control attribute the site checks before Access-Accept."""
    principal, code = await enrolled(api)
    status, raw, content_type = await post(api, rest_body(principal, code, **{"NAS-Identifier": attr(uid("nas"))}))
    assert (status, orjson.loads(raw)) == ACCEPTED and content_type == "application/json"


async def test_reused_code_is_401_with_reply_message(api: Api) -> None:
    """The same code twice is a 401 whose only attribute is a Reply-Message naming the reason."""
    principal, code = await enrolled(api)
    body = rest_body(principal, code, **{"NAS-Identifier": attr(uid("nas"))})
    assert await accepted(api, body)
    status, raw, content_type = await post(api, body)
    assert status == 401 and content_type == "application/json"
    assert orjson.loads(raw) == {"reply:Reply-Message": "One-time password already used"}


async def test_wrong_code_is_401_without_the_code(api: Api) -> None:
    """A wrong code is rejected with a message that neither echoes the code nor says more than 'invalid'."""
    principal, code = await enrolled(api)
    wrong = "000000" if code != "000000" else "111111"
    status, raw, _ = await post(api, rest_body(principal, wrong, **{"NAS-Identifier": attr(uid("nas"))}))
    assert status == 401 and orjson.loads(raw) == {"reply:Reply-Message": "Invalid one-time password"}


async def test_unknown_user_reads_as_invalid(api: Api) -> None:
    """A principal with no token gets the same Reply-Message as a wrong code, so users cannot be enumerated."""
    status, raw, _ = await post(api, rest_body(uid("nobody"), "123456", **{"NAS-Identifier": attr(uid("nas"))}))
    assert status == 401 and b"Invalid one-time password" in raw


async def test_nas_identifier_wins_over_nas_ip_address(api: Api) -> None:
    """The VM is NAS-Identifier (the client's vm_id, set by the site): the decision is recorded against it."""
    principal, code = await enrolled(api)
    nas = uid("nas")
    body = rest_body(principal, code, **{"NAS-Identifier": attr(nas), "NAS-IP-Address": attr("192.0.2.1", "ipaddr")})
    assert await accepted(api, body)
    async with api.runtime.pool.acquire() as conn:
        found = await conn.fetchval("SELECT count(*) FROM ledger WHERE vm_id = $1", nas)
    assert found == 1


MALFORMED: list[tuple[Any, str | None]] = [
    ({"User-Password": attr("123456"), "NAS-Identifier": attr("n")}, "User-Name"),
    ({"User-Name": attr("alice"), "NAS-Identifier": attr("n")}, "User-Password"),
    ({"User-Name": attr("alice"), "User-Password": attr("123456")}, "NAS-Identifier"),
    ({"User-Name": attr("alice"), "User-Password": attr("1"), "NAS-IP-Address": attr("192.0.2.1")}, "NAS-Identifier"),
    (rest_body("\u00c3", "123456", **{"NAS-Identifier": attr("n")}), "User-Name"),  # a lone UTF-8 lead byte
    (rest_body("\u4e2d", "123456", **{"NAS-Identifier": attr("n")}), "User-Name"),  # not rlm_rest's escaping
    (rest_body("alice", "123456", **{"NAS-Identifier": {"type": "string"}}), "NAS-Identifier"),
    (rest_body("alice", "123456", **{"NAS-Identifier": {"type": "string", "value": []}}), "NAS-Identifier"),
    (rest_body("alice", "123456", **{"NAS-Identifier": {"type": "string", "value": ["a", "b"]}}), "NAS-Identifier"),
    (rest_body("alice", "123456", **{"NAS-Identifier": attr("")}), "NAS-Identifier"),
    (rest_body("alice", "123456", **{"NAS-Identifier": attr("x" * 257)}), "NAS-Identifier"),
    (rest_body("alice", "123456", **{"NAS-Identifier": attr("a\nb")}), "NAS-Identifier"),
    (rest_body("al\x00ice", "123456", **{"NAS-Identifier": attr("n")}), "User-Name"),
    ({"User-Name": {"value": [{"nested": 1}]}, "User-Password": attr("1"), "NAS-Identifier": attr("n")}, "User-Name"),
    ({"User-Name": attr(True), "User-Password": attr("1"), "NAS-Identifier": attr("n")}, "User-Name"),
    (rest_body("alice", "", **{"NAS-Identifier": attr("n")}), "User-Password"),
    (rest_body("alice", "1" * 65, **{"NAS-Identifier": attr("n")}), "User-Password"),
    (rest_body("alice", "12\t34", **{"NAS-Identifier": attr("n")}), "User-Password"),
    ([], None),
    ("User-Name=alice", None),
]


@pytest.mark.parametrize(("body", "field"), MALFORMED)
async def test_malformed_bodies_are_400_with_the_field(api: Api, body: Any, field: str | None) -> None:
    """Every malformed shape is a 400 invalid_request naming the attribute at fault, never a 500."""
    resp = await api.client.post(PATH, json=body, headers=api.auth("callout"))
    data = await resp.json()
    assert resp.status == 400 and data["error"]["code"] == "invalid_request"
    assert data["error"].get("field") == field


async def test_bare_scalar_values_are_accepted(api: Api) -> None:
    """An attribute sent as a bare value instead of rlm_rest's object is still understood."""
    principal, code = await enrolled(api)
    body = {"User-Name": principal, "User-Password": code, "NAS-Identifier": uid("nas")}
    assert await accepted(api, body)


async def test_context_attributes_that_are_unusable_are_dropped(api: Api) -> None:
    """A control character in Calling-Station-Id does not refuse the login: context is only informative."""
    principal, code = await enrolled(api)
    body = rest_body(principal, code, **{"NAS-Identifier": attr(uid("nas")), "Calling-Station-Id": attr("a\x01b"),
                                         "NAS-Port": attr(7, "integer")})
    assert await accepted(api, body)


@pytest.mark.parametrize(("role", "status"), [("hypervisor", 403), ("analyst", 403), ("admin", 401)])
async def test_roles(api: Api, role: str, status: int) -> None:
    """Only callout (and admin) tokens may ask; admin reaches the decision, here a reject for an unknown user."""
    body = rest_body(uid("nobody"), "123456", **{"NAS-Identifier": attr(uid("nas"))})
    assert (await post(api, body, role=role))[0] == status


async def test_missing_token_is_401_unauthorized(api: Api) -> None:
    """Without a bearer token the answer is 401 unauthorized, which rlm_rest also turns into a reject."""
    resp = await api.client.post(PATH, json=rest_body("alice", "123456", **{"NAS-Identifier": attr("n")}))
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"


async def test_non_json_body_is_415(api: Api) -> None:
    """rlm_rest configured with body = 'post' instead of 'json' is told so, not answered 500."""
    resp = await api.client.post(PATH, data="User-Name=alice", headers={
        **api.auth("callout"), "Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 415


def rlm_rest_escaped(text: str) -> str:
    """What rlm_rest's JSON string holds for ``text``: one code point per UTF-8 byte."""
    return text.encode("utf-8").decode("latin-1")


@pytest.mark.parametrize("name", ["ü1", "中文用户", "ümlaut-\u00fc", "u\u0308-decomposed"])
async def test_utf8_user_names_reach_the_service_intact(api: Api, name: str) -> None:
    """A UTF-8 user name escaped byte by byte by rlm_rest is the enrolled principal, not its mojibake."""
    principal = f"{name}-{uid('u')}"
    token = await api.enroll(principal)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    assert await accepted(api, rest_body(rlm_rest_escaped(principal), code, **{"NAS-Identifier": attr(uid("nas"))}))


async def test_mojibake_is_a_different_principal() -> None:
    """'ü1' and 'Ã¼1' stay two principals: each decodes to itself, never to the other."""
    from replayguard.http.radius import rlm_rest_text

    assert rlm_rest_text(rlm_rest_escaped("ü1"), "User-Name") == "ü1"
    assert rlm_rest_text(rlm_rest_escaped("Ã¼1"), "User-Name") == "Ã¼1"


async def test_precomposed_and_decomposed_names_are_different_principals(api: Api) -> None:
    """No Unicode normalisation: a code of the precomposed 'ü' principal is refused for 'u'+U+0308."""
    suffix = uid("n")
    precomposed, decomposed = f"\u00fc-{suffix}", f"u\u0308-{suffix}"
    token = await api.enroll(precomposed)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    body = rest_body(rlm_rest_escaped(decomposed), code, **{"NAS-Identifier": attr(uid("nas"))})
    status, raw, _ = await post(api, body)
    assert status == 401 and orjson.loads(raw) == {"reply:Reply-Message": "Invalid one-time password"}
    assert await accepted(api, rest_body(rlm_rest_escaped(precomposed), code, **{"NAS-Identifier": attr(uid("nas"))}))
