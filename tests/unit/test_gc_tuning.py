"""A serving process freezes its start-up heap and collects rarely (``http.server.tune_gc``).

What the tuning buys is measured by the benchmark (bench/README.md); these check what
``tune_gc`` (which ``serve`` calls once it listens) does, and that the collector still
collects what is made afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from replayguard.http.server import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_the_start_up_heap_and_raises_the_thresholds() -> None:
    """tune_gc freezes the start-up heap, sets the configured thresholds and leaves the collector enabled."""
    kept = [object() for _ in range(10)] + [[] for _ in range(10)]
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() >= len(kept) // 2
    assert gc.isenabled()


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_after_tuning_are_still_collected() -> None:
    """Reference cycles made after tune_gc are still collected."""
    tune_gc()

    class Node:
        other: Node

    for _ in range(1000):
        a, b = Node(), Node()
        a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2000
