"""Bringing a mirror up to date: stage what changed, move only that.

bt_mirror_stage (libbt) reads every row under its seqlock and writes the
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
A sync is ordered after the previous sync of the same mirror, in this process
(an event, when the streams differ) and in others: for a named segment, a
record beside the segment (/dev/shm/bt.<name>.gpusync, one 128-byte record
per mirror, guarded by an open-file-description lock) names the last syncing
process and a CUDA IPC event it recorded after its copy; the next syncer from
another process makes its stream wait on that event before its own copy, so
copies of one mirror land in the order their stages were taken. If that
process died, its copy may not have landed: the mirror is invalidated and
the next stage is a full one.
"""
import ctypes
import fcntl
import mmap
import os
import struct
import threading
import weakref

import numpy as np

from .._errors import make_error
from .._ffi import ffi, lib
from . import kernels
from ._cuda import ProcWatch, cupy, proc_start_time, stream_ptr

__all__ = ["Syncer", "MODES", "DEFAULT_MODE", "AUTO_RANGES_MAX_ROWS", "AUTO_ZEROCOPY_MAX",
           "remove_sync_file"]

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

_H2D = 1                      # cudaMemcpyHostToDevice
_HOST_ALLOC_FLAGS = 1 | 2     # cudaHostAllocPortable | cudaHostAllocMapped
_EV_FLAGS_IPC = 2 | 4         # cudaEventDisableTiming | cudaEventInterprocess
_EV_FLAGS = 2


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
        self.idx_c = ffi.cast("int64_t *", self.host)
        self.val_c = ffi.cast("int32_t *", self.host + 8 * cap)
        # With unified addressing the device sees mapped pinned memory at the
        # same address; ask rather than assume.
        self.dev_host = rt.pointerGetAttributes(self.host).devicePointer or self.host
        self.dmem = None
        self.event = rt.eventCreateWithFlags(_EV_FLAGS)
        self.used = False

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


# ---- the record beside a named segment -------------------------------------
_REC = 128
_REC_FMT = "<IiQQ64s"          # magic, pid, start time, mirror generation, event handle
_REC_MAGIC = 0x62744753        # "SGtb"
_FLOCK = "hhxxxxqqixxxx"       # struct flock on Linux x86-64/aarch64


def _same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _Handoff:
    """The last syncer of each mirror of a named segment, in a small file
    beside it. Any process may create it; the exporter's publish starts a new
    generation, so records of an older one are ignored."""

    _files = {}               # (path, pid) -> fd, one per process
    _maps = {}                # (path, pid) -> mmap of the file
    _flock = threading.Lock()

    def __init__(self, name, index):
        self.path = f"/dev/shm/bt.{name}.gpusync"
        self.off = index * _REC
        with _Handoff._flock:
            fd = _Handoff._files.get((self.path, os.getpid()))
            if fd is not None and not _same_file(fd, self.path):
                # Unlinked and made again (a new segment of the same name):
                # the old inode is nobody's record any more.
                _Handoff._files.pop((self.path, os.getpid()))
                _Handoff._maps.pop((self.path, os.getpid()), None)
                fd = None
            if fd is None:
                try:
                    mode = os.stat(f"/dev/shm/bt.{name}").st_mode & 0o666
                except OSError:
                    mode = 0o600
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
                if os.fstat(fd).st_size < 64 * _REC:
                    os.ftruncate(fd, 64 * _REC)
                _Handoff._files[(self.path, os.getpid())] = fd
            mm = _Handoff._maps.get((self.path, os.getpid()))
            if mm is None:
                mm = _Handoff._maps[(self.path, os.getpid())] = mmap.mmap(fd, 64 * _REC)
        self.fd, self.mm = fd, mm
        # The lock and unlock requests, packed once (each sync makes both).
        if hasattr(fcntl, "F_OFD_SETLKW"):
            self._cmd = fcntl.F_OFD_SETLKW
            self._wr = struct.pack(_FLOCK, fcntl.F_WRLCK, 0, self.off, _REC, 0)
            self._un = struct.pack(_FLOCK, fcntl.F_UNLCK, 0, self.off, _REC, 0)
        else:
            self._cmd = None

    def lock(self):
        if self._cmd is not None:
            fcntl.fcntl(self.fd, self._cmd, self._wr)
        else:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, _REC, self.off)

    def unlock(self):
        if self._cmd is not None:
            fcntl.fcntl(self.fd, self._cmd, self._un)
        else:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, _REC, self.off)

    def read(self):
        """(pid, start, generation, event handle) of the last syncer, or None.
        Read from the mapping (no system call), under the lock."""
        magic, pid, start, gen, handle = struct.unpack_from(_REC_FMT, self.mm, self.off)
        return (pid, start, gen, handle) if magic == _REC_MAGIC else None

    def write(self, pid, start, gen, handle):
        struct.pack_into(_REC_FMT, self.mm, self.off, _REC_MAGIC, pid, start, gen, handle)


def remove_sync_file(name):
    """Remove the record file beside segment `name` (/dev/shm/bt.<name>.gpusync),
    e.g. when the segment itself is unlinked. Absent: nothing to do."""
    try:
        os.unlink(f"/dev/shm/bt.{name}.gpusync")
    except FileNotFoundError:
        pass
    # Descriptors this process holds on it stay open: a Syncer may still use
    # one, and closing it would let the number be reused under it.


