"""GPU mirrors of a segment's table, shared between processes by CUDA IPC.

An *exporter* (the daemon with ``--gpu``, or any process that opts in)
allocates, per GPU, one device allocation holding a copy of the table
(int32 [num_rows, row_width]) followed by the block counts (int32
[num_rows]), and publishes its IPC handle with the offsets, the device's UUID
and its own pid and start time in the segment (bt_mirror_publish). Any
attached process *opens* it: the device is found by UUID among the devices
visible here (indices differ between processes), the handle is opened
(cudaIpcOpenMemHandle) and the copy is seen through zero-copy CuPy arrays and
torch tensors. Any process may ``sync()`` it (see sync.py).

Life and death. A legacy IPC allocation dies with its exporter. Every use of
an opened mirror (sync, the views, the kernels) first checks that the
descriptor still carries the generation it opened and that the exporter is
alive (a pidfd, or pid + start time); if not, it raises MirrorGone, before
touching device memory. A restarted exporter publishes a new generation
(taking over dead exporters' slots); ``reopen()`` follows it. Views taken
before MirrorGone keep the old mapping open until they are dropped (closing
it under them would turn a stale read into a crash) and must not be used.

A process can't open its own IPC handle: in the exporter's process,
``Mirror.open`` returns a handle on the exporter's own allocation.
"""
import contextlib
import os
import threading
import time

import numpy as np

from .._errors import make_error
from .. import _lib
from . import kernels
from ._cuda import (MirrorGone, MirrorNotFound, ProcWatch, _err, cupy, device_by_uuid,
                    device_uuid, proc_start_time, stream_ptr, uuid_str)
from .sync import Syncer

__all__ = ["MirrorExporter", "Mirror", "SlotMapper", "export", "list_mirrors", "MirrorInfo"]

FREE, CLAIMED, PUBLISHED = _lib.BT_MIRROR_FREE, _lib.BT_MIRROR_CLAIMED, _lib.BT_MIRROR_PUBLISHED

_local = {}                   # (segment address, index) -> MirrorExporter of this process
_local_lock = threading.Lock()


def _seg_key(seg):
    return seg.address


def _desc(seg, index):
    return _lib.mirror_get(seg._s(), index)


class MirrorInfo:
    """A plain snapshot of one mirror descriptor."""
    __slots__ = ("index", "state", "generation", "exporter_pid", "exporter_start", "uuid",
                 "handle", "alloc_size", "table_off", "counts_off", "device_index")

    def __init__(self, index, d):
        self.index = index
        for f in self.__slots__[1:]:
            v = getattr(d, f)
            setattr(self, f, bytes(_lib.buffer(v)) if f in ("uuid", "handle") else v)

    @property
    def exporter_alive(self):
        return self.exporter_pid > 0 and proc_start_time(self.exporter_pid) == self.exporter_start

    def __repr__(self):
        st = {FREE: "free", CLAIMED: "claimed", PUBLISHED: "published"}.get(self.state, self.state)
        return (f"<MirrorInfo {self.index} {st} gen={self.generation} {uuid_str(self.uuid)} "
                f"(device {self.device_index} of pid {self.exporter_pid}"
                f"{'' if self.exporter_alive else ', dead'})>")


def list_mirrors(seg):
    """Every mirror slot of the segment, as MirrorInfo snapshots."""
    return [MirrorInfo(i, _desc(seg, i)) for i in range(seg.config.max_mirrors)]


def _views(cp, ptr, size, owner, device, table_off, counts_off, R, W):
    mem = cp.cuda.UnownedMemory(ptr, size, owner, device)
    table = cp.ndarray((R, W), np.int32, cp.cuda.MemoryPointer(mem, table_off))
    counts = cp.ndarray((R,), np.int32, cp.cuda.MemoryPointer(mem, counts_off))
    return table, counts


def _torch_view(a):
    import torch
    return torch.from_dlpack(a)


