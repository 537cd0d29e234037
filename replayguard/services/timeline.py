"""VMs, their timelines and the raw ledger, as analysts read them.

Each query is a keyset walk of one index (``vms`` by id, ``ledger`` by ``(vm_id, seq)`` or
``seq``) with a bounded page, so its cost does not grow with the ledger. A timeline is the
VM's ledger entries in ledger order — decisions, hypervisor events (snapshots, reverts,
restores, clones), acknowledgements — each with the alerts it raised or joined — and
the VM's rollback windows (newest first, at most ``MAX_WINDOWS``, those overlapping
``since``/``until`` when given), which a clone's or a receipt's window puts on a VM
without an entry of its own.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ..core.timefmt import rfc3339_us
from ..errors import NotFound
from ..pg.connections import acquire
from .alerts import render_entry, render_window

_VMS = (
    "SELECT v.*, (SELECT count(*) FROM alerts a WHERE a.vm_id = v.vm_id AND a.status = 'open') AS open_alerts,"
    " (SELECT count(*) FROM rollback_windows w WHERE w.vm_id = v.vm_id) AS rollbacks"
    " FROM vms v WHERE v.vm_id > coalesce($1::text, '') ORDER BY v.vm_id LIMIT $2"
)
_TIMELINE = (
    "SELECT l.seq, l.ts_us, l.kind, l.subject, l.cred_digest, l.decision, l.reason, l.payload,"
    " (SELECT coalesce(array_agg(e.alert_id ORDER BY e.alert_id), '{}') FROM alert_entries e"
    "   WHERE e.seq = l.seq) AS alert_ids,"
    " h.event_id, h.type AS event_type, h.payload AS event_payload"
    " FROM ledger l LEFT JOIN hypervisor_events h ON h.vm_id = l.vm_id AND h.seq = l.seq"
    " WHERE l.vm_id = $1 AND l.seq > $2 AND ($3::bigint IS NULL OR l.ts_us >= $3)"
    " AND ($4::bigint IS NULL OR l.ts_us <= $4) ORDER BY l.seq LIMIT $5"
)
MAX_WINDOWS = 100
_WINDOWS = (
    "SELECT * FROM rollback_windows WHERE vm_id = $1 AND ($2::bigint IS NULL OR end_us >= $2)"
    " AND ($3::bigint IS NULL OR coalesce(start_us, 0) <= $3) ORDER BY end_us DESC, id DESC LIMIT $4"
)
# Two statements, not "($1 IS NULL OR vm_id = $1)": a generic plan of that cannot use an index.
_LEDGER_ALL = "SELECT * FROM ledger WHERE seq > $1 ORDER BY seq LIMIT $2"
_LEDGER_VM = "SELECT * FROM ledger WHERE vm_id = $2 AND seq > $1 ORDER BY seq LIMIT $3"


def _vm(record: asyncpg.Record) -> dict[str, Any]:
    return {
        "vm_id": record["vm_id"], "first_seen": rfc3339_us(record["first_seen_us"]),
        "last_seen": rfc3339_us(record["last_seen_us"]), "epoch": record["epoch"],
        "refusing": record["refusing"], "refusing_reason": record["refusing_reason"],
        "open_alerts": record["open_alerts"], "rollbacks": record["rollbacks"],
    }


def _timeline_item(record: asyncpg.Record) -> dict[str, Any]:
    digest = record["cred_digest"]
    item: dict[str, Any] = {
        "seq": record["seq"], "time": rfc3339_us(record["ts_us"]), "kind": record["kind"],
        "subject": record["subject"], "digest": bytes(digest).hex() if digest is not None else None,
        "decision": record["decision"], "reason": record["reason"], "details": record["payload"],
        "alert_ids": [str(a) for a in record["alert_ids"]],
    }
    if record["event_id"] is not None:
        item["event"] = {"event_id": record["event_id"], "type": record["event_type"],
                         "payload": record["event_payload"]}
    return item


class TimelineService:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def vms(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        async with acquire(self._pool) as conn:
            records = await conn.fetch(_VMS, after, limit + 1)
        items = [_vm(r) for r in records[:limit]]
        return items, items[-1]["vm_id"] if len(records) > limit else None

    async def timeline(self, vm_id: str, after_seq: int, since_us: int | None, until_us: int | None,
                       limit: int) -> tuple[list[dict[str, Any]], int | None]:
        """One page of the VM's history in ledger order; the second value is the next ``after_seq``."""
        async with acquire(self._pool) as conn:
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM vms WHERE vm_id = $1)", vm_id):
                raise NotFound("no such VM")
            records = await conn.fetch(_TIMELINE, vm_id, after_seq, since_us, until_us, limit + 1)
        items = [_timeline_item(r) for r in records[:limit]]
        return items, items[-1]["seq"] if len(records) > limit else None

    async def windows(self, vm_id: str, since_us: int | None, until_us: int | None) -> list[dict[str, Any]]:
        """The VM's rollback windows, newest first (``start`` null: every earlier use counts)."""
        async with acquire(self._pool) as conn:
            records = await conn.fetch(_WINDOWS, vm_id, since_us, until_us, MAX_WINDOWS)
        return [render_window(r) for r in records]

    async def ledger(self, vm_id: str | None, after_seq: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        async with acquire(self._pool) as conn:
            if vm_id is None:
                records = await conn.fetch(_LEDGER_ALL, after_seq, limit + 1)
            else:
                records = await conn.fetch(_LEDGER_VM, after_seq, vm_id, limit + 1)
        items = [render_entry(r) for r in records[:limit]]
        return items, items[-1]["seq"] if len(records) > limit else None
