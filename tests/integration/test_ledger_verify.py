"""Tamper evidence over real PostgreSQL: an attacker with database access edits, deletes or
reorders ledger rows; verification names the first bad seq. Checkpoints are signed and
checked offline by the CLI with nothing but the public key."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core.chain_sweep import ChainSweep
from replayguard.core.checkpoints import Checkpoint
from replayguard.core.state_schedule import StateSchedule
from replayguard.http.state import ANALYSTS
from replayguard.settings import Secret, Settings
from tests.conftest import Api, FakeClock, cli_env, run_cli, start_api, uid
from tests.waiting import CountedLock, until


async def ledger_of(api_factory: Callable[..., Any], fresh_database: Callable[[], Any], entries: int,
                    **settings: Any) -> tuple[Api, str]:
    """An app over a database of its own holding ``entries`` decisions (seq 1..entries)."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **settings)
    for _ in range(entries):
        body = {"vm_id": "vm-1", "scope": "s", "nonce": secrets.token_hex(8)}
        assert (await api.post("/v1/nonces/consume", body))[0] == 200
    return api, dsn


async def tamper(dsn: str, *statements: str) -> None:
    """What an attacker with the database owner's rights can do: lift the guard and edit."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_append_only")
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def verify(api: Api) -> dict[str, Any]:
    status, report = await api.get("/v1/ledger/verify")
    assert status == 200, report
    return dict(report)


async def test_a_modified_row_is_found(fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Changing one field of entry 5 makes verification fail at seq 5 and raise ledger_tamper."""
    api, dsn = await ledger_of(api_factory, fresh_database, 10)
    assert (await verify(api))["ok"] is True
    await tamper(dsn, "UPDATE ledger SET decision = 'reject', reason = 'invalid' WHERE seq = 5")
    report = await verify(api)
    assert report["ok"] is False and report["first_bad_seq"] == 5 and report["problem"] == "modified"
    status, alerts = await api.get("/v1/alerts?kind=ledger_tamper")
    assert status == 200 and alerts["items"][0]["severity"] == "critical"


