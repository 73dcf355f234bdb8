"""The GPU kernels' arithmetic, checked without a GPU.

blocktable.gpu.kernels.SOURCE also compiles as host C++ (HOST_PRELUDE runs
each CUDA thread in a loop). Here it is built with the host compiler and run
on random tables, rows, positions, block sizes and context-parallel ranks,
against libbt's bt_slots_* on the same segment: the same bits, so that the
GPU run only has to confirm what this already shows. Skipped without a C++
compiler. The real kernels run in tests/test_gpu.py on a GPU.
"""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

import blocktable as bt
from blocktable.gpu import kernels as K

from conftest import random_requests

CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to emulate the kernels")

DRIVER = r"""
#define LOOP1(grid, block, call) \
    gridDim.x = grid; gridDim.y = 1; blockDim.x = block; blockIdx.y = 0; \
    for (unsigned b = 0; b < grid; b++) for (unsigned t = 0; t < block; t++) \
        { blockIdx.x = b; threadIdx.x = t; call; }

extern "C" void h_scatter(unsigned grid, unsigned block, const bt_i64* idx, const bt_i32* val,
                          bt_i64 n, bt_i32* table, bt_i64 T, bt_i32* counts, bt_i64 num_rows)
{ LOOP1(grid, block, bt_scatter(idx, val, n, table, T, counts, num_rows)) }

extern "C" void h_slots_qsl(unsigned grid, unsigned block, const bt_i32* table,
                            const bt_i32* counts, bt_u32 width, bt_u32 num_rows,
                            const bt_i32* rows, const bt_i32* qsl, bt_i32 num_reqs,
                            const bt_i64* positions, const bt_i64* starts, bt_i64* out,
                            bt_i64 out_len, bt_i64 bs, int shift, bt_i64 world, bt_i64 rank,
                            bt_i64 il)
{ LOOP1(grid, block, bt_slots_qsl(table, counts, width, num_rows, rows, qsl, num_reqs,
                                   positions, starts, out, out_len, bs, shift, world, rank, il)) }

extern "C" void h_slots_tok(unsigned grid, unsigned block, const bt_i32* table,
                            const bt_i32* counts, bt_u32 width, bt_u32 num_rows,
                            const bt_i32* rows, const bt_i64* positions, bt_i64 n, bt_i64* out,
                            bt_i64 out_len, bt_i64 bs, int shift, bt_i64 world, bt_i64 rank,
                            bt_i64 il)
{ LOOP1(grid, block, bt_slots_tok(table, counts, width, num_rows, rows, positions, n, out,
                                   out_len, bs, shift, world, rank, il)) }

extern "C" void h_gather(unsigned gx, unsigned gy, unsigned block, const bt_i32* table,
                         const bt_i32* counts, bt_u32 width, bt_u32 num_rows, const bt_i32* idx,
                         bt_i32 n_idx, bt_i32* out, bt_i32 out_width, int vec4)
{
    gridDim.x = gx; gridDim.y = gy; blockDim.x = block;
    for (unsigned y = 0; y < gy; y++) for (unsigned b = 0; b < gx; b++)
        for (unsigned t = 0; t < block; t++) {
            blockIdx.x = b; blockIdx.y = y; threadIdx.x = t;
            bt_gather(table, counts, width, num_rows, idx, n_idx, out, out_width, vec4);
        }
}
"""

P = ctypes.c_void_p
I64, I32, U32, UI = ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint
SIGS = {
    "h_scatter": [UI, UI, P, P, I64, P, I64, P, I64],
    "h_slots_qsl": [UI, UI, P, P, U32, U32, P, P, I32, P, P, P, I64, I64, ctypes.c_int, I64,
                    I64, I64],
    "h_slots_tok": [UI, UI, P, P, U32, U32, P, P, I64, P, I64, I64, ctypes.c_int, I64, I64, I64],
    "h_gather": [UI, UI, UI, P, P, U32, U32, P, I32, P, I32, ctypes.c_int],
}


