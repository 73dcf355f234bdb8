"""CUDA kernels over a mirror, as CuPy RawKernels, and their launchers.

One source (SOURCE) holds every kernel. It is plain C++ with a few macros
(BT_KERNEL, BT_DEVICE) so that the same text also compiles with a host C++
compiler against HOST_PRELUDE, which runs each "thread" in a loop: that is
how tests/test_gpu_kernels_host.py checks the slot arithmetic against
libbt's bt_slots_* on a machine without a GPU. So the kernels use no shared
memory and no __syncthreads: every thread's work is independent.

Kernels:
  bt_scatter      table/counts[idx[i]] = val[i] for the pairs bt_mirror_stage
                  wrote (flat index < T: a table entry; >= T: row idx-T's count)
  bt_slots_qsl    slot mapping, request i covering tokens [qsl[i], qsl[i+1]);
                  positions[t] per token, or start[i] + (t - qsl[i]) (form 1);
                  tokens from qsl[num_reqs] to out_len get -1
  bt_slots_tok    slot mapping per token (rows[t], positions[t]), -1 tail
  bt_gather       out[i, :w] = table[idx[i], :w] (zeros for idx -1 / padding
                  rows, and past the row's count)

Slot arithmetic is libbt's slot_of() (libbt/src/slots.c) line for line, so
results are bit-identical: -1 for pos < 0 or past the row's (clamped) count
or, with context parallelism, for another rank's positions. Where the C API
returns an error for the whole call (a row out of range), a kernel cannot:
such tokens get -1 (and the Python wrappers check host-side inputs first).

cupy is imported on first launch only, so this module imports anywhere.
"""
import ctypes

import numpy as np

__all__ = ["SOURCE", "CUDA_PRELUDE", "HOST_PRELUDE", "SlotKernelParams", "scatter",
           "slots_qsl", "slots_rows", "slots_tok", "gather", "get_kernel", "Launch"]

CUDA_PRELUDE = r"""
#define BT_KERNEL extern "C" __global__
#define BT_DEVICE __device__ __forceinline__
#define BT_RESTRICT __restrict__
"""

HOST_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
struct bt_dim3 { unsigned int x, y, z; };
static bt_dim3 blockIdx, threadIdx, blockDim, gridDim;
struct int4 { int x, y, z, w; };
#define BT_KERNEL static
#define BT_DEVICE static inline
#define BT_RESTRICT __restrict__
"""

SOURCE = r"""
typedef long long bt_i64;
typedef int bt_i32;
typedef unsigned int bt_u32;

/* The row's block count as libbt's bt_row_nblocks() reads it: clamped to
 * [0, width], so a scribbled count can make a slot wrong, never a read stray. */
BT_DEVICE bt_u32 bt_nblocks(const bt_i32* counts, bt_i64 row, bt_u32 width)
{
    bt_i32 n = counts[row];
    return n < 0 ? 0u : ((bt_u32)n > width ? width : (bt_u32)n);
}

/* libbt's slot_of(). shift >= 0: block size 2^shift and no context
 * parallelism (the fast path); else the general dcp striping. */
BT_DEVICE bt_i64 bt_slot(const bt_i32* BT_RESTRICT table, const bt_i32* BT_RESTRICT counts,
                         bt_u32 width, bt_u32 num_rows, bt_i64 row, bt_i64 pos,
                         bt_i64 bs, int shift, bt_i64 world, bt_i64 rank, bt_i64 il)
{
    if (pos < 0 || row < 0 || row >= (bt_i64)num_rows)
        return -1;
    bt_u32 nb = bt_nblocks(counts, row, width);
    const bt_i32* e = table + row * (bt_i64)width;
    if (shift >= 0) {
        bt_i64 bi = pos >> shift;
        if (bi >= (bt_i64)nb)
            return -1;
        return ((bt_i64)e[bi] << shift) | (pos & (bs - 1));
    }
    bt_i64 vbs = bs * world;
    bt_i64 bi = pos / vbs;
    if (bi >= (bt_i64)nb)
        return -1;
    bt_i64 v = pos % vbs;
    if (world > 1 && (v / il) % world != rank)
        return -1;
    bt_i64 off = v / (world * il) * il + v % il;
    return (bt_i64)e[bi] * bs + off;
}

/* The staged pairs of bt_mirror_stage. idx/val may live in pinned host
 * memory (read over the bus, zero-copy) or on the device. */
