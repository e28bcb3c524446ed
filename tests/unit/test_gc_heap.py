"""The startup heap is frozen while the server runs and given back to the collector after."""

from __future__ import annotations

import gc
import weakref

from loraserve.gc_heap import freeze_startup_heap, frozen_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_objects_alive_at_start_are_frozen_and_unfrozen_at_exit() -> None:
    gc.unfreeze()
    alive = _Node()
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        assert not any(obj is alive for obj in gc.get_objects())  # frozen objects leave the generations
    assert gc.get_freeze_count() == 0
    assert any(obj is alive for obj in gc.get_objects())


def test_garbage_at_start_is_collected_not_frozen() -> None:
    garbage = _Node()
    gone = weakref.ref(garbage)
    del garbage
    with frozen_heap():
        assert gone() is None


def test_cycles_made_while_frozen_are_still_collected() -> None:
    with frozen_heap():
        later = _Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None


def test_freeze_startup_heap_freezes_for_the_rest_of_the_process() -> None:
    gc.unfreeze()
    alive = _Node()
    try:
        freeze_startup_heap()
        assert not any(obj is alive for obj in gc.get_objects())
    finally:
        gc.unfreeze()
