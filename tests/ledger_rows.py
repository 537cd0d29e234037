"""Chained ledger entries written straight through ``rg_append``, for tests that need a ledger
of a given length without going through decisions (no ``uses`` rows are written)."""

from __future__ import annotations

import asyncpg

# Entries first..last: accepted nonces on seven VMs, one microsecond apart, each with its own digest.
APPEND_NONCES = ("SELECT rg_append(1764900000000000 + g, 'nonce', 'vm-' || (g % 7), 'test', sha256(int8send(g)),"
                 " 'accept', 'ok', '{\"ttl_s\": 300, \"flags\": [], \"epoch\": 0, \"receipt\": \"absent\"}'::jsonb)"
                 " FROM generate_series($1::bigint, $2::bigint) g")


async def append_nonces(conn: asyncpg.Connection, first: int, last: int) -> None:
    """Appends the entries ``first``..``last`` of ``APPEND_NONCES``."""
    await conn.execute(APPEND_NONCES, first, last)
