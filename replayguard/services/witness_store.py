"""Being another deployment's witness: hold its newest signed checkpoint, refuse one that
steps back or forks (CONTRACT §10), or that the recovery it holds gave up, and raise an
alert of our own when one is tried.

A deployment is named by its first checkpoint key's id (``core.checkpoints.key_id``), so
the first record names the key (trust on first use) and the key is stored; every later
checkpoint must be signed by that same key, or by a key it handed over to: a record under
another key must carry handovers (``core/handover.py``) that chain from the held key to
the new one, each signed by the key before; the new key is then stored in its place. A
record under another key without them is refused as a forgery and alerted, as is one
whose handovers do not pass through the held key. The handovers are kept with the record
and given back with it (``GET``): a copy of the deployment restored with its keys from
before the rotation recognises the newer key as its own deployment's.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..core import checkpoints as cps
from ..core import continuity
from ..core.checkpoints import Checkpoint
from ..core.continuity import Admission, Statement
from ..core.handover import chain_of, handed_over, handover_json
from ..core.summaries import quoted
from ..errors import Conflict, InvalidRequest
from ..pg.connections import acquire
from .witness import Record, record_from_json

log = structlog.get_logger(__name__)

_HELD = "SELECT * FROM witnessed WHERE deployment_id = $1"


class WitnessRefused(Conflict):
    """409: the checkpoint steps back or forks from what this witness holds."""


def parse_offer(deployment_id: str, payload: Any) -> tuple[Record, Ed25519PublicKey]:
    """The record and its public key; a malformed or misaddressed one is a 400. The
    deployment id is the id of the record's public key, or, with handovers, of the key
    the first one hands over from (whether they hold is ``offer``'s to judge)."""
    try:
        record = record_from_json(payload)
        public = cps.load_public_key(record.public_key_pem.encode())
    except ValueError as exc:
        raise InvalidRequest(f"not a witness record: {exc}") from None
    first = record.handovers[0].old_key_id if record.handovers else cps.key_id(public)
    if record.deployment_id != deployment_id or first != deployment_id:
        raise InvalidRequest("the deployment id must be the id of the record's public key (or, with handovers, of"
                             " the key the first one hands over from)", field="deployment_id")
    return record, public


def _chain_holds(record: Record, public: Ed25519PublicKey) -> bool:
    try:
        chain_of(record.handovers, public)
    except ValueError:
        return False
    return True


def _held(row: asyncpg.Record) -> Checkpoint:
    """The held checkpoint, named by the key it holds (the deployment's first key's id
    until a handover moves it)."""
    key_id = cps.key_id(cps.load_public_key(bytes(row["public_key"])))
    return Checkpoint(row["seq"], bytes(row["hash"]), row["ts_us"], key_id, bytes(row["signature"]))


def _held_recovery(row: asyncpg.Record | None) -> Statement | None:
    """The recovery statement kept with the held checkpoint (its signature was checked
    when it was offered)."""
    if row is None or row["recovery"] is None:
        return None
    try:
        return continuity.statement_from_json(row["recovery"])
    except ValueError:
        return None


def _record(row: asyncpg.Record) -> dict[str, Any]:
    public = cps.load_public_key(bytes(row["public_key"]))
    recovery = row["recovery"]  # jsonb, decoded by the pool's codec
    body = {"deployment_id": row["deployment_id"], "public_key_pem": cps.public_key_pem(public),
            "checkpoint": cps.to_json(_held(row)), "recovery": recovery,
            "first_seen_us": row["first_seen_us"], "updated_us": row["updated_us"]}
    if row["handovers"]:
        body["handovers"] = row["handovers"]  # jsonb, decoded by the pool's codec
    return body


class WitnessStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get(self, deployment_id: str) -> dict[str, Any] | None:
        async with acquire(self._pool) as conn:
            row = await conn.fetchrow(_HELD, deployment_id)
        return None if row is None else _record(row)

    async def offer(self, deployment_id: str, payload: Any, now_us: int) -> dict[str, Any]:
        """Admits the checkpoint or raises ``WitnessRefused`` (after raising an alert)."""
        record, public = parse_offer(deployment_id, payload)
        pem = record.public_key_pem.encode()
        recovery = record.recovery if record.recovery and continuity.statement_valid(public, record.recovery) else None
        refusal: str | None = None
        async with acquire(self._pool) as conn, conn.transaction():
            row = await conn.fetchrow(_HELD + " FOR UPDATE", deployment_id)
            if row is None and record.handovers and not _chain_holds(record, public):
                raise InvalidRequest("the record's key handovers do not chain to its public key", field="handovers")
            if row is not None and bytes(row["public_key"]) != pem and not handed_over(
                    cps.load_public_key(bytes(row["public_key"])), public, deployment_id, record.handovers):
                refusal = ("the checkpoint key is not the one this witness holds for the deployment, nor one that key"
                           " handed over to")
                verdict = Admission.FORKS
            elif not cps.verify(public, record.checkpoint):
                refusal = "the checkpoint's signature does not hold"
                verdict = Admission.FORKS
            else:
                verdict = continuity.admit(None if row is None else _held(row), record.checkpoint, recovery,
                                           _held_recovery(row))
                recovery = continuity.newest_statement(_held_recovery(row), recovery)
            if verdict.refused:
                refusal = refusal or (f"checkpoint {record.checkpoint.seq} {verdict.value.replace('_', ' ')} "
                                      f"from the held checkpoint {row['seq'] if row else 0}")
                await self._alert(conn, deployment_id, record.checkpoint, verdict, refusal, now_us)
            elif verdict is not Admission.SAME or bytes(row["public_key"]) != pem:
                handovers = [handover_json(h) for h in record.handovers] or (None if row is None else row["handovers"])
                await self._store(conn, deployment_id, pem, record.checkpoint, recovery, handovers, now_us)
        if refusal is not None:
            log.error("witness_refused", deployment_id=deployment_id, seq=record.checkpoint.seq, reason=refusal)
            raise WitnessRefused(refusal)
        return {"admission": verdict.value, "seq": record.checkpoint.seq}

    async def _store(self, conn: asyncpg.Connection, deployment_id: str, pem: bytes, cp: Checkpoint,
                     recovery: Statement | None, handovers: Any, now_us: int) -> None:
        """Holds ``cp`` (and the key, the recovery and the handovers that came with it)."""
        rec = None if recovery is None else continuity.statement_json(recovery)
        await conn.execute(
            "INSERT INTO witnessed (deployment_id, public_key, seq, hash, ts_us, signature, recovery,"
            " first_seen_us, updated_us, handovers) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $8, $9::jsonb)"
            " ON CONFLICT (deployment_id) DO UPDATE SET public_key = excluded.public_key, seq = excluded.seq,"
            " hash = excluded.hash,"
            " ts_us = excluded.ts_us, signature = excluded.signature, recovery = excluded.recovery,"
            " updated_us = excluded.updated_us, handovers = excluded.handovers",
            deployment_id, pem, cp.seq, cp.hash, cp.ts_us, cp.signature, rec, now_us, handovers)

    async def _alert(self, conn: asyncpg.Connection, deployment_id: str, cp: Checkpoint, verdict: Admission,
                     why: str, now_us: int) -> None:
        kind = "ledger_rollback" if verdict is Admission.STEPS_BACK else "ledger_tamper"
        head = await conn.fetchval("SELECT seq FROM ledger_head")
        await conn.fetchval(
            "SELECT rg_alert($1, 'critical', NULL, NULL, $2, $3, $4, $5, $6::jsonb)",
            kind, f"witness:{deployment_id}:{kind}:{cp.seq}:{cp.hash.hex()[:16]}", now_us, head,
            f"deployment {quoted(deployment_id)} offered this witness a checkpoint it refused: {why}",
            {"deployment_id": deployment_id, "offered_seq": cp.seq, "offered_hash": cp.hash.hex(),
             "admission": verdict.value})
