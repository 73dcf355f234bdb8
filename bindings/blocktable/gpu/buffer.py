"""CpuGpuBuffer: a host array and its device copy -- the one class of the package.

Both the seed's API (get_cpu, get_gpu, set, get, set_row, _sync_to_gpu) and
vLLM v1's (np, cpu, gpu, copy_to_gpu(n), copy_to_cpu(n)); blocktable.compat.vllm
hands it out for its tables (``blocktable.CpuGpuBuffer`` is this class too).

Where the host memory comes from: an anonymous shared mapping (shared with
forked children), a named one (``name=``: /dev/shm/bt-buf.<name>, opened by
any process that names it; ``CpuGpuBuffer.unlink(name)`` removes it), or an
array you pass (``cpu=``, e.g. a segment's table view: it stays the truth).

Where the device copy lives, first match wins:
  * ``gpu`` assigned (vLLM's CPU runner does ``buf.gpu = buf.cpu``): that
    tensor; copies are torch copies into it, none when it is the host memory.
  * ``mirror=`` (a blocktable.gpu MirrorExporter of the segment the host
    array belongs to): the mirror's zero-copy torch view; copy_to_gpu(n)
    syncs rows [0, n), moving only what changed (see mirror.py). A write
    through ``np`` / ``cpu`` / set / set_row / copy_to_cpu is a write behind
    libbt's back: handing out those views marks the buffer, and the next
    copy_to_gpu re-stages the rows it covers whole.
  * cupy and a CUDA device (``device`` None or CUDA): a cupy array; copies
    are cudaMemcpyAsync straight from the host memory, page-locked with
    cudaHostRegister (pinned.py) when ``pin_memory``, on `stream` (default:
    torch's current stream once torch has CUDA up, else cupy's).
  * no cupy, a CUDA ``device`` torch can use: a torch tensor, torch copies.
  * otherwise (``device="cpu"``, or no GPU): ``gpu`` is the CPU tensor
    itself and the copies do nothing.
``set``/``set_row`` mark rows dirty and ``_sync_to_gpu`` moves only the dirty
rows, one copy per run of consecutive dirty rows; ``copy_to_gpu(n)`` keeps
vLLM's meaning: the first n rows whole, whatever changed.

torch is imported on first use of a tensor attribute. Errors: InvalidArgument
(``cpu`` not a C-contiguous numpy array), RowFull (set_row past the row);
torch's / cupy's for the copies; blocktable.gpu's (MirrorGone, ...) for a
mirror's sync. Thread safety: none (like vLLM's): one thread at a time.
"""
from __future__ import annotations

import mmap
import os

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from numpy.typing import NDArray

from .._errors import make_error
from .. import _lib
from . import pinned
from ._cuda import GpuUnavailable, cupy, stream_ptr

if TYPE_CHECKING:
    import torch

    from .mirror import MirrorExporter

__all__ = ["CpuGpuBuffer"]

_H2D, _D2H = 1, 2


def _np_dtype(dtype):
    if isinstance(dtype, np.dtype) or isinstance(dtype, type) or isinstance(dtype, str):
        return np.dtype(dtype)
    import torch   # a torch dtype (vLLM passes those)
    return torch.empty((), dtype=dtype).numpy().dtype


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test extra
        raise ImportError("CpuGpuBuffer: the tensor attributes need torch") from e
    return torch


def _is_cpu(device):
    return device is not None and str(device).split(":", 1)[0] == "cpu"


def _torch_cuda_device(device):
    """The torch CUDA device to allocate on without cupy, or None (CPU, or
    CUDA asked for where torch has none)."""
    if device is None or _is_cpu(device):
        return None
    torch = _torch()
    d = torch.device(device)
    if d.type != "cuda" or not torch.cuda.is_available():
        return None
    return d


