"""GPU mirrors, sync, kernels and CpuGpuBuffer on a real GPU.

Skipped (with the reason) where cupy or a CUDA device is missing, as in CI;
run on the GPU machine. Processes are spawned, never forked, once CUDA is up:
a process can't open its own IPC handle, so every IPC test has an exporter
and an opener in different processes.
"""
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

import blocktable as bt
from blocktable import gpu

from conftest import gpu_exporter, random_requests

OK, WHY = gpu.gpu_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"needs a CUDA GPU and cupy: {WHY}")

CFG = bt.SegmentConfig(block_size=16, num_pools=1, blocks_per_pool=2, num_rows=64,
                       row_width=96, max_clients=8, hand_size=1, max_mirrors=4)


def cupy():
    import cupy as cp
    return cp


@pytest.fixture
def named(shm_name):
    with bt.Segment.create(shm_name, CFG) as seg:
        yield seg


def consistent_rows(table, counts):
    """Rows the writer below makes: entry j == entry 0 + j below the count,
    zeros past it. A torn row (parts of two versions) breaks it."""
    bad = []
    for r in range(table.shape[0]):
        n = int(counts[r])
        row = table[r]
        if n < 0 or n > row.shape[0] or (row[n:] != 0).any() or \
                (n and (row[:n] != row[0] + np.arange(n)).any()):
            bad.append(r)
    return bad


def rand_row(rng, width, n=None):
    n = int(rng.integers(0, width + 1)) if n is None else n
    base = int(rng.integers(1, 1 << 24))
    return np.arange(base, base + n, dtype=np.int32)


# ---- child processes (spawned) ---------------------------------------------------
def _writer(name, seconds, seed, done):
    """Appends, rewrites, truncates and swaps rows as fast as it can."""
    seg = bt.Segment.attach(name)
    cl = seg.client()
    rng = np.random.default_rng(seed)
    R, W = seg.config.num_rows, seg.config.row_width
    rows = [cl.claim_row(row=r, raw=True) for r in range(R)]
    for r in rows:
        cl.set_row(r, rand_row(rng, W, 4))
    ops, t_end = 0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        r = int(rng.integers(0, R))
        op = int(rng.integers(0, 10))
        n = int(seg.num_blocks[r])
        if op < 6 and n < W:          # decode: append the next id
            nxt = int(seg.table[r, n - 1]) + 1 if n else int(rng.integers(1, 1 << 24))
            cl.append(r, [nxt])
        elif op < 8:
            cl.set_row(r, rand_row(rng, W))
        elif op < 9:
            cl.truncate(r, int(rng.integers(0, n + 1)))
        else:
            cl.swap(r, int(rng.integers(0, R)))
        ops += 1
    done.put(ops)
    cl.close()


def _opener_sync(name, q_in, q_out):
    """Opens the mirror by IPC, syncs when told, reports what it saw."""
    cp = cupy()
    seg = bt.Segment.attach(name)
    m = gpu.Mirror.open(seg, wait=10)
    q_out.put(("open", m.index, m.generation))
    while True:
        cmd = q_in.get()
        if cmd == "stop":
            break
        n = m.sync()
        cp.cuda.get_current_stream().synchronize()
        q_out.put(("synced", n, cp.asnumpy(m.table).tolist(), cp.asnumpy(m.counts).tolist()))


def _opener_hammer(name, seconds, release, q_out):
    """Opens the mirror by IPC and syncs it on its own stream as fast as it
    can (while another process does too); reports how each sync was ordered,
    then stays alive until released (a dead last syncer would make the
    other's next sync a full one, rightly)."""
    cp = cupy()
    seg = bt.Segment.attach(name)
    m = gpu.Mirror.open(seg, wait=10)
    q_out.put("open")
    s = cp.cuda.Stream(non_blocking=True)
    waited, n, moved = {}, 0, 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        moved += m.sync(stream=s)
        w = str(m._syncer.last_waited)
        waited[w] = waited.get(w, 0) + 1
        n += 1
    s.synchronize()
    q_out.put((n, moved, waited, m._syncer.full_restages))
    release.wait(60)


def _opener_sync_once(name, q_out):
    cp = cupy()
    seg = bt.Segment.attach(name)
    m = gpu.Mirror.open(seg, wait=10)
    n = m.sync()
    cp.cuda.get_current_stream().synchronize()
    q_out.put((n, m._syncer.last_waited))


def sync_record(seg, index):
    from blocktable import ffi, lib
    rec = ffi.new("bt_mirror_sync *")
    assert lib.bt_mirror_sync_get(seg._seg, index, rec) == 0
    return rec.pid, rec.seq


