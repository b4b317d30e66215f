"""The collector pause used around imports and header parsing."""

from __future__ import annotations

import gc

import pytest

from merge.gcpause import collection_paused


@pytest.fixture(autouse=True)
def _restore_collector():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    if was:
        gc.enable()
    else:
        gc.disable()


def test_no_collection_inside_and_enabled_after():
    gc.enable()
    with collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_nested_blocks_leave_the_collector_off_until_the_outer_one_ends():
    gc.enable()
    with collection_paused():
        with collection_paused():
            pass
        assert not gc.isenabled()  # the inner block must not re-enable it early
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled():
    gc.disable()
    with collection_paused():
        pass
    assert not gc.isenabled()


def test_freeze_moves_what_was_created_out_of_later_collections():
    gc.enable()
    gc.unfreeze()
    before = gc.get_freeze_count()
    with collection_paused(freeze=True):
        kept = [[i] for i in range(1000)]  # container objects the collector tracks
    assert gc.get_freeze_count() >= before + len(kept)


def test_enabled_again_when_the_block_raises():
    gc.enable()
    with pytest.raises(RuntimeError, match="boom"), collection_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
