"""API tokens: bearer credentials of the four roles, stored only as keyed digests.

A presented token is reduced to its digest and looked up; the stored digest is then
compared in constant time. Known tokens are cached for a few seconds, so a revocation
takes effect within ``CACHE_TTL_S`` on every instance. An active token's name is unique.
A callout or hypervisor token may be bound to VMs by shell-style patterns over ``vm_id``
(``fnmatch``, case-sensitive): it then speaks for those VMs only (``Caller.covers``).
"""

from __future__ import annotations

import fnmatch
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from ..core.credentials import api_token_digest
from ..errors import Conflict, InvalidRequest, NotFound
from ..pg.connections import acquire

ROLES = ("callout", "hypervisor", "analyst", "admin", "witness")
BINDABLE_ROLES = ("callout", "hypervisor")
PREFIX = "rgt_"
CACHE_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class Caller:
    token_id: str
    name: str
    role: str
    vm_patterns: tuple[str, ...] = ()  # empty: every VM

    def covers(self, vm_id: str) -> bool:
        """Whether this caller may speak for ``vm_id``."""
        return not self.vm_patterns or any(fnmatch.fnmatchcase(vm_id, p) for p in self.vm_patterns)


def check_patterns(role: str, patterns: Sequence[str]) -> tuple[str, ...]:
    """VM patterns as stored; only callout and hypervisor tokens can be bound."""
    if patterns and role not in BINDABLE_ROLES:
        raise InvalidRequest(f"only {' and '.join(BINDABLE_ROLES)} tokens can be bound to VMs", field="vm")
    for pattern in patterns:
        if not 1 <= len(pattern) <= 256 or not pattern.isprintable():
            raise InvalidRequest("a VM pattern must be 1 to 256 printable characters", field="vm")
    return tuple(dict.fromkeys(patterns))


class ApiTokens:
    def __init__(self, pool: asyncpg.Pool, pepper: bytes) -> None:
        self._pool = pool
        self._pepper = pepper
        self._cache: dict[bytes, tuple[float, Caller | None]] = {}

    async def create(self, role: str, name: str, vm_patterns: Sequence[str] = ()) -> tuple[str, str]:
        """Creates a token; returns (token id, the token itself, shown this once)."""
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", field="role")
        if not 1 <= len(name) <= 256 or not name.isprintable():
            raise InvalidRequest("name must be 1 to 256 printable characters", field="name")
        patterns = check_patterns(role, vm_patterns)
        token = PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_urlsafe(9)
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
        """Revokes the active token with this id or name (names are unique among active tokens)."""
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(
                "UPDATE api_tokens SET revoked_at = now() WHERE (id = $1 OR name = $1)"
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
        if hit is not None and hit[0] > now:
            return hit[1]
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
        self._cache[digest] = (now + CACHE_TTL_S, caller)
        return caller
