"""The libvirt relay's pure logic: snapshot diffing, ids, bodies, backoff, spool, config."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from replayguard.errors import ConfigError
from replayguard.relay import cli
from replayguard.relay.libvirt_relay import (
    MAX_EVENT_ID,
    AtStop,
    DomainView,
    Kind,
    Outcome,
    RunState,
    SnapshotChange,
    SnapshotRef,
    Spool,
    backoff_delay,
    change_body,
    change_event_id,
    classify_status,
    deliver_forever,
    deliver_one,
    diff_domain,
    event_body,
    halted_by_snapshot,
    is_from_snapshot,
    lifecycle_event_id,
    make_event_id,
    parse_creation_time,
    parse_snapshot_state,
    rfc3339,
    views_from_json,
    views_to_json,
)

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def view(current: str | None, **snapshots: int | None) -> DomainView:
    return DomainView(UUID, "web-01", snapshots, current)


# ---------------------------------------------------------------- snapshot diffing


def kinds(changes: list[SnapshotChange]) -> list[tuple[str, str]]:
    return [(c.kind.value, c.snapshot.name) for c in changes]


def test_first_poll_announces_every_snapshot_oldest_first_and_no_revert() -> None:
    """With no previous poll, every snapshot is announced as created, oldest first."""
    changes = diff_domain(None, view("b", b=200, a=100), lifecycle_seen=False)
    assert kinds(changes) == [("snapshot_created", "a"), ("snapshot_created", "b")]
    assert changes[0].snapshot == SnapshotRef("a", 100)


def test_new_snapshot_becoming_current_is_a_creation_not_a_revert() -> None:
    """Taking a snapshot makes it current; that is reported as a creation only."""
    changes = diff_domain(view("a", a=100), view("b", a=100, b=200), lifecycle_seen=False)
    assert kinds(changes) == [("snapshot_created", "b")]


def test_deleted_snapshot_is_reported() -> None:
    """A snapshot missing from the new poll is reported deleted with its creation time."""
    changes = diff_domain(view("b", a=100, b=200), view("b", b=200), lifecycle_seen=False)
    assert changes == [SnapshotChange(Kind.SNAPSHOT_DELETED, SnapshotRef("a", 100))]


def test_current_moving_to_an_older_snapshot_without_event_is_a_silent_revert() -> None:
    """The current snapshot moving back with no lifecycle event is a silent revert."""
    changes = diff_domain(view("b", a=100, b=200), view("a", a=100, b=200), lifecycle_seen=False)
    assert changes == [
        SnapshotChange(Kind.SILENT_REVERT, SnapshotRef("a", 100), previous="b"),
    ]


def test_revert_already_reported_by_a_lifecycle_event_is_not_repeated() -> None:
    """A FROM_SNAPSHOT lifecycle event in the interval already reported the revert."""
    changes = diff_domain(view("b", a=100, b=200), view("a", a=100, b=200), lifecycle_seen=True)
    assert changes == []


def test_deleting_the_current_snapshot_is_not_a_revert() -> None:
    """When the current snapshot is deleted and its parent becomes current, no revert."""
    changes = diff_domain(view("b", a=100, b=200), view("a", a=100), lifecycle_seen=False)
    assert kinds(changes) == [("snapshot_deleted", "b")]


def test_revert_from_no_current_snapshot_is_a_silent_revert() -> None:
    """A domain with no current snapshot that gains an existing one was reverted."""
    changes = diff_domain(view(None, a=100), view("a", a=100), lifecycle_seen=False)
    assert kinds(changes) == [("silent_revert", "a")]


def test_unchanged_domain_yields_nothing() -> None:
    """Two identical polls produce no events."""
    assert diff_domain(view("a", a=100), view("a", a=100), lifecycle_seen=False) == []


def test_revert_to_a_snapshot_created_since_the_last_poll_is_seen() -> None:
    """Between two polls (or while the relay was stopped) c and then d are taken, and the
    domain is reverted to c with no lifecycle event: c is current although d, taken after
    it, still exists, so that is a silent revert to c. (A current snapshot new since the
    last poll was always taken for a creation, and the revert went unreported.)"""
    changes = diff_domain(view("b", a=1, b=2), view("c", a=1, b=2, c=3, d=4), lifecycle_seen=False)
    assert kinds(changes) == [("snapshot_created", "c"), ("snapshot_created", "d"), ("silent_revert", "c")]


def test_the_newest_of_several_new_snapshots_being_current_is_no_revert() -> None:
    """c and d taken since the last poll, d current: creations only; and so when d's
    creation time is unknown or equal to c's (nothing says c came back)."""
    for d in (4, None, 3):
        changes = diff_domain(view("b", a=1, b=2), view("d", a=1, b=2, c=3, d=d), lifecycle_seen=False)
        assert [k for k, _ in kinds(changes)] == ["snapshot_created", "snapshot_created"], d


