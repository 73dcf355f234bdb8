"""SparseBlockTable: paged rows whose memory follows the blocks in use."""
import contextlib

import numpy as np
import pytest

import blocktable as bt
from blocktable.factory import BlockTableFactory
from blocktable.sparse import SparseBlockTable
from blocktable.table import BlockTableConfig

LONG = BlockTableConfig(max_num_reqs=8, max_num_blocks_per_req=65536)   # 1M tokens at B=16


@pytest.fixture
def table():
    with SparseBlockTable(BlockTableConfig(max_num_reqs=4, max_num_blocks_per_req=256),
                          chunk_size=16) as t:
        yield t


@contextlib.contextmanager
def unchanged(t):
    """The body must raise and leave every row, count and the chunk pool alone."""
    before = ([t.get_row(r).tolist() for r in range(t.max_num_reqs)], t.num_blocks.copy(),
              t.num_tokens.copy(), t.segment.free_chunks())
    yield
    after = ([t.get_row(r).tolist() for r in range(t.max_num_reqs)], t.num_blocks.copy(),
             t.num_tokens.copy(), t.segment.free_chunks())
    assert before[0] == after[0] and before[3] == after[3]
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[2], after[2])


def test_position_is_the_token_position_in_all_three(table):
    """set_block, get_block and get_slot read `position` alike: a token
    position, its block being position // block_size (the seed's users pass
    token positions to all three)."""
    for i, b in enumerate([11, 12, 13, 14]):
        table.set_block(0, i * 16 + 5, b)
    assert [table.get_block(0, i * 16) for i in range(4)] == [11, 12, 13, 14]
    assert [table.get_block(0, i * 16 + 15) for i in range(4)] == [11, 12, 13, 14]
    assert table.get_row(0).tolist() == [11, 12, 13, 14]
    assert table.get_num_blocks(0) == 4
    for t in (0, 17, 63):
        assert table.get_slot(0, t) == table.get_block(0, t) * 16 + t % 16
    table.set_block(0, 3, 20)                       # tokens 0..15 are block 0's
    assert table.get_row(0).tolist() == [20, 12, 13, 14]
    table.clear_block(0, 31)                        # token 31 is in block 1
    assert table.get_block(0, 16) is None and table.get_slot(0, 16) == -1


def test_holes_back_nothing(table):
    table.set_block(1, 5 * 16, 40)
    assert table.get_block(1, 0) is None and table.get_block(1, 5 * 16 + 9) == 40
    assert table.get_block(1, 6 * 16) is None            # past the row: no block
    assert table.get_slot(1, 0) == -1
    assert table.get_slot(1, 5 * 16 + 3) == 40 * 16 + 3
    assert table.get_row(1).tolist() == [0, 0, 0, 0, 0, 40]
    assert table.count_blocks(1) == 1