class _MirrorBase:
    """What an exporter and an opener share: the views, sync and kernels."""

    def _setup(self, seg, index, generation, device, table, counts):
        self.segment, self.index, self.generation, self.device = seg, index, generation, device
        self._table, self._counts = table, counts
        self._syncer = Syncer.get(seg, index, generation, device, table.data.ptr,
                                  counts.data.ptr)
        self._gone = None
        self._d = _lib.new("bt_mirror_desc *")      # reused by every check()

    # ---- liveness ----------------------------------------------------------------
    def check(self):
        """Raise MirrorGone if the mirror this handle holds is no longer the
        published one (exporter dead, retired, or republished)."""
        if self._gone is not None:
            raise _err(MirrorGone, self._gone)
        why = self._why_gone()
        if why:
            self._gone = why
            raise _err(MirrorGone, why)

    @property
    def alive(self):
        try:
            self.check()
            return True
        except MirrorGone:
            return False

    def _why_gone(self):
        d = self._d
        rc = _lib.mirror_rc(self.segment._s(), self.index, d)
        if rc:
            return f"mirror {self.index}: {make_error(rc)}"
        if d.generation != self.generation or d.state != PUBLISHED:
            return (f"mirror {self.index} was generation {self.generation}, is now "
                    f"{d.generation} ({'published' if d.state == PUBLISHED else 'retired'})"
                    f": reopen it")
        return None

    # ---- views ---------------------------------------------------------------------
    @property
    def table(self):
        """cupy int32 [num_rows, row_width]: the device copy (zero copy)."""
        self.check()
        return self._table

    @property
    def counts(self):
        """cupy int32 [num_rows]: the device copy of the block counts."""
        self.check()
        return self._counts

    def tensor(self, num_reqs=None):
        """torch view (DLPack, zero copy) of table[:num_reqs]: what vLLM's
        get_device_tensor(num_reqs) returns."""
        self.check()
        t = self.__dict__.get("_ttable")
        if t is None:
            t = self._ttable = _torch_view(self._table)
        return t if num_reqs is None else t[:num_reqs]

    def counts_tensor(self):
        self.check()
        t = self.__dict__.get("_tcounts")
        if t is None:
            t = self._tcounts = _torch_view(self._counts)
        return t

    # ---- sync ------------------------------------------------------------------------
    def sync(self, stream=None, num_rows=None, mode=None):
        """Bring the device copy up to date with the table, moving only what
        changed since any process last synced it. Enqueued on `stream`
        (default: the current stream); returns the number of entries moved.
        MirrorGone if the mirror went away."""
        self.check()
        return self._syncer.sync(stream, num_rows, mode)

    @property
    def last_sync(self):
        """(entries, dirty rows, bytes, copy calls, mode) of the last sync."""
        s = self._syncer
        return s.last_entries, s.last_rows, s.last_bytes, s.last_calls, s.last_mode

    def invalidate(self):
        """Forget what the device holds: the next sync is a full one."""
        _lib.mirror_invalidate(self.segment._s(), self.index)

    # ---- kernels ---------------------------------------------------------------------
    def _on_device(self):
        cp = cupy()
        if cp.cuda.runtime.getDevice() == self.device:
            return contextlib.nullcontext()
        return cp.cuda.Device(self.device)

    def slot_mapping(self, query_start_loc, positions=None, rows=None, starts=None,
                     out=None, out_len=None, params=None, stream=None):
        """Slots (int64, on the device) from the mirror, bit-identical to
        libbt's bt_slots_*: request i covers tokens [qsl[i], qsl[i+1]), lives
        in rows[i] (None: row i), and its tokens sit at positions[t]
        (vLLM's form) or, with starts, at starts[i] + (t - qsl[i]) (the
        seed's per-request form). Entries from qsl[-1] to out_len are -1 (a
        fixed length for CUDA graphs). params: a SlotParams (block size,
        decode context parallelism). Inputs may be numpy (uploaded) or
        device arrays (used as they are)."""
        cp = cupy()
        self.check()
        qsl = _dev(cp, query_start_loc, np.int32)
        num_reqs = qsl.shape[0] - 1
        if num_reqs < 0:
            raise make_error(_lib.BT_EINVAL, "query_start_loc is empty")
        if out_len is None:
            if out is not None:
                out_len = out.shape[0]
            elif isinstance(query_start_loc, np.ndarray):
                out_len = int(query_start_loc[-1])
            else:
                out_len = int(qsl[-1].get())
        if out is None:
            out = cp.empty(out_len, np.int64)
        elif out.dtype != np.int64 or out.shape[0] < out_len:
            raise make_error(_lib.BT_EINVAL, f"out must be int64 with >= {out_len} entries")
        if (positions is None) == (starts is None):
            raise make_error(_lib.BT_EINVAL, "give positions or starts (not both)")
        kp = params if isinstance(params, kernels.SlotKernelParams) else \
            kernels.SlotKernelParams.of(self.segment.config, params)
        with self._on_device():
            kernels.slots_qsl(self._table, self._counts, qsl, num_reqs, out, out_len, kp,
                              rows=_dev(cp, rows, np.int32),
                              positions=_dev(cp, positions, np.int64),
                              starts=_dev(cp, starts, np.int64), stream=stream,
                              device=self.device)
        return out[:out_len]

    def slot_mapper(self, max_reqs, max_tokens, params=None, starts=False):
        """A SlotMapper over this mirror: persistent device buffers and one
        prepared launch, for the per-step hot path (and CUDA graphs)."""
        return SlotMapper(self, max_reqs, max_tokens, params, starts)

    def slot_mapping_tokens(self, rows, positions, out=None, out_len=None, params=None,
                            stream=None):
        """Per token: vLLM's compute_slot_mapping(req_indices, positions)."""
        cp = cupy()
        self.check()
        r, p = _dev(cp, rows, np.int32), _dev(cp, positions, np.int64)
        n = p.shape[0]
        if r.shape[0] != n:
            raise make_error(_lib.BT_EINVAL, f"{r.shape[0]} rows for {n} positions")
        out_len = n if out_len is None else out_len
        out = cp.empty(out_len, np.int64) if out is None else out
        kp = params if isinstance(params, kernels.SlotKernelParams) else \
            kernels.SlotKernelParams.of(self.segment.config, params)
        with self._on_device():
            kernels.slots_tok(self._table, self._counts, r, p, n, out, out_len, kp,
                              stream=stream, device=self.device)
        return out[:out_len]

    def gather(self, idx_mapping, num_reqs_padded=None, width=None, out=None, stream=None):
        """Dense int32 [num_reqs_padded, width] block table of a batch:
        row i is the mirror's row idx_mapping[i], zeros where it is -1 and
        for rows past len(idx_mapping)."""
        cp = cupy()
        self.check()
        idx = _dev(cp, idx_mapping, np.int32)
        n = idx.shape[0]
        padded = n if num_reqs_padded is None else num_reqs_padded
        width = self._table.shape[1] if width is None else width
        if out is None:
            out = cp.empty((padded, width), np.int32)
        with self._on_device():
            kernels.gather(self._table, self._counts, idx, n, out, stream=stream,
                           device=self.device)
        return out