class CpuGpuBuffer:
    """CpuGpuBuffer(*size, dtype=np.int32, device=None, pin_memory=True,
    with_numpy=True, name=None, cpu=None, mirror=None); size may also be one
    tuple (the seed's CpuGpuBuffer(shape, dtype)). See the module's text for
    where the device copy lives. Errors: InvalidArgument (``cpu`` not a
    C-contiguous numpy array), RowFull (set_row); the copies raise torch's,
    cupy's or the mirror's errors. Thread safety: one thread at a time."""

    def __init__(self, *size: Any, dtype: Any = np.int32, device: Any = None,
                 pin_memory: bool = True, with_numpy: bool = True, name: str | None = None,
                 cpu: NDArray[Any] | None = None,
                 mirror: MirrorExporter | None = None) -> None:
        if len(size) == 1 and isinstance(size[0], (tuple, list)):
            size = tuple(size[0])
        if len(size) == 2 and not isinstance(size[1], (int, np.integer)) and cpu is None:
            size, dtype = tuple(size[0]) if isinstance(size[0], (tuple, list)) else (size[0],), \
                size[1]
        self._mm = None
        if cpu is not None:
            if not isinstance(cpu, np.ndarray) or not cpu.flags.c_contiguous:
                raise make_error(_lib.BT_EINVAL, "cpu must be a C-contiguous numpy array")
            arr = cpu
        else:
            arr = self._host_array(size, _np_dtype(dtype), name)
        self.dtype = arr.dtype
        self._np = arr
        self.shape = arr.shape
        self.name = name
        self.pin_memory = pin_memory
        self._device = device
        self._row_bytes = (arr.strides[0] if arr.ndim else arr.itemsize) if arr.size else 0
        self._dirty = np.zeros(arr.shape[0] if arr.ndim else 1, bool)
        self._cpu = None
        self._gpu = None          # a tensor assigned to .gpu (vLLM's CPU runner)
        self._gpu_t = None        # our device tensor (a view of gpu_array, or torch's)
        self._mirror = mirror
        self._stale = False       # with a mirror: the host was (maybe) written behind it
        self.pinned = False
        self.gpu_array = None
        self.device = None
        cp = None
        if mirror is None and not _is_cpu(device):
            try:
                cp = cupy()
            except GpuUnavailable:
                cp = None
        if cp is not None:
            dev = _device_index(device, cp)
            with cp.cuda.Device(dev):
                self.gpu_array = cp.zeros(arr.shape, self.dtype)
            self.device = dev
            if pin_memory and arr.nbytes:
                self.pinned = pinned.register(arr.ctypes.data, arr.nbytes,
                                              keepalive=self._mm if self._mm is not None else arr)
        elif mirror is not None:
            self.device = mirror.device

    def _host_array(self, size, dtype, name):
        shape = tuple(int(s) for s in size)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = max(1, count * dtype.itemsize)
        if name is None:
            self._mm = mmap.mmap(-1, nbytes, mmap.MAP_SHARED)
        else:
            fd = os.open(f"/dev/shm/bt-buf.{name}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < nbytes:
                    os.ftruncate(fd, nbytes)
                self._mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        return np.frombuffer(self._mm, dtype, count).reshape(shape)

    @staticmethod
    def unlink(name: str) -> None:
        os.unlink(f"/dev/shm/bt-buf.{name}")

    # ---- vLLM's attributes ----------------------------------------------------------
    @property
    def np(self) -> NDArray[Any]:
        """The host array (numpy, writable, zero copy). With a mirror, handing
        it out marks the buffer (see mark_dirty)."""
        if self._mirror is not None:
            self._stale = True
        return self._np

    @property
    def cpu(self) -> torch.Tensor:
        """torch view of the host memory (zero copy); marks like ``np``."""
        if self._mirror is not None:
            self._stale = True
        return self._cpu_tensor()

    def _cpu_tensor(self):
        if self._cpu is None:
            self._cpu = _torch().from_numpy(self._np)
        return self._cpu

    @property
    def gpu(self) -> Any:
        """The device copy as a torch tensor: an assigned one, the mirror's
        view, a view of gpu_array (DLPack), a torch CUDA tensor, or ``cpu``
        itself without a device."""
        if self._gpu is not None:
            return self._gpu
        if self._mirror is not None:
            return self._mirror.tensor()
        if self._gpu_t is None:
            if self.gpu_array is not None:
                self._gpu_t = _torch().from_dlpack(self.gpu_array)
            else:
                dev = _torch_cuda_device(self._device)
                self._gpu_t = self._cpu_tensor() if dev is None else \
                    _torch().zeros_like(self._cpu_tensor(), device=dev)
        return self._gpu_t

    @gpu.setter
    def gpu(self, value: Any) -> None:
        """vLLM's CPU runner assigns ``buf.gpu = buf.cpu``: from then on the
        copies go to `value` (none when it is the host memory itself); a
        mirror or device array is detached."""
        self._gpu = value
        self._mirror = None
        self.gpu_array = None
        self._gpu_t = None

    def _distinct_gpu(self):
        """The device tensor where it is not the host memory itself, else None."""
        g = self.gpu
        cpu = self._cpu_tensor()
        if g is cpu or (g.device.type == "cpu" and g.data_ptr() == cpu.data_ptr()):
            return None
        return g

    def copy_to_gpu(self, n: int | None = None, stream: Any = None) -> Any:
        """Copy the first n rows (all: None) to the device, asynchronously on
        `stream` (torch copies: torch's current stream); returns gpu[:n]. A
        mirror syncs rows [0, n), moving only what changed."""
        m = self._mirror
        if m is not None:
            if self._stale:
                m.invalidate()
                self._stale = False
            m.sync(stream=stream, num_rows=n)
            self._dirty[:] = False
            return m.tensor(n)
        if self.gpu_array is not None:
            rows = self.shape[0] if n is None else n
            if rows:
                cupy().cuda.runtime.memcpyAsync(self.gpu_array.data.ptr, self._np.ctypes.data,
                                                rows * self._row_bytes, _H2D, stream_ptr(stream))
                self._dirty[:rows] = False
            return self.gpu[:n]
        gpu = self._distinct_gpu()
        if gpu is None:
            return self._cpu_tensor()[:n]
        self._dirty[:self.shape[0] if n is None else n] = False
        return gpu[:n].copy_(self._cpu_tensor()[:n], non_blocking=True)

    def copy_to_cpu(self, n: int | None = None, stream: Any = None) -> Any:
        """Copy the first n rows back to the host, asynchronously (synchronise
        `stream` / torch's current stream before reading); returns cpu[:n]."""
        cpu = self._cpu_tensor()
        if self.gpu_array is not None and self._gpu is None:
            rows = self.shape[0] if n is None else n
            if rows:
                cupy().cuda.runtime.memcpyAsync(self._np.ctypes.data, self.gpu_array.data.ptr,
                                                rows * self._row_bytes, _D2H,
                                                stream_ptr(stream))
            return cpu[:n]
        gpu = self._distinct_gpu()
        if gpu is None:
            return cpu[:n]
        self.mark_dirty()
        return cpu[:n].copy_(gpu[:n], non_blocking=True)

    # ---- the seed's methods -----------------------------------------------------------
    def get_cpu(self) -> NDArray[Any]:
        """The host array (numpy, writable, zero copy)."""
        return self.np

    def get_gpu(self) -> Any:
        """The device copy, first brought up to date (dirty rows only)."""
        self._sync_to_gpu()
        return self.gpu

    def set(self, row: int, col: int, value: int) -> None:
        self._np[row, col] = value
        self.mark_dirty(row)

    def get(self, row: int, col: int) -> Any:
        return self._np[row, col].item()

    def set_row(self, row: int, values: Sequence[int] | NDArray[Any]) -> None:
        """Row `row` = values, the rest of the row zeroed (no stale tail)."""
        a = self._np
        if a.ndim == 1:
            a[row] = values
        else:
            v = np.asarray(values, self.dtype).ravel()
            if v.shape[0] > a.shape[1]:
                raise make_error(_lib.BT_EROWFULL, f"{v.shape[0]} values for a row of "
                                                  f"{a.shape[1]}")
            a[row, :v.shape[0]] = v
            a[row, v.shape[0]:] = 0
        self.mark_dirty(row)

    def mark_dirty(self, rows: Any = None) -> None:
        """Say rows (all: None) changed behind set/set_row (writes through
        ``np``): _sync_to_gpu moves them; with a mirror, the next copy_to_gpu
        re-stages the rows it covers whole."""
        if rows is None:
            self._dirty[:] = True
        else:
            self._dirty[rows] = True
        if self._mirror is not None:
            self._stale = True

    def _sync_to_gpu(self, stream: Any = None) -> Any:
        """Copy the dirty rows (one copy per run of consecutive ones);
        returns the bytes moved (a mirror: what its sync moved)."""
        if self._mirror is not None:
            self.copy_to_gpu(stream=stream)
            return self._mirror.last_sync[2]
        gpu = None if self.gpu_array is not None else self._distinct_gpu()
        if (self.gpu_array is None and gpu is None) or not self._dirty.any():
            self._dirty[:] = False
            return 0
        d = np.flatnonzero(self._dirty)
        cut = np.flatnonzero(np.diff(d) != 1) + 1
        starts = np.concatenate(([0], cut))
        ends = np.concatenate((cut, [d.shape[0]]))
        rb = self._row_bytes
        moved = 0
        if self.gpu_array is not None:
            rt, s = cupy().cuda.runtime, stream_ptr(stream)
            hb, gb = self._np.ctypes.data, self.gpu_array.data.ptr
        else:
            cpu = self._cpu_tensor()
        for a, b in zip(d[starts].tolist(), (d[ends - 1] + 1).tolist()):
            if gpu is None:
                rt.memcpyAsync(gb + a * rb, hb + a * rb, (b - a) * rb, _H2D, s)
            else:
                gpu[a:b].copy_(cpu[a:b], non_blocking=True)
            moved += (b - a) * rb
        self._dirty[:] = False
        return moved

    sync = _sync_to_gpu

    def __repr__(self):
        where = "mirror" if self._mirror is not None else f"device={self.device}"
        return f"<CpuGpuBuffer {self.shape} {self.dtype} {where} pinned={self.pinned}>"


def _device_index(device, cp):
    if device is None:
        return cp.cuda.runtime.getDevice()
    if isinstance(device, int):
        return device
    s = str(device)          # "cuda", "cuda:1", torch.device
    return int(s.split(":", 1)[1]) if ":" in s else cp.cuda.runtime.getDevice()