def test_revert_after_creating_a_snapshot_in_one_interval_is_still_seen() -> None:
    """Creating c and reverting to a within one interval yields both events."""
    changes = diff_domain(view("b", a=1, b=2), view("a", a=1, b=2, c=3), lifecycle_seen=False)
    assert kinds(changes) == [("snapshot_created", "c"), ("silent_revert", "a")]


def test_a_revert_hidden_behind_deleting_the_current_snapshot_is_seen() -> None:
    """Snapshots a, then c, then b (each the child of the one before); b current. Between
    two polls (or while the relay is stopped) the domain goes back to a with no lifecycle
    event, and b is deleted. Deleting the current snapshot makes its parent current, so
    only c being current would be explained by the deletion: a is a silent revert. c then
    b deleted (a current) and b alone deleted (c current) are deletions only; a view from
    before ancestry was kept says nothing."""
    before = DomainView(UUID, "web-01", {"a": 1, "c": 2, "b": 3}, "b", ("c", "a"))
    reverted = DomainView(UUID, "web-01", {"a": 1, "c": 2}, "a", ())
    assert kinds(diff_domain(before, reverted, lifecycle_seen=False)) == [
        ("snapshot_deleted", "b"), ("silent_revert", "a")]
    assert kinds(diff_domain(before, view("a", a=1), lifecycle_seen=False)) == [
        ("snapshot_deleted", "b"), ("snapshot_deleted", "c")]
    assert kinds(diff_domain(before, view("c", a=1, c=2), lifecycle_seen=False)) == [("snapshot_deleted", "b")]
    assert kinds(diff_domain(view("b", a=1, c=2, b=3), reverted, lifecycle_seen=False)) == [
        ("snapshot_deleted", "b")]


def test_a_snapshot_taken_again_under_its_name_is_a_creation_not_a_revert() -> None:
    """a deleted and taken again (its name now has a later creation time) and current while
    b still exists: the old a deleted, the new a created, no revert. The same a with its
    own time current again is still a revert, and a new c current while a retaken a, taken
    after it, exists is one too."""
    changes = diff_domain(view("b", a=100, b=200), view("a", a=300, b=200), lifecycle_seen=False)
    assert changes == [SnapshotChange(Kind.SNAPSHOT_CREATED, SnapshotRef("a", 300)),
                       SnapshotChange(Kind.SNAPSHOT_DELETED, SnapshotRef("a", 100))]
    assert kinds(diff_domain(view("b", a=100, b=200), view("a", a=None, b=200), lifecycle_seen=False)) == [
        ("silent_revert", "a")]
    assert kinds(diff_domain(view("b", a=100, b=200), view("c", a=400, b=200, c=300), lifecycle_seen=False)) == [
        ("snapshot_created", "c"), ("snapshot_created", "a"), ("snapshot_deleted", "a"), ("silent_revert", "c")]


