"""Connections to PostgreSQL: the pool, one-off connections, and failing closed.

There is one storage code path, asyncpg against PostgreSQL; with no URL configured the
service starts an embedded PostgreSQL (``pg/embedded.py``) under the data dir and uses it
exactly like any other server. A database that goes away becomes ``Unavailable`` here
(``acquire``, ``KeptConnection``), so every caller fails closed the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import structlog

from ..errors import ConfigError, Unavailable
from .session import client_timeout_s, connect_timeout_s, session_settings

log = structlog.get_logger(__name__)

# Errors that mean "the database is not there right now": the decision path fails closed.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.QueryCanceledError,
    asyncpg.AdminShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # A backend terminated (pg_terminate_backend, a restart) sends its FATAL before it
    # closes the socket; a query started on the connection in between gets this.
    asyncpg.InternalClientError,
)

# What a server that is up answers a new session on a database it will not open now: closed
# to sessions (a restore or a copy of it under way), renamed or dropped away (a restore in
# place), or refused by its authentication. A pool that must reconnect gets these.
SESSION_REFUSED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ObjectNotInPrerequisiteStateError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)


def embedded_url(data_dir: Path, buffers_mb: int = 0) -> str:
    """Starts (or joins) the embedded PostgreSQL of ``data_dir`` (see ``replayguard.pg.embedded``)."""
    from .embedded import embedded_dsn

    return embedded_dsn(data_dir, buffers_mb)


def stop_embedded(data_dir: Path) -> None:
    """This process is done with the embedded PostgreSQL of ``data_dir``; the last user stops it."""
    from .embedded import leave_embedded

    leave_embedded(data_dir)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="text",
        encoder=lambda value: orjson.dumps(value).decode(), decoder=orjson.loads,
    )


async def create_pool(dsn: str, *, size: int, statement_timeout_ms: int,
                      on_connect: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
                      application_name: str | None = None) -> asyncpg.Pool:
    """A pool whose connections time statements out and decode jsonb with orjson.
    ``on_connect`` runs on each new connection; what it raises fails the acquire.
    ``application_name``: the sessions' name (``session.session_settings``)."""
    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        if on_connect is not None:
            await on_connect(conn)

    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, init=init,
        server_settings=session_settings(statement_timeout_ms, application_name),
        command_timeout=client_timeout_s(statement_timeout_ms),
        timeout=connect_timeout_s(statement_timeout_ms),
        max_inactive_connection_lifetime=60,
    )
    assert pool is not None  # noqa: S101 - narrows the type for mypy
    return pool


async def connect(dsn: str, *, statement_timeout_ms: int = 30_000) -> asyncpg.Connection:
    """A connection like the pool's: its statements time out on the server, and every call on
    it on the client a second later (``session.client_timeout_s``; 0 is no timeout on either);
    opening it is bounded the same way (``session.connect_timeout_s``)."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=session_settings(statement_timeout_ms),
                                                     command_timeout=client_timeout_s(statement_timeout_ms),
                                                     timeout=connect_timeout_s(statement_timeout_ms))
    await _init_connection(conn)
    return conn


async def check_reachable(dsn: str, timeout: float = 10.0) -> None:
    """Raises ``ConfigError`` with one clear line when the database cannot be reached."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn), timeout)
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        raise ConfigError("the database refused the credentials in database_url") from None
    except asyncpg.InvalidCatalogNameError:
        raise ConfigError("the database named in database_url does not exist") from None
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot reach the database: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"database_url is not usable: {exc}") from None
    await conn.close()


# Server settings under which the service still runs but does not hold what it promises:
# (setting, value that is a problem, what goes wrong). Checked at start-up (``serve``, ``migrate``).
RISKY_SETTINGS = (
    ("fsync", "off", "an acknowledged decision may be lost in a crash of the database server"),
    ("synchronous_commit", "off", "an acknowledged decision may be lost in a crash of the database server"),
    ("autovacuum", "off", "the small tables updated by every decision (vms, ledger_head) bloat and "
                          "decisions slow down over minutes; run VACUUM yourself or turn it on"),
    ("track_counts", "off", "autovacuum cannot tell which tables need it"),
)


