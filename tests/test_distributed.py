"""DistributedBlockTable: per-worker pools, local first, spill to the least loaded."""
import multiprocessing as mp

import numpy as np
import pytest

import blocktable as bt
from blocktable.distributed import DistributedBlockTable
from blocktable.table import BlockTableConfig

FORK = mp.get_context("fork")
CFG = BlockTableConfig(max_num_reqs=4, max_num_blocks_per_req=128)


@pytest.fixture
def pair():
    """Workers 0 and 1 of three, in one embedded segment (pools of 32 ids)."""
    w0 = DistributedBlockTable(CFG, 3, 0, blocks_per_worker=32)
    w1 = DistributedBlockTable(CFG, 3, 1, segment=w0.segment, blocks_per_worker=32)
    yield w0, w1
    w1.close()
    w0.close()


def free(t):
    return [t.segment.free_blocks(p) for p in range(t.num_workers)]


def test_local_pool_first(pair):
    w0, w1 = pair
    ids = w1.allocate_blocks(0, 5)
    assert all(w1.is_local(b) for b in ids) and w1.get_row(0).tolist() == ids.tolist()
    assert [w1.get_block_location(b) for b in ids] == [1] * 5
    assert not w0.is_local(int(ids[0]))
    s = w1.get_stats()
    assert s["local_blocks"] == 5 and s["spilled_blocks"] == 0 and s["local_ratio"] == 1.0


