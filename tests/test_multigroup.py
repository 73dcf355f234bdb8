"""MultiGroupBlockTable: one table per KV-cache group, each with its block sizes."""
import numpy as np
import pytest

import blocktable as bt
from blocktable.multigroup import MultiGroupBlockTable


@pytest.fixture
def mg():
    # A hybrid model: full attention at B=16, a sliding-window group at B=32
    # whose kernel reads 16-token blocks.
    with MultiGroupBlockTable(max_num_reqs=4, max_model_len=256, max_num_batched_tokens=64,
                              pin_memory=False, device="cpu", block_sizes=[16, 32],
                              kernel_block_sizes=[16, 16]) as t:
        yield t


def rows(t, r):
    return [g.segment.read_row(r)[0].tolist() for g in t.block_tables]


def test_one_table_per_group_with_its_sizes(mg):
    assert len(mg) == 2
    assert mg[0].block_size == 16 and mg[0].max_num_blocks_per_req == 16
    assert mg[1].block_size == 16 and mg[1].blocks_per_kv_block == 2
    assert mg[1].max_num_blocks_per_req == 16       # cdiv(256, 32) = 8 KV blocks, x2 kernel


def test_append_and_slots_per_group(mg):
    mg.append_row(([1, 2], [5]), 0)
    assert rows(mg, 0) == [[1, 2], [10, 11]]        # block 5 of 32 tokens = kernel 10, 11
    mg.compute_slot_mapping(np.zeros(3, np.int32), np.array([0, 17, 31]))
    assert mg[0].slot_mapping.np[:3].tolist() == [16, 33, 47]
    assert mg[1].slot_mapping.np[:3].tolist() == [160, 177, 191]


def test_a_row_operation_is_all_or_nothing(mg):
    """vLLM appended group by group: a full row in group 1 left group 0
    appended. Here nothing changes."""
    mg.append_row(([1], [2] * 7), 1)
    with pytest.raises(bt.RowFull, match="group 1"):
        mg.append_row(([3], [4, 5]), 1)             # group 1 holds 7 of 8 KV blocks
    assert rows(mg, 1) == [[1], [4, 5] * 7]
    with pytest.raises(bt.OutOfRange, match="group 1"):
        mg.append_row(([3], [-1]), 1)
    with pytest.raises(bt.OutOfRange, match="group 1"):
        mg.add_row(([3], [2**30]), 1)               # x2 kernel blocks overflows int32
    assert rows(mg, 1) == [[1], [4, 5] * 7]


def test_a_late_failure_is_undone(mg, monkeypatch):
    mg.add_row(([1, 2], [3]), 2)

    def boom(*a):
        raise bt.BtError("injected")
    monkeypatch.setattr(mg[1], "add_row", boom)
    with pytest.raises(bt.BtError, match="injected"):
        mg.add_row(([7, 8, 9], [4]), 2)
    monkeypatch.setattr(mg[1], "append_row", boom)
    with pytest.raises(bt.BtError, match="injected"):
        mg.append_row(([7], [4]), 2)
    assert rows(mg, 2) == [[1, 2], [6, 7]]


def test_add_move_swap_clear(mg):
    mg.add_row(([1, 2], [3]), 0)
    mg.add_row(([9], [8]), 1)
    mg.swap_row(0, 1)
    assert rows(mg, 0) == [[9], [16, 17]] and rows(mg, 1) == [[1, 2], [6, 7]]
    mg.move_row(1, 3)
    assert rows(mg, 1) == [[], []] and rows(mg, 3) == [[1, 2], [6, 7]]
    mg.clear_row(3)
    assert rows(mg, 3) == [[], []]
    mg.clear()
    assert all(rows(mg, r) == [[], []] for r in range(4))


@pytest.mark.parametrize("call, exc", [
    (lambda t: t.append_row(([1],), 0), bt.InvalidArgument),        # one list for two groups
    (lambda t: t.append_row(([1], [1]), 4), bt.OutOfRange),
    (lambda t: t.append_row(([1], [1]), -1), bt.OutOfRange),
    (lambda t: t.append_row(([1.5], [1]), 0), bt.InvalidArgument),
    (lambda t: t.move_row(0, 9), bt.OutOfRange),
    (lambda t: t.compute_slot_mapping([0, 7], [0, 1]), bt.OutOfRange),
    (lambda t: t.compute_slot_mapping([0], [0, 1]), bt.InvalidArgument),
])
def test_bad_input_changes_nothing(mg, call, exc):
    mg.append_row(([1], [2]), 0)
    before = [rows(mg, r) for r in range(4)]
    with pytest.raises(exc):
        call(mg)
    assert [rows(mg, r) for r in range(4)] == before


def test_construction_rules():
    with pytest.raises(bt.ConfigError, match="must match"):
        MultiGroupBlockTable(4, 256, 64, False, "cpu", [16, 32], [16])
    with pytest.raises(bt.ConfigError):
        MultiGroupBlockTable(4, 256, 64, False, "cpu", [16], [12])  # 12 does not divide 16
    with MultiGroupBlockTable(4, 16, 64, False, "cpu", [16], [16],
                              num_speculative_tokens=3) as t:
        assert t[0].max_num_blocks_per_req == 4     # at least 1 + speculative tokens
    with MultiGroupBlockTable(4, 256, 64, False, "cpu", [16], [16], dcp_world_size=2) as t:
        assert t[0].max_num_blocks_per_req == 8     # each rank keeps half the context