async def test_a_deleted_row_is_found(fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Deleting entry 4 makes verification fail at seq 4."""
    api, dsn = await ledger_of(api_factory, fresh_database, 10)
    await tamper(dsn, "DELETE FROM ledger WHERE seq = 4")
    report = await verify(api)
    assert report["ok"] is False and report["first_bad_seq"] == 4 and report["problem"] == "missing"


async def test_a_reordered_pair_of_rows_is_found(fresh_database: Callable[[], Any],
                                                 api_factory: Callable[..., Any]) -> None:
    """Swapping the positions of entries 3 and 4 makes verification fail at seq 3."""
    api, dsn = await ledger_of(api_factory, fresh_database, 10)
    await tamper(dsn, "UPDATE ledger SET seq = -3 WHERE seq = 3", "UPDATE ledger SET seq = 3 WHERE seq = 4",
                 "UPDATE ledger SET seq = 4 WHERE seq = -3")
    report = await verify(api)
    assert report["ok"] is False and report["first_bad_seq"] == 3


async def test_a_rewritten_chain_is_caught_by_a_signed_checkpoint(fresh_database: Callable[[], Any],
                                                                  api_factory: Callable[..., Any]) -> None:
    """Recomputing every hash after an edit still fails against the signed checkpoint."""
    api, dsn = await ledger_of(api_factory, fresh_database, 6, checkpoint_every=3)
    # The first checkpoint is signed at once, over seq 1 alone; the edit must be under one.
    await wait_for_checkpoint(api, covering=2)
    await tamper(dsn, "UPDATE ledger SET reason = 'invalid' WHERE seq = 2",
                 "UPDATE ledger l SET prev_hash = (SELECT hash FROM ledger WHERE seq = l.seq - 1) WHERE seq = 2",
                 *[f"UPDATE ledger SET hash = rg_entry_hash(prev_hash, seq, ts_us, kind, vm_id, subject,"
                   f" cred_digest, decision, reason, payload) WHERE seq = {s};"
                   f" UPDATE ledger SET prev_hash = (SELECT hash FROM ledger WHERE seq = {s}) WHERE seq = {s + 1}"
                   for s in range(2, 7)],
                 "UPDATE ledger_head SET hash = (SELECT hash FROM ledger WHERE seq = 6)")
    report = await verify(api)
    assert report["ok"] is False and report["problem"] == "checkpoint_mismatch"
    swept = await api.client.app[ANALYSTS].ledger.check_chain_span(0, 6)  # the leader's chain sweep
    assert swept is not None and (swept.seq, swept.problem.value) == (report["first_bad_seq"], report["problem"])


async def test_the_chain_sweeps_spans_check_the_entries_where_they_meet(fresh_database: Callable[[], Any],
                                                                        api_factory: Callable[..., Any]) -> None:
    """The leader's chain sweep checks the ledger in spans from one stored hash to another.
    An intact ledger gives no finding in any span; an entry at the end of one span edited
    with its own hash recomputed (so it matches it) is found by the next span, at the entry
    that no longer follows it, as the whole verification finds it."""
    api, dsn = await ledger_of(api_factory, fresh_database, 30)
    ledger = api.client.app[ANALYSTS].ledger
    spans = [(0, 10), (10, 20), (20, 30)]
    assert [await ledger.check_chain_span(after, upto) for after, upto in spans] == [None, None, None]
    await tamper(dsn, "UPDATE ledger SET reason = 'invalid' WHERE seq = 10",
                 "UPDATE ledger SET hash = rg_entry_hash(prev_hash, seq, ts_us, kind, vm_id, subject, cred_digest,"
                 " decision, reason, payload) WHERE seq = 10")
    found = [await ledger.check_chain_span(after, upto) for after, upto in spans]
    report = await verify(api)
    assert found[0] is None and found[2] is None and found[1] is not None
    assert (found[1].seq, found[1].problem.value) == (report["first_bad_seq"], report["problem"]) == (11, "broken_link")


async def test_the_chain_sweep_alerts_each_finding_once_round_after_round(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Two entries edited in different spans of the leader's chain sweep: each is alerted
    once, and the rounds after it, finding the two again in turn, do not join them again
    (which would count them up and reopen them once acknowledged, every round)."""
    api, dsn = await ledger_of(api_factory, fresh_database, 10)
    feed = api.client.app[ANALYSTS].feed
    feed.duties._chain_sweep = sweep = ChainSweep(size=5)
    await tamper(dsn, "UPDATE ledger SET reason = 'invalid' WHERE seq IN (2, 7)")
    rounds = sweep.rounds
    await until(lambda: sweep.rounds >= rounds + 4, "four rounds of the chain sweep", timeout=30)
    status, page = await api.get("/v1/alerts?kind=ledger_tamper")
    assert status == 200, page
    found = sorted((a["details"]["first_bad_seq"], a["details"]["problem"], a["count"]) for a in page["items"])
    assert found == [(2, "modified", 1), (7, "modified", 1)], page["items"]


async def test_forged_checkpoint_rows_over_a_sound_chain_are_logged_and_alerted_once(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], log_buffer: io.StringIO) -> None:
    """Someone with the database's rights writes checkpoint rows naming the service's key
    over a sound chain, each over a hash its entry does not have: one with a garbage
    signature, one signed by another key. The chain is intact (verification stays ok) and
    the rows vouch for nothing, but they are evidence of a writer: the leader's chain sweep
    logs each (its entry, neither its hash nor its signature) and both join one critical
    ``ledger_tamper`` alert (problem ``forged_checkpoint``), once each, however many rounds
    of the sweep find them again."""
    api, dsn = await ledger_of(api_factory, fresh_database, 10)
    feed = api.client.app[ANALYSTS].feed
    feed.duties._chain_sweep = sweep = ChainSweep(size=5)  # the two rows in two spans
    ours = api.client.app[ANALYSTS].ledger.key_id
    garbage = Checkpoint(3, secrets.token_bytes(32), 1_800_000_000_000_000, ours, secrets.token_bytes(64))
    wrong_key = dataclasses.replace(cps.sign(Ed25519PrivateKey.generate(), 8, secrets.token_bytes(32),
                                             1_800_000_000_000_000), key_id=ours)
    conn = await asyncpg.connect(dsn)
    try:
        for row in (garbage, wrong_key):  # in place of a checkpoint the leader may have signed there
            await conn.execute("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO UPDATE"
                               " SET hash = excluded.hash, ts_us = excluded.ts_us, key_id = excluded.key_id,"
                               " signature = excluded.signature", *dataclasses.astuple(row))
    finally:
        await conn.close()
    rounds = sweep.rounds
    await until(lambda: sweep.rounds >= rounds + 4, "four rounds of the chain sweep", timeout=30)
    status, page = await api.get("/v1/alerts?kind=ledger_tamper")
    assert status == 200, page
    assert [(a["severity"], a["details"]["problem"], a["count"]) for a in page["items"]] == [
        ("critical", "forged_checkpoint", 2)], page["items"]
    assert (await verify(api))["ok"] is True
    lines = [orjson.loads(line) for line in log_buffer.getvalue().splitlines() if line.startswith("{")]
    swept = [line for line in lines
             if line.get("event") == "checkpoint_signature_invalid" and line.get("found_by") == "chain_sweep"]
    assert sorted(line["first_seq"] for line in swept) == [3, 8] and all(line["level"] == "error" for line in swept)
    for row in (garbage, wrong_key):
        assert row.signature.hex() not in log_buffer.getvalue() and row.hash.hex() not in log_buffer.getvalue()


