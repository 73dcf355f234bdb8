"""The seed's API (BlockTableV2's names), implemented on libbt.

The seed kept its table in Python lists. Here a BlockTable owns an embedded
segment (a private mapping, no daemon) whose rows are claimed RAW by index at
construction: the caller manages the block ids (as vLLM's BlockPool does) and
libbt keeps the dense table, the counts and the zeroed tails.
"""
from dataclasses import dataclass

import numpy as np

from ._core import SlotParams, Segment
from ._errors import make_error
from . import _lib
from ._lib import ID_LIMIT as _ID_LIMIT  # RAW entries are ids in [0, 2^31)
from .strategies import BlockAllocationStrategy  # re-exported: its home is strategies
from ._types import I32, I64, BlockInfo, SegmentConfig, as_array, out_array

__all__ = ["BlockAllocationStrategy", "BlockTableConfig", "BlockInfo", "BlockTable"]



@dataclass(frozen=True)
class BlockTableConfig:
    """Configuration of a BlockTable (the seed's fields and defaults).

    Validated at construction (ConfigError, a ValueError): sizes positive,
    kernel_block_size divides block_size, cp_kv_cache_interleave_size >= 1.
    pin_memory and device are kept for the GPU mirror; the table itself
    always lives in host (shared) memory.
    """
    block_size: int = 16
    kernel_block_size: int = 16
    max_num_reqs: int = 256
    max_num_blocks_per_req: int = 128
    max_num_batched_tokens: int = 8192
    pin_memory: bool = True
    device: str = "cuda"
    cp_kv_cache_interleave_size: int = 1

    def __post_init__(self):
        for f in ("block_size", "kernel_block_size", "max_num_reqs",
                  "max_num_blocks_per_req", "max_num_batched_tokens",
                  "cp_kv_cache_interleave_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise make_error(_lib.BT_ECONFIG, f"{f} must be a positive int, got {v!r}")
        if self.block_size % self.kernel_block_size:
            raise make_error(_lib.BT_ECONFIG, f"kernel_block_size {self.kernel_block_size} "
                                             f"does not divide block_size {self.block_size}")

    @property
    def blocks_per_kv_block(self):
        """Kernel blocks per KV block (B / K)."""
        return self.block_size // self.kernel_block_size

    @property
    def row_width(self):
        """Entries per row: max_num_blocks_per_req kernel-expanded."""
        return self.max_num_blocks_per_req * self.blocks_per_kv_block


def expand_kernel_blocks(ids, ratio):
    """KV-block ids -> kernel-block ids: b -> b*ratio + j for j < ratio
    (vLLM's map_to_kernel_blocks). ratio 1 returns ids unchanged."""
    if ratio == 1:
        return ids
    if ids.shape[0] and int(ids.max()) >= _ID_LIMIT // ratio:
        raise make_error(_lib.BT_ERANGE, f"block id {int(ids.max())} times {ratio} kernel "
                                        f"blocks does not fit int32")
    return (ids.reshape(-1, 1) * ratio + np.arange(ratio, dtype=I32)).reshape(-1)


class BlockTable:
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

    def __init__(self, config=None):
        self.config = config = config or BlockTableConfig()
        self.block_size = config.block_size
        self.kernel_block_size = config.kernel_block_size
        self.blocks_per_kv_block = config.blocks_per_kv_block
        self.max_num_reqs = config.max_num_reqs
        self.row_width = config.row_width
        # No pool blocks are handed out here (RAW rows), so the pool is tiny.
        self.segment = Segment.create(None, SegmentConfig(
            block_size=config.block_size, kernel_block_size=config.kernel_block_size,
            num_pools=1, blocks_per_pool=2, num_rows=config.max_num_reqs,
            row_width=self.row_width, max_clients=1, hand_size=1))
        self._client = self.segment.client()
        for row in range(config.max_num_reqs):
            self._client.claim_row(key=row, row=row, raw=True)
        self.table, self.num_blocks, self.num_tokens = (
            self.segment.table, self.segment.num_blocks, self.segment.num_tokens)
        self._params = SlotParams(block_size=config.kernel_block_size)

    def close(self):
        """Free the segment (views made from it stay valid)."""
        self.segment.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _row(self, row_idx):
        if not 0 <= row_idx < self.max_num_reqs:
            raise make_error(_lib.BT_ERANGE, f"row_idx {row_idx} not in [0, {self.max_num_reqs})")
        return row_idx

    def append_row(self, row_idx, block_ids, num_tokens=0):
        """Append KV blocks to a row and add num_tokens to its token count.
        Errors: RowFull (no room: nothing appended), OutOfRange (row, or an
        id outside [0, 2^31 / (B/K))), InvalidArgument (num_tokens < 0)."""
        ids = expand_kernel_blocks(as_array(block_ids, I32, "block_ids"), self.blocks_per_kv_block)
        if num_tokens < 0:
            raise make_error(_lib.BT_EINVAL, f"num_tokens {num_tokens} < 0")
        self._client.append(self._row(row_idx), ids)
        if num_tokens:
            self._client.set_tokens(row_idx, int(self.num_tokens[row_idx]) + num_tokens)

    def get_row(self, row_idx):
        """The row's stored ids: kernel block ids, as vLLM's table holds
        them (the KV ids themselves when K == B), read under the seqlock."""
        return self.segment.read_row(self._row(row_idx))[0]

    get_kernel_row = get_row

    def get_kv_row(self, row_idx):
        """The row's KV block ids (what append_row was given)."""
        ids = self.get_row(row_idx)
        return ids[::self.blocks_per_kv_block] // self.blocks_per_kv_block

    def clear_row(self, row_idx):
        """Empty a row (entries zeroed, token count 0); it stays usable."""
        self._client.truncate(self._row(row_idx), 0)
        self._client.set_tokens(row_idx, 0)

    def compute_slot_mapping(self, row_idx, num_tokens, start_position=0, out=None):
        """Slots (int64) of positions start_position .. +num_tokens-1 of the
        row; -1 where the row has no block. out: an int64 buffer to fill."""
        return self.segment.slots_row(self._row(row_idx), start_position, num_tokens,
                                      out, self._params)

    def update_slot_mapping(self, token_positions, out=None):
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

    def get_num_blocks(self, row_idx):
        """Entries (kernel blocks) in the row, vLLM's num_blocks_per_row."""
        return int(self.num_blocks[self._row(row_idx)])

    def get_total_blocks(self):
        """Entries (kernel blocks) held by all rows together."""
        return int(self.num_blocks.sum(dtype=np.int64))

    def get_num_tokens(self, row_idx):
        return int(self.num_tokens[self._row(row_idx)])