async def risky_settings(dsn: str) -> list[tuple[str, str, str]]:
    """The server's settings from ``RISKY_SETTINGS`` that have their problem value."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                                [name for name, _, _ in RISKY_SETTINGS])
    finally:
        await conn.close()
    current = {row["name"]: row["setting"] for row in rows}
    return [(name, bad, why) for name, bad, why in RISKY_SETTINGS if current.get(name) == bad]


async def warn_about_settings(dsn: str) -> list[str]:
    """Logs one warning line per risky server setting; returns their names."""
    found = await risky_settings(dsn)
    for name, value, why in found:
        log.warning("postgres_setting_risky", setting=name, value=value, consequence=why)
    return [name for name, _, _ in found]


def record_to_dict(record: Any) -> dict[str, Any]:
    return dict(record.items())


class _Acquire:
    """``pool.acquire()`` that turns a lost database into ``Unavailable`` (fail closed)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._ctx: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._ctx = self._pool.acquire()
        try:
            conn: asyncpg.Connection = await self._ctx.__aenter__()
        except (*UNAVAILABLE_ERRORS, *SESSION_REFUSED_ERRORS):
            raise Unavailable("the database cannot be reached right now") from None
        return conn

    async def __aexit__(self, *exc: Any) -> bool:
        try:
            await self._ctx.__aexit__(*exc)
        except UNAVAILABLE_ERRORS:
            raise Unavailable("the database cannot be reached right now") from None
        if exc[0] is not None and issubclass(exc[0], UNAVAILABLE_ERRORS):
            raise Unavailable("the database cannot be reached right now") from None
        return False


class InDoubt(Unavailable):
    """The connection was lost after a query was sent: the server backend ``pid`` may have
    committed it. Whoever must tell the two apart asks the server once ``pid`` has ended."""

    def __init__(self, pid: int) -> None:
        super().__init__("the database cannot be reached right now")
        self.pid = pid


def acquire(pool: asyncpg.Pool) -> _Acquire:
    """Use as ``async with acquire(pool) as conn``; database loss becomes ``Unavailable``."""
    return _Acquire(pool)


def _usable(conn: Any) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # the pool already took back a connection it saw die
        return False


class KeptConnection:
    """One pool connection held between uses by a component with one query in flight.

    Keeping it saves the pool's reset round trip (``RESET ALL``, ``UNLISTEN *`` …) that
    every release costs; the group-commit appender and the token reader each keep one.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: Any = None

    async def get(self) -> Any:
        if self._conn is not None and not _usable(self._conn):
            await self.drop()  # the server went away while we were idle
        if self._conn is None:
            self._conn = await self._pool.acquire()
        return self._conn

    async def drop(self) -> None:
        """Gives a connection that failed back to the pool, closed; the next use reconnects."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.terminate()
            await self._pool.release(conn)
        except asyncpg.InterfaceError:
            pass  # the pool already took back a connection it saw die

    async def fetch(self, event: str, query: str, *args: Any) -> list[asyncpg.Record]:
        """Runs one query on the kept connection, failing closed.

        A lost database or any server-side error drops the connection (the next use
        reconnects), logs ``<event>_unavailable`` or ``<event>_error`` and raises
        ``Unavailable``: the caller answers 503 and nothing is accepted. When the connection
        was lost after the query was sent, the exception is ``InDoubt``: the server may
        have run and committed it.
        """
        pid = None
        try:
            conn = await self.get()
            pid = conn.get_server_pid()
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows
        except asyncpg.QueryCanceledError as exc:  # the server cancelled it: rolled back
            await self.drop()
            log.warning(f"{event}_unavailable", error=type(exc).__name__)
            raise Unavailable("the database cannot be reached right now") from None
        except UNAVAILABLE_ERRORS as exc:
            await self.drop()
            log.warning(f"{event}_unavailable", error=type(exc).__name__)
            if pid is not None:
                raise InDoubt(pid) from None
            raise Unavailable("the database cannot be reached right now") from None
        except asyncpg.PostgresError as exc:
            # Not the client's fault and not a connection loss: still fail closed.
            await self.drop()
            log.error(f"{event}_error", error=type(exc).__name__, sqlstate=exc.sqlstate)
            raise Unavailable("the database refused the query") from None

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)