BT_KERNEL void bt_scatter(const bt_i64* BT_RESTRICT idx, const bt_i32* BT_RESTRICT val, bt_i64 n,
                          bt_i32* BT_RESTRICT table, bt_i64 T, bt_i32* BT_RESTRICT counts,
                          bt_i64 num_rows)
{
    bt_i64 stride = (bt_i64)gridDim.x * blockDim.x;
    for (bt_i64 i = (bt_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        bt_i64 k = idx[i];
        bt_i32 v = val[i];
        if (k >= 0 && k < T)
            table[k] = v;
        else if (k >= T && k - T < num_rows)
            counts[k - T] = v;
    }
}

/* Blocks [0, num_reqs): one request each, its threads striding over its
 * tokens. Blocks from num_reqs on: the -1 tail [qsl[num_reqs], out_len). */
BT_KERNEL void bt_slots_qsl(const bt_i32* BT_RESTRICT table, const bt_i32* BT_RESTRICT counts,
                            bt_u32 width, bt_u32 num_rows,
                            const bt_i32* BT_RESTRICT rows, const bt_i32* BT_RESTRICT qsl,
                            bt_i32 num_reqs, const bt_i64* BT_RESTRICT positions,
                            const bt_i64* BT_RESTRICT starts, bt_i64* BT_RESTRICT out,
                            bt_i64 out_len, bt_i64 bs, int shift, bt_i64 world, bt_i64 rank,
                            bt_i64 il)
{
    bt_i64 b = blockIdx.x;
    if (b < num_reqs) {
        bt_i64 row = rows ? (bt_i64)rows[b] : b;
        bt_i64 t0 = qsl[b], t1 = qsl[b + 1];
        if (t1 > out_len)
            t1 = out_len;
        bt_i64 s0 = starts ? starts[b] : 0;
        for (bt_i64 t = t0 + threadIdx.x; t < t1; t += blockDim.x) {
            bt_i64 pos = positions ? positions[t] : s0 + (t - t0);
            out[t] = bt_slot(table, counts, width, num_rows, row, pos, bs, shift, world, rank, il);
        }
        return;
    }
    bt_i64 end = num_reqs > 0 ? (bt_i64)qsl[num_reqs] : 0;
    if (end < 0)
        end = 0;
    bt_i64 stride = ((bt_i64)gridDim.x - num_reqs) * blockDim.x;
    for (bt_i64 t = end + (b - num_reqs) * blockDim.x + threadIdx.x; t < out_len; t += stride)
        out[t] = -1;
}

/* Per token: vLLM's (req_indices, positions). Tokens [n, out_len) get -1. */
BT_KERNEL void bt_slots_tok(const bt_i32* BT_RESTRICT table, const bt_i32* BT_RESTRICT counts,
                            bt_u32 width, bt_u32 num_rows,
                            const bt_i32* BT_RESTRICT rows, const bt_i64* BT_RESTRICT positions,
                            bt_i64 n, bt_i64* BT_RESTRICT out, bt_i64 out_len,
                            bt_i64 bs, int shift, bt_i64 world, bt_i64 rank, bt_i64 il)
{
    bt_i64 stride = (bt_i64)gridDim.x * blockDim.x;
    for (bt_i64 t = (bt_i64)blockIdx.x * blockDim.x + threadIdx.x; t < out_len; t += stride)
        out[t] = t < n ? bt_slot(table, counts, width, num_rows, (bt_i64)rows[t], positions[t],
                                 bs, shift, world, rank, il)
                       : -1;
}

/* out[i, j] for j < out_width: the mirror's row idx[i], zero where idx[i] is
 * -1 (or out of range), i >= n_idx (padding rows), or j >= the row's count.
 * vec4: width and out_width are multiples of 4 and the pointers 16-byte
 * aligned, so each thread moves 16 bytes. Grid: (rows, column blocks). */
BT_KERNEL void bt_gather(const bt_i32* BT_RESTRICT table, const bt_i32* BT_RESTRICT counts,
                         bt_u32 width, bt_u32 num_rows, const bt_i32* BT_RESTRICT idx,
                         bt_i32 n_idx, bt_i32* BT_RESTRICT out, bt_i32 out_width, int vec4)
{
    bt_i64 i = blockIdx.y;
    bt_i64 row = i < n_idx ? (bt_i64)idx[i] : -1;
    bt_i64 nb = (row >= 0 && row < (bt_i64)num_rows) ? (bt_i64)bt_nblocks(counts, row, width) : 0;
    const bt_i32* src = table + (row > 0 ? row : 0) * (bt_i64)width;
    bt_i32* dst = out + i * (bt_i64)out_width;
    bt_i64 j0 = (bt_i64)blockIdx.x * blockDim.x + threadIdx.x;
    bt_i64 stride = (bt_i64)gridDim.x * blockDim.x;
    if (vec4) {
        for (bt_i64 q = j0; q * 4 < out_width; q += stride) {
            bt_i64 j = q * 4;
            int4 v;
            if (j + 4 <= nb) {
                v = ((const int4*)src)[q];
            } else {
                v.x = j < nb ? src[j] : 0;
                v.y = j + 1 < nb ? src[j + 1] : 0;
                v.z = j + 2 < nb ? src[j + 2] : 0;
                v.w = 0;
            }
            ((int4*)dst)[q] = v;
        }
        return;
    }
    for (bt_i64 j = j0; j < out_width; j += stride)
        dst[j] = j < nb ? src[j] : 0;
}
"""

KERNEL_NAMES = ("bt_scatter", "bt_slots_qsl", "bt_slots_tok", "bt_gather")
BLOCK = 128          # threads per block of the slot and gather kernels
SCATTER_BLOCK = 256

_modules = {}        # device id -> cupy.RawModule
_functions = {}      # (device id, name) -> RawKernel
_streams = {}        # raw stream pointer -> object with .ptr (what cupy launches take)


class _StreamRef:
    """What cupy's kernel launch reads a stream from: an object with .ptr."""
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


def stream_ref(stream):
    """A cupy Stream, a torch Stream, an object with .ptr / .cuda_stream, a raw
    pointer, or None (cupy's current stream) -> an object with .ptr."""
    if stream is None:
        import cupy
        return cupy.cuda.get_current_stream()
    if hasattr(stream, "ptr"):
        return stream
    ptr = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    ref = _streams.get(ptr)
    if ref is None:
        ref = _streams[ptr] = _StreamRef(ptr)
    return ref


def get_kernel(name, device=None):
    """The compiled kernel `name` for `device` (default: the current one).
    Launch it with that device current (the mirror methods see to it)."""
    import cupy
    dev = cupy.cuda.runtime.getDevice() if device is None else device
    fn = _functions.get((dev, name))
    if fn is None:
        mod = _modules.get(dev)
        if mod is None:
            with cupy.cuda.Device(dev):
                mod = _modules[dev] = cupy.RawModule(code=CUDA_PRELUDE + SOURCE,
                                                     options=("-std=c++17",))
        fn = _functions[(dev, name)] = mod.get_function(name)
    return fn


class Launch:
    """A kernel launch whose argument block is built once (ctypes values),
    for hot paths: set ``args[i].value`` for what changes, then call. One
    driver call (cuLaunchKernel) and no per-argument conversion: cupy's
    RawKernel call costs several microseconds of Python per launch, which
    is most of a small kernel's cost. Build and call it with `device`
    current (the kernel is compiled and loaded per device)."""

    def __init__(self, name, ctypes_types, device=None):
        import cupy
        rk = get_kernel(name, device)
        self.function = rk.kernel            # cupy Function: keeps the module loaded
        self.f = self.function.ptr
        self.args = [t() for t in ctypes_types]
        self._params = (ctypes.c_void_p * len(self.args))(
            *[ctypes.addressof(a) for a in self.args])
        self._pp = ctypes.addressof(self._params)
        self._launch = cupy.cuda.driver.launchKernel

    def __call__(self, grid, block, stream_ptr, grid_y=1):
        self._launch(self.f, grid, grid_y, 1, block, 1, 1, 0, stream_ptr, self._pp, 0)


_P, _I64, _I32, _U32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32
SCATTER_ARGS = (_P, _P, _I64, _P, _I64, _P, _I64)
SLOTS_QSL_ARGS = (_P, _P, _U32, _U32, _P, _P, _I32, _P, _P, _P, _I64, _I64, _I32, _I64, _I64,
                  _I64)


class SlotKernelParams:
    """bt_slot_params for the kernels: (bs, shift, world, rank, il) as numpy
    scalars of the kernel's types, checked the way libbt's sp_init checks."""
    __slots__ = ("block_size", "cp_world", "cp_rank", "cp_interleave", "args")

    def __init__(self, block_size, cp_world=1, cp_rank=0, cp_interleave=1):
        from .._errors import make_error
        from .. import _lib
        bs = int(block_size)
        w = int(cp_world) if cp_world and cp_world > 1 else 1
        il = int(cp_interleave) if cp_interleave else 1
        rank = int(cp_rank)
        if bs <= 0 or bs > (1 << 20) or w > 1024 or not 0 <= rank < w or il > bs \
                or (w > 1 and bs % il):
            raise make_error(_lib.BT_EINVAL, f"slot params block_size={bs}, cp_world={w}, "
                                            f"cp_rank={rank}, cp_interleave={il}")
        shift = bs.bit_length() - 1 if w == 1 and bs & (bs - 1) == 0 else -1
        self.block_size, self.cp_world, self.cp_rank, self.cp_interleave = bs, w, rank, il
        self.args = (np.int64(bs), np.int32(shift), np.int64(w), np.int64(rank), np.int64(il))

    @classmethod
    def of(cls, seg_config, params=None):
        """From a blocktable SlotParams (or None: the segment's block size)."""
        if params is None:
            return cls(seg_config.block_size)
        return cls(params.block_size or seg_config.block_size, params.cp_world,
                   params.cp_rank, params.cp_interleave)


def _ptr(a):
    """Device pointer argument: a cupy array, a raw int pointer, or None (NULL)."""
    if a is None:
        return np.uint64(0)
    if isinstance(a, (int, np.integer)):
        return np.uint64(a)
    return a


def scatter(idx, val, n, table_ptr, T, counts_ptr, num_rows, stream=None, device=None):
    """Launch bt_scatter over n staged pairs (pointers are ints or arrays)."""
    if n <= 0:
        return
    fn = get_kernel("bt_scatter", device)
    grid = min((n + SCATTER_BLOCK - 1) // SCATTER_BLOCK, 1024)
    fn((grid,), (SCATTER_BLOCK,),
       (_ptr(idx), _ptr(val), np.int64(n), _ptr(table_ptr), np.int64(T), _ptr(counts_ptr),
        np.int64(num_rows)), stream=stream_ref(stream))


def slots_qsl(table, counts, qsl, num_reqs, out, out_len, params, rows=None, positions=None,
              starts=None, stream=None, tail_blocks=None, device=None):
    """Launch bt_slots_qsl. table: cupy int32 [num_rows, width]; counts int32
    [num_rows]; qsl int32 [num_reqs + 1] on the device; out int64 [>= out_len]."""
    num_rows, width = table.shape
    if tail_blocks is None:
        tail_blocks = max(1, min(64, (out_len + BLOCK * 4 - 1) // (BLOCK * 4)))
    fn = get_kernel("bt_slots_qsl", device)
    fn((num_reqs + tail_blocks,), (BLOCK,),
       (table, counts, np.uint32(width), np.uint32(num_rows), _ptr(rows), qsl,
        np.int32(num_reqs), _ptr(positions), _ptr(starts), out, np.int64(out_len),
        *params.args), stream=stream_ref(stream))


def slots_rows(*args, **kw):
    """Form 1 is bt_slots_qsl with starts instead of positions."""
    return slots_qsl(*args, **kw)


def slots_tok(table, counts, rows, positions, n, out, out_len, params, stream=None,
              device=None):
    num_rows, width = table.shape
    fn = get_kernel("bt_slots_tok", device)
    grid = max(1, min((out_len + BLOCK - 1) // BLOCK, 4096))
    fn((grid,), (BLOCK,),
       (table, counts, np.uint32(width), np.uint32(num_rows), _ptr(rows), _ptr(positions),
        np.int64(n), out, np.int64(out_len), *params.args), stream=stream_ref(stream))


def gather(table, counts, idx, n_idx, out, stream=None, device=None):
    """out[i, :] = table[idx[i], :out.shape[1]] (zero rows for -1/padding)."""
    num_rows, width = table.shape
    rows_out, out_width = out.shape
    if rows_out == 0 or out_width == 0:
        return
    vec4 = (width % 4 == 0 and out_width % 4 == 0 and table.data.ptr % 16 == 0
            and out.data.ptr % 16 == 0)
    units = out_width // 4 if vec4 else out_width
    gx = max(1, min((units + BLOCK - 1) // BLOCK, 64))
    fn = get_kernel("bt_gather", device)
    fn((gx, rows_out), (BLOCK,),
       (table, counts, np.uint32(width), np.uint32(num_rows), _ptr(idx), np.int32(n_idx), out,
        np.int32(out_width), np.int32(1 if vec4 else 0)), stream=stream_ref(stream))