async def wait_for_checkpoint(api: Api, covering: int = 1) -> dict[str, Any]:
    """Polls until the background task has signed one over seq ``covering`` or later; the
    timeout only bounds a failure."""
    async def poll() -> dict[str, Any]:
        while True:
            status, page = await api.get("/v1/ledger/checkpoints")
            assert status == 200, page
            if page["items"] and page["items"][0]["seq"] >= covering:
                return dict(page["items"][0])
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), 30)


# An attacker's edits to entries a signed checkpoint already covers, by the kind of finding.
UNDER_A_CHECKPOINT = {
    "modified": ("UPDATE ledger SET decision = 'reject', reason = 'invalid' WHERE seq = 5",),
    "missing": ("DELETE FROM ledger WHERE seq = 4",),
    "reordered": ("UPDATE ledger SET seq = -3 WHERE seq = 3", "UPDATE ledger SET seq = 3 WHERE seq = 4",
                  "UPDATE ledger SET seq = 4 WHERE seq = -3"),
}


@pytest.mark.parametrize("edit", sorted(UNDER_A_CHECKPOINT))
async def test_tampering_is_alerted_though_the_verifying_analyst_left(
        edit: str, make_settings: Callable[..., Settings], clock: FakeClock, database_url: str) -> None:
    """Entries below the newest checkpoint are edited, deleted or reordered; an analyst asks
    for a verification and leaves before it ends, so it stops without alerting (the service
    as ``serve`` runs it). The alert-feed leader's periodic duties still raise the critical
    ledger_tamper that the whole verification would have, naming the same entry and problem:
    no one has to ask, nor wait on the page, for tampering to be alerted."""
    api = await start_api(make_settings(checkpoint_every=1), clock)
    try:
        for _ in range(10):
            body = {"vm_id": "vm-1", "scope": "s", "nonce": secrets.token_hex(8)}
            assert (await api.post("/v1/nonces/consume", body))[0] == 200
        await wait_for_checkpoint(api, covering=10)  # every entry is under a signed checkpoint
        await tamper(database_url, *UNDER_A_CHECKPOINT[edit])
        chain = api.client.app[ANALYSTS].ledger._chain
        assert chain is not None
        chain._apart = turn = CountedLock()
        await turn.acquire()  # the verification is held at its chain check...
        try:
            asking = asyncio.create_task(api.get("/v1/ledger/verify"))
            await until(lambda: turn.waiting == 1, "the verification to reach its chain check")
            asking.cancel()  # ...when the analyst's client closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            await until(lambda: turn.waiting == 0, "the abandoned verification to stop")
        finally:
            turn.release()

        async def alerted() -> list[dict[str, Any]]:
            status, page = await api.get("/v1/alerts?kind=ledger_tamper")
            assert status == 200, page
            # The state check may find what a reordering did to the uses' rows: not the chain.
            return [a for a in page["items"] if a["details"]["problem"] != "state_mismatch"]

        [alert] = await until(alerted, "the leader's ledger_tamper for the edited chain", timeout=30)
        report = await verify(api)
        assert report["ok"] is False, report
        assert alert["severity"] == "critical"
        assert (alert["details"]["first_bad_seq"], alert["details"]["problem"]) == (
            report["first_bad_seq"], report["problem"]), (alert, report)
    finally:
        await api.client.close()


