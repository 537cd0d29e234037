"""Admin details an operator notices: unique token names, kept acknowledgements, plain headers."""

from __future__ import annotations

import asyncpg
import pytest

from replayguard.errors import Conflict, InvalidRequest
from tests.api.test_analysts import reuse_alert
from tests.conftest import Api, uid


async def test_token_names_are_unique_among_active_tokens(api: Api) -> None:
    """A second active token of the same name is a conflict; once the first is revoked the name is free."""
    name = uid("ops")
    first_id, _ = await api.runtime.api_tokens.create("analyst", name)
    with pytest.raises(Conflict, match="already named"):
        await api.runtime.api_tokens.create("admin", name)
    assert await api.runtime.api_tokens.revoke(name) == 1
    second_id, _ = await api.runtime.api_tokens.create("admin", name)
    assert second_id != first_id
    rows = {r["id"]: r for r in await api.runtime.api_tokens.list()}
    assert rows[first_id]["revoked_at"] is not None and rows[second_id]["revoked_at"] is None


async def test_database_refuses_a_duplicate_active_name(api: Api) -> None:
    """The uniqueness is the database's (a partial unique index), not a check that two creators could race."""
    name = uid("dup")
    await api.runtime.api_tokens.create("analyst", name)
    async with api.runtime.pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO api_tokens (id, name, role, digest) VALUES ($1, $2, 'admin', $3)",
                               uid("tok"), name, b"\x00" * 32)


async def test_a_name_shaped_like_a_token_id_is_refused(api: Api) -> None:
    """No new token may be named ``tok_…``, so a name never equals a token id that `revoke` is given."""
    token_id, _ = await api.runtime.api_tokens.create("callout", uid("pam-callout"))
    with pytest.raises(InvalidRequest, match="tok_"):
        await api.runtime.api_tokens.create("analyst", token_id)


async def test_revoke_by_id_spares_a_token_named_like_that_id(api: Api) -> None:
    """`revoke ID` revokes only the token with that id, not also an older active token whose name equals ID."""
    token_id, _ = await api.runtime.api_tokens.create("callout", uid("pam-callout"))
    old_id = uid("tok_old")
    async with api.runtime.pool.acquire() as conn:  # a name made before such names were refused
        await conn.execute("INSERT INTO api_tokens (id, name, role, digest) VALUES ($1, $2, 'analyst', $3)",
                           old_id, token_id, b"\x01" * 32)
    assert await api.runtime.api_tokens.revoke(token_id) == 1
    rows = {r["id"]: r for r in await api.runtime.api_tokens.list()}
    assert rows[token_id]["revoked_at"] is not None and rows[old_id]["revoked_at"] is None


async def test_second_acknowledgement_keeps_the_first(api: Api) -> None:
    """Acknowledging twice keeps both acknowledgements, each with the token's id and name and its note."""
    alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    caller = await api.runtime.api_tokens.authenticate(api.tokens["analyst"])
    admin = await api.runtime.api_tokens.authenticate(api.tokens["admin"])
    assert caller is not None and admin is not None
    status, first = await api.post(f"/v1/alerts/{alert_id}/acknowledge", {"note": "first look"}, role="analyst")
    assert status == 200, first
    status, second = await api.post(f"/v1/alerts/{alert_id}/acknowledge", {"note": "closed"}, role="admin")
    assert status == 200, second
    assert second["acknowledged"]["by_name"] == admin.name and second["acknowledged"]["note"] == "closed"
    status, detail = await api.get(f"/v1/alerts/{alert_id}")
    assert status == 200
    assert [(a["by"], a["by_name"], a["note"], a["seq"]) for a in detail["acknowledgements"]] == [
        (caller.token_id, caller.name, "first look", first["ack_seq"]),
        (admin.token_id, admin.name, "closed", second["ack_seq"])]


async def test_hotp_tokens_are_listed_without_a_period(api: Api) -> None:
    """A principal's HOTP token is listed without a period (it counts); a TOTP token keeps its own."""
    principal = uid("p")
    await api.enroll(principal, type="hotp")
    await api.enroll(principal, type="totp")
    status, listing = await api.get(f"/v1/principals/{principal}/tokens", role="admin")
    assert status == 200
    by_type = {t["type"]: t for t in (listing["items"] if isinstance(listing, dict) else listing)}
    assert "period" not in by_type["hotp"] and by_type["totp"]["period"] == 30


async def test_server_header_names_no_version(api: Api) -> None:
    """Answers, the alert stream's included, say Server: replayguard, not aiohttp's name and version."""
    for path in ("/healthz", "/v1/alerts", "/v1/nope"):
        resp = await api.client.get(path, headers=api.auth("analyst"))
        await resp.read()
        assert resp.headers.get("Server") == "replayguard", (path, resp.headers.get("Server"))
    async with api.client.get("/v1/alerts/stream", headers=api.auth("analyst")) as resp:
        assert resp.headers.get("Server") == "replayguard"


@pytest.mark.parametrize("secret", ["JBSWY3DPEHPK3PXP", "JBSWY3DPEHPK3PXPJBSWY3D"], ids=["80 bits", "115 bits"])
async def test_short_secret_is_a_400_and_enrols_nothing(api: Api, secret: str) -> None:
    """A secret under RFC 4226's 128 bits is refused with a 400 naming the field, and no token is left behind."""
    principal = uid("p")
    status, body = await api.post(f"/v1/principals/{principal}/tokens", {"type": "hotp", "secret": secret},
                                  role="admin")
    assert status == 400 and body["error"]["field"] == "secret", body
    status, listing = await api.get(f"/v1/principals/{principal}/tokens", role="admin")
    assert status == 200 and listing["items"] == []
