"""Rollback windows from the pure core: the edge cases of CONTRACT §5, as one table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from replayguard.core.events import EventType, GenericEvent
from replayguard.core.windows import (
    Ancestor,
    EventContext,
    Use,
    Window,
    at_risk,
    carried_to_source,
    clone_split,
    report_time,
    state_time,
    to_us,
    windows_for,
)

BASE = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
S = 1_000_000  # one second in µs
T0 = to_us(BASE)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def us(seconds: float) -> int:
    return T0 + int(seconds * S)


def event(kind: EventType = EventType.SNAPSHOT_REVERTED, *, created: float | None = 0,
          occurred: float | None = 300, vm: str = "web-01", source: str | None = None) -> GenericEvent:
    return GenericEvent(
        event_id="e", type=kind, vm_id=vm, snapshot_id="pre-patch",
        snapshot_created_at=None if created is None else at(created),
        occurred_at=None if occurred is None else at(occurred), source_vm_id=source,
    )


def ctx(received: float = 300, snapshots: tuple[float, ...] = (), ancestors: tuple[Ancestor, ...] = ()) -> EventContext:
    return EventContext(us(received), tuple(us(t) for t in snapshots), ancestors)


# (case, event, context, expected windows as (vm, start s or None, end s))
WINDOW_CASES = [
    ("revert with both times", event(), ctx(), [("web-01", 0, 300)]),
    ("restore from saved state", event(EventType.VM_RESTORED, created=60), ctx(), [("web-01", 60, 300)]),
    ("T from the matching snapshot.created", event(created=None), ctx(snapshots=(30,)), [("web-01", 30, 300)]),
    ("name reused: the latest creation before the revert", event(created=None),
     ctx(snapshots=(10, 200, 400)), [("web-01", 200, 300)]),
    ("snapshot created only after the revert: unknown T", event(created=None), ctx(snapshots=(400,)),
     [("web-01", None, 300)]),
    ("unknown snapshot time: every earlier use", event(created=None), ctx(), [("web-01", None, 300)]),
    ("T after R contradicts itself: unknown T", event(created=500), ctx(received=600),
     [("web-01", None, 300)]),
    ("late event: R is when it happened, not its arrival", event(), ctx(received=3600), [("web-01", 0, 300)]),
    ("report from the future is clamped to arrival", event(occurred=900), ctx(received=400),
     [("web-01", 0, 400)]),
    ("no occurred_at: R is the arrival", event(occurred=None), ctx(received=450), [("web-01", 0, 450)]),
    ("clone: the window is on the source", event(EventType.VM_CLONED, vm="web-02", source="web-01"),
     ctx(), [("web-01", 0, 300)]),
    ("clone without snapshot time: every earlier use of the source",
     event(EventType.VM_CLONED, created=None, vm="web-02", source="web-01"), ctx(), [("web-01", None, 300)]),
    ("revert of a clone to a state older than the clone: ancestors too",
     event(vm="web-02"), ctx(ancestors=(Ancestor("web-01", us(100)), Ancestor("gold", us(50)))),
     [("web-02", 0, 300), ("web-01", 0, 100), ("gold", 0, 50)]),
    ("revert of a clone to its own later snapshot: the clone only",
     event(vm="web-02", created=150), ctx(ancestors=(Ancestor("web-01", us(100)),)), [("web-02", 150, 300)]),
    ("revert of a clone at exactly its split: inclusive", event(vm="web-02", created=100),
     ctx(ancestors=(Ancestor("web-01", us(100)),)), [("web-02", 100, 300), ("web-01", 100, 100)]),
    ("started, stopped, migrated, snapshot events open nothing", event(EventType.VM_STARTED), ctx(), []),
    ("snapshot created opens nothing", event(EventType.SNAPSHOT_CREATED), ctx(), []),
]


@pytest.mark.parametrize(("case", "evt", "context", "expected"), WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_windows_for(case: str, evt: GenericEvent, context: EventContext,
                     expected: list[tuple[str, float | None, float]]) -> None:
    """Each event opens exactly the windows the edge-case table names."""
    got = [(w.vm_id, w.start_us, w.end_us) for w in windows_for(evt, context)]
    assert got == [(vm, None if start is None else us(start), us(end)) for vm, start, end in expected]


REVERT = Window("web-01", us(0), us(300), "snapshot.reverted")
UNKNOWN = Window("web-01", None, us(300), "snapshot.reverted")
# (case, windows, use (vm, seconds), at risk?)
RISK_CASES = [
    ("start boundary is inclusive", [REVERT], ("web-01", 0), True),
    ("end boundary is inclusive", [REVERT], ("web-01", 300), True),
    ("just before the start", [REVERT], ("web-01", -0.000001), False),
    ("just after the end", [REVERT], ("web-01", 300.000001), False),
    ("another VM's use", [REVERT], ("web-02", 100), False),
    ("unknown start: a use long before", [UNKNOWN], ("web-01", -86400 * 365), True),
    ("unknown start: still not after the end", [UNKNOWN], ("web-01", 301), False),
    ("two reverts to one snapshot: between the two reports",
     [REVERT, Window("web-01", us(0), us(900), "snapshot.reverted")], ("web-01", 600), True),
    ("overlapping windows: inside both", [REVERT, Window("web-01", us(200), us(900), "vm.restored")],
     ("web-01", 250), True),
    ("overlapping windows: in the gap of neither", [Window("web-01", us(0), us(100), "x"),
                                                    Window("web-01", us(200), us(300), "x")], ("web-01", 150), False),
]


@pytest.mark.parametrize(("case", "wins", "use", "risky"), RISK_CASES, ids=[c[0] for c in RISK_CASES])
def test_at_risk(case: str, wins: list[Window], use: tuple[str, float], risky: bool) -> None:
    """A first use is at risk exactly when some window of its VM covers its time."""
    first = Use(seq=1, vm_id=use[0], ts_us=us(use[1]))
    assert at_risk([first], wins) == ([first] if risky else [])


def test_overlapping_windows_list_each_use_once_in_ledger_order() -> None:
    """Uses covered by several windows appear once each, ordered by ledger sequence."""
    wins = [REVERT, Window("web-01", us(100), us(900), "snapshot.reverted")]
    uses = [Use(3, "web-01", us(150)), Use(1, "web-01", us(50)), Use(2, "web-01", us(1000))]
    assert [u.seq for u in at_risk(uses, wins)] == [1, 3]


def test_state_time_ignores_snapshots_after_the_report() -> None:
    """Only a creation at or before R can be the state a revert went back to."""
    assert state_time(event(created=None), [us(300), us(301)], us(300)) == us(300)


def test_report_time_never_after_arrival() -> None:
    """A hypervisor clock ahead of ours cannot stretch a window into the future."""
    assert report_time(event(occurred=10_000), us(20)) == us(20)


def test_to_us_is_exact() -> None:
    """Microseconds are computed without float rounding, even far from the epoch."""
    moment = datetime(2286, 11, 20, 17, 46, 39, 999_999, tzinfo=UTC)
    assert to_us(moment) == 9_999_999_999_999_999


@pytest.mark.parametrize(("case", "evt", "context", "split"), [
    ("clone with its state time: the split is that time",
     event(EventType.VM_CLONED, created=60, vm="web-02", source="web-01"), ctx(), 60),
    ("clone without a state time: the split is the clone itself",
     event(EventType.VM_CLONED, created=None, vm="web-02", source="web-01"), ctx(received=450), 300),
    ("clone reported from the future: clamped to its arrival",
     event(EventType.VM_CLONED, created=None, occurred=900, vm="web-02", source="web-01"), ctx(received=400), 400),
    ("clone state time from the matching snapshot.created",
     event(EventType.VM_CLONED, created=None, vm="web-02", source="web-01"), ctx(snapshots=(30, 500)), 30),
], ids=lambda v: v if isinstance(v, str) else "")
def test_clone_split(case: str, evt: GenericEvent, context: EventContext, split: float) -> None:
    """A clone's line splits from its source at the clone's state time, else at the clone's report time."""
    assert clone_split(evt, context) == us(split), case


