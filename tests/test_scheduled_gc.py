"""vitef.utils.ScheduledGC: no automatic collection inside the training loop, one every `period` steps."""

from __future__ import annotations

import gc
import weakref

import pytest

from vitef.utils import ScheduledGC


class _Node:
    pass


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # only the collector frees a reference cycle
    return weakref.ref(a)


def test_cycles_wait_for_the_scheduled_collection_and_state_is_restored():
    assert gc.isenabled()
    with ScheduledGC(period=3) as collect:
        assert not gc.isenabled()
        ref = _cycle()
        for _ in range(500):  # allocations that would trigger an automatic collection
            _cycle()
        collect(1)
        collect(2)
        assert ref() is not None  # not collected between the scheduled steps
        collect(3)
        assert ref() is None
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_state_is_restored_when_the_loop_raises_and_gc_was_off():
    gc.disable()
    try:
        with pytest.raises(RuntimeError), ScheduledGC(period=5):
            raise RuntimeError("diverged")
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        ScheduledGC(period=0)
