"""Cases that kill mutants of engine/kv_cache.py the engine-level cases let live (bench/mutation.md).

The engine's cases write and read the cache through the same slot arithmetic, so a wrong but
consistent layout, a pool one block short, or a changed hand-out order leave every output equal.
Here the allocator and the slot layout are checked against what the module's docstring promises,
with values worked out by hand.
"""

from __future__ import annotations

import pytest

from engine.kv_cache import BlockAllocator, CacheFullError, blocks_needed, slots_for


def test_the_pool_hands_out_exactly_its_blocks_lowest_first():
    pool = BlockAllocator(5)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]  # exactly what is left: no refusal at the edge
    assert pool.num_free == 0
    with pytest.raises(CacheFullError, match=r"^KV cache full: need 1 more blocks, 0 free of 5; raise num_kv_blocks"):
        pool.allocate(1)


def test_released_blocks_come_back_lowest_first():
    pool = BlockAllocator(6)
    pool.allocate(6)
    pool.release([4, 1])
    pool.release([2])
    assert pool.num_free == 3
    assert pool.allocate(3) == [1, 2, 4]


def test_a_refusal_names_what_was_needed_and_what_is_free():
    pool = BlockAllocator(4)
    pool.allocate(1)
    with pytest.raises(CacheFullError, match=r"need 4 more blocks, 3 free of 4"):
        pool.allocate(4)
    assert pool.num_free == 3  # a refused request takes nothing


def test_slots_follow_the_documented_layout():
    """Position p lives in slot table[p // block_size] * block_size + p % block_size."""
    table = [3, 0, 5]
    assert slots_for(table, 0, 10, 4) == [12, 13, 14, 15, 0, 1, 2, 3, 20, 21]
    assert slots_for(table, 6, 9, 4) == [2, 3, 20]
    assert slots_for(table, 5, 5, 4) == []


@pytest.mark.parametrize("tokens, block_size, want",
                         [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (16, 16, 1), (17, 16, 2)])
def test_blocks_needed_rounds_up(tokens, block_size, want):
    assert blocks_needed(tokens, block_size) == want
