"""Alerts for analysts: filtered listing, detail with its evidence, acknowledgement.

Listing is a keyset walk newest first by ``id`` behind an opaque cursor: a new alert takes
a higher id, so it never shifts a page the client has not read yet (nothing skipped,
nothing repeated, no OFFSET). Every filter has an index that ends in ``id``. An
acknowledgement is itself a ledger entry (``alert_ack``) naming the caller's token id and
name; every acknowledgement is kept (``alert_acks``), the alert shows the latest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ..core import cursors, validation
from ..core.timefmt import rfc3339_us, to_us
from ..errors import InvalidRequest, NotFound
from ..pg.connections import acquire
from .apitokens import Caller
from .entries import Recorded, unheard, written

SEVERITIES = ("info", "warning", "critical")
STATUSES = ("open", "acknowledged")
MAX_NOTE = 2000
MAX_ENTRIES = 500
MAX_EVENTS = 100
MAX_HISTORY = 200
_CURSOR = re.compile(r"^(\d{1,19})$")
_NUMBER = re.compile(r"^\d{1,12}(\.\d{1,6})?$")
COLUMNS = ("id, kind, severity, status, vm_id, principal, count, first_seen_us, last_seen_us, updated_us,"
           " summary, details, ack_by, ack_by_name, ack_note, ack_us, change_seq")
# What an alert was raised by, which none of its later changes alters: the first item of its
# history (time, ledger entry, kind, severity), and that entry's hash (``alert_uid``).
RAISED = ("history->0 AS raised,"
          " (SELECT l.hash FROM ledger l WHERE l.seq = (alerts.history->0->>'seq')::bigint) AS raised_hash")


@dataclass(frozen=True, slots=True)
class AlertFilter:
    vm_id: str | None = None
    principal: str | None = None
    kind: str | None = None
    severity: str | None = None
    status: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    limit: int = 50
    before_id: int | None = None


def encode_cursor(key: bytes, alert_id: int) -> str:
    return cursors.issue(key, "alerts", str(alert_id))


def decode_cursor(key: bytes, text: str) -> int:
    """The id a cursor stands for; anything that did not come from ``encode_cursor`` is a 400."""
    match = _CURSOR.match(cursors.open_cursor(key, "alerts", text))
    if match is None or not 0 < int(match.group(1)) < 2**63:
        raise InvalidRequest("cursor is not one this service issued", field="cursor")
    return int(match.group(1))


def query_time(query: Mapping[str, str], name: str) -> int | None:
    """``since``/``until``: RFC 3339 or Unix seconds (CONTRACT §3), as microseconds."""
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    value: object = float(raw) if _NUMBER.match(raw) else raw
    return to_us(validation.parse_time(value, name))


def _choice(query: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise InvalidRequest(f"{name} must be one of {', '.join(allowed)}", field=name)
    return value


def _ident(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    return None if value is None or value == "" else validation.check_identifier(value, name)


def parse_filter(query: Mapping[str, str], limit: int, cursor_key: bytes) -> AlertFilter:
    """The list's query string as a filter; every bad parameter is a 400 naming it."""
    cursor = query.get("cursor")
    return AlertFilter(
        vm_id=_ident(query, "vm_id"), principal=_ident(query, "principal"), kind=_ident(query, "kind"),
        severity=_choice(query, "severity", SEVERITIES), status=_choice(query, "status", STATUSES),
        since_us=query_time(query, "since"), until_us=query_time(query, "until"), limit=limit,
        before_id=decode_cursor(cursor_key, cursor) if cursor else None,
    )


def where_clause(f: AlertFilter) -> tuple[str, list[Any]]:
    """SQL conditions and their parameters; ``since``/``until`` select alerts active then."""
    conditions: list[str] = []
    params: list[Any] = []
    pairs = (("vm_id = ", f.vm_id), ("principal = ", f.principal), ("kind = ", f.kind),
             ("severity = ", f.severity), ("status = ", f.status), ("last_seen_us >= ", f.since_us),
             ("first_seen_us <= ", f.until_us), ("id < ", f.before_id))
    for condition, value in pairs:
        if value is not None:
            params.append(value)
            conditions.append(f"{condition}${len(params)}")
    return (" WHERE " + " AND ".join(conditions)) if conditions else "", params


