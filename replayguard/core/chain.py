"""The ledger's hash chain, defined once.

``hash(n) = SHA-256(hash(n-1) || canonical(entry n))`` with 32 zero bytes before the
first entry. ``canonical`` joins the entry's fields with the unit separator (0x1F) as
UTF-8; the payload is PostgreSQL's own text rendering of the ``jsonb`` value, so the
chain covers exactly what is stored. The SQL function ``rg_entry_hash`` mirrors this and
a test recomputes entries written through SQL with this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

GENESIS = bytes(32)
SEPARATOR = "\x1f"


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    ts_us: int
    kind: str
    vm_id: str | None
    subject: str | None
    cred_digest: bytes | None
    decision: str | None
    reason: str | None
    payload_text: str


def canonical(entry: Entry) -> bytes:
    return canonical_of(entry.seq, entry.ts_us, entry.kind, entry.vm_id, entry.subject, entry.cred_digest,
                        entry.decision, entry.reason, entry.payload_text)


def canonical_of(seq: int, ts_us: int, kind: str, vm_id: str | None, subject: str | None,
                 cred_digest: bytes | None, decision: str | None, reason: str | None, payload_text: str) -> bytes:
    """``canonical`` from an entry's fields in ``Entry``'s order, for a reader that checks
    rows without building an ``Entry`` for each."""
    parts = (
        str(seq),
        str(ts_us),
        kind,
        vm_id or "",
        subject or "",
        cred_digest.hex() if cred_digest is not None else "",
        decision or "",
        reason or "",
        payload_text,
    )
    return SEPARATOR.join(parts).encode("utf-8")


def entry_hash(prev_hash: bytes, entry: Entry) -> bytes:
    return hashlib.sha256(prev_hash + canonical(entry)).digest()
