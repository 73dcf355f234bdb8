"""Run-length slot mappings: (first_slot, length) per contiguous run.

A slot mapping is int64 per token, and consecutive tokens of a block have
consecutive slots; consecutive block ids (b, b+1) continue the run across
the block boundary. A prefill of 8K tokens over a row allocated in long runs
(BlockAllocationStrategy.CONTIGUOUS) is then a handful of runs instead of
64 KiB of slots. A run whose first slot is -1 stands for `length` tokens
that no block backs (padding, holes of paged rows, other ranks' tokens).

Two CPU producers:
  * compress_slots(slots): any int64 slot mapping (what libbt's slot
    functions return), vectorised in numpy.
  * compress_row(segment, row, start, n): straight from a row, one step per
    block instead of per token (a 1M-token context is 65,536 blocks), with
    the same result as compress_slots(segment.slots_row(row, start, n)).
and compress_rows() for a batch of requests (vLLM's query_start_loc form).

Expansion here is on the CPU (RunLengthSlots.expand, used by the tests);
the GPU expansion (one thread per token: r = searchsorted(offsets, t) - 1,
slot = first[r] + t - offsets[r], -1 runs stay -1) belongs to the GPU
kernels (issue 4) and is not in this module. ``offsets`` is provided for it.

Errors: InvalidArgument (slots below -1, context parallelism in
compress_row, lengths that disagree), OutOfRange.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import make_error
from . import _lib
from ._types import I32, I64, as_array
from ._lib import count
from .tables.paged import read_row
from ._types import I32Array, I64Array, IntArray, IntsLike

if TYPE_CHECKING:
    from ._core import Segment, SlotParams

__all__ = ["RunLengthSlots", "compress_slots", "compress_row", "compress_rows"]

RUN_BYTES = 12      # int64 first slot + int32 length
SLOT_BYTES = 8      # one int64 slot per token


@dataclass(frozen=True)
class RunLengthSlots:
    """A slot mapping as runs: token offsets[i] + j (j < length[i]) has slot
    first[i] + j, or -1 where first[i] is -1."""
    first: I64Array         # int64 [runs]
    length: I32Array        # int32 [runs]

    @property
    def num_runs(self) -> int:
        return int(self.first.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum(dtype=np.int64))

    @property
    def offsets(self) -> I64Array:
        """Exclusive prefix sum of the lengths: the token where each run
        starts (int64 [runs])."""
        o = np.zeros(self.num_runs, I64)
        np.cumsum(self.length[:-1], out=o[1:])
        return o

    @property
    def nbytes(self) -> int:
        return self.num_runs * RUN_BYTES

    @property
    def raw_nbytes(self) -> int:
        return self.num_tokens * SLOT_BYTES

    @property
    def bytes_saved(self) -> int:
        """raw_nbytes - nbytes: negative where runs are shorter than 1.5
        tokens on average (a scattered row), where the plain form wins."""
        return self.raw_nbytes - self.nbytes

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.nbytes if self.nbytes else 1.0

    def expand(self, out: I64Array | None = None) -> I64Array:
        """The int64 slot mapping these runs stand for (CPU)."""
        n = self.num_tokens
        if out is None:
            out = np.empty(n, I64)
        elif out.shape[0] < n or out.dtype != I64:
            raise make_error(_lib.BT_EINVAL, f"out must be int64 with >= {n} entries")
        if not n:
            return out[:0]
        run = np.repeat(np.arange(self.num_runs), self.length)
        t = np.arange(n, dtype=I64)
        first = self.first[run]
        out[:n] = np.where(first < 0, -1, first + t - self.offsets[run])
        return out[:n]

    def stats(self) -> dict[str, float]:
        return {"tokens": self.num_tokens, "runs": self.num_runs, "bytes": self.nbytes,
                "raw_bytes": self.raw_nbytes, "bytes_saved": self.bytes_saved,
                "ratio": self.ratio}


def _runs(first: I64Array, length: IntArray) -> RunLengthSlots:
    """Merge segments (first, length) that continue each other: a valid
    segment whose first is the previous one's first + length, or two
    invalid (-1) ones in a row."""
    if first.shape[0] == 0:
        return RunLengthSlots(np.empty(0, I64), np.empty(0, I32))
    neg = first < 0
    cont = np.empty(first.shape[0], bool)
    cont[0] = False
    cont[1:] = (neg[1:] & neg[:-1]) | (~neg[1:] & ~neg[:-1] &
                                       (first[1:] == first[:-1] + length[:-1]))
    starts = np.flatnonzero(~cont)
    total = np.add.reduceat(length.astype(I64), starts)
    return RunLengthSlots(np.where(neg[starts], -1, first[starts]).astype(I64),
                          total.astype(I32))


def compress_slots(slots: IntsLike) -> RunLengthSlots:
    """Runs of a slot mapping (int64 array, -1 where no block). Slots below
    -1 are refused (InvalidArgument)."""
    s = as_array(slots, I64, "slots")
    if s.shape[0] and int(s.min()) < -1:
        raise make_error(_lib.BT_EINVAL, f"slot {int(s.min())} < -1 is not a slot mapping")
    return _runs(s, np.ones(s.shape[0], I64))


def _row_segments(segment: Segment, row: int, start: int, n: int,
                  bs: int) -> tuple[I64Array, I64Array]:
    """(first, length) per block touched by tokens [start, start + n)."""
    ids, info = read_row(segment, row)
    paged = bool(info.flags & _lib.BT_ROW_PAGED)
    firsts, lens = [], []
    if start < 0:                   # positions before 0: no slot
        k = min(n, -start)
        firsts.append(np.array([-1], I64))
        lens.append(np.array([k], I64))
        start, n = 0, n - k
    if n:
        b0, b1 = start // bs, (start + n - 1) // bs + 1
        i = np.arange(b0, b1, dtype=I64)
        lo = np.maximum(start, i * bs)
        hi = np.minimum(start + n, (i + 1) * bs)
        inrow = i < ids.shape[0]
        bid = np.zeros(i.shape[0], I64)
        bid[inrow] = ids[i[inrow]]
        valid = inrow & (bid != 0) if paged else inrow
        firsts.append(np.where(valid, bid * bs + lo - i * bs, -1))
        lens.append(hi - lo)
    if not firsts:
        return np.empty(0, I64), np.empty(0, I64)
    return np.concatenate(firsts), np.concatenate(lens)


def _block_size(segment: Segment, params: SlotParams | None) -> int:
    if params is not None and params.cp_world > 1:
        raise make_error(_lib.BT_EINVAL, "compress_row does not do context parallelism: "
                                        "compress_slots(slots_row(...)) does")
    return (params.block_size if params is not None and params.block_size
            else segment.config.block_size)


def compress_row(segment: Segment, row: int, start: int, num_tokens: int,
                 params: SlotParams | None = None) -> RunLengthSlots:
    """Runs of the slots of tokens start .. start+num_tokens-1 of `row`,
    computed per block. Equal to compress_slots(segment.slots_row(row,
    start, num_tokens, params=params)); params.block_size (the unit of the
    stored ids) is honoured, context parallelism is not (InvalidArgument)."""
    bs = _block_size(segment, params)
    n = count(num_tokens, "num_tokens")
    return _runs(*_row_segments(segment, row, int(start), n, bs))


def compress_rows(segment: Segment, rows: IntsLike, starts: IntsLike, num_tokens: IntsLike,
                  params: SlotParams | None = None) -> RunLengthSlots:
    """Runs of a batch: request i's num_tokens[i] tokens from starts[i] in
    rows[i], one after another (the token order of vLLM's query_start_loc
    form). Runs continue across requests when their slots do."""
    r = as_array(rows, I32, "rows")
    s = as_array(starts, I64, "starts")
    k = as_array(num_tokens, I64, "num_tokens")
    if not r.shape[0] == s.shape[0] == k.shape[0]:
        raise make_error(_lib.BT_EINVAL, f"{r.shape[0]} rows, {s.shape[0]} starts, "
                                        f"{k.shape[0]} counts")
    if k.shape[0] and int(k.min()) < 0:
        raise make_error(_lib.BT_ERANGE, f"num_tokens {int(k.min())} < 0")
    bs = _block_size(segment, params)
    parts = [_row_segments(segment, int(r[i]), int(s[i]), int(k[i]), bs)
             for i in range(r.shape[0])]
    if not parts:
        return _runs(np.empty(0, I64), np.empty(0, I64))
    return _runs(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
