"""blocktable.gpu.sync's ordering, checked without a GPU.

The Syncer is driven through a stand-in for cupy's CUDA runtime that runs
every copy at once on host memory (the "device" table is a numpy array) and
logs the event calls, and a numpy bt_scatter. What it checks is what runs on
the CPU anyway: the stage that keeps the mirror's lock, the record of the
last syncer in the segment (bt_mirror_sync), waiting on a live peer's event,
a full restage after a dead one, the lock released on every path, threads
of one process serialised. Other processes here are forked children that
call libbt directly. tests/test_gpu.py runs the same code on a real GPU.
"""
import contextlib
import ctypes
import multiprocessing as mp
import os
import threading
import time
import types

import numpy as np
import pytest

import blocktable as bt
from blocktable import ffi, lib
from blocktable.gpu import _cuda, sync

FORK = mp.get_context("fork")
R, W = 12, 20
CFG = bt.SegmentConfig(block_size=16, num_pools=1, blocks_per_pool=2, num_rows=R, row_width=W,
                       max_clients=4, hand_size=1, max_mirrors=2)


class FakeRuntime:
    """The calls of cupy.cuda.runtime that sync.py makes, on the host."""

    class CUDARuntimeError(RuntimeError):
        def __init__(self, status=1):
            super().__init__(f"fake CUDA error {status}")
            self.status = status

    def __init__(self):
        self.log = []
        self._bufs = {}
        self._next = 1
        self.opened = {}          # local event id -> handle

    def getDevice(self):
        return 0

    def hostAlloc(self, n, flags):
        buf = ctypes.create_string_buffer(n)
        self._bufs[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def freeHost(self, p):
        self._bufs.pop(p)

    def pointerGetAttributes(self, p):
        return types.SimpleNamespace(devicePointer=p)

    def eventCreateWithFlags(self, flags):
        self._next += 1
        return self._next

    def eventRecord(self, ev, s):
        self.log.append(("record", ev, s))

    def eventSynchronize(self, ev):
        pass

    def eventDestroy(self, ev):
        self.log.append(("destroy", ev))

    def ipcGetEventHandle(self, ev):
        return b"ev:%d:%d" % (os.getpid(), ev) + bytes(64 - len(b"ev:%d:%d" % (os.getpid(), ev)))

    def ipcOpenEventHandle(self, handle):
        if handle.startswith(b"bad"):
            raise self.CUDARuntimeError(400)
        self._next += 1
        self.opened[self._next] = bytes(handle)
        self.log.append(("open", bytes(handle)))
        return self._next

    def streamWaitEvent(self, s, ev, flags):
        self.log.append(("wait", s, self.opened.get(ev, ev)))

    def streamSynchronize(self, s):
        pass

    def memcpyAsync(self, dst, src, n, kind, s):
        ctypes.memmove(dst, src, n)

    def memcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, s):
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)

    def waits(self):
        return [e for e in self.log if e[0] == "wait"]


class FakeMemory:
    def __init__(self, n):
        self._buf = ctypes.create_string_buffer(n)
        self.ptr = ctypes.addressof(self._buf)


def _host_scatter(idx, val, n, table, T, counts, num_rows):
    i = np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(int(idx)))
    v = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(int(val)))
    t = np.ctypeslib.as_array((ctypes.c_int32 * T).from_address(int(table)))
    c = np.ctypeslib.as_array((ctypes.c_int32 * num_rows).from_address(int(counts)))
    m = i < T
    t[i[m]] = v[m]
    c[i[~m] - T] = v[~m]


class FakeLaunch:
    def __init__(self, name, arg_types, device=None):
        self.args = [t() for t in arg_types]

    def __call__(self, grid, block, stream_ptr, grid_y=1):
        a = [x.value for x in self.args]
        _host_scatter(*a)


def _fake_kernels():
    from blocktable.gpu import kernels as K
    ns = types.SimpleNamespace(
        SCATTER_ARGS=K.SCATTER_ARGS, SCATTER_BLOCK=K.SCATTER_BLOCK, Launch=FakeLaunch,
        get_kernel=lambda name, device=None: None,
        scatter=lambda idx, val, n, tp, T, cp, R_, stream=None, device=None:
        _host_scatter(idx, val, n, tp, T, cp, R_))
    return ns


