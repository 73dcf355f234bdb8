"""The seed's API (BlockTableV2's names) on libbt, including where it
differs from the seed: capacity errors, kernel block expansion, -1 slots."""
import numpy as np
import pytest

import blocktable as bt
from blocktable import BlockInfo, BlockTable, BlockTableConfig


def small(**kw):
    return BlockTableConfig(**{"max_num_reqs": 4, "max_num_blocks_per_req": 4, **kw})


def test_config_defaults_and_validation():
    c = BlockTableConfig()
    assert (c.block_size, c.kernel_block_size, c.max_num_reqs, c.max_num_blocks_per_req,
            c.max_num_batched_tokens, c.pin_memory, c.device,
            c.cp_kv_cache_interleave_size) == (16, 16, 256, 128, 8192, True, "cuda", 1)
    with pytest.raises(bt.ConfigError):
        BlockTableConfig(block_size=16, kernel_block_size=5)
    with pytest.raises(ValueError):
        BlockTableConfig(max_num_reqs=0)
    with pytest.raises(bt.ConfigError):
        BlockTableConfig(block_size=True)


def test_strategy_names():
    assert {s.name for s in bt.BlockAllocationStrategy} == {
        "CONTIGUOUS", "SCATTERED", "NUMA_AWARE", "PREDICTIVE"}


def test_append_get_clear():
    t = BlockTable(small())
    t.append_row(1, [7, 9], num_tokens=20)
    t.append_row(1, np.array([11], np.int32), num_tokens=5)
    assert t.get_row(1).tolist() == [7, 9, 11] and t.get_row(0).tolist() == []
    assert t.get_num_blocks(1) == 3 and t.get_total_blocks() == 3
    assert t.get_num_tokens(1) == 25
    t.clear_row(1)
    assert t.get_num_blocks(1) == 0 and t.get_num_tokens(1) == 0 and not t.table[1].any()
    t.append_row(1, [3])  # a cleared row is usable again
    assert t.get_row(1).tolist() == [3]


def test_capacity_error_changes_nothing():
    t = BlockTable(small())
    t.append_row(0, [1, 2, 3], num_tokens=40)
    before = (t.table.copy(), t.num_blocks.copy(), t.num_tokens.copy())
    with pytest.raises(bt.RowFull):
        t.append_row(0, [4, 5], num_tokens=30)
    with pytest.raises(bt.OutOfRange):
        t.append_row(0, [-1])
    with pytest.raises(bt.OutOfRange):
        t.append_row(4, [1])
    with pytest.raises(bt.InvalidArgument):
        t.append_row(0, [1], num_tokens=-1)
    after = (t.table, t.num_blocks, t.num_tokens)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_slot_mapping_with_minus_one_past_the_blocks():
    t = BlockTable(small())
    t.append_row(2, [5, 8])
    got = t.compute_slot_mapping(2, 40, start_position=10)
    want = [(5 if p < 16 else 8) * 16 + p % 16 if p < 32 else -1 for p in range(10, 50)]
    assert got.dtype == np.int64 and got.tolist() == want
    out = np.empty(64, np.int64)
    assert t.compute_slot_mapping(2, 3, out=out) is not None and out[:3].tolist() == [80, 81, 82]


def test_kernel_block_size_expands_blocks_and_keeps_slots():
    """B=64, K=16: block b is stored as kernel blocks 4b..4b+3, and slots
    computed over kernel blocks equal slots computed over B blocks."""
    t = BlockTable(small(block_size=64, kernel_block_size=16))
    assert t.table.shape == (4, 16)
    t.append_row(0, [3, 10])
    assert t.get_kernel_row(0).tolist() == [12, 13, 14, 15, 40, 41, 42, 43]
    assert t.get_row(0).tolist() == [12, 13, 14, 15, 40, 41, 42, 43]   # as vLLM's table
    assert t.get_kv_row(0).tolist() == [3, 10] and t.get_num_blocks(0) == 8
    got = t.compute_slot_mapping(0, 140)
    want = [[3, 10][p // 64] * 64 + p % 64 if p < 128 else -1 for p in range(140)]
    assert got.tolist() == want
    t.append_row(0, [1, 2])
    with pytest.raises(bt.RowFull):  # capacity counts KV blocks, 4 per row
        t.append_row(0, [4])
    with pytest.raises(bt.OutOfRange):  # 2^30 * 4 kernel ids overflow int32
        BlockTable(small(block_size=64, kernel_block_size=16)).append_row(0, [2**30])


def test_update_slot_mapping_takes_pairs():
    t = BlockTable(small())
    t.append_row(0, [2])
    t.append_row(3, [9, 4])
    got = t.update_slot_mapping([(0, 5), (3, 17), (3, 40), (1, 0)])
    assert got.tolist() == [37, 65, -1, -1]
    np.testing.assert_array_equal(t.update_slot_mapping(np.array([[3, 0]])), [144])
    assert t.update_slot_mapping([]).tolist() == []
    with pytest.raises(bt.InvalidArgument):
        t.update_slot_mapping([1, 2, 3])


def test_block_info():
    b = BlockInfo(block_id=4)
    assert b.can_free()
    b.increment_ref()
    b.increment_ref()
    assert b.ref_count == 2 and not b.can_free()
    b.decrement_ref()
    b.decrement_ref()
    with pytest.raises(bt.NotHeld):
        b.decrement_ref()
    assert b.ref_count == 0 and b.can_free()
    assert not BlockInfo(0).can_free()  # the null block is never freed


def test_kernel_block_ids_read_back_as_vllm_stores_them():
    """The seed's users follow vLLM: at B=32, K=16 append_row(0, [0, 1, 2])
    reads back the kernel block ids [0..5] (it read back [0, 1, 2])."""
    t = BlockTable(BlockTableConfig(block_size=32, kernel_block_size=16, max_num_reqs=2,
                                    max_num_blocks_per_req=4))
    t.append_row(0, [0, 1, 2])
    assert t.get_row(0).tolist() == [0, 1, 2, 3, 4, 5]
    assert t.table[0, :6].tolist() == [0, 1, 2, 3, 4, 5]
    assert t.get_num_blocks(0) == 6 and t.get_total_blocks() == 6
    assert t.get_kv_row(0).tolist() == [0, 1, 2]
