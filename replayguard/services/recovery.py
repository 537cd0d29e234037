"""Recording a ledger rollback the operator accepts (``replayguard ledger accept-rollback``).

One transaction, under the ledger head's lock:

- a signed recovery statement (``core.continuity.Statement``) naming the furthest
  checkpoint the ledger lost, kept in ``ledger_recoveries`` and in the entry;
- the state that must forget nothing the lost range may have recorded: every TOTP
  credential's last step (``otp_credentials``) is raised to the step of the recovery time
  plus the drift window (codes up to then are refused as ``reused``; a TOTP secret first
  enrolled later starts there, ``tokens.TokenStore.enroll``); every HOTP token is
  revoked and its secret's counter put out of reach (it may have moved any distance in
  the lost range: the principal enrols a new secret, the old one enrolled again accepts
  nothing); nonces issued before
  the recovery, or without ``issued_at``, are refused by the decision service for
  ``nonce_max_ttl_s`` (``core.continuity.nonce_before_recovery``);
- the database's own checkpoints past its head (of the lost range) are dropped, their
  values kept in the entry, and so are the findings running services wrote to
  ``continuity_findings`` (the entries they name are given up with the rest);
- one ``ledger_recovery`` entry with all of it, who ran the command and why, and a
  checkpoint signed over that entry, which the witnesses accept from then on.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..core import checkpoints as cps
from ..core import continuity
from ..core.checkpoints import Checkpoint
from ..core.continuity import Verdict
from ..pg.connections import acquire

HOTP_BURNT = 2**62  # an HOTP credential's counter after a recovery: no code of it is accepted again


def operator() -> str:
    """The OS user running the command (and the one sudo was called by, if any)."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    via = os.environ.get("SUDO_USER")
    return f"{via} (as {user})" if via and via != user else user


@dataclass(frozen=True, slots=True)
class Recovery:
    seq: int
    checkpoint: Checkpoint
    payload: dict[str, Any]


def _cp_json(source: str, cp: Checkpoint, verdict: Verdict | None) -> dict[str, Any]:
    return {"holder": source, "seq": cp.seq, "hash": cp.hash.hex(), "ts_us": cp.ts_us,
            "verdict": None if verdict is None else verdict.value}


async def record(pool: asyncpg.Pool, key: Ed25519PrivateKey, held: list[tuple[str, Checkpoint, Verdict | None]],
                 reason: str, who: str, now_us: int, drift_steps: int) -> Recovery:
    """Writes the recovery (see the module docstring); ``held`` must name a rollback."""
    lost = [cp for _, cp, verdict in held if verdict is not None and verdict.rollback]
    abandoned = max(lost, key=lambda cp: cp.seq)
    # The statement covers what it gives up only when it is not older than any of it: a
    # clock behind the one that signed those checkpoints must not leave one uncovered.
    now_us = max(now_us, *(cp.ts_us + 1 for cp in lost))
    async with acquire(pool) as conn, conn.transaction():
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head WHERE id FOR UPDATE")
        statement = continuity.sign_statement(key, head["seq"] + 1, bytes(head["hash"]), now_us,
                                              abandoned.seq, abandoned.hash)
        # The high-water belongs to the credential (migration 010); deleted tokens' secrets
        # too, since the lost range may have used them before the deletion.
        totp = await conn.fetchval(
            "WITH t AS (UPDATE otp_credentials c"
            " SET last_counter = greatest(c.last_counter, $1 / (k.period * 1000000::bigint) + $2)"
            " FROM (SELECT fingerprint, min(period) AS period FROM otp_tokens WHERE type = 'totp'"
            "       GROUP BY fingerprint) k"
            " WHERE c.fingerprint = k.fingerprint RETURNING 1) SELECT count(*) FROM t", now_us, drift_steps)
        hotp = await conn.fetch("UPDATE otp_tokens SET deleted_at = now() WHERE type = 'hotp' AND deleted_at IS NULL"
                                " RETURNING id, principal")
        # Their secrets too: enrolled again they would carry the credential's counter, which
        # the lost range may have moved any distance. The counter goes out of reach.
        await conn.execute("UPDATE otp_credentials c SET last_counter = $1 FROM (SELECT DISTINCT fingerprint"
                           " FROM otp_tokens WHERE type = 'hotp') k WHERE c.fingerprint = k.fingerprint",
                           HOTP_BURNT)
        dropped = await conn.fetch("DELETE FROM checkpoints WHERE seq > $1 RETURNING seq, hash, ts_us", head["seq"])
        # What running services found by themselves is given up with the rest (``held``
        # names it): the finding is answered.
        findings = await conn.fetch("DELETE FROM continuity_findings RETURNING seq, hash, head_seq, process, found_us")
        await conn.execute("UPDATE sink_feed SET checkpoint_seq = least(checkpoint_seq, $1)", head["seq"])
        payload = {
            "who": who, "reason": reason,
            "database_head": {"seq": head["seq"], "hash": bytes(head["hash"]).hex()},
            "witnessed": [_cp_json(*h) for h in held],
            "abandoned": {"seq": abandoned.seq, "hash": abandoned.hash.hex()},
            "dropped_checkpoints": [{"seq": r["seq"], "hash": bytes(r["hash"]).hex(), "ts_us": r["ts_us"]}
                                    for r in dropped],
            "service_findings": [{"seq": r["seq"], "hash": None if r["hash"] is None else bytes(r["hash"]).hex(),
                                  "head_seq": r["head_seq"], "process": r["process"], "found_us": r["found_us"]}
                                 for r in findings],
            "totp_credentials_raised": totp,
            "hotp_tokens_revoked": [{"token_id": r["id"], "principal": r["principal"]} for r in hotp],
            "statement": continuity.statement_json(statement),
        }
        seq = await conn.fetchval(
            "SELECT rg_append($1, 'ledger_recovery', NULL, NULL, NULL, NULL, NULL, $2::jsonb)", now_us, payload)
        await conn.execute("INSERT INTO ledger_recoveries VALUES ($1, $2, $3::jsonb)", seq, now_us,
                           continuity.statement_json(statement))
        entry_hash = bytes(await conn.fetchval("SELECT hash FROM ledger WHERE seq = $1", seq))
        cp = cps.sign(key, seq, entry_hash, now_us)
        await conn.execute("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5)",
                           cp.seq, cp.hash, cp.ts_us, cp.key_id, cp.signature)
    return Recovery(seq, cp, payload)
