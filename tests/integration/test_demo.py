"""`replayguard demo` plays the seed's attack on the embedded default and exits 0."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_refuses_the_replay_and_verifies_the_ledger() -> None:
    """The narrated demo ends with the replay refused as replay_after_rollback and a verified ledger."""
    result = run_cli("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reject as replay_after_rollback" in out
    assert "critical replay_after_rollback" in out
    assert "The ledger verifies: ok=True" in out
    assert "Traceback" not in result.stderr
