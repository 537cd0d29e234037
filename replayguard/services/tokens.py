"""OTP tokens: enrolment, encrypted storage of secrets, and a short-lived read cache.

Secrets are stored as AES-256-GCM ciphertext bound to the token id (associated data), so
a ciphertext copied onto another row does not decrypt. Each token names its credential
(``otp_credentials``, by the secret's keyed fingerprint): the counter high-water and the
use digests belong to the credential, so a secret enrolled again, for the same principal
or another, carries every code already accepted. The cache only saves the lookup
round trip: whether a code may still be used is decided by the ledger, which re-checks
that the token is active when it consumes the step. Concurrent cache misses share one
query on a connection kept for it (``TokenReader``), the way decisions share a commit.

Every write to ``otp_tokens`` is announced on ``replayguard_tokens`` (a trigger,
migrations/functions/rg_token_changed.sql); the alert feed's LISTEN connection passes each
announcement to ``changed``, which drops that principal's cached tokens. A list read while
that connection listened, with no announcement heard during the read, is therefore
current while the connection keeps answering (``announced.HEARD_WITHIN_S``): once a fresh read has
confirmed that a TOTP code matches none of a principal's tokens, further misses are
refused without reading again, so wrong codes cost what right ones do. When the
connection is down or stuck, a miss is read again at most once a second per principal
(``MISS_RECHECK_S``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import pyotp

from ..aio import running_loop
from ..core.credentials import otp_digest, secret_fingerprint
from ..core.otp import OtpToken
from ..core.validation import EnrollRequest
from ..errors import NotFound, Unavailable
from ..keys import Keys
from ..pg.connections import KeptConnection, acquire
from .announced import Announced
from .entries import Recorded, unheard, written

ISSUER = "replayguard"
CACHE_TTL_S = 300.0
# While token changes are not being heard: after a fresh read confirms that a code matches
# none of a principal's TOTP tokens, more misses for that principal within this many
# seconds are not read again, so a guest sending wrong codes costs one token read a second
# per principal and process, not one per code. A token enrolled through another instance
# within that second counts a second later (one enrolled through this process, and any
# HOTP token, at once).
MISS_RECHECK_S = 1.0
CHANNEL = "replayguard_tokens"
MAX_READ_BATCH = 512
_COLUMNS = ("t.principal, t.id, t.type, t.secret_ct, t.digits, t.period, t.algorithm, c.last_counter,"
            " t.fingerprint FROM otp_tokens t JOIN otp_credentials c ON c.fingerprint = t.fingerprint")
_READ = (f"SELECT {_COLUMNS}"
         " WHERE t.principal = ANY($1::text[]) AND t.deleted_at IS NULL ORDER BY t.principal, t.created_at, t.id")
# A lone miss (the usual case at low load) asks by equality: PostgreSQL keeps one generic
# plan for it, where ``= ANY($1)`` is planned afresh at every call (~0.15 ms).
_READ_ONE = (f"SELECT {_COLUMNS}"
             " WHERE t.principal = $1 AND t.deleted_at IS NULL ORDER BY t.created_at, t.id")
# The OTP uses accepted by the given tokens, with the counter (or step) each consumed.
_USES_OF_TOKENS = ("SELECT u.digest, l.payload->>'token_id' AS token_id, (l.payload->>'counter')::bigint AS counter"
             " FROM uses u JOIN ledger l ON l.seq = u.first_seq"
             " WHERE u.kind = 'otp' AND l.payload->>'token_id' = ANY($1::text[]) AND l.payload ? 'counter'"
             " ORDER BY u.first_seq")
# A credential ($1) merged into another ($2): the greater high-water, and each use again under $2's digest.
_MERGE_CREDENTIAL = ("INSERT INTO otp_credentials AS c SELECT $2, last_counter FROM otp_credentials"
                     " WHERE fingerprint = $1 ON CONFLICT (fingerprint)"
                     " DO UPDATE SET last_counter = greatest(c.last_counter, excluded.last_counter)")
# A secret's credential, on its first enrolment. After a recorded recovery, a TOTP one starts
# at the step of the latest recovery's time plus the drift window, as the recovery raised
# every credential the database knew: the lost range may have accepted codes of a secret
# whose enrolment it lost too, and the secret enrolled again must refuse them. The time is
# the ``ledger_recovery`` entry's (under the hash chain; index of migration 044). ($2: the
# TOTP period, NULL for HOTP, whose counter no time bounds; $3: the drift steps.)
_NEW_CREDENTIAL = ("INSERT INTO otp_credentials (fingerprint, last_counter)"
                   " SELECT $1, coalesce(max(ts_us) / ($2::int * 1000000::bigint) + $3::int, -1) FROM ledger"
                   " WHERE kind = 'ledger_recovery' ON CONFLICT DO NOTHING")
_COPY_USE = ("INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)"
             " SELECT $2, kind, vm_id, subject, first_seq, first_ts_us, expires_us FROM uses WHERE digest = $1"
             " ON CONFLICT (digest) DO NOTHING")


@dataclass(frozen=True, slots=True)
class Enrolled:
    token_id: str
    secret_b32: str
    provisioning_uri: str
    type: str


def provisioning_uri(principal: str, secret_b32: str, req: EnrollRequest, counter: int = 0) -> str:
    """An ``otpauth://`` URI that authenticator apps accept."""
    if req.type == "totp":
        return pyotp.TOTP(secret_b32, digits=req.digits, interval=req.period).provisioning_uri(
            name=principal, issuer_name=ISSUER,
        ) + ("" if req.algorithm == "SHA1" else f"&algorithm={req.algorithm}")
    return pyotp.HOTP(secret_b32, digits=req.digits).provisioning_uri(
        name=principal, issuer_name=ISSUER, initial_count=counter,
    ) + ("" if req.algorithm == "SHA1" else f"&algorithm={req.algorithm}")


