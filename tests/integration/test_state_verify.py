"""State agrees with the ledger, over real PostgreSQL (issue 20, reproduction 1).

A superuser resets a HOTP counter, a TOTP high-water mark or a lock, or deletes `uses`
rows: the hash chain is intact, but ``ledger verify`` (API and CLI) answers ok:false naming
the first entry whose implied state is gone (seq, table, key digest), and the running
service's alert-feed leader raises a critical ``ledger_tamper`` on its own. A legitimate
retention purge raises nothing.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pyotp

from replayguard.http.state import ANALYSTS
from replayguard.services.retention import purge_expired
from replayguard.services.state_check import _CHECK, check_state
from replayguard.settings import Secret
from tests.conftest import Api, run_cli, uid
from tests.ledger_rows import append_nonces
from tests.waiting import until


async def fresh_api(api_factory: Callable[..., Any], fresh_database: Callable[[], Any],
                    **settings: Any) -> tuple[Api, str]:
    """An app over a database of its own (its ledger is the test's alone)."""
    dsn = await fresh_database()
    return await api_factory(database_url=Secret(dsn), **settings), dsn


async def superuser(dsn: str, *statements: str) -> None:
    """What a local user who became the database's superuser does: edit state tables directly."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def otp(api: Api, principal: str, code: str) -> dict[str, Any]:
    status, body = await api.post("/v1/otp/verify", {"vm_id": "vm-state", "principal": principal, "otp": code})
    assert status == 200, body
    return dict(body)


async def nonce(api: Api, value: str, ttl_s: int = 60) -> dict[str, Any]:
    status, body = await api.post("/v1/nonces/consume", {"vm_id": "vm-state", "scope": "s", "nonce": value,
                                                         "ttl_s": ttl_s})
    assert status == 200, body
    return dict(body)


async def verify(api: Api) -> dict[str, Any]:
    status, report = await api.get("/v1/ledger/verify")
    assert status == 200, report
    return dict(report)


async def tamper_alerts(api: Api) -> list[dict[str, Any]]:
    status, page = await api.get("/v1/alerts?kind=ledger_tamper")
    assert status == 200, page
    return list(page["items"])


async def test_a_clean_ledger_after_many_decisions_verifies(fresh_database: Callable[[], Any],
                                                            api_factory: Callable[..., Any]) -> None:
    """Nonces, HOTP and TOTP accepts and rejects, a lockout and its ledgered unlock: state and
    ledger agree. The lock's entry is an OTP entry: the state check looks for locks among
    those alone."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    for _ in range(60):
        assert (await nonce(api, secrets.token_hex(8)))["decision"] == "accept"
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    hotp_secret, totp_secret = pyotp.random_base32(), pyotp.random_base32()
    await api.enroll(alice, type="hotp", secret=hotp_secret)
    await api.enroll(bob, secret=totp_secret)
    await api.enroll(carol, type="hotp", secret=pyotp.random_base32())
    for counter in range(10):
        assert (await otp(api, alice, pyotp.HOTP(hotp_secret).at(counter)))["decision"] == "accept"
    assert (await otp(api, alice, pyotp.HOTP(hotp_secret).at(3)))["reason"] == "reused"
    assert (await otp(api, bob, pyotp.TOTP(totp_secret).at(api.clock.now)))["decision"] == "accept"
    for _ in range(5):
        await otp(api, carol, "000000")
    assert (await otp(api, carol, "000000"))["reason"] == "locked_out"
    status, _ = await api.post(f"/v1/principals/{carol}/unlock", {}, role="admin")
    assert status == 200
    report = await verify(api)
    assert report["ok"] is True, report
    assert report["state"] == {"ok": True, "checked": report["head"]["seq"]}, report
    assert not await tamper_alerts(api)
    conn = await asyncpg.connect(dsn)
    try:
        locks = await conn.fetch("SELECT kind, subject FROM ledger WHERE payload ? 'locked_until_us'")
    finally:
        await conn.close()
    assert [(r["kind"], r["subject"]) for r in locks] == [("otp", carol)]


async def test_a_reset_hotp_counter_and_deleted_uses_are_named_and_alerted(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Reproduction 1: counter reset and uses deleted by a superuser; verify names the first accept,
    the leader raises ledger_tamper."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    alice, secret = uid("alice"), pyotp.random_base32()
    await api.enroll(alice, type="hotp", secret=secret)
    first = await otp(api, alice, pyotp.HOTP(secret).at(0))
    assert first["decision"] == "accept"
    second = await otp(api, alice, pyotp.HOTP(secret).at(1))
    assert second["decision"] == "accept"
    assert (await otp(api, alice, pyotp.HOTP(secret).at(0)))["reason"] == "reused"
    assert (await verify(api))["ok"] is True
    await superuser(dsn, "UPDATE otp_credentials SET last_counter = -1", "UPDATE otp_tokens SET last_counter = -1",
                    "DELETE FROM uses WHERE kind = 'otp'")
    api.runtime.tokens._cache.clear()  # the attacker's edit, as a restarted instance would read it

    async def alerted() -> list[dict[str, Any]]:
        return [a for a in await tamper_alerts(api) if a["details"].get("problem") == "state_mismatch"]

    # Nobody asks for a verify: the running service's leader finds it by itself.
    alerts = await until(alerted, "the leader's ledger_tamper for the state tables", timeout=30)
    # The leader names the first disagreement of the slice it was sweeping: either accept.
    assert alerts[0]["severity"] == "critical"
    assert alerts[0]["details"]["first_bad_seq"] in (first["seq"], second["seq"])

    report = await verify(api)
    assert report["ok"] is False and report["problem"] == "state_mismatch", report
    assert report["first_bad_seq"] == first["seq"]
    bad = report["state"]["first_disagreement"]
    assert bad["seq"] == first["seq"] and bad["table"] in ("otp_credentials", "uses")
    assert len(bytes.fromhex(bad["key_digest"])) == 32  # a keyed digest, not a code or a secret
    assert pyotp.HOTP(secret).at(0) not in orjson.dumps(report).decode()
    assert len(bytes.fromhex(alerts[0]["details"]["key_digest"])) == 32

    cli = run_cli("ledger", "verify", "--no-progress", "--database-url", dsn, "--data-dir", str(tmp_path / "data"))
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert orjson.loads(cli.stdout)["state"]["first_disagreement"]["seq"] == first["seq"]

    # The attack the check exists for: the used code is accepted again.
    assert (await otp(api, alice, pyotp.HOTP(secret).at(0)))["decision"] == "accept"


async def test_a_deleted_otp_use_alone_is_named(fresh_database: Callable[[], Any],
                                               api_factory: Callable[..., Any]) -> None:
    """Only the accepted code's ``uses`` row deleted, its counter left alone: verify names that
    accept and the ``uses`` table (the check rests on the ``use_expires_us`` the entry carries)."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    bob, secret = uid("bob"), pyotp.random_base32()
    await api.enroll(bob, type="hotp", secret=secret)
    first = await otp(api, bob, pyotp.HOTP(secret).at(0))
    assert first["decision"] == "accept"
    assert (await verify(api))["ok"] is True
    await superuser(dsn, f"DELETE FROM uses WHERE first_seq = {first['seq']}")
    report = await verify(api)
    assert report["ok"] is False and report["problem"] == "state_mismatch", report
    bad = report["state"]["first_disagreement"]
    assert (bad["seq"], bad["table"]) == (first["seq"], "uses"), bad


async def test_a_reset_totp_high_water_is_named(fresh_database: Callable[[], Any],
                                                api_factory: Callable[..., Any]) -> None:
    """The clock guard's TOTP high-water lowered by a superuser: verify names clock_guard at the accept."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    bob, secret = uid("bob"), pyotp.random_base32()
    await api.enroll(bob, secret=secret)
    accepted = await otp(api, bob, pyotp.TOTP(secret).at(api.clock.now))
    assert accepted["decision"] == "accept"
    await superuser(dsn, "UPDATE clock_guard SET high_us = 0")
    report = await verify(api)
    assert report["ok"] is False, report
    assert report["state"]["first_disagreement"]["seq"] == accepted["seq"]
    assert report["state"]["first_disagreement"]["table"] == "clock_guard"


async def test_a_deleted_spent_nonce_and_a_lifted_lock_are_named(fresh_database: Callable[[], Any],
                                                               api_factory: Callable[..., Any]) -> None:
    """A nonce's spent_nonces row deleted, then a lock lifted without the ledgered unlock: each is
    named."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    value = secrets.token_hex(8)
    used = await nonce(api, value)
    await nonce(api, secrets.token_hex(8))
    await superuser(dsn, f"DELETE FROM spent_nonces WHERE first_seq = {used['seq']}")
    bad = (await verify(api))["state"]["first_disagreement"]
    assert (bad["seq"], bad["table"]) == (used["seq"], "spent_nonces")
    assert value not in bad["key_digest"]
    await superuser(dsn, f"INSERT INTO spent_nonces SELECT cred_digest, seq + 1 FROM ledger WHERE seq = {used['seq']}")
    bad = (await verify(api))["state"]["first_disagreement"]  # spent, but for another entry
    assert (bad["seq"], bad["table"]) == (used["seq"], "spent_nonces")
    await superuser(dsn, f"UPDATE spent_nonces SET first_seq = {used['seq']}"
                         f" WHERE digest = (SELECT cred_digest FROM ledger WHERE seq = {used['seq']})")
    assert (await verify(api))["ok"] is True

    carol = uid("carol")
    await api.enroll(carol, type="hotp", secret=pyotp.random_base32())
    for _ in range(5):
        last = await otp(api, carol, "000000")
    await superuser(dsn, "UPDATE principals SET locked_until_us = 0, fail_count = 0")
    bad = (await verify(api))["state"]["first_disagreement"]
    assert (bad["seq"], bad["table"]) == (last["seq"], "principals")
    assert carol not in bad["key_digest"]


async def test_a_legitimate_purge_of_expired_uses_raises_nothing(fresh_database: Callable[[], Any],
                                                                 api_factory: Callable[..., Any]) -> None:
    """Uses purged by retention on an instance whose clock is an hour ahead: verify stays ok and the
    leader raises no ledger_tamper."""
    api, dsn = await fresh_api(api_factory, fresh_database, nonce_max_ttl_s=60)
    for _ in range(20):
        assert (await nonce(api, secrets.token_hex(8), ttl_s=30))["decision"] == "accept"
    alice, secret = uid("alice"), pyotp.random_base32()
    await api.enroll(alice, type="hotp", secret=secret)
    for counter in range(5):
        assert (await otp(api, alice, pyotp.HOTP(secret).at(counter)))["decision"] == "accept"
    # Purged by another instance whose clock is an hour ahead of this one's.
    await purge_expired(api.runtime.pool, api.runtime.now_us() + 3600 * 1_000_000)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM uses") == 0
        assert await conn.fetchval("SELECT count(*) FROM spent_nonces") == 20
    finally:
        await conn.close()
    report = await verify(api)
    assert report["ok"] is True and report["state"]["ok"] is True, report
    # The leader sweeps the whole (short) ledger each tick: two more ticks have looked at it after the purge.
    feed = api.client.app[ANALYSTS].feed
    ticks = feed.duties.state_ticks

    async def swept_twice() -> bool:
        return feed.duties.state_ticks >= ticks + 2

    await until(swept_twice, "two more state-check ticks of the leader", timeout=30)
    assert not await tamper_alerts(api)


def _statement(migration: str, start: str) -> str:
    """The statement of ``migrations/<migration>`` that begins with ``start``."""
    sql = (Path(__file__).parents[2] / "migrations" / migration).read_text()
    rest = sql[sql.index(start):]
    return rest[:rest.index(";") + 1]


async def test_migrations_016_and_020_remember_nonces_purged_before_spent_nonces_existed(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """A nonce forgotten as the pre-010 purge left it (no row anywhere) is put back by 016 and
    named by 020 after its accepting entry: verify agrees and the nonce stays refused."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    value = secrets.token_hex(8)
    used = await nonce(api, value)
    await superuser(dsn, f"DELETE FROM spent_nonces WHERE first_seq = {used['seq']}")
    assert (await verify(api))["state"]["first_disagreement"]["seq"] == used["seq"]
    await superuser(dsn, _statement("016_state_check.sql", "INSERT INTO spent_nonces"))
    assert (await verify(api))["state"]["first_disagreement"]["seq"] == used["seq"]  # no entry named yet
    await superuser(dsn, _statement("020_spent_nonce_entry.sql", "UPDATE spent_nonces"))
    assert (await verify(api))["ok"] is True
    assert (await nonce(api, value))["decision"] == "reject"


async def test_the_leader_checks_a_burst_of_new_entries_in_one_tick(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """12,000 decisions committed at once (more than two 5,000-entry slices), the spent
    nonce of the last one deleted in the same transaction: the leader's next state-check
    tick checks them all and raises ledger_tamper naming it."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    feed = api.client.app[ANALYSTS].feed
    await until(lambda: feed.duties.state_ticks >= 1, "the leader's first state check", timeout=30)
    # No further lead starts; one under way may run its tick beside the test's (each range
    # is handed out once, so together they still check every entry once).
    feed._last_lead = math.inf
    ts = api.runtime.now_us()
    items: list[dict[str, Any]] = [
        {"kind": "nonce", "ts_us": ts + i, "vm_id": "vm-burst", "subject": "s", "digest": secrets.token_hex(32),
         "receipt": "absent", "expires_us": ts + 3_600_000_000} for i in range(12_000)]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            rows = await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, false)",
                                    orjson.dumps(items).decode())
            assert {r["r_verdict"] for r in rows} == {"accept"}
            await conn.execute("DELETE FROM spent_nonces WHERE digest = $1", bytes.fromhex(items[-1]["digest"]))
    finally:
        await conn.close()
    assert not await tamper_alerts(api)
    await feed.duties._check_state()
    [alert] = await tamper_alerts(api)
    assert alert["details"]["first_bad_seq"] == rows[-1]["r_seq"]
    assert alert["details"]["table"] == "spent_nonces"


def _ledger_rows_read(node: dict[str, Any]) -> int:
    """The rows an EXPLAIN (ANALYZE, FORMAT JSON) plan read from ``ledger``: those its scans of
    that table returned or filtered out, over all their loops."""
    read = 0
    if node.get("Relation Name") == "ledger":
        read = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
    return read + sum(_ledger_rows_read(child) for child in node.get("Plans", []))


async def test_the_state_check_finds_a_later_unlock_by_index_not_by_reading_the_ledger(
        fresh_database: Callable[[], Any]) -> None:
    """A lock still in force that ``principals`` no longer holds, 20,000 entries, then the
    ledgered unlock that lifted it. The check of the lock's entry finds the unlock in
    ``ledger_rare_entries`` (migration 044) and reads two ledger rows; without that index
    (the control) it reads the 20,000 entries between them. Both agree with the state."""
    dsn = await fresh_database()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET max_parallel_workers_per_gather = 0")  # exact row counts
        locked = await conn.fetchval(
            "SELECT rg_append(1764900000000000, 'otp', 'vm-1', 'carol', NULL, 'reject', 'invalid',"
            " '{\"locked_until_us\": \"9999999999999999\"}'::jsonb)")
        await append_nonces(conn, 1, 20_000)
        await conn.execute("SELECT rg_append(1764900000020001, 'principal_unlock', NULL, 'carol', NULL, NULL, NULL,"
                           " '{}'::jsonb)")
        await conn.execute("ANALYZE ledger")
        args = (locked - 1, locked, 1764900000020002, "scope")  # the lock's entry alone

        async def rows_read() -> int:
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_CHECK}", *args, 0)
            return _ledger_rows_read(json.loads(plan)[0]["Plan"])

        assert await check_state(conn, *args) is None  # the unlock is found: no disagreement
        assert await rows_read() <= 2
        await conn.execute("DROP INDEX ledger_rare_entries")
        assert await check_state(conn, *args) is None
        assert await rows_read() >= 20_000
    finally:
        await conn.close()


async def test_a_deleted_spent_nonce_replayed_at_once_is_named(fresh_database: Callable[[], Any],
                                                             api_factory: Callable[..., Any]) -> None:
    """A superuser deletes a nonce's spent_nonces row and the nonce is replayed before any check
    looks: the replay's accept writes the row back, but for itself, so verify names the first
    accept."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    value = secrets.token_hex(8)
    first = await nonce(api, value)
    await superuser(dsn, f"DELETE FROM spent_nonces WHERE first_seq = {first['seq']}")
    again = await nonce(api, value)
    assert again["decision"] == "accept"  # the attack: what the state forgot is accepted again
    bad = (await verify(api))["state"]["first_disagreement"]
    assert (bad["seq"], bad["table"]) == (first["seq"], "spent_nonces"), bad


async def test_a_spent_nonce_deleted_and_replayed_is_named_across_purges(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Retention leaves spent nonces alone: with purges past the nonce's expiry before and after,
    its spent digest deleted and the nonce replayed at once, the spent digest names the
    replay's entry, so verify names the first accept."""
    api, dsn = await fresh_api(api_factory, fresh_database, nonce_max_ttl_s=60)
    value = secrets.token_hex(8)
    first = await nonce(api, value, ttl_s=30)
    await purge_expired(api.runtime.pool, api.runtime.now_us() + 3600 * 1_000_000)
    await superuser(dsn, "DELETE FROM spent_nonces")
    assert (await nonce(api, value, ttl_s=30))["decision"] == "accept"
    await purge_expired(api.runtime.pool, api.runtime.now_us() + 7200 * 1_000_000)
    bad = (await verify(api))["state"]["first_disagreement"]
    assert (bad["seq"], bad["table"]) == (first["seq"], "spent_nonces"), bad


async def test_a_reset_hotp_counter_replayed_at_once_is_named(fresh_database: Callable[[], Any],
                                                              api_factory: Callable[..., Any]) -> None:
    """The latest accepted HOTP code's counter lowered by one and its use row deleted, then the
    code replayed before any check looks: the replay raises the counter back and writes a use
    row for itself, so verify names the first accept."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    alice, secret = uid("alice"), pyotp.random_base32()
    await api.enroll(alice, type="hotp", secret=secret)
    assert (await otp(api, alice, pyotp.HOTP(secret).at(0)))["decision"] == "accept"
    first = await otp(api, alice, pyotp.HOTP(secret).at(1))
    assert first["decision"] == "accept"
    await superuser(dsn, "UPDATE otp_credentials SET last_counter = 0", "UPDATE otp_tokens SET last_counter = 0",
                    f"DELETE FROM uses WHERE first_seq = {first['seq']}")
    api.runtime.tokens._cache.clear()
    assert (await otp(api, alice, pyotp.HOTP(secret).at(1)))["decision"] == "accept"
    bad = (await verify(api))["state"]["first_disagreement"]
    assert (bad["seq"], bad["table"]) == (first["seq"], "uses"), bad


async def test_a_reset_totp_replayed_at_once_is_named(fresh_database: Callable[[], Any],
                                                      api_factory: Callable[..., Any]) -> None:
    """A TOTP accept undone in every state table (high-water, clock guard, use row) and the code
    replayed within its step: verify names the first accept."""
    api, dsn = await fresh_api(api_factory, fresh_database)
    bob, secret = uid("bob"), pyotp.random_base32()
    await api.enroll(bob, secret=secret)
    code = pyotp.TOTP(secret).at(api.clock.now)
    first = await otp(api, bob, code)
    assert first["decision"] == "accept"
    await superuser(dsn, "UPDATE otp_credentials SET last_counter = -1", "UPDATE otp_tokens SET last_counter = -1",
                    "UPDATE clock_guard SET high_us = 0", f"DELETE FROM uses WHERE first_seq = {first['seq']}")
    api.runtime.tokens._cache.clear()
    assert (await otp(api, bob, code))["decision"] == "accept"
    bad = (await verify(api))["state"]["first_disagreement"]
    assert (bad["seq"], bad["table"]) == (first["seq"], "uses"), bad