def test_slot_mapping_matches_a_reference(table):
    rng = np.random.default_rng(0)
    ids = {}
    for pos in rng.choice(100, 30, replace=False):
        ids[int(pos)] = int(rng.integers(1, 10_000))
        table.set_block(2, int(pos) * 16, ids[int(pos)])
    slots = table.compute_slot_mapping(2, 1700, 7)
    want = [ids[p // 16] * 16 + p % 16 if p // 16 in ids else -1 for p in range(7, 1707)]
    assert slots.tolist() == want
    assert table.get_slot(2, 7) == want[0]


def test_clear_block_and_clear_row(table):
    table.set_block(0, 3 * 16, 9)
    table.set_block(0, 20 * 16, 10)
    table.clear_block(0, 20 * 16)
    assert table.get_num_blocks(0) == 4             # trailing holes trimmed
    table.clear_block(0, 100 * 16)                       # already a hole: nothing
    table.clear_row(0)
    assert table.get_num_blocks(0) == 0 and table.chunks_in_use() == 0


def test_memory_follows_the_blocks():
    """A row able to hold 1M tokens costs one chunk for a block at its far
    end; its neighbours cost nothing until they hold blocks."""
    with SparseBlockTable(LONG, chunk_size=64) as t:
        m = t.memory_stats()
        assert m["chunks_in_use"] == 0 and m["dense_bytes"] == 8 * 65536 * 4
        t.set_block(0, 65535 * 16, 7)
        assert t.get_block(0, 65535 * 16) == 7 and t.get_num_blocks(0) == 65536
        assert t.chunks_in_use() == 1
        for i in range(128):                        # 2K tokens in row 1: two chunks
            t.set_block(1, i * 16, 100 + i)
        m = t.memory_stats()
        assert m["chunks_in_use"] == 3 and m["chunk_bytes"] == 3 * 64 * 4
        assert m["total_bytes"] == m["directory_bytes"] + m["chunk_bytes"]
        assert m["total_bytes"] < m["dense_bytes"] / 50


def test_punch_returns_emptied_chunks():
    """A sliding window: the blocks below the window become holes and the
    chunks that held only them go back to the pool."""
    with SparseBlockTable(LONG, chunk_size=16) as t:
        for i in range(64):
            t.set_block(0, i * 16, 1000 + i)
        assert t.chunks_in_use() == 4
        t.punch(0, 0, 40)                           # chunks 0, 1 empty; chunk 2 half
        assert t.chunks_in_use() == 2
        assert t.get_block(0, 39 * 16) is None and t.get_block(0, 40 * 16) == 1040
        assert t.get_num_blocks(0) == 64 and t.count_blocks(0) == 24
        t.punch(0, 40, 64)                          # everything: the row ends empty
        assert t.get_num_blocks(0) == 0 and t.chunks_in_use() == 0


def test_to_dense(table):
    table.set_block(3, 2 * 16, 5)
    d = table.to_dense(3, 6)
    assert d.dtype == np.int32 and d.tolist() == [0, 0, 5, 0, 0, 0]
    buf = np.full(8, 99, np.int32)
    assert table.to_dense(3, 4, out=buf).tolist() == [0, 0, 5, 0]
    with pytest.raises(bt.RowFull, match="max_blocks is 2"):
        table.to_dense(3, 2)                        # the seed cut it silently


@pytest.mark.parametrize("call, exc", [
    (lambda t: t.set_block(0, 256 * 16, 5), bt.OutOfRange),          # past the capacity
    (lambda t: t.set_block(0, -1, 5), bt.OutOfRange),
    (lambda t: t.set_block(0, 1, -3), bt.OutOfRange),           # negative id
    (lambda t: t.set_block(0, 1, 2**31), bt.OutOfRange),
    (lambda t: t.set_block(4, 1, 5), bt.OutOfRange),            # no such row
    (lambda t: t.set_block(-1, 1, 5), bt.OutOfRange),
    (lambda t: t.set_block(0, 1.0, 5), bt.InvalidArgument),
    (lambda t: t.set_block(0, True, 5), bt.InvalidArgument),
    (lambda t: t.get_block(0, 256 * 16), bt.OutOfRange),
    (lambda t: t.get_slot(0, -1), bt.OutOfRange),
    (lambda t: t.get_slot(0, 256 * 16), bt.OutOfRange),
    (lambda t: t.punch(0, 0, 9), bt.OutOfRange),                # past the row's blocks
    (lambda t: t.punch(0, 2, 1), bt.OutOfRange),
    (lambda t: t.compute_slot_mapping(0, 4, -2), bt.OutOfRange),
    (lambda t: t.to_dense(0, 1), bt.RowFull),
])
def test_bad_input_changes_nothing(table, call, exc):
    table.set_block(0, 2 * 16, 5)
    with unchanged(table), pytest.raises(exc):
        call(table)
    assert issubclass(bt.OutOfRange, IndexError)    # "except IndexError" works


def test_chunk_pool_exhaustion_changes_nothing():
    with SparseBlockTable(BlockTableConfig(max_num_reqs=2, max_num_blocks_per_req=64),
                          chunk_size=16, num_chunks=2) as t:
        t.set_block(0, 0, 1)
        t.set_block(1, 0, 2)
        with unchanged(t), pytest.raises(bt.OutOfChunks):
            t.set_block(0, 40 * 16, 3)                   # needs a third chunk
        t.set_block(0, 15 * 16, 4)                       # same chunk: fine


def test_max_blocks_in_use_sizes_the_pool():
    with SparseBlockTable(LONG, chunk_size=64, max_blocks_in_use=1000) as t:
        assert t.num_chunks == 16 + 8               # ceil(1000/64) + one partial per row
        assert t.segment.info.size < 65536 * 8 * 4 / 8


def test_factory_create_sparse():
    with BlockTableFactory.create_sparse() as t:
        assert t.block_size == 16 and t.max_num_reqs == 256 and t.capacity == 128
        t.set_block(255, 127 * 16, 1)
        assert t.get_slot(255, 127 * 16) == 16
    with BlockTableFactory.create_sparse(block_size=8) as t:
        assert t.block_size == 8
