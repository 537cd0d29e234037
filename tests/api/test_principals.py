"""Principals for administrators (CONTRACT §7 v1.1): the listing with tokens, failures and
lockout, and the unlock that ends a lockout and is written to the ledger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from tests.conftest import Api, uid


async def lock_out(api: Api, principal: str, vm: str, threshold: int) -> pyotp.TOTP:
    """Enrolls ``principal`` and sends ``threshold`` wrong codes: the principal is locked out."""
    totp = pyotp.TOTP((await api.enroll(principal))["secret"])
    wrong = f"{(int(totp.at(api.clock.now)) + 1) % 1_000_000:06d}"
    for _ in range(threshold):
        status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": wrong})
        assert (status, body["reason"]) == (200, "invalid"), body
    return totp


async def principal_row(api: Api, principal: str) -> dict[str, Any]:
    """The listing's row of ``principal`` (walking every page)."""
    cursor = ""
    while True:
        status, data = await api.get(f"/v1/principals?limit=500{cursor}", role="admin")
        assert status == 200, data
        for item in data["items"]:
            if item["principal"] == principal:
                return dict(item)
        if data["next_cursor"] is None:
            raise AssertionError(f"{principal} not listed")
        cursor = f"&cursor={data['next_cursor']}"


async def test_unlock_lets_a_locked_principals_valid_code_through(api_factory: Callable[..., Any]) -> None:
    """A locked-out principal's valid code is refused until an admin unlocks it, then accepted."""
    api: Api = await api_factory(lockout_threshold=3, lockout_period_s=3600)
    principal, vm = uid("alice"), uid("vm")
    totp = await lock_out(api, principal, vm, 3)
    good = {"vm_id": vm, "principal": principal, "otp": totp.at(api.clock.now)}
    status, body = await api.post("/v1/otp/verify", good)
    assert (status, body["decision"], body["reason"]) == (200, "reject", "locked_out")
    row = await principal_row(api, principal)
    assert row["locked"] is True and row["locked_until"] is not None

    status, done = await api.post(f"/v1/principals/{principal}/unlock", {"note": "called the user"}, role="admin")
    assert status == 200, done
    assert (done["was_locked"], done["locked"], done["failures"]) == (True, False, 0)

    api.clock.advance(30)  # a fresh step: the code refused while locked was never consumed anyway
    status, body = await api.post("/v1/otp/verify", {**good, "otp": totp.at(api.clock.now)})
    assert (status, body["decision"], body["reason"]) == (200, "accept", "ok"), body
    row = await principal_row(api, principal)
    assert (row["locked"], row["locked_until"], row["failures"]) == (False, None, 0)


async def test_unlock_resets_the_failure_count(api_factory: Callable[..., Any]) -> None:
    """Failures below the threshold are reset by an unlock, so the next failures start from zero."""
    api: Api = await api_factory(lockout_threshold=3, lockout_period_s=3600)
    principal, vm = uid("bob"), uid("vm")
    totp = await lock_out(api, principal, vm, 2)
    assert (await principal_row(api, principal))["failures"] == 2
    status, done = await api.post(f"/v1/principals/{principal}/unlock", {}, role="admin")
    assert (status, done["was_locked"], done["failures_before"]) == (200, False, 2)
    wrong = f"{(int(totp.at(api.clock.now)) + 1) % 1_000_000:06d}"
    for _ in range(2):
        status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": wrong})
        assert body["reason"] == "invalid"
    assert (await principal_row(api, principal))["locked"] is False


async def test_unlock_is_in_the_ledger_with_who_and_why(api_factory: Callable[..., Any]) -> None:
    """An unlock appends a principal_unlock entry naming the admin token and the note."""
    api: Api = await api_factory(lockout_threshold=2, lockout_period_s=3600)
    principal = uid("carol")
    await lock_out(api, principal, uid("vm"), 2)
    status, done = await api.post(f"/v1/principals/{principal}/unlock", {"note": "ticket 4411"}, role="admin")
    assert status == 200
    status, page = await api.get(f"/v1/ledger?after_seq={done['seq'] - 1}&limit=1")
    assert status == 200
    entry = page["items"][0]
    assert (entry["seq"], entry["kind"], entry["subject"]) == (done["seq"], "principal_unlock", principal)
    admin = await api.runtime.api_tokens.authenticate(api.tokens["admin"])
    assert admin is not None
    admin_id = admin.token_id
    assert entry["payload"]["by"] == admin_id and entry["payload"]["note"] == "ticket 4411"
    assert entry["payload"]["was_locked"] is True
    status, verify = await api.get("/v1/ledger/verify")
    assert verify["ok"] is True, (verify.get("message"), verify["state"])