def test_a_revert_between_snapshots_taken_in_the_same_second_is_seen() -> None:
    """c then d (d the child of c) taken in the same second since the last poll, then the
    domain goes back to c with no lifecycle event: their creation times are equal, but d
    descends from c, so d was taken after c and c being current is a silent revert. d
    current (c its ancestor), or c current with no descendant, is creations only."""
    before = DomainView(UUID, "web-01", {"a": 1, "b": 2}, "b", ("a",), ())
    back = DomainView(UUID, "web-01", {"a": 1, "b": 2, "c": 3, "d": 3}, "c", ("b", "a"), ("d",))
    assert kinds(diff_domain(before, back, lifecycle_seen=False)) == [
        ("snapshot_created", "c"), ("snapshot_created", "d"), ("silent_revert", "c")]
    ahead = DomainView(UUID, "web-01", {"a": 1, "b": 2, "c": 3, "d": 3}, "d", ("c", "b", "a"), ())
    assert [k for k, _ in kinds(diff_domain(before, ahead, lifecycle_seen=False))] == ["snapshot_created"] * 2
    alone = DomainView(UUID, "web-01", {"a": 1, "b": 2, "c": 3}, "c", ("b", "a"), ())
    assert kinds(diff_domain(before, alone, lifecycle_seen=False)) == [("snapshot_created", "c")]


def test_a_snapshot_deleted_and_taken_again_in_the_same_second_is_no_revert() -> None:
    """a, then b (its child, current); a is deleted and taken again within the same second
    (so under b, current, with a's old creation time). Name and time match the old a, but
    the old a was b's ancestor and the new one descends from b: a new snapshot becoming
    current, not the old a come back. The old a itself current again is still a revert."""
    before = DomainView(UUID, "web-01", {"a": 7, "b": 7}, "b", ("a",), ())
    retaken = DomainView(UUID, "web-01", {"a": 7, "b": 7}, "a", ("b",), ())
    assert diff_domain(before, retaken, lifecycle_seen=False) == []
    back = DomainView(UUID, "web-01", {"a": 7, "b": 7}, "a", (), ("b",))
    assert kinds(diff_domain(before, back, lifecycle_seen=False)) == [("silent_revert", "a")]


def at(state: int, reason: int, domain_id: int, current: str | None = "a", **snapshots: int) -> DomainView:
    """A view of web-01 whose ``virDomainGetState`` gave (state, reason) and whose id is ``domain_id``."""
    return DomainView(UUID, "web-01", snapshots or {"a": 1}, current, (), (), RunState(state, reason, domain_id))


