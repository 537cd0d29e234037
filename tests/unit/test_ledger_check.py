"""The pure chain checker and checkpoint signatures, without a database or an event loop."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core import checkpoints as cps
from replayguard.core.chain import GENESIS, Entry, entry_hash
from replayguard.core.ledger_check import ChainChecker, Problem, Row, forged_checkpoints


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


def rewritten(rows: list[Row], i: int) -> list[Row]:
    """Row i edited and every hash from it on recomputed: a consistent chain that only a
    checkpoint at or after row i can tell from the original."""
    out, prev = list(rows[:i]), rows[i].prev_hash
    for n, row in enumerate(rows[i:]):
        entry = dataclasses.replace(row.entry, reason="x") if n == 0 else row.entry
        digest = entry_hash(prev, entry)
        out.append(Row(entry, prev, digest))
        prev = digest
    return out


@pytest.mark.parametrize(("rows", "seq", "problem", "message"), [
    (chain(6)[:3] + chain(6)[4:], 4, Problem.MISSING, "entry 4 is missing (next entry is 5)"),
    (edit(chain(6), 1), 2, Problem.MODIFIED, "entry 2 no longer matches its hash"),
    (swap(chain(6), 2), 3, Problem.MODIFIED, "entry 3 no longer matches its hash"),
    (relinked(chain(6), 4), 5, Problem.BROKEN_LINK, "entry 5 does not follow entry 4"),
])
def test_the_first_bad_seq_is_named(rows: list[Row], seq: int, problem: Problem, message: str) -> None:
    """A deleted, edited, swapped or relinked row is reported at its seq, with its kind and
    a message naming the entries concerned."""
    checker = ChainChecker()
    finding = next(f for f in (checker.feed(r) for r in rows) if f is not None)
    assert (finding.seq, finding.problem) == (seq, problem)
    assert message in finding.message
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


@pytest.mark.parametrize(("head_seq", "head_hash", "seq", "text"), [
    (5, bytes(32), 5, "hash is not that of entry 5"),
    (6, None, 6, "names entry 6 but the rows end at 5"),
    (4, None, 5, "names entry 4 but the rows end at 5"),
])
def test_a_head_that_does_not_name_the_last_row_is_found(head_seq: int, head_hash: bytes | None, seq: int,
                                                         text: str) -> None:
    """The head's seq or its hash alone differing from the last row's is a head mismatch:
    a head rewritten to another hash at the right seq, or a seq ahead of or behind the rows."""
    rows = chain(5)
    checker = ChainChecker()
    for row in rows:
        checker.feed(row)
    finding = checker.finish(head_seq, rows[-1].hash if head_hash is None else head_hash)
    assert finding is not None and (finding.seq, finding.problem) == (seq, Problem.HEAD_MISMATCH)
    assert text in finding.message


def test_a_checkpoint_mismatch_is_found_even_when_every_hash_was_recomputed() -> None:
    """A consistent rewritten chain differs from what a checkpoint pinned."""
    original = chain(4)
    rows = rewritten(original, 0)
    checker = ChainChecker(checkpoints={3: original[2].hash})
    finding = next(f for f in (checker.feed(r) for r in rows) if f is not None)
    assert (finding.seq, finding.problem) == (3, Problem.CHECKPOINT_MISMATCH)
    assert "entry 3 differs from its signed checkpoint" in finding.message


def fields(row: Row) -> tuple[Any, ...]:
    """A row as a reader's columns: ``Entry``'s fields in order, then the two hashes."""
    return (*(getattr(row.entry, name) for name in Entry.__slots__), row.prev_hash, row.hash)


def by_rows(checker: ChainChecker, rows: list[Row]) -> ChainChecker:
    """``checker`` fed ``rows`` one by one, up to the first finding."""
    for row in rows:
        if checker.feed(row) is not None:
            break
    return checker


def by_fields(checker: ChainChecker, rows: list[Row], chunk: int) -> ChainChecker:
    """``checker`` fed ``rows`` as fields, ``chunk`` rows a call, up to the first finding."""
    for start in range(0, len(rows), chunk):
        if checker.feed_fields([fields(row) for row in rows[start:start + chunk]]) is not None:
            break
    return checker


def state(checker: ChainChecker) -> tuple[object, ...]:
    return checker.finding, checker.checked, checker.last_seq, checker.last_hash


TAMPERINGS: dict[str, Callable[[list[Row], int], list[Row]]] = {
    "intact": lambda rows, i: rows,
    "deleted": lambda rows, i: rows[:i] + rows[i + 1:],
    "edited": edit,
    "swapped": lambda rows, i: swap(rows, min(i, len(rows) - 2)),
    "relinked": relinked,
    "rewritten": rewritten,
    "duplicated": lambda rows, i: rows[:i + 1] + rows[i:],
}


@pytest.mark.parametrize("chunk", [1, 2, 3, 50])
@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_feeding_fields_finds_what_feeding_rows_finds(tampering: str, chunk: int) -> None:
    """The fast path (fields straight from a reader, no Row built) reaches the same
    finding, count and position as feeding rows one by one, however the rows are cut
    into calls; a checkpoint pins entry 4, so a rewritten chain is found there."""
    original = chain(8)
    rows = TAMPERINGS[tampering](original, 2)
    checkpoints = {4: original[3].hash}
    fast = by_fields(ChainChecker(checkpoints=checkpoints), rows, chunk)
    slow = by_rows(ChainChecker(checkpoints=checkpoints), rows)
    assert state(fast) == state(slow)
    assert (slow.finding is None) == (tampering == "intact")


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 12), tampering=st.sampled_from(sorted(TAMPERINGS)), at=st.integers(0, 10),
       chunk=st.integers(1, 13), pinned=st.sets(st.integers(1, 12), max_size=3), start=st.integers(0, 3))
def test_feeding_fields_agrees_with_feeding_rows(n: int, tampering: str, at: int, chunk: int, pinned: set[int],
                                                  start: int) -> None:
    """Differential: any chain, tampering, position, signed checkpoints and start point
    (a check that continues from a checkpoint) give the same result on both paths."""
    original = chain(n)
    rows = TAMPERINGS[tampering](original, min(at, n - 2))
    checkpoints = {seq: original[seq - 1].hash for seq in pinned if seq <= n}
    start = min(start, n - 1)
    start_hash = original[start - 1].hash if start else GENESIS
    slow = by_rows(ChainChecker(start, start_hash, checkpoints), rows[start:])
    fast = by_fields(ChainChecker(start, start_hash, checkpoints), rows[start:], chunk)
    assert state(fast) == state(slow)
    assert fast.finish(n, original[-1].hash) == slow.finish(n, original[-1].hash)


def test_feeding_fields_after_a_finding_changes_nothing() -> None:
    """Once a finding is made, further rows are neither checked nor counted."""
    rows = edit(chain(6), 1)
    checker = ChainChecker()
    finding = checker.feed_fields([fields(row) for row in rows[:3]])
    assert finding is not None and finding.seq == 2
    assert checker.feed_fields([fields(row) for row in rows[3:]]) is finding
    assert (checker.checked, checker.last_seq) == (1, 1)


@settings(max_examples=400, deadline=None)
@given(n=st.integers(2, 12), tampering=st.sampled_from(sorted(TAMPERINGS)), at=st.integers(0, 10),
       chunk=st.integers(1, 13),
       marks=st.dictionaries(st.integers(1, 15), st.tuples(st.booleans(), st.booleans()), max_size=6))
def test_asking_for_signatures_only_where_checkpoints_disagree_finds_what_verifying_all_finds(
        n: int, tampering: str, at: int, chunk: int, marks: dict[int, tuple[bool, bool]]) -> None:
    """Differential: checkpoints at any entries (some past the head), each over the
    original chain's hash or another, each genuine or forged. A checker that asks
    ``genuine`` only about checkpoints that disagree with the chain reaches the finding,
    count and position of one given the genuine checkpoints alone (every signature checked
    first), on either feeding path and at the end; it asks about no checkpoint that agrees,
    pins every agreeing one it passes, and counts the forged ones it passes."""
    original = chain(n)
    rows = TAMPERINGS[tampering](original, min(at, n - 2))
    hashes = {seq: original[seq - 1].hash if agrees and seq <= n else bytes([seq]) * 32
              for seq, (agrees, _) in marks.items()}
    genuine = {seq: real for seq, (_, real) in marks.items()}
    asked: list[int] = []

    def judge(seq: int) -> bool:
        asked.append(seq)
        return genuine[seq]

    lazy = by_fields(ChainChecker(checkpoints=hashes, genuine=judge), rows, chunk)
    eager = by_rows(ChainChecker(checkpoints={seq: h for seq, h in hashes.items() if genuine[seq]}), rows)
    assert state(lazy) == state(eager)
    passed = {row.entry.seq: row.hash for row in rows[:lazy.checked]}
    assert all(hashes[seq] != passed.get(seq) for seq in asked)
    assert lazy.pinned == sum(hashes[seq] == passed[seq] for seq in hashes.keys() & passed.keys())
    assert lazy.forged == sum(hashes[seq] != passed[seq] and not genuine[seq] for seq in hashes.keys() & passed.keys())
    assert lazy.finish(n, original[-1].hash) == eager.finish(n, original[-1].hash)


def test_checkpoints_verify_with_the_public_key_only() -> None:
    """A checkpoint round-trips through JSON and verifies; any changed field does not."""
    key = Ed25519PrivateKey.generate()
    cp = cps.sign(key, 42, b"\x01" * 32, 1_790_000_000_000_000)
    public = cps.load_public_key(cps.public_key_pem(key.public_key()).encode())
    parsed = cps.from_json(cps.to_json(cp))
    assert parsed == cp and cps.verify(public, parsed)
    for change in ({"seq": 43}, {"hash": b"\x02" * 32}, {"ts_us": 1}):
        assert not cps.verify(public, dataclasses.replace(cp, **change))
    assert not cps.verify(cps.load_public_key(cps.public_key_pem(Ed25519PrivateKey.generate().public_key())
                                              .encode()), cp)


# RFC 8032 §7.1, TEST 1: the secret key, its public key, and the signature of the empty message.
RFC8032_SECRET = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC8032_EMPTY_SIGNATURE = ("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
                           "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_a_checkpoint_is_the_known_answer_for_the_rfc8032_key() -> None:
    """Under RFC 8032's first test key (Ed25519 signs deterministically) a checkpoint's signed
    bytes, signature, key id and JSON form are exactly these: a verifier outside this code
    depends on each (``openssl pkeyutl`` signs the same bytes to the same signature:
    tests/integration/test_checkpoint_openssl.py)."""
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC8032_SECRET))
    public = key.public_key()
    assert public.public_bytes_raw().hex() == RFC8032_PUBLIC
    assert key.sign(b"").hex() == RFC8032_EMPTY_SIGNATURE
    entry_hash = bytes(range(32, 64))
    assert cps.message(42, entry_hash, 1_790_000_000_123_456) == (
        b"replayguard-checkpoint-v1\n42\n202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\n"
        b"1790000000123456\n")
    cp = cps.sign(key, 42, entry_hash, 1_790_000_000_123_456)
    signature = ("f81ff8fb58b9277ff6624b5e13a9a2505b5403b8d225c999745ffb5f2b055fd8"
                 "c241865540be6baaefece596b73e1970bc289bb4cab3d3c3c3cb90ddbaa8fe07")
    assert cps.to_json(cp) == {
        "type": "checkpoint", "id": "checkpoint-42", "seq": 42,
        "hash": "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
        "ts_us": 1_790_000_000_123_456, "created_at": "2026-09-21T14:13:20.123456Z", "algorithm": "Ed25519",
        "key_id": "21fe31dfa154a261", "signature": signature,
        "summary": "ledger entry 42 has hash 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
    }
    assert cp.key_id == hashlib.sha256(bytes.fromhex(RFC8032_PUBLIC)).hexdigest()[:16]
    assert cps.verify(public, cp)
    assert not cps.verify(public, dataclasses.replace(cp, key_id="0" * 16))  # the right signature, another key's name


@pytest.mark.parametrize(("field", "value"), [
    ("seq", "42"), ("seq", 1.5), ("ts_us", -1), ("ts_us", None), ("hash", "20" * 31), ("hash", 32),
    ("signature", "00" * 63), ("signature", "0g" * 64), ("key_id", ""), ("key_id", 7),
])
def test_each_field_of_a_checkpoint_is_checked(field: str, value: object) -> None:
    """One field wrong in an otherwise good checkpoint is refused with a ValueError naming it."""
    good = cps.to_json(cps.sign(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC8032_SECRET)),
                                42, bytes(32), 1))
    assert cps.from_json(good) is not None
    with pytest.raises(ValueError, match=field):
        cps.from_json({**good, field: value})


@pytest.mark.parametrize("data", [[], {"seq": -1}, {"seq": 1, "hash": "zz", "ts_us": 1, "key_id": "k",
                                                    "signature": "00" * 64}, {"seq": True}])
def test_malformed_checkpoints_are_value_errors(data: object) -> None:
    """Anything but the JSON form ``to_json`` writes is refused with ValueError."""
    with pytest.raises(ValueError):
        cps.from_json(data)


def test_forged_checkpoints_are_a_finding_at_the_first_only_when_there_are_any() -> None:
    """A check that set aside forged checkpoints names the first and how many; one that set
    aside none gives no finding."""
    found = forged_checkpoints(2, 7)
    assert found is not None and (found.seq, found.problem) == (7, Problem.FORGED_CHECKPOINT)
    assert "2 checkpoint row(s) from entry 7" in found.message
    assert forged_checkpoints(0, None) is None