def ctx():
    return mp.get_context("spawn")


# ---- tests -------------------------------------------------------------------------
def test_ipc_open_from_second_process_sees_synced_table(named):
    """The exporter is a child; this process opens by IPC, syncs, and its
    device view equals the table, through cupy and torch."""
    cp = cupy()
    c = ctx()
    ready, stop = c.Queue(), c.Event()
    p = c.Process(target=gpu_exporter, args=(named.name, ready, stop))
    p.start()
    try:
        idx, gen, pid = ready.get(timeout=60)
        cl = named.client()
        rng = np.random.default_rng(0)
        for r in range(CFG.num_rows):
            cl.claim_row(row=r, raw=True)
            cl.set_row(r, rand_row(rng, CFG.row_width))
        m = gpu.Mirror.open(named, wait=5)
        assert (m.index, m.generation, m.exporter_pid) == (idx, gen, pid)
        assert m.sync() == CFG.num_rows * (CFG.row_width + 1)     # first: full
        cp.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(m.table), named.table)
        np.testing.assert_array_equal(cp.asnumpy(m.counts), named.num_blocks)
        # Only what changed moves: one append to each of 3 rows -> 3 entries + 3 counts.
        for r in (1, 5, 9):
            if named.num_blocks[r] < CFG.row_width:
                cl.append(r, [7])
        moved = m.sync()
        assert moved <= 6 and m.last_sync[1] <= 3
        cp.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(m.table), named.table)
        t = m.tensor(10)
        import torch
        assert t.is_cuda and tuple(t.shape) == (10, CFG.row_width)
        assert torch.equal(t.cpu(), torch.from_numpy(named.table[:10].copy()))
        infos = gpu.list_mirrors(named)
        assert infos[idx].exporter_alive and infos[idx].state == 2
        cl.close()
    finally:
        stop.set()
        p.join(30)


def test_exporter_death_then_reopen(named):
    """kill -9 the exporter: the next use raises MirrorGone (no crash, no
    device access); a new exporter publishes a new generation; reopen."""
    cp = cupy()
    c = ctx()
    ready, stop = c.Queue(), c.Event()
    p = c.Process(target=gpu_exporter, args=(named.name, ready, stop))
    p.start()
    idx, gen, pid = ready.get(timeout=60)
    cl = named.client()
    cl.claim_row(row=0, raw=True)
    cl.set_row(0, [1, 2, 3])
    m = gpu.Mirror.open(named, wait=5)
    m.sync()
    cp.cuda.get_current_stream().synchronize()
    os.kill(pid, signal.SIGKILL)
    p.join(30)
    with pytest.raises(gpu.MirrorGone, match="died|dead"):
        m.sync()
    with pytest.raises(gpu.MirrorGone):
        m.table
    assert not m.alive
    # A new Event: the killed exporter died waiting on the first one, and a
    # multiprocessing Event's set() waits for every sleeper to wake.
    stop = c.Event()
    p2 = c.Process(target=gpu_exporter, args=(named.name, ready, stop))
    p2.start()
    try:
        idx2, gen2, pid2 = ready.get(timeout=60)
        assert pid2 != pid
        m.reopen(wait=5)
        assert m.generation == gen2 and m.generation != gen and m.exporter_pid == pid2
        cl.append(0, [4])
        assert m.sync() > 0                           # a new allocation: full again
        cp.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(m.table), named.table)
        np.testing.assert_array_equal(cp.asnumpy(m.counts), named.num_blocks)
    finally:
        stop.set()
        p2.join(30)
        cl.close()
    # A clean exit retires the mirror: MirrorGone again, saying so.
    with pytest.raises(gpu.MirrorGone, match="retired|died"):
        m.sync()


@pytest.mark.parametrize("mode", ["auto", "scatter", "zerocopy", "ranges"])
def test_sync_under_concurrent_edits_never_tears_a_row(shm_name, mode):
    """A writer process appends, rewrites, truncates and swaps rows while
    this one syncs in a loop: every synced snapshot has only whole rows,
    and after the writer stops one more sync makes the mirror equal."""
    cp = cupy()
    c = ctx()
    with bt.Segment.create(shm_name, CFG) as seg, gpu.MirrorExporter(seg) as ex:
        done = c.Queue()
        w = c.Process(target=_writer, args=(shm_name, 3.0, 11, done))
        w.start()
        syncs, torn = 0, []
        s = cp.cuda.Stream(non_blocking=True)
        t_end = time.monotonic() + 30
        while w.is_alive() and time.monotonic() < t_end:
            ex.sync(stream=s, mode=mode)
            s.synchronize()
            syncs += 1
            bad = consistent_rows(cp.asnumpy(ex.table), cp.asnumpy(ex.counts))
            torn += bad
        ops = done.get(timeout=30)
        w.join(30)
        ex.sync(stream=s, mode=mode)
        s.synchronize()
        assert torn == [], f"torn rows after {syncs} syncs: {torn[:10]}"
        np.testing.assert_array_equal(cp.asnumpy(ex.table), seg.table)
        np.testing.assert_array_equal(cp.asnumpy(ex.counts), seg.num_blocks)
        assert ops > 1000 and syncs > 10


