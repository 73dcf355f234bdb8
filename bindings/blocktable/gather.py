"""Gathering rows by request key (libbt bt.h section 11): how a worker that
did not write the rows builds its batch's block table from them.

``RowGather(seg, width)`` keeps, per call site, the buffers and the per-key
row hints (row + generation) so that one step is one C call:

    g = RowGather(seg, width=table.shape[1])
    nb = g.gather(keys, out=table)     # out[i] <- the row of keys[i]; nb[i] = -1: none

Also ``Segment.find_row(key)`` and ``Segment.gather_rows(keys, hints, out)``
(installed on Segment by importing this module, which ``blocktable`` does).

Thread and process safety: read-only on the segment; any number of
processes gather at once, while a writer claims, appends and releases (each
row is copied under its seqlock). One RowGather per thread.
Errors: InvalidArgument (bad shapes), Busy (a row stayed mid-write), and
FileNotFoundError from find_row for a key no claimed row holds.
"""
import numpy as np

from ._core import Segment
from ._errors import make_error
from ._ffi import ffi, lib
from ._types import I32, U64

__all__ = ["RowGather", "find_row", "gather_rows"]

_EINVAL = lib.BT_EINVAL


def find_row(seg, key):
    """The claimed row holding `key` (bt_row_find); FileNotFoundError if none."""
    out = ffi.new("uint32_t *")
    rc = lib.bt_row_find(seg._s(), int(key), out)
    if rc:
        raise make_error(rc, f"find_row(key={key:#x})")
    return out[0]


def _c(arr, dtype, ctype, what):
    if not (isinstance(arr, np.ndarray) and arr.dtype == dtype and arr.flags.c_contiguous):
        raise make_error(_EINVAL, f"{what}: a C-contiguous {np.dtype(dtype).name} array is needed")
    return ffi.from_buffer(ctype, arr)


def gather_rows(seg, keys, hints, out, nblocks=None):
    """bt_rows_gather: out[i, :] <- the row claimed with keys[i] (zeros past
    its count); returns nblocks (int32, -1 where no row holds the key).
    keys, hints: uint64 arrays of n; hints are read and rewritten (0 =
    unknown); out: a C-contiguous int32 [>= n, width] array."""
    n = len(keys)
    if out.ndim != 2 or out.shape[0] < n:
        raise make_error(_EINVAL, f"out has shape {out.shape}, need ({n}, width)")
    if len(hints) < n:
        raise make_error(_EINVAL, f"{len(hints)} hints for {n} keys")
    nblocks = np.empty(n, I32) if nblocks is None else nblocks
    rc = lib.bt_rows_gather(seg._s(), _c(keys, U64, "uint64_t[]", "keys"), n,
                            _c(hints, U64, "uint64_t[]", "hints"),
                            _c(out, I32, "int32_t[]", "out"), out.shape[1],
                            _c(nblocks, I32, "int32_t[]", "nblocks"))
    if rc:
        raise make_error(rc, f"gather_rows(n={n})")
    return nblocks[:n]


class RowGather:
    """Reusable gather for one caller (a worker): keys and row hints by batch
    slot, kept across steps, so that a request that stays in its slot is
    found through its hint (no search). See the module docstring for
    errors and thread safety."""

    def __init__(self, seg, max_rows):
        self.seg = seg
        self.keys = np.zeros(max_rows, U64)
        self.hints = np.zeros(max_rows, U64)
        self.nblocks = np.zeros(max_rows, I32)
        self._seg = seg._s()
        self._keys_c = ffi.from_buffer("uint64_t[]", self.keys)
        self._hints_c = ffi.from_buffer("uint64_t[]", self.hints)
        self._nb_c = ffi.from_buffer("int32_t[]", self.nblocks)

    def set_key(self, slot, key):
        """Batch slot `slot` now holds request `key` (its hint is dropped)."""
        self.keys[slot] = key
        self.hints[slot] = 0

    def gather(self, n, out):
        """Gather slots [0, n) into out[:n] (C-contiguous int32, width =
        out.shape[1]); returns self.nblocks[:n] (-1: no row for that key)."""
        rc = lib.bt_rows_gather(self._seg, self._keys_c, n, self._hints_c,
                                ffi.from_buffer("int32_t[]", out), out.shape[1], self._nb_c)
        if rc:
            raise make_error(rc, f"gather(n={n})")
        return self.nblocks[:n]


Segment.find_row = find_row
Segment.gather_rows = gather_rows
