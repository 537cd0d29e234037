"""bench/decide_instructions.py counts the instructions rg_decide costs a single-user
PostgreSQL backend an item, per kind, under callgrind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench_scripts import load


def test_every_kind_is_counted_from_a_migrated_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny run of each kind on this checkout: a positive count an item per kind, a nonce
    presented again costing more than a fresh one (its alert), and the callgrind files of the
    warm-up alone and of the whole script kept where asked."""
    script = load("decide_instructions")
    status = script.main(["--batches", "2", "--warmup", "1", "--batch", "4", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    counted = {}
    for kind in ("fresh", "again", "retained"):
        row = re.search(rf"^\| {kind} \| ([\d,]+) \|$", out, re.MULTILINE)
        assert row is not None, out
        counted[kind] = int(row.group(1).replace(",", ""))
        assert counted[kind] > 10_000
    assert counted["again"] > counted["fresh"]
    assert len(list((tmp_path / "checkout-0").glob("callgrind.out.*"))) == 6


def test_a_failing_call_fails_the_count() -> None:
    """A call that errors (here, a function the database lacks) is not counted as a cheap item:
    the single-user backend goes on after the error, and the script raises naming it."""
    script = load("decide_instructions")
    with script.migrated(script.Checkout(script.BENCH.parent)) as data:
        calls = ["SELECT 1\n", "SELECT count(*) FROM rg_no_such_function('[]'::jsonb)\n", "SELECT 2\n"]
        with pytest.raises(script.Failed, match="rg_no_such_function"):
            script.count(data, calls, None, "failing")
        assert script.count(data, ["SELECT 1\n"], None, "passing") > 0
