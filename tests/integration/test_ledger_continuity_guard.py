"""The continuity guard over real PostgreSQL (CONTRACT §10, SECURITY.md "The host's memory
going back in time"): a database that went back in time with nothing but entries that
are not decisions to show it, a recovery row deleted, a first check that could not
complete, a clock stepped back; and the false alarms these checks must not raise."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pyotp

from replayguard.http.state import ANALYSTS
from replayguard.services.ledger import LedgerService, NotVouched
from replayguard.services.retention import purge_expired
from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, cli_env, run_cli, uid
from tests.integration.db_restore import restore, scratch_dbs, settled
from tests.integration.test_ledger_continuity import _held_at_least, backups, cut_tail
from tests.integration.test_ledger_verify import ledger_of
from tests.integration.test_restore_in_place import QUIET, after_next_check, copied_before_a_nonce, nonce, ready
from tests.waiting import until

__all__ = ["backups", "scratch_dbs"]  # fixtures


async def hypervisor_event(api: Api, vm_id: str = "vm-2") -> tuple[int, Any]:
    body = {"event_id": uid("evt"), "type": "vm.started", "vm_id": vm_id, "occurred_at": api.clock.now}
    return await api.post("/v1/hypervisor/events", body, role="hypervisor")


async def _refused(api: Api) -> bool:
    status, body = await settled(lambda: nonce(api, secrets.token_hex(8)))
    return status == 503 and body.get("error", {}).get("code") == "ledger_rollback"


def _accept_rollback(dsn: str, data_dir: Path, reason: str, witness: Path | None = None) -> dict[str, Any]:
    extra = {} if witness is None else {"REPLAYGUARD_WITNESSES": f"file:{witness}"}
    env = cli_env(REPLAYGUARD_DATABASE_URL=dsn, REPLAYGUARD_DATA_DIR=str(data_dir), **extra)
    done = run_cli("ledger", "accept-rollback", "--reason", reason, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(orjson.loads(done.stdout))


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def _witnessed(path: Path) -> dict[str, Any]:
    return dict(orjson.loads(path.read_bytes())["checkpoint"])


async def _backup_behind_the_witness(backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
                                     api_factory: Callable[..., Any], settings: dict[str, Any],
                                     witness: Path) -> tuple[str, int, list[str]]:
    """A backup taken after one accept, then 10 nonces accepted (``lost``) until the file
    witness holds a checkpoint past the backup's head; returns (backup, its head, lost)."""
    dsn = await fresh_database()
    first = await api_factory(database_url=Secret(dsn), **settings)
    assert (await nonce(first, secrets.token_hex(8)))[0] == 200
    await first.client.close()
    backup = await backups(dsn)
    second = await api_factory(database_url=Secret(dsn), **settings)
    lost = [secrets.token_hex(8) for _ in range(10)]
    for value in lost:
        assert (await nonce(second, value))[1]["decision"] == "accept"
    head = int((await _fetch(backup, "SELECT seq FROM ledger_head"))[0]["seq"])
    await until(lambda: _held_at_least(witness, head + 1), "the witness to hold a checkpoint past the backup",
                timeout=60)
    await second.client.close()
    return backup, head, lost


async def _leader_ran(api: Api, times: int = 2) -> None:
    """Returns once this instance leads the alert feed and ran its duties ``times`` more
    times (checkpoints, state check, purge)."""
    feed = api.client.app[ANALYSTS].feed
    await until(lambda: feed.leader, "this instance to lead the alert feed", timeout=30)
    before = feed.duties.state_ticks
    await until(lambda: feed.duties.state_ticks >= before + times, "the leader's next duties", timeout=60)


# --- rollbacks that entries other than decisions would hide ------------------------------