class SlotMapper:
    """Slot mapping for a scheduler step, with vLLM's persistent buffers:
    fill ``query_start_loc`` (int32 [max_reqs + 1]), ``rows`` (int32
    [max_reqs]) and ``positions`` (int64 [max_tokens]; or ``starts``, int64
    [max_reqs], with starts=True: the seed's per-request form) on the device,
    then call ``mapper(num_reqs, out_len)``: ``out`` (int64 [max_tokens])
    gets the slots, -1 from query_start_loc[num_reqs] to out_len. One
    prepared launch (no allocation, no per-argument conversion), and the
    buffers never move, so the launch can be captured in a CUDA graph.
    MirrorGone if the mirror went away (checked before each launch)."""

    def __init__(self, mirror, max_reqs, max_tokens, params=None, starts=False):
        cp = cupy()
        self.mirror = mirror
        kp = params if isinstance(params, kernels.SlotKernelParams) else \
            kernels.SlotKernelParams.of(mirror.segment.config, params)
        with mirror._on_device():
            self.query_start_loc = cp.zeros(max_reqs + 1, np.int32)
            self.rows = cp.zeros(max_reqs, np.int32)
            self.out = cp.full(max_tokens, -1, np.int64)
            if starts:
                self.starts, self.positions = cp.zeros(max_reqs, np.int64), None
            else:
                self.positions, self.starts = cp.zeros(max_tokens, np.int64), None
            self._launch = kernels.Launch("bt_slots_qsl", kernels.SLOTS_QSL_ARGS, mirror.device)
        t = mirror._table
        a = self._launch.args
        vals = (t.data.ptr, mirror._counts.data.ptr, t.shape[1], t.shape[0], self.rows.data.ptr,
                self.query_start_loc.data.ptr, 0,
                self.positions.data.ptr if self.positions is not None else 0,
                self.starts.data.ptr if self.starts is not None else 0, self.out.data.ptr, 0,
                *[int(x) for x in kp.args])
        for arg, v in zip(a, vals):
            arg.value = v
        self.max_reqs, self.max_tokens = max_reqs, max_tokens
        self._generation = mirror.generation

    def __call__(self, num_reqs, out_len=None, stream=None, tail_blocks=4):
        """Launch; returns ``out[:out_len]`` (default max_tokens)."""
        m = self.mirror
        m.check()
        if m.generation != self._generation:
            raise _err(MirrorGone, "the mirror was reopened: make a new SlotMapper")
        out_len = self.max_tokens if out_len is None else out_len
        if not 0 <= num_reqs <= self.max_reqs or not 0 <= out_len <= self.max_tokens:
            raise make_error(_lib.BT_EINVAL, f"num_reqs {num_reqs} / out_len {out_len} over "
                                            f"{self.max_reqs} / {self.max_tokens}")
        a = self._launch.args
        a[6].value, a[10].value = num_reqs, out_len
        s = stream if isinstance(stream, int) else stream_ptr(stream)
        self._launch(num_reqs + tail_blocks, kernels.BLOCK, s)
        return self.out[:out_len]


