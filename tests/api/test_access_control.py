"""Access control against a matrix written down by hand: every route against every kind of caller.

The expected status of each (route, caller) pair comes from ``tests/api/access_matrix.py``,
never from the product's route table. Every route the app registers and every operation
of its OpenAPI document must be in the matrix. Beyond the matrix: an unknown token, a
revoked token and malformed ``Authorization`` headers are 401 on every protected route;
open routes ignore any header; nothing is ever a 5xx. The app is served with the same
header limits as ``replayguard serve``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient

from replayguard.http.app import create_app
from replayguard.http.state import RUNTIME
from replayguard.runtime import Runtime
from replayguard.services.apitokens import ApiTokens
from replayguard.settings import Secret, Settings
from tests.api.access_matrix import CALLERS, MATRIX, PRINCIPAL, Row
from tests.conftest import ROLES, FakeClock, ServiceTestServer, cli_env, run_cli, seed_keys, uid
from tests.waiting import until

MALFORMED = {
    "scheme only": "Bearer",
    "basic": "Basic x",
    "lowercase scheme, blank token": "bearer  ",
    "empty": "",
    "10 KB token": "Bearer " + "a" * 10 * 1024,
    "10 KB rg token": "Bearer rgt_" + "a" * 10 * 1024,
    "token without scheme": "rgt_" + "x" * 43,
    "two tokens": "Bearer rgt_a rgt_b",
}


@dataclass
class Served:
    client: TestClient[web.Request, web.Application]
    app: web.Application
    runtime: Runtime
    settings: Settings
    tokens: dict[str, str]
    revoked: dict[str, str]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(tmp_path_factory: pytest.TempPathFactory, run_database_url: str,
                 run_keys: Path) -> AsyncIterator[Served]:
    """The app in-process on the run's shared database, a live and a revoked token of every role."""
    data_dir = tmp_path_factory.mktemp("acl") / "data"
    seed_keys(data_dir, run_keys)
    settings = Settings(database_url=Secret(run_database_url), data_dir=data_dir, db_pool_size=4)
    app = create_app(settings, clock=FakeClock())
    client = TestClient(ServiceTestServer(app, settings))
    await client.start_server()
    runtime = app[RUNTIME]
    tokens, revoked = {}, {}
    for role in ROLES:
        _, tokens[role] = await runtime.api_tokens.create(role, uid(role))
        revoked_id, revoked[role] = await runtime.api_tokens.create(role, uid(f"revoked-{role}"))
        assert await runtime.api_tokens.revoke(revoked_id) == 1
    # The principal the rows name exists whatever order the rows run in (unlock needs one).
    async with client.post(f"/v1/principals/{PRINCIPAL}/tokens", json={},
                           headers={"Authorization": f"Bearer {tokens['admin']}"}) as resp:
        assert resp.status == 201
    yield Served(client, app, runtime, settings, tokens, revoked)
    await client.close()


async def _status(served: Served, row: Row, authorization: str | None) -> int:
    headers = {} if authorization is None else {"Authorization": authorization}
    body: Any = {} if row.method in ("POST", "PUT", "PATCH") else None
    async with served.client.request(row.method, row.path, headers=headers, json=body) as resp:
        if resp.content_type != "text/event-stream":
            await resp.read()
        return resp.status


async def _refusal(served: Served, row: Row, authorization: str | None) -> tuple[int, str]:
    """The status and the ``WWW-Authenticate`` challenge of an answer."""
    headers = {} if authorization is None else {"Authorization": authorization}
    body: Any = {} if row.method in ("POST", "PUT", "PATCH") else None
    async with served.client.request(row.method, row.path, headers=headers, json=body) as resp:
        await resp.read()
        return resp.status, resp.headers.get("WWW-Authenticate", "")


async def _headers(served: Served, row: Row, authorization: str | None) -> dict[str, str]:
    """The headers of an answer (a redirect followed)."""
    headers = {} if authorization is None else {"Authorization": authorization}
    body: Any = {} if row.method in ("POST", "PUT", "PATCH") else None
    async with served.client.request(row.method, row.path, headers=headers, json=body) as resp:
        return {name.lower(): value for name, value in resp.headers.items()}