def test_spill_goes_to_the_least_loaded_other_pool(pair):
    w0, w1 = pair
    w1.allocate_blocks(0, 20)                       # pool 1: 12 left; pool 2: 32
    ids = w0.allocate_blocks(0, 40)                 # pool 0: 31 usable (id 0 is null)
    pools = ids // 32
    assert (pools == 0).sum() == 31 and (pools == 2).sum() == 9 and (pools == 1).sum() == 0
    s = w0.get_stats()
    assert s["spilled_to"] == {2: 9} and s["spilled_blocks"] == 9
    assert s["local_ratio"] == pytest.approx(31 / 40)
    assert s["row_blocks_by_pool"] == [31, 0, 9]
    assert s["pool_free"] == [0, 12, 23] and s["pool_used"] == [31, 20, 9]
    more = w0.allocate_blocks(1, 30)                # spills across both other pools
    assert sorted(set((more // 32).tolist())) == [1, 2]
    assert free(w0) == [0, 5, 0]                    # pool 2 (23 free) first, then pool 1


def test_prefer_local_false_takes_the_least_loaded_pool(pair):
    w0, w1 = pair
    w0.allocate_blocks(0, 10)
    ids = w0.allocate_blocks(1, 4, prefer_local=False)
    assert set((ids // 32).tolist()) in ({1}, {2})  # 32 free each, pool 0 has 21


def test_clear_row_sends_blocks_home(pair):
    w0, w1 = pair
    w0.allocate_blocks(2, 50)
    assert free(w0) != [31, 32, 32]
    w0.clear_row(2)
    assert free(w0) == [31, 32, 32] and w0.get_num_blocks(2) == 0


def test_all_or_nothing(pair):
    w0, w1 = pair
    w0.allocate_blocks(0, 60)
    before = (free(w0), w0.get_row(0).tolist(), w0.segment.client_slot(w0._client.id).hand_count)
    with pytest.raises(bt.OutOfBlocks, match="all pools together have 35 free"):
        w0.allocate_blocks(1, 36)
    with pytest.raises(bt.RowFull):
        w0.allocate_blocks(0, 69)                   # 60 + 69 > 128: refused before popping
    assert (free(w0), w0.get_row(0).tolist(),
            w0.segment.client_slot(w0._client.id).hand_count) == before
    assert w0.get_stats()["failures"] == 1


@pytest.mark.parametrize("call, exc", [
    (lambda t: t.get_block_location(0), bt.OutOfRange),          # the null block
    (lambda t: t.get_block_location(-5), bt.OutOfRange),
    (lambda t: t.get_block_location(96), bt.OutOfRange),         # past the last pool
    (lambda t: t.is_local(2.0), bt.InvalidArgument),
    (lambda t: t.allocate_blocks(4, 1), bt.OutOfRange),          # rows are 0..3 per worker
    (lambda t: t.allocate_blocks(-1, 1), bt.OutOfRange),
    (lambda t: t.allocate_blocks(0, -1), bt.OutOfRange),
    (lambda t: t.clear_row(7), bt.OutOfRange),
])
def test_bad_input_changes_nothing(pair, call, exc):
    w0, _ = pair
    w0.allocate_blocks(0, 3)
    before = (free(w0), w0.segment.table.copy())
    with pytest.raises(exc):
        call(w0)
    assert free(w0) == before[0] and (w0.segment.table == before[1]).all()


def test_one_table_per_worker(pair):
    w0, _ = pair
    with pytest.raises(bt.RowStateError, match="worker 0's row 0 is taken"):
        DistributedBlockTable(CFG, 3, 0, segment=w0.segment, blocks_per_worker=32)
    with pytest.raises(bt.OutOfRange):
        DistributedBlockTable(CFG, 3, 3, segment=w0.segment)
    with pytest.raises(bt.ConfigError, match="num_pools=3 \\(want 2\\)"):
        DistributedBlockTable(CFG, 2, 1, segment=w0.segment)


def test_slots_say_where_the_block_lives(pair):
    _, w1 = pair
    ids = w1.allocate_blocks(3, 2)
    slots = w1.compute_slot_mapping(3, 40)
    assert slots[0] == ids[0] * 16 and slots[16] == ids[1] * 16 and (slots[32:] == -1).all()
    assert (slots[:32] // (16 * 32) == 1).all()     # slot // (B * blocks_per_pool): worker


# ---- across processes ----------------------------------------------------------
def _worker(name, wid, n, barrier, conn):
    try:
        t = DistributedBlockTable(CFG, 4, wid, name=name, blocks_per_worker=64)
        barrier.wait(30)
        ids = []
        for row in range(4):
            k = n // 4 + (row < n % 4)
            if k:
                ids += t.allocate_blocks(row, k).tolist()
        conn.send((ids, t.get_stats()))
        conn.recv()                                 # hold the blocks until told
        t.close()
        conn.send("closed")
    except BaseException as e:                      # report, don't hang the parent
        conn.send(repr(e))


def test_four_processes_allocate_locally_and_spill(shm_name):
    """Worker 0 asks for more than its pool holds; the others ask little.
    Every block is handed out once, worker 0's overflow lands in the other
    pools, and closing the tables gives everything back."""
    asks = [100, 10, 10, 10]
    barrier = FORK.Barrier(4)
    pipes = [FORK.Pipe() for _ in asks]
    procs = [FORK.Process(target=_worker, args=(shm_name, w, n, barrier, pipes[w][1]))
             for w, n in enumerate(asks)]
    for p in procs:
        p.start()
    try:
        results = []
        for parent, _ in pipes:
            assert parent.poll(60), "a worker did not report"
            results.append(parent.recv())
        assert all(isinstance(r, tuple) for r in results), results
        everything = [b for ids, _ in results for b in ids]
        assert len(everything) == sum(asks) == len(set(everything))
        ids0, s0 = results[0]
        assert s0["local_blocks"] == 63 and s0["spilled_blocks"] == 37
        assert set(s0["spilled_to"]) <= {1, 2, 3}
        for w in (1, 2, 3):
            assert results[w][1]["local_blocks"] == 10      # 54 left: no spill needed
        seg = bt.Segment.attach(shm_name)
        with seg:
            assert sum(seg.free_blocks(p) for p in range(4)) == 255 - 130
            rep = seg.check()
            assert rep.clean and rep.blocks_held == 130
            for parent, _ in pipes:
                parent.send("close")
                assert parent.poll(30) and parent.recv() == "closed"
            assert [seg.free_blocks(p) for p in range(4)] == [63, 64, 64, 64]
    finally:
        for p in procs:
            p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4


def test_attach_checks_the_shape(shm_name):
    with DistributedBlockTable(CFG, 2, 0, name=shm_name, blocks_per_worker=16) as t:
        with pytest.raises(bt.ConfigError, match="num_pools=2 \\(want 3\\)"):
            DistributedBlockTable(CFG, 3, 1, name=shm_name)
        with DistributedBlockTable(CFG, 2, 1, name=shm_name) as u:     # attaches
            assert u.segment.info.total_blocks == 32
            assert np.all(u.allocate_blocks(0, 3) // 16 == 1)
        assert t.get_stats()["pool_free"] == [15, 16]