def render(record: Mapping[str, Any]) -> dict[str, Any]:
    """An alert as the API shows it; ids are strings, times RFC 3339."""
    ack = None
    if record["ack_us"] is not None:
        ack = {"by": record["ack_by"], "by_name": record["ack_by_name"], "note": record["ack_note"],
               "at": rfc3339_us(record["ack_us"])}
    return {
        "id": str(record["id"]), "kind": record["kind"], "severity": record["severity"],
        "status": record["status"], "vm_id": record["vm_id"], "principal": record["principal"],
        "count": record["count"], "first_seen": rfc3339_us(record["first_seen_us"]),
        "last_seen": rfc3339_us(record["last_seen_us"]), "updated_at": rfc3339_us(record["updated_us"]),
        "summary": record["summary"], "details": record["details"], "acknowledged": ack,
        "change": record["change_seq"],
    }


def content_digest(record: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over a sink record's content (every field but ``id``, keys
    sorted): the same record delivered again has the same digest, a different one another.
    Alert ids, change numbers and checkpoint numbers come from database sequences, which a
    restore (or a failover to a standby behind) winds back; the digest keeps a record id
    from naming two different records then."""
    content = {key: value for key, value in record.items() if key != "id"}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def alert_uid(record: Mapping[str, Any]) -> str:
    """The alert's id and 16 hex digits of SHA-256 over what raised it (``RAISED``: its
    first history item and that ledger entry's hash) and when, about which VM and principal:
    the same for every change of one alert, and another for an alert raised after a restore
    (or a failover to a standby behind) under an id the sequence gave out before. The entry's
    hash chains every entry before it, so another history gives another hash."""
    raised_hash = record["raised_hash"]
    identity = {"id": str(record["id"]), "first_seen_us": record["first_seen_us"], "vm_id": record["vm_id"],
                "principal": record["principal"], "raised": record["raised"],
                "raised_hash": None if raised_hash is None else bytes(raised_hash).hex()}
    digest = hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return f"{record['id']}.{digest}"


def sink_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the external sinks get from a row of ``changes`` (which reads ``RAISED``): the
    alert, typed, with ``alert_uid`` (the OCSF finding's uid) and an id unique per change and
    content (``alert-<alert uid>.<change>.<content digest>``)."""
    body = render(record)
    typed = {**body, "type": "alert", "alert_id": body["id"], "alert_uid": alert_uid(record)}
    return {**typed, "id": f"alert-{typed['alert_uid']}.{body['change']}.{content_digest(typed)}"}


