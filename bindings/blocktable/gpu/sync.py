"""Bringing a mirror up to date: stage what changed, move only that.

bt_mirror_stage_ex (libbt) reads every row under its seqlock and writes the
changed entries as (flat index, value) pairs into pinned staging memory: a
decode step that appended one block to each of 256 rows stages 256 entries
and 256 counts. The pairs are what was read consistently, so whatever the
upload below does, it never copies a torn row: the live table may change
under it, the staged values don't. How the pairs reach the device (`mode`):

  "scatter"   one host-to-device copy of the pairs, then one kernel that
              scatters them (the pairs are packed first so one copy moves both)
  "zerocopy"  no copy: the scatter kernel reads the pairs straight out of the
              pinned staging memory over the bus
  "ranges"    one cudaMemcpyAsync per run of consecutive indices, values only
              (a full stage, every row whole, goes as two 2-D copies)
  "auto"      the one measured fastest for the shape of what was staged
              (bench/bench_gpu.py; the table is in bench/gpu_results.json)

Ordering. Staging buffers form a ring of two per process and mirror: a
buffer is reused only after the copy that last read it completed (an event).
Syncs of one mirror, from any thread of any process, are ordered through the
segment itself:

  1. bt_mirror_sync_begin (bt_mirror_stage_ex with BT_STAGE_KEEP_LOCK, and
     the plan) stages and keeps the mirror's lock (a word holding the
     syncer's pid; BT_EBUSY while another live process holds it: retried
     for up to LOCK_WAIT_S). It also returns the last sync's record: the
     process (pid, start time) that made the last copy and the CUDA IPC
     event it recorded after it, already compared with this syncer
     (order: none, self or peer).
  2. The stream waits for that event (opened once per peer with
     cudaIpcOpenEventHandle). Our own record needs no IPC: the stream waits
     on our event only if it differs from the stream of our last copy. If
     the last syncer is dead, its copy may never have landed: the mirror is
     invalidated and staged again, in full, under the same lock.
  3. The copy is enqueued, then our event (interprocess, no timing) is
     recorded after it, and bt_mirror_sync_done publishes the record naming
     us and releases the lock. If the record already names this syncer's
     event, bt_mirror_unlock releases it instead: the record stays true (the
     next syncer waits on the event's latest record, ours, made before the
     lock was released) and the call is cheaper.
  On any failure in between: bt_mirror_invalidate (the records may be ahead
  of the device: the next stage is a full one), then bt_mirror_unlock.

The hot path (a zero-copy upload, the record ours or nobody's, the slot's
launch prepared): one C call (bt_mirror_sync_begin writes n into the
slot's prepared kernel arguments and returns the grid), one cuLaunchKernel,
two event records, bt_mirror_unlock or bt_mirror_sync_done; nothing
allocated per sync but the numbers. Measured on an H100 host for a decode
step (256 rows + 1 block; bench/gpu_logs/sync_profile.txt): ~25 us of host
time either way, before and after this path -- the staging itself (~8 us
after an edit, cache misses over 256 rows), cuLaunchKernel (~5 us) and the
two event records (~2.4 us) are most of it, the Python around them ~1 us.

So copies of one mirror land in the order their stages were taken. The lock
word belongs to a process, not a thread (libbt lets a process take its own
lock again), so the threads of one process are serialised by a threading
lock per segment and mirror before they reach it.
"""
import ctypes
import os
import threading
import time
import weakref

import numpy as np

from .._errors import make_error
from .. import _lib
from . import kernels
from ._cuda import ProcWatch, cupy, proc_start_time, stream_ptr

__all__ = ["Syncer", "MODES", "DEFAULT_MODE", "AUTO_RANGES_MAX_ROWS", "AUTO_ZEROCOPY_MAX",
           "LOCK_WAIT_S"]