def test_any_process_may_sync_in_turn(named):
    """Syncs alternate between this process (the exporter) and another that
    opened by IPC: each sees the table, ordered through the IPC events."""
    cp = cupy()
    c = ctx()
    ex = gpu.MirrorExporter(named)
    q_in, q_out = c.Queue(), c.Queue()
    p = c.Process(target=_opener_sync, args=(named.name, q_in, q_out))
    p.start()
    try:
        assert q_out.get(timeout=60)[0] == "open"
        cl = named.client()
        rows = [cl.claim_row(row=r, raw=True) for r in range(CFG.num_rows)]
        rng = np.random.default_rng(5)
        for rnd in range(6):
            for r in rng.choice(rows, 8, replace=False):
                cl.set_row(int(r), rand_row(rng, CFG.row_width))
            if rnd % 2:
                ex.sync()
                cp.cuda.get_current_stream().synchronize()
                got_t, got_c = cp.asnumpy(ex.table), cp.asnumpy(ex.counts)
            else:
                q_in.put("sync")
                _, n, t, cnt = q_out.get(timeout=60)
                got_t, got_c = np.array(t, np.int32), np.array(cnt, np.int32)
            np.testing.assert_array_equal(got_t, named.table)
            np.testing.assert_array_equal(got_c, named.num_blocks)
        cl.close()
    finally:
        q_in.put("stop")
        p.join(30)
        ex.close()


def test_two_processes_sync_at_once_under_edits(shm_name):
    """The exporter and an opener both sync in loops, each on its own
    stream, while a writer edits: the stages take turns through the
    mirror's lock, each copy waits for the one before it (an IPC event from
    the other process), and once all stop one more sync makes the mirror
    equal. A copy landing out of order would leave a row stale that the
    records call synced: the last sync would not fix it."""
    cp = cupy()
    c = ctx()
    with bt.Segment.create(shm_name, CFG) as seg, gpu.MirrorExporter(seg) as ex:
        ex.sync()
        done, q, release = c.Queue(), c.Queue(), c.Event()
        o = c.Process(target=_opener_hammer, args=(shm_name, 4.0, release, q))
        o.start()
        try:
            assert q.get(timeout=60) == "open"
            w = c.Process(target=_writer, args=(shm_name, 3.0, 23, done))
            w.start()
            s = cp.cuda.Stream(non_blocking=True)
            waited, syncs = {}, 0
            t_end = time.monotonic() + 30
            # Until the writer is done and the opener has reported (it stays
            # alive after that, until released).
            while (w.is_alive() or q.empty()) and time.monotonic() < t_end:
                ex.sync(stream=s)
                k = str(ex._syncer.last_waited)
                waited[k] = waited.get(k, 0) + 1
                syncs += 1
            ops = done.get(timeout=30)
            n_o, moved_o, waited_o, restages_o = q.get(timeout=60)
            w.join(30)
            assert w.exitcode == 0
            ex.sync(stream=s)
            s.synchronize()
            np.testing.assert_array_equal(cp.asnumpy(ex.table), seg.table)
            np.testing.assert_array_equal(cp.asnumpy(ex.counts), seg.num_blocks)
            assert ops > 1000 and syncs > 10 and n_o > 10, (ops, syncs, n_o)
            # Each side found the other's record, and waited on its event;
            # nobody died, so nobody staged in full again.
            assert waited.get("peer", 0) > 0 and waited_o.get("peer", 0) > 0, (waited, waited_o)
            assert restages_o == 0 and ex._syncer.full_restages == 0
            assert sync_record(seg, ex.index)[1] > 2
        finally:
            release.set()
            o.join(30)
        assert o.exitcode == 0


