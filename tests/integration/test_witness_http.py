"""Deployments as each other's witnesses over HTTP (CONTRACT §10), against real PostgreSQL:
checkpoints reach the witness, one that steps back or forks is refused with an alert of the
witness's own, and an unreachable witness is reported and refuses decisions only when required."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core import continuity
from replayguard.core.summaries import quoted
from replayguard.errors import ConfigError
from replayguard.http.app import create_app
from replayguard.http.state import RUNTIME
from replayguard.services.witness import HttpWitness, Record, WitnessUnreachable
from replayguard.settings import Secret, Settings
from tests.conftest import ROLES, Api, FakeClock, ServiceTestServer, dead_url, free_port, run_cli, uid
from tests.integration.test_ledger_continuity import alerts_of, nonce, readyz
from tests.waiting import until


def url_of(api: Api) -> str:
    return str(api.client.make_url("")).rstrip("/")


async def held(api: Api, deployment_id: str) -> dict[str, Any] | None:
    status, body = await api.get(f"/v1/witness/{deployment_id}", role="witness")
    return dict(body) if status == 200 else None


async def put(api: Api, deployment_id: str, body: dict[str, Any], role: str = "witness") -> tuple[int, Any]:
    resp = await api.client.put(f"/v1/witness/{deployment_id}", json=body, headers=api.auth(role))
    return resp.status, await resp.json()


async def pair(api_factory: Callable[..., Any], fresh_database: Callable[[], Any], tmp_path: Path) -> tuple[Api, Api]:
    """A deployment ``a`` whose checkpoints are witnessed by ``b``."""
    b = await api_factory(database_url=Secret(await fresh_database()), data_dir=tmp_path / "b")
    a = await api_factory(database_url=Secret(await fresh_database()), data_dir=tmp_path / "a", checkpoint_every=2,
                          witnesses=(url_of(b),), witness_token=Secret(b.tokens["witness"]))
    return a, b


async def start_on(settings: Settings, port: int) -> Api:
    """The service on a port chosen beforehand (so another deployment can name it first)."""
    app = create_app(settings, clock=FakeClock())
    client = TestClient(ServiceTestServer(app, settings, port=port))
    await client.start_server()
    runtime = app[RUNTIME]
    tokens = {role: (await runtime.api_tokens.create(role, uid(role)))[1] for role in ROLES}
    return Api(client, runtime, tokens, FakeClock())


def witness_token(dsn: str, data_dir: Path) -> str:
    made = run_cli("token", "create", "--role", "witness", "--name", uid("peer"), "--database-url", dsn,
                   "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


async def test_two_deployments_witness_each_other(make_settings: Callable[..., Settings],
                                                  fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """Each deployment's signed checkpoints reach the other's witness endpoint and verify there."""
    dsn_a, dsn_b = await fresh_database(), await fresh_database()
    port_a, port_b = free_port(), free_port()
    token_a, token_b = witness_token(dsn_a, tmp_path / "a"), witness_token(dsn_b, tmp_path / "b")
    a = await start_on(make_settings(database_url=Secret(dsn_a), data_dir=tmp_path / "a", checkpoint_every=2,
                                     witnesses=(f"http://127.0.0.1:{port_b}",), witness_token=Secret(token_b)), port_a)
    b = await start_on(make_settings(database_url=Secret(dsn_b), data_dir=tmp_path / "b", checkpoint_every=2,
                                     witnesses=(f"http://127.0.0.1:{port_a}",), witness_token=Secret(token_a)), port_b)
    try:
        await _exchange(a, b)
    finally:
        await a.client.close()
        await b.client.close()


async def _exchange(a: Api, b: Api) -> None:
    a_id, b_id = a.runtime.continuity.deployment_id, b.runtime.continuity.deployment_id
    assert a_id != b_id
    # Four entries each: with checkpoint_every=2 (and a clock that stands still, so no
    # interval is due) the leader's last checkpoint is within one entry of the head,
    # seq 3 or 4, wherever its ticks fall between the decisions. With three, a tick
    # after the second would leave the checkpoint at seq 2 for good.
    for api in (a, b) * 4:
        assert (await nonce(api, secrets.token_hex(8)))[0] == 200

    async def both_held() -> bool:
        on_b, on_a = await held(b, a_id), await held(a, b_id)
        return bool(on_b and on_b["checkpoint"]["seq"] >= 3 and on_a and on_a["checkpoint"]["seq"] >= 3)

    await until(both_held, "both witnesses to hold a checkpoint", timeout=30)
    record = await held(b, a_id)
    assert record is not None
    checkpoint = cps.from_json(record["checkpoint"])
    assert cps.verify(a.runtime.continuity.public, checkpoint)
    assert record["public_key_pem"] == a.runtime.continuity.public_key_pem
    await a.runtime.continuity.check()
    assert all(state.up for state in a.runtime.continuity.states.values()) and a.runtime.continuity.rollback is None


async def test_a_witness_refuses_a_checkpoint_that_steps_back_or_forks(
        api_factory: Callable[..., Any], fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """Stepping back (ledger_rollback) and forking or a bad signature (ledger_tamper) are
    409 with an alert on the witness; a malformed offer (a key of an unknown algorithm among
    them) is 400; what it holds does not change; a signed recovery moves it on."""
    a, b = await pair(api_factory, fresh_database, tmp_path)
    a_id = a.runtime.continuity.deployment_id
    for _ in range(4):
        assert (await nonce(a, secrets.token_hex(8)))[0] == 200

    async def held_three() -> bool:
        record = await held(b, a_id)
        return bool(record and record["checkpoint"]["seq"] >= 3)

    await until(held_three, "the witness to hold three checkpoints", timeout=30)
    before = await held(b, a_id)
    assert before is not None
    top = cps.from_json(before["checkpoint"])
    key = a.runtime.keys.signing_key()
    pem = a.runtime.continuity.public_key_pem

    def offer(cp: cps.Checkpoint, recovery: continuity.Statement | None = None) -> dict[str, Any]:
        return Record(a_id, pem, cp, recovery).to_json()

    back = cps.sign(key, top.seq - 1, secrets.token_bytes(32), top.ts_us + 1)
    status, body = await put(b, a_id, offer(back))
    assert status == 409 and body["error"]["code"] == "conflict", body
    assert (await alerts_of(b, "ledger_rollback"))[0]["severity"] == "critical"
    fork = cps.sign(key, top.seq, secrets.token_bytes(32), top.ts_us + 1)
    assert (await put(b, a_id, offer(fork)))[0] == 409
    forged = cps.Checkpoint(top.seq + 5, secrets.token_bytes(32), top.ts_us + 1, top.key_id, secrets.token_bytes(64))
    assert (await put(b, a_id, offer(forged)))[0] == 409
    assert len(await alerts_of(b, "ledger_tamper")) == 2
    assert (await put(b, "0123456789abcdef", offer(back)))[0] == 400
    assert (await put(b, a_id, {"checkpoint": "nope"}))[0] == 400
    # A SubjectPublicKeyInfo of an algorithm no library knows (OID 1.2.3.4): 400, not 500.
    unknown = ("-----BEGIN PUBLIC KEY-----\nMCowBQYDKgMEAyEAAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n"
               "-----END PUBLIC KEY-----\n")
    assert (await put(b, a_id, Record(a_id, unknown, back, None).to_json()))[0] == 400
    assert (await put(b, a_id, offer(back), role="callout"))[0] == 403
    assert await held(b, a_id) == before

    statement = continuity.sign_statement(key, top.seq - 1, secrets.token_bytes(32), top.ts_us + 10,
                                          top.seq, top.hash)
    recovered = cps.sign(key, top.seq - 1, secrets.token_bytes(32), top.ts_us + 10)
    status, body = await put(b, a_id, offer(recovered, statement))
    assert status == 200 and body["admission"] == "recovery", body
    stale = continuity.sign_statement(key, 2, secrets.token_bytes(32), top.ts_us + 5, top.seq, top.hash)
    assert (await put(b, a_id, offer(cps.sign(key, 2, secrets.token_bytes(32), top.ts_us + 20), stale)))[0] == 409
    await a.client.close()  # the pushing side first: b must not shut down under one of a's pushes


async def test_an_unreachable_witness_is_reported_and_refuses_only_when_required(
        api_factory: Callable[..., Any], fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """A dead witness raises witness_unreachable and sets replayguard_witness_up to 0; decisions
    go on unless witness_required, then they are 503 and /readyz is 503."""
    with dead_url() as dead:  # refused for the whole test
        dsn = Secret(await fresh_database())
        api = await api_factory(database_url=dsn, witnesses=(dead,))
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
        alerts = await alerts_of(api, "witness_unreachable")
        assert alerts and alerts[0]["severity"] == "warning"
        assert alerts[0]["summary"].startswith(f"witness {quoted(dead)} cannot be reached: "), alerts[0]
        metrics = await (await api.client.get("/metrics")).text()
        assert f'replayguard_witness_up{{witness="{dead}"}} 0.0' in metrics
        ready = await readyz(api)
        assert ready[0] == 200 and ready[1]["checks"]["continuity"] == "witness_unreachable"

        required = await api_factory(database_url=dsn, witnesses=(dead,), witness_required=True)
        status, body = await nonce(required, secrets.token_hex(8))
        assert status == 503 and body["error"]["code"] == "witness_unreachable", body
        assert (await readyz(required))[0] == 503

        async def critical() -> bool:
            return any(a["severity"] == "critical" for a in await alerts_of(required, "witness_unreachable"))

        await until(critical, "the critical alert", timeout=30)


async def test_an_unreachable_witness_summary_quotes_the_error_it_gave(
        api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """The witness_unreachable summary shows the error text (which carries a witness's path or
    URL, and can carry its answer) as one JSON string: a quote, a trailing backslash and a
    verdict-like phrase in it end no quotes and read as nothing of the service's own."""
    hostile = tmp_path / 'gone: ok" -- no action needed \\'
    name = f"file:{hostile / 'w.json'}"
    api = await api_factory(witnesses=(name,))
    assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    alert = (await alerts_of(api, "witness_unreachable"))[0]
    error = alert["details"]["error"]
    assert str(hostile) in error, alert
    prefix = f"witness {quoted(name)} cannot be reached: "
    assert alert["summary"].startswith(prefix), alert
    assert json.loads(alert["summary"].removeprefix(prefix)) == error, alert