RUNNING, PAUSED, SHUTOFF = 1, 3, 5
BOOTED, UNPAUSED, RUN_FROM_SNAPSHOT, PAUSE_FROM_SNAPSHOT, OFF_FROM_SNAPSHOT, DESTROYED = 1, 5, 4, 7, 7, 2


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (at(RUNNING, BOOTED, 4), at(RUNNING, RUN_FROM_SNAPSHOT, 4)),  # QEMU in place: no event, same id
        (at(RUNNING, UNPAUSED, 4), at(RUNNING, RUN_FROM_SNAPSHOT, 4)),
        (at(SHUTOFF, DESTROYED, -1), at(RUNNING, RUN_FROM_SNAPSHOT, 6)),
        (at(RUNNING, RUN_FROM_SNAPSHOT, 4), at(RUNNING, RUN_FROM_SNAPSHOT, 9)),  # a new process
        (at(PAUSED, PAUSE_FROM_SNAPSHOT, 4), at(RUNNING, RUN_FROM_SNAPSHOT, 4)),  # seen mid-revert
        (at(SHUTOFF, OFF_FROM_SNAPSHOT, -1), at(RUNNING, RUN_FROM_SNAPSHOT, -1)),  # test driver ids
    ],
)
def test_running_from_a_revert_the_last_poll_did_not_see_is_a_revert_to_the_current_snapshot(
    before: DomainView, after: DomainView
) -> None:
    """libvirt gives a running domain the FROM_SNAPSHOT state reason only by a revert, so a
    domain that has it now and did not at the previous poll (or had it in another process)
    was reverted since, although its current snapshot did not move (the revert was to the
    current one); a FROM_SNAPSHOT lifecycle event in the interval already said so."""
    assert diff_domain(before, after, lifecycle_seen=False) == [
        SnapshotChange(Kind.SILENT_REVERT, SnapshotRef("a", 1), previous="a")]
    assert diff_domain(before, after, lifecycle_seen=True) == []


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (at(RUNNING, RUN_FROM_SNAPSHOT, 4), at(RUNNING, RUN_FROM_SNAPSHOT, 4)),  # a restarted relay
        (at(RUNNING, BOOTED, 4), at(SHUTOFF, OFF_FROM_SNAPSHOT, -1)),  # also: snapshot-create --halt
        (at(RUNNING, BOOTED, 4), at(PAUSED, PAUSE_FROM_SNAPSHOT, 4)),  # also: snapshot of a pm-suspended domain
        (at(RUNNING, RUN_FROM_SNAPSHOT, 4), at(RUNNING, BOOTED, 5)),
        (at(RUNNING, BOOTED, 4), at(PAUSED, 1, 4)),
        (DomainView(UUID, "web-01", {"a": 1}, "a"), at(RUNNING, RUN_FROM_SNAPSHOT, 4)),  # an older poll state
        (at(RUNNING, BOOTED, 4), at(RUNNING, RUN_FROM_SNAPSHOT, 4, current=None)),
    ],
)
def test_a_state_no_revert_alone_explains_or_already_seen_is_no_revert(before: DomainView, after: DomainView) -> None:
    """The running FROM_SNAPSHOT state the previous poll saw with the same id (a relay
    restarted), the paused and shut-off FROM_SNAPSHOT reasons (QEMU sets them when taking
    some snapshots too), other reasons, a previous poll that did not read the state, and a
    domain with no current snapshot to name give no revert."""
    assert diff_domain(before, after, lifecycle_seen=False) == []


def test_a_revert_by_state_names_the_newest_snapshot_the_last_poll_saw() -> None:
    """Reverted while the relay was away, then a snapshot c taken (current, child of b): the
    revert went to c or to one of its ancestors (b, or one taken and deleted since the last
    poll), so it is reported as one to b, c's nearest ancestor that the last poll saw,
    whose window starts no later than the true one's."""
    before = DomainView(UUID, "web-01", {"a": 1, "b": 2}, "b", ("a",), (), RunState(RUNNING, BOOTED, 4))
    after = DomainView(UUID, "web-01", {"a": 1, "b": 2, "c": 3}, "c", ("b", "a"), (),
                       RunState(RUNNING, RUN_FROM_SNAPSHOT, 4))
    assert diff_domain(before, after, lifecycle_seen=False) == [
        SnapshotChange(Kind.SNAPSHOT_CREATED, SnapshotRef("c", 3)),
        SnapshotChange(Kind.SILENT_REVERT, SnapshotRef("b", 2), previous="b")]


@pytest.mark.parametrize(
    ("event", "detail", "expected"),
    [(5, 6, True), (2, 3, True), (3, 5, True), (4, 2, True), (0, 3, True), (2, 0, False), (5, 1, False),
     (6, 3, False), (0, 0, False)],
)
def test_from_snapshot_pairs(event: int, detail: int, expected: bool) -> None:
    """Only the FROM_SNAPSHOT details of the matching event types count as reverts."""
    assert is_from_snapshot(event, detail) is expected


# ---------------------------------------------------------------- ids and bodies


def test_snapshot_ids_are_stable_across_observations() -> None:
    """Creation ids depend on the snapshot only, so a re-announcement is a duplicate."""
    change = SnapshotChange(Kind.SNAPSHOT_CREATED, SnapshotRef("pre-patch", 100))
    first = change_event_id("hv-03", UUID, change, observed_at=1000.0)
    assert first == change_event_id("hv-03", UUID, change, observed_at=2000.0)
    assert first == f"hv-03:{UUID}:snapshot_created:-1:-1:pre-patch@100"


