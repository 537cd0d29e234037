"""A credential is remembered as a credential: re-enrolling a secret reopens nothing (issue 15, reproduction 3).

HOTP counters, TOTP high-water marks and use digests belong to the secret (its keyed
fingerprint), not to the token row: deleting a token and enrolling the same secret again,
for the same principal or another, never makes an accepted code acceptable again.
"""

from __future__ import annotations

from typing import Any

import pyotp

from tests.conftest import Api, uid


async def verify(api: Api, principal: str, code: str, vm: str = "vm-reenrol") -> dict[str, Any]:
    status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": code})
    assert status == 200, body
    return dict(body)


async def delete(api: Api, principal: str, token_id: str) -> None:
    resp = await api.client.delete(f"/v1/principals/{principal}/tokens/{token_id}", headers=api.auth("admin"))
    assert resp.status == 204, await resp.text()


async def test_hotp_counter_survives_deletion_and_re_enrolment_for_the_same_principal(api: Api) -> None:
    """HOTP secret S: H(0) accepted, token deleted, S enrolled again: H(0) is reused, H(1) accepted."""
    secret, alice = pyotp.random_base32(), uid("alice")
    hotp = pyotp.HOTP(secret)
    first = await api.enroll(alice, type="hotp", secret=secret)
    assert (await verify(api, alice, hotp.at(0)))["decision"] == "accept"
    await delete(api, alice, first["token_id"])
    await api.enroll(alice, type="hotp", secret=secret)
    again = await verify(api, alice, hotp.at(0))
    assert (again["decision"], again["reason"]) == ("reject", "reused")
    assert again["alert_id"] is not None  # the first use is found, not only the counter
    assert (await verify(api, alice, hotp.at(1)))["decision"] == "accept"


async def test_hotp_counter_survives_re_enrolment_for_another_principal(api: Api) -> None:
    """HOTP secret S used by Alice, deleted, enrolled for Bob: Alice's counters stay spent for Bob."""
    secret, alice, bob = pyotp.random_base32(), uid("alice"), uid("bob")
    hotp = pyotp.HOTP(secret)
    first = await api.enroll(alice, type="hotp", secret=secret)
    for counter in (0, 1):
        assert (await verify(api, alice, hotp.at(counter)))["decision"] == "accept"
    await delete(api, alice, first["token_id"])
    await api.enroll(bob, type="hotp", secret=secret)
    for counter in (0, 1):
        assert (await verify(api, bob, hotp.at(counter)))["reason"] == "reused"
    assert (await verify(api, bob, hotp.at(2)))["decision"] == "accept"


async def test_totp_high_water_survives_deletion_and_re_enrolment(api: Api) -> None:
    """TOTP secret S: a code accepted, token deleted, S enrolled again (same
    principal, then another): the code is reused within the drift window."""
    secret, alice, bob = pyotp.random_base32(), uid("alice"), uid("bob")
    code = pyotp.TOTP(secret).at(api.clock.now)
    first = await api.enroll(alice, secret=secret)
    assert (await verify(api, alice, code))["decision"] == "accept"
    await delete(api, alice, first["token_id"])
    second = await api.enroll(alice, secret=secret)
    api.clock.advance(10)  # same step or the next: still inside the ±1 drift window
    assert (await verify(api, alice, code))["reason"] == "reused"
    await delete(api, alice, second["token_id"])
    await api.enroll(bob, secret=secret)
    assert (await verify(api, bob, code))["reason"] == "reused"
    api.clock.advance(30)
    assert (await verify(api, bob, pyotp.TOTP(secret).at(api.clock.now)))["decision"] == "accept"


async def test_the_same_secret_with_other_digits_is_the_same_credential(api: Api) -> None:
    """An 8-digit enrolment of a used 6-digit HOTP secret keeps its
    counters spent (the 6-digit code is the 8-digit code's tail)."""
    secret, alice = pyotp.random_base32(), uid("alice")
    first = await api.enroll(alice, type="hotp", secret=secret)
    assert (await verify(api, alice, pyotp.HOTP(secret).at(0)))["decision"] == "accept"
    await delete(api, alice, first["token_id"])
    await api.enroll(alice, type="hotp", secret=secret, digits=8)
    assert (await verify(api, alice, pyotp.HOTP(secret, digits=8).at(0)))["reason"] == "reused"


async def test_an_hotp_secret_enrolled_again_is_provisioned_past_its_spent_counters(api: Api) -> None:
    """Enrolling an HOTP secret again carries its credential's high-water, and its
    provisioning_uri says so: counter = the last accepted counter + 1 (here 15, with the
    look-ahead 10), so an authenticator provisioned from it is accepted at once; a new
    secret's URI says counter 0."""
    principal = uid("alice")
    first = await api.enroll(principal, type="hotp")
    provisioned = pyotp.parse_uri(first["provisioning_uri"])
    assert isinstance(provisioned, pyotp.HOTP) and provisioned.initial_count == 0
    hotp = pyotp.HOTP(first["secret"])
    for counter in range(15):
        assert (await verify(api, principal, hotp.at(counter), vm=uid("vm")))["decision"] == "accept"
    await delete(api, principal, first["token_id"])
    again = await api.enroll(principal, type="hotp", secret=first["secret"])
    app = pyotp.parse_uri(again["provisioning_uri"])  # what an authenticator app would do
    assert isinstance(app, pyotp.HOTP) and app.initial_count == 15, again["provisioning_uri"]
    answer = await verify(api, principal, app.at(0), vm=uid("vm"))  # pyotp counts from initial_count
    assert (answer["decision"], answer["reason"]) == ("accept", "ok"), answer
