"""bench/service_cpu.py counts a real service's instructions under callgrind, for every kind
of decision, and reports each kind's answers as the service gave them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench_scripts import load
from tests.conftest import PG_ADMIN

pytestmark = pytest.mark.usefixtures("structlog_restored")


def test_every_kind_is_counted_with_its_own_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny run of each kind: every answer is the kind's own (ok, reused, invalid,
    locked_out), each kind has a positive count a decision and its top functions, and the
    callgrind dumps are kept where asked."""
    script = load("service_cpu")
    status = script.main(["--kind", "nonce,totp,replay,invalid,locked", "--decisions", "12", "--warmup", "3",
                          "--concurrency", "4", "--idle", "0.5", "--top", "5", "--keep", str(tmp_path),
                          "--pg-admin-url", PG_ADMIN])
    out = capsys.readouterr().out
    assert status == 0, out
    for kind, answer in (("nonce", "ok"), ("totp", "ok"), ("replay", "reused"), ("invalid", "invalid"),
                         ("locked", "locked_out")):
        row = re.search(rf"^\| {kind} \| {answer} 12 \| ([\d,]+) \| (-?[\d,]+) \|", out, re.MULTILINE)
        assert row is not None, out
        assert int(row.group(1).replace(",", "")) > 10_000
        assert f"{kind}: functions by inclusive instructions a decision" in out
        assert f"{kind}: functions by own instructions a decision" in out
    assert len(list((tmp_path / "checkout-0").glob("callgrind.out.*"))) == 6  # the idle count and five kinds


def test_a_kind_answered_otherwise_fails_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """When the answers are not the kind's own (here: fresh nonces expected to be refused as
    reused), the figures measure another path: exit status 1, and it says so."""
    script = load("service_cpu")
    monkeypatch.setitem(script.EXPECTED, "nonce", "reused")
    status = script.main(["--kind", "nonce", "--decisions", "5", "--warmup", "0", "--concurrency", "2",
                          "--idle", "0", "--top", "0", "--keep", str(tmp_path), "--pg-admin-url", PG_ADMIN])
    captured = capsys.readouterr()
    assert status == 1
    assert "| nonce | ok 5 |" in captured.out
    assert "not the kind's expected reason" in captured.err