def test_recreated_snapshot_of_the_same_name_gets_a_new_id() -> None:
    """A snapshot deleted and taken again under the same name is a different event."""
    old = SnapshotChange(Kind.SNAPSHOT_CREATED, SnapshotRef("nightly", 100))
    new = SnapshotChange(Kind.SNAPSHOT_CREATED, SnapshotRef("nightly", 200))
    assert change_event_id("h", UUID, old, 0.0) != change_event_id("h", UUID, new, 0.0)


def test_lifecycle_ids_are_unique_per_counter_and_boot() -> None:
    """The boot id and counter keep lifecycle ids unique across events and restarts."""
    ids = {
        lifecycle_event_id("h", UUID, 5, 6, boot, n) for boot in ("17a", "17b") for n in range(50)
    }
    assert len(ids) == 100
    assert lifecycle_event_id("h", UUID, 5, 6, "17a", 1) == f"h:{UUID}:lifecycle:5:6:17a.1"


@pytest.mark.parametrize("name", ["x" * 1000, "bad\nname", "tab\there" + "y" * 300])
def test_awkward_snapshot_names_give_contract_conforming_ids(name: str) -> None:
    """Long or control-character names are hashed into a printable id of at most 256 chars."""
    change = SnapshotChange(Kind.SNAPSHOT_CREATED, SnapshotRef(name, 1))
    event_id = change_event_id("h", UUID, change, 0.0)
    assert 1 <= len(event_id) <= MAX_EVENT_ID and event_id.isprintable()
    assert event_id == change_event_id("h", UUID, change, 0.0)


def test_long_ids_differing_only_at_the_end_stay_distinct() -> None:
    """Hashing keeps two long ids apart even when their readable prefixes are equal."""
    assert make_event_id("a" * 300, 1) != make_event_id("a" * 300, 2)


def test_silent_revert_id_names_both_snapshots() -> None:
    """A silent revert's id says where the domain went from and to, and when it was seen."""
    change = SnapshotChange(Kind.SILENT_REVERT, SnapshotRef("a", 100), previous="b")
    assert change_event_id("h", UUID, change, 5000.9).endswith(":silent_revert:-1:-1:a@100:from=b:at=5000")


def test_snapshot_created_body_occurs_at_creation_time() -> None:
    """A creation's body carries the contract's fields and occurs at the snapshot's time."""
    change = SnapshotChange(Kind.SNAPSHOT_CREATED, SnapshotRef("pre", 1_795_972_568))
    body = change_body(uri="qemu:///system", host="hv", view=view("pre", pre=1), change=change,
                       observed_at=1_795_999_999.0)
    assert body == {
        "source": "libvirt",
        "event_id": f"hv:{UUID}:snapshot_created:-1:-1:pre@1795972568",
        "uri": "qemu:///system",
        "host": "hv",
        "domain": {"name": "web-01", "uuid": UUID},
        "event": -1,
        "detail": -1,
        "occurred_at": "2026-11-29T17:16:08.000Z",
        "snapshot": {"name": "pre", "creation_time": 1_795_972_568},
        "kind": "snapshot_created",
    }


def test_lifecycle_body_without_snapshot_has_null_snapshot() -> None:
    """A lifecycle event not caused by a snapshot carries ``"snapshot": null``."""
    body = event_body(event_id="e", uri="u", host="h", domain=("d", UUID), kind=Kind.LIFECYCLE,
                      event=2, detail=0, occurred_at=0.25, snapshot=None)
    assert body["snapshot"] is None and body["occurred_at"] == "1970-01-01T00:00:00.250Z"


def test_rfc3339_is_utc_with_z() -> None:
    """Times go out as RFC 3339 in UTC with a Z suffix."""
    assert rfc3339(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"


SNAPSHOT_XML = """<domainsnapshot>
  <name>s1</name>
  <state>running</state>
  <creationTime>1795972568</creationTime>
  <memory snapshot='internal'/>
  <domain type='test'><name>test</name></domain>
</domainsnapshot>"""


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        (SNAPSHOT_XML, 1_795_972_568),
        ("<domainsnapshot><name>x</name></domainsnapshot>", None),
        ("<domainsnapshot><creationTime>soon</creationTime></domainsnapshot>", None),
        ("not xml", None),
    ],
)
def test_parse_creation_time(xml: str, expected: int | None) -> None:
    """The creation time is read from ``<creationTime>``; anything else gives None."""
    assert parse_creation_time(xml) == expected