def test_a_clone_event_carries_the_windows_the_clone_already_had_to_its_source() -> None:
    """vm.cloned of clone-1 from web-01 with web-01's state of 100 s, arriving after windows
    were opened on clone-1: one starting at 20 (or unknown) reaches back before the split and
    opens web-01's window up to the split, and its ancestor's where it reaches back before
    that split too; one starting after the split opens nothing; a lineage cause is not
    repeated; any other event carries nothing."""
    clone = event(EventType.VM_CLONED, created=100, occurred=100, vm="clone-1", source="web-01")
    context = ctx(received=400, ancestors=(Ancestor("golden", us(50)),))
    had = [Window("clone-1", us(20), us(300), "snapshot.reverted"), Window("clone-1", None, us(250), "receipt"),
           Window("clone-1", us(150), us(300), "vm.restored"),
           Window("clone-1", us(60), us(90), "vm.cloned:lineage")]
    got = [(w.vm_id, None if w.start_us is None else (w.start_us - T0) / S, (w.end_us - T0) / S, w.cause)
           for w in carried_to_source(clone, context, had)]
    assert got == [
        ("web-01", 20, 100, "snapshot.reverted:lineage"), ("golden", 20, 50, "snapshot.reverted:lineage"),
        ("web-01", None, 100, "receipt:lineage"), ("golden", None, 50, "receipt:lineage"),
        ("web-01", 60, 90, "vm.cloned:lineage"),
    ]
    assert carried_to_source(event(vm="clone-1"), context, had) == ()

