"""The pure chain checker and checkpoint signatures, without a database or an event loop."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core.chain import GENESIS, Entry, entry_hash
from replayguard.core.ledger_check import ChainChecker, Problem, Row


def chain(n: int) -> list[Row]:
    rows, prev = [], GENESIS
    for seq in range(1, n + 1):
        entry = Entry(seq, 1_000 + seq, "nonce", "vm", "scope", bytes([seq]) * 32, "accept", "ok", '{"a": 1}')
        digest = entry_hash(prev, entry)
        rows.append(Row(entry, prev, digest))
        prev = digest
    return rows


def swap(rows: list[Row], i: int) -> list[Row]:
    """Rows i and i+1 trade places: each keeps its content but takes the other's seq."""
    a, b = rows[i], rows[i + 1]
    moved = [Row(dataclasses.replace(b.entry, seq=a.entry.seq), b.prev_hash, b.hash),
             Row(dataclasses.replace(a.entry, seq=b.entry.seq), a.prev_hash, a.hash)]
    return rows[:i] + moved + rows[i + 2:]


def edit(rows: list[Row], i: int) -> list[Row]:
    row = rows[i]
    return [*rows[:i], Row(dataclasses.replace(row.entry, reason="invalid"), row.prev_hash, row.hash), *rows[i + 1:]]


def relinked(rows: list[Row], i: int) -> list[Row]:
    """Row i replaced by a self-consistent row that does not follow its predecessor."""
    row = rows[i]
    return [*rows[:i], Row(row.entry, bytes(32), entry_hash(bytes(32), row.entry)), *rows[i + 1:]]


@pytest.mark.parametrize(("rows", "seq", "problem"), [
    (chain(6)[:3] + chain(6)[4:], 4, Problem.MISSING),
    (edit(chain(6), 1), 2, Problem.MODIFIED),
    (swap(chain(6), 2), 3, Problem.MODIFIED),
    (relinked(chain(6), 4), 5, Problem.BROKEN_LINK),
])
def test_the_first_bad_seq_is_named(rows: list[Row], seq: int, problem: Problem) -> None:
    """A deleted, edited, swapped or relinked row is reported at its seq, with its kind."""
    checker = ChainChecker()
    finding = next(f for f in (checker.feed(r) for r in rows) if f is not None)
    assert (finding.seq, finding.problem) == (seq, problem)
    assert checker.checked == seq - 1


def test_an_intact_chain_matches_its_head_and_a_truncated_one_does_not() -> None:
    """The head must name the last row: a tail cut off is found at the first missing seq."""
    rows = chain(5)
    checker = ChainChecker()
    for row in rows:
        checker.feed(row)
    assert checker.finish(5, rows[-1].hash) is None and checker.checked == 5
    short = ChainChecker()
    for row in rows[:3]:
        short.feed(row)
    finding = short.finish(5, rows[-1].hash)
    assert finding is not None and (finding.seq, finding.problem) == (4, Problem.HEAD_MISMATCH)


def test_a_checkpoint_mismatch_is_found_even_when_every_hash_was_recomputed() -> None:
    """A consistent rewritten chain differs from what a checkpoint pinned."""
    original, rewritten = chain(4), chain(4)
    forged = [Row(dataclasses.replace(r.entry, reason="x"), r.prev_hash, r.hash) for r in rewritten]
    prev, rows = GENESIS, []
    for row in forged:
        digest = entry_hash(prev, row.entry)
        rows.append(Row(row.entry, prev, digest))
        prev = digest
    checker = ChainChecker(checkpoints={3: original[2].hash})
    finding = next(f for f in (checker.feed(r) for r in rows) if f is not None)
    assert (finding.seq, finding.problem) == (3, Problem.CHECKPOINT_MISMATCH)


def test_checkpoints_verify_with_the_public_key_only() -> None:
    """A checkpoint round-trips through JSON and verifies; any changed field does not."""
    key = Ed25519PrivateKey.generate()
    cp = cps.sign(key, 42, b"\x01" * 32, 1_790_000_000_000_000)
    public = cps.load_public_key(cps.public_key_pem(key.public_key()).encode())
    parsed = cps.from_json(cps.to_json(cp))
    assert parsed == cp and cps.verify(public, parsed)
    for change in ({"seq": 43}, {"hash": b"\x02" * 32}, {"ts_us": 1}):
        assert not cps.verify(public, dataclasses.replace(cp, **change))  # type: ignore[arg-type]
    assert not cps.verify(cps.load_public_key(cps.public_key_pem(Ed25519PrivateKey.generate().public_key())
                                              .encode()), cp)


@pytest.mark.parametrize("data", [[], {"seq": -1}, {"seq": 1, "hash": "zz", "ts_us": 1, "key_id": "k",
                                                    "signature": "00" * 64}, {"seq": True}])
def test_malformed_checkpoints_are_value_errors(data: object) -> None:
    """Anything but the JSON form ``to_json`` writes is refused with ValueError."""
    with pytest.raises(ValueError):
        cps.from_json(data)