def test_poll_state_round_trips_and_tolerates_garbage() -> None:
    """Poll state survives a round trip through bytes; unreadable state is forgotten."""
    views = {UUID: view("a", a=100, b=None)}
    assert views_from_json(views_to_json(views)) == views
    full = {UUID: DomainView(UUID, "web-01", {"a": 1, "b": 2}, "a", (), ("b",), RunState(1, 4, 7))}
    assert views_from_json(views_to_json(full)) == full
    assert views_from_json(b"{oops") == {}
    assert views_from_json(b"[1, 2]") == {}


# ---------------------------------------------------------------- backoff and answers


@pytest.mark.parametrize("attempt", [0, 1, 2, 5, 6, 7, 10, 64, 10_000])
@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999999])
def test_backoff_is_bounded(attempt: int, rand: float) -> None:
    """Every delay is positive and at most 30 s, whatever the attempt count."""
    assert 0 < backoff_delay(attempt, rand) <= 30.0


def test_backoff_grows_exponentially_until_the_cap() -> None:
    """Without jitter the ceiling doubles per attempt and then stays at the cap."""
    ceilings = [backoff_delay(n, 0.999999999) for n in range(10)]
    assert ceilings[:4] == pytest.approx([0.5, 1.0, 2.0, 4.0])
    assert ceilings[7:] == pytest.approx([30.0] * 3)
    assert backoff_delay(100, 0.0) == pytest.approx(15.0)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (202, Outcome.DELIVERED), (200, Outcome.DELIVERED), (409, Outcome.DELIVERED),
        (None, Outcome.RETRY), (503, Outcome.RETRY), (500, Outcome.RETRY),
        (429, Outcome.RETRY), (408, Outcome.RETRY),
        (401, Outcome.REFUSED), (403, Outcome.REFUSED), (413, Outcome.REFUSED),
        (404, Outcome.REFUSED), (405, Outcome.REFUSED), (302, Outcome.REFUSED),
        (400, Outcome.DEAD), (415, Outcome.DEAD), (422, Outcome.DEAD),
    ],
)
def test_classify_status(status: int | None, outcome: Outcome) -> None:
    """2xx and 409 settle an event, 5xx/429/no answer retry, 3xx/401/403/404/405/413 keep
    it, other answers park it."""
    assert classify_status(status) is outcome


# ---------------------------------------------------------------- spool and delivery


def body(event_id: str) -> dict[str, object]:
    return {"event_id": event_id, "kind": "lifecycle"}


