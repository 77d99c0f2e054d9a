"""The KV block manager: blocks as sequences grow, frees, and prefix caching (hash chained over
the parent's hash and the block's tokens, reference counts, LRU eviction of freed blocks)."""

from __future__ import annotations

from afd_compile.engine.block_manager import BlockManager
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence(list(tokens), SamplingParams())


def test_blocks_follow_the_sequence_and_come_back_on_free():
    blocks = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = seq(range(5))
    assert blocks.allocate(s)
    assert len(s.block_table) == 2 and s.num_computed == 0 and blocks.num_free == 2
    s.output_token_ids += [9, 9, 9]  # position 7: still block 2
    assert blocks.append_slot(s) and len(s.block_table) == 2
    s.output_token_ids.append(9)  # position 8 starts block 3
    assert blocks.append_slot(s) and len(s.block_table) == 3 and blocks.usage() == 0.75
    other = seq(range(4))
    blocks.allocate(other)  # the last free block
    s.output_token_ids += [9] * 4  # position 12 needs a fourth block: none is free
    assert not blocks.append_slot(s) and len(s.block_table) == 3
    blocks.free_seq(other)
    blocks.free_seq(s)
    assert blocks.num_free == 4 and not s.block_table and blocks.usage() == 0.0


def test_a_shared_prefix_is_computed_once_and_the_last_token_always_recomputed():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = seq(range(10))  # blocks [0..3] [4..7] full, [8, 9] partial
    blocks.allocate(first)
    first.num_computed = 10
    blocks.cache_full_blocks(first)
    second = seq([*range(8), 42, 43, 44])  # shares two full blocks
    blocks.allocate(second)
    assert second.block_table[:2] == first.block_table[:2] and second.num_computed == 8
    assert [blocks.blocks[b].ref_count for b in first.block_table[:2]] == [2, 2]
    exact = seq(range(8))  # all of it cached, but its last token must be computed for logits
    blocks.allocate(exact)
    assert exact.num_computed == 4 and exact.block_table[0] == first.block_table[0]
    assert exact.block_table[1] != first.block_table[1]
    assert (blocks.queries, blocks.hits) == (10 + 11 + 8, 0 + 8 + 4)


def test_a_different_parent_is_a_miss_and_freed_blocks_stay_findable_until_reused():
    blocks = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    blocks.allocate(a)
    a.num_computed = 5
    blocks.cache_full_blocks(a)
    assert blocks.num_free == 0
    blocks.free_seq(a)
    assert blocks.num_free == 3
    other = seq([9, 9, 3, 4, 5])  # block [3, 4] again, after another parent: no hit
    blocks.allocate(other)
    assert other.num_computed == 0
    blocks.free_seq(other)  # its blocks were a's, evicted least recently freed first
    again = seq([1, 2, 3, 4, 5])
    blocks.allocate(again)
    assert again.num_computed == 0  # a's blocks were overwritten by other's


def test_allocate_counts_cached_free_blocks_as_taken():
    blocks = BlockManager(num_blocks=2, block_size=2)
    a = seq([1, 2, 3])
    blocks.allocate(a)
    a.num_computed = 3
    blocks.cache_full_blocks(a)
    blocks.free_seq(a)
    b = seq([1, 2, 7, 8, 9])  # one cached (free) block + two new: three > two
    assert not blocks.allocate(b) and not b.block_table and blocks.num_free == 2
    assert blocks.allocate(seq([1, 2, 7]))
