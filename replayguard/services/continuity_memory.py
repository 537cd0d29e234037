"""What a service process knows of the chain by itself, witnesses or not (CONTRACT §10):
the highest entry it knows committed (``floor``), the last entry of every batch it
committed since the last check, its newest entry and the head the previous check read,
and the rollback it found from them (``seen``). The continuity guard holds one and
consults it at every check and every decision; a recovery that answers its finding
makes it ``forget``.
"""

from __future__ import annotations

from collections import deque

import asyncpg

from ..core.continuity import Verdict
from .continuity_rollback import SELF, Rollback

UNVERIFIED_MAX = 65_536  # batches committed between two checks that are remembered


class ChainMemory:
    def __init__(self) -> None:
        self.floor = 0  # the highest entry this process knows committed
        # The last entry of each batch it committed since the last check, and its hash.
        self.unverified: deque[tuple[int, bytes]] = deque(maxlen=UNVERIFIED_MAX)
        # Compared with the ledger at every check, until a recovery: the newest entry this
        # process committed, and the head the previous check read (seq, hash).
        self.own: tuple[int, bytes] | None = None
        self.head_seen: tuple[int, bytes] | None = None
        self.seen: Rollback | None = None  # a rollback this process found by itself

    def committed(self, seq: int, entry_hash: bytes) -> None:
        """The appender committed a batch whose last entry is ``seq``, with ``entry_hash``:
        the next check that finds another hash there (or none) finds a database that went
        back and on (an instance sharing it decided at that ``seq`` after a restore). Each
        batch is one transaction, so its last entry stands for all of it; every batch is
        checked, since this process's own later batches chain onto whatever the database
        then holds. The newest is kept past its check and compared at every later one."""
        self.unverified.append((seq, entry_hash))
        if self.own is None or seq > self.own[0]:
            self.own = (seq, entry_hash)

    def recorded(self, seq: int, entry_hash: bytes) -> None:
        """This process committed an entry outside the appender (a hypervisor event, an
        enrolment, a token deletion, an unlock, an acknowledgement, a VM clear: see
        ``services.entries``): like a batch, the next check finds it gone, and a decision
        numbered at or below it after a restore is refused at once (``confirm``)."""
        self.committed(seq, entry_hash)
        self.floor = max(self.floor, seq)

    def track(self, head_seq: int, floor: int, own: tuple[int, bytes] | None) -> None:
        """Moves the floor with the head; a head below the floor as it was before the head
        was read, or below the newest entry this process committed by then, went back in
        time under this process."""
        if self.seen is None and head_seq < floor:
            self.seen = Rollback(SELF, floor, None, Verdict.BEHIND, head_seq)
        elif self.seen is None and own is not None and own[0] > head_seq:
            self.seen = Rollback(SELF, own[0], own[1], Verdict.BEHIND, head_seq)
        self.floor = max(self.floor, head_seq)

    async def verify(self, conn: asyncpg.Connection, own: tuple[int, bytes] | None, head_seq: int) -> None:
        """Every entry this process knows committed up to the head must still be the
        ledger's, hash for hash: the last of every batch it committed since the last check,
        its newest one and the head the last check read (kept until a recovery, so an
        entry of any kind put in the place of one of them after a restore is seen). One
        past the head is ``track``'s to judge; the head of an empty ledger (0) is no entry."""
        due = [(seq, entry_hash) for seq, entry_hash in list(self.unverified) if seq <= head_seq]
        known = self.known(own, head_seq)
        if self.seen is not None or not (due or known):
            return
        rows = await conn.fetch("SELECT seq, hash FROM ledger WHERE seq = ANY($1::bigint[])",
                                sorted({seq for seq, _ in due + known}))
        held = {row["seq"]: bytes(row["hash"]) for row in rows}
        for seq, entry_hash in due + known:
            if held.get(seq) != entry_hash:
                self.seen = Rollback(SELF, seq, entry_hash, Verdict.FORKED, head_seq)
                return
        if due:
            verified = due[-1][0]
            while self.unverified and self.unverified[0][0] <= verified:
                self.unverified.popleft()

    def forget(self, head_seq: int) -> None:
        """A recovery answered what this process found: the head starts the floor again."""
        self.seen, self.floor = None, head_seq
        self.unverified.clear()
        self.own = self.head_seen = None

    def known(self, own: tuple[int, bytes] | None, head_seq: int) -> list[tuple[int, bytes]]:
        """The head the last check read and ``own``, the newest entry this process
        committed, where they are entries of a ledger whose head is ``head_seq``."""
        return [pair for pair in (self.head_seen, own) if pair is not None and 0 < pair[0] <= head_seq]
