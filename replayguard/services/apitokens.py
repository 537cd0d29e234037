"""API tokens: bearer credentials of the four roles, stored only as keyed digests.

A presented token is reduced to its digest and looked up; the stored digest is then
compared in constant time. An active token's name is unique, and no name looks like a
token id (``tok_…``), so ``revoke`` names exactly one token. A callout or hypervisor token
may be bound to VMs by shell-style patterns over ``vm_id`` (``fnmatch``, case-sensitive):
it then speaks for those VMs only (``Caller.covers``).

Every write to ``api_tokens`` is announced on ``replayguard_api_tokens`` (a trigger,
migrations/functions/rg_api_token_changed.sql), heard on the alert feed's LISTEN
connection, which empties the cache (``changed``): a token revoked by any process is
refused on its next request. The cache is trusted as ``tokens.py`` trusts its own: an
answer read while that LISTEN was in effect, with no announcement heard during the read,
is kept up to ``CACHE_TTL_S`` while the connection keeps answering (``announced.HEARD_WITHIN_S``);
any other answer for ``UNHEARD_TTL_S`` at most.
"""

from __future__ import annotations

import fnmatch
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

from ..core.credentials import api_token_digest
from ..errors import Conflict, InvalidRequest, NotFound
from ..pg.connections import acquire
from .announced import Announced

ROLES = ("callout", "hypervisor", "analyst", "admin", "witness")
BINDABLE_ROLES = ("callout", "hypervisor")
PREFIX = "rgt_"
ID_PREFIX = "tok_"
CHANNEL = "replayguard_api_tokens"
CACHE_TTL_S = 60.0  # an answer read while changes were heard, and none heard since
UNHEARD_TTL_S = 1.0  # any other answer: how late a revocation may take effect while changes go unheard


@dataclass(frozen=True, slots=True)
class Caller:
    token_id: str
    name: str
    role: str
    vm_patterns: tuple[str, ...] = ()  # empty: every VM

    def covers(self, vm_id: str) -> bool:
        """Whether this caller may speak for ``vm_id``."""
        return not self.vm_patterns or any(fnmatch.fnmatchcase(vm_id, p) for p in self.vm_patterns)


class _Answer(NamedTuple):
    read_at: float  # time.monotonic() when the read was asked for (none announced during it)
    caller: Caller | None


def check_patterns(role: str, patterns: Sequence[str]) -> tuple[str, ...]:
    """VM patterns as stored; only callout and hypervisor tokens can be bound."""
    if patterns and role not in BINDABLE_ROLES:
        raise InvalidRequest(f"only {' and '.join(BINDABLE_ROLES)} tokens can be bound to VMs", field="vm")
    for pattern in patterns:
        if not 1 <= len(pattern) <= 256 or not pattern.isprintable():
            raise InvalidRequest("a VM pattern must be 1 to 256 printable characters", field="vm")
    return tuple(dict.fromkeys(patterns))


class ApiTokens(Announced):
    def __init__(self, pool: asyncpg.Pool, pepper: bytes) -> None:
        super().__init__()
        self._pool = pool
        self._pepper = pepper
        self._cache: dict[bytes, _Answer] = {}  # by digest

    # --- announcements of token changes on CHANNEL (the alert feed's LISTEN connection) --

    def listening(self, on: bool) -> None:
        super().listening(on)
        self._cache.clear()  # answers kept while nothing was heard may be stale, or kept too long

    def changed(self, _payload: str = "") -> None:
        """A change to ``api_tokens`` was announced: every cached answer may be stale."""
        self._changes += 1
        self._cache.clear()

    async def create(self, role: str, name: str, vm_patterns: Sequence[str] = ()) -> tuple[str, str]:
        """Creates a token; returns (token id, the token itself, shown this once)."""
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", field="role")
        if not 1 <= len(name) <= 256 or not name.isprintable():
            raise InvalidRequest("name must be 1 to 256 printable characters", field="name")
        if name.startswith(ID_PREFIX):
            raise InvalidRequest(f"a name must not start with {ID_PREFIX!r}, which token ids do", field="name")
        patterns = check_patterns(role, vm_patterns)
        token = PREFIX + secrets.token_urlsafe(32)
        token_id = ID_PREFIX + secrets.token_urlsafe(9)
        try:
            async with acquire(self._pool) as conn:
                await conn.execute(
                    "INSERT INTO api_tokens (id, name, role, digest, vm_patterns) VALUES ($1, $2, $3, $4, $5)",
                    token_id, name, role, api_token_digest(self._pepper, token), list(patterns),
                )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"an active token is already named {name!r}: pick another name or revoke it first",
                           field="name") from None
        return token_id, token

    async def revoke(self, ident: str) -> int:
        """Revokes the one active token with this id, or else with this name (names are unique
        among active tokens; a name made before ``tok_`` names were refused may equal an id)."""
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = (SELECT id FROM api_tokens"
                " WHERE (id = $1 OR name = $1) AND revoked_at IS NULL ORDER BY id = $1 DESC LIMIT 1)"
                " AND revoked_at IS NULL RETURNING id", ident,
            )
        if not rows:
            raise NotFound(f"no active token with id or name {ident!r}")
        self._cache.clear()
        return len(rows)

    async def list(self) -> list[dict[str, object]]:
        async with acquire(self._pool) as conn:
            rows = await conn.fetch("SELECT id, name, role, vm_patterns, created_at, revoked_at FROM api_tokens"
                                    " ORDER BY created_at, id")
        return [dict(r.items()) for r in rows]

    async def authenticate(self, token: str) -> Caller | None:
        """The caller a bearer token belongs to, or None when unknown or revoked."""
        # Tokens are ASCII; aiohttp hands other header bytes over as surrogate escapes,
        # which no digest can encode.
        if not token.isascii() or not token.startswith(PREFIX) or len(token) > 256:
            return None
        digest = api_token_digest(self._pepper, token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and self._fresh(hit, now):
            return hit.caller
        changes = self._changes
        async with acquire(self._pool) as conn:
            row = await conn.fetchrow(
                "SELECT id, name, role, digest, vm_patterns FROM api_tokens WHERE digest = $1 AND revoked_at IS NULL",
                digest,
            )
        caller = None
        if row is not None and hmac.compare_digest(bytes(row["digest"]), digest):
            caller = Caller(row["id"], row["name"], row["role"], tuple(row["vm_patterns"]))
        if len(self._cache) > 10_000:
            self._cache.clear()
        if self._changes == changes:  # else a change announced during the read may postdate it
            self._cache[digest] = _Answer(now, caller)
        return caller

    def _fresh(self, hit: _Answer, now: float) -> bool:
        if now - hit.read_at < UNHEARD_TTL_S:
            return True
        return now - hit.read_at < CACHE_TTL_S and self._heard_since(hit.read_at)
