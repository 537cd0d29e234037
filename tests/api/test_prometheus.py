"""deploy/prometheus stays true to /metrics: every metric is documented and every rule names a real one."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO, Api

PROM = REPO / "deploy" / "prometheus"
_SUFFIXES = ("_bucket", "_sum", "_count")


async def _exposed(api: Api) -> set[str]:
    resp = await api.client.get("/metrics")
    text = await resp.text()
    return {line.split()[2] for line in text.splitlines()
            if line.startswith("# TYPE ") and not line.split()[2].endswith("_created")}


async def test_every_metric_is_in_the_reference(api: Api) -> None:
    """Each metric family /metrics exposes has a row in deploy/prometheus/README.md, and no row is stale."""
    documented = set(re.findall(r"^\| `(replayguard_[a-z_]+)` \|", (PROM / "README.md").read_text(), re.MULTILINE))
    assert documented == await _exposed(api)


async def test_rules_name_only_exposed_metrics(api: Api) -> None:
    """Every metric an example rule queries exists, and every rule has a summary and a severity."""
    exposed = await _exposed(api)
    rules = yaml.safe_load((PROM / "replayguard-rules.yml").read_text())["groups"][0]["rules"]
    assert rules
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        for name in re.findall(r"replayguard_[a-z_]+", rule["expr"]):
            base = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
            assert base in exposed, (rule["alert"], name)
