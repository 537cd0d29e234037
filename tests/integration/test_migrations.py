"""Migrations: from zero, again as a no-op, and an upgrade from every earlier schema equals a fresh one.

The schema is numbered migrations (tables) plus one file per stored function, re-applied
whenever its content changes. An upgraded database must end up with exactly the schema a
fresh one gets: compared as ``pg_dump --schema-only`` text, so a function left behind, a
trigger missing or a column of another type shows up as a diff.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from replayguard.errors import ConfigError
from replayguard.pg import connections, schema
from tests.conftest import PG_ADMIN, drop_database, dsn_for, run_cli

FROZEN = Path(__file__).resolve().parents[1] / "data" / "schema"

pytestmark = pytest.mark.skipif(shutil.which("pg_dump") is None, reason="pg_dump is not installed")


async def _new_database() -> str:
    name = "rg_migrate_" + secrets.token_hex(4)
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return dsn_for(name)


@pytest.fixture
async def new_database() -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Makes empty databases on demand and drops them all afterwards."""
    made: list[str] = []

    async def make() -> str:
        made.append(await _new_database())
        return made[-1]

    yield make
    for dsn in made:
        await drop_database(dsn)


def schema_of(dsn: str) -> str:
    """The database's schema as pg_dump prints it (comments with OIDs-dependent order removed)."""
    done = subprocess.run(["pg_dump", "--schema-only", "--no-owner", "--no-privileges", dsn],
                          capture_output=True, text=True, check=True, timeout=60)
    return "\n".join(line for line in done.stdout.splitlines()
                     if not line.startswith(("--", "\\restrict", "\\unrestrict")))


async def _run(dsn: str, *, migrations: list[schema.Migration] | None = None) -> list[str]:
    conn = await connections.connect(dsn)
    try:
        return await schema.migrate(conn, migrations)
    finally:
        await conn.close()


async def _function_digests(dsn: str) -> dict[str, bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["name"]: r["sha256"] for r in await conn.fetch("SELECT name, sha256 FROM schema_functions")}
    finally:
        await conn.close()


async def test_migrate_from_zero_then_noop(new_database: Callable[[], Awaitable[str]]) -> None:
    """Every numbered file, then every function file, applies on an empty database; a second run applies none."""
    dsn = await new_database()
    first = await _run(dsn)
    second = await _run(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        await conn.close()
    assert first == ([m.name for m in schema.load_migrations()]
                     + [f"functions/{f.name}.sql" for f in schema.load_functions()])
    assert second == []
    assert versions == sorted(m.version for m in schema.load_migrations())


async def test_a_changed_function_file_is_applied_again(new_database: Callable[[], Awaitable[str]]) -> None:
    """Only a function whose file's content changed is re-applied, and the new body is what runs."""
    dsn = await new_database()
    await _run(dsn)
    functions = schema.load_functions()
    changed = [schema.StoredFunction(f.name, f.sql.replace("ELSE 1 END", "ELSE 0 END"))
               if f.name == "rg_severity_rank" else f for f in functions]
    assert changed != functions
    changed_rank = next(f for f in changed if f.name == "rg_severity_rank")
    conn = await connections.connect(dsn)
    try:
        original = next(f for f in functions if f.name == "rg_severity_rank")
        # a build whose rg_severity_rank changed lists the version before as superseded
        applied = await schema.migrate(conn, functions=changed, superseded={"rg_severity_rank": {original.digest}})
        rank = await conn.fetchval("SELECT rg_severity_rank('info')")
        # and back, for the digest check below: a build that lists the changed one as earlier
        await schema.migrate(conn, superseded={"rg_severity_rank": {changed_rank.digest}})
    finally:
        await conn.close()
    assert applied == ["functions/rg_severity_rank.sql"]
    assert rank == 0
    assert await _function_digests(dsn) == {f.name: f.digest for f in functions}


async def test_the_schema_deployed_before_functions_moved_upgrades_to_a_fresh_one(
        new_database: Callable[[], Awaitable[str]]) -> None:
    """A database restored from the frozen 007 dump (functions
    inside the migrations) upgrades to exactly the fresh schema."""
    fresh = await new_database()
    await _run(fresh)
    old = await new_database()
    conn = await asyncpg.connect(old)
    try:
        await conn.execute((FROZEN / "v007.sql").read_text())
    finally:
        await conn.close()
    applied = await _run(old)
    later = [m.name for m in schema.load_migrations() if m.version > 7]  # numbered migrations added since
    assert applied == later + [f"functions/{f.name}.sql" for f in schema.load_functions()]
    assert schema_of(old) == schema_of(fresh)
    assert await _function_digests(old) == await _function_digests(fresh)


async def test_every_numbered_version_upgrades_to_a_fresh_schema(new_database: Callable[[], Awaitable[str]]) -> None:
    """Stopped after each numbered migration (with the functions of then), a database upgrades to the fresh schema."""
    fresh = await new_database()
    await _run(fresh)
    expected = schema_of(fresh)
    migrations = schema.load_migrations()
    for stop in range(1, len(migrations)):
        dsn = await new_database()
        await _run(dsn, migrations=migrations[:stop])
        await _run(dsn)
        assert schema_of(dsn) == expected, f"upgrade from {migrations[stop - 1].name} differs"


async def test_the_ledger_refuses_truncate(new_database: Callable[[], Awaitable[str]]) -> None:
    """TRUNCATE of the ledger (with or without CASCADE) is refused like UPDATE and DELETE."""
    dsn = await new_database()
    await _run(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetchval("SELECT rg_append(1, 'test', NULL, NULL, NULL, NULL, NULL, '{}'::jsonb)")
        for statement in ("TRUNCATE ledger", "TRUNCATE ledger CASCADE", "DELETE FROM ledger",
                          "UPDATE ledger SET kind = 'x'"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
        assert await conn.fetchval("SELECT count(*) FROM ledger") == 1
    finally:
        await conn.close()


async def test_migrations_run_without_a_statement_timeout(new_database: Callable[[], Awaitable[str]]) -> None:
    """``migrate_dsn``'s session has no statement timeout (a migration's index build grows with
    the ledger): a migration that fails unless ``statement_timeout`` is 0, and then runs for
    longer than a second (so no client-side timeout cuts it either), applies."""
    dsn = await new_database()
    probe = schema.Migration(999, "999_probe.sql", """
        DO $$ BEGIN
            IF current_setting('statement_timeout') <> '0' THEN
                RAISE EXCEPTION 'statement_timeout is %', current_setting('statement_timeout');
            END IF;
        END $$;
        SELECT pg_sleep(1.2);
    """)
    applied = await schema.migrate_dsn(dsn, [*schema.load_migrations(), probe])
    assert "999_probe.sql" in applied


async def test_a_database_migrated_by_a_newer_release_is_refused_untouched(
        new_database: Callable[[], Awaitable[str]], tmp_path: Path) -> None:
    """`migrate` on a database holding a migration this build does not ship exits 2 with one line and leaves the
    newer release's stored functions as they are."""
    dsn = await new_database()
    await _run(dsn)
    newer_digest = b"\x01" * 32
    conn = await asyncpg.connect(dsn)
    try:  # what a later release leaves behind: a migration this build lacks, and a changed function
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (999, '999_from_the_future.sql')")
        await conn.execute("UPDATE schema_functions SET sha256 = $1 WHERE name = 'rg_decide'", newer_digest)
    finally:
        await conn.close()
    result = run_cli("migrate", "--database-url", dsn, "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and "999_from_the_future.sql" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (await _function_digests(dsn))["rg_decide"] == newer_digest


async def test_a_snapshot_creation_of_unknown_time_becomes_null(new_database: Callable[[], Awaitable[str]]) -> None:
    """033: a creation recorded as 0 (its time unknown) becomes NULL, which rg_event_context
    leaves out (a revert to it has no known start); a known time stays, and one unknown
    creation per snapshot is kept, as the replaced key kept one per time."""
    dsn = await new_database()
    migrations = schema.load_migrations()
    before = [m for m in migrations if m.version < 33]
    await _run(dsn, migrations=before)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO vm_snapshots VALUES ('web-01', 'cold', 0, 'e1'),"
                           " ('web-01', 'pre-patch', 1795946400000000, 'e2')")
    finally:
        await conn.close()
    await _run(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT snapshot_id, created_us FROM vm_snapshots ORDER BY snapshot_id")
        context = await conn.fetchval("SELECT rg_event_context('web-01', 'x', 'web-01', 'cold', 'web-01')")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO vm_snapshots VALUES ('web-01', 'cold', NULL, 'e3')")
    finally:
        await conn.close()
    assert [(r["snapshot_id"], r["created_us"]) for r in rows] == [("cold", None), ("pre-patch", 1795946400000000)]
    assert json.loads(context)["snapshots"] == []


async def test_nonce_uses_become_spent_nonces_naming_their_entries(new_database: Callable[[], Awaitable[str]]) -> None:
    """043: the nonces' rows of `uses` move to spent_nonces with the entry each names, a nonce
    already spent keeps its row, OTP uses stay, and `uses` then refuses a nonce's row."""
    dsn = await new_database()
    await _run(dsn, migrations=[m for m in schema.load_migrations() if m.version < 43])
    use = ("INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)"
           " VALUES ($1, $2, 'vm-1', 's', $3, 1, 2)")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(use, b"n" * 32, "nonce", 7)
        await conn.execute(use, b"o" * 32, "otp", 8)
        await conn.execute(use, b"s" * 32, "nonce", 9)
        await conn.execute("INSERT INTO spent_nonces VALUES ($1, 3)", b"s" * 32)
    finally:
        await conn.close()
    await _run(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        spent = {bytes(r["digest"]): r["first_seq"] for r in await conn.fetch("SELECT * FROM spent_nonces")}
        uses = [(bytes(r["digest"]), r["kind"]) for r in await conn.fetch("SELECT digest, kind FROM uses")]
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(use, b"m" * 32, "nonce", 10)
    finally:
        await conn.close()
    assert spent == {b"n" * 32: 7, b"s" * 32: 3}
    assert uses == [(b"o" * 32, "otp")]


async def test_a_function_of_a_newer_release_is_refused_untouched(new_database: Callable[[], Awaitable[str]]) -> None:
    """A database whose stored function is in a version this build neither ships nor lists
    as earlier (a later release that changed functions alone, no numbered migration) is
    refused with one line and left as it is: an older build must not bring back the
    function a fix replaced."""
    dsn = await new_database()
    await _run(dsn)
    newer = b"\x02" * 32
    conn = await connections.connect(dsn)
    try:
        await conn.execute("UPDATE schema_functions SET sha256 = $1 WHERE name = 'rg_decide'", newer)
        with pytest.raises(ConfigError, match="rg_decide this build does not know"):
            await schema.migrate(conn)
        assert bytes(await conn.fetchval("SELECT sha256 FROM schema_functions WHERE name = 'rg_decide'")) == newer
    finally:
        await conn.close()


async def test_an_unknown_function_is_replaced_only_when_asked(new_database: Callable[[], Awaitable[str]]) -> None:
    """``migrate --replace-unknown-functions`` (a developer's database holding an uncommitted
    edit) gives a function this build does not know this build's version; without it the
    error names the flag."""
    dsn = await new_database()
    await _run(dsn)
    conn = await connections.connect(dsn)
    try:
        await conn.execute("UPDATE schema_functions SET sha256 = $1 WHERE name = 'rg_decide'", b"\x03" * 32)
        with pytest.raises(ConfigError, match="--replace-unknown-functions"):
            await schema.migrate(conn)
        assert await schema.migrate(conn, replace_unknown_functions=True) == ["functions/rg_decide.sql"]
        shipped = next(f.digest for f in schema.load_functions() if f.name == "rg_decide")
        assert bytes(await conn.fetchval("SELECT sha256 FROM schema_functions WHERE name = 'rg_decide'")) == shipped
    finally:
        await conn.close()


async def test_a_function_of_an_earlier_release_is_upgraded(new_database: Callable[[], Awaitable[str]]) -> None:
    """A database holding a version of a function that superseded.txt lists (an earlier
    release's) gets this build's version."""
    dsn = await new_database()
    await _run(dsn)
    name, digests = next(iter(sorted(schema.load_superseded().items())))
    conn = await connections.connect(dsn)
    try:
        await conn.execute("UPDATE schema_functions SET sha256 = $1 WHERE name = $2", next(iter(digests)), name)
        assert await schema.migrate(conn) == [f"functions/{name}.sql"]
    finally:
        await conn.close()

