"""BlockTableV2 and BlockTableFactory: a table that owns its blocks."""
import numpy as np
import pytest

import blocktable as bt
from blocktable.factory import BlockTableFactory
from blocktable.predictive import UnknownRequest
from blocktable.sparse import SparseBlockTable
from blocktable.strategies import BlockAllocationStrategy, count_runs
from blocktable.table import BlockTable, BlockTableConfig
from blocktable.v2 import BlockTableV2

SMALL = BlockTableConfig(max_num_reqs=8, max_num_blocks_per_req=32)


@pytest.fixture(params=[False, True], ids=["dense", "sparse"])
def table(request):
    with BlockTableV2(SMALL, use_sparse=request.param, use_prediction=True,
                      total_blocks=128) as t:
        yield t


def state(t):
    return (t.segment.free_blocks(0), t._client.slot().hand_count,
            [t.get_row(r).tolist() for r in range(t.max_num_reqs)], t.num_tokens.tolist(),
            dict(t._row_req))


def test_create_v2_works_alone_with_the_seed_defaults():
    with BlockTableFactory.create_v2() as t:
        assert t.segment.name is None                       # embedded: nothing else runs
        assert t.config.block_size == 16 and t.max_num_reqs == 256 and t.max_blocks == 128
        assert t.strategy is BlockAllocationStrategy.PREDICTIVE and not t.use_sparse
        ids = t.allocate_for_request("req-1", 0, 3)
        assert t.get_row(0).tolist() == ids.tolist()
        assert t.compute_slot_mapping(0, 50).tolist()[47:] == [ids[2] * 16 + 15, -1, -1]
    with BlockTableFactory.create_v2(block_size=8, use_sparse=True, use_prediction=False) as t:
        assert t.use_sparse and t.strategy is BlockAllocationStrategy.SCATTERED


def test_factory_standard_and_sparse_defaults():
    with BlockTableFactory.create_standard() as t:
        assert isinstance(t, BlockTable)
        assert (t.block_size, t.max_num_reqs, t.row_width) == (16, 256, 128)
    with BlockTableFactory.create_standard(8, 4, max_blocks_per_req=10) as t:
        assert (t.block_size, t.max_num_reqs, t.row_width) == (8, 4, 10)
    with BlockTableFactory.create_sparse() as t:
        assert isinstance(t, SparseBlockTable) and t.block_size == 16


def test_clear_row_returns_the_blocks(table):
    t = table
    t.allocate_for_request("a", 0, 5)
    t.allocate_for_request("a", 0, 2)
    t.allocate_for_request("b", 1, 1)
    assert t.get_num_blocks(0) == 7
    assert t.clear_row(0) == 7
    assert t.clear_row(1) == 1
    s = t.get_stats()
    assert s["free_blocks"] == 128 and s["loose_blocks"] == 0   # reservations went too
    assert s["allocations"] == 8 and s["frees"] == 8 and s["blocks_in_rows"] == 0
    assert t.get_row(0).tolist() == [] and t.allocator.get_stats()["requests_ended"] == 2


def test_shared_prefix_stays_until_every_row_lets_go(table):
    t = table
    ids = t.allocate_for_request("a", 0, 3)
    t.append_row(1, ids[:2], shared=True)           # prefix sharing
    assert t.segment.block(int(ids[0])).ref_count == 2
    t.clear_row(0)
    assert t.segment.block(int(ids[0])).ref_count == 1
    assert t.segment.block(int(ids[2])).ref_count == 0  # not shared: freed
    t.clear_row(1)
    assert t.segment.free_blocks(0) == 128


def test_append_row_takes_loose_blocks_from_allocate(table):
    t = table
    ids = t.allocate("x", 4)
    t.append_row(2, ids[:3], num_tokens=40)
    assert t.get_row(2).tolist() == ids[:3].tolist() and t.num_tokens[2] == 40
    with pytest.raises(bt.NotHeld, match="allocate the blocks with allocate"):
        t.append_row(2, ids[:1])                    # already in the row
    t.free(ids[3:])
    assert t.get_stats()["allocator"]["handed_out"] == 0


def test_prediction_saves_shared_operations():
    ops = {}
    for pred in (False, True):
        with BlockTableV2(SMALL, use_prediction=pred, total_blocks=256) as t:
            for step in range(16):
                for r in range(8):
                    t.allocate_for_request(r, r, 1)
            ops[pred] = t.get_stats()["allocator"]["shared_ops"]
    assert ops[False] == 128 and ops[True] <= 128 // 4


