"""What the alert feed remembers of the changes it read: enough to tell, by content, whether
a database that went back in time still holds them (``alertfeed.py``'s rewind), and an alert
from another that a restore gave the same id (the leader's alert lines)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from .alerts import content_digest, render

Raised = tuple[int, str | None, str | None]  # when an alert was raised, about which VM and principal


def raised(record: asyncpg.Record) -> Raised:
    return record["first_seen_us"], record["vm_id"], record["principal"]


@dataclass(frozen=True, slots=True)
class Read:
    """The last change of one read of the tail: its number, its alert and that alert's
    content then."""

    change: int
    alert_id: int
    raised: Raised
    digest: str

    @classmethod
    def of(cls, record: asyncpg.Record) -> Read:
        return cls(record["change_seq"], record["id"], raised(record), content_digest(render(record)))

    def same(self, row: asyncpg.Record | None) -> bool:
        """The database still holds this change: its alert as it was read, at its number."""
        return (row is not None and row["id"] is not None and row["change_seq"] == self.change
                and content_digest(render(row)) == self.digest)

    def held(self, row: asyncpg.Record) -> bool:
        """The same, or its alert (raised at the same time) changed again since, numbered after it."""
        if self.same(row):
            return True
        return row["id"] is not None and row["change_seq"] > self.change and raised(row) == self.raised
