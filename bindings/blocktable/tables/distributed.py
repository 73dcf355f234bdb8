"""DistributedBlockTable: one pool per worker (GPU) in one shared segment.

Block ids say where they live: global id = pool * blocks_per_pool + index,
and pool w is worker w's KV memory. Each worker (a process, or a thread with
its own table) allocates from its own pool first; when that is exhausted
the rest spills to the least-loaded other pool, the one with the most free
blocks (bt_pool_free_count), then the next. Rows are per worker: worker w
owns rows [w * max_num_reqs, (w + 1) * max_num_reqs) of the segment and
addresses them as 0..max_num_reqs-1. Every row entry holds a reference, so
clearing a row sends each block back to its own pool.

Across processes: give every worker the same ``name`` (and config); the
first to arrive creates the segment (exclusively: two creators never format
it twice), the others attach and check that its shape matches. Or create
the Segment yourself and pass ``segment=``. The creator, or whoever tears
down, calls ``DistributedBlockTable.unlink(name)``.

The seed returned list(range(n)) for any worker and said every block lived
on worker 0.

Thread safety: one thread per table. Errors: BtError subclasses; a call
that raised changed nothing (a spill that could not be completed gives
back what it took).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._core import Segment, SlotParams
from .._errors import error_class, make_error
from .. import _lib
from .._types import SegmentConfig
from .._lib import count
from .base import BlockTableConfig, TableBase
from .paged import read_row
from .._types import I32Array, I64Array

__all__ = ["DistributedBlockTable"]

_ERANGE, _ECONFIG = _lib.BT_ERANGE, _lib.BT_ECONFIG
_OutOfBlocks = error_class(_lib.BT_ENOBLOCKS)
_NotReady = (error_class(_lib.BT_EBADMAGIC), error_class(_lib.BT_ECORRUPT))


class DistributedBlockTable(TableBase):
    """Block table with per-worker pools (the seed's names).

    Args: config (BlockTableConfig: block_size, max_num_reqs rows per
    worker, max_num_blocks_per_req per row), num_workers, worker_id;
    keywords: name (a shared segment "/dev/shm/bt.<name>"; None and no
    segment: an embedded one, for a single process), segment (an open
    Segment to use), blocks_per_worker (ids per pool, default
    max_num_reqs * max_num_blocks_per_req; pool 0 gives up id 0, the null
    block), attach_timeout (seconds to wait for a creator still formatting).
    """

    def __init__(self, config: BlockTableConfig | None = None, num_workers: int = 1,
                 worker_id: int = 0, *, name: str | None = None, segment: Segment | None = None,
                 blocks_per_worker: int | None = None, attach_timeout: float = 5.0) -> None:
        self.config = config = config or BlockTableConfig()
        self.num_workers = count(num_workers, "num_workers")
        self.worker_id = count(worker_id, "worker_id")
        if not 1 <= self.num_workers <= 256:
            raise make_error(_ECONFIG, f"num_workers {num_workers} not in [1, 256]")
        if self.worker_id >= self.num_workers:
            raise make_error(_ERANGE, f"worker_id {worker_id} not in [0, {num_workers})")
        R, W = config.max_num_reqs, config.max_num_blocks_per_req
        bpw = R * W if blocks_per_worker is None else count(blocks_per_worker,
                                                           "blocks_per_worker")
        want = SegmentConfig(block_size=config.block_size, kernel_block_size=config.block_size,
                             num_pools=self.num_workers, blocks_per_pool=bpw,
                             num_rows=self.num_workers * R, row_width=W,
                             max_clients=max(8, 2 * self.num_workers), hand_size=W)
        self.name, self._own_segment = name, segment is None
        if segment is None:
            segment = self._open(name, want, attach_timeout)
        self.segment = segment
        try:
            self._check_shape(want)
            self.max_num_reqs, self.row_width = R, W
            self.blocks_per_pool = segment.config.blocks_per_pool
            self.total_blocks = segment.info.total_blocks
            self._base = self.worker_id * R
            self._client = segment.client()
            self._claim_rows()
        except BaseException:
            if self._own_segment:
                segment.close()
            raise
        self._params = SlotParams(block_size=config.block_size)
        self._s: dict[str, Any] = {"calls": 0, "blocks": 0, "local_blocks": 0, "spilled_blocks": 0,
                   "spilled_to": {}, "failures": 0, "shared_pops": 0}

    @staticmethod
    def _open(name: str | None, cfg: SegmentConfig,  # type: ignore[override]
              timeout: float) -> Segment:
        if name is None:
            return Segment.create(None, cfg)
        try:
            return Segment.create(name, cfg, exclusive=True)
        except FileExistsError:
            pass
        deadline = time.monotonic() + timeout
        while True:     # the creator may still be formatting it
            try:
                return Segment.attach(name)
            except _NotReady:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _check_shape(self, want: SegmentConfig) -> None:
        have = self.segment.config
        bad = [f"{f}={getattr(have, f)} (want {getattr(want, f)})"
               for f in ("block_size", "num_pools", "num_rows", "row_width")
               if getattr(have, f) != getattr(want, f)]
        if bad:
            raise make_error(_ECONFIG, f"segment {self.segment.name!r} does not fit this "
                                       f"table: {', '.join(bad)}")

    def _claim_rows(self) -> None:
        RowStateError = error_class(_lib.BT_EROWSTATE)
        for i in range(self.max_num_reqs):
            try:
                self._client.claim_row(key=i, row=self._base + i)
            except RowStateError:
                self._client.close()
                raise make_error(_lib.BT_EROWSTATE,
                                 f"worker {self.worker_id}'s row {i} is taken: another table "
                                 "for this worker is open") from None

    # close() (TableBase): releases this worker's rows (their blocks go back
    # to their pools) and closes the segment if this table opened it; it
    # does not unlink.

    @staticmethod
    def unlink(name: str) -> None:
        Segment.unlink(name)

    # ---- rows -------------------------------------------------------------------
    def _row(self, row_idx: int) -> int:
        """The segment row of this worker's row row_idx."""
        return self._base + super()._row(row_idx)

    def allocate_blocks(self, row_idx: int, num_blocks: int,
                        prefer_local: bool = True) -> I32Array:
        """Allocate num_blocks blocks and append them to the row; returns
        their ids. prefer_local: this worker's pool first, then spill to the
        least-loaded other pools; otherwise the least-loaded pool first.
        All or nothing. Errors: RowFull, OutOfBlocks (all pools together
        are short), OutOfRange."""
        r, n = self._row(row_idx), count(num_blocks, "num_blocks")
        have = int(self.segment.num_blocks[r])
        if have + n > self.row_width:
            raise make_error(_lib.BT_EROWFULL, f"row {row_idx} holds {have} blocks, {n} more "
                                              f"exceed max_num_blocks_per_req {self.row_width}")
        s = self._s
        s["calls"] += 1
        if n == 0:
            return np.empty(0, np.int32)
        free = [self.segment.free_blocks(p) for p in range(self.num_workers)]
        others = sorted((p for p in range(self.num_workers) if p != self.worker_id),
                        key=lambda p: -free[p])
        order = [self.worker_id] + others if prefer_local else \
            sorted(range(self.num_workers), key=lambda p: -free[p])
        if free[order[0]] >= n:     # the common case: one call, straight into the row
            try:
                ids = self._client.alloc_append(r, n, order[0])
                s["shared_pops"] += 1
                self._tally(ids, n)
                return ids
            except _OutOfBlocks:    # raced: another worker took them
                pass
        parts, got = [], 0
        for p in order:
            k = min(n - got, self.segment.free_blocks(p))
            if not k:
                continue
            try:
                parts.append(self._client.alloc(k, p))
            except _OutOfBlocks:
                continue
            s["shared_pops"] += 1
            got += k
            if got == n:
                break
        ids = np.concatenate(parts) if parts else np.empty(0, np.int32)
        if got < n:
            if got:
                self._client.release(ids)
            s["failures"] += 1
            have = sum(self.segment.free_blocks(p) for p in range(self.num_workers))
            raise make_error(_lib.BT_ENOBLOCKS, f"{n} blocks asked, all pools together have "
                                               f"{have} free")
        self._client.append(r, ids)
        self._tally(ids, n)
        return ids

    def _tally(self, ids: I32Array, n: int) -> None:
        s = self._s
        s["blocks"] += n
        pools = ids // self.blocks_per_pool
        local = int(np.count_nonzero(pools == self.worker_id))
        s["local_blocks"] += local
        s["spilled_blocks"] += n - local
        if local < n:
            for p, k in zip(*np.unique(pools[pools != self.worker_id], return_counts=True)):
                s["spilled_to"][int(p)] = s["spilled_to"].get(int(p), 0) + int(k)

    def clear_row(self, row_idx: int) -> None:
        """Empty the row; each block returns to its own pool."""
        r = self._row(row_idx)
        self._client.truncate(r, 0)
        self._client.set_tokens(r, 0)

    free_row = clear_row

    def get_row(self, row_idx: int) -> I32Array:
        return read_row(self.segment, self._row(row_idx))[0]

    def get_num_blocks(self, row_idx: int) -> int:
        return int(self.segment.num_blocks[self._row(row_idx)])

    def compute_slot_mapping(self, row_idx: int, num_tokens: int, start_position: int = 0,
                             out: I64Array | None = None) -> I64Array:
        """Slots of tokens start_position .. +num_tokens-1 (int64, -1 past
        the row). A slot is global: slot // (block_size * blocks_per_pool)
        is the worker holding it."""
        return self.segment.slots_row(self._row(row_idx), start_position, num_tokens, out,
                                      self._params)

    # ---- where blocks live ----------------------------------------------------
    def get_block_location(self, block_id: int) -> int:
        """The worker (pool) holding block_id. Errors: OutOfRange (0, the
        null block, lives nowhere; negative or past the last pool)."""
        b = count(block_id, "block_id")
        if not 1 <= b < self.total_blocks:
            raise make_error(_ERANGE, f"block_id {b} not in [1, {self.total_blocks})"
                                      + (" (0 is the null block)" if b == 0 else ""))
        return b // self.blocks_per_pool

    def is_local(self, block_id: int) -> bool:
        return self.get_block_location(block_id) == self.worker_id

    def get_stats(self) -> dict[str, Any]:
        """This worker's counters (calls, blocks, local_blocks,
        spilled_blocks, spilled_to {pool: blocks}, failures, shared_pops,
        local_ratio) and the segment's state seen from here: pool_free and
        pool_used per pool, blocks in this worker's rows by pool."""
        s = dict(self._s, spilled_to=dict(self._s["spilled_to"]))
        s["worker_id"], s["num_workers"] = self.worker_id, self.num_workers
        s["local_ratio"] = s["local_blocks"] / s["blocks"] if s["blocks"] else 1.0
        free = [self.segment.free_blocks(p) for p in range(self.num_workers)]
        s["pool_free"] = free
        s["pool_used"] = [self.blocks_per_pool - (p == 0) - f for p, f in enumerate(free)]
        rows = self.segment.table[self._base:self._base + self.max_num_reqs]
        held = rows[rows != 0] // self.blocks_per_pool
        s["row_blocks_by_pool"] = np.bincount(held, minlength=self.num_workers).tolist()
        return s
