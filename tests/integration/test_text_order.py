"""Text keys in byte order, whatever the database server's locale (migration 018).

A text column's indexes are ordered by its collation, and a database's default collation is
the server's locale: glibc's or ICU's rules, which change between their releases, and under
which an index built with one version can miss rows when searched with another. Every text
column of the service's tables collates "C", so its keys, its unique indexes and what the
API lists in text order are the same on any server. The differential test runs the same
requests against a database whose default is ICU's en-US (where "a" < "B" and "é" sits
beside "e") and one whose default is "C".
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from replayguard.settings import Secret
from tests.conftest import Api, create_database, drop_database

# The migration runner's own bookkeeping, made by replayguard/pg/schema.py, not by a migration.
RUNNER_TABLES = ("schema_migrations", "schema_functions")

_COLUMNS = """
SELECT c.relname || '.' || a.attname AS name, co.collname AS collation
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_collation co ON co.oid = a.attcollation
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'c') AND a.attnum > 0
  AND NOT a.attisdropped AND c.relname <> ALL($1::text[])
ORDER BY 1
"""
_INDEX_KEYS = """
SELECT i.indexrelid::regclass::text AS index, co.collname AS collation
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid, unnest(i.indcollation) k(coll)
JOIN pg_collation co ON co.oid = k.coll
WHERE c.relnamespace = 'public'::regnamespace AND c.relname <> ALL($1::text[])
"""

VM_IDS = ["b", "B", "a", "A", "vm-10", "vm-9", "_x", "Z", "é", "e", "z"]
PRINCIPALS = ["bob", "Bob", "alice", "Alice", "émile", "eve", "_ops"]


@pytest.fixture
async def icu_and_c() -> AsyncIterator[tuple[str, str]]:
    """Two migrated databases: one whose default collation is ICU's en-US, one whose is "C"."""
    made: list[str] = []
    try:
        made.append(await create_database("rg_text", "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
                                                          " LOCALE 'C.UTF-8'"))
        made.append(await create_database("rg_text", "TEMPLATE template0 LOCALE 'C'"))
        yield made[0], made[1]
    finally:
        for dsn in made:
            await drop_database(dsn)


async def test_every_text_column_and_index_key_collates_c(icu_and_c: tuple[str, str]) -> None:
    """Under a locale whose order differs from bytes, every text column of the service's tables
    and every text field of its composite types (rg_decide's items and answers), and every
    text key of their indexes, collates "C" (a table or type added without it fails here)."""
    conn = await asyncpg.connect(icu_and_c[0])
    try:
        default = await conn.fetchval("SELECT daticulocale FROM pg_database WHERE datname = current_database()")
        columns = await conn.fetch(_COLUMNS, list(RUNNER_TABLES))
        keys = await conn.fetch(_INDEX_KEYS, list(RUNNER_TABLES))
    finally:
        await conn.close()
    assert default == "en-US"
    assert len(columns) > 40, columns  # the query sees the schema's text columns
    assert {"rg_decide_item.vm_id", "rg_decide_result.r_reason"} <= {r["name"] for r in columns}
    assert [r["name"] for r in columns if r["collation"] != "C"] == []
    assert {r["index"] for r in keys} >= {"vms_pkey", "principals_pkey", "ledger_vm_seq", "ledger_vm_accepts",
                                          "alerts_reuse_first_use", "alerts_dedup_key_key"}
    assert [r["index"] for r in keys if r["collation"] != "C"] == []


async def _walk(api: Api, path: str, field: str, role: str) -> list[str]:
    """Every item's ``field`` over the pages of ``path``, two items a page."""
    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await api.get(f"{path}?limit=2{cursor}", role=role)
        assert status == 200, page
        seen += [item[field] for item in page["items"]]
        if page["next_cursor"] is None:
            return seen
        cursor = f"&cursor={quote(page['next_cursor'])}"


async def _requests(api: Api, run: str) -> list[tuple[int, str]]:
    """The same decisions and enrolments on either database; their answers."""
    answers = []
    for vm_id in VM_IDS:
        for _ in range(2):  # a fresh use, then its reuse
            status, body = await api.post("/v1/nonces/consume",
                                          {"vm_id": vm_id, "scope": f"text-{run}", "nonce": f"n-{vm_id}"})
            answers.append((status, body["reason"]))
    for principal in PRINCIPALS:
        await api.enroll(principal)
    return answers


async def test_lists_in_byte_order_on_any_server_locale(
    icu_and_c: tuple[str, str], api_factory: Callable[..., Any],
) -> None:
    """Same requests against an en-US (ICU) database and a "C" one: the same answers, and the VM
    and principal lists page through the same byte order (each cursor resumes where it left)."""
    run = secrets.token_hex(3)
    lists = []
    for dsn in icu_and_c:
        api = await api_factory(database_url=Secret(dsn))
        answers = await _requests(api, run)
        assert answers == [(200, "ok"), (200, "reused")] * len(VM_IDS)
        lists.append((await _walk(api, "/v1/vms", "vm_id", "analyst"),
                      await _walk(api, "/v1/principals", "principal", "admin")))
    assert lists[0] == lists[1]
    vms, principals = lists[0]
    assert vms == sorted(VM_IDS, key=lambda s: s.encode())
    assert principals == sorted(PRINCIPALS, key=lambda s: s.encode())
