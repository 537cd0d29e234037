"""Ledger continuity over real PostgreSQL (CONTRACT §10): a ledger cut short or restored
from an older copy is caught by its signed checkpoints and its witnesses, decisions stop
until the recovery is recorded, and after it nothing the lost range used passes again."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pyotp
import pytest_asyncio

from replayguard.services.ledger import CHECKPOINT_LOCK
from replayguard.settings import Secret
from tests.conftest import PG_ADMIN, Api, FakeClock, cli_env, drop_database, dsn_for, run_cli
from tests.integration.test_ledger_verify import ledger_of, verify, wait_for_checkpoint
from tests.waiting import until


async def nonce(api: Api, value: str, **extra: Any) -> tuple[int, Any]:
    return await api.post("/v1/nonces/consume", {"vm_id": "vm-1", "scope": "s", "nonce": value, **extra})


async def alerts_of(api: Api, kind: str) -> list[dict[str, Any]]:
    status, page = await api.get(f"/v1/alerts?kind={kind}")
    assert status == 200, page
    return list(page["items"])


async def readyz(api: Api) -> tuple[int, Any]:
    resp = await api.client.get("/readyz")
    return resp.status, await resp.json()


async def cut_tail(dsn: str, keep: int, *, checkpoints_too: bool = False) -> None:
    """What a superuser can do: delete the entries past ``keep`` (and, with ``checkpoints_too``,
    the checkpoints past it) and move the head back. It holds the checkpointer's lock while it
    cuts, so a checkpoint signed over the old head lands before the cut, never after it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", CHECKPOINT_LOCK)
        await conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_append_only")
        await conn.execute("DELETE FROM ledger WHERE seq > $1", keep)
        await conn.execute("UPDATE ledger_head SET seq = $1, hash = (SELECT hash FROM ledger WHERE seq = $1)", keep)
        await conn.execute("ALTER TABLE ledger ENABLE TRIGGER ledger_append_only")
        if checkpoints_too:
            await conn.execute("DELETE FROM checkpoints WHERE seq > $1", keep)
    finally:
        await conn.close()


async def copy_database(dsn: str) -> str:
    """``CREATE DATABASE … TEMPLATE …``: the operator's backup of the moment."""
    name = f"rg_copy_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{dsn.rpartition("/")[2]}"')
    finally:
        await admin.close()
    return dsn_for(name)


@pytest_asyncio.fixture
async def backups() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """``copy_database``, with every copy dropped after the test. A test lists it before
    ``api_factory``, so the services using a copy are closed before it is dropped."""
    made: list[str] = []

    async def copy(dsn: str) -> str:
        made.append(await copy_database(dsn))
        return made[-1]

    yield copy
    for dsn in made:
        await drop_database(dsn)


