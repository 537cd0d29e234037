"""The embedded server's shared buffers: a quarter of the memory this process may use,
the machine's or its cgroup's, between PostgreSQL's default and a cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from replayguard.pg.embedded import memory_bytes, shared_buffers_mb

GB = 1 << 30


@pytest.mark.parametrize(("memory", "expected"), [
    (None, 128),            # unknown: PostgreSQL's default
    (256 * (1 << 20), 128),  # a small VM: never below the default
    (1 * GB, 256),
    (4 * GB, 1024),
    (24 * GB, 2048),        # the cap
    (1024 * GB, 2048),
])
def test_shared_buffers_are_a_quarter_of_the_memory_within_bounds(memory: int | None, expected: int) -> None:
    """A quarter of the memory in MB, never under 128 nor over 2048."""
    assert shared_buffers_mb(memory) == expected


def _machine(tmp_path: Path, total_kb: int, proc_cgroup: str, limits: dict[str, str]) -> tuple[Path, Path, Path]:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {total_kb} kB\nMemFree:        1000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(proc_cgroup)
    root = tmp_path / "sys"
    for relative, value in limits.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(value + "\n")
    return meminfo, cgroup, root


def test_the_machines_memory_without_a_cgroup_limit(tmp_path: Path) -> None:
    """cgroup v2 with ``max`` all the way up: MemTotal."""
    meminfo, cgroup, root = _machine(tmp_path, 24 * 1024 * 1024, "0::/system.slice/rg.service\n",
                                     {"system.slice/rg.service/memory.max": "max", "system.slice/memory.max": "max"})
    assert memory_bytes(meminfo, cgroup, root) == 24 * GB


def test_a_cgroup_v2_limit_on_an_ancestor_counts(tmp_path: Path) -> None:
    """A limit set on the slice, not on the service's own cgroup, still bounds the memory."""
    meminfo, cgroup, root = _machine(tmp_path, 24 * 1024 * 1024, "0::/system.slice/rg.service\n",
                                     {"system.slice/rg.service/memory.max": "max",
                                      "system.slice/memory.max": str(2 * GB)})
    assert memory_bytes(meminfo, cgroup, root) == 2 * GB


def test_a_cgroup_v1_memory_limit_counts(tmp_path: Path) -> None:
    """cgroup v1's ``memory.limit_in_bytes`` of the memory hierarchy; its "unlimited" is larger than the machine."""
    meminfo, cgroup, root = _machine(tmp_path, 8 * 1024 * 1024, "12:cpu,cpuacct:/docker/x\n11:memory:/docker/x\n",
                                     {"memory/docker/x/memory.limit_in_bytes": str(GB),
                                      "memory/docker/memory.limit_in_bytes": "9223372036854771712"})
    assert memory_bytes(meminfo, cgroup, root) == GB


def test_unreadable_memory_is_unknown(tmp_path: Path) -> None:
    """Neither /proc/meminfo nor a cgroup to read: None, so the default applies."""
    assert memory_bytes(tmp_path / "no-meminfo", tmp_path / "no-cgroup", tmp_path / "no-sys") is None
    assert shared_buffers_mb(memory_bytes(tmp_path / "no-meminfo", tmp_path / "no-cgroup", tmp_path / "no-sys")) == 128
