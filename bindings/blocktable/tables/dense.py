"""The seed's API (BlockTableV2's names), implemented on libbt.

The seed kept its table in Python lists. Here a BlockTable owns an embedded
segment (a private mapping, no daemon) whose rows are claimed RAW by index at
construction: the caller manages the block ids (as vLLM's BlockPool does) and
libbt keeps the dense table, the counts and the zeroed tails.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .._errors import make_error
from .. import _lib
from .._lib import ID_LIMIT as _ID_LIMIT  # RAW entries are ids in [0, 2^31)
from .._types import I32, I64, BlockInfo, SegmentConfig, as_array, out_array
from .._types import I32Array, I64Array, IntArray, IntsLike
from .base import BlockTableConfig, TableBase

__all__ = ["BlockTable", "expand_kernel_blocks"]



def expand_kernel_blocks(ids: I32Array, ratio: int) -> I32Array:
    """KV-block ids -> kernel-block ids: b -> b*ratio + j for j < ratio
    (vLLM's map_to_kernel_blocks). ratio 1 returns ids unchanged."""
    if ratio == 1:
        return ids
    if ids.shape[0] and int(ids.max()) >= _ID_LIMIT // ratio:
        raise make_error(_lib.BT_ERANGE, f"block id {int(ids.max())} times {ratio} kernel "
                                        f"blocks does not fit int32")
    return (ids.reshape(-1, 1) * ratio + np.arange(ratio, dtype=I32)).reshape(-1)  # type: ignore[return-value]  # int32: numpy's stubs say float


class BlockTable(TableBase):
    """Block table for the KV cache: maps token positions of each request
    (row) to KV slots. Rows are indexed 0..max_num_reqs-1 and hold block ids
    you allocated elsewhere.

    Where the seed was wrong, and we differ:
      * Appending past a row's capacity silently grew (or cut) the row in the
        seed; here it raises RowFull and changes nothing.
      * With kernel_block_size K != block_size B the seed mixed the two
        sizes; here each appended block b is stored as its B/K kernel blocks
        b*(B/K)+j (vLLM's layout: row width max_num_blocks_per_req*B/K) and
        slots are computed with K, which gives the same slots as B would.
      * compute_slot_mapping returned garbage (block 0's slots) past the
        row's blocks; here those positions map to -1.
      * Entries past a row's blocks are always 0 (the seed left stale ids
        after clear/shrink, which let requests read each other's KV).

    The ids you give to append_row are KV blocks of block_size tokens; the
    row stores, and get_row / get_num_blocks / get_total_blocks return, the
    kernel block ids and counts, as vLLM's BlockTable does (append_row(0,
    [0, 1, 2]) at B=32, K=16 reads back [0, 1, 2, 3, 4, 5]).
    ``get_kv_row`` maps a row back to KV block ids. Views: ``table`` (int32 [max_num_reqs, row_width]) and
    ``num_blocks`` (int32, kernel entries per row) are zero-copy and
    read-only.

    Thread safety: one writer at a time (it is one client of its segment);
    reads (get_row, slot mapping) may run concurrently with nothing else
    writing. Errors: BtError subclasses; a call that raised changed nothing.
    """

    def __init__(self, config: BlockTableConfig | None = None) -> None:
        self.config = config = config or BlockTableConfig()
        self.block_size = config.block_size
        self.kernel_block_size = config.kernel_block_size
        self.blocks_per_kv_block = config.blocks_per_kv_block
        self.max_num_reqs = config.max_num_reqs
        self.row_width = config.row_width
        # No pool blocks are handed out here (RAW rows), so the pool is tiny.
        self._open(SegmentConfig(
            block_size=config.block_size, kernel_block_size=config.kernel_block_size,
            num_pools=1, blocks_per_pool=2, num_rows=config.max_num_reqs,
            row_width=self.row_width, max_clients=1, hand_size=1),
            raw=True, slot_block_size=config.kernel_block_size)
        self.table = self.segment.table

    def append_row(self, row_idx: int, block_ids: IntsLike, num_tokens: int = 0) -> None:
        """Append KV blocks to a row and add num_tokens to its token count.
        Errors: RowFull (no room: nothing appended), OutOfRange (row, or an
        id outside [0, 2^31 / (B/K))), InvalidArgument (num_tokens < 0)."""
        ids = expand_kernel_blocks(as_array(block_ids, I32, "block_ids"), self.blocks_per_kv_block)
        if num_tokens < 0:
            raise make_error(_lib.BT_EINVAL, f"num_tokens {num_tokens} < 0")
        row_idx = self._row(row_idx)
        self._client.append(row_idx, ids)
        if num_tokens:
            self._client.set_tokens(row_idx, int(self.num_tokens[row_idx]) + num_tokens)

    def get_row(self, row_idx: int) -> I32Array:
        """The row's stored ids: kernel block ids, as vLLM's table holds
        them (the KV ids themselves when K == B), read under the seqlock."""
        return self.segment.read_row(self._row(row_idx))[0]

    get_kernel_row = get_row

    def get_kv_row(self, row_idx: int) -> I32Array:
        """The row's KV block ids (what append_row was given)."""
        ids = self.get_row(row_idx)
        return ids[::self.blocks_per_kv_block] // self.blocks_per_kv_block

    def clear_row(self, row_idx: int) -> None:
        """Empty a row (entries zeroed, token count 0); it stays usable."""
        row_idx = self._row(row_idx)
        self._client.truncate(row_idx, 0)
        self._client.set_tokens(row_idx, 0)

    def compute_slot_mapping(self, row_idx: int, num_tokens: int, start_position: int = 0,
                             out: I64Array | None = None) -> I64Array:
        """Slots (int64) of positions start_position .. +num_tokens-1 of the
        row; -1 where the row has no block. out: an int64 buffer to fill."""
        return self.segment.slots_row(self._row(row_idx), start_position, num_tokens,
                                      out, self._params)

    def update_slot_mapping(self, token_positions: Sequence[tuple[int, int]] | IntArray,
                            out: I64Array | None = None) -> I64Array:
        """Slots for arbitrary tokens: `token_positions` is a sequence of
        (row_idx, position) pairs, or an int array of shape (n, 2) holding
        them. Returns int64 [n] (-1 where no block backs the position).
        (The seed took a list and mutated hidden state; this returns.)"""
        tp = np.asarray(token_positions)
        if tp.size == 0:
            return out_array(out, 0, I64)[:0]
        if tp.ndim != 2 or tp.shape[1] != 2:
            raise make_error(_lib.BT_EINVAL, f"token_positions must be (row_idx, position) "
                                            f"pairs, got shape {tp.shape}")
        rows = as_array(np.ascontiguousarray(tp[:, 0]), I32, "row indices")
        pos = as_array(np.ascontiguousarray(tp[:, 1]), I64, "positions")
        return self.segment.slots_req(rows, pos, out, self._params)

    def get_num_blocks(self, row_idx: int) -> int:
        """Entries (kernel blocks) in the row, vLLM's num_blocks_per_row."""
        return int(self.num_blocks[self._row(row_idx)])

    def get_total_blocks(self) -> int:
        """Entries (kernel blocks) held by all rows together."""
        return int(self.num_blocks.sum(dtype=np.int64))

    def get_num_tokens(self, row_idx: int) -> int:
        return int(self.num_tokens[self._row(row_idx)])
