"""`replayguard demo` plays the seed's attack on the embedded default and exits 0."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_refuses_the_replay_and_verifies_the_ledger() -> None:
    """The narrated demo refuses the replay as replay_after_rollback with a verified ledger, then
    refuses a replay against a restored database (ledger_rollback) and records the recovery."""
    result = run_cli("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reject as replay_after_rollback" in out
    assert "critical replay_after_rollback" in out
    assert "The ledger verifies: ok=True" in out
    assert "against the restored ledger: HTTP 503 ledger_rollback" in out
    assert "replays the nonce again: reject as reused" in out
    assert "Refused, reported and recovered." in out
    assert "Traceback" not in result.stderr
