"""The detection rules shipped in deploy/: Sigma rules load with pySigma and name alert
kinds the service raises; Prometheus rules pass promtool's check and unit tests and
name only metrics the service exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from replayguard.metrics import Metrics
from tests.conftest import REPO

SIGMA = sorted((REPO / "deploy" / "sigma").glob("*.yml"))
PROMETHEUS = REPO / "deploy" / "prometheus"
# CONTRACT §6 (and v1.1) alert kinds.
KINDS = {"replay_after_rollback", "reuse", "rollback_detected", "clone_detected", "brute_force",
         "clock_regression", "ledger_tamper", "ledger_rollback", "witness_unreachable"}


@pytest.mark.parametrize("path", SIGMA, ids=lambda p: p.name)
def test_sigma_rule_loads_and_names_known_kinds(path: Path) -> None:
    """Each Sigma rule parses with pySigma (no errors), has a level, and selects alert kinds of the contract."""
    sigma = pytest.importorskip("sigma.collection", reason="pysigma is in the test extra")
    collection = sigma.SigmaCollection.from_yaml(path.read_text())
    assert collection.errors == []
    [rule] = collection.rules
    assert rule.level is not None and rule.id is not None and rule.logsource.product == "replayguard"
    raw = yaml.safe_load(path.read_text())
    assert set(raw["detection"]["selection"]["kind"]) <= KINDS


def test_sigma_rule_ids_are_unique() -> None:
    """No two rules share an id (a SIEM keys rules by it)."""
    ids = [yaml.safe_load(p.read_text())["id"] for p in SIGMA]
    assert len(ids) == len(set(ids)) and len(ids) >= 5


def test_prometheus_rules_name_only_exported_metrics() -> None:
    """Every replayguard_* series an expression reads is one the service's registry exports (Redis configured)."""
    exported = {m.name for m in Metrics(redis=True).registry.collect()}
    exported |= {f"{name}_total" for name in exported} | {f"{name}_bucket" for name in exported}
    exported |= {"replayguard_sink_backlog", "replayguard_alert_feed_leader"}  # registered by the alert feed
    rules = yaml.safe_load((PROMETHEUS / "replayguard-rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"replayguard_[a-z_]+", expr)}
    assert used and used <= exported, used - exported


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_prometheus_rules_pass_promtool() -> None:
    """promtool accepts the rule file and its unit tests pass (a replay, a ledger outage and slow ledger
    transactions fire their alerts; a fast instance beside the slow one does not)."""
    check = subprocess.run(["promtool", "check", "rules", "replayguard-rules.yml"], cwd=PROMETHEUS,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "replayguard-rules.test.yml"], cwd=PROMETHEUS,
                          capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr
