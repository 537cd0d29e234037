"""The operator CLI (``replayguard alerts|vms|principals|status``) run as a subprocess
against a running service: tables for people, ``--json`` for scripts, and exit statuses
that say what went wrong."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from replayguard.cli.operator import table
from replayguard.cli.service_client import printable
from replayguard.http.state import ANALYSTS
from tests.browser.test_console import play_the_story
from tests.conftest import REPO, Api, cli_env, dead_url, run_cli, uid


async def rg(api: Api | None, *args: str, role: str = "analyst", url: str | None = None,
             token: str | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Runs ``python -m replayguard ARGS`` with REPLAYGUARD_URL/TOKEN naming the test service."""
    env = cli_env()
    if api is not None:
        env["REPLAYGUARD_URL"] = url or str(api.client.make_url("/")).rstrip("/")
        env["REPLAYGUARD_TOKEN"] = token if token is not None else api.tokens[role]
    elif url is not None:
        env["REPLAYGUARD_URL"] = url
    if token is not None:
        env["REPLAYGUARD_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "replayguard", *args, env=env, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_alerts_list_show_and_ack(api: Api) -> None:
    """list finds the replay alert (table and JSON), show has its evidence, ack writes it to the ledger."""
    vm_id, principal, alert_id = await play_the_story(api)
    code, out, err = await rg(api, "alerts", "list", "--vm", vm_id)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["ID", "SEVERITY", "KIND", "STATUS", "VM", "PRINCIPAL", "COUNT", "LAST", "SEEN"]
    assert row.split()[:6] == [alert_id, "critical", "replay_after_rollback", "open", vm_id, principal]
    assert header.index("KIND") == row.index("replay_after_rollback")  # aligned columns

    code, out, _ = await rg(api, "alerts", "list", "--vm", vm_id, "--json")
    assert code == 0 and [a["id"] for a in json.loads(out)["items"]] == [alert_id]

    code, out, _ = await rg(api, "alerts", "show", alert_id)
    assert code == 0 and "rollback windows" in out and "snapshot.reverted" in out and principal in out

    code, out, err = await rg(api, "alerts", "ack", alert_id, "--note", "isolated\nthe VM")
    assert code == 0, err
    _status, alert = await api.get(f"/v1/alerts/{alert_id}")
    assert alert["status"] == "acknowledged" and alert["acknowledged"]["note"] == "isolated\nthe VM"
    code, out, _ = await rg(api, "alerts", "show", alert_id)
    assert "isolated\\nthe VM" in out  # a note's new line cannot break the layout


async def test_exit_statuses(api: Api) -> None:
    """Not found is 5, a refused token 4, a refused request 6, an unreachable service 3, no token 2."""
    assert (await rg(api, "alerts", "show", "999999999"))[0] == 5
    code, _, err = await rg(api, "alerts", "list", role="callout")
    assert code == 4 and "403" in err
    assert (await rg(api, "alerts", "list", token="rgt_" + "x" * 43))[0] == 4
    code, _, err = await rg(api, "alerts", "list", "--severity", "urgent")
    assert code == 6 and "severity" in err
    with dead_url() as url:
        code, _, err = await rg(None, "status", url=url, token="t")
    assert code == 3 and "cannot reach" in err
    code, _, err = await rg(None, "alerts", "list", url="http://127.0.0.1:1")
    assert code == 2 and "REPLAYGUARD_TOKEN" in err and "Traceback" not in err


async def test_follow_prints_alerts_as_they_come(api: Api) -> None:
    """follow --json prints the new alert as a JSON line while it happens, then exits after --count."""
    feed = api.client.app[ANALYSTS].feed
    before = len(feed.streams.open)
    env = cli_env(REPLAYGUARD_URL=str(api.client.make_url("/")).rstrip("/"), REPLAYGUARD_TOKEN=api.tokens["analyst"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replayguard", "alerts", "follow", "--json", "--count", "1", env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            while len(feed.streams.open) <= before:  # connected: the alert below cannot be missed
                await asyncio.sleep(0.05)
        vm_id = uid("vm")
        body = {"vm_id": vm_id, "scope": uid("scope"), "nonce": uid("n")}
        await api.post("/v1/nonces/consume", body)
        _status, second = await api.post("/v1/nonces/consume", body)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    alert = json.loads(out.splitlines()[0])
    assert (alert["id"], alert["vm_id"], alert["kind"]) == (second["alert_id"], vm_id, "reuse")


async def test_vms_and_a_timeline(api: Api) -> None:
    """vms lists the VM with its rollback; --timeline shows the revert and the window."""
    vm_id, _, alert_id = await play_the_story(api)
    code, out, _ = await rg(api, "vms", "--json")
    mine = [v for v in json.loads(out)["items"] if v["vm_id"] == vm_id]
    assert code == 0 and mine[0]["rollbacks"] == 1
    code, out, _ = await rg(api, "vms")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["VM", "EPOCH", "ROLLBACKS"]
    code, out, _ = await rg(api, "vms", "--timeline", vm_id)
    assert code == 0 and "snapshot.reverted" in out and "rollback windows" in out
    assert "otp reject (replay_after_rollback)" in out and alert_id in out
    assert (await rg(api, "vms", "--timeline", uid("nope")))[0] == 5


async def test_principals_list_and_unlock(api_factory: Any) -> None:
    """An admin lists a locked principal and unlocks it; an analyst token may not."""
    api: Api = await api_factory(lockout_threshold=2, lockout_period_s=3600)
    principal = uid("alice")
    await api.enroll(principal)
    for _ in range(2):
        await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": "000000"})
    code, out, _ = await rg(api, "principals", "list", "--json", role="admin")
    row = next(p for p in json.loads(out)["items"] if p["principal"] == principal)
    assert code == 0 and row["locked"] is True
    assert (await rg(api, "principals", "unlock", principal, role="analyst"))[0] == 4
    code, out, err = await rg(api, "principals", "unlock", principal, "--note", "help desk", role="admin")
    assert code == 0 and "unlocked (was locked: yes" in out, err
    code, out, _ = await rg(api, "principals", "list", role="admin")
    line = next(ln for ln in out.splitlines() if ln.startswith(principal))
    assert line.split()[1] == "no"


async def test_vms_clear_lifts_a_refusal_with_an_admin_token(api_factory: Any) -> None:
    """Under receipt_reaction=refuse, a VM the hypervisor reported reverted refuses until
    `vms clear VM --note` with an admin token lifts it (the note in the ledger); an analyst
    token may not (4), an unknown VM is 5, a note the service refuses is 6, no --note or
    --timeline with clear is 2; flags go before or after the subcommand."""
    api: Api = await api_factory(receipt_reaction="refuse")
    vm_id = uid("web-01")
    status, answer = await api.post("/v1/hypervisor/events", {"event_id": uid("evt"), "type": "vm.restored",
                                                              "vm_id": vm_id}, role="hypervisor")
    assert status == 202, answer

    async def consume() -> str:
        _status, decision = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "cli", "nonce": uid("n")})
        return str(decision["reason"])

    assert await consume() == "locked_out"
    assert (await rg(api, "vms", "clear", vm_id, "--note", "restore planned", role="analyst"))[0] == 4
    assert await consume() == "locked_out"
    code, out, err = await rg(api, "vms", "clear", vm_id, "--note", "restore planned, ticket 4411", role="admin")
    assert code == 0, err
    assert out.startswith(f"{vm_id} cleared (was refusing: yes (vm.restored); ledger seq "), out
    assert await consume() == "ok"
    async with api.runtime.pool.acquire() as conn:
        note = await conn.fetchval("SELECT payload->>'note' FROM ledger WHERE kind = 'vm_cleared' AND vm_id = $1",
                                   vm_id)
    assert note == "restore planned, ticket 4411"
    code, out, err = await rg(api, "vms", "--json", "clear", vm_id, "--note", "again", role="admin")
    assert code == 0 and json.loads(out)["was_refusing"] is False, (out, err)
    code, out, err = await rg(api, "vms", "clear", vm_id, "--note", "again", "--json", role="admin")
    assert code == 0 and json.loads(out)["vm_id"] == vm_id, (out, err)
    assert (await rg(api, "vms", "clear", uid("nope"), "--note", "x", role="admin"))[0] == 5
    code, _, err = await rg(api, "vms", "clear", vm_id, "--note", "two\nlines", role="admin")
    assert code == 6 and "note" in err, err
    code, _, err = await rg(api, "vms", "clear", vm_id, role="admin")
    assert code == 2 and "--note" in err, err
    code, _, err = await rg(api, "vms", "--timeline", vm_id, "clear", vm_id, "--note", "x", role="admin")
    assert code == 2 and "--timeline" in err, err


async def test_status_reports_and_fails_on_a_bad_ledger(api: Api) -> None:
    """status prints health, readiness, head and sinks (exit 0); --json is the same facts for scripts."""
    code, out, err = await rg(api, "status", "--verify")
    assert code == 0, err
    assert "ledger head" in out and "verify" in out and "ok," in out and "witnesses" in out
    code, out, _ = await rg(api, "status", "--json")
    report = json.loads(out)
    assert code == 0 and report["ready"] is True and report["ledger"]["head"]["seq"] >= 0


@pytest.mark.parametrize(("value", "shown"), [
    ("web-01", "web-01"), ("a\x1b[31mred", "a\\x1b[31mred"), ("line\nbreak", "line\\nbreak"),
    ("rtl\u202eexe", "rtl\\u202eexe"), (None, "—"), (5, "5"),
])
def test_printable_escapes_what_could_drive_a_terminal(value: object, shown: str) -> None:
    """Control and bidi-format characters are escaped; ordinary text is left alone."""
    assert printable(value) == shown


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    """Each column is as wide as its widest cell; integer columns are right-aligned."""
    text = table([["a", 5], ["bbbb", 123]], ["name", "n"])
    assert text.splitlines() == ["NAME    N", "a       5", "bbbb  123"]


async def test_status_names_witnesses_and_fails_when_one_is_unreachable(
        api_factory: Any, fresh_database: Any, tmp_path: Any) -> None:
    """status lists each witness with its state, and exits 1 while one cannot be reached."""
    from replayguard.settings import Secret

    (tmp_path / "witness").mkdir()
    held, gone = tmp_path / "witness" / "rg.json", tmp_path / "missing" / "rg.json"
    api: Api = await api_factory(database_url=Secret(await fresh_database()), witnesses=(f"file:{held}",))
    code, out, err = await rg(api, "status")
    assert code == 0, err
    assert f"file:{held}: up" in out and "continuity" in out
    api = await api_factory(database_url=Secret(await fresh_database()),
                            witnesses=(f"file:{held}", f"file:{gone}"))
    code, out, _ = await rg(api, "status")
    assert code == 1 and f"file:{gone}: unreachable" in out and "witness_unreachable" in out


async def test_an_answer_that_is_not_json_is_exit_3_in_one_line() -> None:
    """A URL answering 200 with an HTML page (a proxy's, a portal's) makes `status` exit 3 in one line, no traceback."""
    async def portal(_request: web.Request) -> web.Response:
        return web.Response(text="<html>please log in</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", portal)
    async with TestServer(app) as server:
        code, _, err = await rg(None, "status", url=str(server.make_url("/")).rstrip("/"), token="rgt_unchecked")
    assert code == 3 and "did not answer with JSON" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


async def test_a_token_file_that_is_not_utf8_is_exit_2_in_one_line(tmp_path: Path) -> None:
    """A --token-file that is not UTF-8 text is a usage error: exit 2, one line, no traceback."""
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xff\xfe\n")
    token_file.chmod(0o600)
    code, _, err = await rg(None, "status", "--url", "http://127.0.0.1:1", "--token-file", str(token_file))
    assert code == 2 and "is not UTF-8 text" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_token_file_with_a_second_line_is_one_line_without_the_token(tmp_path: Path) -> None:
    """A token file holding more than the token (a second line) stops the operator CLI with
    one error line, exit 2, printing neither a traceback nor the token."""
    token = "rgt_Zq8TestTokenSecretPart1234567890"
    token_file = tmp_path / "token"
    token_file.write_text(f"{token}\nrotated 2026-12-01\n")
    token_file.chmod(0o600)
    with dead_url() as url:
        done = run_cli("alerts", "list", "--url", url, "--token-file", str(token_file), env=cli_env())
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "Zq8TestTokenSecretPart" not in output, output
    assert done.returncode == 2 and done.stderr.count("\n") == 1, output


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:abc", "http://127.0.0.1:70000",
                                 "http://exa mple.com", "http://"])
def test_operator_command_with_a_malformed_url_is_one_line(url: str) -> None:
    """A malformed --url (an unclosed IPv6 bracket, a port that is not a number or out of
    range, a space in the host, no host) stops the operator CLI with one line naming the URL
    and exit 2 (usage), never a traceback."""
    done = run_cli("status", "--url", url, env=cli_env(REPLAYGUARD_TOKEN="rgt_" + "a" * 43))
    assert done.returncode == 2 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-300:])
    assert len(done.stderr.strip().splitlines()) == 1 and "the service URL" in done.stderr, done.stderr