@pytest.fixture
def rt(monkeypatch):
    r = FakeRuntime()
    cuda = types.SimpleNamespace(runtime=r, Device=lambda d: contextlib.nullcontext(),
                                 Memory=FakeMemory)
    monkeypatch.setattr(_cuda, "_cp", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(sync, "kernels", _fake_kernels())
    return r


class Setup:
    """A named segment with every row claimed, a published mirror whose
    "device" copy is host memory, and a Syncer over it."""

    def __init__(self, name, rng):
        self.seg = bt.Segment.create(name, CFG)
        self.cl = self.seg.client()
        self.rng = rng
        for r in range(R):
            self.cl.claim_row(row=r, raw=True)
            self.cl.append(r, rng.integers(1, 1 << 20, int(rng.integers(0, W // 2))).astype(np.int32))
        i = ffi.new("uint32_t *")
        assert lib.bt_mirror_claim(self.seg._seg, i) == 0
        d = ffi.new("bt_mirror_desc *")
        d.alloc_size, d.table_off, d.counts_off = R * (W + 1) * 4, 0, R * W * 4
        assert lib.bt_mirror_publish(self.seg._seg, i[0], d) == 0
        self.index = i[0]
        self.dev = np.full(R * (W + 1), -7, np.int32)      # table then counts
        ptr = self.dev.ctypes.data
        self.syncer = sync.Syncer(self.seg, self.index, 1, 0, ptr, ptr + 4 * R * W)

    def device_ok(self):
        np.testing.assert_array_equal(self.dev[:R * W].reshape(R, W), self.seg.table)
        np.testing.assert_array_equal(self.dev[R * W:], self.seg.num_blocks)

    def decode(self):
        for r in range(R):
            if self.seg.num_blocks[r] < W:
                self.cl.append(r, [int(self.rng.integers(1, 1 << 20))])

    def record(self):
        rec = ffi.new("bt_mirror_sync *")
        assert lib.bt_mirror_sync_get(self.seg._seg, self.index, rec) == 0
        return rec.pid, rec.seq, bytes(ffi.buffer(rec.event))

    def close(self):
        self.cl.close()
        self.seg.close()


@pytest.fixture
def setup(rt, shm_name):
    s = Setup(shm_name, np.random.default_rng(7))
    yield s
    s.close()


# ---- other processes: forked, libbt only -------------------------------------------------
def _stage_keep(seg, index):
    cap = R * (W + 1)
    idx, val = ffi.new("int64_t[]", cap), ffi.new("int32_t[]", cap)
    n, dirty = ffi.new("uint64_t *"), ffi.new("uint32_t *")
    return lib.bt_mirror_stage_ex(seg._seg, index, R, lib.BT_STAGE_KEEP_LOCK, idx, val, cap,
                                  n, dirty, ffi.NULL)


def _peer(name, index, handle, hold_s, conn):
    """Stage with the lock kept, report, hold it hold_s, publish a record
    naming `handle`, report, then stay alive until told (or exit at once
    if conn.recv() says so)."""
    seg = bt.Segment.attach(name)
    rc = _stage_keep(seg, index)
    conn.send(("staged", rc))
    time.sleep(hold_s)
    rec = ffi.new("bt_mirror_sync *")
    ffi.memmove(rec.event, handle, len(handle))
    conn.send(("done", lib.bt_mirror_sync_done(seg._seg, index, rec)))
    conn.recv()
    os._exit(0)


def _probe_lock(name, index, conn):
    """A stage of no rows into no room: BT_EBUSY if another live process
    holds the lock; otherwise it changes nothing (a valid mirror stages
    nothing, an invalid one fails with BT_EINVAL and stays invalid)."""
    seg = bt.Segment.attach(name)
    n = ffi.new("uint64_t *")
    conn.send(lib.bt_mirror_stage_ex(seg._seg, index, 0, 0, ffi.NULL, ffi.NULL, 0, n, ffi.NULL,
                                     ffi.NULL))
    os._exit(0)


def lock_is_free(s):
    """Another process could take the mirror's lock now."""
    a, b = FORK.Pipe()
    p = FORK.Process(target=_probe_lock, args=(s.seg.name, s.index, b))
    p.start()
    rc = a.recv()
    p.join(10)
    assert rc in (0, lib.BT_EINVAL, lib.BT_EBUSY), rc
    return rc != lib.BT_EBUSY


@contextlib.contextmanager
def peer(s, handle, hold_s=0.0):
    a, b = FORK.Pipe()
    p = FORK.Process(target=_peer, args=(s.seg.name, s.index, handle, hold_s, b))
    p.start()
    try:
        yield p, a
    finally:
        if p.is_alive():
            try:
                a.send("exit")
            except OSError:
                pass
        p.join(10)


def _handle(tag):
    return (tag + bytes(64))[:64]


@contextlib.contextmanager
def peer_synced(s, handle):
    """After a first sync of ours, a peer (as `peer`) whose own sync has staged and
    finished, recording event `handle`: (its process, its pipe)."""
    s.syncer.sync(1)
    with peer(s, handle) as (p, conn):
        assert conn.recv() == ("staged", 0)
        assert conn.recv() == ("done", 0)
        yield p, conn


# ---- tests -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "scatter", "zerocopy", "ranges"])
def test_sync_moves_what_changed_and_leaves_a_record(setup, rt, mode):
    s = setup
    assert s.syncer.sync(1, mode=mode) == R * (W + 1)          # unknown device copy: full
    s.device_ok()
    pid, seq, ev = s.record()
    assert (pid, seq, ev) == (os.getpid(), 1, s.syncer._done_handle)
    assert ev.startswith(b"ev:")                                # the IPC event's handle
    s.decode()
    n = s.syncer.sync(1, mode=mode)
    assert n == 2 * R and s.syncer.last_rows == R
    s.device_ok()
    # Already ours: the lock is released without a new record.
    assert s.record()[:2] == (os.getpid(), 1)
    assert s.syncer.last_waited == "self" and rt.waits() == []
    assert s.syncer.sync(1, mode=mode) == 0
    assert lock_is_free(s)


def test_another_stream_waits_for_our_last_copy(setup, rt):
    s = setup
    s.syncer.sync(1)
    s.decode()
    s.syncer.sync(2)
    assert rt.waits() == [("wait", 2, s.syncer._done)]
    s.syncer.sync(2)                                             # same stream: no wait
    assert len(rt.waits()) == 1


def test_a_failed_copy_invalidates_and_unlocks(setup, rt):
    s = setup
    s.syncer.sync(1)
    s.decode()

    def boom(*a, **k):
        raise RuntimeError("copy failed")

    s.syncer._upload = boom
    with pytest.raises(RuntimeError, match="copy failed"):
        s.syncer.sync(1)
    assert lock_is_free(s)
    del s.syncer._upload                  # the class's own again
    assert s.syncer.sync(1) == R * (W + 1)                        # full: nothing trusted
    s.device_ok()


def test_live_peer_is_waited_for_then_the_record_is_ours(setup, rt):
    s = setup
    h = _handle(b"peer-a")
    with peer_synced(s, h) as (p, conn):
        pid, seq, ev = s.record()
        assert pid == p.pid and ev == h and seq == 2
        # Nothing changed: no copy, but the stream still waits for the
        # peer's copy, and the record keeps naming the peer.
        assert s.syncer.sync(1) == 0
        assert rt.waits() == [("wait", 1, h)] and s.syncer.last_waited == "peer"
        assert s.record()[0] == p.pid
        s.decode()
        assert s.syncer.sync(3) == 2 * R
        assert rt.waits()[-1] == ("wait", 3, h)
        assert rt.log.count(("open", h)) == 1                      # opened once, cached
        pid, seq, ev = s.record()
        assert pid == os.getpid() and seq == 3 and ev == s.syncer._done_handle
        s.device_ok()
    assert lock_is_free(s)


def test_dead_last_syncer_means_a_full_restage(setup, rt):
    s = setup
    with peer_synced(s, _handle(b"peer-b")) as (p, conn):
        conn.send("exit")
        p.join(10)
    assert s.record()[0] == p.pid
    s.cl.append(0, [99]) if s.seg.num_blocks[0] < W else s.cl.truncate(0, 1)
    # Its copy may never have landed: everything again, in this one sync.
    assert s.syncer.sync(1) == R * (W + 1)
    assert s.syncer.last_waited == "dead" and s.syncer.full_restages == 1
    assert rt.waits() == []
    s.device_ok()
    assert s.record()[0] == os.getpid()
    assert lock_is_free(s)


def test_unopenable_peer_event_means_a_full_restage(setup, rt):
    s = setup
    with peer_synced(s, _handle(b"bad")) as (p, conn):
        assert s.syncer.sync(1) == R * (W + 1)
        assert s.syncer.last_waited == "dead"
        s.device_ok()


def test_a_peer_holding_the_lock_is_waited_for(setup, rt):
    s = setup
    s.syncer.sync(1)
    s.decode()
    h = _handle(b"peer-c")
    with peer(s, h, hold_s=0.3) as (p, conn):
        assert conn.recv() == ("staged", 0)
        t0 = time.monotonic()
        # The peer staged the decode step (its records say the device has
        # it), so this sync moves nothing of it, but orders after its copy.
        assert s.syncer.sync(1) == 0
        assert time.monotonic() - t0 > 0.2
        assert conn.recv() == ("done", 0)
        assert rt.waits() == [("wait", 1, h)]


def test_lock_wait_gives_up_with_busy(setup, rt, monkeypatch):
    s = setup
    s.syncer.sync(1)
    monkeypatch.setattr(sync, "LOCK_WAIT_S", 0.15)
    with peer(s, _handle(b"peer-d"), hold_s=2.0) as (p, conn):
        assert conn.recv() == ("staged", 0)
        with pytest.raises(bt.Busy, match="sync lock"):
            s.syncer.sync(1)
        assert not lock_is_free(s)
        assert conn.recv() == ("done", 0)                          # the peer's lock stayed its own
    s.decode()
    assert s.syncer.sync(1) > 0


def test_threads_of_one_process_take_turns(setup, rt):
    """The lock word is per process: without the threading lock, two
    threads (here through two mappings of the segment, two Syncers) would
    both hold it and stage over each other's records."""
    s = setup
    seg2 = bt.Segment.attach(s.seg.name)
    ptr = s.dev.ctypes.data
    other = sync.Syncer(seg2, s.index, 1, 0, ptr, ptr + 4 * R * W)
    assert other._lock is s.syncer._lock
    errors = []
    stop = threading.Event()

    def loop(sy, stream):
        try:
            while not stop.is_set():
                sy.sync(stream)
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=loop, args=(sy, i + 1))
          for i, sy in enumerate([s.syncer, other, s.syncer, other])]
    for t in ts:
        t.start()
    try:
        for _ in range(60):
            s.decode()
            r = int(s.rng.integers(0, R))
            s.cl.set_row(r, s.rng.integers(1, 1 << 20, int(s.rng.integers(0, W))).astype(np.int32))
            time.sleep(0.002)
    finally:
        stop.set()
        for t in ts:
            t.join(10)
    assert errors == []
    assert s.syncer.syncs + other.syncs > 8
    s.syncer.sync(1)
    s.device_ok()
    assert lock_is_free(s)
    seg2.close()


def test_embedded_segment_records_without_ipc(rt):
    with bt.Segment.create(None, CFG) as seg:
        cl = seg.client()
        for r in range(R):
            cl.claim_row(row=r, raw=True)
            cl.append(r, [r + 1])
        i = ffi.new("uint32_t *")
        assert lib.bt_mirror_claim(seg._seg, i) == 0
        d = ffi.new("bt_mirror_desc *")
        d.alloc_size, d.table_off, d.counts_off = R * (W + 1) * 4, 0, R * W * 4
        assert lib.bt_mirror_publish(seg._seg, i[0], d) == 0
        dev = np.zeros(R * (W + 1), np.int32)
        sy = sync.Syncer(seg, i[0], 1, 0, dev.ctypes.data, dev.ctypes.data + 4 * R * W)
        assert sy._done_handle == bytes(64)
        assert sy.sync(5) == R * (W + 1)
        cl.append(3, [77])
        assert sy.sync(5) == 2
        np.testing.assert_array_equal(dev[:R * W].reshape(R, W), seg.table)
        rec = ffi.new("bt_mirror_sync *")
        lib.bt_mirror_sync_get(seg._seg, i[0], rec)
        assert rec.pid == os.getpid() and rec.seq == 1
        cl.close()


# ---- the hot path: bt_mirror_sync_begin + one prepared launch ----------------------------
def _warm(s):
    """Syncs until both staging slots have their prepared launch (the first
    launch of a thread goes through cupy; the hot path follows)."""
    s.syncer.sync(1)
    for _ in range(3):
        s.decode()
        s.syncer.sync(1)
    assert all(sl.launch is not None for sl in s.syncer._ring)


def test_hot_path_is_one_launch_and_stays_exact(setup, rt):
    s = setup
    _warm(s)
    for step in range(6):
        s.decode()
        if step == 3:
            s.cl.set_row(2, [5, 6])                   # a rewrite among the appends
        n = s.syncer.sync(1)
        assert s.syncer.last_mode == "zerocopy" and s.syncer.last_calls == 1
        assert s.syncer.last_bytes == 12 * n and s.syncer.last_waited == "self"
        s.device_ok()
    assert rt.waits() == []
    s.decode()
    s.syncer.sync(5)                                  # another stream waits for our last copy
    assert rt.waits() == [("wait", 5, s.syncer._done)]
    assert s.record()[:2] == (os.getpid(), 1) and lock_is_free(s)


def test_hot_path_failure_invalidates_and_unlocks(setup, rt):
    s = setup
    _warm(s)
    s.decode()
    k = s.syncer._k
    launch = s.syncer._ring[k].launch

    def boom(*a, **kw):
        raise RuntimeError("launch failed")

    s.syncer._ring[k].launch = boom
    with pytest.raises(RuntimeError, match="launch failed"):
        s.syncer.sync(1)
    assert lock_is_free(s)
    s.syncer._ring[k].launch = launch
    assert s.syncer.sync(1) == R * (W + 1)            # full: nothing trusted
    s.device_ok()


def test_sync_begin_plans_the_order(setup):
    """bt_mirror_sync_begin's order: NONE before any record, SELF when the
    record names this process and the event given, PEER for another
    process's record; n is written where the launch reads it."""
    s = setup
    seg, i = s.seg._seg, s.index
    cap = R * (W + 1)
    idx, val = ffi.new("int64_t[]", cap), ffi.new("int32_t[]", cap)
    n_arg, plan = ffi.new("int64_t *"), ffi.new("bt_mirror_plan *")
    mine = _handle(b"mine")
    ev = ffi.new("uint8_t[]", list(mine))

    def begin():
        rc = lib.bt_mirror_sync_begin(seg, i, R, idx, val, cap, ev, 256, 1024, n_arg, plan)
        assert rc == 0
        return plan.order

    assert begin() == lib.BT_ORDER_NONE and plan.n == cap == n_arg[0]
    assert plan.grid == (cap + 255) // 256 and plan.rows_dirty == R
    rec = ffi.new("bt_mirror_sync *")
    ffi.memmove(rec.event, mine, 64)
    assert lib.bt_mirror_sync_done(seg, i, rec) == 0
    s.decode()
    assert begin() == lib.BT_ORDER_SELF and plan.n == n_arg[0] == 2 * R
    assert lib.bt_mirror_unlock(seg, i) == 0
    ev2 = ffi.new("uint8_t[]", list(_handle(b"other-of-mine")))
    assert lib.bt_mirror_sync_begin(seg, i, R, idx, val, cap, ev2, 256, 1, n_arg, plan) == 0
    assert plan.order == lib.BT_ORDER_NONE and plan.n == 0 and plan.grid == 0
    assert lib.bt_mirror_unlock(seg, i) == 0
    with peer(s, _handle(b"peer-b")) as (p, conn):
        assert conn.recv() == ("staged", 0) and conn.recv() == ("done", 0)
        assert begin() == lib.BT_ORDER_PEER and bytes(ffi.buffer(plan.last.event)) == \
            _handle(b"peer-b")
        assert lib.bt_mirror_unlock(seg, i) == 0
    assert lib.bt_mirror_sync_begin(seg, i, R, idx, val, cap, ffi.NULL, 256, 1024, n_arg,
                                    plan) == lib.BT_EINVAL
    assert lock_is_free(s)