def test_spool_keeps_events_in_order_and_cleans_half_written_files(tmp_path: Path) -> None:
    """Spooled events come back oldest first; tmp files left by a crash are removed."""
    (tmp_path / ".evt-1.json.tmp").write_bytes(b"{")
    spool = Spool(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
    paths = [spool.put(body(f"e{i}")) for i in range(3)]
    assert spool.pending() == paths
    assert orjson.loads(paths[0].read_bytes()) == body("e0")


async def test_delivery_settles_each_answer(tmp_path: Path) -> None:
    """A 202 and a 409 delete the file, a 400 moves it to dead/, a 503 keeps it."""
    spool = Spool(tmp_path)
    for status, outcome in [(202, Outcome.DELIVERED), (409, Outcome.DELIVERED),
                            (400, Outcome.DEAD), (503, Outcome.RETRY)]:
        path = spool.put(body(f"s{status}"))

        async def post(_data: bytes, status: int = status) -> int | None:
            return status

        assert await deliver_one(spool, path, post) is outcome
    assert [orjson.loads(p.read_bytes())["event_id"] for p in spool.pending()] == ["s503"]
    assert [p.name for p in spool.dead.iterdir()] != []


async def test_deliver_forever_retries_until_the_service_answers(tmp_path: Path) -> None:
    """With the service failing twice, every event still arrives, in order, exactly once."""
    spool = Spool(tmp_path)
    for i in range(3):
        spool.put(body(f"e{i}"))
    answers = iter([None, 503])
    received: list[str] = []

    async def post(data: bytes) -> int | None:
        status = next(answers, 202)
        if status == 202:
            received.append(orjson.loads(data)["event_id"])
        return status

    task = asyncio.create_task(deliver_forever(spool, post, asyncio.Event(), rand=lambda: 0.0))
    async with asyncio.timeout(10):
        while spool.pending():
            await asyncio.sleep(0.05)
    task.cancel()
    assert received == ["e0", "e1", "e2"]


# ---------------------------------------------------------------- configuration


def test_config_from_flags_and_environment(tmp_path: Path) -> None:
    """Flags win over REPLAYGUARD_RELAY_* variables, which fill in what flags omit."""
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    env = {"REPLAYGUARD_RELAY_URI": "qemu:///system", "REPLAYGUARD_RELAY_POLL_INTERVAL": "2",
           "REPLAYGUARD_RELAY_SERVICE_URL": "http://ignored", "REPLAYGUARD_RELAY_SPOOL_DIR": "/s"}
    config = cli.load_config(
        ["libvirt", "--service-url", "https://rg.example:8443", "--token-file", str(token)],
        env, default_host="hv-03",
    )
    assert (config.uri, config.service_url, config.poll_interval, config.host) == (
        "qemu:///system", "https://rg.example:8443", 2.0, "hv-03")
    assert config.token.reveal() == "s3cret-token"
    assert "s3cret" not in repr(config)


def test_token_from_environment() -> None:
    """Without a token file the token comes from REPLAYGUARD_RELAY_TOKEN."""
    env = {"REPLAYGUARD_RELAY_TOKEN": "tok"}
    config = cli.load_config(["libvirt", "--uri", "test:///default", "--service-url", "http://x",
                              "--spool-dir", "/s"], env, default_host="h")
    assert config.token.reveal() == "tok"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--token-file", "/nonexistent/token"], "cannot read --token-file"),
        (["--poll-interval", "0"], "--poll-interval"),
        (["--poll-interval", "nan"], "--poll-interval"),
        (["--service-url", "ftp://x"], "--service-url must be an http(s) URL"),
        (["--service-url", "http://[::1"], "--service-url is not a URL"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_config_is_one_config_error(extra: list[str], message: str) -> None:
    """Every configuration mistake is a ConfigError whose message names the culprit."""
    argv = ["libvirt", "--uri", "test:///default", "--service-url", "http://x", "--spool-dir", "/s"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        cli.load_config([*argv, *extra], {"REPLAYGUARD_RELAY_TOKEN": "t"}, default_host="h")


def test_missing_token_is_a_config_error() -> None:
    """Neither a token file nor a token variable is a ConfigError saying how to give one."""
    argv = ["libvirt", "--uri", "test:///default", "--service-url", "http://x", "--spool-dir", "/s"]
    with pytest.raises(ConfigError, match="no token: give --token-file"):
        cli.load_config(argv, {}, default_host="h")


def test_main_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad command line gives one error line on stderr, no traceback, and status 2."""
    assert cli.main(["libvirt", "--uri", "test:///default"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("replayguard-relay: error: --service-url")


@pytest.mark.parametrize("kind", ["proxmox", "vsphere"])
def test_one_entry_point_runs_every_relay(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`replayguard-relay proxmox|vsphere …` hands the rest of the command line to that relay."""
    assert cli.main([kind, "--help"]) == 0
    assert f"usage: replayguard-relay {kind}" in capsys.readouterr().out


# --- snapshot-create --halt or revert ---------------------------------------------

_HALT_AT = 1_790_000_010.5  # when the relay saw the STOPPED/FROM_SNAPSHOT
_HALT_PREV = DomainView(UUID, "web-01", {"base": 1_790_000_000}, "base", ("root",), (), RunState(1, 1, 7))
_HALT_SEEN = AtStop(RunState(5, 7, -1), SnapshotRef("halted", 1_790_000_010), "running", 0, False)


@pytest.mark.parametrize(("change", "halted"), [
    ({}, True),  # a snapshot of the live domain, just taken, childless, the domain shut off by it
    ({"current_state": "paused"}, True),
    ({"prev_snapshots": {"base": 1_790_000_000, "halted": 1_790_000_001}}, True),  # the name taken again
    ({"event": (2, 3)}, False), ({"event": (4, 2)}, False), ({"event": (0, 3)}, False),
    ({"prev": None}, False),  # no poll to tell a new snapshot from an old one
    ({"later_events": True}, False),  # e.g. a revert, a start and a halt before the read
    ({"run": None}, False), ({"run": RunState(1, 4, 8)}, False),  # a revert left it running
    ({"run": RunState(3, 5, 8)}, False), ({"run": RunState(5, 2, -1)}, False),  # destroyed since
    ({"current": None}, False), ({"current": SnapshotRef("halted", None)}, False),
    ({"current": SnapshotRef("halted", 1_790_000_011)}, False),  # taken after the event
    ({"current_state": "shutoff"}, False),  # a revert to a snapshot of the shut-off domain
    ({"current_state": "disk-snapshot"}, False), ({"current_state": None}, False),
    ({"children": 1}, False), ({"children": None}, False),
    ({"prev_snapshots": {"base": 1_790_000_000, "halted": 1_790_000_010}}, False),  # one seen before
    ({"prev_snapshots": {"base": 1_790_000_000, "halted": None}}, False),  # seen, time unknown
])
def test_a_halting_snapshot_is_told_from_a_revert_only_when_everything_says_so(
        change: dict[str, Any], halted: bool) -> None:
    """STOPPED/FROM_SNAPSHOT is ``snapshot-create --halt`` only with the domain shut off from
    a snapshot of the live domain that the previous poll did not see, taken no later than
    the event, with no children, and no later event of the domain: anything else or
    unread is a revert (a revert to a live snapshot leaves the domain live, one to a
    shut-off snapshot leaves a snapshot of the shut-off domain current)."""
    seen = dataclasses.replace(_HALT_SEEN, **{k: v for k, v in change.items()
                                              if k in {"run", "current", "current_state", "children",
                                                       "later_events"}})
    prev = change.get("prev", _HALT_PREV)
    if "prev_snapshots" in change:
        prev = dataclasses.replace(_HALT_PREV, snapshots=change["prev_snapshots"])
    event, detail = change.get("event", (5, 6))
    assert halted_by_snapshot(event, detail, _HALT_AT, seen, prev) is halted


def test_a_halting_snapshot_event_body_says_so_and_others_do_not() -> None:
    """The relay posts ``snapshot_create_halt: true`` with a STOPPED/FROM_SNAPSHOT it found
    to be a halt, and no such field otherwise."""
    common: dict[str, Any] = {"event_id": "e", "uri": "test:///default", "host": "hv", "domain": ("web-01", UUID),
                              "kind": Kind.LIFECYCLE, "event": 5, "detail": 6, "occurred_at": _HALT_AT,
                              "snapshot": SnapshotRef("halted", 1_790_000_010)}
    assert event_body(**common, snapshot_create_halt=True)["snapshot_create_halt"] is True
    assert "snapshot_create_halt" not in event_body(**common)


def test_a_snapshots_state_is_read_from_its_xml() -> None:
    """``<state>`` of a snapshot's XML, None when absent or unparsable."""
    assert parse_snapshot_state("<domainsnapshot><state>running</state></domainsnapshot>") == "running"
    assert parse_snapshot_state("<domainsnapshot/>") is None
    assert parse_snapshot_state("<domainsnapshot") is None
