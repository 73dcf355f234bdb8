"""Shared mode across real processes: concurrent allocation and row edits on
one named segment, zero-copy visibility, and recovery after SIGKILL."""
import multiprocessing as mp
import os
import queue
import signal
import time

import numpy as np
import pytest

import blocktable as bt

import _workers

CFG = bt.SegmentConfig(num_pools=1, blocks_per_pool=256, num_rows=32, row_width=16,
                       max_clients=16, hand_size=64)
FORK = mp.get_context("fork")


def collect(q, procs, n, timeout=60):
    """n results from q; fail at once if a process died without reporting."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        try:
            out.append(q.get(timeout=0.2))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker died: exit codes {[p.exitcode for p in dead]}"
            assert time.monotonic() < deadline, "workers did not report in time"
    return out


def wait_for(cond, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_concurrent_clients_never_share_a_block(shm_name):
    n, iters = 4, 1500
    with bt.Segment.create(shm_name, CFG) as seg:
        usable = seg.info.total_blocks - 1  # minus the null block
        stamps = FORK.RawArray("i", seg.info.total_blocks)
        barrier, results, done = FORK.Barrier(n), FORK.Queue(), FORK.Event()
        procs = [FORK.Process(target=_workers.stress,
                              args=(shm_name, w + 1, iters, stamps, barrier, results, done))
                 for w in range(n)]
        for p in procs:
            p.start()
        try:
            reports = collect(results, procs, n)
            errors = [err for _, _, _, err in reports if err]
            assert not errors, errors[0]
            held = {}
            for _, cid, ids, _ in reports:
                for b in ids:
                    assert b not in held, f"block {b} held by clients {held[b]} and {cid}"
                    held[b] = cid
            rep = seg.check()  # quiet now: the workers wait on `done`
            assert rep.leaked == 0 and rep.double_free == 0 and rep.clean
            assert rep.blocks_held == len(held) and rep.blocks_free == usable - len(held)
            assert seg.free_blocks() == usable - len(held)
            for b, cid in held.items():
                info = seg.block(b)
                assert (info.ref_count, info.owner) == (1, cid)
        finally:
            done.set()
            for p in procs:
                p.join(30)
        assert [p.exitcode for p in procs] == [0] * n
        assert seg.free_blocks() == usable
        rep = seg.check()
        assert rep.clean and rep.blocks_held == 0 and rep.blocks_free == usable


def test_views_see_another_processes_writes(shm_name):
    """Zero copy: a view taken before another process (a fresh interpreter,
    "spawn") writes shows the write, with no call on this side."""
    ctx = mp.get_context("spawn")
    with bt.Segment.create(shm_name, CFG) as seg:
        view, counts = seg.table, seg.num_blocks
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_workers.write_row_and_wait, args=(shm_name, [11, 12, 13], child))
        p.start()
        try:
            assert parent.poll(60), "child did not write"
            row = parent.recv()
            assert view[row, :4].tolist() == [11, 12, 13, 0] and counts[row] == 3
        finally:
            parent.send("go")
            p.join(30)
        assert p.exitcode == 0
        assert counts[row] == 0 and seg.row_info(row).owner == 0  # closed: released


def test_sigkilled_client_is_recovered(shm_name):
    with bt.Segment.create(shm_name, CFG) as seg:
        free = seg.free_blocks()
        parent, child = FORK.Pipe()
        p = FORK.Process(target=_workers.hold_then_block, args=(shm_name, child))
        p.start()
        assert parent.poll(30), "child did not report"
        cid, loose, row, ids = parent.recv()
        assert seg.free_blocks() == free - 12 and seg.row_info(row).owner == cid
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert seg.free_blocks() == free - 12  # nobody has noticed yet
        seg.recover_client(cid)
        assert seg.free_blocks() == free
        assert seg.row_info(row).owner == 0 and seg.num_blocks[row] == 0
        assert seg.client_slot(cid).state == bt.lib.BT_CLIENT_FREE
        assert all(seg.block(b).ref_count == 0 for b in loose + ids)
        rep = seg.check()
        assert rep.clean and rep.blocks_held == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_at_a_random_moment_loses_no_block(shm_name, seed):
    """A client killed mid-traffic (maybe inside a call): recovery gives every
    block back, and another client kept working through it."""
    with bt.Segment.create(shm_name, CFG) as seg, seg.client() as bystander:
        free = seg.free_blocks()
        brow = bystander.claim_row()
        mine = bystander.alloc_append(brow, 4)
        parent, child = FORK.Pipe()
        p = FORK.Process(target=_workers.churn_forever, args=(shm_name, child, seed))
        p.start()
        assert parent.poll(30), "child did not start"
        cid = parent.recv()
        target = 200 + seed * 137
        wait_for(lambda: seg.client_slot(cid).ops >= target, what="child traffic")
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        seg.recover_client(cid)
        rep = seg.check()
        assert rep.clean, rep
        assert seg.free_blocks() == free - 4 and rep.blocks_held == 4
        np.testing.assert_array_equal(seg.read_row(brow)[0], mine)
        bystander.release_row(brow)
        assert seg.free_blocks() == free