async def test_a_ledger_cut_short_is_found_by_verify_and_the_checkpointer(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Entries past 12 deleted and the head moved back: verify (API and CLI) is ok:false at 13,
    ledger_tamper and ledger_rollback are raised without any new decision, decisions stop."""
    api, dsn = await ledger_of(api_factory, fresh_database, 20, checkpoint_every=5)
    await wait_for_checkpoint(api, covering=15)
    await cut_tail(dsn, 12)
    report = await verify(api)
    assert report["ok"] is False and report["first_bad_seq"] == 13 and report["problem"] == "missing_tail", report
    cli = run_cli("ledger", "verify", "--no-progress", "--database-url", dsn, "--data-dir", str(tmp_path / "data"))
    assert cli.returncode == 1 and orjson.loads(cli.stdout)["problem"] == "missing_tail", cli.stdout + cli.stderr

    async def raised() -> bool:
        return bool(await alerts_of(api, "ledger_tamper")) and bool(await alerts_of(api, "ledger_rollback"))

    await until(raised, "the ledger_rollback alert", timeout=30)
    assert (await alerts_of(api, "ledger_rollback"))[0]["severity"] == "critical"
    status, body = await nonce(api, secrets.token_hex(8))
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    assert (await readyz(api))[0] == 503


async def test_a_head_rewound_under_a_witness_is_ok_false(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """With the database's own checkpoints gone too, the file witness still names the lost tail."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    api, dsn = await ledger_of(api_factory, fresh_database, 20, checkpoint_every=5, witnesses=(f"file:{witness}",))
    await wait_for_checkpoint(api, covering=15)
    await until(lambda: _held_at_least(witness, 15), "the witness to hold a checkpoint at 15", timeout=30)
    await cut_tail(dsn, 12, checkpoints_too=True)
    report = await verify(api)
    assert report["ok"] is False and report["problem"] == "ledger_rollback" and report["first_bad_seq"] == 13, report
    status, body = await nonce(api, secrets.token_hex(8))
    assert status == 503 and body["error"]["code"] == "ledger_rollback"


async def _held_at_least(path: Path, seq: int) -> bool:
    try:
        return int(orjson.loads(path.read_bytes())["checkpoint"]["seq"]) >= seq
    except (OSError, ValueError, KeyError):
        return False


async def test_a_restored_database_is_refused_and_the_recovery_is_recorded(
        backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
        api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Issue 14, reproduction 1: a copy taken before 10 accepts, started again with the same
    keys and a file witness, serves no decision (503 ledger_rollback, /readyz 503, verify
    ok:false, a critical alert); after accept-rollback decisions resume and none of the 10
    nonces, nor the TOTP code or HOTP token used in the lost range, is accepted again."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    sink = tmp_path / "alerts.jsonl"
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",), "sinks": (f"file:{sink}",)}
    clock = FakeClock(time.time())
    dsn = await fresh_database()
    first = await api_factory(clock=clock, database_url=Secret(dsn), **settings)
    totp = await first.enroll("alice-restore", type="totp")
    hotp = await first.enroll("bob-restore", type="hotp")
    assert (await nonce(first, secrets.token_hex(8)))[0] == 200
    await first.client.close()
    backup = await backups(dsn)

    second = await api_factory(clock=clock, database_url=Secret(dsn), **settings)
    lost = [secrets.token_hex(8) for _ in range(10)]
    for value in lost:
        status, body = await nonce(second, value)
        assert status == 200 and body["decision"] == "accept", body
    code = pyotp.TOTP(totp["secret"]).at(clock.now)
    otp = {"vm_id": "vm-1", "principal": "alice-restore", "otp": code}
    assert (await second.post("/v1/otp/verify", otp))[1]["decision"] == "accept"
    hotp_code = {"vm_id": "vm-1", "principal": "bob-restore", "otp": pyotp.HOTP(hotp["secret"]).at(0)}
    hotp_answer = await second.post("/v1/otp/verify", hotp_code)
    assert hotp_answer[1].get("decision") == "accept", hotp_answer
    conn = await asyncpg.connect(backup)
    try:
        head = await conn.fetchval("SELECT seq FROM ledger_head")
    finally:
        await conn.close()
    await until(lambda: _held_at_least(witness, head + 1), "the witness to hold a checkpoint past the head",
                timeout=30)
    await second.client.close()

    started = time.monotonic()
    restored = await api_factory(clock=clock, database_url=Secret(backup), **settings)
    status, body = await nonce(restored, lost[0])
    refused_after = time.monotonic() - started
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    print(f"restored start to refusal: {refused_after:.3f} s (the copy's head was {head})")
    assert (await restored.post("/v1/otp/verify", otp))[0] == 503
    radius = {"User-Name": {"type": "string", "value": ["alice-restore"]},
              "User-Password": {"type": "string", "value": [code]},
              "NAS-Identifier": {"type": "string", "value": ["vm-1"]}}
    status, body = await restored.post("/v1/radius/authenticate", radius)
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    ready = await readyz(restored)
    assert ready[0] == 503 and ready[1]["checks"]["continuity"] == "ledger_rollback"
    report = await verify(restored)
    assert report["ok"] is False and report["problem"] == "ledger_rollback"
    alerts = await alerts_of(restored, "ledger_rollback")
    assert alerts and alerts[0]["severity"] == "critical"

    async def in_sink() -> bool:
        return sink.exists() and b'"ledger_rollback"' in sink.read_bytes()

    await until(in_sink, "the alert in the sink", timeout=30)

    env = cli_env(REPLAYGUARD_DATABASE_URL=backup, REPLAYGUARD_DATA_DIR=str(tmp_path / "data"),
                  REPLAYGUARD_WITNESSES=f"file:{witness}")
    done = run_cli("ledger", "accept-rollback", "--reason", "restored last night's backup", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    record = orjson.loads(done.stdout)
    # The restored service, seeing the recovery, may have pushed its checkpoint first.
    assert record["witnesses"][f"file:{witness}"] in ("recovery", "same") and record["hotp_tokens_revoked"] == 1

    async def serving() -> bool:
        return (await readyz(restored))[0] == 200

    await until(serving, "decisions to be served again", timeout=30)
    for value in lost:
        status, body = await nonce(restored, value)
        assert status == 200 and body["decision"] == "reject" and body["reason"] == "reused", body
    assert (await restored.post("/v1/otp/verify", otp))[1]["reason"] == "reused"
    assert (await restored.post("/v1/otp/verify", hotp_code))[1]["decision"] == "reject"
    # The revoked HOTP secret enrolled again accepts none of its codes (the lost range may
    # have moved its counter any distance).
    await restored.enroll("bob-restore", type="hotp", secret=hotp["secret"])
    for counter in (0, 1, 5):
        again = {**hotp_code, "otp": pyotp.HOTP(hotp["secret"]).at(counter)}
        assert (await restored.post("/v1/otp/verify", again))[1]["decision"] == "reject"
    fresh_issue = {"issued_at": clock.now + 300, "ttl_s": 600}
    clock.advance(300)
    assert (await nonce(restored, secrets.token_hex(8), **fresh_issue))[1]["decision"] == "accept"
    assert (await verify(restored))["ok"] is True
    # The witness follows the restored ledger: it holds the recovery's checkpoint, or one the
    # restored leader signed after it (checkpoint_every=5, and more entries than that came).
    held = orjson.loads(witness.read_bytes())["checkpoint"]
    assert held["seq"] >= record["recovery_seq"]
    conn = await asyncpg.connect(backup)
    try:
        assert bytes(await conn.fetchval("SELECT hash FROM ledger WHERE seq = $1", held["seq"])).hex() == held["hash"]
    finally:
        await conn.close()
    status, entries = await restored.get(f"/v1/ledger?after_seq={record['recovery_seq'] - 1}&limit=1")
    entry = entries["items"][0]
    assert entry["kind"] == "ledger_recovery", entry


async def test_accept_rollback_with_nothing_lost_changes_nothing(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """accept-rollback on a ledger that holds every witnessed checkpoint exits 1 and appends nothing."""
    witness = tmp_path / "w.json"
    api, dsn = await ledger_of(api_factory, fresh_database, 3, witnesses=(f"file:{witness}",))
    await api.runtime.continuity.check()
    before = api.runtime.continuity.head_seq
    env = cli_env(REPLAYGUARD_DATABASE_URL=dsn, REPLAYGUARD_DATA_DIR=str(tmp_path / "data"),
                  REPLAYGUARD_WITNESSES=f"file:{witness}")
    done = run_cli("ledger", "accept-rollback", "--reason", "just checking", env=env)
    assert done.returncode == 1 and "nothing to recover" in done.stdout
    await api.runtime.continuity.check()
    assert api.runtime.continuity.head_seq == before


async def test_a_database_gone_back_under_a_running_service_stops_it_at_the_next_decision(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """With no witness and no checkpoint past the head, the service still notices the ledger
    numbering a new entry below one it already answered: that answer is a 503, decisions stop,
    a ledger_rollback alert is raised."""
    api, dsn = await ledger_of(api_factory, fresh_database, 20, checkpoint_every=1000)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM checkpoints WHERE seq > 12")
    finally:
        await conn.close()
    await cut_tail(dsn, 12)
    status, body = await nonce(api, secrets.token_hex(8))
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    status, body = await nonce(api, secrets.token_hex(8))
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body

    async def raised() -> bool:
        return bool(await alerts_of(api, "ledger_rollback"))

    await until(raised, "the ledger_rollback alert", timeout=30)
    assert (await readyz(api))[0] == 503


async def test_state_tables_that_forgot_an_accept_fail_verification(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Issue 20: a superuser resets an HOTP token's counter and deletes its use: the used code
    is not accepted again unnoticed — verify (API and CLI) names the accept's seq as a state
    mismatch and raises ledger_tamper."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), checkpoint_every=1)
    token = await api.enroll("carol-state", type="hotp")
    body = {"vm_id": "vm-1", "principal": "carol-state", "otp": pyotp.HOTP(token["secret"]).at(0)}
    status, answer = await api.post("/v1/otp/verify", body)
    assert status == 200 and answer["decision"] == "accept"
    assert (await verify(api))["ok"] is True
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE otp_credentials c SET last_counter = -1 FROM otp_tokens t"
                           " WHERE t.fingerprint = c.fingerprint AND t.id = $1", token["token_id"])
        await conn.execute("DELETE FROM uses WHERE first_seq = $1", answer["seq"])
    finally:
        await conn.close()
    report = await verify(api)
    assert report["ok"] is False and report["problem"] == "state_mismatch" and report["first_bad_seq"] == answer["seq"]
    cli = run_cli("ledger", "verify", "--no-progress", "--database-url", dsn, "--data-dir", str(tmp_path / "data"))
    assert cli.returncode == 1 and orjson.loads(cli.stdout)["problem"] == "state_mismatch", cli.stdout + cli.stderr
    assert any(f"does not hold what ledger entry {answer['seq']} implies" in a["summary"]
               for a in await alerts_of(api, "ledger_tamper"))
