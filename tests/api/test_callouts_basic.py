"""Decisions through the HTTP API: the contract's happy paths and its refusals."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pyotp
import pytest

from replayguard.http.radius import ACCEPT_MARKER
from tests.conftest import REPO, Api, metric_values, uid
from tests.waiting import blocked_by, until


async def test_totp_accepted_once_then_reused(api: Api) -> None:
    """A valid TOTP code is accepted once; the same code again is refused as reused."""
    principal = uid("alice")
    token = await api.enroll(principal)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    body = {"vm_id": uid("vm"), "principal": principal, "otp": code}
    status, first = await api.post("/v1/otp/verify", body)
    assert status == 200 and first["decision"] == "accept" and first["reason"] == "ok"
    status, second = await api.post("/v1/otp/verify", body)
    assert status == 200 and second["decision"] == "reject" and second["reason"] == "reused"
    assert second["seq"] > first["seq"]
    assert second["alert_id"]


async def test_metrics_show_the_batching_of_ledger_writes_and_token_reads(api: Api) -> None:
    """/metrics carries the group commit's batch sizes and the token reader's."""
    principal = uid("bob")
    token = await api.enroll(principal)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    status, _ = await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": code})
    assert status == 200
    resp = await api.client.get("/metrics")
    counts = metric_values(await resp.text(), "replayguard_ledger_batch_size_count",
                           "replayguard_token_read_batch_size_count")
    assert counts["replayguard_ledger_batch_size_count"] >= 1
    assert counts["replayguard_token_read_batch_size_count"] >= 1


async def test_metrics_time_every_ledger_transaction_of_decisions(api: Api) -> None:
    """/metrics times each group commit from its send to its answer: one observation per
    batch (as many as the batch-size histogram's), with a positive sum, in the latency buckets."""
    for n in range(3):
        status, _ = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "m", "nonce": f"call-{n}"})
        assert status == 200
    resp = await api.client.get("/metrics")
    values = metric_values(await resp.text(), "replayguard_ledger_call_duration_seconds",
                           "replayguard_ledger_batch_size_count")
    calls = values["replayguard_ledger_call_duration_seconds_count"]
    assert calls >= 3 and calls == values["replayguard_ledger_batch_size_count"]
    assert values["replayguard_ledger_call_duration_seconds_sum"] > 0
    assert values['replayguard_ledger_call_duration_seconds_bucket{le="+Inf"}'] == calls
    assert 'replayguard_ledger_call_duration_seconds_bucket{le="0.0005"}' in values


async def test_api_doc_describes_the_radius_accept_the_service_answers(api: Api) -> None:
    """docs/api.md describes a RADIUS accept as the service answers it: 200 with
    {"control:Tmp-String-0": "replayguard-accept"}, the marker the shipped rlm_rest site
    accepts on (a 204 there is an Access-Reject)."""
    principal = uid("rad")
    secret = (await api.enroll(principal))["secret"]
    body = {"User-Name": {"type": "string", "value": [principal]},
            "User-Password": {"type": "string", "value": [pyotp.TOTP(secret).at(api.clock.now)]},
            "NAS-Identifier": {"type": "string", "value": [uid("nas")]}}
    resp = await api.client.post("/v1/radius/authenticate", json=body, headers=api.auth("callout"))
    assert resp.status == 200 and orjson.loads(await resp.read()) == {"control:Tmp-String-0": ACCEPT_MARKER}
    text = (REPO / "docs" / "api.md").read_text()
    start = text.index("### `POST /v1/radius/authenticate`")
    end = text.find("\n### ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    accept = re.search(r"Accept: \*\*(\d{3})\*\*", section)
    assert accept is not None and int(accept.group(1)) == resp.status, section
    assert ACCEPT_MARKER in section, section


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_a_decision_whose_client_left_is_still_committed(
        api_factory: Callable[..., Any], database_url: str, front: str) -> None:
    """A nonce whose caller closed the connection before its answer (a PAM helper that timed
    out) is still consumed: the service as ``serve`` runs it (either front) carries the
    decision to its end, the ledger holds the accept nobody read, and the nonce presented
    again is refused as reused."""
    api = await api_factory(http_front=front)
    vm_id = uid("vm")
    body = {"vm_id": vm_id, "scope": uid("scope"), "nonce": secrets.token_hex(16)}
    holder, monitor = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")  # the head lock every decision takes
        asking = asyncio.create_task(api.post("/v1/nonces/consume", body))
        await blocked_by(monitor, holder.get_server_pid())  # the decision waits at the ledger
        asking.cancel()  # the client closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        await held.rollback()

        async def accepted() -> list[str]:
            rows = await monitor.fetch("SELECT decision FROM ledger WHERE vm_id = $1 AND kind = 'nonce'", vm_id)
            return [row["decision"] for row in rows]

        assert await until(accepted, "the abandoned decision's ledger entry") == ["accept"]
    finally:
        await holder.close()
        await monitor.close()
    status, again = await api.post("/v1/nonces/consume", body)
    assert status == 200 and (again["decision"], again["reason"]) == ("reject", "reused"), again