MODES = ("auto", "scatter", "zerocopy", "ranges")
DEFAULT_MODE = "auto"
# "auto", from bench/bench_gpu.py on an H100 (bench/gpu_results.json): the
# zero-copy scatter was fastest for a decode step (256 rows x 1 entry), a
# prefill burst (16 rows x 500) and a single append; ranges lost everywhere
# but a full stage (512 copies for a decode step: 1.5 ms), which goes as two
# 2-D copies. So: a full stage -> ranges; rows <= AUTO_RANGES_MAX_ROWS ->
# ranges (0: never); up to AUTO_ZEROCOPY_MAX pairs -> zerocopy; else scatter.
AUTO_RANGES_MAX_ROWS = 0
AUTO_ZEROCOPY_MAX = 1 << 20
# How long a sync waits for another process's hold of the mirror's lock
# (it holds it from its stage until its copy is enqueued: microseconds).
LOCK_WAIT_S = 2.0

_H2D = 1                      # cudaMemcpyHostToDevice
_HOST_ALLOC_FLAGS = 1 | 2     # cudaHostAllocPortable | cudaHostAllocMapped
# cudaEventDisableTiming | cudaEventInterprocess: what
# cupy.cuda.Event(block=False, disable_timing=True, interprocess=True) makes.
_EV_FLAGS_IPC = 2 | 4
_EV_FLAGS = 2
_MAX_PEERS = 32               # opened peer events kept before the dead are pruned
_MAX_GRID = 1024              # scatter blocks at most (a grid-stride loop does the rest)
_ORDER_SELF, _ORDER_PEER = _lib.BT_ORDER_SELF, _lib.BT_ORDER_PEER

_orphans = []                 # events of closed Syncers that a record still names
_tlocks = {}                  # (segment, mirror index) -> threading.Lock of this process
_tlocks_guard = threading.Lock()


def _thread_lock(seg, index):
    """The lock that serialises this process's syncs of one mirror: keyed by
    the segment's name (every mapping of it in this process shares the lock
    word) or, embedded, its address."""
    key = (seg.name if seg.name else seg.address, index)
    with _tlocks_guard:
        lk = _tlocks.get(key)
        if lk is None:
            lk = _tlocks[key] = threading.Lock()
        return lk


class _Slot:
    """One staging buffer: pinned host pairs (idx int64[cap], val int32[cap]),
    a device copy of them (scatter mode, made on first use) and the event
    that says the last copy out of it is done."""

    def __init__(self, cap):
        rt = cupy().cuda.runtime
        self.cap, self.nbytes = cap, cap * 12
        self.host = rt.hostAlloc(self.nbytes, _HOST_ALLOC_FLAGS)
        raw = (ctypes.c_char * self.nbytes).from_address(self.host)
        self.bytes = np.frombuffer(raw, np.uint8)
        self.idx = np.frombuffer(raw, np.int64, cap, 0)
        self.val = np.frombuffer(raw, np.int32, cap, 8 * cap)
        self.idx_c = _lib.cast("int64_t *", self.host)
        self.val_c = _lib.cast("int32_t *", self.host + 8 * cap)
        # With unified addressing the device sees mapped pinned memory at the
        # same address; ask rather than assume.
        self.dev_host = rt.pointerGetAttributes(self.host).devicePointer or self.host
        self.dmem = None
        self.event = rt.eventCreateWithFlags(_EV_FLAGS)
        self.used = False
        # The zero-copy scatter of this slot's pairs, its arguments set once
        # (Syncer._prepare); bt_mirror_sync_begin writes n into n_arg.
        self.launch = None
        self.n_arg = _lib.NULL

    def wait(self):
        if self.used:
            cupy().cuda.runtime.eventSynchronize(self.event)
            self.used = False

    def device_buffer(self):
        if self.dmem is None:
            self.dmem = cupy().cuda.Memory(self.nbytes)
        return self.dmem.ptr

    def free(self):
        rt = cupy().cuda.runtime
        self.wait()
        rt.eventDestroy(self.event)
        self.bytes = self.idx = self.val = None
        rt.freeHost(self.host)
        self.host = 0
        self.dmem = None


