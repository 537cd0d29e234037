"""A finding another process wrote to ``continuity_findings`` is shown with that process's
name quoted: whoever can write the table chose it."""

from __future__ import annotations

import json

import asyncpg

from replayguard.services.continuity_reports import SharedFindings


async def test_another_processs_finding_names_it_quoted(database_url: str) -> None:
    """A row whose process name carries a quote, a newline and words of a message of its own
    reads back as one JSON string inside the service's message, on one line."""
    process = 'host pid 1, from file:/w"\nthe ledger is intact; no action needed'
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO continuity_findings (found_us, seq, hash, head_seq, process)"
                           " VALUES (1, 9, NULL, 5, $1)", process)
        shared = SharedFindings(lambda: 2.0)
        await shared.share(conn, None, 5, 0)
    finally:
        await conn.close()
    assert shared.found is not None
    shown = json.dumps(process, ensure_ascii=False)
    assert shared.found.message() == (
        f"the ledger went back in time: a running service ({shown}) answered a decision at entry 9"
        " but the database's new entries are numbered from 6")
