"""Times: RFC 3339 for every time the API prints; input outside years 1970-9999 is a 400 (issue 15, reproduction 7)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest

from replayguard.core.timefmt import rfc3339_us
from replayguard.core.validation import parse_time
from tests.conftest import Api, uid

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
TIME_KEYS = re.compile(r"(_at|_seen|^time|^at|^since|^until|created|updated)$")


@pytest.mark.parametrize("us, text", [
    (0, "1970-01-01T00:00:00.000000Z"),
    (1_790_000_000_123_456, "2026-09-21T14:13:20.123456Z"),
    (-62_135_596_800_000_000, "0001-01-01T00:00:00.000000Z"),  # year 1: four digits, not "1-01-01"
    (-59_042_995_200_000_000, "0099-01-01T00:00:00.000000Z"),
    (253_402_300_799_999_999, "9999-12-31T23:59:59.999999Z"),
    (10**20, "9999-12-31T23:59:59.999999Z"),  # beyond datetime: printed at the bound, never a failure
])
def test_rfc3339_us_always_prints_rfc3339(us: int, text: str) -> None:
    """Microseconds print as RFC 3339 with a four-digit year, whatever the year."""
    assert rfc3339_us(us) == text
    assert RFC3339.match(text)


@pytest.mark.parametrize("value", [
    "0001-01-01T00:00:00Z", "0999-12-31T23:59:59Z", "1969-12-31T23:59:59Z", "1970-01-01T00:30:00+01:00",
    "9999-12-31T23:59:59-01:00", -1, 253402300800, 1e300,
])
async def test_times_outside_1970_to_9999_are_400(api: Api, value: Any) -> None:
    """issued_at, occurred_at, snapshot_created_at and since/until
    outside years 1970-9999 are a 400 naming the field."""
    status, body = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "t", "nonce": uid("n"),
                                                          "issued_at": value})
    assert (status, body["error"]["field"]) == (400, "issued_at")
    for field in ("occurred_at", "snapshot_created_at"):
        event = {"event_id": uid("evt"), "type": "snapshot.created", "vm_id": uid("vm"), "snapshot_id": "s",
                 field: value}
        status, body = await api.post("/v1/hypervisor/events", event, role="hypervisor")
        assert (status, body["error"]["field"]) == (400, field)
    status, body = await api.get(f"/v1/alerts?since={value}")
    assert (status, body["error"]["field"]) == (400, "since")


async def test_a_leap_second_is_a_time_and_the_moment_after_the_59th(api: Api) -> None:
    """RFC 3339 §5.6 allows second 60: a nonce issued at 23:59:60Z is taken (it was a 400), as
    the next second, and 9999-12-31T23:59:60Z, past the range, is a 400 naming the field."""
    status, body = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "t", "nonce": uid("n"),
                                                          "issued_at": "2016-12-31T23:59:60Z", "ttl_s": 60})
    assert status == 200 and body["reason"] == "expired", body
    assert parse_time("2016-12-31T23:59:60Z", "t") == datetime(2017, 1, 1, tzinfo=UTC)
    assert parse_time("2016-12-31T23:59:60.5+00:00", "t") == datetime(2017, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC)
    status, body = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "t", "nonce": uid("n"),
                                                          "issued_at": "9999-12-31T23:59:60Z"})
    assert (status, body["error"]["field"]) == (400, "issued_at")


def _times(value: Any, key: str = "") -> list[tuple[str, str]]:
    """Every (key, string) in a JSON document whose key names a time."""
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _times(v, k)]
    if isinstance(value, list):
        return [t for v in value for t in _times(v, key)]
    return [(key, value)] if isinstance(value, str) and TIME_KEYS.search(key) else []


async def test_every_time_the_api_prints_is_rfc3339(api: Api) -> None:
    """Alerts, alert detail, VMs, timelines, ledger entries, tokens and verify print every time as RFC 3339 UTC."""
    vm, principal = uid("vm"), uid("alice")
    await api.enroll(principal)
    await api.post("/v1/hypervisor/events", {"event_id": uid("evt"), "type": "snapshot.created", "vm_id": vm,
                                             "snapshot_id": "s", "snapshot_created_at": "1970-01-01T00:00:01Z",
                                             "occurred_at": api.clock.now}, role="hypervisor")
    body = {"vm_id": vm, "scope": "t", "nonce": uid("n")}
    await api.post("/v1/nonces/consume", body)
    await api.post("/v1/hypervisor/events", {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm,
                                             "snapshot_id": "s", "occurred_at": api.clock.now}, role="hypervisor")
    _, replay = await api.post("/v1/nonces/consume", body)
    documents = []
    for path, role in ((f"/v1/alerts?vm_id={vm}", "analyst"), (f"/v1/alerts/{replay['alert_id']}", "analyst"),
                       ("/v1/vms", "analyst"), (f"/v1/vms/{vm}/timeline", "analyst"),
                       (f"/v1/ledger?vm_id={vm}", "analyst"), (f"/v1/principals/{principal}/tokens", "admin")):
        status, document = await api.get(path, role=role)
        assert status == 200, (path, document)
        documents.append(document)
    found = [t for document in documents for t in _times(document)]
    assert len(found) >= 10
    for key, text in found:
        assert RFC3339.match(text) and text.endswith("Z"), (key, text)
        datetime.fromisoformat(text.replace("Z", "+00:00"))
