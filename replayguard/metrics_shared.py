"""``/metrics`` for the service as a whole when ``serve --workers N`` runs several workers.

A scrape reaches one worker. So that it reports every worker's counts, each worker writes
what its registry holds to a file of its own in a directory private to this ``serve``
(``<pid>.json``, replaced whole once a second and before the worker answers a scrape), and
the worker that answers merges the others' files with its own figures:

- counters (``_total``) and histograms (buckets, ``_sum``, ``_count``) are summed;
  ``_created`` takes the earliest;
- each gauge as ``GAUGE_MERGE`` says: ``sum``, ``max`` or ``min`` across the workers;
  ``latest``: the value of the worker whose check ran last (a gauge each worker sets when
  a check reaches it, ``/readyz``: a worker no probe reached since an outage still holds
  its value from then); or ``worker``: one series per worker, told apart by a ``worker``
  label (the process id), which the per-process metrics (``replayguard_background_*``)
  carry already.

A counter never goes down from one scrape to the next, whichever worker answers: each file
holds figures no newer than its worker's own, and a worker writes its file before answering,
so whatever a scrape counted, the next finds in the file or in the live figures. Decisions
another worker made show within ``PUBLISH_S``.

prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) does not fit: it
leaves out custom collectors and ``Gauge.set_function``, which most of these metrics are
(the decision path counts into plain dicts, ``metrics.RequestCounts``, for speed).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import orjson
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from .processes import alive

PUBLISH_S = 1.0
PREFIX = "replayguard-metrics-"
# How a gauge of several workers reads as one; a gauge not listed is kept per worker.
GAUGE_MERGE: dict[str, str] = {
    "replayguard_ledger_up": "latest",  # as the newest check of any worker found the ledger
    "replayguard_redis_up": "latest",
    "replayguard_witness_up": "min",
    "replayguard_postgres_sync_standbys": "min",
    "replayguard_ledger_rollback": "max",  # 1 while any worker refuses decisions for it
    "replayguard_alert_feed_leader": "sum",  # the leaders among the workers: 0 or 1
    "replayguard_sse_subscribers": "sum",
    "replayguard_sink_backlog": "sum",
    "replayguard_background_last_start_timestamp_seconds": "worker",
    "replayguard_background_last_duration_seconds": "worker",
}
_SUMMED = frozenset({"counter", "histogram", "summary"})

# One worker's figures: per family its name, type and help, and its samples (name, labels, value).
Snapshot = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]
# When one worker's ``latest`` gauges were last set (the host's monotonic clock), by family name.
Checks = Mapping[str, float]


def snapshot(families: Iterable[Metric]) -> Snapshot:
    return [(f.name, f.type, f.documentation, [(s.name, dict(s.labels), float(s.value)) for s in f.samples])
            for f in families]


def _encode(pid: int, families: Snapshot, checks: Checks) -> bytes:
    # JSON has no inf or nan (orjson would write null): those values go as text, which float() reads.
    return orjson.dumps({"pid": pid, "checks": dict(checks), "families": [
        (name, kind, doc, [(s, labels, v if math.isfinite(v) else str(v)) for s, labels, v in samples])
        for name, kind, doc, samples in families]})


def _decode(data: bytes) -> tuple[Snapshot, dict[str, float]]:
    raw = orjson.loads(data)
    return ([(name, kind, doc, [(s, dict(labels), float(v)) for s, labels, v in samples])
             for name, kind, doc, samples in raw["families"]],
            {str(name): float(when) for name, when in raw.get("checks", {}).items()})


def merge(workers: dict[int, Snapshot], checks: Mapping[int, Checks] | None = None) -> list[Metric]:
    """The families of every worker (by process id) as one service's; ``checks``: when each
    worker last set its ``latest`` gauges (a worker without one: never)."""
    merged: dict[str, Metric] = {}
    # per family: per series (sample name, its labels sorted), the labels as first seen, the
    # value, and for a ``latest`` gauge when the value was set
    series: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], tuple[dict[str, str], float, float]]] = {}
    for pid, families in workers.items():
        for name, kind, documentation, samples in families:
            if name not in merged:
                merged[name], series[name] = Metric(name, documentation, kind), {}
            how = "sum" if kind in _SUMMED else GAUGE_MERGE.get(name, "worker")
            when = (checks or {}).get(pid, {}).get(name, 0.0)
            into = series[name]
            for sample, labels, value in samples:
                if how == "worker" and "worker" not in labels:
                    labels = {**labels, "worker": str(pid)}
                key = (sample, tuple(sorted(labels.items())))
                seen = into.get(key)
                if seen is None:
                    into[key] = (labels, value, when)
                elif how == "latest":  # the newer check; of two as new, the lower value
                    into[key] = seen if (seen[2], -seen[1]) >= (when, -value) else (seen[0], value, when)
                else:
                    into[key] = (seen[0], _combine("min" if sample.endswith("_created") else how, seen[1], value),
                                 seen[2])
    for name, family in merged.items():
        for (sample, _), (labels, value, _when) in series[name].items():
            family.add_sample(sample, labels, value)
    return list(merged.values())


def _combine(how: str, a: float, b: float) -> float:
    if how == "min":
        return min(a, b)
    if how == "max":
        return max(a, b)
    return a + b  # sum; "worker" series never meet (their worker labels differ)


class SharedMetrics:
    """One worker's side: writes its own figures, reads the other workers'.

    ``take`` runs where the figures change (the worker's event loop); ``write`` may run in a
    thread, and of two writes the older snapshot never replaces the newer, so the file's
    figures only grow."""

    def __init__(self, directory: Path, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()
        self._taken = 0  # snapshots taken
        self._written = 0  # the one in the file

    def take(self, families: Iterable[Metric], checks: Checks | None = None) -> tuple[int, Snapshot, bytes]:
        """A snapshot of this worker's families (and when its checks ran): its number, the
        figures, the file's bytes."""
        self._taken += 1
        mine = snapshot(families)
        return self._taken, mine, _encode(self.pid, mine, checks or {})

    def write(self, number: int, data: bytes) -> None:
        """Replaces this worker's file (whole: a reader sees the old one or the new one)
        unless it holds a newer snapshot than ``number``."""
        with self._lock:
            if number < self._written:
                return
            tmp = self.directory / f".{self.pid}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / f"{self.pid}.json")
            self._written = number

    def publish(self, families: Iterable[Metric], checks: Checks | None = None) -> Snapshot:
        number, mine, data = self.take(families, checks)
        self.write(number, data)
        return mine

    def collect(self, families: Iterable[Metric], checks: Checks | None = None) -> list[Metric]:
        """This worker's families (published first) merged with the other workers' last files."""
        workers = {self.pid: self.publish(families, checks)}
        checked: dict[int, Checks] = {self.pid: checks or {}}
        for path in sorted(self.directory.glob("*.json")):
            pid = int(path.stem) if path.stem.isdigit() else None
            if pid is None or pid == self.pid:
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                workers[pid], checked[pid] = _decode(path.read_bytes())
        return merge(workers, checked)


class Families(Collector):
    """A fixed list of families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


# --- the directory, made and removed by ``serve`` -----------------------------------------

def base_directory() -> Path:
    """systemd's ``RuntimeDirectory=`` (a tmpfs it removes when the unit stops), else the
    temporary directory (``TMPDIR``; the unit's ``PrivateTmp=``)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) if runtime else Path(tempfile.gettempdir())


def make_directory(base: Path | None = None) -> Path:
    """A new, empty directory only this user can enter (0700), for one ``serve``; those of
    earlier ``serve`` processes of this user that are gone (killed hard) are removed first."""
    base = base_directory() if base is None else base
    remove_stale(base)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))  # 0700, ours
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
        raise OSError(f"metrics directory {path} is not this user's own 0700 directory")
    return path


def remove_stale(base: Path) -> None:
    for path in base.glob(f"{PREFIX}*"):
        owner = path.name.removeprefix(PREFIX).split("-")[0]
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if (owner.isdigit() and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
                and not alive(int(owner))):
            remove_directory(path)


def remove_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
