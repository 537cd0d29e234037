"""The settings of every PostgreSQL session the service opens.

Kept apart from ``connections.py`` so the chain check's child (``services/chain_reader.py``)
opens its session with them without loading the pool's imports.
"""

from __future__ import annotations

import os


def session_settings(statement_timeout_ms: int, application_name: str | None = None) -> dict[str, str]:
    """The settings of every session the service opens (its pool, its one-off connections,
    the chain check's child). Each is named ``replayguard-<pid>`` (``application_name``:
    another name starting ``replayguard-``, for a process that must tell its own sessions
    from those of a process with the same id on another host, as ``keys rotate`` does)."""
    return {
        "application_name": application_name or f"replayguard-{os.getpid()}",
        "statement_timeout": str(statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(max(statement_timeout_ms * 2, 10_000)),
        # Durability of every acknowledged decision depends on this staying on.
        "synchronous_commit": "on",
        # Over TCP, the server gives up on a client that vanished (a half-open connection)
        # in about a minute rather than the system's two hours: a session it keeps alive
        # can hold the checkpoint or leader lock (ignored on a Unix socket).
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
        # PostgreSQL compiles a plan with LLVM at every execution once the plan's estimated
        # cost passes jit_above_cost. The service's statements are index lookups and range
        # reads, and an estimate can pass that mark as the tables grow: the state check's did
        # at a few million entries, and then took about 40 ms more each time, for 30 ms of
        # work (docs/operations.md, "JIT compilation").
        "jit": "off",
        # rg_decide waits for the head lock and then reads what the previous holder committed:
        # READ COMMITTED. A database or role defaulting to REPEATABLE READ or SERIALIZABLE
        # turns that wait into a serialization failure whenever two appenders meet, and a
        # default lock_timeout cancels it; either answered 503 with nothing wrong. Statements
        # stay bounded by statement_timeout. (Where a reader needs one snapshot, it asks for
        # its isolation explicitly.)
        "default_transaction_isolation": "read committed",
        "lock_timeout": "0",
    }


def client_timeout_s(statement_timeout_ms: int) -> float | None:
    """The client's timeout for every call on such a session: a second past the server's, so
    a connection whose peer vanished without closing it (half-open) fails the call instead of
    hanging until TCP gives up. ``0``, PostgreSQL's "no timeout", is none here too (over TCP
    the session's keepalives still notice a vanished server within about a minute)."""
    return statement_timeout_ms / 1000 + 1 if statement_timeout_ms else None


def connect_timeout_s(statement_timeout_ms: int) -> float:
    """How long opening such a session may take (TCP, TLS, authentication, and the pool's
    ``init``): as long as one call on it, so a handshake caught by a half-open network fails
    instead of holding its caller (a pool acquire, the leader's duties) for asyncpg's default
    of a minute; that minute where statements have no timeout."""
    return client_timeout_s(statement_timeout_ms) or 60.0