def _dev(cp, a, dtype):
    """A device array of dtype: cupy arrays as they are, torch CUDA tensors
    through DLPack, host data uploaded."""
    if a is None:
        return None
    if isinstance(a, cp.ndarray):
        return a if a.dtype == dtype else a.astype(dtype)
    if hasattr(a, "__cuda_array_interface__"):   # torch CUDA tensors, numba, ...
        a = cp.asarray(a)
        return a if a.dtype == dtype else a.astype(dtype)
    return cp.asarray(np.asarray(a, dtype=dtype))


class MirrorExporter(_MirrorBase):
    """Allocate and publish a mirror of `seg` on `device` (default: the
    current device). Keep the object (and the process) alive as long as
    others use the mirror; ``close()`` retires it.

    A dead exporter's slot of the same segment is taken over (retired, then
    claimed again), so a restarted exporter needs nothing cleaned up first.
    Errors: OutOfClients (no free mirror slot), GpuUnavailable."""

    def __init__(self, seg, device=None):
        cp = cupy()
        rt = cp.cuda.runtime
        dev = rt.getDevice() if device is None else int(device)
        cfg = seg.config
        R, W = cfg.num_rows, cfg.row_width
        table_bytes = 4 * R * W
        size = table_bytes + 4 * R
        _reap_dead_exporters(seg)
        with cp.cuda.Device(dev):
            # Its own cudaMalloc (not a pool's block): the handle then covers
            # exactly this allocation and the table sits at offset 0.
            mem = cp.cuda.Memory(size)
            rt.memset(mem.ptr, 0, size)
            handle = rt.ipcGetMemHandle(mem.ptr)
        h = seg._s()
        index = _lib.mirror_claim(h)
        d = _lib.new("bt_mirror_desc *")
        _lib.memmove(d.uuid, device_uuid(dev), 16)
        _lib.memmove(d.handle, handle, 64)
        d.alloc_size, d.table_off, d.counts_off, d.device_index = size, 0, table_bytes, dev
        _lib.mirror_publish(h, index, d)
        gen = _desc(seg, index).generation
        self._mem = mem
        table, counts = _views(cp, mem.ptr, size, mem, dev, 0, table_bytes, R, W)
        self._setup(seg, index, gen, dev, table, counts)
        self.handle = handle
        with _local_lock:
            _local[(_seg_key(seg), index)] = self
        self._pid = os.getpid()

    def close(self):
        """Retire the mirror (openers get MirrorGone) and free the device
        memory once the work queued on it is done. Idempotent."""
        if getattr(self, "_mem", None) is None:
            return
        if os.getpid() == self._pid:
            with _local_lock:
                _local.pop((_seg_key(self.segment), self.index), None)
            d = _desc(self.segment, self.index)
            if d.generation == self.generation and d.exporter_pid == self._pid:
                _lib.mirror_retire(self.segment._s(), self.index)
            cupy().cuda.runtime.deviceSynchronize()
            self._syncer.close()
        self._gone = "the exporter closed it"
        self._mem = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<blocktable.gpu.MirrorExporter {self.index} gen={self.generation} "
                f"device {self.device}{' closed' if self._mem is None else ''}>")


