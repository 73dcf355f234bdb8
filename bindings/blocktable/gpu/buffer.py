"""CpuGpuBuffer: a host array in shared memory, page-locked, and its device copy.

Both the seed's API (get_cpu, get_gpu, set, get, set_row, _sync_to_gpu) and
vLLM v1's (np, cpu, gpu, copy_to_gpu(n), copy_to_cpu(n)), on the machinery
of the mirrors: the host side is shared memory registered with
cudaHostRegister (pinned.py), so copies go straight from it, asynchronously;
``set``/``set_row`` mark rows dirty and ``_sync_to_gpu`` moves only the dirty
rows, one copy per run of consecutive dirty rows. ``copy_to_gpu(n)`` keeps
vLLM's meaning: the first n rows whole, whatever changed.

The host memory: an anonymous shared mapping (shared with forked children),
a named one (``name=``: /dev/shm/bt-buf.<name>, opened by any process that
names it; ``CpuGpuBuffer.unlink(name)`` removes it), or an array you pass
(``cpu=``, e.g. a segment's table view). Without a GPU (no cupy, no device)
``gpu`` is the CPU tensor itself and the copies do nothing, as in
blocktable.compat.vllm.

Thread safety: none (like vLLM's); one writer at a time.
"""
from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import numpy.typing as npt

from .._errors import make_error
from .. import _lib
from . import pinned
from ._cuda import GpuUnavailable, cupy, stream_ptr

__all__ = ["CpuGpuBuffer"]

if TYPE_CHECKING:
    import torch

#: a CUDA stream: a cupy Stream, a torch Stream, an int (cudaStream_t), or None
#: for the current stream (see _cuda.stream_ptr)
StreamLike = Any
#: a row selection of mark_dirty: an index, a slice, indices or a boolean mask
Rows = Union[int, slice, Sequence[int], npt.NDArray[Any]]

_H2D, _D2H = 1, 2


def _np_dtype(dtype: npt.DTypeLike | torch.dtype) -> np.dtype[Any]:
    if isinstance(dtype, np.dtype) or isinstance(dtype, type) or isinstance(dtype, str):
        return np.dtype(dtype)
    import torch   # a torch dtype (vLLM passes those)
    return torch.empty((), dtype=dtype).numpy().dtype


