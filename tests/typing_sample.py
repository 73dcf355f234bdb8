"""A small typed user program: blocktable used the way README.md shows, with the
types a user would write down. tests/test_typing.py runs mypy on it (each
annotation below must agree with the package's own) and runs it as a program
(it must also be right at run time). Not collected by pytest (no test_ prefix)."""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

import blocktable as bt


def embedded() -> tuple[int, NDArray[np.int64]]:
    """README "Embedded": a private segment, one client, one row."""
    with bt.Segment.create(None) as seg:
        cl: bt.Client = seg.client()
        row: int = cl.claim_row(key=42)
        ids: NDArray[np.int32] = cl.alloc_append(row, 3)
        view: NDArray[np.int32] = seg.table[row, :3]
        assert (view == ids).all()
        slots: NDArray[np.int64] = seg.slots_row(row, start=0, n=40)
        copy, info = seg.read_row(row)
        n: int = info.num_blocks
        assert n == 3 and copy.dtype == np.int32
        loose = cl.alloc(2)
        cl.release(loose)
        cl.append(row, [int(b) for b in cl.alloc(1)])
        report: bt.CheckReport = seg.check()
        assert report.clean
        return row, slots


def step_plan() -> int:
    """README "A scheduler step": the StepPlan loop."""
    seg = bt.Segment.create(None)
    try:
        cl = seg.client()
        plan: bt.StepPlan = cl.step_plan(max_free=256, max_rows=256, max_arrive=256)
        plan.arrive_keys[:2] = [101, 102]
        plan.arrive_n[:2] = [3, 1]
        n: int = plan.run(0, 0, 2)
        r101, r102 = (int(r) for r in plan.arrive_rows[:2])
        nf, nr, na = plan.fill(free_rows=[r101], rows=[r102], n_new=[1],
                               arrive_keys=[103], arrive_n=[2])
        n = plan.run(nf, nr, na)
        assert n == 3 and seg.num_blocks[r102] == 2
        # Client.step: ids alone, or (ids, rows) when requests arrive.
        grown: NDArray[np.int32] = cl.step([r102], [1])
        ids, rows = cl.step([], [], arrive=[104], arrive_n=[1])
        claimed: NDArray[np.uint32] = rows
        return n + len(grown) + len(ids) + len(claimed)
    finally:
        seg.close()


def cache_pool() -> list[int]:
    """A CachePool (vLLM's BlockPool in the segment)."""
    cfg = bt.SegmentConfig(num_pools=1, blocks_per_pool=16, num_rows=4, row_width=4,
                           max_clients=4, hand_size=8, cache_pools=1, cache_keys=8)
    with bt.Segment.create(None, cfg) as seg, seg.client() as cl:
        with cl.cache_pool(0) as pool:
            blocks: NDArray[np.int32] = pool.alloc(2)
            fresh, removed = pool.alloc(1, removed=True)
            assert removed == [] and len(fresh) == 1
            inserted: bool = pool.insert(int(blocks[0]), b"k" * 32)
            assert inserted
            hit: int | None = pool.lookup(b"k" * 32)
            assert hit == int(blocks[0])
            pool.free(blocks)
            stats: dict[str, int] = pool.stats()
            assert stats["hits"] == 1
            return pool.queue()


def tables() -> int:
    """The table-level API: BlockTable and the factory."""
    with bt.BlockTable(bt.BlockTableConfig(block_size=16, kernel_block_size=16,
                                           max_num_reqs=4, max_num_blocks_per_req=8)) as t:
        t.append_row(0, [5, 6], num_tokens=20)
        slots: NDArray[np.int64] = t.compute_slot_mapping(0, 20)
        assert int(slots[19]) == 6 * 16 + 3
        total: int = t.get_total_blocks()
    with bt.BlockTableFactory.create_v2(block_size=16, use_prediction=False) as v2:
        got: NDArray[np.int32] = v2.allocate_for_request("req-1", 0, 2)
        stats = v2.get_stats()
        assert stats["blocks_in_rows"] == 2
    return total + len(got)


def with_daemon() -> bt.Client:
    """README "Shared, with the daemon" (needs btd: not called here)."""
    return bt.connect("default", timeout=1.0)


def errors() -> str:
    try:
        with bt.Segment.create(None) as seg:
            seg.client().release([1])
    except bt.NotHeld as e:
        cls: type[bt.BtError] = bt.error_class(e.code)
        assert cls is bt.NotHeld
        return e.name
    raise AssertionError("release of a block not held did not raise")


if __name__ == "__main__":
    print(embedded()[0], step_plan(), cache_pool(), tables(), errors())