def export(seg, device=None):
    """MirrorExporter(seg, device): publish a mirror of seg on that device."""
    return MirrorExporter(seg, device)


def _reap_dead_exporters(seg):
    """Retire slots whose exporter is gone (a crash leaves them published)."""
    for i in range(seg.config.max_mirrors):
        d = _desc(seg, i)
        if d.state != FREE and not (d.exporter_pid > 0 and
                                    proc_start_time(d.exporter_pid) == d.exporter_start):
            _lib.mirror_retire(seg._s(), i)


class _IpcMapping:
    """An opened IPC handle, closed when the last view of it goes."""

    def __init__(self, ptr, device):
        self.ptr, self.device = ptr, device

    def __del__(self):
        try:
            cp = cupy()
            with cp.cuda.Device(self.device):
                cp.cuda.runtime.ipcCloseMemHandle(self.ptr)
        except Exception:
            pass


class Mirror(_MirrorBase):
    """A published mirror, opened in this process. Use ``Mirror.open``."""

    @classmethod
    def open(cls, seg, device=None, index=None, wait=0.0):
        """Open the mirror of `seg` that lives on `device` (an ordinal of this
        process; default: the current device, or any published mirror on a
        visible device if none is on the current one), or mirror `index`.
        wait: seconds to wait for one to be published. Errors: MirrorNotFound,
        MirrorGone (its exporter is dead), GpuUnavailable."""
        m = cls.__new__(cls)
        m._open(seg, device, index, wait)
        return m

    def _open(self, seg, device, index, wait):
        cp = cupy()
        idx, d, dev, watch = _await_live(lambda: _find(cp, seg, device, index), wait)
        R, W = seg.config.num_rows, seg.config.row_width
        if d.table_off + 4 * R * W > d.alloc_size or d.counts_off + 4 * R > d.alloc_size:
            raise make_error(_lib.BT_ECORRUPT, f"mirror {idx}: offsets outside the allocation")
        self._watch = watch
        local = _local.get((_seg_key(seg), idx)) if d.exporter_pid == os.getpid() else None
        if local is not None:
            table, counts = local._table, local._counts
            self._mapping = local
        else:
            with cp.cuda.Device(dev):
                ptr = cp.cuda.runtime.ipcOpenMemHandle(bytes(_lib.buffer(d.handle)))
            self._mapping = _IpcMapping(ptr, dev)
            table, counts = _views(cp, ptr, d.alloc_size, self._mapping, dev, d.table_off,
                                   d.counts_off, R, W)
        self.__dict__.pop("_ttable", None)
        self.__dict__.pop("_tcounts", None)
        self._setup(seg, idx, d.generation, dev, table, counts)
        self.exporter_pid = d.exporter_pid

    def _why_gone(self):
        why = super()._why_gone()
        if why is None and not self._watch.alive():
            why = f"mirror {self.index}: its exporter (pid {self.exporter_pid}) died"
        return why

    def reopen(self, wait=0.0):
        """Follow a republished mirror (same device): the old views are dead,
        take new ones. wait: seconds to wait for a live exporter's publish
        (a dead exporter's descriptor, still published, is waited out).
        Errors after `wait`: MirrorGone, MirrorNotFound."""
        old = self._syncer
        self._open(self.segment, self.device, None, wait)
        if old is not self._syncer:
            try:
                old.close()       # its pinned staging buffers; the device copy is gone
            except Exception:
                pass
        return self

    def close(self):
        """Drop this handle's views (the IPC mapping closes with the last
        view anyone still holds)."""
        self._gone = "closed"
        self._table = self._counts = None
        self.__dict__.pop("_ttable", None)
        self.__dict__.pop("_tcounts", None)
        self._mapping = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<blocktable.gpu.Mirror {self.index} gen={self.generation} device "
                f"{self.device} from pid {self.exporter_pid}>")


