"""What the continuity guard writes down for others (CONTRACT §10): the worst rollback a
process found, in ``continuity_findings``, which every instance's check reads (so every
instance stops, and a restart remembers), and its alerts: a critical ``ledger_rollback``
once per held checkpoint and a ``witness_unreachable`` once per outage of a witness.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import structlog

from ..core.continuity import Verdict
from ..core.summaries import quoted
from ..pg.connections import acquire
from .continuity_rollback import DOWN, SELF, Rollback, WitnessState

log = structlog.get_logger(__name__)


def _shown(name: str) -> str:
    """A holder's name without userinfo, query or fragment (a witness URL may carry credentials)."""
    if not name.startswith(("http://", "https://")):
        return name
    parts = urlsplit(name)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"



class SharedFindings:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.written: tuple[int, bytes | None] | None = None  # the finding this process last wrote
        self.found: Rollback | None = None  # the newest finding in continuity_findings

    async def share(self, conn: asyncpg.Connection, mine: Rollback | None, head_seq: int, since: int) -> None:
        """Writes ``mine``, this process's worst finding (its own, or a held checkpoint the
        ledger lost), to ``continuity_findings`` once, and reads the newest one there
        (another instance's, or one from before a restart). A finding made before the
        newest recovery (at ``since``: a check that read the ledger just before the
        recovery committed) is answered by that recovery: it is not read."""
        if mine is not None and (mine.seq, mine.hash) != self.written:
            process = f"{socket.gethostname()} pid {os.getpid()}"
            if mine.source != SELF:
                process += f", from {_shown(mine.source)}"
            await conn.execute(
                "INSERT INTO continuity_findings (found_us, seq, hash, head_seq, process)"
                " SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM continuity_findings"
                " WHERE seq = $2 AND hash IS NOT DISTINCT FROM $3 AND head_seq >= $6)",
                int(self._clock() * 1e6), mine.seq, mine.hash, head_seq, process, since)
            self.written = (mine.seq, mine.hash)
        row = await conn.fetchrow("SELECT seq, hash, process FROM continuity_findings WHERE head_seq >= $1"
                                  " ORDER BY seq DESC LIMIT 1", since)
        # The process's name as the row holds it, quoted: whoever can write the table chose it.
        self.found = None if row is None else Rollback(
            f"a running service ({quoted(row['process'])})", row["seq"],
            None if row["hash"] is None else bytes(row["hash"]),
            Verdict.BEHIND if row["seq"] > head_seq else Verdict.FORKED, head_seq)


class ContinuityAlerts:
    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float], required: bool,
                 states: dict[str, WitnessState], head_seq: Callable[[], int]) -> None:
        """``states``: the guard's witnesses as last read; ``head_seq``: the ledger's head as
        its last check read it, recorded with each alert."""
        self._pool, self._clock, self._required, self._states, self._head_seq = pool, clock, required, states, head_seq
        self._alerted: set[str] = set()

    async def _alert(self, kind: str, severity: str, dedup: str, summary: str, details: dict[str, object]) -> None:
        now_us = int(self._clock() * 1e6)
        try:
            async with acquire(self._pool) as conn:
                await conn.fetchval("SELECT rg_alert($1, $2, NULL, NULL, $3, $4, $5, $6, $7::jsonb)",
                                    kind, severity, dedup, now_us, self._head_seq(), summary, details)
        except DOWN as exc:
            log.warning("continuity_alert_not_written", kind=kind, error=type(exc).__name__)
            self._alerted.discard(dedup)

    async def rollback(self, rollback: Rollback) -> None:
        log.critical("ledger_rollback", **rollback.to_json())
        dedup = f"ledger_rollback:{rollback.source}:{rollback.seq}:{(rollback.hash or b'').hex()[:16]}"
        await self._alert("ledger_rollback", "critical", dedup, rollback.message(), rollback.to_json())

    async def unreachable(self) -> None:
        for name, state in self._states.items():
            dedup = f"witness_unreachable:{name}"
            if state.up is False and dedup not in self._alerted:
                self._alerted.add(dedup)
                await self._alert("witness_unreachable", "critical" if self._required else "warning", dedup,
                                  f"witness {quoted(name)} cannot be reached: {quoted(state.error)}",
                                  {"witness": name, "error": state.error, "required": self._required})
            elif state.up:
                self._alerted.discard(dedup)
