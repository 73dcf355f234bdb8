"""BlockTableV2: a block table that owns its blocks.

Where BlockTable (table.py) stores ids that you allocate elsewhere, V2 keeps
the allocator and the table in one segment: rows are MANAGED (every entry
holds a reference on its block), so clear_row really returns the blocks to
the pool, and a block can never sit in a row and on the free list at once.

  use_sparse      rows are paged (sparse.py): memory follows the blocks in
                  use, holes allowed (set_block, punch).
  use_prediction  the PREDICTIVE strategy (predictive.py): per-request
                  reservations, reclaimed under pressure.
  strategy        any BlockAllocationStrategy (strategies.py); default
                  SCATTERED, or PREDICTIVE with use_prediction.

The segment is embedded (a private mapping): it works with nothing else
running. A request is bound to the row allocate_for_request() first gave
it; clear_row() ends the request (its reservation goes back) and frees the
row's blocks.

The seed's V2 appended list(range(n)) when prediction was off, freed
nothing on clear_row, and gave its predictor 1,000 blocks whatever the
table's size. Here the pool holds total_blocks (default max_num_reqs x
max_num_blocks_per_req: every row can fill).

Out of scope: GPU mirrors of paged rows (the device copy of the chunk pool
and the gather over it, issue 4); dense rows mirror as any segment does.

Thread safety: one thread at a time. Errors: BtError subclasses; a call
that raised changed nothing.
"""
from __future__ import annotations

from typing import Any, Hashable

import numpy as np

from .._errors import make_error
from .. import _lib
from .._types import I32, SegmentConfig, as_array
from .._types import I32Array, I64Array, IntsLike
from . import paged as _paged
from .._lib import count
from ..strategies import BlockAllocationStrategy, make_allocator
from .base import BlockTableConfig, TableBase

__all__ = ["BlockTableV2"]

_ERANGE = _lib.BT_ERANGE


