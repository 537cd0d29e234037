"""Cursors: only the service's own are accepted; anything else is a 400, never a 5xx (issue 15, reproduction 6)."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replayguard.core import cursors
from tests.conftest import Api, uid

PAGINATED = ("/v1/alerts", "/v1/vms", "/v1/principals")
ROLE = {"/v1/alerts": "analyst", "/v1/vms": "analyst", "/v1/principals": "admin"}
KIND = {"/v1/alerts": "alerts", "/v1/vms": "vms", "/v1/principals": "principals"}
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("path", PAGINATED)
async def test_reproduction_6_a_made_up_cursor_is_400(api: Api, path: str) -> None:
    """base64 of "a9999999999999999999" (an id past int64: a 500 before) and the old unsigned forms are 400."""
    for raw in (b"a9999999999999999999", b"a1", b"v" + b"web-01", b"palice", b"a-1"):
        status, body = await api.get(f"{path}?cursor={b64(raw)}", role=ROLE[path])
        assert (status, body["error"]["code"], body["error"]["field"]) == (400, "invalid_request", "cursor")


@pytest.mark.parametrize("path", PAGINATED)
async def test_a_cursor_of_one_listing_is_refused_by_the_other(api: Api, path: str) -> None:
    """The service's own cursors page through; one listing's cursor is refused by the other."""
    key = api.runtime.keys.pepper
    for kind in set(KIND.values()) - {KIND[path]}:
        own = cursors.issue(cursors.cursor_key(key), kind, "5")
        status, body = await api.get(f"{path}?cursor={own}", role=ROLE[path])
        assert (status, body["error"]["field"]) == (400, "cursor")
    status, _ = await api.get(f"{path}?cursor={cursors.issue(cursors.cursor_key(key), KIND[path], '5')}",
                              role=ROLE[path])
    assert status == 200  # the service's own cursor for this listing


@pytest.mark.parametrize("path", PAGINATED)
@FUZZ
@given(raw=st.binary(min_size=1, max_size=300))
async def test_random_bytes_as_a_cursor_are_400(api: Api, path: str, raw: bytes) -> None:
    """Random bytes, base64url-encoded or sent as they are (percent-encoded), are a 400 on every paginated route."""
    for text in (b64(raw), quote(raw)):
        resp = await api.client.get(f"{path}?cursor={text}", headers=api.auth(ROLE[path]))
        assert resp.status == 400, await resp.text()
        body = await resp.json()
        assert body["error"]["code"] == "invalid_request"


async def test_issued_cursors_still_page_through_alerts(api: Api) -> None:
    """Alerts page through with the issued cursors, newest first, nothing skipped or repeated."""
    scope = uid("pages")
    for n in range(5):
        body = {"vm_id": uid("vm"), "scope": scope, "nonce": f"n{n}"}
        await api.post("/v1/nonces/consume", body)
        await api.post("/v1/nonces/consume", {**body, "vm_id": uid("vm")})
    seen: list[int] = []
    cursor = ""
    while True:
        status, page = await api.get(f"/v1/alerts?kind=reuse&limit=2{cursor}")
        assert status == 200, page
        seen += [int(item["id"]) for item in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == sorted(set(seen), reverse=True) and len(seen) >= 5


async def test_paging_goes_past_a_vm_id_of_the_longest_valid_form(api: Api) -> None:
    """A VM id of 256 four-byte characters is valid; a page that ends at it issues a cursor
    the next request accepts, so such a name cannot stop analysts paging past it."""
    tag = uid("p")[-6:]
    first = "\U0001F600" * 249 + tag + "\U0001F600"
    second = "\U0001F600" * 249 + tag + "\U0001F601"
    assert len(first) == len(second) == 256
    for vm_id in (first, second):
        status, _ = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "s", "nonce": uid("n")})
        assert status == 200
    key = cursors.cursor_key(api.runtime.keys.pepper)
    start = cursors.issue(key, "vms", first[:-1])  # just before `first`
    status, page = await api.get(f"/v1/vms?limit=1&cursor={quote(start)}")
    assert status == 200 and [item["vm_id"] for item in page["items"]] == [first]
    assert len(page["next_cursor"]) > 1200
    status, page = await api.get(f"/v1/vms?limit=1&cursor={quote(page['next_cursor'])}")
    assert status == 200, page
    assert [item["vm_id"] for item in page["items"]] == [second]
