"""Recomputing the ledger's chain row by row, and naming the first row that is wrong.

Pure: rows go in (from any source, in ``seq`` order), a ``Finding`` comes out. A deleted
row shows as a gap in ``seq``; a modified row as a hash that its content no longer
gives; a row moved or swapped as a link (``prev_hash``) that does not follow its
predecessor; a rewritten chain (every hash recomputed) as a mismatch with a signed
checkpoint; a truncated tail as a head that names more than the rows hold. State tables
that forgot what the ledger accepted are ``replayguard/services/state_check.py``'s to find.

A checkpoint's signature matters only where the checkpoint disagrees with the chain: one
that agrees vouches for nothing the recomputed hashes do not already show, forged or not,
and one that disagrees is a finding when it is genuine and is set aside as forged when it
is not. So ``genuine`` is asked about disagreeing checkpoints alone, and an intact ledger
costs no signature verification however many checkpoints it has. A forged checkpoint
leaves the chain as sound as it was (``verify`` stays ok), yet someone wrote it to the
database: ``forged_checkpoints`` names it, for the leader's chain sweep to alert.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .chain import GENESIS, Entry, canonical_of, entry_hash


class Problem(str, enum.Enum):
    MISSING = "missing"
    MODIFIED = "modified"
    BROKEN_LINK = "broken_link"
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"
    HEAD_MISMATCH = "head_mismatch"
    MISSING_TAIL = "missing_tail"
    LEDGER_ROLLBACK = "ledger_rollback"
    STATE_MISMATCH = "state_mismatch"  # a state table lacks what an entry implies (replayguard/services/state_check.py)
    # A checkpoint row naming the service's key that disagrees with the chain and whose
    # signature does not hold: not a break of the chain (verification stays ok), but a row
    # someone wrote to the database. Only the chain sweep alerts it (``forged_checkpoints``).
    FORGED_CHECKPOINT = "forged_checkpoint"


@dataclass(frozen=True, slots=True)
class Row:
    entry: Entry
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class Finding:
    seq: int
    problem: Problem
    message: str


def every_checkpoint_genuine(seq: int) -> bool:
    """For checkpoints whose signatures were verified before they reached the checker."""
    return True


@dataclass
class ChainChecker:
    """Feed rows in ``seq`` order from ``start_seq + 1``; stops at the first finding.

    ``checkpoints``: the hashes checkpoints give for the rows about to be fed, by ``seq``
    (a reader that streams them replaces the mapping between calls); ``genuine(seq)``:
    whether the checkpoint at ``seq`` carries a valid signature of the service's key,
    asked only of one that disagrees with the chain (the module's docstring says why).
    ``pinned`` counts the checkpoints the chain agreed with, ``forged`` the disagreeing
    ones that were not genuine (the first at ``first_forged``)."""

    start_seq: int = 0
    start_hash: bytes = GENESIS
    checkpoints: Mapping[int, bytes] = field(default_factory=dict)
    genuine: Callable[[int], bool] = every_checkpoint_genuine
    checked: int = 0
    finding: Finding | None = None
    pinned: int = 0
    forged: int = 0
    first_forged: int | None = None

    def __post_init__(self) -> None:
        self.last_seq = self.start_seq
        self.last_hash = self.start_hash

    def feed(self, row: Row) -> Finding | None:
        if self.finding is None:
            self.finding = self._check(row)
            if self.finding is None:
                self.checked += 1
                self.last_seq, self.last_hash = row.entry.seq, row.hash
        return self.finding

    def feed_fields(self, rows: Iterable[Sequence[Any]]) -> Finding | None:
        """``feed`` for rows given as their fields: ``Entry``'s, in its order, then
        ``prev_hash`` and ``hash`` (a reader's columns, e.g. asyncpg records). A row that
        passes every check (agreeing with its checkpoint, if it has one) is hashed straight
        from its fields; any other row goes through ``feed``, so what is found and said is
        ``feed``'s."""
        if self.finding is not None:
            return self.finding
        sha256, pins = hashlib.sha256, self.checkpoints.get
        last_seq, last_hash, checked, pinned = self.last_seq, self.last_hash, self.checked, self.pinned
        for seq, ts_us, kind, vm_id, subject, digest, decision, reason, payload_text, prev, hash_ in rows:
            pin = pins(seq)
            if (seq == last_seq + 1 and prev == last_hash and (pin is None or pin == hash_)
                    and sha256(prev + canonical_of(seq, ts_us, kind, vm_id, subject, digest, decision, reason,
                                                   payload_text)).digest() == hash_):
                last_seq, last_hash, checked = seq, hash_, checked + 1
                if pin is not None:
                    pinned += 1
                continue
            self.last_seq, self.last_hash, self.checked, self.pinned = last_seq, last_hash, checked, pinned
            entry = Entry(seq, ts_us, kind, vm_id, subject, digest, decision, reason, payload_text)
            if self.feed(Row(entry, prev, hash_)) is not None:
                return self.finding
            last_seq, last_hash, checked, pinned = self.last_seq, self.last_hash, self.checked, self.pinned
        self.last_seq, self.last_hash, self.checked, self.pinned = last_seq, last_hash, checked, pinned
        return None

    def _check(self, row: Row) -> Finding | None:
        seq = row.entry.seq
        expected = self.last_seq + 1
        if seq != expected:
            return Finding(expected, Problem.MISSING, f"entry {expected} is missing (next entry is {seq})")
        if entry_hash(row.prev_hash, row.entry) != row.hash:
            return Finding(seq, Problem.MODIFIED, f"entry {seq} no longer matches its hash: it was modified")
        if row.prev_hash != self.last_hash:
            return Finding(seq, Problem.BROKEN_LINK,
                           f"entry {seq} does not follow entry {seq - 1}: rows were moved, swapped or replaced")
        signed = self.checkpoints.get(seq)
        if signed is None:
            return None
        if signed == row.hash:
            self.pinned += 1
        elif self.genuine(seq):
            return Finding(seq, Problem.CHECKPOINT_MISMATCH,
                           f"entry {seq} differs from its signed checkpoint: history up to it was rewritten")
        else:
            self.forged += 1
            self.first_forged = seq if self.first_forged is None else self.first_forged
        return None

    def finish(self, head_seq: int, head_hash: bytes) -> Finding | None:
        """Compares the end of the rows with ``ledger_head`` and with the newest signed
        checkpoint; call after the last row."""
        if self.finding is None and head_seq != self.last_seq:
            self.finding = Finding(min(head_seq, self.last_seq) + 1, Problem.HEAD_MISMATCH,
                                   f"the ledger head names entry {head_seq} but the rows end at {self.last_seq}")
        elif self.finding is None and head_hash != self.last_hash:
            self.finding = Finding(head_seq, Problem.HEAD_MISMATCH,
                                   f"the ledger head's hash is not that of entry {head_seq}, the last row")
        if self.finding is None:
            self.finding = past_head(max((seq for seq in self.checkpoints if seq > head_seq and self.genuine(seq)),
                                         default=0), head_seq)
        return self.finding


def forged_checkpoints(count: int, first_seq: int | None) -> Finding | None:
    """The checkpoints a check set aside as forged (``ChainChecker.forged``, from
    ``first_forged``), as a finding to alert."""
    if count == 0 or first_seq is None:
        return None
    return Finding(first_seq, Problem.FORGED_CHECKPOINT,
                   f"{count} checkpoint row(s) from entry {first_seq} name the service's key, disagree with the "
                   f"chain and carry no valid signature: someone wrote them to the database (the chain is intact)")


def past_head(signed_seq: int, head_seq: int) -> Finding | None:
    """A signed checkpoint names an entry the ledger no longer has: its tail was cut off
    (or the database went back to an older copy)."""
    if signed_seq <= head_seq:
        return None
    return Finding(head_seq + 1, Problem.MISSING_TAIL,
                   f"a signed checkpoint names entry {signed_seq} but the ledger ends at {head_seq}: "
                   f"entries {head_seq + 1} to {signed_seq} at least are missing")