class BlockTableV2(TableBase):
    """Enhanced block table (the seed's names): standard or sparse rows,
    any allocation strategy, blocks owned by the table.

    Args: config (BlockTableConfig), use_sparse, use_prediction; keywords:
    strategy, total_blocks (the pool), prediction_horizon, chunk_size and
    num_chunks (sparse rows), and strategy_options (a dict for the
    strategy's class, e.g. {"batch": 64} or {"device": "cuda:0"}).
    Row ids are KV blocks of config.block_size tokens.
    """

    def __init__(self, config: BlockTableConfig | None = None, use_sparse: bool = False,
                 use_prediction: bool = False, *,
                 strategy: BlockAllocationStrategy | str | None = None,
                 total_blocks: int | None = None, prediction_horizon: int = 4,
                 chunk_size: int | None = None, num_chunks: int | None = None,
                 strategy_options: dict[str, Any] | None = None) -> None:
        self.config = config = config or BlockTableConfig()
        R, W = config.max_num_reqs, config.max_num_blocks_per_req
        self.max_num_reqs, self.max_blocks = R, W
        self.use_sparse, self.use_prediction = bool(use_sparse), bool(use_prediction)
        P = BlockAllocationStrategy.PREDICTIVE
        if isinstance(strategy, str):
            strategy = BlockAllocationStrategy[strategy.upper()]
        if use_prediction and strategy not in (None, P):
            raise make_error(_lib.BT_ECONFIG, f"use_prediction with strategy {strategy.name}: "
                                             "pick one")
        self.strategy = P if use_prediction else strategy or BlockAllocationStrategy.SCATTERED
        total = R * W if total_blocks is None else count(total_blocks, "total_blocks")
        if total < 1:
            raise make_error(_lib.BT_ECONFIG, "total_blocks must be positive")
        paged = {}
        if self.use_sparse:
            cs = chunk_size or _paged.default_chunk_size(W)
            dw = -(-W // cs)
            paged = dict(chunk_size=cs, dir_width=dw,
                         num_chunks=R * dw if num_chunks is None else num_chunks)
        self._open(SegmentConfig(
            block_size=config.block_size, kernel_block_size=config.block_size, num_pools=1,
            blocks_per_pool=total + 1, num_rows=R, row_width=1 if self.use_sparse else W,
            max_clients=2, hand_size=min(total, 1 << 20), **paged), paged=self.use_sparse)
        self.total_blocks = total
        opts = dict(strategy_options or {})
        if self.strategy is P:
            opts.setdefault("prediction_horizon", prediction_horizon)
            opts.setdefault("block_size", config.block_size)
        self.allocator = make_allocator(self.strategy, self._client, 0, **opts)
        self._one = np.empty(1, np.int64)
        self._row_req, self._req_row = {}, {}
        self._allocations = self._frees = 0

    def close(self) -> None:
        self.allocator.close()
        super().close()

    # ---- checks -----------------------------------------------------------------

    def _room(self, r: int, n: int) -> None:
        have = int(self.num_blocks[r])
        if have + n > self.max_blocks:
            raise make_error(_lib.BT_EROWFULL, f"row {r} holds {have} blocks, {n} more exceed "
                                              f"max_num_blocks_per_req {self.max_blocks}")

    def _bind(self, request_id: Hashable, r: int) -> bool:
        """Check that request_id may use row r: (is it new?)."""
        bound = self._row_req.get(r)
        if bound is not None and bound != request_id:
            raise make_error(_lib.BT_EROWSTATE, f"row {r} belongs to request {bound!r}: "
                                               f"clear_row({r}) ends it first")
        at = self._req_row.get(request_id)
        if at is not None and at != r:
            raise make_error(_lib.BT_EROWSTATE, f"request {request_id!r} lives in row {at}, "
                                               f"not {r}")
        return bound is None

    # ---- blocks -----------------------------------------------------------------
    def allocate(self, request_id: Hashable, num_blocks: int) -> I32Array:
        """Loose blocks for a later append_row / set_block (the strategy's
        allocate). free() gives back those never appended."""
        return self.allocator.allocate(request_id, num_blocks)

    def free(self, block_ids: IntsLike) -> None:
        self.allocator.free(block_ids)

    def allocate_for_request(self, request_id: Hashable, row_idx: int,
                             num_blocks: int) -> I32Array:
        """Allocate num_blocks blocks for the request and append them to its
        row; returns their ids. The first call binds the request to the row.
        Errors: RowFull, OutOfBlocks, RowStateError (the row belongs to
        another request, or the request to another row); nothing changes."""
        if request_id is None:
            raise make_error(_lib.BT_EINVAL, "request_id must not be None")
        r, n = self._row(row_idx), count(num_blocks, "num_blocks")
        new = self._bind(request_id, r)
        self._room(r, n)
        ids = self.allocator.allocate(request_id, n)
        try:
            self._client.append(r, ids)
        except BaseException:
            self.allocator.free(ids)
            raise
        self.allocator.detach(ids)
        if new:
            self._row_req[r], self._req_row[request_id] = request_id, r
        self._allocations += n
        return ids

    allocate_req_blocks = allocate_for_request      # the seed's other name

    # ---- rows -------------------------------------------------------------------
    def append_row(self, row_idx: int, block_ids: IntsLike, num_tokens: int = 0, *,
                   shared: bool = False) -> None:
        """Append blocks to a row and add num_tokens to its token count.
        The ids must be loose blocks from allocate() (they move into the
        row); shared=True appends allocated blocks held elsewhere (prefix
        sharing: each gets a new reference). Errors: NotHeld (with the hint
        to allocate them), RowFull, OutOfRange; nothing changes."""
        r = self._row(row_idx)
        ids = as_array(block_ids, I32, "block_ids")
        num_tokens = count(num_tokens, "num_tokens")
        self._room(r, ids.shape[0])
        if shared:
            self._client.append_shared(r, ids)
        else:
            self.allocator.check_out(ids, "append_row (allocate the blocks with allocate(), "
                                           "or pass shared=True)")
            self._client.append(r, ids)
            self.allocator.detach(ids)
        if num_tokens:
            self._client.set_tokens(r, int(self.num_tokens[r]) + num_tokens)
        self._allocations += ids.shape[0]

    def get_row(self, row_idx: int) -> I32Array:
        """The row's block ids (int32; holes 0 in sparse rows)."""
        return _paged.read_row(self.segment, self._row(row_idx))[0]

    def get_num_blocks(self, row_idx: int) -> int:
        return int(self.num_blocks[self._row(row_idx)])

    def clear_row(self, row_idx: int) -> int:
        """Empty the row: its blocks go back to the pool (those shared with
        another row stay allocated), the request bound to it ends (its
        reservation goes back). Returns the number of blocks released."""
        r = self._row(row_idx)
        n = int(np.count_nonzero(self.get_row(r)))
        self._client.truncate(r, 0)
        self._client.set_tokens(r, 0)
        rid = self._row_req.pop(r, None)
        if rid is not None:
            del self._req_row[rid]
            if self.allocator.knows(rid):
                self.allocator.end_request(rid)
        self._frees += n
        return n

    def compute_slot_mapping(self, row_idx: int, num_tokens: int, start_position: int = 0,
                             out: I64Array | None = None) -> I64Array:
        """Slots (int64) of tokens start_position .. +num_tokens-1 of the row
        (-1 past the row and in holes)."""
        return self.segment.slots_row(self._row(row_idx), start_position, num_tokens, out,
                                      self._params)

    # ---- sparse rows --------------------------------------------------------------
    def _sparse(self, what: str) -> None:
        if not self.use_sparse:
            raise make_error(_lib.BT_EROWSTATE, f"{what} needs use_sparse=True")

    def set_block(self, row_idx: int, position: int, block_id: int) -> None:
        """Sparse rows: entry `position` (a block index) := block_id, a loose
        block from allocate() (it moves into the row; the old entry's block
        is released). Errors: OutOfRange (position past the row's
        capacity), NotHeld, RowStateError (dense rows)."""
        self._sparse("set_block")
        r, p = self._row(row_idx), count(position, "position")
        if p >= self.max_blocks:
            raise make_error(_ERANGE, f"block position {p} not in [0, {self.max_blocks})")
        b = count(block_id, "block_id")
        if b == 0:
            raise make_error(_lib.BT_EINVAL, "block 0 is the null block: punch() makes holes")
        self.allocator.check_out([b], "set_block (allocate the block with allocate())")
        self._client.set_block(r, p, b)
        self.allocator.detach([b])
        self._allocations += 1

    def get_block(self, row_idx: int, position: int) -> int | None:
        """The block at block index `position`, or None (a hole, or past the
        row). Errors: OutOfRange (past max_num_blocks_per_req)."""
        r, p = self._row(row_idx), count(position, "position")
        if p >= self.max_blocks:
            raise make_error(_ERANGE, f"block position {p} not in [0, {self.max_blocks})")
        return _paged.block_at(self.segment, r, p, self._params, self._one)

    def punch(self, row_idx: int, start: int, end: int) -> None:
        """Sparse rows: release the blocks at [start, end), leaving holes."""
        self._sparse("punch")
        r = self._row(row_idx)
        s, e = count(start, "start"), count(end, "end")
        if not s <= e <= self.num_blocks[r]:
            raise make_error(_ERANGE, f"punch [{s}, {e}) of a row of {int(self.num_blocks[r])} "
                                      "blocks")
        before = int(np.count_nonzero(self.get_row(r)))
        self._client.punch(r, s, e)
        self._frees += before - int(np.count_nonzero(self.get_row(r)))

    # ---- statistics ---------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        """The seed's keys (allocations: blocks put in rows; frees: blocks
        released by clear_row/punch; free_blocks: the pool's) and: strategy,
        sparse, total_blocks, rows_in_use, blocks_in_rows (allocated blocks
        held by rows), loose_blocks (held by the allocator: reserved, cached
        or handed out), the allocator's counters (allocator), memory (row
        storage bytes)."""
        free, loose = self.segment.free_blocks(0), self._client.slot().hand_count
        if self.use_sparse:
            memory = _paged.paged_memory(self.segment, self.max_blocks)
        else:
            dense = self.max_num_reqs * self.max_blocks * 4
            memory = {"total_bytes": dense, "dense_bytes": dense}
        a = self.allocator.get_stats()
        return {"allocations": self._allocations, "frees": self._frees,
                "free_blocks": free, "strategy": self.strategy.name,
                "sparse": self.use_sparse, "total_blocks": self.total_blocks,
                "rows_in_use": int(np.count_nonzero(self.num_blocks)),
                "blocks_in_rows": self.total_blocks - free - loose, "loose_blocks": loose,
                "reserved": a.get("reserved", 0),
                "allocator": a, "memory": memory}