def test_a_dead_last_syncer_makes_the_next_sync_full(named):
    """The last copy came from a process that is gone: it may never have
    landed, so the next sync stages every row again, in the same call."""
    cp = cupy()
    c = ctx()
    ex = gpu.MirrorExporter(named)
    try:
        cl = named.client()
        for r in range(CFG.num_rows):
            cl.claim_row(row=r, raw=True)
            cl.set_row(r, [r + 1, r + 2])
        ex.sync()
        cl.append(3, [99])
        q = c.Queue()
        p = c.Process(target=_opener_sync_once, args=(named.name, q))
        p.start()
        n, waited = q.get(timeout=60)
        p.join(30)
        assert n == 2 and waited == "peer"                 # after the exporter's copy
        assert sync_record(named, ex.index)[0] == p.pid
        cl.append(4, [98])
        ex.sync()
        assert ex.last_sync[0] == CFG.num_rows * (CFG.row_width + 1)
        assert ex._syncer.last_waited == "dead" and ex._syncer.full_restages == 1
        cp.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(ex.table), named.table)
        np.testing.assert_array_equal(cp.asnumpy(ex.counts), named.num_blocks)
        assert sync_record(named, ex.index)[0] == os.getpid()
        cl.append(5, [97])
        assert ex.sync() == 2 and ex._syncer.last_waited == "self"
        cl.close()
    finally:
        ex.close()


def test_threads_of_one_process_sync_one_mirror(named):
    """Several threads sync the same mirror (each on its own stream) while
    this thread edits: they take turns, and a last sync makes it equal."""
    import threading
    cp = cupy()
    ex = gpu.MirrorExporter(named)
    cl = named.client()
    rng = np.random.default_rng(9)
    for r in range(CFG.num_rows):
        cl.claim_row(row=r, raw=True)
        cl.set_row(r, rand_row(rng, CFG.row_width, 4))
    errors, stop = [], threading.Event()

    def loop():
        try:
            with cp.cuda.Device(ex.device):
                st = cp.cuda.Stream(non_blocking=True)
                while not stop.is_set():
                    ex.sync(stream=st)
                st.synchronize()
        except Exception as e:      # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=loop) for _ in range(4)]
    for t in ts:
        t.start()
    try:
        for i in range(3000):
            r = int(rng.integers(0, CFG.num_rows))
            n = int(named.num_blocks[r])
            if i % 5 and n < CFG.row_width:
                cl.append(r, [int(named.table[r, n - 1]) + 1 if n else 1])
            else:
                cl.set_row(r, rand_row(rng, CFG.row_width))
    finally:
        stop.set()
        for t in ts:
            t.join(30)
    try:
        assert errors == []
        ex.sync()
        cp.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(ex.table), named.table)
        np.testing.assert_array_equal(cp.asnumpy(ex.counts), named.num_blocks)
    finally:
        cl.close()
        ex.close()


def test_exporter_process_opens_its_own_mirror_locally():
    with bt.Segment.create(None, CFG) as seg, gpu.MirrorExporter(seg) as ex:
        m = gpu.Mirror.open(seg)
        assert m.index == ex.index and m.table.data.ptr == ex.table.data.ptr
        with pytest.raises(gpu.MirrorNotFound):
            gpu.Mirror.open(seg, index=(ex.index + 1) % CFG.max_mirrors)


def test_pinned_registration_of_the_segment(named):
    assert gpu.register_segment(named) is True
    assert gpu.register_segment(named) is True          # once per process


def filled_segment(rng, R=32, W=40, bs=16):
    seg = bt.Segment.create(None, bt.SegmentConfig(
        block_size=bs, num_pools=1, blocks_per_pool=2, num_rows=R, row_width=W,
        max_clients=2, hand_size=1, max_mirrors=2))
    cl = seg.client()
    for r in range(R):
        cl.claim_row(row=r, raw=True)
        cl.append(r, rng.integers(0, 1 << 20, int(rng.integers(0, W + 1))).astype(np.int32))
    return seg, cl


@pytest.mark.parametrize("bs,world,rank,il", [(16, 1, 0, 1), (8, 1, 0, 1), (12, 1, 0, 1),
                                              (16, 2, 1, 1), (16, 4, 3, 4), (6, 3, 2, 3),
                                              (32, 8, 5, 2)])