def sink_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint as the sinks get it (``checkpoints.to_json``), its id unique per checkpoint
    and content (``checkpoint-<seq>.<content digest>``)."""
    return {**checkpoint, "id": f"checkpoint-{checkpoint['seq']}.{content_digest(checkpoint)}"}


def render_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """A ledger entry: credentials only ever as their keyed digest, in hex."""
    digest = record["cred_digest"]
    return {
        "seq": record["seq"], "time": rfc3339_us(record["ts_us"]), "kind": record["kind"],
        "vm_id": record["vm_id"], "subject": record["subject"],
        "digest": bytes(digest).hex() if digest is not None else None,
        "decision": record["decision"], "reason": record["reason"], "payload": record["payload"],
        "prev_hash": bytes(record["prev_hash"]).hex(), "hash": bytes(record["hash"]).hex(),
    }


def _history(raw: Any) -> list[dict[str, Any]]:
    items = raw if isinstance(raw, list) else []
    out = []
    for item in items[-MAX_HISTORY:]:
        entry = dict(item) if isinstance(item, dict) else {}
        ts = entry.pop("ts_us", None)
        out.append({"time": rfc3339_us(ts) if isinstance(ts, int) else None, **entry})
    return out


def _event(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"event_id": record["event_id"], "type": record["type"], "vm_id": record["vm_id"],
            "seq": record["seq"], "received_at": rfc3339_us(record["received_us"]), "payload": record["payload"]}


def render_window(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "vm_id": record["vm_id"], "start": rfc3339_us(record["start_us"]),
            "end": rfc3339_us(record["end_us"]), "cause": record["cause"], "event_id": record["event_id"],
            "seq": record["seq"]}


_ENTRIES = ("SELECT * FROM (SELECT l.* FROM alert_entries e JOIN ledger l ON l.seq = e.seq"
            " WHERE e.alert_id = $1 ORDER BY e.seq DESC LIMIT $2) x ORDER BY seq")
_WINDOWS = ("SELECT * FROM rollback_windows WHERE id = $1"
            " OR seq IN (SELECT seq FROM alert_entries WHERE alert_id = $2) ORDER BY id LIMIT 20")
_EVENTS = ("SELECT * FROM hypervisor_events WHERE seq = ANY($1::bigint[])"
           " OR (vm_id = $2 AND received_us BETWEEN $3 AND $4) ORDER BY seq LIMIT $5")


def _window_id(details: Any) -> int | None:
    value = details.get("window_id") if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AlertService:
    def __init__(self, pool: asyncpg.Pool, cursor_key: bytes, on_recorded: Recorded = unheard) -> None:
        self._pool = pool
        self.cursor_key = cursor_key
        self._on_recorded = on_recorded  # the continuity guard's ``recorded`` (entries.py)

    async def search(self, f: AlertFilter) -> tuple[list[dict[str, Any]], str | None]:
        where, params = where_clause(f)
        sql = f"SELECT {COLUMNS} FROM alerts{where} ORDER BY id DESC LIMIT ${len(params) + 1}"  # noqa: S608 - fixed column list and where_clause fragments; values go as $n parameters
        async with acquire(self._pool) as conn:
            records = await conn.fetch(sql, *params, f.limit + 1)
        items = [render(r) for r in records[: f.limit]]
        more = len(records) > f.limit
        return items, encode_cursor(self.cursor_key, records[f.limit - 1]["id"]) if more else None

    async def get(self, alert_id: int) -> dict[str, Any]:
        """The alert, the ledger entries behind it, its rollback windows and their events."""
        async with acquire(self._pool) as conn:
            record = await conn.fetchrow(f"SELECT {COLUMNS}, history FROM alerts WHERE id = $1", alert_id)  # noqa: S608 - fixed column list; the id goes as a parameter
            if record is None:
                raise NotFound("no such alert")
            entries = await conn.fetch(_ENTRIES, alert_id, MAX_ENTRIES)
            total = await conn.fetchval("SELECT count(*) FROM alert_entries WHERE alert_id = $1", alert_id)
            windows = await conn.fetch(_WINDOWS, _window_id(record["details"]), alert_id)
            events = await self._events(conn, windows)
            acks = await conn.fetch(_ACKS, alert_id, MAX_ENTRIES)
        return {**render(record), "history": _history(record["history"]),
                "acknowledgements": [_ack(a) for a in acks],
                "entries": [render_entry(e) for e in entries], "entries_total": total,
                "rollback_windows": [render_window(w) for w in windows], "hypervisor_events": events}

    async def _events(self, conn: asyncpg.Connection, windows: list[asyncpg.Record]) -> list[dict[str, Any]]:
        """Events named by the windows, and every event of the window's VM inside it."""
        found: dict[int, dict[str, Any]] = {}
        named = [w["seq"] for w in windows if w["event_id"] is not None]  # an event's window: its entry
        for w in windows:
            for e in await conn.fetch(_EVENTS, named, w["vm_id"], w["start_us"] or 0, w["end_us"], MAX_EVENTS):
                found.setdefault(e["seq"], _event(e))
        return sorted(found.values(), key=lambda e: e["seq"])[:MAX_EVENTS]

    async def acknowledge(self, alert_id: int, caller: Caller, note: str | None, now_us: int) -> dict[str, Any]:
        """Marks the alert acknowledged and writes who did it, and why, to the ledger."""
        async with acquire(self._pool) as conn, conn.transaction():
            target = await conn.fetchrow("SELECT id, vm_id, principal FROM alerts WHERE id = $1", alert_id)
            if target is None:
                raise NotFound("no such alert")
            seq = await conn.fetchval(
                "SELECT rg_append($1, 'alert_ack', $2, $3, NULL, NULL, NULL, $4::jsonb)",
                now_us, target["vm_id"], target["principal"],
                {"alert_id": str(alert_id), "by": caller.token_id, "by_name": caller.name, "note": note})
            record = await conn.fetchrow(_ACK, alert_id, caller.token_id, note, now_us, seq, caller.name)
            await conn.execute("INSERT INTO alert_acks (seq, alert_id, ts_us, by_id, by_name, note)"
                               " VALUES ($1, $2, $3, $4, $5, $6)", seq, alert_id, now_us, caller.token_id,
                               caller.name, note)
            await conn.execute("INSERT INTO alert_entries VALUES ($1, $2) ON CONFLICT DO NOTHING", alert_id, seq)
            await conn.execute("SELECT pg_notify('replayguard_alerts', $1)", str(alert_id))
            entry = await written(conn, seq)
        self._on_recorded(*entry)
        return {**render(record), "ack_seq": seq}

    async def changes(self, after: int, limit: int, conn: asyncpg.Connection | None = None) -> list[asyncpg.Record]:
        """Alerts changed after ``after`` (the SSE/sink feed), in change order.

        The alert feed passes the connection it keeps, sparing a pool round trip per read.
        """
        query = f"SELECT {COLUMNS}, {RAISED} FROM alerts WHERE change_seq > $1 ORDER BY change_seq LIMIT $2"  # noqa: S608 - fixed column list; values go as $n parameters
        if conn is not None:
            return list(await conn.fetch(query, after, limit))
        async with acquire(self._pool) as pooled:
            records = await pooled.fetch(query, after, limit)
        return list(records)

    async def held_at(self, upto: int | None) -> tuple[int, dict[str, Any] | None]:
        """The database's last change, and the newest change it holds at or below ``upto``
        (None: its last change), rendered (None when it holds none): where a stream stands
        (``core/stream_ids.py``)."""
        async with acquire(self._pool) as conn:
            row = await conn.fetchrow(_HELD_AT, upto)
        return int(row["last"]), None if row["id"] is None else render(row)

    async def held_for(self, change: int, alert_id: int) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None]:
        """The database's last change, the alert it holds at ``change`` and the one it holds
        under ``alert_id`` (rendered; None when it holds none), read together: what a stream
        resumed from an event id is checked against (``core/stream_ids.py``)."""
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(_HELD_FOR, change, alert_id)
        held = [render(row) for row in rows if row["id"] is not None]
        at = next((alert for alert in held if alert["change"] == change), None)
        named = next((alert for alert in held if alert["id"] == str(alert_id)), None)
        return int(rows[0]["last"]), at, named

    async def last_change(self) -> int:
        async with acquire(self._pool) as conn:
            last = await conn.fetchval("SELECT coalesce(max(change_seq), 0) FROM alerts")
        return int(last)