async def test_listing_shows_tokens_and_their_state(api: Api) -> None:
    """The listing names every token of a principal, active or deleted, and never a secret."""
    principal = uid("dave")
    kept = await api.enroll(principal)
    gone = await api.enroll(principal, type="hotp")
    resp = await api.client.delete(f"/v1/principals/{principal}/tokens/{gone['token_id']}", headers=api.auth("admin"))
    assert resp.status == 204
    row = await principal_row(api, principal)
    states = {t["token_id"]: (t["type"], t["state"]) for t in row["tokens"]}
    assert states == {kept["token_id"]: ("totp", "active"), gone["token_id"]: ("hotp", "deleted")}
    assert kept["secret"] not in str(row) and gone["secret"] not in str(row)
    assert (row["failures"], row["locked"]) == (0, False)


async def test_listing_pages_by_name_without_gaps(api: Api) -> None:
    """Walking the cursor visits every principal once, in name order."""
    prefix = uid("page")
    names = sorted(f"{prefix}-{i}" for i in range(5))
    for name in names:
        await api.enroll(name)
    seen: list[str] = []
    cursor = ""
    while True:
        status, data = await api.get(f"/v1/principals?limit=2{cursor}", role="admin")
        assert status == 200 and len(data["items"]) <= 2
        seen += [item["principal"] for item in data["items"]]
        if data["next_cursor"] is None:
            break
        cursor = f"&cursor={data['next_cursor']}"
    assert [n for n in seen if n.startswith(prefix)] == names
    assert seen == sorted(seen) and len(seen) == len(set(seen))


@pytest.mark.parametrize("cursor", ["garbage!!", "YjEy", "cA", "x" * 500, "%00", "djEy"])
async def test_a_cursor_the_service_did_not_issue_is_400(api: Api, cursor: str) -> None:
    """A forged, truncated or foreign cursor is a 400 naming the cursor, never a 5xx."""
    status, data = await api.get(f"/v1/principals?cursor={cursor}", role="admin")
    assert status == 400, data
    assert data["error"]["code"] == "invalid_request" and data["error"]["field"] == "cursor"


@pytest.mark.parametrize("role", ["callout", "hypervisor", "analyst"])
async def test_principals_and_unlock_are_admin_only(api: Api, role: str) -> None:
    """Every role but admin gets 403 from the listing and the unlock, and nothing is unlocked."""
    principal = uid("erin")
    await api.enroll(principal)
    status, data = await api.get("/v1/principals", role=role)
    assert (status, data["error"]["code"]) == (403, "forbidden")
    status, data = await api.post(f"/v1/principals/{principal}/unlock", {"note": "x"}, role=role)
    assert (status, data["error"]["code"]) == (403, "forbidden")
    async with api.runtime.pool.acquire() as conn:
        count = await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'principal_unlock'"
                                    " AND subject = $1", principal)
    assert count == 0


async def test_unlock_of_an_unknown_principal_is_404(api: Api) -> None:
    """Unlocking a name no token or failure ever mentioned is a 404 and writes nothing."""
    status, data = await api.post(f"/v1/principals/{uid('nobody')}/unlock", {}, role="admin")
    assert (status, data["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("body", [{"note": 5}, {"note": "a\x00b"}, {"note": "x" * 2001}, [1]])
async def test_unlock_with_a_bad_note_is_400(api: Api, body: Any) -> None:
    """A note that is not bounded printable text is refused before anything is written."""
    principal = uid("fay")
    await api.enroll(principal)
    status, data = await api.post(f"/v1/principals/{principal}/unlock", body, role="admin")
    assert (status, data["error"]["code"]) == (400, "invalid_request")


def test_openapi_describes_the_principal_routes() -> None:
    """The OpenAPI document lists the listing and the unlock, admin-only, with their schemas."""
    from replayguard.http.app import all_routes
    from replayguard.http.openapi import build

    paths = build(all_routes())["paths"]
    listing = paths["/v1/principals"]["get"]
    assert listing["x-roles"] == ["admin"] and "400" in listing["responses"]
    assert {p["name"] for p in listing["parameters"]} == {"limit", "cursor"}
    unlock = paths["/v1/principals/{principal}/unlock"]["post"]
    assert unlock["requestBody"]["content"]["application/json"]["schema"]["properties"]["note"]
    assert unlock["responses"]["200"]["content"]["application/json"]["schema"]["required"]
