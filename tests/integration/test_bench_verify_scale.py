"""bench/verify_scale.py runs end to end on a small ledger, and every verification it
measures finds the ledger whole and pinned by every checkpoint."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load
from tests.conftest import PG_ADMIN

pytestmark = pytest.mark.usefixtures("structlog_restored")


def test_a_small_ledger_with_a_checkpoint_per_entry(capsys: pytest.CaptureFixture[str]) -> None:
    """Both ways of verifying, with and without the checkpoints, print their figures and ratios."""
    assert load("verify_scale").main(["--rows", "300", "--every", "1", "--repeat", "1",
                                      "--pg-admin-url", PG_ADMIN]) == 0
    out = capsys.readouterr().out
    assert "300 entries, 300 signed checkpoints" in out
    assert "'checkpoints_checked': 300" in out and "'checkpoints_checked': 0" in out
    assert out.count(" ratio [") == 2