# The last change, and the newest alert change at or below $1 (all of them when it is null).
_HELD_AT = ("SELECT (SELECT coalesce(max(change_seq), 0) FROM alerts) AS last, a.* FROM (VALUES (1)) v"  # noqa: S608 - fixed column list; values go as $n parameters
            f" LEFT JOIN LATERAL (SELECT {COLUMNS} FROM alerts"
            " WHERE change_seq <= coalesce($1::bigint, 9223372036854775807)"
            " ORDER BY change_seq DESC LIMIT 1) a ON true")

# The last change, and the alerts at change $1 and under id $2 (one row, nulls, when neither is held).
_HELD_FOR = ("SELECT (SELECT coalesce(max(change_seq), 0) FROM alerts) AS last, a.* FROM (VALUES (1)) v"  # noqa: S608 - fixed column list; values go as $n parameters
             f" LEFT JOIN LATERAL (SELECT {COLUMNS} FROM alerts WHERE change_seq = $1 OR id = $2) a ON true")


# An acknowledgement joins ``history`` as rg_alert's changes do (migrations/functions/rg_alert.sql):
# at 12 items the oldest after the first (index 1) makes room. The first item stays, since it
# is what raised the alert (``RAISED``, ``alert_uid``); every acknowledgement stays in the
# ledger and in ``alert_acks``.
_ACK = ("UPDATE alerts SET status = 'acknowledged', ack_by = $2, ack_by_name = $6, ack_note = $3, ack_us = $4,"  # noqa: S608 - fixed column list; values go as $n parameters
        " updated_us = $4,"
        " history = CASE WHEN jsonb_array_length(history) >= 12 THEN history - 1 ELSE history END"
        " || jsonb_build_array(jsonb_build_object('ts_us', $4::bigint, 'seq', $5::bigint,"
        " 'change', 'acknowledged', 'by', $2::text, 'by_name', $6::text))"
        f" WHERE id = $1 RETURNING {COLUMNS}")


_ACKS = ("SELECT seq, ts_us, by_id, by_name, note FROM alert_acks WHERE alert_id = $1"
         " ORDER BY seq LIMIT $2")


def _ack(record: Mapping[str, Any]) -> dict[str, Any]:
    """One acknowledgement: who (the token's id and name), when, why, and its ledger entry."""
    return {"by": record["by_id"], "by_name": record["by_name"], "note": record["note"],
            "at": rfc3339_us(record["ts_us"]), "seq": record["seq"]}


def parse_note(body: object) -> str | None:
    """The acknowledgement's optional note: printable text (new lines allowed), bounded."""
    data = validation.require_object(body)
    note = data.get("note")
    if note is None:
        return None
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise InvalidRequest(f"note must be a string of at most {MAX_NOTE} characters", field="note")
    if not note.replace("\n", "").replace("\t", "").isprintable():
        raise InvalidRequest("note must not contain control characters", field="note")
    return note


def parse_alert_id(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise NotFound("no such alert")
    return int(text)
