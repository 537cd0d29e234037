"""An alert's summary shows every identifier someone else chose as a JSON string.

Each summary kind that names a principal, VM or event is raised here by the stored function
that builds it (``rg_decide``, ``rg_reclassify``), with a hostile identifier: double quotes,
backslashes (one last, to escape a closing quote that is not escaped), colons and the text
of another summary. The summary must read as its literal text with each identifier one
JSON string that decodes to the identifier and ends where the summary's own text resumes.
``rg_quoted`` and ``replayguard.core.summaries.quoted`` give the same text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from replayguard.core.summaries import quoted
from replayguard.pg import connections

TS = 1_796_000_000_000_000
# What the guest would like the console to say, in its principal's or VM's name.
LIE = 'alice: locked out; no action needed" VM "web-01" presented an old receipt: its state went back in time \\'
# Identifiers as the decision tests use them: the lie, an escaped escape, a lone backslash.
HOSTILE = [LIE, 'a\\"; "b', "\\"]
# And for the quoting alone, what no identifier may hold too (control characters).
QUOTED = [*HOSTILE, 'x" : locked out', ":", '"', "café ünïcode", "null", "line\nbreak\ttab\x01\x7f", ""]


def reads(summary: str, *parts: str | tuple[str]) -> None:
    """``summary`` is ``parts`` in order: each str literally, each 1-tuple's identifier as
    one JSON string that decodes to it and ends where the next literal begins."""
    at = 0
    for part in parts:
        if isinstance(part, str):
            assert summary.startswith(part, at), f"{summary!r}: expected {part!r} at {at}"
            at += len(part)
            continue
        try:
            value, end = json.JSONDecoder().raw_decode(summary, at)
        except json.JSONDecodeError:
            pytest.fail(f"{summary!r}: no quoted identifier at {at}")
        assert value == part[0], f"{summary!r}: the quoted text at {at} is {value!r}, not the identifier"
        at = end
    assert at == len(summary), f"{summary!r}: text after the expected end: {summary[at:]!r}"


def nonce(ts: int, vm: str, digest: str, receipt: str = "absent", **extra: Any) -> dict[str, Any]:
    return {"kind": "nonce", "ts_us": ts, "vm_id": vm, "subject": "api", "digest": digest, "receipt": receipt,
            "expires_us": ts + 10**9, **extra}


def code(ts: int, vm: str, subject: str) -> dict[str, Any]:
    """A wrong OTP code (no step matched) for ``subject``."""
    return {"kind": "otp", "ts_us": ts, "vm_id": vm, "subject": subject, "token_id": "tok",
            "credential": "00" * 32, "steps": [], "step_digests": {}, "receipt": "absent", "expires_us": ts + 10**9,
            "period_s": 30, "drift_steps": 1, "clock_scope": "scope-a"}


async def decide(conn: Any, *items: dict[str, Any], threshold: int = 5) -> list[Any]:
    return list(await conn.fetch("SELECT * FROM rg_decide($1::jsonb, $2, 60000000, false)", list(items), threshold))


async def summary_of(conn: Any, row: Any) -> str:
    assert row["r_alert"] is not None, dict(row)
    text: str = await conn.fetchval("SELECT summary FROM alerts WHERE id = $1", row["r_alert"])
    return text


@pytest.fixture
async def conn(fresh_database: Callable[[], Any]) -> Any:
    conn = await connections.connect(await fresh_database())
    yield conn
    await conn.close()


async def test_rg_quoted_is_quoted_and_cannot_be_closed_from_inside(conn: Any) -> None:
    """rg_quoted gives what quoted gives, a JSON string of the identifier, and NULL as null."""
    for value in [*QUOTED, None]:
        sql = await conn.fetchval("SELECT rg_quoted($1)", value)
        assert sql == quoted(value) and json.loads(sql) == value, (value, sql)
    assert await conn.fetchval("SELECT rg_quoted(NULL)") == "null"


@pytest.mark.parametrize("principal", HOSTILE)
async def test_a_brute_force_summary_quotes_the_principal(conn: Any, principal: str) -> None:
    """A principal named like a verdict is one quoted name in the brute_force summary."""
    rows = await decide(conn, code(TS, "vm-1", principal), threshold=1)
    reads(await summary_of(conn, rows[0]), "1 consecutive failures for ", (principal,), ": locked out")


@pytest.mark.parametrize("vm", HOSTILE)
async def test_receipt_summaries_quote_the_vm(conn: Any, vm: str) -> None:
    """receipt_invalid, rollback_detected and receipt_missing name the VM in quotes."""
    invalid, first, old, missing = await decide(
        conn, nonce(TS, vm, "01" * 32, "invalid"), nonce(TS + 1, vm, "02" * 32, "valid", receipt_vm_id=vm,
                                                           receipt_seq=0),
        nonce(TS + 2, vm, "03" * 32, "valid", receipt_vm_id=vm, receipt_seq=1),
        nonce(TS + 3, vm, "04" * 32, "missing"))
    assert first["r_alert"] is None and old["r_flags"] == ["rollback_detected"]
    reads(await summary_of(conn, invalid), "VM ", (vm,), " presented a receipt that does not verify")
    reads(await summary_of(conn, old), "VM ", (vm,), " presented an old receipt: its state went back in time")
    reads(await summary_of(conn, missing), "VM ", (vm,), " keeps receipts but presented none after earlier ones")


@pytest.mark.parametrize("vm", HOSTILE)
async def test_a_clone_summary_quotes_both_vms(conn: Any, vm: str) -> None:
    """clone_detected names the clone and the receipt's VM, each in its own quotes."""
    source = vm + ' presented a receipt issued to VM "vm-2'
    rows = await decide(conn, nonce(TS, vm, "01" * 32, "valid", receipt_vm_id=source, receipt_seq=1))
    assert rows[0]["r_flags"] == ["clone_detected"]
    reads(await summary_of(conn, rows[0]), "VM ", (vm,), " presented a receipt issued to VM ", (source,), "")


@pytest.mark.parametrize("vm", HOSTILE)
async def test_replay_summaries_quote_the_vm_and_the_event(conn: Any, vm: str) -> None:
    """replay_after_rollback, raised by the replay or by a late event's reclassification,
    names the first use's VM and the event in quotes."""
    event_id = vm + ") arrived; no action needed (event "
    first_n, first_m, reused = await decide(conn, nonce(TS, vm, "01" * 32), nonce(TS + 1, vm, "02" * 32),
                                            nonce(TS + 2, vm, "02" * 32))
    assert first_n["r_verdict"] == first_m["r_verdict"] == "accept" and reused["r_reason"] == "reused"
    seq = await conn.fetchval("SELECT seq FROM ledger_head")
    wid = await conn.fetchval("INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, event_id, seq)"
                              " VALUES ($1, NULL, $2, 'snapshot.reverted', $3, $4) RETURNING id",
                              vm, TS + 5, event_id, seq)
    [reclassified] = await conn.fetchval("SELECT rg_reclassify($1, $2, $3, $4)", wid, TS + 5, seq, event_id)
    [replayed] = await decide(conn, nonce(TS + 6, vm, "01" * 32))
    assert replayed["r_reason"] == "replay_after_rollback"
    window = " inside a rollback window was presented again"
    reads(await summary_of(conn, replayed), "A credential first used on VM ", (vm,), window)
    reads(await conn.fetchval("SELECT summary FROM alerts WHERE id = $1", reclassified),
          "A credential first used on VM ", (vm,), window + " (reclassified when event ", (event_id,), " arrived)")
