"""Run-length slot mappings: (first_slot, length) per contiguous run."""
import numpy as np
import pytest

import blocktable as bt
from blocktable.compress import RunLengthSlots, compress_row, compress_rows, compress_slots
from blocktable.sparse import SparseBlockTable
from blocktable.table import BlockTable, BlockTableConfig


def runs(r):
    return list(zip(r.first.tolist(), r.length.tolist()))


def test_runs_of_a_slot_mapping():
    r = compress_slots([32, 33, 34, 80, 81, -1, -1, -1, 5])
    assert runs(r) == [(32, 3), (80, 2), (-1, 3), (5, 1)]
    assert r.num_tokens == 9 and r.num_runs == 4
    assert r.offsets.tolist() == [0, 3, 5, 8]
    assert r.nbytes == 4 * 12 and r.raw_nbytes == 9 * 8 and r.bytes_saved == 72 - 48
    assert r.expand().tolist() == [32, 33, 34, 80, 81, -1, -1, -1, 5]


def test_empty_and_scattered():
    r = compress_slots(np.empty(0, np.int64))
    assert r.num_runs == 0 and r.expand().shape == (0,) and r.ratio == 1.0
    r = compress_slots([7, 3, 9])                   # no runs: the plain form wins
    assert r.num_runs == 3 and r.bytes_saved < 0


@pytest.mark.parametrize("seed", range(5))
def test_expand_inverts_compress(seed):
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(64)[:rng.integers(1, 40)]
    slots = (np.repeat(blocks * 16, 16) + np.tile(np.arange(16), len(blocks))).astype(np.int64)
    slots[rng.random(slots.shape[0]) < 0.05] = -1
    r = compress_slots(slots)
    np.testing.assert_array_equal(r.expand(), slots)
    out = np.zeros(slots.shape[0] + 3, np.int64)
    np.testing.assert_array_equal(r.expand(out=out), slots)


def test_a_contiguous_row_is_one_run():
    """8K tokens over 512 consecutive blocks: 64 KiB of slots in 12 bytes."""
    with BlockTable(BlockTableConfig(max_num_reqs=2, max_num_blocks_per_req=512)) as t:
        t.append_row(0, np.arange(100, 612))
        r = compress_row(t.segment, 0, 0, 8192)
        assert runs(r) == [(1600, 8192)] and r.bytes_saved == 8192 * 8 - 12


@pytest.mark.parametrize("start, n", [(0, 100), (5, 200), (-7, 30), (300, 50), (0, 0), (-3, 2)])
def test_compress_row_equals_compressing_the_slots(start, n):
    rng = np.random.default_rng(abs(start) * 1000 + n)
    with BlockTable(BlockTableConfig(max_num_reqs=2, max_num_blocks_per_req=32)) as t:
        ids = np.concatenate([np.arange(10, 15), [0, 1], rng.integers(0, 50, 8)])  # 0: a real id
        t.append_row(1, ids)
        want = compress_slots(t.compute_slot_mapping(1, n, start))
        got = compress_row(t.segment, 1, start, n)
        assert runs(got) == runs(want)


def test_compress_row_on_paged_rows_with_holes():
    with SparseBlockTable(BlockTableConfig(max_num_reqs=2, max_num_blocks_per_req=1024),
                          chunk_size=16) as t:
        for i in list(range(0, 8)) + list(range(40, 44)):
            t.set_block(0, i * 16, 500 + i)
        want = compress_slots(t.compute_slot_mapping(0, 50 * 16))
        got = compress_row(t.segment, 0, 0, 50 * 16)
        assert runs(got) == runs(want) == [(8000, 128), (-1, 512), (8640, 64), (-1, 96)]


def test_kernel_block_size_is_honoured():
    cfg = BlockTableConfig(block_size=32, kernel_block_size=16, max_num_reqs=2,
                           max_num_blocks_per_req=8)
    with BlockTable(cfg) as t:
        t.append_row(0, [3, 4, 9])
        want = compress_slots(t.compute_slot_mapping(0, 100))
        assert runs(compress_row(t.segment, 0, 0, 100, t._params)) == runs(want)
        assert runs(want) == [(96, 64), (288, 32), (-1, 4)]


def test_a_batch_in_query_start_loc_order():
    with BlockTable(BlockTableConfig(max_num_reqs=3, max_num_blocks_per_req=8)) as t:
        t.append_row(0, [1, 2])
        t.append_row(1, [3, 4])                     # continues row 0's slots
        t.append_row(2, [9])
        r = compress_rows(t.segment, [0, 1, 2], [0, 0, 4], [32, 32, 4])
        assert runs(r) == [(16, 64), (148, 4)]
        slots = np.concatenate([t.compute_slot_mapping(0, 32), t.compute_slot_mapping(1, 32),
                                t.compute_slot_mapping(2, 4, 4)])
        assert runs(compress_slots(slots)) == runs(r)
        assert compress_rows(t.segment, [], [], []).num_runs == 0


@pytest.mark.parametrize("call, exc", [
    (lambda s: compress_slots([3, -2]), bt.InvalidArgument),
    (lambda s: compress_slots([1.5]), bt.InvalidArgument),
    (lambda s: compress_slots([[1, 2]]), bt.InvalidArgument),
    (lambda s: compress_row(s, 5, 0, 4), bt.OutOfRange),
    (lambda s: compress_row(s, -1, 0, 4), bt.OutOfRange),
    (lambda s: compress_row(s, 0, 0, -4), bt.OutOfRange),
    (lambda s: compress_row(s, 0, 0, 4, bt.SlotParams(cp_world=2)), bt.InvalidArgument),
    (lambda s: compress_rows(s, [0, 1], [0], [4, 4]), bt.InvalidArgument),
    (lambda s: compress_rows(s, [0], [0], [-1]), bt.OutOfRange),
    (lambda s: RunLengthSlots(np.array([1]), np.array([2], np.int32)).expand(
        out=np.empty(1, np.int64)), bt.InvalidArgument),
])
def test_bad_input(call, exc):
    with BlockTable(BlockTableConfig(max_num_reqs=2, max_num_blocks_per_req=8)) as t:
        t.append_row(0, [1, 2])
        with pytest.raises(exc):
            call(t.segment)
        assert t.get_row(0).tolist() == [1, 2]
