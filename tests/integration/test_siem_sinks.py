"""SIEM formats against receivers that check what each format requires: ECS documents
and OCSF Detection Findings (file and webhook sinks), Splunk's HTTP Event Collector, and
``replayguard sinks test``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from replayguard.cli.sinks import probe_record
from replayguard.core import siem
from replayguard.settings import Secret
from replayguard.sinks import parse_sink_spec
from tests.api.test_rollback_attack import alice, event, login
from tests.conftest import REPO, Api, cli_env, uid
from tests.waiting import until

# ECS 8.x allowed values (ecs/schemas/event.yml) and which types each category admits.
ECS_KINDS = {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error", "signal"}
ECS_CATEGORY_TYPES = {
    "authentication": {"start", "end", "info"}, "database": {"access", "change", "info", "error"},
    "intrusion_detection": {"allowed", "denied", "info"},
}
OCSF_REQUIRED = ("activity_id", "category_uid", "class_uid", "finding_info", "metadata", "severity_id", "time",
                 "type_uid")


def ecs_problems(doc: dict[str, Any]) -> list[str]:
    """What an ECS 8 document of ours lacks or gets wrong (empty when valid)."""
    problems = []
    try:
        datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00"))
    except (KeyError, ValueError, AttributeError):
        problems.append("@timestamp")
    if not str(doc.get("ecs", {}).get("version", "")).startswith("8."):
        problems.append("ecs.version")
    ev = doc.get("event", {})
    if ev.get("kind") not in ECS_KINDS:
        problems.append("event.kind")
    for category in ev.get("category", []):
        allowed = ECS_CATEGORY_TYPES.get(category)
        if allowed is None or not set(ev.get("type", [])) <= allowed:
            problems.append(f"event.category/type {category}/{ev.get('type')}")
    if not ev.get("category") or not isinstance(ev.get("category"), list):
        problems.append("event.category")
    if "severity" in ev and not isinstance(ev["severity"], int):
        problems.append("event.severity")
    if not isinstance(doc.get("message"), str):
        problems.append("message")
    for field, key in (("host", "name"), ("user", "name")):
        if field in doc and not isinstance(doc[field].get(key), str):
            problems.append(f"{field}.{key}")
    return problems


def ocsf_problems(doc: dict[str, Any]) -> list[str]:
    """What an OCSF 1.1 Detection Finding lacks or gets wrong (empty when valid)."""
    problems = [name for name in OCSF_REQUIRED if name not in doc]
    if problems:
        return problems
    if (doc["class_uid"], doc["category_uid"]) != (2004, 2):
        problems.append("class/category")
    if doc["activity_id"] not in (0, 1, 2, 3, 99) or doc["type_uid"] != 2004 * 100 + doc["activity_id"]:
        problems.append("activity_id/type_uid")
    if doc["severity_id"] not in (0, 1, 2, 3, 4, 5, 6, 99):
        problems.append("severity_id")
    if not isinstance(doc["time"], int):
        problems.append("time")
    product = doc["metadata"].get("product", {})
    if not doc["metadata"].get("version") or not product.get("vendor_name") or not product.get("name"):
        problems.append("metadata")
    if not doc["finding_info"].get("uid") or not doc["finding_info"].get("title"):
        problems.append("finding_info")
    return problems


class Receivers:
    """One aiohttp server: /ecs and /ocsf (webhooks) and /services/collector/event (Splunk HEC)."""

    def __init__(self, hec_token: str) -> None:
        self.port = 0  # bound at start: the server reports the port it took
        self.hec_token = hec_token
        self.ecs: list[dict[str, Any]] = []
        self.ocsf: list[dict[str, Any]] = []
        self.hec: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _ecs(self, request: web.Request) -> web.Response:
        doc = await request.json()
        problems = ecs_problems(doc)
        if problems:
            self.refused.append(f"ecs {problems}")
            return web.json_response({"error": problems}, status=400)
        self.ecs.append(doc)
        return web.json_response({"ok": True})

    async def _ocsf(self, request: web.Request) -> web.Response:
        doc = await request.json()
        problems = ocsf_problems(doc)
        if problems:
            self.refused.append(f"ocsf {problems}")
            return web.json_response({"error": problems}, status=400)
        self.ocsf.append(doc)
        return web.json_response({"ok": True})

    async def _hec(self, request: web.Request) -> web.Response:
        """HEC's /services/collector/event: a token, then one or more JSON event objects."""
        if request.headers.get("Authorization") != f"Splunk {self.hec_token}":
            self.refused.append("hec token")
            return web.json_response({"text": "Invalid token", "code": 4}, status=403)
        decoder, raw, at, events = json.JSONDecoder(), (await request.read()).decode(), 0, []
        while at < len(raw):
            try:
                item, at = decoder.raw_decode(raw, at)
            except ValueError:
                return web.json_response({"text": "Invalid data format", "code": 6}, status=400)
            while at < len(raw) and raw[at].isspace():
                at += 1
            if not isinstance(item, dict) or not item.get("event"):
                return web.json_response({"text": "Event field is required", "code": 12}, status=400)
            if "time" in item and not isinstance(item["time"], (int, float)):
                return web.json_response({"text": "Invalid time", "code": 6}, status=400)
            for key in ("host", "source", "sourcetype", "index"):
                if key in item and not isinstance(item[key], str):
                    return web.json_response({"text": f"Invalid {key}", "code": 6}, status=400)
            events.append(item)
        if not events:
            return web.json_response({"text": "No data", "code": 5}, status=400)
        self.hec += events
        return web.json_response({"text": "Success", "code": 0})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ecs", self._ecs)
        app.router.add_post("/ocsf", self._ocsf)
        app.router.add_post("/services/collector/event", self._hec)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture
async def receivers() -> AsyncIterator[Receivers]:
    server = Receivers("hec-" + uid("token"))
    await server.start()
    yield server
    await server.stop()


def sink_specs(receivers: Receivers, token_file: Path) -> tuple[str, ...]:
    return (f"ecs+webhook:{receivers.url}/ecs", f"ocsf+webhook:{receivers.url}/ocsf",
            f"splunk+{receivers.url}?token_file={token_file}&index=security&sourcetype=replayguard:alert")


async def test_a_replay_alert_reaches_ecs_ocsf_and_splunk_receivers(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], receivers: Receivers,
        tmp_path: Path) -> None:
    """The snapshot-replay alert arrives as a valid ECS document,
    OCSF finding and HEC event, with its VM and principal."""
    token_file = tmp_path / "hec.token"
    token_file.write_text(receivers.hec_token + "\n")
    api: Api = await api_factory(database_url=Secret(await fresh_database()),
                                 sinks=sink_specs(receivers, token_file), checkpoint_every=3)
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    await event(api, vm_id, "snapshot.created", snapshot_id="nightly", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    await login(api, vm_id, principal, code)
    api.clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="nightly")
    alert_id = (await login(api, vm_id, principal, code))["alert_id"]

    def mine(docs: list[dict[str, Any]], path: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
        return [d for d in docs if path(d) == alert_id]

    await until(lambda: bool(mine(receivers.ecs, lambda d: d.get("replayguard", {}).get("alert", {}).get("id"))),
                "the ECS document", timeout=30)
    await until(lambda: bool(mine(receivers.ocsf, lambda d: d["unmapped"]["replayguard"]["alert_id"])),
                "the OCSF finding", timeout=30)
    await until(lambda: bool(mine(receivers.hec, lambda d: d["event"].get("alert_id"))), "the HEC event", timeout=30)
    assert receivers.refused == []

    doc = mine(receivers.ecs, lambda d: d.get("replayguard", {}).get("alert", {}).get("id"))[0]
    names = (doc["rule"]["name"], doc["host"]["name"], doc["user"]["name"])
    assert names == ("replay_after_rollback", vm_id, principal)
    assert doc["event"]["severity"] == siem.ECS_SEVERITY["critical"]
    finding = mine(receivers.ocsf, lambda d: d["unmapped"]["replayguard"]["alert_id"])[0]
    assert (finding["severity_id"], finding["resources"][0]["uid"], finding["actor"]["user"]["name"]) == (
        5, vm_id, principal)
    hec = mine(receivers.hec, lambda d: d["event"].get("alert_id"))[0]
    assert (hec["index"], hec["sourcetype"], hec["event"]["kind"]) == ("security", "replayguard:alert",
                                                                    "replay_after_rollback")
    assert code not in json.dumps([receivers.ecs, receivers.ocsf, receivers.hec])

    # Checkpoints go to ECS (state) and Splunk, never to OCSF (not a finding).
    await until(lambda: any(d["event"]["kind"] == "state" for d in receivers.ecs), "an ECS checkpoint", timeout=30)
    assert all(d["class_uid"] == 2004 for d in receivers.ocsf)


async def test_a_wrong_hec_token_is_retried_until_the_file_is_fixed(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], receivers: Receivers,
        tmp_path: Path) -> None:
    """HEC's 403 keeps the alert in the outbox; once the token file is right it is delivered."""
    token_file = tmp_path / "hec.token"
    token_file.write_text("wrong-token")
    api: Api = await api_factory(database_url=Secret(await fresh_database()),
                                 sinks=(f"splunk+{receivers.url}?token_file={token_file}",))
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": uid("n")}
    await api.post("/v1/nonces/consume", body)
    alert_id = (await api.post("/v1/nonces/consume", body))[1]["alert_id"]
    await until(lambda: "hec token" in receivers.refused, "a refusal", timeout=30)
    token_file.write_text(receivers.hec_token)
    await until(lambda: any(e["event"].get("alert_id") == alert_id for e in receivers.hec), "delivery", 60)