def test_pressure_reclaims_reservations(table):
    t = table
    for r in range(4):
        t.allocate_for_request(r, r, 4)             # the prompt
        t.allocate_for_request(r, r, 4)             # growth: 4 a call, 16 reserved
    s = t.get_stats()
    assert s["blocks_in_rows"] == 32 and s["reserved"] == 64 and s["free_blocks"] == 32
    t.allocate_for_request("big", 5, 32)            # the pool has exactly that
    ids = t.allocate_for_request("c", 6, 20)        # all from others' reservations
    assert len(set(ids.tolist())) == 20 and t.get_num_blocks(6) == 20
    s = t.get_stats()
    assert s["free_blocks"] == 0 and s["reserved"] == 64 - 20
    assert s["allocator"]["reclaims"] == 1 and s["allocator"]["reclaimed_blocks"] == 20
    t.allocate_for_request("d", 7, 32)
    with pytest.raises(bt.OutOfBlocks):
        t.allocate_for_request("e", 4, 13)          # 12 left in all
    assert len(t.allocate_for_request("e", 4, 12)) == 12
    assert t.get_stats()["reserved"] == 0 and t.get_stats()["blocks_in_rows"] == 128


@pytest.mark.parametrize("call, exc", [
    (lambda t: t.allocate_for_request("b", 0, 1), bt.RowStateError),   # row 0 is a's
    (lambda t: t.allocate_for_request("a", 1, 1), bt.RowStateError),   # a lives in row 0
    (lambda t: t.allocate_for_request("a", 0, 30), bt.RowFull),        # 3 + 30 > 32
    (lambda t: t.allocate_for_request("a", 8, 1), bt.OutOfRange),
    (lambda t: t.allocate_for_request("a", 0, -1), bt.OutOfRange),
    (lambda t: t.allocate_for_request(None, 2, 1), bt.InvalidArgument),
    (lambda t: t.append_row(1, [5]), bt.NotHeld),                      # never allocated
    (lambda t: t.append_row(1, [-4]), bt.NotHeld),
    (lambda t: t.append_row(1, [120], shared=True), bt.NotHeld),       # a free block
    (lambda t: t.append_row(-1, []), bt.OutOfRange),
    (lambda t: t.append_row(1, [1.5]), bt.InvalidArgument),
    (lambda t: t.get_block(0, 32), bt.OutOfRange),
    (lambda t: t.clear_row(9), bt.OutOfRange),
    (lambda t: t.free([1]), bt.NotHeld),                               # in a row, not loose
])
def test_bad_input_changes_nothing(table, call, exc):
    table.allocate_for_request("a", 0, 3)
    before = state(table)
    with pytest.raises(exc):
        call(table)
    assert state(table) == before


def test_sparse_rows_have_holes_and_punch_frees():
    with BlockTableV2(BlockTableConfig(max_num_reqs=2, max_num_blocks_per_req=4096),
                      use_sparse=True, total_blocks=1024) as t:
        b = t.allocate("w", 1)
        t.set_block(0, 4000, b[0])                  # far out: one chunk
        assert t.get_block(0, 4000) == b[0] and t.get_block(0, 3999) is None
        assert t.get_stats()["memory"]["chunks_in_use"] == 1
        t.allocate_for_request("w", 1, 100)
        t.punch(1, 0, 90)                           # a sliding window's past
        s = t.get_stats()
        assert s["free_blocks"] == 1024 - 11 and s["frees"] == 90
        assert t.compute_slot_mapping(1, 1, 89 * 16).tolist() == [-1]
        with pytest.raises(bt.OutOfRange):
            t.set_block(0, 4096, t.allocate("w", 1)[0])
        with pytest.raises(bt.InvalidArgument, match="null block"):
            t.set_block(0, 3, 0)


def test_dense_rows_refuse_sparse_calls():
    with BlockTableV2(SMALL, total_blocks=64) as t:
        with pytest.raises(bt.RowStateError, match="use_sparse"):
            t.punch(0, 0, 0)


def test_strategies_through_v2():
    with BlockTableV2(SMALL, strategy="contiguous", total_blocks=256) as t:
        for step in range(8):
            for r in range(8):
                t.allocate_for_request(r, r, 1)
        assert all(count_runs(t.get_row(r)) <= 2 for r in range(8))
        assert t.get_stats()["strategy"] == "CONTIGUOUS"
    with pytest.raises(bt.ConfigError, match="pick one"):
        BlockTableV2(SMALL, use_prediction=True, strategy=BlockAllocationStrategy.CONTIGUOUS)


def test_unknown_request_after_clear(table):
    table.allocate_for_request("a", 0, 1)
    table.clear_row(0)
    with pytest.raises(UnknownRequest):
        table.allocator.reserved_for("a")
    table.allocate_for_request("b", 0, 1)           # the row is free for another request
    assert table.get_num_blocks(0) == 1


def test_seed_alias_and_stats_keys(table):
    ids = table.allocate_req_blocks("a", 3, 2)
    assert len(ids) == 2
    s = table.get_stats()
    assert {"allocations", "frees", "free_blocks"} <= set(s)
    assert np.count_nonzero(table.get_row(3)) == 2