async def test_witness_put_with_a_seq_past_bigint_is_a_400(api: Api) -> None:
    """A correctly signed witness record whose checkpoint seq exceeds PostgreSQL's bigint is
    answered 400 invalid_request, not 500."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    deployment = cps.key_id(public)
    checkpoint = cps.sign(key, 2**63, b"\x01" * 32, 1_790_000_000_000_000)
    body = {"deployment_id": deployment, "public_key_pem": cps.public_key_pem(public),
            "checkpoint": cps.to_json(checkpoint)}
    resp = await api.client.put(f"/v1/witness/{deployment}", json=body, headers=api.auth("witness"))
    data = await resp.json()
    assert (resp.status, data["error"]["code"]) == (400, "invalid_request"), data


WITNESS_PASSWORD = "hunter2WitnessPw"


@pytest.mark.parametrize("token", [None, Secret("rgt_" + "w" * 43)], ids=["no token", "with witness_token"])
async def test_witness_url_with_credentials_is_refused_at_start_naming_no_password(
        api_factory: Callable[..., Any], token: Secret | None) -> None:
    """A witness URL carrying user:password (which would name the witness in the unauthenticated
    /metrics, the witness_unreachable log line and alert, and which aiohttp refuses beside a
    witness_token) stops start-up with one ConfigError line that does not show the password."""
    url = f"http://ops:{WITNESS_PASSWORD}@127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError) as caught:
        await api_factory(witnesses=(url,), witness_token=token)
    assert WITNESS_PASSWORD not in caught.value.message and "credentials" in caught.value.message


@pytest.mark.parametrize("answer", [b"{}", b'{"admission": "stored"}', b'["accept"]', b"<html>ok</html>", b""])
async def test_a_witness_url_that_answers_200_without_an_admission_holds_nothing(answer: bytes) -> None:
    """Something else answers 200 at a witness's URL (a proxy's page, another service): the
    push is reported unreachable, never as a checkpoint the witness holds."""
    async def anything(_request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app)
    await server.start_server()
    try:
        key = Ed25519PrivateKey.generate()
        a_id, pem = cps.key_id(key.public_key()), cps.public_key_pem(key.public_key())
        witness = HttpWitness(str(server.make_url("")).rstrip("/"), a_id, None)
        with pytest.raises(WitnessUnreachable):
            await witness.put(Record(a_id, pem, cps.sign(key, 10, secrets.token_bytes(32), 1_790_000_000_000_000)))
    finally:
        await server.close()