def _await_live(find, wait, poll=0.01):
    """(index, descriptor, device, ProcWatch) from find() once it names a
    mirror whose exporter lives, trying for up to `wait` seconds: a dead
    exporter's descriptor stays published until someone retires it, and
    its successor publishes a moment later. After `wait`: MirrorNotFound
    (nothing published) or MirrorGone (only a dead exporter's). CUDA-free
    given a CUDA-free find (the tests drive it over real descriptors)."""
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        try:
            idx, d, dev = find()
            watch = ProcWatch(d.exporter_pid, d.exporter_start)
            if watch.alive():
                return idx, d, dev, watch
            err = _err(MirrorGone, f"mirror {idx}: its exporter (pid {d.exporter_pid}) is dead"
                                   + (f"; no live exporter published within {wait} s"
                                      if wait > 0 else ""))
        except MirrorNotFound as e:
            err = e
        if time.monotonic() >= deadline:
            raise err
        time.sleep(poll)


def _find(cp, seg, device, index):
    """(index, descriptor, local device ordinal) of the mirror to open."""
    cur = cp.cuda.runtime.getDevice() if device is None else int(device)
    return _find_in(seg, index, cur, device is None,
                    lambda d: device_by_uuid(bytes(_lib.buffer(d.uuid))))


def _find_in(seg, index, cur, any_device, dev_of):
    """_find without CUDA: dev_of(descriptor) is the local device ordinal of
    its device (None: not visible here). With no index, a live exporter's
    mirror is preferred to a dead one's still published (which is returned
    only when there is nothing else, for _await_live to report or outwait)."""
    candidates = [index] if index is not None else range(seg.config.max_mirrors)
    fallback = dead = None
    for i in candidates:
        d = _desc(seg, i)
        if d.state != PUBLISHED:
            continue
        if index is None and not MirrorInfo(i, d).exporter_alive:
            if dead is None and dev_of(d) is not None:
                dead = (i, d, dev_of(d))
            continue
        dev = dev_of(d)
        if dev is None:
            if index is not None:
                raise _err(MirrorNotFound, f"mirror {i} lives on {uuid_str(bytes(_lib.buffer(d.uuid)))}, "
                                           "which is not visible in this process")
            continue
        if dev == cur or index is not None:
            return i, d, dev
        if any_device and fallback is None:
            fallback = (i, d, dev)
    if fallback is not None or dead is not None:
        return fallback or dead
    where = f"mirror {index}" if index is not None else f"a mirror on device {cur}"
    raise _err(MirrorNotFound, f"{where} is not published in segment {seg.name!r}")

