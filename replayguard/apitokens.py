"""API tokens: bearer credentials of the four roles, stored only as keyed digests.

A presented token is reduced to its digest and looked up; the stored digest is then
compared in constant time. Known tokens are cached for a few seconds, so a revocation
takes effect within ``CACHE_TTL_S`` on every instance.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

import asyncpg

from .core.credentials import api_token_digest
from .db import acquire
from .errors import Conflict, InvalidRequest, NotFound

ROLES = ("callout", "hypervisor", "analyst", "admin", "witness")
PREFIX = "rgt_"
CACHE_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class Caller:
    token_id: str
    name: str
    role: str


class ApiTokens:
    def __init__(self, pool: asyncpg.Pool, pepper: bytes) -> None:
        self._pool = pool
        self._pepper = pepper
        self._cache: dict[bytes, tuple[float, Caller | None]] = {}

    async def create(self, role: str, name: str) -> tuple[str, str]:
        """Creates a token; returns (token id, the token itself, shown this once)."""
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", field="role")
        if not 1 <= len(name) <= 256 or not name.isprintable():
            raise InvalidRequest("name must be 1 to 256 printable characters", field="name")
        token = PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_urlsafe(9)
        try:
            async with acquire(self._pool) as conn:
                await conn.execute(
                    "INSERT INTO api_tokens (id, name, role, digest) VALUES ($1, $2, $3, $4)",
                    token_id, name, role, api_token_digest(self._pepper, token),
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
            rows = await conn.fetch("SELECT id, name, role, created_at, revoked_at FROM api_tokens"
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
                "SELECT id, name, role, digest FROM api_tokens WHERE digest = $1 AND revoked_at IS NULL", digest,
            )
        caller = None
        if row is not None and hmac.compare_digest(bytes(row["digest"]), digest):
            caller = Caller(row["id"], row["name"], row["role"])
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + CACHE_TTL_S, caller)
        return caller
