"""Gathering rows by request key (libbt bt.h section 11): how a worker that
did not write the rows builds its batch's block table from them.

``RowGather(seg, width)`` keeps, per call site, the buffers and the per-key
row hints (row + generation) so that one step is one C call:

    g = RowGather(seg, width=table.shape[1])
    nb = g.gather(keys, out=table)     # out[i] <- the row of keys[i]; nb[i] = -1: none

The one-off forms are ``Segment.find_row(key)`` and
``Segment.gather_rows(keys, hints, out)``.

Thread and process safety: read-only on the segment; any number of
processes gather at once, while a writer claims, appends and releases (each
row is copied under its seqlock). One RowGather per thread.
Errors: InvalidArgument (bad shapes), Busy (a row stayed mid-write), and
FileNotFoundError from find_row for a key no claimed row holds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._errors import make_error
from . import _lib
from ._types import I32, U64
from ._types import I32Array

if TYPE_CHECKING:
    from ._core import Segment

__all__ = ["RowGather"]

_EINVAL = _lib.BT_EINVAL


class RowGather:
    """Reusable gather for one caller (a worker): keys and row hints by batch
    slot, kept across steps, so that a request that stays in its slot is
    found through its hint (no search). See the module docstring for
    errors and thread safety."""

    def __init__(self, seg: Segment, max_rows: int) -> None:
        self.seg = seg
        self.keys = np.zeros(max_rows, U64)
        self.hints = np.zeros(max_rows, U64)
        self.nblocks = np.zeros(max_rows, I32)
        self._seg = seg._s()
        self._keys_c = _lib.from_buffer("uint64_t[]", self.keys)
        self._hints_c = _lib.from_buffer("uint64_t[]", self.hints)
        self._nb_c = _lib.from_buffer("int32_t[]", self.nblocks)

    def set_key(self, slot: int, key: int) -> None:
        """Batch slot `slot` now holds request `key` (its hint is dropped)."""
        self.keys[slot] = key
        self.hints[slot] = 0

    def gather(self, n: int, out: I32Array) -> I32Array:
        """Gather slots [0, n) into out[:n] (C-contiguous int32, width =
        out.shape[1]); returns self.nblocks[:n] (-1: no row for that key)."""
        # C writes n rows of out.shape[1] entries: check before it does.
        if not (0 <= n <= self.keys.shape[0] and out.ndim == 2 and out.shape[0] >= n
                and out.dtype == I32 and out.flags.c_contiguous):
            raise make_error(_EINVAL, f"gather(n={n}): out must be C-contiguous int32 "
                             f"[>= n, width] (got {out.dtype} {out.shape}) and n at most "
                             f"{self.keys.shape[0]}")
        rc = _lib.rows_gather(self._seg, self._keys_c, n, self._hints_c,
                                _lib.from_buffer("int32_t[]", out), out.shape[1], self._nb_c)
        if rc:
            raise make_error(rc, f"gather(n={n})")
        return self.nblocks[:n]

