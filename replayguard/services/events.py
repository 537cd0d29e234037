"""The event service: hypervisor events into the ledger, and the windows they open.

One call ingests the events of one request (a generic event, or the few a native payload
became) in one transaction. For each: the ledger head lock is taken and what the ledger
knows is read (``rg_event_context``); an event id seen before for the same VM is a duplicate
when the body digest matches and a ``Conflict`` when it does not (ids are per VM, so a token
bound to some VMs cannot take another VM's); otherwise the pure core computes the
windows and ``rg_ingest_event`` records everything, reclassifies the replays the new
windows explain and, with ``receipt_reaction = "refuse"``, refuses the reverted, restored
or cloned VM until an administrator clears it. After the commit, the other instances are told (through Redis, when
configured) which alerts the new windows reclassified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from ..core import event_input, windows
from ..core.events import EventType, GenericEvent
from ..errors import Conflict, Forbidden, NotFound
from ..fanout import AlertFanout
from ..pg.connections import acquire
from .apitokens import Caller
from .entries import Recorded, unheard, written

log = structlog.get_logger(__name__)

_CONTEXT = "SELECT rg_event_context($1, $2, $3, $4, $5)"
_INGEST = "SELECT * FROM rg_ingest_event($1, $2::jsonb, $3, $4::jsonb, $5::jsonb, $6)"
_CLEAR = "SELECT * FROM rg_clear_vm($1, $2, $3, $4)"
_WINDOWS_OF = "SELECT * FROM rg_windows_of($1::text[])"  # by the VMs' index, whatever plan a connection kept


@dataclass(frozen=True, slots=True)
class Ingested:
    """What happened to one event."""

    event_id: str
    duplicate: bool
    seq: int
    window_ids: tuple[int, ...] = ()
    reclassified_alerts: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Cleared:
    vm_id: str
    seq: int
    was_refusing: bool
    reason: str | None


def _context(raw: dict[str, Any], received_us: int) -> windows.EventContext:
    ancestors = tuple(windows.Ancestor(vm, int(split)) for vm, split in raw["ancestors"])
    return windows.EventContext(received_us, tuple(int(t) for t in raw["snapshots"]), ancestors)


def _facts(event: GenericEvent, ctx: windows.EventContext) -> dict[str, int | None]:
    """The facts a later event will need: a snapshot's creation time, a clone's split."""
    if event.type is EventType.SNAPSHOT_CREATED:
        # The creation time is snapshot_created_at, else the event's own time (CONTRACT §5:
        # a snapshot.created happened when the snapshot was taken). With neither, it is
        # unknown and recorded as NULL, never as the time the event arrived (the snapshot
        # may be older by any amount): rg_event_context leaves it out, so a revert to it
        # has no known state time and its window covers every earlier use.
        taken = event.snapshot_created_at or event.occurred_at
        return {"snapshot_us": None if taken is None else windows.to_us(taken)}
    if event.type is EventType.VM_CLONED:
        return {"split_us": windows.clone_split(event, ctx)}
    return {}


def _window_json(window: windows.Window) -> dict[str, Any]:
    return {"vm_id": window.vm_id, "start_us": window.start_us, "end_us": window.end_us,
            "cause": window.cause}


async def _windows_of(conn: asyncpg.Connection, vm_ids: Sequence[str]) -> list[windows.Window]:
    rows = await conn.fetch(_WINDOWS_OF, list(vm_ids)) if vm_ids else []
    return [windows.Window(r["vm_id"], r["start_us"], r["end_us"], r["cause"]) for r in rows]


class EventService:
    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float], fanout: AlertFanout | None = None,
                 *, refuse_on_rollback: bool, on_recorded: Recorded = unheard) -> None:
        """``refuse_on_rollback`` (``receipt_reaction = "refuse"``): a VM reverted, restored or
        cloned refuses every decision until an administrator clears it (``clear_vm``).
        ``on_recorded``: told the last entry (seq, hash) of each request's committed events,
        and each VM clear's (the continuity guard's ``recorded``: a database that loses them
        is noticed)."""
        self._pool = pool
        self._clock = clock
        self._fanout = fanout
        self._refuse = refuse_on_rollback
        self._on_recorded = on_recorded

    async def ingest(self, events: Sequence[GenericEvent], source: str,
                     caller: Caller | None = None) -> list[Ingested]:
        """Records the events of one request atomically; raises ``Conflict`` on a reused id,
        and before anything is written ``InvalidRequest`` for an event no parser may make (a
        VM a clone of itself) and ``Forbidden`` when the caller is not bound to a VM an event
        names."""
        for event in events:
            event_input.check_clone(event)
            for vm_id in (event.vm_id, event.source_vm_id):
                if caller is not None and vm_id is not None and not caller.covers(vm_id):
                    raise Forbidden("this token is not bound to a VM the event names", field="vm_id")
        received_us = int(self._clock() * 1e6)
        newest: tuple[int, bytes] | None = None
        async with acquire(self._pool) as conn, conn.transaction():
            done = [await self._one(conn, event, source, received_us) for event in events]
            if new := [item.seq for item in done if not item.duplicate]:
                newest = await written(conn, max(new))
        if newest is not None:
            self._on_recorded(*newest)
        await self._publish(done)
        for item in done:
            log.info("hypervisor_event", event_id=item.event_id, source=source, duplicate=item.duplicate,
                     windows=len(item.window_ids), reclassified=len(item.reclassified_alerts))
        return done

    async def _one(self, conn: asyncpg.Connection, event: GenericEvent, source: str,
                   received_us: int) -> Ingested:
        snap_vm = windows.rolled_back_vm(event) or event.vm_id
        raw = await conn.fetchval(_CONTEXT, event.vm_id, event.event_id, snap_vm, event.snapshot_id or "", snap_vm)
        digest = event_input.body_digest(event)
        existing = raw["existing"]
        if existing is not None:
            if bytes.fromhex(existing["digest"]) != digest:
                raise Conflict(f"event {event.event_id!r} was already received with a different body",
                               field="event_id")
            return Ingested(event.event_id, True, int(existing["seq"]))
        ctx = _context(raw, received_us)
        opened = windows.windows_for(event, ctx)
        if event.type is EventType.VM_CLONED:  # read under the head lock rg_event_context took
            carried = windows.carried_to_source(event, ctx, await _windows_of(conn, [event.vm_id]))
            present = await _windows_of(conn, sorted({w.vm_id for w in carried}))
            opened += windows.not_contained(carried, [*present, *opened])
        record = {**event_input.to_record(event), "source": source}
        row = await conn.fetchrow(_INGEST, received_us, record, digest,
                                  [_window_json(w) for w in opened], _facts(event, ctx), self._refuse)
        assert row is not None  # noqa: S101 - narrows the type for mypy; rg_ingest_event always returns its one row
        return Ingested(event.event_id, False, row["r_seq"], tuple(row["r_windows"]),
                        tuple(row["r_alerts"]))

    async def _publish(self, done: Sequence[Ingested]) -> None:
        """Tells every instance which alerts the new windows reclassified (after the commit)."""
        if self._fanout is None:
            return
        for alert_id in sorted({a for item in done for a in item.reclassified_alerts}):
            await self._fanout.publish_alert(alert_id)

    async def clear_vm(self, vm_id: str, note: str, by: str) -> Cleared:
        """Lifts the refusal of a VM (receipt_reaction 'refuse'); recorded in the ledger."""
        now_us = int(self._clock() * 1e6)
        async with acquire(self._pool) as conn, conn.transaction():
            row = await conn.fetchrow(_CLEAR, vm_id, now_us, note, by)
            if row is None:
                raise NotFound(f"no VM {vm_id!r} is known")
            entry = await written(conn, row["r_seq"])
        self._on_recorded(*entry)
        log.info("vm_cleared", vm_id=vm_id, was_refusing=row["r_was_refusing"])
        return Cleared(vm_id, row["r_seq"], row["r_was_refusing"], row["r_reason"])
