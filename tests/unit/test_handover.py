"""Signing key handovers (``core/handover.py``): the chain they make, which key signs which
span of the ledger, and the rule a witness applies before it trusts a new key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core import continuity
from replayguard.core.handover import (
    Handover,
    chain_of,
    handed_over,
    handover_from_json,
    handover_json,
    handover_valid,
    handovers_from_json,
    raw_public,
    sign_handover,
    signers_json,
)

K0, K1, K2, OTHER = (Ed25519PrivateKey.generate() for _ in range(4))
H01 = sign_handover(K0, 10, b"\x01" * 32, 1_000, K1.public_key())
H12 = sign_handover(K1, 20, b"\x02" * 32, 2_000, K2.public_key())
D = cps.key_id(K0.public_key())


def _resigned(h: Handover, key: Ed25519PrivateKey) -> Handover:
    """``h`` with its signature made by ``key`` (a forgery unless ``key`` is the old key)."""
    forged = sign_handover(key, h.base_seq, h.base_hash, h.ts_us, Ed25519PrivateKey.generate().public_key())
    return Handover(h.base_seq, h.base_hash, h.ts_us, h.old_public, h.new_public, forged.signature)


def test_a_chain_of_handovers_gives_each_key_its_span_and_keeps_the_first_keys_id() -> None:
    """Two rotations: K0 signs entries 0-10, K1 11-20, K2 from 21; the deployment keeps K0's id."""
    signers = chain_of([H01, H12], K2.public_key())
    assert signers.deployment_id == D and signers.current.key_id == cps.key_id(K2.public_key())
    assert [(s.first_seq, s.last_seq) for s in signers.chain] == [(0, 10), (11, 20), (21, None)]
    assert signers.for_seq(10).key_id == cps.key_id(K0.public_key())
    assert signers.for_seq(11).key_id == cps.key_id(K1.public_key())
    assert signers.signed_in_span(cps.sign(K0, 10, b"\x03" * 32, 5))
    assert not signers.signed_in_span(cps.sign(K0, 11, b"\x03" * 32, 5))  # the retired key past its handover
    assert not signers.signed_in_span(cps.sign(K2, 20, b"\x03" * 32, 5))  # the new key before its span
    assert chain_of([], K0.public_key()).deployment_id == D


@pytest.mark.parametrize("handovers,current,why", [
    ([H01], K2, "does not hand over to this key"),
    ([H12], K1, "does not hand over to this key"),
    ([H12, H01], K1, "does not follow"),
    ([_resigned(H01, OTHER)], K1, "not signed by the key it hands over from"),
    ([H01, sign_handover(K1, 5, b"\x02" * 32, 2_000, K2.public_key())], K2, "does not follow"),
])
def test_a_chain_that_does_not_hold_is_refused(handovers: list[Handover], current: Ed25519PrivateKey,
                                               why: str) -> None:
    """A handover signed by another key, out of order, or not ending at the key in use is no chain."""
    with pytest.raises(ValueError, match=why):
        chain_of(handovers, current.public_key())


def test_a_witness_moves_to_a_new_key_only_through_a_handover_from_the_key_it_holds() -> None:
    """Held K0: K0→K1 moves it, K0→K1→K2 too; a bare key, a forged handover, a chain of
    another deployment, or a fork by the retired key once K1 is held, does not."""
    assert handed_over(K0.public_key(), K1.public_key(), D, [H01])
    assert handed_over(K0.public_key(), K2.public_key(), D, [H01, H12])
    assert handed_over(K1.public_key(), K2.public_key(), D, [H01, H12])
    assert not handed_over(K0.public_key(), K1.public_key(), D, [])
    assert not handed_over(K0.public_key(), K1.public_key(), D, [_resigned(H01, OTHER)])
    stranger = sign_handover(OTHER, 10, b"\x01" * 32, 1_000, K1.public_key())
    assert not handed_over(K0.public_key(), K1.public_key(), D, [stranger])
    assert not handed_over(K0.public_key(), K1.public_key(), cps.key_id(OTHER.public_key()), [H01])
    leaked_fork = sign_handover(K0, 15, b"\x04" * 32, 3_000, OTHER.public_key())
    assert not handed_over(K1.public_key(), OTHER.public_key(), D, [leaked_fork])
    assert not handed_over(K2.public_key(), K1.public_key(), D, [H01])  # never back to an older key


def test_recovery_statements_count_under_the_key_whose_span_holds_them() -> None:
    """A statement of K0 for entry 9 counts; one K0 signs for entry 30 (after its handover) does not."""
    signers = chain_of([H01, H12], K2.public_key())
    assert signers.statement_valid(continuity.sign_statement(K0, 9, b"\x05" * 32, 7, 8, b"\x06" * 32))
    assert not signers.statement_valid(continuity.sign_statement(K0, 30, b"\x05" * 32, 7, 8, b"\x06" * 32))
    assert signers.statement_valid(continuity.sign_statement(K2, 30, b"\x05" * 32, 7, 8, b"\x06" * 32))


def test_handovers_round_trip_and_malformed_ones_are_value_errors() -> None:
    """The JSON form reads back to the same handover; a bad field, or too many, is a ValueError."""
    assert handover_from_json(handover_json(H01)) == H01 and handover_valid(H01)
    assert handovers_from_json([handover_json(H01), handover_json(H12)]) == (H01, H12)
    assert handovers_from_json(None) == ()
    for bad in ({**handover_json(H01), "new_public": "00"}, {**handover_json(H01), "base_seq": -1}, "x"):
        with pytest.raises(ValueError):
            handover_from_json(bad)
    with pytest.raises(ValueError, match="at most"):
        handovers_from_json([handover_json(H01)] * 65)
    assert not handover_valid(Handover(H01.base_seq + 1, H01.base_hash, H01.ts_us, H01.old_public, H01.new_public,
                                       H01.signature))


def test_signers_json_gives_each_key_its_ids_public_key_span_and_handover_time() -> None:
    """Two rotations: three entries, oldest first, each with its key id, the file id known
    for it (null where none is), its PEM, its span and when it was handed over (null for
    the current key); nothing but public halves."""
    signers = chain_of([H01, H12], K2.public_key())
    shown = signers_json(signers, {raw_public(K0.public_key()): "f0", raw_public(K2.public_key()): "f2"})
    assert [(e["key_id"], e["file_id"], e["first_seq"], e["last_seq"], e["handed_over_at"]) for e in shown] == [
        (D, "f0", 0, 10, "1970-01-01T00:00:00.001000Z"),
        (cps.key_id(K1.public_key()), None, 11, 20, "1970-01-01T00:00:00.002000Z"),
        (cps.key_id(K2.public_key()), "f2", 21, None, None)]
    assert [e["public_key_pem"] for e in shown] == [cps.public_key_pem(k.public_key()) for k in (K0, K1, K2)]
