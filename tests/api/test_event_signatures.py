"""Signed hypervisor events: with ``event_hmac_secret`` set, only fresh, genuine signatures get in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from replayguard.core.signatures import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, uid

SECRET = "relay-secret-for-tests"
TOLERANCE = 300


def _event(clock: FakeClock) -> bytes:
    return orjson.dumps({"event_id": uid("evt"), "type": "snapshot.created", "vm_id": uid("vm"),
                         "snapshot_id": "pre-patch", "occurred_at": int(clock.now) - 5, "host": "hv-03"})


async def _post(api: Api, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await api.client.post("/v1/hypervisor/events", data=body, headers={
        **api.auth("hypervisor"), "Content-Type": "application/json", **headers})
    return resp.status, await resp.json()


def _signed(body: bytes, ts: int, secret: str = SECRET) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(secret.encode(), str(ts), body)}


async def _signed_api(api_factory: Callable[..., Any]) -> Api:
    api: Api = await api_factory(clock=FakeClock(), event_hmac_secret=Secret(SECRET),
                                 event_hmac_tolerance_s=TOLERANCE)
    return api


async def test_signed_event_is_accepted(api_factory: Callable[..., Any]) -> None:
    """A genuine signature over timestamp and body, made now, is accepted (202)."""
    api = await _signed_api(api_factory)
    body = _event(api.clock)
    status, data = await _post(api, body, _signed(body, int(api.clock.now)))
    assert (status, data["accepted"]) == (202, True), data


async def test_unsigned_event_is_refused(api_factory: Callable[..., Any]) -> None:
    """Without the signature headers (either one), an event is 401 even with a hypervisor token."""
    api = await _signed_api(api_factory)
    body = _event(api.clock)
    headers = _signed(body, int(api.clock.now))
    for sent in ({}, {TIMESTAMP_HEADER: headers[TIMESTAMP_HEADER]}, {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}):
        status, data = await _post(api, body, sent)
        assert (status, data["error"]["code"]) == (401, "unauthorized"), sent


async def test_tampered_or_wrongly_keyed_event_is_refused(api_factory: Callable[..., Any]) -> None:
    """A signature of another body, another secret or another timestamp is 401."""
    api = await _signed_api(api_factory)
    body, now = _event(api.clock), int(api.clock.now)
    other = body.replace(b"pre-patch", b"pre-patcH")
    cases = [(other, _signed(body, now)), (body, _signed(body, now, "another-secret")),
             (body, {TIMESTAMP_HEADER: str(now - 1), SIGNATURE_HEADER: _signed(body, now)[SIGNATURE_HEADER]}),
             (body, {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: "v1=" + "0" * 64}),
             (body, {TIMESTAMP_HEADER: "soon", SIGNATURE_HEADER: _signed(body, now)[SIGNATURE_HEADER]})]
    for sent_body, headers in cases:
        status, data = await _post(api, sent_body, headers)
        assert (status, data["error"]["code"]) == (401, "unauthorized"), headers
    status, data = await _post(api, body, _signed(body, now))  # nothing above was stored
    assert (status, data["duplicate"]) == (202, False), data


async def test_signed_event_replayed_outside_the_tolerance_is_refused(api_factory: Callable[..., Any]) -> None:
    """The same signed request replayed later than the tolerance is 401; inside it, an idempotent duplicate."""
    api = await _signed_api(api_factory)
    body = _event(api.clock)
    headers = _signed(body, int(api.clock.now))
    assert (await _post(api, body, headers))[0] == 202
    api.clock.advance(TOLERANCE - 1)
    status, data = await _post(api, body, headers)
    assert (status, data["duplicate"]) == (202, True)
    api.clock.advance(2)
    status, data = await _post(api, body, headers)
    assert (status, data["error"]["code"]) == (401, "unauthorized")


async def test_event_signed_in_the_future_beyond_tolerance_is_refused(api_factory: Callable[..., Any]) -> None:
    """A timestamp further ahead of the service's clock than the tolerance is 401 too."""
    api = await _signed_api(api_factory)
    body = _event(api.clock)
    status, _ = await _post(api, body, _signed(body, int(api.clock.now) + TOLERANCE + 1))
    assert status == 401


async def test_without_a_secret_events_need_no_signature(api: Api) -> None:
    """With no event_hmac_secret configured, an unsigned event with a hypervisor token is accepted."""
    body = _event(api.clock)
    status, data = await _post(api, body, {})
    assert (status, data["accepted"]) == (202, True), data


async def test_other_routes_ignore_the_event_secret(api_factory: Callable[..., Any]) -> None:
    """The signature requirement applies to hypervisor events only: decisions need no signature."""
    api = await _signed_api(api_factory)
    status, data = await api.post("/v1/nonces/consume", {"vm_id": "vm-1", "scope": "s", "nonce": uid()})
    assert (status, data["decision"]) == (200, "accept")
