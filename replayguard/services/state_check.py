"""State agrees with the ledger: the rows decisions read are what the ledger's entries imply.

A decision reads ``spent_nonces`` and ``uses`` (was this nonce or OTP code seen?),
``otp_credentials`` (the highest counter or time step accepted for a secret),
``clock_guard`` (the highest TOTP time accepted, against a host clock going back) and
``principals`` (lockouts). Someone who can write to PostgreSQL can reset these without
touching the hash chain, and the next decision then accepts a used code. For a range of
ledger entries, one query looks for the first entry whose implied state is absent:

- ``spent_nonces``: an accepted nonce has its digest there for good, in a row naming the
  entry (``first_seq``): a nonce whose row was deleted and which was then accepted again
  has a row again, the replay's, and the first accept is named;
- ``uses``: an accepted OTP has its ``uses`` row, naming the entry, while the expiry it
  was ledgered with (``use_expires_us``) is more than ``CLOCK_SLACK_US`` ahead and not
  before ``retention_mark`` (the time purges reached: a purge on an instance whose clock
  is ahead drops it sooner); after that the credential's high-water refuses the code;
- ``otp_credentials``: the high-water of the accepted token's credential is at least the
  accepted step (``counter``);
- ``clock_guard``: for a TOTP accept, a high-water is at least the step's time, or the
  entry's own time for a step accepted ahead of the host's clock (any scope:
  the entry does not name the scope it was accepted under, which follows the keys, and a
  deployment has one; a database that served two key sets must not raise a false alarm);
- ``principals``: a lock an entry set (``locked_until_us``; only a wrong OTP code sets
  one) that has not ended, and that no later ``principal_unlock`` entry lifted, is still
  in place.

The nonces are checked by ``rg_unspent_nonce`` (migrations/functions): it reads the pages
of ``spent_nonces`` that hold the range's rows in one pass, matches them with the entries
by entry and digest, and looks up by key only an entry the pass did not match; the lookup
alone decides. It answers as a lookup for every entry does
(tests/integration/test_state_check_nonce_pass.py), for a few dozen page reads a range
where the lookups read four buffers a nonce.

What is deliberately not checked (failure counts, entries from before these payload fields
existed) is in SECURITY.md, "State agrees with the ledger". A finding names the entry, the
table and the key's digest (a keyed digest or a fingerprint already stored; a principal's
name is hashed), never a credential.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import asyncpg

from ..core.ledger_check import Finding, Problem
from ..core.state_schedule import SLICE

STATE_BATCH = SLICE  # ledger entries per query
# A purge on another instance with its clock ahead of ours may drop a use a little before
# our clock says it expired: only rows due to stay longer than this are required.
CLOCK_SLACK_US = 300 * 1_000_000

_CHECK_TEMPLATE = """
WITH e AS (
    SELECT seq, ts_us, kind, subject, cred_digest, decision, payload FROM ledger
    WHERE seq > $1::bigint AND seq <= $2::bigint
      AND kind = 'otp' AND (decision = 'accept' OR payload ? 'locked_until_us')
)
SELECT * FROM (
    (SELECT f.r_seq AS seq, 'spent_nonces' AS tbl, f.r_key AS key FROM rg_unspent_nonce($1::bigint, $2::bigint) f)
    UNION ALL
    (SELECT e.seq, 'uses', e.cred_digest FROM e
     WHERE e.decision = 'accept' AND e.kind = 'otp' AND e.cred_digest IS NOT NULL
       AND {use_expires_us} > $3::bigint + $5::bigint
       AND {use_expires_us} >= coalesce((SELECT purged_before_us FROM retention_mark), 0)
       AND NOT EXISTS (SELECT 1 FROM uses u WHERE u.digest = e.cred_digest AND u.first_seq = e.seq)
     ORDER BY e.seq LIMIT 1)
    UNION ALL
    (SELECT e.seq, 'otp_credentials', t.fingerprint FROM e
     JOIN otp_tokens t ON t.id = e.payload->>'token_id'
     LEFT JOIN otp_credentials c ON c.fingerprint = t.fingerprint
     WHERE e.decision = 'accept' AND e.kind = 'otp' AND t.fingerprint IS NOT NULL
       AND (c.fingerprint IS NULL OR c.last_counter < {counter})
     ORDER BY e.seq LIMIT 1)
    UNION ALL
    (SELECT e.seq, 'clock_guard', convert_to($4::text, 'UTF8') FROM e
     JOIN otp_tokens t ON t.id = e.payload->>'token_id'
     WHERE e.decision = 'accept' AND e.kind = 'otp' AND t.type = 'totp'
       AND {counter} IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM clock_guard g
                       WHERE g.high_us >= least({counter}::numeric * t.period * 1000000, e.ts_us))
     ORDER BY e.seq LIMIT 1)
    UNION ALL
    (SELECT e.seq, 'principals', convert_to(e.subject, 'UTF8') FROM e
     WHERE {locked_until_us} > $3::bigint
       AND NOT EXISTS (SELECT 1 FROM principals p WHERE p.name = e.subject
                       AND p.locked_until_us >= {locked_until_us})
       AND NOT EXISTS (SELECT 1 FROM ledger u WHERE u.seq > e.seq AND u.kind = 'principal_unlock'
                       AND u.subject = e.subject)
     ORDER BY e.seq LIMIT 1)
) found ORDER BY seq, tbl LIMIT 1
"""


def _bigint(key: str) -> str:
    """A payload field as bigint, NULL when it is not one: an edited payload (which the
    chain check reports) must not make this query fail."""
    field = f"(e.payload->>'{key}')"
    return f"(CASE WHEN {field} ~ '^-?[0-9]{{1,18}}$' THEN {field}::bigint END)"


_CHECK = _CHECK_TEMPLATE.format(**{key: _bigint(key) for key in ("counter", "use_expires_us", "locked_until_us")})


@dataclass(frozen=True, slots=True)
class Disagreement:
    """The first entry whose implied state is absent: which table, and whose row."""

    seq: int
    table: str
    key_digest: str

    def finding(self) -> Finding:
        return Finding(self.seq, Problem.STATE_MISMATCH,
                       f"{self.table} does not hold what ledger entry {self.seq} implies"
                       f" (key digest {self.key_digest})")

    def to_json(self) -> dict[str, object]:
        return {"seq": self.seq, "table": self.table, "key_digest": self.key_digest}


def key_digest(table: str, key: bytes) -> str:
    """Keyed digests and fingerprints are shown as stored; names and scopes are hashed."""
    if table in ("spent_nonces", "uses", "otp_credentials"):
        return key.hex()
    return hashlib.sha256(key).hexdigest()


async def check_state(conn: asyncpg.Connection, after: int, upto: int, now_us: int,
                      clock_scope: str) -> Disagreement | None:
    """The first disagreement among entries ``after < seq <= upto`` (one query), or None."""
    record = await conn.fetchrow(_CHECK, after, upto, now_us, clock_scope, CLOCK_SLACK_US)
    if record is None:
        return None
    return Disagreement(record["seq"], record["tbl"], key_digest(record["tbl"], bytes(record["key"])))


async def check_state_range(conn: asyncpg.Connection, after: int, upto: int, now_us: int, clock_scope: str,
                            batch: int = STATE_BATCH) -> Disagreement | None:
    """``check_state`` over a long range, ``batch`` entries per query."""
    while after < upto:
        end = min(upto, after + batch)
        found = await check_state(conn, after, end, now_us, clock_scope)
        if found is not None:
            return found
        after = end
    return None
