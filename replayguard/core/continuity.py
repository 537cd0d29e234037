"""Ledger continuity: does the database still hold what the witnesses saw it sign?

Pure. A witness holds the newest signed checkpoint it was given ("entry ``seq`` had hash
``hash``"). ``judge`` compares one held checkpoint with the database's ledger; ``admit``
is the rule a witness applies to a new checkpoint. A recorded recovery (``replayguard
ledger accept-rollback``) is a ``Statement`` signed by the checkpoint key: "at ``ts_us``
the chain was continued from entry ``recovery_seq - 1``; everything up to the abandoned
checkpoint that the database does not hold is given up". A held checkpoint that such a
statement covers (not newer than it, not past what it abandoned) no longer counts as a
rollback, and a witness accepts the new chain from it; it keeps the statement, and
refuses from then on any checkpoint the statement covers (the abandoned chain's).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import checkpoints as cps
from .checkpoints import Checkpoint

STATEMENT_DOMAIN = b"replayguard-recovery-v1"


@dataclass(frozen=True, slots=True)
class Statement:
    """A signed record of an accepted rollback (see the module docstring)."""

    recovery_seq: int
    base_hash: bytes
    ts_us: int
    abandoned_seq: int
    abandoned_hash: bytes
    key_id: str
    signature: bytes

    def covers(self, held: Checkpoint) -> bool:
        """True when ``held`` is part of what this recovery gave up (or older)."""
        return held.seq <= self.abandoned_seq and held.ts_us <= self.ts_us


def statement_message(recovery_seq: int, base_hash: bytes, ts_us: int, abandoned_seq: int,
                      abandoned_hash: bytes) -> bytes:
    return STATEMENT_DOMAIN + (f"\n{recovery_seq}\n{base_hash.hex()}\n{ts_us}\n{abandoned_seq}\n"
                               f"{abandoned_hash.hex()}\n").encode("ascii")


def sign_statement(key: Ed25519PrivateKey, recovery_seq: int, base_hash: bytes, ts_us: int,
                   abandoned_seq: int, abandoned_hash: bytes) -> Statement:
    signature = key.sign(statement_message(recovery_seq, base_hash, ts_us, abandoned_seq, abandoned_hash))
    return Statement(recovery_seq, base_hash, ts_us, abandoned_seq, abandoned_hash,
                     cps.key_id(key.public_key()), signature)


def statement_valid(public: Ed25519PublicKey, st: Statement) -> bool:
    try:
        public.verify(st.signature, statement_message(st.recovery_seq, st.base_hash, st.ts_us,
                                                      st.abandoned_seq, st.abandoned_hash))
    except InvalidSignature:
        return False
    return cps.key_id(public) == st.key_id


def statement_json(st: Statement) -> dict[str, object]:
    return {"recovery_seq": st.recovery_seq, "base_hash": st.base_hash.hex(), "ts_us": st.ts_us,
            "abandoned_seq": st.abandoned_seq, "abandoned_hash": st.abandoned_hash.hex(),
            "key_id": st.key_id, "signature": st.signature.hex()}


def statement_from_json(data: object) -> Statement:
    """Parses ``statement_json``'s form; raises ValueError naming the field at fault."""
    if not isinstance(data, Mapping):
        raise ValueError("a recovery statement must be a JSON object")
    kid = data.get("key_id")
    if not isinstance(kid, str) or not kid:
        raise ValueError("recovery field 'key_id' must be a string")
    return Statement(cps._int(data, "recovery_seq"), cps._hex(data, "base_hash", 32), cps._int(data, "ts_us"),
                     cps._int(data, "abandoned_seq"), cps._hex(data, "abandoned_hash", 32), kid,
                     cps._hex(data, "signature", 64))


class Verdict(str, enum.Enum):
    OK = "ok"
    COVERED = "covered"  # given up by a recorded recovery; the witness still has to hear of it
    BEHIND = "behind"  # the ledger's head is before the witnessed checkpoint
    FORKED = "forked"  # the ledger's entry at the witnessed seq has another hash

    @property
    def rollback(self) -> bool:
        return self in (Verdict.BEHIND, Verdict.FORKED)


def judge(held: Checkpoint, head_seq: int, hash_at: bytes | None, recoveries: Sequence[Statement]) -> Verdict:
    """Compares a held checkpoint with the ledger: ``hash_at`` is the hash of the ledger's
    entry at ``held.seq`` (None when there is none)."""
    if held.seq <= head_seq and hash_at == held.hash:
        return Verdict.OK
    if any(st.covers(held) for st in recoveries):
        return Verdict.COVERED
    return Verdict.BEHIND if held.seq > head_seq else Verdict.FORKED


class Admission(str, enum.Enum):
    ACCEPT = "accept"
    SAME = "same"
    RECOVERY = "recovery"
    STEPS_BACK = "steps_back"
    FORKS = "forks"

    @property
    def refused(self) -> bool:
        return self in (Admission.STEPS_BACK, Admission.FORKS)


def admit(held: Checkpoint | None, new: Checkpoint, recovery: Statement | None,
          held_recovery: Statement | None = None) -> Admission:
    """What a witness does with ``new`` (both signatures already checked by the caller).
    ``held_recovery`` is the recovery statement the witness keeps with ``held``: a
    checkpoint it covers belongs to the chain that recovery gave up, so it is refused
    whatever its seq (held again, the recovery would cover it, and a chain restored
    later would be taken over it). Every checkpoint of the new chain is signed after
    the recovery's time, so none of them is covered."""
    if held is None:
        return Admission.ACCEPT
    if new.seq == held.seq and new.hash == held.hash:
        return Admission.SAME
    if held_recovery is not None and held_recovery.covers(new):
        return Admission.FORKS
    if new.seq > held.seq:
        return Admission.ACCEPT
    if (recovery is not None and recovery.covers(held) and new.seq >= recovery.recovery_seq
            and new.ts_us >= recovery.ts_us):
        return Admission.RECOVERY
    return Admission.STEPS_BACK if new.seq < held.seq else Admission.FORKS


def newest_statement(held: Statement | None, offered: Statement | None) -> Statement | None:
    """The recovery a witness keeps with its new checkpoint: the later of the one it held
    and the one offered, so an offer without one (or with an older one) does not make it
    forget what was given up."""
    if held is None or (offered is not None and offered.ts_us >= held.ts_us):
        return offered
    return held


def checkpoint_valid(public: Ed25519PublicKey, cp: Checkpoint) -> bool:
    return cps.verify(public, cp)


NONCE_SKEW_S = 60  # an issuer's clock may run this far behind the host's


def nonce_before_recovery(issued_at: datetime | None, now_s: float, recovered_at_us: int | None,
                          max_ttl_s: int) -> bool:
    """After a recorded recovery, a nonce the lost range may have consumed is refused:
    one issued before the recovery (give or take ``NONCE_SKEW_S``), or one without
    ``issued_at``, until every nonce of that time has expired (``max_ttl_s``)."""
    if recovered_at_us is None:
        return False
    recovered_s = recovered_at_us / 1e6
    if now_s >= recovered_s + max_ttl_s:
        return False
    return issued_at is None or issued_at.timestamp() < recovered_s + NONCE_SKEW_S
