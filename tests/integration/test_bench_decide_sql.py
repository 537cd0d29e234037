"""bench/decide_sql.py runs end to end on a few small batches, and its ledger comparison fails
a candidate that decides differently."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_scripts import load
from tests.conftest import PG_ADMIN, REPO

pytestmark = pytest.mark.usefixtures("structlog_restored")  # the script configures its own logging

FUNCTION = REPO / "migrations" / "functions" / "rg_decide.sql"


def small(candidate: Path) -> list[str]:
    """A few batches that take every path: fresh and presented-again nonces, TOTP codes right,
    again and wrong (locked out), receipts current, older (a rollback) and another VM's (a clone)."""
    return ["--candidate", str(candidate), "--batch", "16", "--calls", "10", "--warmup", "1", "--rounds", "2",
            "--mix", "2:2:2:2:2", "--vms", "6", "--tokens", "3", "--rollback-share", "0.2", "--clone-share", "0.1",
            "--pg-admin-url", PG_ADMIN]


def test_the_migrated_function_as_candidate_chains_the_same_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The function itself as the candidate: every figure is measured, every path is taken and
    the heads match."""
    candidate = tmp_path / "same.sql"
    candidate.write_text(FUNCTION.read_text())
    assert load("decide_sql").main(small(candidate)) == 0
    out = capsys.readouterr().out
    assert "ledgers: the same head hash" in out and "candidate / baseline: cpu" in out
    assert "| rg_decide at " in out and str(candidate) in out
    answers = out.split("measured answers and flags: ", 1)[1].splitlines()[0]
    for seen in ("ok", "reused", "invalid", "locked_out", "rollback_detected", "clone_detected",
                 "replay_after_rollback"):
        assert f"{seen} " in answers, answers


def test_a_candidate_that_decides_differently_fails_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A candidate whose ledger payload differs by one key chains to another hash: exit status 1,
    and the report shows the first entry at which the two ledgers part."""
    candidate = tmp_path / "different.sql"
    text = FUNCTION.read_text()
    assert text.count("'receipt', v_rc)") == 1
    candidate.write_text(text.replace("'receipt', v_rc)", "'receipt_status', v_rc)"))
    assert load("decide_sql").main(small(candidate)) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT head hashes" in out and "first different entry: baseline {'seq': 1," in out
    assert "receipt_status" in out