class CpuGpuBuffer:
    """CpuGpuBuffer(*size, dtype=np.int32, device=None, pin_memory=True,
    with_numpy=True, name=None, cpu=None); size may also be one tuple (the
    seed's CpuGpuBuffer(shape, dtype))."""

    def __init__(self, *size: int | Sequence[int], dtype: npt.DTypeLike | torch.dtype = np.int32,
                 device: str | int | torch.device | None = None, pin_memory: bool = True,
                 with_numpy: bool = True, name: str | None = None,
                 cpu: npt.NDArray[Any] | None = None) -> None:
        if len(size) == 1 and isinstance(size[0], (tuple, list)):
            size = tuple(size[0])
        if len(size) == 2 and not isinstance(size[1], (int, np.integer)) and cpu is None:
            size, dtype = tuple(size[0]) if isinstance(size[0], (tuple, list)) else (size[0],), \
                size[1]
        self.dtype = _np_dtype(dtype)
        self._mm = None
        if cpu is not None:
            if not isinstance(cpu, np.ndarray) or not cpu.flags.c_contiguous:
                raise make_error(_lib.BT_EINVAL, "cpu must be a C-contiguous numpy array")
            arr = cpu
        else:
            shape = tuple(int(s) for s in size)
            nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize)
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
            arr = np.frombuffer(self._mm, self.dtype, int(np.prod(shape, dtype=np.int64)))
            arr = arr.reshape(shape)
        self.np = arr
        self.shape = arr.shape
        self.name = name
        self._row_bytes = (arr.strides[0] if arr.ndim else arr.itemsize) if arr.size else 0
        self._dirty = np.zeros(arr.shape[0] if arr.ndim else 1, bool)
        self._cpu = self._gpu_t = None
        self.pinned = False
        try:
            cp = cupy()
        except GpuUnavailable:
            cp = None
        if cp is not None and (device is None or str(device) != "cpu"):
            dev = _device_index(device, cp)
            with cp.cuda.Device(dev):
                self.gpu_array = cp.zeros(arr.shape, self.dtype)
            self.device = dev
            if pin_memory and arr.nbytes:
                self.pinned = pinned.register(arr.ctypes.data, arr.nbytes,
                                              keepalive=self._mm if self._mm is not None else arr)
        else:
            self.gpu_array = None
            self.device = None

    @staticmethod
    def unlink(name: str) -> None:
        os.unlink(f"/dev/shm/bt-buf.{name}")

    # ---- vLLM's attributes ----------------------------------------------------------
    @property
    def cpu(self) -> torch.Tensor:
        """torch view of the host memory (zero copy)."""
        if self._cpu is None:
            import torch
            self._cpu = torch.from_numpy(self.np)
        return self._cpu

    @property
    def gpu(self) -> torch.Tensor:
        """torch view of the device copy (DLPack), or ``cpu`` without a GPU."""
        if self.gpu_array is None:
            return self.cpu
        if self._gpu_t is None:
            import torch
            self._gpu_t = torch.from_dlpack(self.gpu_array)
        return self._gpu_t

    def copy_to_gpu(self, n: int | None = None, stream: StreamLike = None) -> torch.Tensor:
        """Copy the first n rows (all: None) to the device, asynchronously on
        `stream`; returns gpu[:n]."""
        if self.gpu_array is not None:
            rows = self.shape[0] if n is None else n
            if rows:
                cp = cupy()
                cp.cuda.runtime.memcpyAsync(self.gpu_array.data.ptr, self.np.ctypes.data,
                                            rows * self._row_bytes, _H2D, stream_ptr(stream))
                self._dirty[:rows] = False
        return self.gpu[:n]

    def copy_to_cpu(self, n: int | None = None, stream: StreamLike = None) -> torch.Tensor:
        """Copy the first n rows back to the host, asynchronously on `stream`
        (synchronise it before reading); returns cpu[:n]."""
        if self.gpu_array is not None:
            rows = self.shape[0] if n is None else n
            if rows:
                cupy().cuda.runtime.memcpyAsync(self.np.ctypes.data, self.gpu_array.data.ptr,
                                                rows * self._row_bytes, _D2H,
                                                stream_ptr(stream))
        return self.cpu[:n]

    # ---- the seed's methods -----------------------------------------------------------
    def get_cpu(self) -> npt.NDArray[Any]:
        """The host array (numpy, writable, zero copy)."""
        return self.np

    def get_gpu(self) -> torch.Tensor:
        """The device copy, first brought up to date (dirty rows only)."""
        self._sync_to_gpu()
        return self.gpu

    def set(self, row: int, col: int, value: int | float) -> None:
        self.np[row, col] = value
        self._dirty[row] = True

    def get(self, row: int, col: int) -> int | float:
        return self.np[row, col].item()

    def set_row(self, row: int, values: npt.ArrayLike) -> None:
        """Row `row` = values, the rest of the row zeroed (no stale tail)."""
        if self.np.ndim == 1:
            self.np[row] = values
        else:
            v = np.asarray(values, self.dtype).ravel()
            if v.shape[0] > self.np.shape[1]:
                raise make_error(_lib.BT_EROWFULL, f"{v.shape[0]} values for a row of "
                                                  f"{self.np.shape[1]}")
            self.np[row, :v.shape[0]] = v
            self.np[row, v.shape[0]:] = 0
        self._dirty[row] = True

    def mark_dirty(self, rows: Rows | None = None) -> None:
        """Say rows changed behind set/set_row (writes through .np)."""
        if rows is None:
            self._dirty[:] = True
        else:
            self._dirty[rows] = True

    def _sync_to_gpu(self, stream: StreamLike = None) -> int:
        """Copy the dirty rows (one copy per run of consecutive ones);
        returns the bytes moved."""
        if self.gpu_array is None or not self._dirty.any():
            self._dirty[:] = False
            return 0
        d = np.flatnonzero(self._dirty)
        cut = np.flatnonzero(np.diff(d) != 1) + 1
        starts = np.concatenate(([0], cut))
        ends = np.concatenate((cut, [d.shape[0]]))
        rt, s = cupy().cuda.runtime, stream_ptr(stream)
        rb, hb, gb = self._row_bytes, self.np.ctypes.data, self.gpu_array.data.ptr
        moved = 0
        for a, b in zip(d[starts].tolist(), (d[ends - 1] + 1).tolist()):
            rt.memcpyAsync(gb + a * rb, hb + a * rb, (b - a) * rb, _H2D, s)
            moved += (b - a) * rb
        self._dirty[:] = False
        return moved

    sync = _sync_to_gpu

    def __repr__(self) -> str:
        return (f"<CpuGpuBuffer {self.shape} {self.dtype} device={self.device} "
                f"pinned={self.pinned}>")


def _device_index(device: str | int | torch.device | None, cp: Any) -> int:
    if device is None:
        return cp.cuda.runtime.getDevice()
    if isinstance(device, int):
        return device
    s = str(device)          # "cuda", "cuda:1", torch.device
    return int(s.split(":", 1)[1]) if ":" in s else cp.cuda.runtime.getDevice()