def _encrypt(keys: Keys, token_id: str, secret_b32: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + keys.aead().encrypt(nonce, secret_b32.encode(), token_id.encode())


def _decrypt(keys: Keys, token_id: str, blob: bytes) -> str:
    return keys.aead().decrypt(blob[:12], blob[12:], token_id.encode()).decode()


class TokenReader:
    """Reads principals' active tokens; misses that arrive together share one query.

    A lone miss is read at once; while a read is in flight, newer misses wait and go
    together in the next one (at most ``MAX_READ_BATCH`` principals each), on one kept
    connection. A read that fails fails its waiters with ``Unavailable``.
    """

    def __init__(self, pool: asyncpg.Pool, on_read: Callable[[int], None] | None = None) -> None:
        self._conn = KeptConnection(pool)
        self._on_read = on_read
        self._waiting: dict[str, asyncio.Future[list[asyncpg.Record]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def read(self, principal: str) -> list[asyncpg.Record]:
        future = self._waiting.get(principal)
        if future is None:
            future = running_loop().create_future()
            self._waiting[principal] = future
            if self._task is None:
                self._task = asyncio.create_task(self._drain())
        # shield: one waiter giving up must not cancel the read for the others
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                names = list(self._waiting)[:MAX_READ_BATCH]
                batch = {name: self._waiting.pop(name) for name in names}
                try:
                    rows = await self._fetch(names)
                except BaseException as exc:
                    error = exc if isinstance(exc, Unavailable) else Unavailable("the token read failed")
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                found: dict[str, list[asyncpg.Record]] = {}
                for row in rows:
                    found.setdefault(row["principal"], []).append(row)
                for name, future in batch.items():
                    if not future.done():
                        future.set_result(found.get(name, []))
        finally:
            self._task = None

    async def _fetch(self, names: list[str]) -> list[asyncpg.Record]:
        if self._on_read is not None:
            self._on_read(len(names))
        if len(names) == 1:
            return await self._conn.fetch("token_read", _READ_ONE, names[0])
        return await self._conn.fetch("token_read", _READ, names)

    async def close(self) -> None:
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        await self._conn.release()


class _Cached(NamedTuple):
    read_at: float  # time.monotonic() when the read was asked for
    tokens: list[OtpToken]
    clean: bool  # no token change was announced while it was read


class TokenStore(Announced):
    def __init__(self, pool: asyncpg.Pool, keys: Keys, on_read: Callable[[int], None] | None = None,
                 *, drift_steps: int) -> None:
        super().__init__()
        self.on_recorded: Recorded = unheard  # the continuity guard's ``recorded`` (entries.py)
        self._pool = pool
        self._keys = keys
        self._drift_steps = drift_steps  # TOTP steps accepted either side of now (_NEW_CREDENTIAL)
        self._cache: dict[str, _Cached] = {}
        self._misses: dict[str, float] = {}  # principal: when a fresh read last confirmed a miss
        self._reader = TokenReader(pool, on_read)

    # --- announcements of token changes on CHANNEL (the alert feed's LISTEN connection) --

    def changed(self, principal: str) -> None:
        """A change to ``principal``'s tokens was announced ('': to anyone's)."""
        self._changes += 1
        if principal:
            self._forget(principal)
        else:
            self._cache.clear()
            self._misses.clear()

    def current(self, principal: str, tokens: list[OtpToken]) -> bool:
        """Whether ``tokens`` is ``principal``'s cached list, and no change to it can have gone unheard."""
        hit = self._cache.get(principal)
        return hit is not None and hit.tokens is tokens and hit.clean and self._heard_since(hit.read_at)

    async def close(self) -> None:
        await self._reader.close()

    async def enroll(self, principal: str, req: EnrollRequest, now_us: int) -> Enrolled:
        secret_b32 = req.secret or base64.b32encode(secrets.token_bytes(20)).decode()
        token_id = "otp_" + secrets.token_urlsafe(12)
        blob = _encrypt(self._keys, token_id, secret_b32)
        fingerprint = secret_fingerprint(self._keys.pepper, req.type, req.algorithm, req.period, secret_b32)
        payload = {"token_id": token_id, "type": req.type, "digits": req.digits,
                   "period": req.period, "algorithm": req.algorithm}
        async with acquire(self._pool) as conn, conn.transaction():
            await conn.execute(_NEW_CREDENTIAL, fingerprint, req.period if req.type == "totp" else None,
                               self._drift_steps)
            # A secret enrolled again keeps its credential's high-water: an HOTP authenticator
            # is provisioned at the first counter the ledger will still accept.
            spent = await conn.fetchval("SELECT last_counter FROM otp_credentials WHERE fingerprint = $1",
                                        fingerprint)
            await conn.execute(
                "INSERT INTO otp_tokens (id, principal, type, secret_ct, digits, period, algorithm, fingerprint)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                token_id, principal, req.type, blob, req.digits, req.period, req.algorithm, fingerprint,
            )
            seq = await conn.fetchval(
                "SELECT rg_append($1, 'enroll', NULL, $2, NULL, NULL, NULL, $3::jsonb)",
                now_us, principal, payload,
            )
            entry = await written(conn, seq)
        self.on_recorded(*entry)
        self._forget(principal)
        return Enrolled(token_id, secret_b32, provisioning_uri(principal, secret_b32, req, counter=spent + 1), req.type)

    async def listing(self, principal: str) -> list[dict[str, Any]]:
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(
                "SELECT id, type, digits, period, algorithm, created_at FROM otp_tokens"
                " WHERE principal = $1 AND deleted_at IS NULL ORDER BY created_at, id", principal,
            )
        return [
            {"token_id": r["id"], "type": r["type"], "digits": r["digits"],
             **({"period": r["period"]} if r["type"] == "totp" else {}),  # HOTP counts, it has no period
             "algorithm": r["algorithm"], "created_at": r["created_at"]}
            for r in rows
        ]

    async def delete(self, principal: str, token_id: str, now_us: int) -> None:
        async with acquire(self._pool) as conn, conn.transaction():
            # The ledger head first, as rg_decide takes it before the token's row: taking
            # them the other way round would deadlock against a login with this token.
            await conn.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")
            row = await conn.fetchrow(
                "UPDATE otp_tokens SET deleted_at = now() WHERE id = $1 AND principal = $2"
                " AND deleted_at IS NULL RETURNING id", token_id, principal,
            )
            if row is None:
                raise NotFound("no such token for this principal")
            seq = await conn.fetchval(
                "SELECT rg_append($1, 'token_deleted', NULL, $2, NULL, NULL, NULL, $3::jsonb)",
                now_us, principal, {"token_id": token_id},
            )
            entry = await written(conn, seq)
        self.on_recorded(*entry)
        self._forget(principal)

    def _forget(self, principal: str) -> None:
        self._cache.pop(principal, None)
        self._misses.pop(principal, None)

    async def active(self, principal: str, *, fresh: bool = False) -> tuple[list[OtpToken], bool]:
        """Active tokens of ``principal``, and whether they came from the cache.

        A cached list is only trusted to say which token a code matches: the ledger
        re-checks that the token is still active when it consumes the step, and a code
        that matches nothing cached is matched again against a fresh read (a token
        enrolled through another instance, or an HOTP counter moved elsewhere). The
        caller reads afresh before using a match in a list that is not ``current``.
        """
        hit = self._cache.get(principal)
        now = time.monotonic()
        if not fresh and hit is not None and hit.read_at + CACHE_TTL_S > now:
            return hit.tokens, True
        changes = self._changes
        rows = await self._reader.read(principal)
        tokens = [
            OtpToken(r["id"], principal, r["type"], _decrypt(self._keys, r["id"], r["secret_ct"]),
                     r["digits"], r["period"], r["algorithm"], r["last_counter"], bytes(r["fingerprint"]).hex())
            for r in rows
        ]
        if len(self._cache) > 100_000:
            self._cache.clear()
        clean = self._changes == changes
        self._misses.pop(principal, None)  # a miss confirmed against an older list says nothing of this one
        # "No token" is cached only while enrolments elsewhere are heard: one counts as soon
        # as its announcement arrives.
        if tokens or (clean and self._heard_since(now)):
            self._cache[principal] = _Cached(now, tokens, clean)
        return tokens, False

    def worth_rereading(self, principal: str, cached: list[OtpToken]) -> bool:
        """Whether a code that matched none of the ``cached`` tokens deserves a fresh read.

        Always for an HOTP token (its counter may have moved through another instance);
        for TOTP tokens, the first miss since the list was read (so a token enrolled
        through another instance a moment ago counts at once); after a fresh read confirmed
        a miss, never while that list is current (read while token changes were heard,
        none heard since), else once MISS_RECHECK_S has passed.
        """
        if any(token.type != "totp" for token in cached):
            return True
        confirmed = self._misses.get(principal)
        if confirmed is None:
            return True
        if self.current(principal, cached):
            return False
        return time.monotonic() - confirmed >= MISS_RECHECK_S

    def miss_confirmed(self, principal: str) -> None:
        """Notes that a code matched none of the principal's tokens as just read."""
        if len(self._misses) > 100_000:
            self._misses.clear()
        self._misses[principal] = time.monotonic()

    def advanced(self, principal: str, credential: str, counter: int) -> None:
        """Notes a counter the ledger just accepted, so HOTP look-ahead starts from it."""
        hit = self._cache.get(principal)
        if hit is None:
            return
        self._cache[principal] = hit._replace(tokens=[
            OtpToken(t.id, t.principal, t.type, t.secret_b32, t.digits, t.period, t.algorithm,
                     max(t.last_counter, counter), t.credential) if t.credential == credential else t
            for t in hit.tokens
        ])

    async def backfill_fingerprints(self) -> int:
        """Gives every token enrolled before migration 010 its credential; returns how many.

        Only the service can compute a fingerprint (the secret is encrypted), so this runs
        at start, before any decision. Under the ledger head lock, in one transaction: each
        such token (deleted ones included) gets its fingerprint, its credential's high-water
        becomes the highest last_counter of the tokens sharing the secret, and the uses it
        recorded under its token id are re-keyed to the credential, so a replay of them
        is still classified (reused, or replay_after_rollback).
        """
        async with acquire(self._pool) as conn, conn.transaction():
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM otp_tokens WHERE fingerprint IS NULL)"):
                return 0
            await conn.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")
            rows = await conn.fetch("SELECT id, type, secret_ct, period, algorithm, last_counter FROM otp_tokens"
                                    " WHERE fingerprint IS NULL ORDER BY created_at, id")
            credential: dict[str, bytes] = {}
            for r in rows:
                secret_b32 = _decrypt(self._keys, r["id"], r["secret_ct"])
                fp = secret_fingerprint(self._keys.pepper, r["type"], r["algorithm"], r["period"], secret_b32)
                credential[r["id"]] = fp
                await conn.execute(
                    "INSERT INTO otp_credentials AS c VALUES ($1, $2) ON CONFLICT (fingerprint) DO UPDATE"
                    " SET last_counter = greatest(c.last_counter, excluded.last_counter)", fp, r["last_counter"])
                await conn.execute("UPDATE otp_tokens SET fingerprint = $2 WHERE id = $1", r["id"], fp)
            await self._rekey_uses(conn, credential)
        self._cache.clear()
        return len(rows)

    async def canonicalize_credentials(self) -> int:
        """Moves every token enrolled before fingerprints named the key HMAC uses (migration
        030 marked them) onto its canonical credential; returns how many tokens moved.

        Runs at start, before any decision, under the ledger head lock, in one transaction.
        The canonical credential's high-water becomes the greatest of the two, and each
        use the old credential recorded (found through its ledger entry's token and
        counter) is recorded again under the canonical credential's digest, beside the old
        row, which the state check still finds under the entry's own digest. Another form
        of the same key enrolled later then finds every code already accepted.
        """
        async with acquire(self._pool) as conn, conn.transaction():
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM otp_tokens WHERE NOT canonical)"):
                return 0
            await conn.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")
            rows = await conn.fetch("SELECT id, type, secret_ct, period, algorithm, fingerprint FROM otp_tokens"
                                    " WHERE NOT canonical AND fingerprint IS NOT NULL")
            moved: dict[str, tuple[bytes, bytes]] = {}  # token id: (its fingerprint, the canonical one)
            for r in rows:
                secret_b32 = _decrypt(self._keys, r["id"], r["secret_ct"])
                canonical = secret_fingerprint(self._keys.pepper, r["type"], r["algorithm"], r["period"], secret_b32)
                if canonical != bytes(r["fingerprint"]):
                    moved[r["id"]] = (bytes(r["fingerprint"]), canonical)
            for old, canonical in set(moved.values()):
                await conn.execute(_MERGE_CREDENTIAL, old, canonical)
            for r in await conn.fetch(_USES_OF_TOKENS, list(moved)):
                old, canonical = moved[r["token_id"]]
                if bytes(r["digest"]) == otp_digest(self._keys.pepper, old.hex(), r["counter"]):
                    await conn.execute(_COPY_USE, bytes(r["digest"]),
                                       otp_digest(self._keys.pepper, canonical.hex(), r["counter"]))
            for token_id, (_, canonical) in moved.items():
                await conn.execute("UPDATE otp_tokens SET fingerprint = $2 WHERE id = $1", token_id, canonical)
            await conn.execute("UPDATE otp_tokens SET canonical = true WHERE NOT canonical AND fingerprint IS NOT NULL")
        self._cache.clear()
        return len(moved)

    async def _rekey_uses(self, conn: asyncpg.Connection, credential: dict[str, bytes]) -> None:
        """Moves uses keyed by token id to the credential's key (the first use wins a clash)."""
        for r in await conn.fetch(_USES_OF_TOKENS, list(credential)):
            new = otp_digest(self._keys.pepper, credential[r["token_id"]].hex(), r["counter"])
            clash = await conn.fetchval("SELECT first_seq FROM uses WHERE digest = $1", new)
            if clash is not None:
                await conn.execute("DELETE FROM uses WHERE digest = $1", bytes(r["digest"]))
                continue
            await conn.execute("UPDATE uses SET digest = $2 WHERE digest = $1", bytes(r["digest"]), new)