async def test_checkpoints_are_signed_and_verify_offline(fresh_database: Callable[[], Any],
                                                         api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A checkpoint from the API verifies with the CLI and the exported key; an altered one does not."""
    api, _ = await ledger_of(api_factory, fresh_database, 5, checkpoint_every=2)
    checkpoint = await wait_for_checkpoint(api)
    key_file, cp_file = tmp_path / "key.pem", tmp_path / "cp.json"
    cli_key = run_cli("ledger", "public-key", "--data-dir", str(tmp_path / "data"),  # the service's settings
                      env=cli_env(REPLAYGUARD_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"))
    assert cli_key.returncode == 0, cli_key.stderr
    assert cli_key.stdout == (await api.get("/v1/ledger/public-key"))[1]["public_key_pem"]
    key_file.write_text(cli_key.stdout)
    cp_file.write_bytes(orjson.dumps(checkpoint))
    good = run_cli("ledger", "verify-checkpoint", "--public-key", str(key_file), "--checkpoint", str(cp_file),
                   env=cli_env(REPLAYGUARD_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"))
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("valid") and checkpoint["hash"] in good.stdout
    cp_file.write_bytes(orjson.dumps({**checkpoint, "seq": checkpoint["seq"] + 1}))
    bad = run_cli("ledger", "verify-checkpoint", "--public-key", str(key_file), "--checkpoint", str(cp_file))
    assert bad.returncode == 1 and bad.stdout.startswith("INVALID")
    cp_file.write_text("{not json")
    assert run_cli("ledger", "verify-checkpoint", "--public-key", str(key_file),
                   "--checkpoint", str(cp_file)).returncode == 2


async def test_cli_checkpoints_lists_the_apis_checkpoints_newest_first(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """``replayguard ledger checkpoints --limit N`` prints the N newest checkpoints as JSON lines,
    the same the API lists, and the newest verifies offline with the exported key."""
    api, dsn = await ledger_of(api_factory, fresh_database, 9, checkpoint_every=2)
    await wait_for_checkpoint(api, 8)
    common = ("--database-url", dsn, "--data-dir", str(tmp_path / "data"))
    listed = run_cli("ledger", "checkpoints", "--limit", "5", *common)
    assert listed.returncode == 0, listed.stderr
    lines = [orjson.loads(line) for line in listed.stdout.splitlines()]
    status, page = await api.get("/v1/ledger/checkpoints?limit=5")
    assert status == 200, page
    assert lines == page["items"] and lines[0]["seq"] >= 8
    assert [cp["seq"] for cp in lines] == sorted((cp["seq"] for cp in lines), reverse=True)
    newest = run_cli("ledger", "checkpoints", "--limit", "1", *common)
    assert [orjson.loads(line) for line in newest.stdout.splitlines()] == lines[:1]
    key_file, cp_file = tmp_path / "key.pem", tmp_path / "cp.json"
    key_file.write_text(run_cli("ledger", "public-key", *common).stdout)
    cp_file.write_bytes(orjson.dumps(lines[0]))
    offline = run_cli("ledger", "verify-checkpoint", "--public-key", str(key_file), "--checkpoint", str(cp_file))
    assert offline.returncode == 0 and offline.stdout.startswith("valid"), offline.stdout + offline.stderr


@pytest.mark.parametrize("limit", ["99999999999999999999999", "1000001", "0", "-5", "ten"])
def test_cli_checkpoints_refuses_a_limit_out_of_range(limit: str, tmp_path: Path) -> None:
    """``ledger checkpoints --limit`` outside 1 to 1000000 (or not a number) is a usage error: exit 2, one line."""
    result = run_cli("ledger", "checkpoints", "--limit", limit, "--database-url",
                     "postgresql://postgres@127.0.0.1:1/never_used", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and "--limit" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_cli_verify_prints_progress_and_the_report(fresh_database: Callable[[], Any],
                                                         api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """``replayguard ledger verify`` shows a progress bar on stderr and exits 1 on tampering."""
    _, dsn = await ledger_of(api_factory, fresh_database, 25)
    args = ("ledger", "verify", "--database-url", dsn, "--data-dir", str(tmp_path / "data"))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "verifying" in result.stderr and "25/25" in result.stderr
    report = orjson.loads(result.stdout)
    assert report["ok"] is True and report["checked"] == 25
    await tamper(dsn, f"UPDATE ledger SET vm_id = '{uid('x')}' WHERE seq = 7")
    result = run_cli(*args)
    assert result.returncode == 1 and orjson.loads(result.stdout)["first_bad_seq"] == 7


async def test_the_state_check_alerts_each_finding_once_tick_after_tick(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Two accepted nonces whose `spent_nonces` rows were deleted, in different slices of the leader's
    state sweep: each is alerted once, and the ticks after it, finding the two again in turn,
    do not join them again (which would count them up and reopen them once acknowledged,
    every tick)."""
    api, dsn = await ledger_of(api_factory, fresh_database, 10)
    feed = api.client.app[ANALYSTS].feed
    feed.duties._state = StateSchedule(sweep_size=5)
    await tamper(dsn, "DELETE FROM spent_nonces WHERE first_seq IN (2, 7)")
    ticks = feed.duties.state_ticks
    await until(lambda: feed.duties.state_ticks >= ticks + 6, "six ticks of the state check", timeout=30)
    status, page = await api.get("/v1/alerts?kind=ledger_tamper")
    assert status == 200, page
    found = sorted((a["details"]["first_bad_seq"], a["count"]) for a in page["items"])
    assert found == [(2, 1), (7, 1)], page["items"]


async def test_a_verification_whose_client_left_is_logged_and_counted_as_499(
        api_factory: Callable[..., Any], fresh_database: Callable[[], Any]) -> None:
    """A verification stopped because its client closed the connection (the service as
    ``serve`` runs it) writes its access line and counts in the request metrics, with status
    499 (nginx's "client closed request"); a finished one counts as 200."""
    from structlog.testing import capture_logs

    api, _ = await ledger_of(api_factory, fresh_database, 3)
    counts = api.runtime.metrics.counts.requests
    await verify(api)
    assert counts.get(("/v1/ledger/verify", "GET", 200)) == 1
    chain = api.client.app[ANALYSTS].ledger._chain
    assert chain is not None
    chain._apart = turn = CountedLock()
    await turn.acquire()  # the verification is held at its chain check...
    try:
        with capture_logs() as logs:
            asking = asyncio.create_task(api.get("/v1/ledger/verify"))
            await until(lambda: turn.waiting == 1, "the verification to reach its chain check")
            asking.cancel()  # ...when the analyst's client closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            await until(lambda: counts.get(("/v1/ledger/verify", "GET", 499)) == 1, "the left verification counted")
    finally:
        turn.release()
    assert [(e["method"], e["status"]) for e in logs if e["event"] == "request"] == [("GET", 499)], logs
    assert counts.get(("/v1/ledger/verify", "GET", 200)) == 1