@pytest.fixture(scope="module")
def hk(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostkernels")
    src, so = d / "k.cpp", d / "k.so"
    src.write_text(K.HOST_PRELUDE + K.SOURCE + DRIVER)
    subprocess.run([CXX, "-O1", "-std=c++17", "-fPIC", "-shared", "-fno-strict-aliasing",
                    "-Wall", "-Werror", "-Wno-unused-function", "-o", str(so), str(src)],
                   check=True)
    lib = ctypes.CDLL(str(so))
    for name, args in SIGS.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def p(a):
    return None if a is None else a.ctypes.data


def fill(seg, rng, raw_ids=True):
    """Rows of random lengths holding random (RAW) ids, some empty."""
    c = seg.client()
    for r in range(seg.config.num_rows):
        row = c.claim_row(row=r, raw=True)
        n = int(rng.integers(0, seg.config.row_width + 1))
        c.append(row, rng.integers(0, 2**31 // 4096, n).astype(np.int32))
    return c


def make(num_rows=12, width=24, block_size=16):
    return bt.Segment.create(None, bt.SegmentConfig(
        block_size=block_size, num_pools=1, blocks_per_pool=2, num_rows=num_rows,
        row_width=width, max_clients=2, hand_size=1))


PARAMS = [(16, 1, 0, 1), (8, 1, 0, 1), (12, 1, 0, 1), (16, 2, 1, 1), (16, 4, 3, 4),
          (16, 2, 0, 8), (6, 3, 2, 3), (1, 1, 0, 1), (32, 8, 5, 2)]


@pytest.mark.parametrize("bs,world,rank,il", PARAMS)
def test_qsl_and_row_forms_match_libbt(hk, bs, world, rank, il):
    rng = np.random.default_rng(bs * 1000 + world * 10 + rank)
    with make(block_size=16) as seg:
        fill(seg, rng)
        sp = bt.SlotParams(block_size=bs, cp_world=world, cp_rank=rank, cp_interleave=il)
        kp = K.SlotKernelParams(bs, world, rank, il)
        table = np.ascontiguousarray(seg.table)
        counts = np.ascontiguousarray(seg.num_blocks)
        R, W = table.shape
        for trial in range(6):
            num_reqs, lens, qsl, total, out_len, rows = random_requests(rng, R, 9, 40, 50)
            pos = rng.integers(-5, W * bs * world + 40, max(total, 1)).astype(np.int64)
            want = seg.slots_qsl(qsl, pos, rows=rows, out_len=out_len, params=sp)
            out = np.full(out_len + 3, 777, np.int64)
            tail = 3
            hk.h_slots_qsl(num_reqs + tail, 32, p(table), p(counts), W, R, p(rows), p(qsl),
                           num_reqs, p(pos), None, p(out), out_len,
                           *[int(x) for x in kp.args])
            np.testing.assert_array_equal(out[:out_len], want)
            assert (out[out_len:] == 777).all()       # nothing written past out_len
            # form 1: (row, start, count) per request
            starts = rng.integers(-3, W * bs * world, num_reqs).astype(np.int64)
            out1 = np.full(out_len, 777, np.int64)
            hk.h_slots_qsl(num_reqs + 1, 32, p(table), p(counts), W, R, p(rows), p(qsl),
                           num_reqs, None, p(starts), p(out1), out_len,
                           *[int(x) for x in kp.args])
            want1 = np.full(out_len, -1, np.int64)
            for i in range(num_reqs):
                want1[qsl[i]:qsl[i + 1]] = seg.slots_row(int(rows[i]), int(starts[i]),
                                                         int(lens[i]), params=sp)
            np.testing.assert_array_equal(out1, want1)


@pytest.mark.parametrize("bs,world,rank,il", PARAMS[:5])
def test_token_form_matches_libbt(hk, bs, world, rank, il):
    rng = np.random.default_rng(7 + bs)
    with make() as seg:
        fill(seg, rng)
        sp = bt.SlotParams(block_size=bs, cp_world=world, cp_rank=rank, cp_interleave=il)
        kp = K.SlotKernelParams(bs, world, rank, il)
        table, counts = np.ascontiguousarray(seg.table), np.ascontiguousarray(seg.num_blocks)
        R, W = table.shape
        n = 500
        rows = rng.integers(0, R, n).astype(np.int32)
        pos = rng.integers(-2, W * bs * world + 10, n).astype(np.int64)
        out = np.full(n + 20, 5, np.int64)
        hk.h_slots_tok(3, 64, p(table), p(counts), W, R, p(rows), p(pos), n, p(out), n + 20,
                       *[int(x) for x in kp.args])
        np.testing.assert_array_equal(out[:n], seg.slots_req(rows, pos, params=sp))
        assert (out[n:] == -1).all()


def test_out_of_range_rows_and_bad_counts_give_minus_one(hk):
    table = np.arange(4 * 8, dtype=np.int32).reshape(4, 8)
    counts = np.array([8, -5, 1000, 2], np.int32)     # scribbled: clamped like libbt
    kp = K.SlotKernelParams(16)
    rows = np.array([0, 1, 2, 3, 4, -1], np.int32)
    pos = np.array([5, 5, 16 * 8 - 1, 16 * 2, 0, 0], np.int64)
    out = np.zeros(6, np.int64)
    hk.h_slots_tok(1, 8, p(table), p(counts), 8, 4, p(rows), p(pos), 6, p(out), 6,
                   *[int(x) for x in kp.args])
    assert list(out) == [5, -1, 23 * 16 + 15, -1, -1, -1]


def test_scatter_applies_staged_pairs(hk):
    """Pairs as bt_mirror_stage writes them land where libbt says."""
    rng = np.random.default_rng(3)
    with make(num_rows=10, width=16) as seg:
        c = fill(seg, rng)
        m = ffi_stage_all(seg)
        idx, val, n = m
        T = seg.config.num_rows * seg.config.row_width
        table = np.full(T, -9, np.int32)
        counts = np.full(seg.config.num_rows, -9, np.int32)
        hk.h_scatter(2, 32, p(idx), p(val), n, p(table), T, p(counts), seg.config.num_rows)
        np.testing.assert_array_equal(table.reshape(seg.table.shape), seg.table)
        np.testing.assert_array_equal(counts, seg.num_blocks)
        c.close()


def ffi_stage_all(seg):
    from blocktable import ffi, lib
    i = ffi.new("uint32_t *")
    assert lib.bt_mirror_claim(seg._seg, i) == 0
    d = ffi.new("bt_mirror_desc *")
    d.alloc_size = seg.config.num_rows * (seg.config.row_width + 1) * 4
    d.table_off, d.counts_off = 0, seg.config.num_rows * seg.config.row_width * 4
    assert lib.bt_mirror_publish(seg._seg, i[0], d) == 0
    cap = seg.config.num_rows * (seg.config.row_width + 1)
    idx, val = np.zeros(cap, np.int64), np.zeros(cap, np.int32)
    n, dirty = ffi.new("uint64_t *"), ffi.new("uint32_t *")
    rc = lib.bt_mirror_stage(seg._seg, i[0], seg.config.num_rows,
                             ffi.from_buffer("int64_t[]", idx), ffi.from_buffer("int32_t[]", val),
                             cap, n, dirty)
    assert rc == 0
    return idx, val, int(n[0])


@pytest.mark.parametrize("width,out_width", [(16, 16), (16, 8), (18, 18), (16, 6), (24, 20)])
def test_gather_rows_with_padding(hk, width, out_width):
    rng = np.random.default_rng(width * 100 + out_width)
    with make(num_rows=9, width=width) as seg:
        fill(seg, rng)
        table, counts = np.ascontiguousarray(seg.table), np.ascontiguousarray(seg.num_blocks)
        R = table.shape[0]
        idx = np.array([3, -1, 0, 8, 3, -1, 5], np.int32)
        padded = 10
        out = np.full((padded, out_width), 99, np.int32)
        vec4 = int(width % 4 == 0 and out_width % 4 == 0)
        units = out_width // 4 if vec4 else out_width
        gx = max(1, -(-units // 4))
        hk.h_gather(gx, padded, 4, p(table), p(counts), width, R, p(idx), len(idx), p(out),
                    out_width, vec4)
        want = np.zeros((padded, out_width), np.int32)
        for i, r in enumerate(idx):
            if r >= 0:
                want[i] = table[r, :out_width]
        np.testing.assert_array_equal(out, want)