class Syncer:
    """Brings one mirror's device copy up to date; one per process, mirror
    and generation (Mirror and MirrorExporter share it through `get`).
    Thread-safe: syncs of one Syncer are serialised by a lock."""

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
        self._raw, self._keep, self.name = seg._seg, seg._base, seg.name
        self.index, self.generation, self.device = index, generation, device
        self.R, self.W = cfg.num_rows, cfg.row_width
        self.T = self.R * self.W
        self.cap = self.R * (self.W + 1)
        self.table_ptr, self.counts_ptr = table_ptr, counts_ptr
        self._contig = counts_ptr == table_ptr + 4 * self.T
        self._ring = [None, None]
        self._k = 0
        self._n, self._dirty = ffi.new("uint64_t *"), ffi.new("uint32_t *")
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._start = proc_start_time(self._pid)
        self._handoff = _Handoff(seg.name, index) if seg.name else None
        rt = self._rt = cupy().cuda.runtime
        self._done = rt.eventCreateWithFlags(_EV_FLAGS_IPC if self._handoff else _EV_FLAGS)
        self._done_handle = rt.ipcGetEventHandle(self._done) if self._handoff else b""
        self._done_stream = None          # stream of the last recorded _done, None: never
        self._peers = {}                  # (pid, start, handle) -> (ProcWatch, event ptr)
        self._launch = None               # kernels.Launch of bt_scatter
        self._threads = set()             # threads that launched through cupy once
        self.last_entries = self.last_rows = self.last_bytes = self.last_calls = 0
        self.last_mode = None
        self.syncs = self.entries_total = self.bytes_total = 0

    # ---- the public call -------------------------------------------------------
    def sync(self, stream=None, num_rows=None, mode=None):
        """Stage rows [0, num_rows) (default all) and enqueue their upload on
        `stream`. Returns the number of (index, value) pairs moved; the
        upload is asynchronous like any copy on `stream`."""
        s = stream_ptr(stream)
        nr = self.R if num_rows is None else num_rows
        with self._lock:
            if self._rt.getDevice() != self.device:
                with cupy().cuda.Device(self.device):
                    return self._sync_locked(s, nr, mode or DEFAULT_MODE)
            return self._sync_locked(s, nr, mode or DEFAULT_MODE)

    def _sync_locked(self, s, nr, mode):
        h = self._handoff
        if h is None:
            return self._sync(s, nr, mode, None)
        h.lock()
        try:
            return self._sync(s, nr, mode, h)
        finally:
            h.unlock()

    def _sync(self, s, num_rows, mode, h):
        rt = self._rt
        k = self._k
        slot = self._ring[k]
        if slot is None:
            slot = self._ring[k] = _Slot(self.cap)
        slot.wait()
        write_rec = self._order_after_previous(s, h, rt) if h is not None else False
        if self._done_stream is not None and self._done_stream != s:
            rt.streamWaitEvent(s, self._done, 0)
        try:
            rc = lib.bt_mirror_stage(self._raw, self.index, num_rows, slot.idx_c, slot.val_c,
                                     slot.cap, self._n, self._dirty)
        except OverflowError as e:
            raise make_error(lib.BT_ERANGE, f"sync(num_rows={num_rows}): {e}") from None
        if rc:
            raise make_error(rc, f"bt_mirror_stage(mirror {self.index}, num_rows={num_rows})")
        n, rows = self._n[0], self._dirty[0]
        nbytes = calls = 0
        used = mode
        if n:
            try:
                used, nbytes, calls = self._upload(slot, n, rows, s, mode, rt)
            except BaseException:
                lib.bt_mirror_invalidate(self._raw, self.index)  # the record ran ahead
                raise
            rt.eventRecord(slot.event, s)
            slot.used = True
            self._k = k ^ 1
        if n or write_rec:
            # Even with nothing staged, a syncer that takes the record over
            # records its event after waiting for the previous one: whoever
            # waits on it next waits for that too.
            rt.eventRecord(self._done, s)
            self._done_stream = s
        if write_rec:
            h.write(self._pid, self._start, self.generation, self._done_handle)
        self.last_entries, self.last_rows, self.last_bytes = n, rows, nbytes
        self.last_calls, self.last_mode = calls, used
        self.syncs += 1
        self.entries_total += n
        self.bytes_total += nbytes
        return n

    def _order_after_previous(self, s, h, rt):
        """Make stream s wait for the last sync of this mirror by another
        process. True if the record must name us afterwards."""
        rec = h.read()
        if rec is None:
            return True
        pid, start, gen, handle = rec
        if pid == self._pid and start == self._start:
            return gen != self.generation
        if gen != self.generation:
            return True                   # an older publish: nothing of ours to wait for
        key = (pid, start, handle)
        peer = self._peers.get(key)
        if peer is None:
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
        else:
            # Its copy may or may not have landed: start over with a full stage.
            lib.bt_mirror_invalidate(self._raw, self.index)
            self._drop_peer(key, rt)
        return True

    def _drop_peer(self, key, rt):
        w, ev = self._peers.pop(key, (None, None))
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
        raise make_error(lib.BT_EINVAL, f"sync mode {mode!r} is not one of {MODES}")

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
                rt.eventDestroy(self._done)
                self._done = 0
        with Syncer._all_lock:
            for per in list(Syncer._all.values()):
                for key, v in list(per.items()):
                    if v is self:
                        del per[key]