async def test_a_restored_database_stays_refused_while_other_entries_go_on_past_the_witness(
        backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
        api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A rollback found through a witness stays until ``accept-rollback``. The database is
    restored from a backup; the file witness holds checkpoint S past its head, so decisions
    stop (503 ``ledger_rollback``). Entries that are not decisions are still ledgered
    (hypervisor events here), well past S, with a checkpoint due every 5 entries: the
    alert-feed leader signs none over the restored chain and pushes none (the witness would
    take a higher seq, and the rollback would clear by itself), so the witness keeps S and
    decisions stay refused at every later check. The finding is written to
    ``continuity_findings``: a service started again on the database without any witness
    refuses too."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    backup, head, lost = await _backup_behind_the_witness(backups, fresh_database, api_factory, settings, witness)
    held = _witnessed(witness)

    restored = await api_factory(database_url=Secret(backup), **settings)
    status, body = await nonce(restored, lost[0])
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    for _ in range(held["seq"] - head + 6):  # the relays go on reporting (vm.started, snapshots ...)
        assert (await hypervisor_event(restored))[0] == 202
    await _leader_ran(restored)
    await after_next_check(restored)

    assert _witnessed(witness) == held
    signed = await _fetch(backup, "SELECT seq FROM checkpoints WHERE seq > $1", head)
    assert signed == [], f"checkpoints signed over the restored chain: {[r['seq'] for r in signed]}"
    status, body = await nonce(restored, lost[0])
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body
    findings = await _fetch(backup, "SELECT seq, hash, process FROM continuity_findings")
    assert any(r["seq"] == held["seq"] and bytes(r["hash"]).hex() == held["hash"] for r in findings), findings
    await restored.client.close()

    again = await api_factory(database_url=Secret(backup), checkpoint_every=5)  # no witness at all
    status, body = await nonce(again, lost[0])
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body


async def test_no_checkpoint_is_signed_over_a_chain_that_lost_a_witnessed_one_before_the_guard_saw_it(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """The checkpointer asks the guard before it signs, whatever the guard's last verdict:
    the ledger is cut back to entry 12 (with the database's checkpoints past it) under a
    running service whose witness holds a checkpoint at 15 or later, and hypervisor events
    carry the new chain past it before the guard's next check. A checkpoint due then is not
    signed (``NotVouched``: the ledger no longer holds the witness's checkpoint, nor the
    head the guard last read), none reaches the database or the witness, and the next check
    stops decisions."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    api, dsn = await ledger_of(api_factory, fresh_database, 20, checkpoint_every=5,
                               witnesses=(f"file:{witness}",))
    await until(lambda: _held_at_least(witness, 15), "the witness to hold a checkpoint at 15", timeout=60)
    await after_next_check(api)
    held = _witnessed(witness)
    guard = api.runtime.continuity
    async with guard._lock:  # no check runs until the end of the block
        await cut_tail(dsn, 12, checkpoints_too=True)
        for _ in range(held["seq"] - 12 + 3):
            status, body = await settled(lambda: hypervisor_event(api))
            assert status == 202, body
        ledger = LedgerService(api.runtime.pool, api.runtime.keys)
        result = await ledger.checkpoint_if_due(api.runtime.now_us(), 1, 10**12, guard.vouches)
        assert isinstance(result, NotVouched), result
        assert await _fetch(dsn, "SELECT seq FROM checkpoints WHERE seq > 12") == []
    await after_next_check(api)
    assert _witnessed(witness) == held
    status, body = await nonce(api, secrets.token_hex(8))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body
    assert await _fetch(dsn, "SELECT seq FROM checkpoints WHERE seq > 12") == []


async def test_a_restore_followed_by_a_hypervisor_event_is_noticed_and_the_lost_nonce_refused(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """One instance, no checkpoint past the copy (inside the checkpoint period, SECURITY.md's
    residual 1). Nonce N is accepted at seq F; a check runs; the database goes back to a
    copy from just before N (a restore, or a lagging standby promoted behind the same URL);
    a hypervisor event (a relay flushing its spool after the outage) is ledgered at seq F
    before the next check, so the head is no longer below anything the process knew. The
    guard keeps the (seq, hash) of the head each check read and of the newest entry the
    process committed, and compares them with the ledger at every check: the entry at F has
    another hash, decisions stop (503 ``ledger_rollback``), and N is not accepted again."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **QUIET)
    copy, lost = await copied_before_a_nonce(api, dsn, scratch_dbs)
    await after_next_check(api)  # the check saw entry F committed, hash for hash

    # The event reaches the service before its next periodic check (at most CHECK_S = 2 s
    # later): the check is held for the moment the restore and the event take.
    async with api.runtime.continuity._lock:
        await restore(dsn, copy, scratch_dbs)
        status, body = await settled(lambda: hypervisor_event(api))
        assert status == 202, body
    await after_next_check(api)
    await after_next_check(api)

    status, body = await settled(lambda: nonce(api, lost))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", (
        f"nonce {lost}, accepted before the restore, was answered {status} {body} after it")


async def test_deleting_the_recovery_row_changes_nothing_the_recovery_entry_holds(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
        tmp_path: Path) -> None:
    """After a recorded recovery, the nonces the lost range consumed are refused by the time
    rule (``nonce_before_recovery``), whose recovery time the guard reads from the
    ``ledger_recovery`` entries, under the hash chain, checkpoints and witnesses. Someone
    with database rights deletes the plain ``ledger_recoveries`` row: nothing changes, and
    a nonce consumed in the lost range is still refused as ``reused``."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **QUIET)
    copy, lost = await copied_before_a_nonce(api, dsn, scratch_dbs)
    await restore(dsn, copy, scratch_dbs)
    await until(lambda: _refused(api), "the restore to be refused", timeout=30)
    await after_next_check(api)  # the finding is in the database
    done = _accept_rollback(dsn, tmp_path / "data", "restored a copy")
    assert done["serving"] is True, done
    await until(lambda: ready(api), "decisions served after the recovery", timeout=30)
    status, body = await settled(lambda: nonce(api, lost))
    assert (status, body["decision"], body["reason"]) == (200, "reject", "reused"), body

    deleted = await _fetch(dsn, "DELETE FROM ledger_recoveries RETURNING seq")
    assert [r["seq"] for r in deleted] == [done["recovery_seq"]]
    await after_next_check(api)
    await after_next_check(api)

    status, body = await settled(lambda: nonce(api, lost))
    assert (status, body.get("decision"), body.get("reason")) == (200, "reject", "reused"), (
        f"nonce {lost}, consumed in the range the restore lost, was answered {status} {body}")
    assert api.runtime.continuity.recovered_at_us is not None


async def test_no_decision_is_served_before_the_first_continuity_check_completes(
        backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
        api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """CONTRACT §10: at start the service serves no decision until it compared its ledger
    with the witnesses. The service is started on a database restored from a copy taken
    before nonce N, with the file witness holding a checkpoint past the copy's head; the
    start-up check's read of ``checkpoints`` hits the statement timeout (a maintenance job
    holds the table's lock, as VACUUM FULL or an ALTER would). N is answered 503
    ``unavailable``, not accepted; once the lock is gone the next check finds the rollback
    and N is answered 503 ``ledger_rollback``."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    backup, _, lost = await _backup_behind_the_witness(backups, fresh_database, api_factory, settings, witness)

    maintenance = await asyncpg.connect(backup)
    try:
        lock = maintenance.transaction()
        await lock.start()
        await maintenance.execute("LOCK TABLE checkpoints IN ACCESS EXCLUSIVE MODE")
        restored = await api_factory(database_url=Secret(backup), statement_timeout_ms=1000, **settings)
        status, body = await nonce(restored, lost[0])
        ready_status = (await restored.client.get("/readyz")).status
        await lock.rollback()
    finally:
        await maintenance.close()
    assert status == 503 and body.get("error", {}).get("code") == "unavailable", (
        f"nonce {lost[0]}, consumed in the range the restored copy lost, was answered {status} {body}")
    assert ready_status == 503
    await until(lambda: restored.runtime.continuity.checked, "a continuity check to complete", timeout=30)
    status, body = await nonce(restored, lost[0])
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body


async def test_a_clock_stepped_back_makes_a_checkpoint_due_at_once(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """SECURITY.md bounds what a witness has not seen to the last checkpoint period (default
    up to 1000 entries or 60 s). Once the host clock is stepped back behind the newest
    checkpoint (an NTP correction of a clock that ran an hour ahead), its stamp measures
    nothing any more: a checkpoint is due at once (and the period is also measured on the
    process's monotonic clock), so the witness holds an accept made after the step."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    clock = FakeClock()
    dsn = await fresh_database()
    api = await api_factory(clock=clock, database_url=Secret(dsn), checkpoint_every=1000,
                            checkpoint_interval_s=60, witnesses=(f"file:{witness}",))
    assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: _held_at_least(witness, 1), "the first checkpoint at the witness", timeout=60)
    clock.advance(-3600)  # the host clock is corrected: it ran an hour ahead
    status, body = await nonce(api, secrets.token_hex(8))
    assert (status, body["decision"]) == (200, "accept"), body
    clock.advance(120)  # two minutes of the service's time pass after that accept
    await until(lambda: _held_at_least(witness, body["seq"]),
                "a checkpoint covering the accept made two minutes (service time) ago", timeout=30)


# --- no false alarms ---------------------------------------------------------------------


async def test_a_healthy_ledger_with_concurrent_appends_and_purges_is_never_flagged(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A healthy ledger is never taken for one that went back: decisions, hypervisor events
    and retention purges of the HOTP codes' uses (the leader's, and one run beside them) go
    on concurrently, with a checkpoint every 5 entries pushed to a file witness, across many
    continuity checks. Every decision is accepted, /readyz stays 200 with ``continuity``
    ok, no finding is written, and the witness follows the ledger."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    clock = FakeClock(time.time())
    dsn = await fresh_database()
    api = await api_factory(clock=clock, database_url=Secret(dsn), checkpoint_every=5,
                            witnesses=(f"file:{witness}",), nonce_max_ttl_s=60)
    principals = [uid(f"hotp-{n}") for n in range(3)]
    hotp = [pyotp.HOTP((await api.enroll(p, type="hotp"))["secret"]) for p in principals]
    for round_ in range(4):
        calls: list[Awaitable[tuple[int, Any]]] = [
            nonce(api, secrets.token_hex(8), issued_at=clock.now, ttl_s=1) for _ in range(12)]
        calls += [api.post("/v1/otp/verify", {"vm_id": f"vm-{n}", "principal": p, "otp": h.at(round_)})
                  for n, (p, h) in enumerate(zip(principals, hotp, strict=True))]
        calls += [hypervisor_event(api, f"vm-{n}") for n in range(6)]
        answers, _ = await asyncio.gather(asyncio.gather(*calls),
                                          purge_expired(api.runtime.pool, api.runtime.now_us()))
        assert all(status in (200, 202) for status, _ in answers), answers
        assert all(body["decision"] == "accept" for status, body in answers if status == 200), answers
        clock.advance(62)  # the codes' uses expire (nonce_max_ttl_s): they are purged
        await after_next_check(api)
        resp = await api.client.get("/readyz")
        body = await resp.json()
        assert resp.status == 200 and body["checks"]["continuity"] == "ok", body
    await _leader_ran(api)
    await purge_expired(api.runtime.pool, api.runtime.now_us())
    assert await _fetch(dsn, "SELECT 1 FROM uses WHERE expires_us < $1", api.runtime.now_us()) == []
    assert (await _fetch(dsn, "SELECT count(*) AS n FROM spent_nonces"))[0]["n"] == 48
    accepted_codes = "SELECT count(*) AS n FROM ledger WHERE kind = 'otp' AND decision = 'accept'"
    assert (await _fetch(dsn, accepted_codes))[0]["n"] == 12
    head = api.runtime.continuity.head_seq
    await until(lambda: _held_at_least(witness, head - 5), "the witness to follow the ledger", timeout=60)
    await after_next_check(api)
    assert api.runtime.continuity.status() == "ok" and api.runtime.continuity.rollback is None
    assert await _fetch(dsn, "SELECT * FROM continuity_findings") == []
    assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"


async def test_a_service_on_an_empty_ledger_and_one_restarted_on_a_healthy_ledger_serve(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A service started on an empty ledger (head 0, no entry to compare) stays ready across
    its checks before its first decision; restarted on the same, healthy ledger with the same
    file witness, it serves its first decision, stays ready, and signs checkpoints past the
    one the witness held (no finding written)."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    dsn = await fresh_database()
    first = await api_factory(database_url=Secret(dsn), **settings)
    await after_next_check(first)
    await after_next_check(first)
    assert await ready(first) and first.runtime.continuity.status() == "ok"
    # Ten entries: the leader may sign a checkpoint (due on time: the clock stands still) at
    # any of them, and the first 5 or more entries after it make the next one due, so one at
    # 5 or later is signed whenever that checkpoint came (with six, one after the second
    # entry left four, never due).
    for _ in range(10):
        assert (await nonce(first, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: _held_at_least(witness, 5), "a checkpoint at the witness", timeout=60)
    await after_next_check(first)
    await first.client.close()
    held = _witnessed(witness)["seq"]

    second = await api_factory(database_url=Secret(dsn), **settings)
    # its first check may end after start-up on a busy machine (decisions wait for it)
    await until(lambda: ready(second), "the restarted service's first check", timeout=30)
    status, body = await nonce(second, secrets.token_hex(8))
    assert (status, body["decision"]) == (200, "accept"), body
    for _ in range(6):
        assert (await hypervisor_event(second))[0] == 202
        assert (await nonce(second, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: _held_at_least(witness, held + 5), "a checkpoint past the restart at the witness",
                timeout=60)
    await after_next_check(second)
    await after_next_check(second)
    assert await ready(second) and second.runtime.continuity.status() == "ok"
    assert await _fetch(dsn, "SELECT * FROM continuity_findings") == []


async def test_after_a_recorded_recovery_decisions_and_checkpoints_go_on(
        backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
        api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """What the guard remembers of the chain before a recovery (the head it read, the entries
    it committed, the witness's checkpoint, its finding) is answered by the recovery: the
    restored service, refused until ``accept-rollback``, then serves across its later
    checks, and its leader signs checkpoints past the recovery's again, which the witness
    takes."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    backup, _, lost = await _backup_behind_the_witness(backups, fresh_database, api_factory, settings, witness)
    clock = FakeClock(time.time())  # the recovery is stamped by the real clock of the CLI
    restored = await api_factory(clock=clock, database_url=Secret(backup), **settings)
    assert await _refused(restored)
    for _ in range(3):
        assert (await hypervisor_event(restored))[0] == 202
    await after_next_check(restored)

    done = _accept_rollback(backup, tmp_path / "data", "restored a backup", witness)
    assert done["serving"] is True, done
    await until(lambda: ready(restored), "decisions served after the recovery", timeout=30)
    status, body = await nonce(restored, lost[0])
    assert (status, body["decision"], body["reason"]) == (200, "reject", "reused"), body
    clock.advance(120)  # nonces issued after the recovery (and its 60 s of issuer slack) pass
    for _ in range(6):
        assert (await hypervisor_event(restored))[0] == 202
        status, body = await nonce(restored, secrets.token_hex(8), issued_at=clock.now, ttl_s=600)
        assert (status, body["decision"]) == (200, "accept"), body
    await until(lambda: _held_at_least(witness, done["recovery_seq"] + 5),
                "a checkpoint past the recovery's at the witness", timeout=60)
    await after_next_check(restored)
    await after_next_check(restored)
    assert await ready(restored) and restored.runtime.continuity.status() == "ok"
    assert await _fetch(backup, "SELECT * FROM continuity_findings") == []


async def test_a_check_that_meets_an_unexpected_state_stops_decisions_and_the_checks_go_on(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Someone with database rights deletes the ``ledger_head`` row (triggers off): the
    periodic check cannot complete. Decisions stop (503 ``unavailable``, not served on the
    last verdict) and the checks go on, so once the row is back decisions resume. Before,
    the error ended the check loop: decisions went on with no check behind them."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn))
    assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            head = await conn.fetchrow("DELETE FROM ledger_head RETURNING seq, hash")
        await until(lambda: not api.runtime.continuity.checked, "a check to meet the missing head", timeout=30)
        status, body = await nonce(api, secrets.token_hex(8))
        assert status == 503 and body["error"]["code"] == "unavailable", body
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("INSERT INTO ledger_head VALUES (true, $1, $2)", head["seq"], head["hash"])
    finally:
        await conn.close()
    await until(lambda: api.runtime.continuity.checked, "the next check to complete", timeout=30)
    assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
