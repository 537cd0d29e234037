"""The Proxmox task poller over HTTP: a stand-in PVE API, a flaky stand-in service, the real service.

The stand-in PVE API serves the recorded ``pvesh`` output of ``tests/data/proxmox/`` under
``/api2/json`` (wrapped in ``{"data": ...}`` as the REST API does) and refuses any other
token; the stand-in replayguard records every body and can be told to fail the first
requests. The real service is the ``api`` fixture's in-process server on loopback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from replayguard.relay.proxmox import (
    CURSOR_FILE,
    EX_TEMPFAIL,
    ApiLookup,
    Outbox,
    PollerConfig,
    deliver_file,
    poll_once,
    post_json,
    run_poller,
)
from replayguard.settings import Secret
from tests.conftest import REPO, Api, cli_env, dead_url, uid

DATA = REPO / "tests" / "data" / "proxmox"
LISTING: list[dict[str, Any]] = orjson.loads((DATA / "cluster-tasks.json").read_bytes())
SNAPSHOTS = orjson.loads((DATA / "snapshot-pve1-101.json").read_bytes())
CLONE_LOG = orjson.loads((DATA / "task-log-qmclone.json").read_bytes())
CT_LISTING: list[dict[str, Any]] = orjson.loads((DATA / "cluster-tasks-lxc.json").read_bytes())
CT_SNAPSHOTS = orjson.loads((DATA / "snapshot-pve1-120.json").read_bytes())
LOGS = {"qmclone": "task-log-qmclone.json", "qmrestore:311": "task-log-qmrestore-vma.json",
        "qmrestore:102": "task-log-qmrestore-pbs.json", "vzclone": "task-log-vzclone.json",
        "vzrestore:122": "task-log-vzrestore-tar.json",
        "vzrestore:124": "task-log-vzrestore-pbs.json"}  # by UPID type[:vmid]
PVE_TOKEN = "replayguard@pve!poller=0b7d0c8e-3f51-4d0a-b6a4-5c0f0e2b9d11"
SERVICE_TOKEN = "hv-token-proxmox-test"
FORWARDED = {t["upid"] for t in LISTING if t.get("endtime") and t["type"].startswith("qm")
             and (t["status"] == "OK" or t["status"].startswith("WARNINGS"))}
WAIT = 20.0


@dataclass
class StandIn:
    """A stand-in replayguard: records bodies and headers, fails the first ``fail`` posts."""

    fail: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    calls: int = 0
    forbidden: set[str] = field(default_factory=set)  # UPIDs answered 403, as for a VM the token is not bound to

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.auth.append(request.headers.get("Authorization", ""))
        if self.calls <= self.fail:
            return web.json_response({"error": {"code": "unavailable"}}, status=503)
        assert request.query["source"] == "proxmox"
        body = await request.json()
        if body["upid"] in self.forbidden:
            return web.json_response({"error": {"code": "forbidden", "message": "not bound to this VM"}}, status=403)
        self.bodies.append(body)
        return web.json_response({"accepted": True, "duplicate": False, "events": 1}, status=202)


def pve_api(listing: list[dict[str, Any]]) -> web.Application:
    """The Proxmox API endpoints the poller reads, from recorded output."""

    def authorised(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"PVEAPIToken={PVE_TOKEN}":
            raise web.HTTPUnauthorized(text='{"data": null}', content_type="application/json")

    async def tasks(request: web.Request) -> web.Response:
        authorised(request)
        return web.json_response({"data": listing})

    async def snapshots(request: web.Request) -> web.Response:
        authorised(request)
        if (request.match_info["node"], request.match_info["vmid"]) != ("pve1", "101"):
            return web.json_response({"data": None}, status=500)
        return web.json_response({"data": SNAPSHOTS})

    async def ct_snapshots(request: web.Request) -> web.Response:
        authorised(request)
        if (request.match_info["node"], request.match_info["vmid"]) != ("pve1", "120"):
            return web.json_response({"data": None}, status=500)
        return web.json_response({"data": CT_SNAPSHOTS})

    async def task_log(request: web.Request) -> web.Response:
        authorised(request)
        upid = request.match_info["upid"]
        assert upid.startswith(f"UPID:{request.match_info['node']}:")
        _, _, _, _, _, kind, vmid, *_ = upid.split(":")
        name = LOGS.get(f"{kind}:{vmid}") or LOGS.get(kind)
        if name is None:
            return web.json_response({"data": None}, status=500)
        lines = orjson.loads((DATA / name).read_bytes())
        return web.json_response({"data": lines, "total": len(lines)})

    app = web.Application()
    app.router.add_get("/api2/json/cluster/tasks", tasks)
    app.router.add_get("/api2/json/nodes/{node}/qemu/{vmid}/snapshot", snapshots)
    app.router.add_get("/api2/json/nodes/{node}/lxc/{vmid}/snapshot", ct_snapshots)
    app.router.add_get("/api2/json/nodes/{node}/tasks/{upid}/log", task_log)
    return app


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest_asyncio.fixture
async def pve() -> AsyncIterator[tuple[TestServer, list[dict[str, Any]]]]:
    """A stand-in PVE API whose task list the test may change between polls."""
    listing = list(LISTING)
    server = await serve(pve_api(listing))
    yield server, listing
    await server.close()


@pytest_asyncio.fixture
async def stand_in() -> AsyncIterator[tuple[StandIn, TestServer]]:
    """A stand-in replayguard that fails its first two posts with 503."""
    recorder = StandIn(fail=2)
    app = web.Application()
    app.router.add_post("/v1/hypervisor/events", recorder.handle)
    server = await serve(app)
    yield recorder, server
    await server.close()


def config(service_url: str, spool: Path, pve_url: str | None, **extra: Any) -> PollerConfig:
    values: dict[str, Any] = {"once": True, "attempts": 10, "retry_base": 0.01, **extra}
    return PollerConfig(service_url=service_url, token=Secret(SERVICE_TOKEN), spool_dir=spool,
                        api_url=pve_url, api_token=Secret(PVE_TOKEN), **values)


def base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_poller_retries_through_failures_and_posts_each_task_once(
    pve: tuple[TestServer, list[dict[str, Any]]], stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """Two 503s are retried with backoff; every forwarded task
    arrives once, with its lookups, and a re-poll adds nothing."""
    (api_server, _), (recorder, service) = pve, stand_in
    cfg = config(base(service), tmp_path, base(api_server))
    assert await run_poller(cfg) == 0
    assert recorder.calls == len(FORWARDED) + 2
    assert {b["upid"] for b in recorder.bodies} == FORWARDED and len(recorder.bodies) == len(FORWARDED)
    assert set(recorder.auth) == {f"Bearer {SERVICE_TOKEN}"}
    by_type = {b["type"]: b for b in recorder.bodies}
    assert by_type["qmrollback"]["snapshot"] == by_type["qmsnapshot"]["snapshot"] == "pre-patch"
    assert by_type["qmclone"]["target_vmid"] == 205
    assert {b["id"]: b["backup_vmid"] for b in recorder.bodies if b["type"] == "qmrestore"} == {
        "311": 101, "102": 102}
    assert await run_poller(cfg) == 0 and len(recorder.bodies) == len(FORWARDED)
    assert not Outbox(tmp_path).pending()


async def test_a_task_running_at_one_poll_is_posted_when_it_has_finished(
    pve: tuple[TestServer, list[dict[str, Any]]], stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """The qmsnapshot still running at the first poll is posted by the poll after it ends."""
    (api_server, listing), (recorder, service) = pve, stand_in
    cfg = config(base(service), tmp_path, base(api_server))
    await run_poller(cfg)
    running = listing[0]
    assert "endtime" not in running
    listing[0] = {**running, "endtime": running["starttime"] + 4, "status": "OK"}
    await run_poller(cfg)
    assert recorder.bodies[-1]["upid"] == running["upid"] and recorder.bodies[-1]["status"] == "OK"


async def test_wrong_pve_token_posts_nothing_and_moves_no_cursor(
    pve: tuple[TestServer, list[dict[str, Any]]], stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """When PVE refuses the API token the run fails temporarily and leaves no cursor behind."""
    (api_server, _), (recorder, service) = pve, stand_in
    cfg = config(base(service), tmp_path, base(api_server))
    bad = PollerConfig(**{**cfg.__dict__, "api_token": Secret("replayguard@pve!poller=wrong")})
    assert await run_poller(bad) == EX_TEMPFAIL
    assert recorder.calls == 0 and not (tmp_path / CURSOR_FILE).exists()


async def test_records_survive_a_dead_service_until_the_next_run(
    pve: tuple[TestServer, list[dict[str, Any]]], stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """With nothing listening the records stay spooled (exit 75) and the next run delivers them."""
    (api_server, _), (recorder, service) = pve, stand_in
    with dead_url() as url:
        assert await run_poller(config(url, tmp_path, base(api_server), attempts=2)) == EX_TEMPFAIL
    assert len(Outbox(tmp_path).pending()) == len(FORWARDED)
    assert await run_poller(config(base(service), tmp_path, base(api_server))) == 0
    assert {b["upid"] for b in recorder.bodies} == FORWARDED


async def test_a_once_run_sets_aside_a_record_refused_for_itself_and_moves_its_cursor(
    pve: tuple[TestServer, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A --once run whose service refuses one record for itself (403: the restore into VM 311
    names a VM the token is not bound to) delivers the others, sets that one aside in dead/,
    saves its cursor and exits 0; the next run posts nothing again. (The run exited 75
    without saving its cursor, and every later run polled, looked up and posted every task
    since again, for ever.)"""
    (api_server, _) = pve
    refused = next(t["upid"] for t in LISTING if t["type"] == "qmrestore" and t["id"] == "311")
    recorder = StandIn(forbidden={refused})
    app = web.Application()
    app.router.add_post("/v1/hypervisor/events", recorder.handle)
    service = await serve(app)
    try:
        cfg = config(base(service), tmp_path, base(api_server))
        assert await run_poller(cfg) == 0
        assert {b["upid"] for b in recorder.bodies} == FORWARDED - {refused}
        assert (tmp_path / CURSOR_FILE).exists() and not Outbox(tmp_path).pending()
        (letter,) = Outbox(tmp_path).dead_letters()
        assert orjson.loads(letter.read_bytes())["upid"] == refused
        calls = recorder.calls
        assert await run_poller(cfg) == 0
        assert recorder.calls == calls
    finally:
        await service.close()