def _row_id(row: Row) -> str:
    return f"{row.method} {row.template}"


def _registered(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route the aiohttp router holds."""
    routes = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        routes.add((route.method, route.resource.canonical if route.resource else "?"))
    return routes


async def test_matrix_covers_every_registered_route_and_operation(served: Served) -> None:
    """Every aiohttp route and every OpenAPI operation has a matrix row, and every row is served."""
    written = {(row.method, row.template) for row in MATRIX}
    assert len(written) == len(MATRIX), "a route has two rows"
    assert all(set(row.expected) == set(CALLERS) for row in MATRIX)
    registered = _registered(served.app)
    resp = await served.client.get("/v1/openapi.json")
    assert resp.status == 200
    document = await resp.json()
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item
                  if method in ("get", "post", "put", "patch", "delete")}
    assert registered - written == set(), "registered routes missing from the access matrix"
    assert documented - written == set(), "documented operations missing from the access matrix"
    assert written - registered == set(), "matrix rows for routes the service does not register"
    assert {(row.method, row.template) for row in MATRIX if row.in_openapi} == documented, \
        "rows marked in_openapi are exactly the document's operations"


@pytest.mark.parametrize("row", MATRIX, ids=_row_id)
async def test_every_caller_gets_the_status_the_matrix_says(served: Served, row: Row) -> None:
    """Each role's token, and no token, get exactly the status the matrix writes down for the route."""
    seen = {}
    for caller in CALLERS:
        header = None if caller == "none" else f"Bearer {served.tokens[caller]}"
        seen[caller] = await _status(served, row, header)
    assert seen == row.expected


@pytest.mark.parametrize("row", [r for r in MATRIX if r.expected["none"] == 401], ids=_row_id)
async def test_protected_route_refuses_missing_unknown_revoked_and_malformed_tokens(
    served: Served, row: Row,
) -> None:
    """No token, an unknown one, a revoked one of any role, and every malformed header are 401,
    each naming the Bearer scheme in ``WWW-Authenticate`` (RFC 9110 §15.5.2, RFC 6750 §3)."""
    cases: dict[str, str | None] = {"no header": None, "unknown token": "Bearer rgt_" + "u" * 43}
    cases.update({f"revoked {role}": f"Bearer {token}" for role, token in served.revoked.items()})
    cases.update(MALFORMED)
    for name, header in cases.items():
        status, challenge = await _refusal(served, row, header)
        assert status == 401, name
        assert challenge.lower().startswith("bearer"), (name, challenge)


@pytest.mark.parametrize("row", [r for r in MATRIX if r.expected["none"] != 401], ids=_row_id)
async def test_open_route_ignores_any_authorization(served: Served, row: Row) -> None:
    """Health, metrics and the OpenAPI document answer the same whatever Authorization is sent."""
    for header in [None, "Bearer rgt_unknown", *MALFORMED.values()]:
        status = await _status(served, row, header)
        assert status == row.expected["none"], (header and header[:20], status)


@pytest.mark.parametrize("row", MATRIX, ids=_row_id)
async def test_every_answer_is_kept_from_caches_sniffing_and_frames(served: Served, row: Row) -> None:
    """Every answer to every caller, refusals and the alert stream included, is stored by no
    cache, read as nothing but its declared type and framed by no page: ``Cache-Control:
    no-store`` (the console's files, which hold no data: ``no-cache``), ``nosniff``, and a
    Content-Security-Policy with ``frame-ancestors 'none'`` (the API's: ``default-src 'none'``)."""
    console = row.template.startswith("/console")
    for caller in CALLERS:
        header = None if caller == "none" else f"Bearer {served.tokens[caller]}"
        seen = await _headers(served, row, header)
        csp = seen.get("content-security-policy", "")
        assert seen.get("cache-control") == ("no-cache" if console else "no-store"), (caller, seen)
        assert seen.get("x-content-type-options") == "nosniff", (caller, seen)
        assert "frame-ancestors 'none'" in csp and (console or csp.startswith("default-src 'none'")), (caller, csp)


async def test_unauthorised_answer_uses_the_contract_error_body(served: Served) -> None:
    """A 401 and a 403 carry the contract's error body with codes unauthorized and forbidden."""
    resp = await served.client.post("/v1/nonces/consume", json={})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    resp = await served.client.post("/v1/nonces/consume", json={},
                                    headers={"Authorization": f"Bearer {served.tokens['analyst']}"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"


def _cli(served: Served, *args: str) -> Any:
    return run_cli("token", *args, "--data-dir", str(served.settings.data_dir),
                   "--database-url", served.runtime.dsn, env=cli_env())


async def _consume(served: Served, token: str) -> int:
    resp = await served.client.post("/v1/nonces/consume", json={"vm_id": "vm-acl", "scope": "acl", "nonce": uid()},
                                    headers={"Authorization": f"Bearer {token}"})
    await resp.read()
    return resp.status


async def test_cli_token_revoke_takes_effect(served: Served) -> None:
    """`replayguard token revoke NAME` turns a working token into a 401."""
    name = uid("cli-callout")
    created = _cli(served, "create", "--role", "callout", "--name", name)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert await _consume(served, token) == 200
    listed = _cli(served, "list")
    assert listed.returncode == 0 and token not in listed.stdout
    assert listed.stdout.splitlines()[0] == "id\trole\tname\tstate\tvms"  # a header row first
    again = _cli(served, "create", "--role", "admin", "--name", name)
    assert again.returncode == 2 and again.stdout == "" and "already named" in again.stderr
    assert len(again.stderr.splitlines()) == 1
    assert any(line.split("\t")[2:4] == [name, "active"] for line in listed.stdout.splitlines())

    revoked = _cli(served, "revoke", name)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked 1 token" in revoked.stderr
    statuses: list[int] = []

    async def refused() -> bool:
        statuses.append(await _consume(served, token))
        return statuses[-1] == 401

    await until(refused, "the revoked token refused")
    assert set(statuses) <= {200, 401}
    assert any(line.split("\t")[2:4] == [name, "revoked"] for line in _cli(served, "list").stdout.splitlines())


async def test_a_token_revoked_by_another_process_is_refused_at_once(served: Served) -> None:
    """A token revoked by another process (the CLI's own ApiTokens on the same database) gets 401 on its next
    request, though the service had just accepted and cached it."""
    await until(lambda: served.runtime.api_tokens.listening_now, "the LISTEN for token changes")
    token_id, token = await served.runtime.api_tokens.create("callout", uid("leaked-callout"))
    assert await _consume(served, token) == 200
    assert await ApiTokens(served.runtime.pool, served.runtime.keys.pepper).revoke(token_id) == 1
    assert await _consume(served, token) == 401


async def test_cli_token_revoke_names_exactly_one_token(served: Served) -> None:
    """`token create` refuses a name shaped like a token id, so `token revoke ID` revokes that one token."""
    name = uid("pam-callout")
    assert _cli(served, "create", "--role", "callout", "--name", name).returncode == 0
    token_id = next(line.split("\t")[0] for line in _cli(served, "list").stdout.splitlines()
                    if line.split("\t")[2] == name)
    named_like_id = _cli(served, "create", "--role", "analyst", "--name", token_id)
    assert named_like_id.returncode == 2 and "tok_" in named_like_id.stderr, named_like_id.stderr
    revoked = _cli(served, "revoke", token_id)
    assert revoked.returncode == 0 and "revoked 1 token(s)" in revoked.stderr, revoked.stderr


async def test_cli_token_revoke_by_id_and_unknown(served: Served) -> None:
    """Revoking by token id refuses the token at once; an unknown id exits 2 with one line."""
    name = uid("cli-hv")
    token = _cli(served, "create", "--role", "hypervisor", "--name", name).stdout.strip()
    token_id = next(line.split("\t")[0] for line in _cli(served, "list").stdout.splitlines()
                    if line.split("\t")[2] == name)
    assert _cli(served, "revoke", token_id).returncode == 0
    assert await _consume(served, token) == 401  # never cached, so refused at once
    missing = _cli(served, "revoke", "tok_does-not-exist")
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "no active token" in missing.stderr