@pytest.mark.parametrize(("spec", "expected"), [
    ("ecs+file:/var/log/rg/ecs.jsonl", {"kind": "file", "format": "ecs"}),
    ("ocsf+webhook:https://siem.example/in", {"kind": "webhook", "format": "ocsf"}),
    ("splunk+https://splunk.example:8088?token_file=/etc/rg/hec", {
        "kind": "splunk", "url": "https://splunk.example:8088/services/collector/event", "index": None}),
    ("splunk+https://s.example/custom/path?token_file=/t&index=sec&sourcetype=rg", {
        "kind": "splunk", "url": "https://s.example/custom/path", "index": "sec", "sourcetype": "rg"}),
])
def test_parse_siem_specs(spec: str, expected: dict[str, Any]) -> None:
    """ecs+/ocsf+ prefixes pick the format; splunk+ takes the HEC URL and options."""
    config = parse_sink_spec(spec)
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("ecs+syslog+udp://h:514", "goes before file: or webhook:"),
    ("splunk+https://h:8088", "token_file"),
    ("splunk+https://h:8088?token_file=relative", "absolute"),
    ("splunk+https://user:secret@h:8088?token_file=/t", "not the URL"),
    ("splunk+https://h:8088?token_file=/t&token=abc", "unknown option"),
])
def test_parse_siem_spec_errors(spec: str, message: str) -> None:
    """Bad SIEM specs are refused with a sentence naming the problem, never echoing a password."""
    with pytest.raises(ValueError, match=message) as info:
        parse_sink_spec(spec)
    assert "secret" not in str(info.value)


def test_the_formats_of_a_test_alert_are_valid() -> None:
    """The record ``sinks test`` sends is a valid ECS document and OCSF finding; a checkpoint has no OCSF form."""
    record = probe_record(datetime.fromisoformat("2026-11-29T10:05:00+00:00"))
    assert ecs_problems(siem.ecs(record)) == []
    finding = siem.ocsf(record)
    assert finding is not None and ocsf_problems(finding) == []
    checkpoint = {"type": "checkpoint", "id": "checkpoint-5", "seq": 5, "hash": "ab", "ts_us": 1,
                  "created_at": "2026-11-29T10:05:00.000000Z", "algorithm": "ed25519", "key_id": "k",
                  "signature": "cd", "summary": "ledger entry 5 has hash ab"}
    assert ecs_problems(siem.ecs(checkpoint)) == [] and siem.ocsf(checkpoint) is None


async def test_sinks_test_command_reports_each_sink(receivers: Receivers, tmp_path: Path) -> None:
    """``replayguard sinks test`` sends to every sink and exits 1 naming the one that refused."""
    good, bad = tmp_path / "good.token", tmp_path / "bad.token"
    good.write_text(receivers.hec_token)
    bad.write_text("nope")
    out_file = tmp_path / "ecs.jsonl"
    specs = [f"ecs+file:{out_file}", *sink_specs(receivers, good)]

    async def run(sinks: list[str]) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "replayguard", "sinks", "test", "--sinks", ",".join(sinks),
            "--data-dir", str(tmp_path / "data"), env=cli_env(), cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    status, out = await run(specs)
    assert status == 0, out
    assert out.count(" ok") == 4 and receivers.refused == []
    assert ecs_problems(json.loads(out_file.read_text().splitlines()[0])) == []
    assert [e["event"]["kind"] for e in receivers.hec] == ["sink_test"]
    assert len(receivers.ecs) == len(receivers.ocsf) == 1

    status, out = await run([f"splunk+{receivers.url}?token_file={bad}", f"ecs+file:{out_file}"])
    assert status == 1 and "FAILED: splunk HEC answered 403" in out and "nope" not in out
