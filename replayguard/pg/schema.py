"""The schema: numbered migrations for tables, one file per stored function.

The SQL ships inside the package as ``replayguard.migrations`` (the top-level
``migrations/`` directory, mapped in pyproject.toml) and is read with
``importlib.resources``, so a missing file is a start-up error, never an empty schema.
Numbered migrations are applied once each, in order; a stored function's file is applied
again whenever its SHA-256 differs from the one recorded in ``schema_functions``. A
database that holds a migration newer than any this build ships, or a stored function in a
version this build neither ships nor lists as an earlier one (``functions/superseded.txt``:
a release that changed functions alone), was migrated by a later release: it is refused,
untouched, rather than given this build's older functions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg
import structlog

from ..errors import ConfigError
from .connections import connect

log = structlog.get_logger(__name__)

SQL_PACKAGE = "replayguard.migrations"  # the top-level migrations/ directory, mapped in pyproject.toml
_MIGRATION_LOCK = 0x7265706C61  # "repla": serialises concurrent migrators
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_FUNCTION_NAME = re.compile(r"^rg_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    """A numbered migration: table changes, applied once, in order."""

    version: int
    name: str
    sql: str

    @property
    def has_statements(self) -> bool:
        """False for a file of comments alone (a number kept taken after its functions moved)."""
        return any(line.strip() and not line.lstrip().startswith("--") for line in self.sql.splitlines())


@dataclass(frozen=True)
class StoredFunction:
    """One file of ``functions/``: a stored function (and its trigger, if it is one)."""

    name: str
    sql: str

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.sql.encode()).digest()


def _sql_files(package: str) -> list[Traversable]:
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise ConfigError(f"the SQL package {package} is not installed with replayguard") from None
    return sorted((f for f in root.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)


def load_migrations(package: str = SQL_PACKAGE) -> list[Migration]:
    """The numbered migrations shipped in ``package``; none found is an error."""
    found = []
    for item in _sql_files(package):
        match = _NAME.match(item.name)
        if match is None:
            raise ConfigError(f"migration file {item.name} must be named NNN_description.sql")
        found.append(Migration(int(match.group(1)), item.name, item.read_text(encoding="utf-8")))
    if not found:
        raise ConfigError(f"no migrations found in {package}: the installation is incomplete")
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError("two migration files share a number")
    return found


def load_superseded(package: str = SQL_PACKAGE + ".functions") -> dict[str, set[bytes]]:
    """The digests of earlier versions of each stored function (``superseded.txt``)."""
    try:
        text = resources.files(package).joinpath("superseded.txt").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        raise ConfigError(f"{package}/superseded.txt is missing: the installation is incomplete") from None
    found: dict[str, set[bytes]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, digest = line.split()
            found.setdefault(name, set()).add(bytes.fromhex(digest))
    return found


def load_functions(package: str = SQL_PACKAGE + ".functions") -> list[StoredFunction]:
    """The stored functions shipped in ``package``, one file each; none found is an error."""
    found = []
    for item in _sql_files(package):
        if _FUNCTION_NAME.match(item.name) is None:
            raise ConfigError(f"function file {item.name} must be named rg_name.sql")
        found.append(StoredFunction(item.name.removesuffix(".sql"), item.read_text(encoding="utf-8")))
    if not found:
        raise ConfigError(f"no stored functions found in {package}: the installation is incomplete")
    return found


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None,
                  functions: list[StoredFunction] | None = None,
                  superseded: dict[str, set[bytes]] | None = None, *,
                  replace_unknown_functions: bool = False) -> list[str]:
    """Applies pending migrations, then every stored function whose file changed.

    Each migration runs in its own transaction; the functions run in one transaction
    after them, with ``check_function_bodies`` off (as pg_dump restores), so the files'
    order does not matter. Returns the names applied; raises ``ConfigError``, having
    changed nothing, when the database is ahead of ``migrations``, or holds a version of a
    function that is neither in ``functions`` nor in ``superseded`` (by default what
    ``functions/superseded.txt`` lists). ``replace_unknown_functions`` (``migrate
    --replace-unknown-functions``, for a developer's database holding an uncommitted edit)
    gives such a function this build's version instead, with a warning naming it.
    """
    migrations = load_migrations() if migrations is None else migrations
    functions = load_functions() if functions is None else functions
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        _refuse_newer(rows, migrations)
        await _refuse_newer_functions(conn, functions, load_superseded() if superseded is None else superseded,
                                      replace=replace_unknown_functions)
        done = {r["version"] for r in rows}
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                if migration.has_statements:
                    await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name,
                )
            applied.append(migration.name)
            log.info("migration_applied", migration=migration.name)
        applied += await _apply_functions(conn, functions)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


def _refuse_newer(rows: list[asyncpg.Record], migrations: list[Migration]) -> None:
    """Raises ``ConfigError`` when the database records a migration newer than every one shipped."""
    newest = max((m.version for m in migrations), default=0)
    if rows and rows[-1]["version"] > newest:
        raise ConfigError(f"the database was migrated by a newer replayguard (it has migration "
                          f"{rows[-1]['name']!r}, this build's newest is {newest:03d}): run that release "
                          f"or a later one, not this one")


async def _refuse_newer_functions(conn: asyncpg.Connection, functions: list[StoredFunction],
                                  superseded: dict[str, set[bytes]], *, replace: bool) -> None:
    """Raises ``ConfigError`` when the database holds a version of a shipped function that
    this build neither ships nor lists as earlier: a later release changed it. With
    ``replace``, logs each such function instead (``_apply_functions`` replaces it)."""
    if await conn.fetchval("SELECT to_regclass('schema_functions') IS NULL"):
        return
    held = {r["name"]: bytes(r["sha256"]) for r in await conn.fetch("SELECT name, sha256 FROM schema_functions")}
    for function in functions:
        digest = held.get(function.name)
        if digest is not None and digest != function.digest and digest not in superseded.get(function.name, ()):
            if replace:
                log.warning("unknown_function_replaced", function=function.name, held_sha256=digest.hex())
                continue
            raise ConfigError(f"the database holds a version of {function.name} this build does not know (a newer "
                              f"replayguard migrated it): run that release or a later one, not this one (a developer's "
                              f"database holding an uncommitted edit: migrate --replace-unknown-functions)")


async def _apply_functions(conn: asyncpg.Connection, functions: list[StoredFunction]) -> list[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_functions ("
        " name text PRIMARY KEY, sha256 bytea NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    current = {r["name"]: r["sha256"] for r in await conn.fetch("SELECT name, sha256 FROM schema_functions")}
    changed = [f for f in functions if current.get(f.name) != f.digest]
    if not changed:
        return []
    async with conn.transaction():
        await conn.execute("SET LOCAL check_function_bodies = off")
        for function in changed:
            await conn.execute(function.sql)
            await conn.execute(
                "INSERT INTO schema_functions (name, sha256) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, applied_at = now()",
                function.name, function.digest,
            )
    names = [f"functions/{f.name}.sql" for f in changed]
    log.info("functions_applied", functions=names)
    return names


async def migrate_dsn(dsn: str, migrations: list[Migration] | None = None,
                      functions: list[StoredFunction] | None = None, *,
                      replace_unknown_functions: bool = False) -> list[str]:
    """Connects to ``dsn``, applies pending migrations, disconnects. Its statements have no
    timeout: a migration's work grows with the ledger (017 builds an index over it, 016
    copied every spent nonce), and cancelling it would leave a large deployment unable
    to upgrade; each migration is one transaction, so an interrupted one leaves nothing."""
    conn = await connect(dsn, statement_timeout_ms=0)
    try:
        return await migrate(conn, migrations, functions, replace_unknown_functions=replace_unknown_functions)
    finally:
        await conn.close()
