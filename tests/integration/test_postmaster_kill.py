"""PostgreSQL itself crashes: its postmaster SIGKILLed mid-load, then crash recovery.

The service acknowledges an accept only after its commit is durable (synchronous commit,
asserted in test_durability_settings). This test crashes the database server, not the
service: every accept the clients were told about must be in the recovered ledger, the
chain must verify, and each of those credentials must stay spent.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from replayguard.core.credentials import nonce_digest
from tests.conftest import uid
from tests.integration.ledger_check import accepts_by_seq, verify_chain
from tests.integration.owned_servers import OwnedPostgres
from tests.integration.test_chaos import Answer, _pepper, _post, _steady_load, _tokens
from tests.waiting import until

pytestmark = pytest.mark.slow


def _postmaster(pgdata: Path) -> psutil.Process:
    return psutil.Process(int((pgdata / "postmaster.pid").read_text().splitlines()[0]))


async def test_postmaster_sigkilled_mid_load_loses_no_acknowledged_accept(
    tmp_path: Path, owned_pg: OwnedPostgres, service_factory: Callable[..., Any],
) -> None:
    """SIGKILL of the postmaster under nonce load, restart with crash recovery: every acknowledged accept
    is in the recovered ledger with its digest, the chain verifies, and each stays refused."""
    data_dir = tmp_path / "data"
    tokens = await _tokens(data_dir, owned_pg.url, ("callout", "analyst"))
    service = await service_factory(data_dir=data_dir, database_url=owned_pg.url)
    scope, stop = uid("pmkill"), asyncio.Event()
    answers: list[Answer] = []

    def accepted() -> list[Answer]:
        return [a for a in answers if a.decision == "accept"]

    load = asyncio.create_task(_steady_load(service.url, tokens["callout"], scope, stop, answers))
    try:
        await until(lambda: asyncio.sleep(0, len(accepted()) >= 200), "200 accepts before the crash", 60)
        postmaster = _postmaster(owned_pg.server.pgdata)
        backends = postmaster.children(recursive=True)
        os.kill(postmaster.pid, signal.SIGKILL)
        # Orphaned backends notice the postmaster's death and exit; a new postmaster cannot
        # start while they still hold the old shared memory.
        _, alive = await asyncio.to_thread(psutil.wait_procs, [postmaster, *backends], 30)
        assert not alive, alive
        crashed_at = len(answers)
        await asyncio.to_thread(owned_pg.start)  # crash recovery replays the WAL
        restarted_at = len(answers)
        await until(lambda: asyncio.sleep(0, any(a.decision == "accept" for a in answers[restarted_at:])),
                    "an accept after the restart", 60)
    finally:
        stop.set()
        await asyncio.wait_for(load, 60)

    assert service.proc.poll() is None, "the service process had to die to recover"
    acked = accepted()
    assert sum(1 for a in answers[:crashed_at] if a.decision == "accept") >= 200
    pepper = _pepper(data_dir)
    in_ledger = await accepts_by_seq(owned_pg.url)
    lost = [a for a in acked if a.seq is None or in_ledger.get(a.seq) != nonce_digest(pepper, scope, a.nonce.encode())]
    assert lost == [], f"{len(lost)} acknowledged accepts are not in the recovered ledger, e.g. {lost[:3]}"
    assert await verify_chain(owned_pg.url) >= len(acked)
    async with aiohttp.ClientSession() as session:
        again = await asyncio.gather(*(_post(session, f"{service.url}/v1/nonces/consume", tokens["callout"],
                                             {"vm_id": "vm-replay", "scope": scope, "nonce": a.nonce})
                                       for a in acked[-300:]))
    assert {(status, data["decision"]) for status, data in again} == {(200, "reject")}