async def test_a_once_run_that_cannot_deliver_still_moves_its_cursor(
    pve: tuple[TestServer, list[dict[str, Any]]], stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """With the service down a --once run exits 75 with its records spooled, yet saves its
    cursor: the next run sends the spooled records and polls only what is new, instead of
    looking every task up again."""
    (api_server, _), (recorder, service) = pve, stand_in
    with dead_url() as url:
        assert await run_poller(config(url, tmp_path, base(api_server), attempts=2)) == EX_TEMPFAIL
    assert (tmp_path / CURSOR_FILE).exists()
    cursor = orjson.loads((tmp_path / CURSOR_FILE).read_bytes())
    assert set(cursor["seen"]) >= FORWARDED
    assert await run_poller(config(base(service), tmp_path, base(api_server))) == 0
    assert sorted(b["upid"] for b in recorder.bodies) == sorted(FORWARDED)


async def test_cli_reads_pvesh_output_on_stdin(stand_in: tuple[StandIn, TestServer], tmp_path: Path) -> None:
    """`pvesh get /cluster/tasks --output-format json | python -m
    replayguard.relay.proxmox --from-stdin` posts every task."""
    recorder, service = stand_in
    token = tmp_path / "token"
    token.write_text(SERVICE_TOKEN + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replayguard.relay.proxmox", "--from-stdin", "--lookup", "none",
        "--service-url", base(service), "--token-file", str(token), "--spool-dir", str(tmp_path / "spool"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(), cwd=REPO)
    out, err = await asyncio.wait_for(proc.communicate((DATA / "cluster-tasks.json").read_bytes()), WAIT)
    assert proc.returncode == 0, err.decode()
    forwarded_without_target = FORWARDED - {t["upid"] for t in LISTING if t["type"] == "qmclone"}
    assert {b["upid"] for b in recorder.bodies} == forwarded_without_target
    assert SERVICE_TOKEN.encode() not in out + err


async def test_cli_refuses_a_missing_source_with_status_2(tmp_path: Path) -> None:
    """With neither --api-url nor --from-stdin the poller says what is missing and exits 2."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replayguard.relay.proxmox", "--service-url", "http://127.0.0.1:1",
        "--spool-dir", str(tmp_path), stderr=asyncio.subprocess.PIPE,
        env=cli_env(REPLAYGUARD_RELAY_TOKEN="t"), cwd=REPO)
    _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 2 and b"--api-url" in err


async def test_real_service_accepts_each_record_and_answers_a_repost_as_duplicate(
    api: Api, pve: tuple[TestServer, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Every record built from the recorded tasks is accepted
    (202) by replayguard, and posted again is duplicate:true."""
    api_server, _ = pve
    url = str(api.client.make_url("/v1/hypervisor/events?source=proxmox"))
    token = Secret(api.tokens["hypervisor"])
    outbox = Outbox(tmp_path)
    async with aiohttp.ClientSession() as session:
        lookup = ApiLookup(session, base(api_server), Secret(PVE_TOKEN))
        await poll_once(await lookup.get("/cluster/tasks"), state_dir=tmp_path, outbox=outbox,
                        lookup=lookup, cluster=uid("pve"), now=LISTING[0]["starttime"], retention_s=86400)

        async def post(data: bytes) -> Any:
            return await post_json(session, url, token, data)

        for path in outbox.pending():
            data = path.read_bytes()
            _, first = await deliver_file(outbox, path, post, "upid")
            assert (first.status, first.body["accepted"], first.body["duplicate"]) == (202, True, False), first
            again = await post(data)
            assert (again.status, again.body["duplicate"]) == (202, True), again
    assert not outbox.pending()


async def test_long_running_poller_delivers_and_stops_on_request(
    pve: tuple[TestServer, list[dict[str, Any]]], stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """Without --once the poller keeps polling and delivering until its stop event is set."""
    (api_server, _), (recorder, service) = pve, stand_in
    cfg = config(base(service), tmp_path, base(api_server), once=False, interval=0.05)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_poller(cfg, stop=stop))
    async with asyncio.timeout(WAIT):
        while {b["upid"] for b in recorder.bodies} != FORWARDED:
            await asyncio.sleep(0.01)
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == 0
    assert len(recorder.bodies) == len(FORWARDED)


def fake_pvesh(directory: Path) -> Path:
    """A `pvesh` stand-in that prints the recorded lookups, as on a PVE node."""
    script = directory / "pvesh"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"data = {str(DATA)!r}\n"
        "path = sys.argv[2]\n"
        "if path == '/nodes/pve1/qemu/101/snapshot': name = 'snapshot-pve1-101.json'\n"
        "elif path.startswith('/nodes/pve1/tasks/UPID:pve1:') and ':qmclone:' in path:\n"
        "    name = 'task-log-qmclone.json'\n"
        "elif path.startswith('/nodes/pve1/tasks/UPID:pve1:') and ':qmrestore:311:' in path:\n"
        "    name = 'task-log-qmrestore-vma.json'\n"
        "elif path.startswith('/nodes/pve2/tasks/UPID:pve2:') and ':qmrestore:102:' in path:\n"
        "    name = 'task-log-qmrestore-pbs.json'\n"
        "elif path == '/nodes/pve1/lxc/120/snapshot': name = 'snapshot-pve1-120.json'\n"
        "elif path.startswith('/nodes/pve1/tasks/UPID:pve1:') and ':vzclone:120:' in path:\n"
        "    name = 'task-log-vzclone.json'\n"
        "elif path.startswith('/nodes/pve1/tasks/UPID:pve1:') and ':vzrestore:122:' in path:\n"
        "    name = 'task-log-vzrestore-tar.json'\n"
        "elif path.startswith('/nodes/pve2/tasks/UPID:pve2:') and ':vzrestore:124:' in path:\n"
        "    name = 'task-log-vzrestore-pbs.json'\n"
        "else: sys.exit(2)\n"
        "sys.stdout.write(open(f'{data}/{name}').read())\n"
    )
    script.chmod(0o755)
    return directory


async def test_cli_from_stdin_reads_lookups_with_pvesh(stand_in: tuple[StandIn, TestServer], tmp_path: Path) -> None:
    """In cron mode with `pvesh` on PATH, snapshot names and the clone target come from `pvesh get`."""
    recorder, service = stand_in
    path = f"{fake_pvesh(tmp_path)}:{cli_env().get('PATH', '/usr/bin:/bin')}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replayguard.relay.proxmox", "--from-stdin",
        "--service-url", base(service), "--spool-dir", str(tmp_path / "spool"),
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(PATH=path, REPLAYGUARD_RELAY_TOKEN=SERVICE_TOKEN), cwd=REPO)
    _, err = await asyncio.wait_for(proc.communicate((DATA / "cluster-tasks.json").read_bytes()), WAIT)
    assert proc.returncode == 0, err.decode()
    by_type = {b["type"]: b for b in recorder.bodies}
    assert {b["upid"] for b in recorder.bodies} == FORWARDED
    assert by_type["qmrollback"]["snapshot"] == "pre-patch" and by_type["qmclone"]["target_vmid"] == 205
    assert {b["id"]: b["backup_vmid"] for b in recorder.bodies if b["type"] == "qmrestore"} == {
        "311": 101, "102": 102}