class Syncer:
    """Brings one mirror's device copy up to date; one per process, mirror
    and generation (Mirror and MirrorExporter share it through `get`).
    Thread-safe: the syncs of one mirror in this process are serialised by
    a threading lock (see the module's text on ordering)."""

    _all = weakref.WeakKeyDictionary()   # Segment -> {(index, gen, pid, table ptr): Syncer}
    _all_lock = threading.Lock()

    @classmethod
    def get(cls, seg, index, generation, device, table_ptr, counts_ptr):
        # Per Segment object (a new segment may be mapped where an old one
        # was), and the device address is part of the key: a handle closed
        # and opened again may come back elsewhere.
        key = (index, generation, os.getpid(), table_ptr)
        with cls._all_lock:
            per = cls._all.setdefault(seg, {})
            s = per.get(key)
            if s is None:
                s = per[key] = cls(seg, index, generation, device, table_ptr, counts_ptr)
            return s

    def __init__(self, seg, index, generation, device, table_ptr, counts_ptr):
        cfg = seg.config
        # Not the Segment itself (the registry is keyed weakly by it): its
        # handle, and the mapping, which stays alive as long as we do.
        self._raw, self._keep, self.name = seg._s(), seg._base, seg.name
        self.index, self.generation, self.device = index, generation, device
        self.R, self.W = cfg.num_rows, cfg.row_width
        self.T = self.R * self.W
        self.cap = self.R * (self.W + 1)
        self.table_ptr, self.counts_ptr = table_ptr, counts_ptr
        self._contig = counts_ptr == table_ptr + 4 * self.T
        self._ring = [None, None]
        self._k = 0
        self._plan = _lib.new("bt_mirror_plan *")     # what bt_mirror_sync_begin found
        self._last = self._plan.last                  # the record it hands back
        self._rec = _lib.new("bt_mirror_sync *")      # ours, for bt_mirror_sync_done
        self._lock = _thread_lock(seg, index)
        self._pid = os.getpid()
        self._start = proc_start_time(self._pid)
        rt = self._rt = cupy().cuda.runtime
        # Another process can only wait on our copies through an IPC event;
        # an embedded segment has no other process.
        ipc = bool(seg.name)
        self._done = rt.eventCreateWithFlags(_EV_FLAGS_IPC if ipc else _EV_FLAGS)
        self._done_handle = bytes(rt.ipcGetEventHandle(self._done))[:64].ljust(64, b"\0") \
            if ipc else bytes(64)
        _lib.memmove(self._rec.event, self._done_handle, 64)
        self._self_ev = _lib.new("uint8_t[]", list(self._done_handle))
        self._done_stream = None          # stream of the last recorded _done, None: never
        self._peers = {}                  # (pid, start, handle) -> (ProcWatch, event ptr)
        self._launch = None               # kernels.Launch of bt_scatter
        self._threads = set()             # threads that launched through cupy once
        self.last_entries = self.last_rows = self.last_bytes = self.last_calls = 0
        self.last_mode = None
        self.last_waited = None           # "peer", "self", "dead" or None: see _order
        self.syncs = self.entries_total = self.bytes_total = self.full_restages = 0

    # ---- the public call -------------------------------------------------------
    def sync(self, stream=None, num_rows=None, mode=None):
        """Stage rows [0, num_rows) (default all) and enqueue their upload on
        `stream`. Returns the number of (index, value) pairs moved; the
        upload is asynchronous like any copy on `stream`. Work on `stream`
        after the call sees every sync of this mirror so far, from any
        process."""
        s = stream_ptr(stream)
        nr = self.R if num_rows is None else num_rows
        with self._lock:
            if self._rt.getDevice() != self.device:
                with cupy().cuda.Device(self.device):
                    return self._sync(s, nr, mode or DEFAULT_MODE)
            return self._sync(s, nr, mode or DEFAULT_MODE)

    def _begin(self, slot, num_rows):
        """bt_mirror_sync_begin: stage into `slot`, keep the lock, fill the
        plan (n, rows, order, grid; n also into the slot's launch). The
        result code; callers retry BT_EBUSY through _stage."""
        try:
            return _lib.mirror_sync_begin(self._raw, self.index, num_rows, slot.idx_c,
                                          slot.val_c, slot.cap, self._self_ev,
                                          kernels.SCATTER_BLOCK, _MAX_GRID, slot.n_arg,
                                          self._plan)
        except OverflowError as e:
            raise make_error(_lib.BT_ERANGE, f"sync(num_rows={num_rows}): {e}") from None

    def _stage(self, slot, num_rows, rc=None):
        """_begin until it stages; BT_EBUSY (another live process holds the
        lock) is retried for LOCK_WAIT_S. `rc`: a first try's result."""
        t0 = None
        tries = 0
        while True:
            if rc is None:
                rc = self._begin(slot, num_rows)
            if rc == 0:
                return
            if rc != _lib.EBUSY:
                raise _lib.mirror_begin_failed(rc, self.index, num_rows)
            rc = None
            now = time.monotonic()
            if t0 is None:
                t0 = now
            elif now - t0 > LOCK_WAIT_S:
                break
            tries += 1
            if tries < 64:
                os.sched_yield()
            else:
                time.sleep(50e-6)
        raise make_error(_lib.BT_EBUSY, f"bt_mirror_stage_ex(mirror {self.index}, "
                                        f"num_rows={num_rows}): another process held the "
                                        "mirror's sync lock, or a row stayed mid-write")

    def _prepare(self, slot):
        """The slot's own zero-copy launch, every argument but n set once."""
        ln = kernels.Launch("bt_scatter", kernels.SCATTER_ARGS, self.device)
        a = ln.args
        a[0].value, a[1].value = slot.dev_host, slot.dev_host + 8 * slot.cap
        a[3].value, a[4].value, a[5].value, a[6].value = \
            self.table_ptr, self.T, self.counts_ptr, self.R
        slot.n_arg = _lib.cast("int64_t *", ctypes.addressof(a[2]))
        slot.launch = ln

    def _sync(self, s, num_rows, mode):
        rt = self._rt
        k = self._k
        slot = self._ring[k]
        if slot is None:
            slot = self._ring[k] = _Slot(self.cap)
        slot.wait()
        if slot.launch is None:
            if self._launch is None:
                # Compile (or load) the scatter kernel before taking the
                # lock, which other processes wait for.
                kernels.get_kernel("bt_scatter", self.device)
            elif threading.get_ident() in self._threads:
                self._prepare(slot)
        rc = self._begin(slot, num_rows)
        if rc:
            self._stage(slot, num_rows, rc)          # retries while another holds the lock
        # The mirror's lock is ours from here.
        plan = self._plan
        n = plan.n
        if (n and plan.order != _ORDER_PEER and slot.launch is not None
                and (mode == "zerocopy" or (mode == "auto" and n != self.cap
                                            and plan.rows_dirty > AUTO_RANGES_MAX_ROWS
                                            and n <= AUTO_ZEROCOPY_MAX))
                and threading.get_ident() in self._threads):
            return self._fast(s, slot, k, plan, n, rt)
        return self._general(s, slot, k, num_rows, mode, rt)

    def _fast(self, s, slot, k, plan, n, rt):
        """The common sync: a zero-copy scatter of what was staged, after our
        own last copy or nobody's. One launch, two event records, the
        unlock; no Python objects made but the numbers."""
        ours = plan.order == _ORDER_SELF
        try:
            if ours and self._done_stream != s and self._done_stream is not None:
                rt.streamWaitEvent(s, self._done, 0)
            slot.launch(plan.grid, kernels.SCATTER_BLOCK, s)
            rt.eventRecord(slot.event, s)
            slot.used = True
            self._k = k ^ 1
            rt.eventRecord(self._done, s)
            self._done_stream = s
            if ours:
                _lib.mirror_unlock(self._raw, self.index)
            else:
                _lib.mirror_sync_done(self._raw, self.index, self._rec)
        except BaseException:
            self._failed(s, True)
            raise
        self.last_waited = "self" if ours else None
        self.last_entries, self.last_rows, self.last_bytes = n, plan.rows_dirty, 12 * n
        self.last_calls, self.last_mode = 1, "zerocopy"
        self.syncs += 1
        self.entries_total += n
        self.bytes_total += 12 * n
        return n

    def _failed(self, s, enqueued):
        _lib.mirror_invalidate(self._raw, self.index)   # the records ran ahead
        if enqueued:
            # A copy may be queued; let it land before another syncer,
            # which will not wait for it, starts the full one.
            try:
                self._rt.streamSynchronize(s)
            except Exception:
                pass
        _lib.mirror_unlock(self._raw, self.index)

    def _general(self, s, slot, k, num_rows, mode, rt):
        enqueued = False
        try:
            ours = self._order(s, slot, num_rows, rt)
            n, rows = self._plan.n, self._plan.rows_dirty
            nbytes = calls = 0
            used = mode
            if n:
                enqueued = True
                used, nbytes, calls = self._upload(slot, n, rows, s, mode, rt)
                rt.eventRecord(slot.event, s)
                slot.used = True
                self._k = k ^ 1
                rt.eventRecord(self._done, s)
                self._done_stream = s
            if n and not ours:
                _lib.mirror_sync_done(self._raw, self.index, self._rec)
            else:
                # Nothing copied (the record still names the last copy, which
                # the stream now waits for), or the record already names our
                # event, whose latest record is the one just made.
                _lib.mirror_unlock(self._raw, self.index)
        except BaseException:
            self._failed(s, enqueued)
            raise
        self.last_entries, self.last_rows, self.last_bytes = n, rows, nbytes
        self.last_calls, self.last_mode = calls, used
        self.syncs += 1
        self.entries_total += n
        self.bytes_total += nbytes
        return n

    def _order(self, s, slot, num_rows, rt):
        """Make stream s wait for the last copy into this mirror (the record
        that the stage handed back). True if the record names this syncer's
        own event. A dead last syncer's copy may never have landed: then the
        mirror is invalidated and staged again, in full, under our lock."""
        last = self._last
        pid = last.pid
        if last.seq == 0 or pid <= 0:
            self.last_waited = None
            return False                     # nobody synced yet (since the segment began)
        start = last.start_time
        if pid == self._pid and start == self._start:
            handle = bytes(_lib.buffer(last.event))
            if handle != self._done_handle:
                # Another syncer of ours, of an older publish (or closed):
                # its copies went elsewhere.
                self.last_waited = None
                return False
            if self._done_stream is not None and self._done_stream != s:
                rt.streamWaitEvent(s, self._done, 0)
            self.last_waited = "self"
            return True
        handle = bytes(_lib.buffer(last.event))
        key = (pid, start, handle)
        peer = self._peers.get(key)
        if peer is None:
            if len(self._peers) >= _MAX_PEERS:
                for kk in [kk for kk, (w, _) in self._peers.items() if not w.alive()]:
                    self._drop_peer(kk, rt)
            w = ProcWatch(pid, start)
            ev = None
            if w.alive():
                try:
                    ev = rt.ipcOpenEventHandle(handle)
                except rt.CUDARuntimeError:
                    ev = None
            peer = self._peers[key] = (w, ev)
        w, ev = peer
        if ev is not None and w.alive():
            rt.streamWaitEvent(s, ev, 0)
            self.last_waited = "peer"
            return False
        # Dead (or its event can't be opened): start over with a full stage.
        self._drop_peer(key, rt)
        _lib.mirror_invalidate(self._raw, self.index)
        self._stage(slot, num_rows)
        self.full_restages += 1
        self.last_waited = "dead"
        return False

    def _drop_peer(self, key, rt):
        w, ev = self._peers.pop(key, (None, None))
        if w is not None:
            w.close()
        if ev is not None:
            try:
                rt.eventDestroy(ev)
            except rt.CUDARuntimeError:
                pass

    # ---- the three ways up ---------------------------------------------------------
    def choose(self, n, rows):
        """What "auto" picks for n staged pairs from `rows` dirty rows."""
        if n == self.cap or rows <= AUTO_RANGES_MAX_ROWS:
            return "ranges"
        return "zerocopy" if n <= AUTO_ZEROCOPY_MAX else "scatter"

    def _upload(self, slot, n, rows, s, mode, rt):
        if mode == "auto":
            mode = self.choose(n, rows)
        if mode == "zerocopy":
            self._scatter(slot.dev_host, slot.dev_host + 8 * slot.cap, n, s)
            return mode, 12 * n, 1
        if mode == "scatter":
            d = slot.device_buffer()
            # Pack the values right after the indices: one copy moves both.
            b = slot.bytes
            b[8 * n:12 * n] = b[8 * slot.cap:8 * slot.cap + 4 * n]
            rt.memcpyAsync(d, slot.host, 12 * n, _H2D, s)
            self._scatter(d, d + 8 * n, n, s)
            return mode, 12 * n, 2
        if mode == "ranges":
            return mode, 4 * n, self._ranges(slot, n, s, rt)
        raise make_error(_lib.BT_EINVAL, f"sync mode {mode!r} is not one of {MODES}")

    def _scatter(self, idx, val, n, s):
        tid = threading.get_ident()
        if tid not in self._threads:
            # The first launch of a thread through cupy, which makes sure the
            # thread has the device's context current; then the fast path.
            kernels.scatter(idx, val, n, self.table_ptr, self.T, self.counts_ptr, self.R,
                            stream=s, device=self.device)
            self._threads.add(tid)
            if self._launch is None:
                self._launch = kernels.Launch("bt_scatter", kernels.SCATTER_ARGS, self.device)
                a = self._launch.args
                a[3].value, a[4].value, a[5].value, a[6].value = \
                    self.table_ptr, self.T, self.counts_ptr, self.R
            return
        a = self._launch.args
        a[0].value, a[1].value, a[2].value = idx, val, n
        self._launch(min((n + kernels.SCATTER_BLOCK - 1) // kernels.SCATTER_BLOCK, 1024),
                     kernels.SCATTER_BLOCK, s)

    def _ranges(self, slot, n, s, rt):
        vals = slot.host + 8 * slot.cap
        if n == self.cap:
            # A full stage: row r's W entries then its count, row after row,
            # i.e. an [R, W+1] matrix: two strided copies.
            pitch = 4 * (self.W + 1)
            rt.memcpy2DAsync(self.table_ptr, 4 * self.W, vals, pitch, 4 * self.W, self.R, _H2D, s)
            rt.memcpy2DAsync(self.counts_ptr, 4, vals + 4 * self.W, pitch, 4, self.R, _H2D, s)
            return 2
        i = slot.idx[:n]
        cut = np.diff(i) != 1
        if not self._contig:
            cut |= (i[1:] >= self.T) & (i[:-1] < self.T)
        starts = np.flatnonzero(cut) + 1
        a = 0
        T, tp, cp = self.T, self.table_ptr, self.counts_ptr
        bounds = starts.tolist()
        bounds.append(n)
        first = i[np.concatenate(([0], starts))].tolist()
        for b, k in zip(bounds, first):
            dst = tp + 4 * k if k < T else cp + 4 * (k - T)
            rt.memcpyAsync(dst, vals + 4 * a, 4 * (b - a), _H2D, s)
            a = b
        return len(bounds)

    def _named_in_record(self):
        if not self.name:
            return False
        rec = _lib.new("bt_mirror_sync *")
        if not _lib.mirror_sync_get(self._raw, self.index, rec):
            return True
        return rec.pid == self._pid and bytes(_lib.buffer(rec.event)) == self._done_handle

    def close(self):
        with self._lock:
            rt = cupy().cuda.runtime
            for i, sl in enumerate(self._ring):
                if sl is not None:
                    sl.free()
                    self._ring[i] = None
            for key in list(self._peers):
                self._drop_peer(key, rt)
            if self._done:
                rt.eventSynchronize(self._done)
                if self._named_in_record():
                    # Another process may still open and wait on it (the
                    # record outlives us): an event destroyed under an
                    # opened IPC handle is undefined behaviour. Keep it.
                    _orphans.append(self._done)
                else:
                    rt.eventDestroy(self._done)
                self._done = 0
        with Syncer._all_lock:
            for per in list(Syncer._all.values()):
                for key, v in list(per.items()):
                    if v is self:
                        del per[key]
