"""Principals for administrators: who has tokens, who is failing, who is locked out; unlock.

A principal is anyone with an OTP token (active or deleted) or a row of throttling state
(``principals``: consecutive failures, locked-until). Listing is a keyset walk by name
behind an opaque cursor. An unlock ends a lockout and resets the failure count in one
transaction that also appends a ``principal_unlock`` ledger entry naming the caller, under
the ledger head lock that every writer of ``principals`` holds (as ``rg_decide`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from ..core import cursors, validation
from ..core.timefmt import rfc3339_us
from ..errors import InvalidRequest, NotFound
from ..pg.connections import acquire
from .apitokens import Caller
from .entries import Recorded, unheard, written

MAX_TOKENS_SHOWN = 50
_PAGE = """
WITH names AS (
    SELECT name FROM principals WHERE name > $1
    UNION
    SELECT principal FROM otp_tokens WHERE principal > $1
    ORDER BY 1 LIMIT $2
)
SELECT n.name, coalesce(p.fail_count, 0) AS fail_count, coalesce(p.locked_until_us, 0) AS locked_until_us,
    coalesce((SELECT jsonb_agg(t ORDER BY t.created) FROM (
        SELECT id AS token_id, type, (deleted_at IS NULL) AS active,
               extract(epoch FROM created_at)::float8 AS created,
               extract(epoch FROM deleted_at)::float8 AS deleted
        FROM otp_tokens WHERE principal = n.name ORDER BY created_at, id LIMIT $3) t), '[]') AS tokens
FROM names n LEFT JOIN principals p ON p.name = n.name ORDER BY n.name
"""
_KNOWN = ("SELECT EXISTS (SELECT 1 FROM principals WHERE name = $1)"
          " OR EXISTS (SELECT 1 FROM otp_tokens WHERE principal = $1)")
_UNLOCK = """
UPDATE principals p SET fail_count = 0, locked_until_us = 0
FROM (SELECT name, fail_count, locked_until_us FROM principals WHERE name = $1 FOR UPDATE) old
WHERE p.name = old.name
RETURNING old.fail_count, old.locked_until_us
"""


@dataclass(frozen=True, slots=True)
class Unlocked:
    principal: str
    seq: int
    was_locked: bool
    failures: int


def encode_cursor(key: bytes, name: str) -> str:
    return cursors.issue(key, "principals", name)


def decode_cursor(key: bytes, text: str) -> str:
    """The name a cursor stands for; anything ``encode_cursor`` did not make is a 400."""
    name = cursors.open_cursor(key, "principals", text)
    try:
        return validation.check_identifier(name, "cursor")
    except InvalidRequest:
        raise InvalidRequest("cursor is not one this service issued", field="cursor") from None


def _seconds(value: float | None) -> str | None:
    return None if value is None else rfc3339_us(round(value * 1_000_000))


def render(record: asyncpg.Record | dict[str, Any], now_us: int) -> dict[str, Any]:
    """A principal as the API shows it: throttling state and its tokens (never secrets)."""
    locked_until = int(record["locked_until_us"])
    tokens = record["tokens"] if isinstance(record["tokens"], list) else []
    return {
        "principal": record["name"], "failures": record["fail_count"],
        "locked": locked_until > now_us, "locked_until": rfc3339_us(locked_until) if locked_until > now_us else None,
        "tokens": [{"token_id": t["token_id"], "type": t["type"], "state": "active" if t["active"] else "deleted",
                    "created_at": _seconds(t["created"]), "deleted_at": _seconds(t["deleted"])} for t in tokens],
    }


class PrincipalService:
    def __init__(self, pool: asyncpg.Pool, cursor_key: bytes = b"", on_recorded: Recorded = unheard) -> None:
        self._pool = pool
        self.cursor_key = cursor_key
        self._on_recorded = on_recorded  # the continuity guard's ``recorded`` (entries.py)

    async def page(self, after: str | None, limit: int, now_us: int) -> tuple[list[dict[str, Any]], str | None]:
        """One page of principals by name; the second value is the next page's cursor."""
        async with acquire(self._pool) as conn:
            records = await conn.fetch(_PAGE, after or "", limit + 1, MAX_TOKENS_SHOWN)
        items = [render(r, now_us) for r in records[:limit]]
        return items, encode_cursor(self.cursor_key, items[-1]["principal"]) if len(records) > limit else None

    async def unlock(self, principal: str, note: str | None, caller: Caller, now_us: int) -> Unlocked:
        """Ends the principal's lockout and resets its failures; ledgered as ``principal_unlock``."""
        async with acquire(self._pool) as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")
            if not await conn.fetchval(_KNOWN, principal):
                raise NotFound("no such principal")
            row = await conn.fetchrow(_UNLOCK, principal)
            failures = int(row["fail_count"]) if row is not None else 0
            was_locked = row is not None and int(row["locked_until_us"]) > now_us
            seq = await conn.fetchval(
                "SELECT rg_append($1, 'principal_unlock', NULL, $2, NULL, NULL, NULL, $3::jsonb)",
                now_us, principal, {"by": caller.token_id, "by_name": caller.name, "note": note,
                                    "was_locked": was_locked, "failures": failures})
            entry = await written(conn, seq)
        self._on_recorded(*entry)
        return Unlocked(principal, int(seq), was_locked, failures)