async def test_cli_from_stdin_reads_container_lookups_with_pvesh(
    stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """In cron mode a container's snapshot comes from `pvesh get /nodes/N/lxc/VMID/snapshot`
    and its clone's and restores' details from their task logs."""
    recorder, service = stand_in
    path = f"{fake_pvesh(tmp_path)}:{cli_env().get('PATH', '/usr/bin:/bin')}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replayguard.relay.proxmox", "--from-stdin",
        "--service-url", base(service), "--spool-dir", str(tmp_path / "spool"),
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(PATH=path, REPLAYGUARD_RELAY_TOKEN=SERVICE_TOKEN), cwd=REPO)
    _, err = await asyncio.wait_for(proc.communicate((DATA / "cluster-tasks-lxc.json").read_bytes()), WAIT)
    assert proc.returncode == 0, err.decode()
    by_type = {b["type"]: b for b in recorder.bodies}
    assert by_type["vzrollback"]["snapshot"] == "pre-upgrade" and by_type["vzclone"]["target_vmid"] == 121
    assert {b["id"]: b["backup_vmid"] for b in recorder.bodies if b["type"] == "vzrestore"} == {
        "122": 120, "124": 124}


async def test_credential_used_on_the_backups_vm_is_a_replay_from_the_vm_restored_into_a_new_vmid(
    api: Api, pve: tuple[TestServer, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """VM 101 is backed up (vzdump, 09:30), uses a nonce at 09:40, and its backup is
    restored as VM 311 (09:52): 311 starts from 101's disk as it was at 09:30, so the nonce
    presented from 311 is a replay of a use its state never saw. Polled from PVE and posted
    to the real service, the restore is a clone of 101 whose window covers that use: the
    replay is refused as replay_after_rollback (not plain reuse). A nonce 101 used before
    the earliest instant the archive's local time can name stays plain `reused`."""
    api_server, listing = pve
    listing[:] = [t for t in LISTING if t["type"] in ("qmrestore", "vzdump") and t["node"] == "pve1"]
    assert sorted(t["type"] for t in listing) == ["qmrestore", "vzdump"]  # nothing else opens a window
    cluster = uid("pve")
    source, restored = f"{cluster}/101", f"{cluster}/311"
    t0 = LISTING[-1]["starttime"] - 12  # 09:00:00Z
    api.clock.now = t0 + 1800 - 15 * 3600  # an hour before the archive's earliest reading
    older = uid("n")
    assert (await consume(api, source, older))["decision"] == "accept"
    api.clock.now = t0 + 2400  # 09:40, after the backup
    after_backup = uid("n")
    assert (await consume(api, source, after_backup))["decision"] == "accept"
    api.clock.now = t0 + 4000  # the restore (09:52:40) has ended; the poller runs
    _, _, answers = await poll_and_deliver(api, api_server, tmp_path, cluster=cluster, now=api.clock.now)
    assert all(answer.status == 202 for answer in answers), answers
    replay = await consume(api, restored, after_backup)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay
    assert (await consume(api, restored, older))["reason"] == "reused"


async def test_with_the_nodes_time_zone_a_use_before_the_backup_is_no_replay_suspect(
    api: Api, pve: tuple[TestServer, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The same restore of VM 101's 09:30 backup as VM 311, polled with --node-timezone UTC
    (the zone pve1 runs): a nonce 101 used at 09:20, before the backup, presented from 311
    is plain `reused`, since 311's state holds that use; one used at 09:40 is still
    replay_after_rollback. (Read at UTC+14:00, the archive's time was 19:30 the day before,
    and the honest 09:20 use was refused as replay_after_rollback and alerted on.)"""
    api_server, listing = pve
    listing[:] = [t for t in LISTING if t["type"] in ("qmrestore", "vzdump") and t["node"] == "pve1"]
    cluster = uid("pve")
    source, restored = f"{cluster}/101", f"{cluster}/311"
    t0 = LISTING[-1]["starttime"] - 12  # 09:00:00Z
    api.clock.now = t0 + 1200  # 09:20, before the backup
    before_backup = uid("n")
    assert (await consume(api, source, before_backup))["decision"] == "accept"
    api.clock.now = t0 + 2400  # 09:40, after the backup
    after_backup = uid("n")
    assert (await consume(api, source, after_backup))["decision"] == "accept"
    api.clock.now = t0 + 4000
    _, bodies, answers = await poll_and_deliver(api, api_server, tmp_path, cluster=cluster, now=api.clock.now,
                                                zone=ZoneInfo("UTC"))
    assert all(answer.status == 202 for answer in answers), answers
    assert [b["snapshot_created_at"] for b in bodies if b["type"] == "qmrestore"] == [t0 + 1800]
    assert (await consume(api, restored, before_backup))["reason"] == "reused"
    replay = await consume(api, restored, after_backup)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay


async def test_credential_used_after_a_container_snapshot_is_a_replay_after_its_rollback(
    api: Api, pve: tuple[TestServer, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Container 120 (a PAM/RADIUS stack) is snapshotted at 12:10:01 (pct snapshot), uses a
    nonce at 12:11:40, and is rolled back to that snapshot at 12:20 (pct rollback). Polled
    from PVE (the snapshot's time read from the container's snapshot list, /lxc/) and posted
    to the real service, the vzrollback opens the window from the snapshot on: the nonce
    presented again is replay_after_rollback. A nonce used before the snapshot stays plain
    `reused`. (Container tasks were not posted at all: the replay was plain `reused`.)"""
    api_server, listing = pve
    listing[:] = [t for t in CT_LISTING if t["type"] in ("vzsnapshot", "vzrollback") and t["id"] == "120"
                  and t["status"] == "OK"]
    assert sorted(t["type"] for t in listing) == ["vzrollback", "vzsnapshot"]  # nothing else opens a window
    cluster = uid("pve")
    container = f"{cluster}/120"
    t1 = min(t["starttime"] for t in listing) - 600  # 12:00:00Z
    api.clock.now = t1 + 500  # before the snapshot
    before = uid("n")
    assert (await consume(api, container, before))["decision"] == "accept"
    api.clock.now = t1 + 700  # after the snapshot (snaptime 12:10:01), before the rollback
    after_snapshot = uid("n")
    assert (await consume(api, container, after_snapshot))["decision"] == "accept"
    api.clock.now = t1 + 1300  # the rollback (12:20:00 - 12:20:09) has ended; the poller runs
    _, bodies, answers = await poll_and_deliver(api, api_server, tmp_path, cluster=cluster, now=api.clock.now)
    assert {b["type"]: b.get("snapshot") for b in bodies} == {"vzsnapshot": "pre-upgrade", "vzrollback": "pre-upgrade"}
    assert all(answer.status == 202 for answer in answers), answers
    replay = await consume(api, container, after_snapshot)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay
    assert (await consume(api, container, before))["reason"] == "reused"


async def test_real_service_accepts_every_container_record(
    api: Api, pve: tuple[TestServer, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Every container task the poller forwards, with its lookups (snapshot list, clone
    and restore task logs), is a record the real service accepts (202)."""
    api_server, listing = pve
    listing[:] = CT_LISTING
    spooled, bodies, answers = await poll_and_deliver(api, api_server, tmp_path, cluster=uid("pve"),
                                                      now=CT_LISTING[0]["starttime"])
    assert all((answer.status, answer.body["accepted"]) == (202, True) for answer in answers), answers
    types = sorted(body["type"] for body in bodies)
    assert spooled == 10 and types == sorted(["vzclone", "vzdelsnapshot", "vzmigrate", "vzrestore", "vzrestore",
                                              "vzrollback", "vzshutdown", "vzsnapshot", "vzstart", "vzstop"])


async def poll_and_deliver(api: Api, api_server: TestServer, tmp_path: Path, *, cluster: str, now: float,
                           zone: tzinfo | None = None) -> tuple[int, list[dict[str, Any]], list[Any]]:
    """One poll of the stand-in PVE API (its lookups through the API) into an outbox, then
    every spooled record posted to the real service: the records spooled, their bodies and
    the service's answers."""
    url = str(api.client.make_url("/v1/hypervisor/events?source=proxmox"))
    outbox = Outbox(tmp_path)
    async with aiohttp.ClientSession() as session:
        lookup = ApiLookup(session, base(api_server), Secret(PVE_TOKEN))
        spooled = await poll_once(await lookup.get("/cluster/tasks"), state_dir=tmp_path, outbox=outbox,
                                  lookup=lookup, cluster=cluster, now=now, retention_s=86400, zone=zone)

        async def post(data: bytes) -> Any:
            return await post_json(session, url, Secret(api.tokens["hypervisor"]), data)

        bodies = [orjson.loads(path.read_bytes()) for path in outbox.pending()]
        answers = [(await deliver_file(outbox, path, post, "upid"))[1] for path in outbox.pending()]
    return spooled, bodies, answers


async def consume(api: Api, vm_id: str, nonce: str) -> dict[str, Any]:
    status, answer = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "restore", "nonce": nonce})
    assert status == 200, answer
    return dict(answer)


# ---------------------------------------------------------------- a poller that fell behind

MAX_FINISHED = 25  # finished tasks per node PVE keeps in /cluster/tasks (RESTEnvironment)


def _task(node: str, n: int, task_type: str, vmid: str, start: int) -> dict[str, Any]:
    pid = 0x10000 + n
    return {"upid": f"UPID:{node}:{pid:08X}:00020B15:{start:08X}:{task_type}:{vmid}:ops@pve:",
            "node": node, "pid": pid, "pstart": 0x20B15, "starttime": start, "type": task_type,
            "id": vmid, "user": "ops@pve", "endtime": start + 2, "status": "OK"}


def pve_history(history: list[dict[str, Any]]) -> web.Application:
    """A PVE API whose /cluster/tasks, like PVE's, holds only each node's newest
    ``MAX_FINISHED`` finished tasks, and whose /nodes/{node}/tasks pages through the rest."""

    async def cluster_tasks(_request: web.Request) -> web.Response:
        listed: list[dict[str, Any]] = []
        for node in sorted({t["node"] for t in history}):
            mine = sorted((t for t in history if t["node"] == node), key=lambda t: -t["starttime"])
            listed += mine[:MAX_FINISHED]
        return web.json_response({"data": listed})

    async def node_tasks(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        start, limit = int(request.query.get("start", "0")), int(request.query.get("limit", "50"))
        mine = sorted((t for t in history if t["node"] == request.match_info["node"] and t["starttime"] >= since),
                      key=lambda t: -t["starttime"])
        return web.json_response({"data": mine[start:start + limit], "total": len(mine)})

    app = web.Application()
    app.router.add_get("/api2/json/cluster/tasks", cluster_tasks)
    app.router.add_get("/api2/json/nodes/{node}/tasks", node_tasks)
    return app


async def test_a_rollback_pushed_off_the_task_list_while_the_poller_was_away_is_posted(
    stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """PVE's /cluster/tasks keeps only each node's 25 newest finished tasks. While the poller
    is away, a rollback and then 30 console sessions finish on pve1: the list it reads on
    return starts after the rollback. The poller notices that nothing listed for pve1
    follows what it handled there, reads pve1's task archive since then, and posts the
    rollback. (It posted only what was listed: the rollback, and its window, were lost.)"""
    recorder, service = stand_in
    t0 = 1_795_942_800
    history = [_task("pve1", n, "qmstart", str(101 + n), t0 + 10 * n) for n in range(3)]
    history.append(_task("pve2", 3, "qmstart", "201", t0 + 40))
    server = await serve(pve_history(history))
    try:
        cfg = config(base(service), tmp_path, base(server), lookup="api")
        assert await run_poller(cfg) == 0
        assert len(recorder.bodies) == 4
        rollback = _task("pve1", 10, "qmrollback", "101", t0 + 100)
        history.append(rollback)
        history += [_task("pve1", 100 + n, "vncproxy", "101", t0 + 200 + n) for n in range(30)]
        history.append(_task("pve2", 4, "qmstop", "201", t0 + 300))
        assert await run_poller(cfg) == 0
        posted = [b["upid"] for b in recorder.bodies[4:]]
        assert sorted(posted) == sorted([rollback["upid"], history[-1]["upid"]])
        assert await run_poller(cfg) == 0 and len(recorder.bodies) == 6
    finally:
        await server.close()


async def test_cron_mode_reads_the_task_archive_with_pvesh(
    stand_in: tuple[StandIn, TestServer], tmp_path: Path
) -> None:
    """In cron mode (`--from-stdin`, lookups by `pvesh`), a list that no longer reaches back
    to the cursor makes the poller run `pvesh get /nodes/NODE/tasks --source all --since …`,
    and the rollback found there is posted."""
    recorder, service = stand_in
    t0 = 1_795_942_800
    first = [_task("pve1", 1, "qmstart", "101", t0)]
    rollback = _task("pve1", 2, "qmrollback", "101", t0 + 100)
    later = [_task("pve1", 100 + n, "vncproxy", "101", t0 + 200 + n) for n in range(MAX_FINISHED)]
    (tmp_path / "archive.json").write_bytes(orjson.dumps(sorted([*first, rollback, *later],
                                                                key=lambda t: -t["starttime"])))
    script = tmp_path / "pvesh"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "if args[:2] != ['get', '/nodes/pve1/tasks']: sys.exit(2)\n"
        "opt = dict(zip(args[2::2], args[3::2]))\n"
        "assert opt['--source'] == 'all' and opt['--output-format'] == 'json', opt\n"
        f"tasks = json.load(open({str(tmp_path / 'archive.json')!r}))\n"
        "tasks = [t for t in tasks if t['starttime'] >= int(opt['--since'])]\n"
        "start, limit = int(opt['--start']), int(opt['--limit'])\n"
        "json.dump(tasks[start:start + limit], sys.stdout)\n"
    )
    script.chmod(0o755)
    env = cli_env(PATH=f"{tmp_path}:{cli_env().get('PATH', '/usr/bin:/bin')}", REPLAYGUARD_RELAY_TOKEN=SERVICE_TOKEN)
    for listing in (first, later):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "replayguard.relay.proxmox", "--from-stdin", "--lookup", "pvesh",
            "--service-url", base(service), "--spool-dir", str(tmp_path / "spool"),
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO)
        _, err = await asyncio.wait_for(proc.communicate(orjson.dumps(listing)), WAIT)
        assert proc.returncode == 0, err.decode()
    assert [b["upid"] for b in recorder.bodies] == [first[0]["upid"], rollback["upid"]]


@pytest.mark.parametrize("away", [True, False], ids=["poller-away", "poller-on-time"])
async def test_a_rollback_still_running_at_one_poll_is_posted_once_it_left_the_list(
    stand_in: tuple[StandIn, TestServer], tmp_path: Path, away: bool
) -> None:
    """A rollback on pve1 is still running at a poll that handles a task started after it.
    While it runs, 30 console sessions start and finish; /cluster/tasks keeps each node's
    newest tasks by start, so once it finishes the rollback is not in the list, whether the
    poller was away meanwhile (its list no longer reaches back to the cursor) or polled on
    time (its list still holds tasks it handled). The poller remembers the tasks it saw
    running, reads pve1's archive from the rollback's start, and posts it. (The archive was
    read only from the newest handled task's start, after the rollback's, or not at all.)"""
    recorder, service = stand_in
    t0 = 1_795_942_800
    rollback = {**_task("pve1", 1, "qmrollback", "101", t0 + 5), "endtime": None, "status": None}
    history = [rollback, _task("pve1", 2, "qmstart", "102", t0 + 10)]
    server = await serve(pve_history(history))
    try:
        cfg = config(base(service), tmp_path, base(server), lookup="api")
        assert await run_poller(cfg) == 0
        assert [b["upid"] for b in recorder.bodies] == [history[1]["upid"]]
        consoles = [_task("pve1", 100 + n, "vncproxy", "101", t0 + 200 + n) for n in range(30)]
        history += consoles[:20]
        if not away:
            assert await run_poller(cfg) == 0
        history += consoles[20:]
        rollback.update(endtime=t0 + 400, status="OK")
        assert await run_poller(cfg) == 0
        assert rollback["upid"] in [b["upid"] for b in recorder.bodies]
        assert await run_poller(cfg) == 0
        assert [b["upid"] for b in recorder.bodies].count(rollback["upid"]) == 1
    finally:
        await server.close()
