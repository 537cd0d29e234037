"""The analyst benchmark runs end to end on a tiny ledger (its one-million default is for humans)."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load

pytestmark = pytest.mark.usefixtures("structlog_restored")  # the script configures its own logging


async def test_benchmark_runs_on_a_tiny_ledger() -> None:
    """Seeding chains correctly (the verify step says ok) and every query is measured."""
    bench = load("analyst_queries")
    out = await bench.run(bench.parse(["--entries", "400", "--baseline-entries", "50", "--vms", "7",
                                       "--requests", "3"]))
    assert set(out) == {"baseline", "large"}
    assert out["large"]["full verify (one call)"][1] == 1.0  # the seeded chain verifies
    assert len(out["large"]) == 7 and all(p50 > 0 for p50, _ in out["large"].values())
