"""Block allocator: reference counts, the prefix-cache hash index, eviction order and what num_free counts."""

import pytest

from model.kv_cache import BlockAllocator, NoFreeBlocks, block_hash

H1 = block_hash(None, [1, 2, 3, 4])
H2 = block_hash(H1, [5, 6, 7, 8])


def test_block_hash_chains_the_whole_prefix():
    assert block_hash(None, [1, 2, 3, 4]) == H1
    assert block_hash(H1, [5, 6, 7, 8]) == H2
    # Same tokens under a different parent are a different prefix.
    assert block_hash(block_hash(None, [9, 9, 9, 9]), [5, 6, 7, 8]) != H2
    assert block_hash(None, [1, 2, 3, 5]) != H1


def test_allocate_and_free_without_hashes_behave_as_a_plain_free_list():
    a = BlockAllocator(4, 4)
    got = a.allocate(3)
    assert got == [0, 1, 2] and a.num_free == 1
    with pytest.raises(NoFreeBlocks):
        a.allocate(2)
    a.free(got)
    assert a.num_free == 4 and a.num_cached == 0
    assert a.allocate(4) == [3, 0, 1, 2]  # freed blocks go to the back of the line


def test_double_free_and_unknown_block_raise():
    a = BlockAllocator(4, 4)
    (b,) = a.allocate(1)
    a.free([b])
    with pytest.raises(ValueError, match="freed twice"):
        a.free([b])
    with pytest.raises(ValueError, match="freed twice"):
        a.free([3])


def test_shared_block_is_freed_only_when_its_last_holder_frees_it():
    a = BlockAllocator(4, 4)
    b1, b2 = a.allocate(2)
    a.register(b1, H1)
    a.register(b2, H2)
    assert a.lookup([H1, H2]) == [b1, b2]
    a.share([b1, b2])  # a second sequence holds them too
    a.free([b1, b2])
    assert a.num_free == 2  # still held once
    a.free([b1, b2])
    assert a.num_free == 4 and a.num_cached == 2
    with pytest.raises(ValueError, match="freed twice"):
        a.free([b1])


def test_lookup_revives_a_freed_cached_block_and_stops_at_the_first_miss():
    a = BlockAllocator(4, 4)
    b1, b2 = a.allocate(2)
    a.register(b1, H1)
    a.free([b1, b2])  # b2 was never registered: plain free
    assert a.num_free == 4 and a.num_cached == 1
    assert a.lookup([H1, H2]) == [b1]
    assert a.num_revived([b1]) == 1
    a.share([b1])
    assert a.num_free == 3 and a.num_cached == 0
    assert a.num_revived([b1]) == 0
    assert b1 not in a.allocate(3)  # a held block is never handed out
    assert a.lookup([block_hash(None, [0, 0, 0, 0])]) == []


def test_allocation_prefers_never_hashed_blocks_then_evicts_least_recently_freed():
    a = BlockAllocator(4, 4)
    x, y, z, w = a.allocate(4)
    hx, hy = block_hash(None, [1] * 4), block_hash(None, [2] * 4)
    a.register(x, hx)
    a.register(y, hy)
    a.free([x])  # freed first: evicted first
    a.free([y])
    a.free([z, w])  # plain blocks
    assert a.num_free == 4 and a.num_cached == 2
    assert sorted(a.allocate(2)) == [z, w]  # cached prefixes survive while plain blocks last
    assert a.lookup([hx]) == [x] and a.lookup([hy]) == [y]
    assert a.allocate(1) == [x]  # evicted, and its hash with it
    assert a.lookup([hx]) == [] and a.lookup([hy]) == [y]
    assert a.num_cached == 1


def test_a_freed_chain_loses_its_tail_before_its_head():
    a = BlockAllocator(3, 4)
    b1, b2, b3 = a.allocate(3)
    a.register(b1, H1)
    a.register(b2, H2)
    a.free([b1, b2, b3])
    a.allocate(2)  # b3 (plain), then the chain's last block
    assert a.lookup([H1, H2]) == [b1]


def test_a_second_copy_of_a_prefix_stays_unhashed():
    a = BlockAllocator(4, 4)
    b1, b2 = a.allocate(2)
    a.register(b1, H1)
    a.register(b2, H1)  # computed the same prefix at the same time
    assert a.lookup([H1]) == [b1]
    a.free([b1, b2])
    assert a.num_cached == 1
