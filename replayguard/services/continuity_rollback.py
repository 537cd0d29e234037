"""What the continuity guard finds and reports (CONTRACT §10): a ``Rollback`` (which holder
saw which entry, and where the ledger is), a witness's ``WitnessState`` as last read,
``WitnessRequired``, the refusal while a required witness cannot be read, and ``DOWN``,
the errors met while the database or a part of the service is unavailable, which a check
outlives. The guard's modules and the ledger service share them without importing the guard.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.checkpoints import Checkpoint
from ..core.continuity import Verdict
from ..core.summaries import quoted
from ..errors import Unavailable
from ..pg.connections import UNAVAILABLE_ERRORS

DOWN: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, Unavailable)
# The holders a rollback names besides a witness.
DATABASE = "database checkpoints"
SELF = "this service process"


class WitnessRequired(Unavailable):
    code = "witness_unreachable"


@dataclass(frozen=True, slots=True)
class Rollback:
    """Why decisions stop: which holder saw which entry, and where the ledger is."""

    source: str
    seq: int
    hash: bytes | None  # None: the entry's seq alone was seen (a decision this process answered)
    verdict: Verdict
    head_seq: int
    signed: bool = False  # a held checkpoint's; else a service process's own entry

    @classmethod
    def of(cls, source: str, held: Checkpoint, verdict: Verdict, head_seq: int) -> Rollback:
        return cls(source, held.seq, held.hash, verdict, head_seq, signed=True)

    @property
    def first_bad_seq(self) -> int:
        return self.head_seq + 1 if self.verdict is Verdict.BEHIND else self.seq

    @property
    def holder(self) -> str:
        """The source as a message names it: this process, another one (whose finding names it
        quoted, ``continuity_reports``) and the database's checkpoints in the service's own
        words; a witness by its name, quoted as an alert summary shows a name the service did
        not choose (``core/summaries.py``)."""
        return quoted(self.source) if self.signed and self.source != DATABASE else self.source

    def message(self) -> str:
        if not self.signed and self.hash is not None:
            return (f"the ledger went back in time: {self.holder} knew entry {self.seq} committed, which the "
                    f"ledger no longer holds (another entry took its place, or it ends before it)")
        if self.hash is None:
            return (f"the ledger went back in time: {self.holder} answered a decision at entry {self.seq} "
                    f"but the database's new entries are numbered from {self.head_seq + 1}")
        if self.verdict is Verdict.BEHIND:
            return (f"the ledger went back in time: {self.holder} holds a signed checkpoint of entry "
                    f"{self.seq} but the ledger ends at {self.head_seq}")
        return (f"the ledger forked: {self.holder} holds a signed checkpoint of entry {self.seq} "
                f"with another hash than the ledger's")

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "verdict": self.verdict.value, "head_seq": self.head_seq,
                "held": {"seq": self.seq, "hash": None if self.hash is None else self.hash.hex()}}


@dataclass
class WitnessState:
    up: bool | None = None
    held: Checkpoint | None = None
    verdict: Verdict | None = None
    error: str | None = None