def test_slot_mapping_kernels_bit_identical_to_cpu(bs, world, rank, il):
    """Random requests, positions, kernel block sizes and dcp ranks: the
    GPU kernel's slots equal libbt's bt_slots_* exactly, -1 tail included."""
    cp = cupy()
    rng = np.random.default_rng(bs * 97 + rank)
    seg, cl = filled_segment(rng)
    with seg, gpu.MirrorExporter(seg) as ex:
        ex.sync()
        sp = bt.SlotParams(block_size=bs, cp_world=world, cp_rank=rank, cp_interleave=il)
        R, W = seg.config.num_rows, seg.config.row_width
        for trial in range(20):
            num_reqs, lens, qsl, total, out_len, rows = random_requests(rng, R, 40, 300, 200)
            pos = rng.integers(-4, W * bs * world + 64, total).astype(np.int64)
            want = seg.slots_qsl(qsl, pos, rows=rows, out_len=out_len, params=sp)
            got = ex.slot_mapping(cp.asarray(qsl), positions=cp.asarray(pos),
                                  rows=cp.asarray(rows), out_len=out_len, params=sp)
            np.testing.assert_array_equal(cp.asnumpy(got), want)
            starts = rng.integers(-3, W * bs * world, num_reqs).astype(np.int64)
            got1 = ex.slot_mapping(qsl, starts=starts, rows=rows, out_len=out_len, params=sp)
            want1 = np.full(out_len, -1, np.int64)
            for i in range(num_reqs):
                want1[qsl[i]:qsl[i + 1]] = seg.slots_row(int(rows[i]), int(starts[i]),
                                                         int(lens[i]), params=sp)
            np.testing.assert_array_equal(cp.asnumpy(got1), want1)
            tr = rng.integers(0, R, 777).astype(np.int32)
            tp = rng.integers(-2, W * bs * world + 5, 777).astype(np.int64)
            got2 = ex.slot_mapping_tokens(tr, tp, out_len=800, params=sp)
            want2 = np.concatenate([seg.slots_req(tr, tp, params=sp), np.full(23, -1)])
            np.testing.assert_array_equal(cp.asnumpy(got2), want2)
        # The hot-path form: persistent buffers, one prepared launch.
        for use_starts in (False, True):
            mp_ = ex.slot_mapper(40, 40 * 300 + 200, params=sp, starts=use_starts)
            num_reqs = 33
            lens = rng.integers(0, 300, num_reqs)
            qsl = np.zeros(num_reqs + 1, np.int32)
            qsl[1:] = np.cumsum(lens)
            rows = rng.integers(0, R, num_reqs).astype(np.int32)
            out_len = int(qsl[-1]) + 77
            mp_.query_start_loc[:num_reqs + 1] = cp.asarray(qsl)
            mp_.rows[:num_reqs] = cp.asarray(rows)
            if use_starts:
                st = rng.integers(0, W * bs * world, num_reqs).astype(np.int64)
                mp_.starts[:num_reqs] = cp.asarray(st)
                pos = np.concatenate([np.arange(a, a + n) for a, n in zip(st, lens)] or
                                     [np.empty(0, np.int64)]).astype(np.int64)
            else:
                pos = rng.integers(-4, W * bs * world + 64, int(qsl[-1])).astype(np.int64)
                mp_.positions[:pos.shape[0]] = cp.asarray(pos)
            got3 = mp_(num_reqs, out_len)
            want3 = seg.slots_qsl(qsl, pos, rows=rows, out_len=out_len, params=sp)
            np.testing.assert_array_equal(cp.asnumpy(got3), want3)
        cl.close()


@pytest.mark.parametrize("width", [None, 16, 10])
def test_gather_kernel(width):
    cp = cupy()
    rng = np.random.default_rng(3)
    seg, cl = filled_segment(rng, R=24, W=40)
    with seg, gpu.MirrorExporter(seg) as ex:
        ex.sync()
        idx = np.array([5, -1, 0, 23, 5, 7, -1], np.int32)
        out = ex.gather(cp.asarray(idx), num_reqs_padded=12, width=width)
        w = width or 40
        want = np.zeros((12, w), np.int32)
        for i, r in enumerate(idx):
            if r >= 0:
                want[i] = seg.table[r, :w]
        np.testing.assert_array_equal(cp.asnumpy(out), want)
        cl.close()


def test_cpu_gpu_buffer_on_gpu():
    import torch
    b = gpu.CpuGpuBuffer(8, 16, dtype=torch.int32, device="cuda")
    assert b.pinned
    b.set(1, 2, 5)
    b.set_row(4, [1, 2, 3])
    assert b._sync_to_gpu() == 2 * 16 * 4                 # two dirty rows only
    g = b.get_gpu()
    assert g.is_cuda and int(g[1, 2]) == 5 and g[4, :4].tolist() == [1, 2, 3, 0]
    b.np[7, 0] = 9                                        # behind its back: copy_to_gpu
    b.copy_to_gpu(8)
    torch.cuda.synchronize()
    assert int(b.gpu[7, 0]) == 9
    b.gpu[0, 0] = 42
    b.copy_to_cpu(1)
    torch.cuda.synchronize()
    assert b.get(0, 0) == 42
