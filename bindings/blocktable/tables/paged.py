"""SparseBlockTable: block tables whose memory follows the blocks in use.

Built on libbt's paged rows (BT_ROW_PAGED): a row's entries live in chunks
of `chunk_size` ids drawn from a chunk pool shared by every row of the
segment, and a row keeps only a directory of chunk indices. A row may reach a
million tokens at block size 16 (65,536 blocks) while its neighbours hold a
few blocks, and only the chunks that hold blocks cost memory. Holes (entry
0, the null block) back no token: a sliding-window layer punches the blocks
below its window and the chunks left holding only holes go back to the pool.

The seed kept a dict per row. Where it was wrong, and we differ:
  * `position` is a token position in set_block, clear_block, get_block and
    get_slot alike, as in the seed (the block is entry position //
    block_size of the row): one meaning for one word. punch takes block
    indices (start, end), as libbt's punch does.
  * Positions past a row's capacity (max_num_blocks_per_req) were accepted
    and silently grew the dict; here they raise OutOfRange (an IndexError)
    and change nothing. Negative ids raise OutOfRange.
  * to_dense cut rows longer than max_blocks silently (a request would then
    read the wrong KV); here it raises RowFull. It returns exactly max_blocks
    entries, zero past the row (the table's zero-tail invariant).

This module also holds helpers over paged rows that other modules use:
read_row, block_at, paged_memory, default_chunk_size.

Out of scope here: the GPU gather over paged rows (a device copy of the
chunk pool and directories, issue 4). Slot mapping runs in C on the CPU.

Thread safety: one writer at a time (a table is one client of its
segment); reads may run alongside nothing else writing the same row.
Errors: BtError subclasses; a call that raised changed nothing.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import error_class, make_error
from .. import _lib
from .._lib import ID_LIMIT as _ID_LIMIT, count, index_arg as _index
from .._types import I32, SegmentConfig, out_array
from .._types import I32Array, I64Array, RowInfo

if TYPE_CHECKING:
    from .._core import Segment, SlotParams
from .base import BlockTableConfig, TableBase

__all__ = ["SparseBlockTable", "read_row", "paged_memory", "block_at", "default_chunk_size"]

_ERANGE, _EINVAL = _lib.BT_ERANGE, _lib.BT_EINVAL
_InvalidArgument = error_class(_EINVAL)


# ---- helpers over paged rows (also used by v2, distributed, compress) -------------
def read_row(segment: Segment, row: int) -> tuple[I32Array, RowInfo]:
    """(ids, RowInfo): a consistent copy of a row of any length (paged rows
    too; holes read as 0): Segment.read_row, kept here for its callers."""
    return segment.read_row(row)


def paged_memory(segment: Segment, capacity: int) -> dict[str, int]:
    """Bytes of a segment's paged-row storage: the directories (fixed:
    4 bytes per chunk of capacity per row), the chunks in use (what follows
    the blocks), their sum, and the dense table of the same capacity
    (num_rows x capacity x 4) that it replaces."""
    c = segment.config
    used = c.num_chunks - segment.free_chunks()
    directory = c.num_rows * c.dir_width * 4
    chunks = used * c.chunk_size * 4
    return {"chunk_size": c.chunk_size, "chunks_in_use": used,
            "chunks_free": c.num_chunks - used, "directory_bytes": directory,
            "chunk_bytes": chunks, "total_bytes": directory + chunks,
            "dense_bytes": c.num_rows * capacity * 4}


def default_chunk_size(capacity: int) -> int:
    """64 ids (256 bytes) per chunk for long rows, 16 for short ones: a
    chunk wastes at most chunk_size - 1 entries at the end of a row, a
    directory costs 4 bytes per chunk of capacity."""
    return 64 if capacity >= 512 else 16


def block_at(segment: Segment, row: int, index: int, params: SlotParams,
             buf: I64Array | None) -> int | None:
    """The id at entry `index` of a row, None for a hole or past the row:
    one slot lookup in C (slot // B of the block's first token), where a
    read of the whole row would copy up to 256 KiB."""
    bs = params.block_size or segment.config.block_size
    slot = int(segment.slots_row(row, index * bs, 1, buf, params)[0])
    return None if slot < 0 else slot // bs


# ---- the table -------------------------------------------------------------------
class SparseBlockTable(TableBase):
    """Block tables on paged rows (the seed's SparseBlockTable, for real).

    Rows 0..max_num_reqs-1 each hold up to max_num_blocks_per_req KV-block
    ids that you allocated elsewhere (RAW rows, as in BlockTable), placed at
    any block index; unset indices are holes. Memory: a directory of
    ceil(capacity / chunk_size) words per row plus chunk_size * 4 bytes per
    chunk in use (``memory_stats()`` reports both, and the dense table's
    size for comparison).

    Args: config (BlockTableConfig: block_size, max_num_reqs,
    max_num_blocks_per_req are used; ids are KV blocks of block_size tokens,
    slots are the same in the kernel-block view), chunk_size (ids per chunk,
    default: default_chunk_size(capacity)), num_chunks (the chunk pool,
    fixed at creation; default: enough for every row to fill, which costs
    address space only: pages are touched as chunks are first used), or
    max_blocks_in_use (size the pool for that many blocks over all rows).
    """

    def __init__(self, config: BlockTableConfig | None = None, *, chunk_size: int | None = None,
                 num_chunks: int | None = None, max_blocks_in_use: int | None = None) -> None:
        self.config = config = config or BlockTableConfig()
        self.block_size = config.block_size
        self.max_num_reqs = config.max_num_reqs
        self.capacity = cap = config.max_num_blocks_per_req
        self.chunk_size = cs = chunk_size or default_chunk_size(cap)
        self.dir_width = dw = -(-cap // cs)
        if num_chunks is None:
            num_chunks = (self.max_num_reqs * dw if max_blocks_in_use is None else
                          -(-max_blocks_in_use // cs) + self.max_num_reqs)
        self.num_chunks = num_chunks
        # num_blocks (a read-only view) counts holes too.
        self._open(SegmentConfig(
            block_size=config.block_size, kernel_block_size=config.block_size,
            num_pools=1, blocks_per_pool=2, num_rows=self.max_num_reqs, row_width=1,
            max_clients=1, hand_size=1, max_mirrors=0,
            chunk_size=cs, num_chunks=num_chunks, dir_width=dw), raw=True, paged=True)
        self._one = np.empty(1, np.int64)

    # ---- argument checks ------------------------------------------------------

    def _pos(self, position: int) -> int:
        """The block index of token `position` (position // block_size)."""
        t = _index(position, "position")
        limit = self.capacity * self.block_size
        if not 0 <= t < limit:
            raise make_error(_ERANGE, f"position={t}: token position not in [0, {limit}) "
                                      f"(max_num_blocks_per_req * block_size)")
        return t // self.block_size

    # ---- entries --------------------------------------------------------------
    def set_block(self, row_idx: int, position: int, block_id: int) -> None:
        """The block backing token `position` of the row (entry position //
        block_size) := block_id. Block 0 is the null block: setting it makes a
        hole (as clear_block does).
        Errors: OutOfRange (row, position past the capacity, id < 0 or
        >= 2^31), OutOfChunks (the chunk pool is exhausted)."""
        r, p = self._row(row_idx), self._pos(position)
        b = _index(block_id, "block_id")
        if not 0 <= b < _ID_LIMIT:
            raise make_error(_ERANGE, f"block_id {b} not in [0, 2^31)")
        self._client.set_block(r, p, b)

    def clear_block(self, row_idx: int, position: int) -> None:
        """Make the block backing token `position` a hole (no error if it
        already is one)."""
        r, p = self._row(row_idx), self._pos(position)
        if p < self.num_blocks[r]:
            self._client.set_block(r, p, 0)

    def get_block(self, row_idx: int, position: int) -> int | None:
        """The block id backing token `position` (entry position //
        block_size), or None (a hole, or past the row's last block).
        Errors: OutOfRange (past the capacity in tokens)."""
        return block_at(self.segment, self._row(row_idx), self._pos(position), self._params,
                        self._one)

    def get_slot(self, row_idx: int, position: int) -> int:
        """KV slot of token `position` of the row, or -1 where no block backs
        it. Errors: OutOfRange (a negative position, or one past the row's
        capacity in tokens)."""
        r = self._row(row_idx)
        self._pos(position)
        t = _index(position, "position")
        return int(self.segment.slots_row(r, t, 1, self._one, self._params)[0])

    def compute_slot_mapping(self, row_idx: int, num_tokens: int, start_position: int = 0,
                             out: I64Array | None = None) -> I64Array:
        """Slots (int64) of tokens start_position .. +num_tokens-1 of the
        row, -1 in holes and past the row."""
        if _index(start_position, "start_position") < 0:
            raise make_error(_ERANGE, f"start_position {start_position} < 0")
        return self.segment.slots_row(self._row(row_idx), start_position,
                                      _index(num_tokens, "num_tokens"), out, self._params)

    def punch(self, row_idx: int, start: int, end: int) -> None:
        """Make holes of block indices [start, end) (a sliding window's past);
        chunks left holding only holes return to the pool.
        Errors: OutOfRange (end past the row's blocks, start > end)."""
        r = self._row(row_idx)
        s, e = _index(start, "start"), _index(end, "end")
        if not 0 <= s <= e <= self.num_blocks[r]:
            raise make_error(_ERANGE, f"punch [{s}, {e}) of a row of {int(self.num_blocks[r])} "
                                      f"blocks")
        self._client.punch(r, s, e)

    def clear_row(self, row_idx: int) -> None:
        """Empty the row; all its chunks go back to the pool."""
        r = self._row(row_idx)
        self._client.truncate(r, 0)
        self._client.set_tokens(r, 0)

    # ---- reading ----------------------------------------------------------------
    def get_num_blocks(self, row_idx: int) -> int:
        """Length of the row: its last block's index + 1 (holes included)."""
        return int(self.num_blocks[self._row(row_idx)])

    def get_row(self, row_idx: int) -> I32Array:
        """The row's entries (int32, holes 0), read under the seqlock."""
        return read_row(self.segment, self._row(row_idx))[0]

    def count_blocks(self, row_idx: int) -> int:
        """Blocks the row holds (holes not counted)."""
        return int(np.count_nonzero(self.get_row(row_idx)))

    def to_dense(self, row_idx: int, max_blocks: int, out: I32Array | None = None) -> I32Array:
        """The row as a dense table row of max_blocks entries (int32, holes
        and the tail 0). Errors: RowFull if the row is longer than
        max_blocks (a silent cut would map tokens to the wrong KV)."""
        m = _index(max_blocks, "max_blocks")
        ids = self.get_row(row_idx)
        if ids.shape[0] > m:
            raise make_error(_lib.BT_EROWFULL, f"row {row_idx} holds {ids.shape[0]} blocks, "
                                              f"max_blocks is {m}")
        out = out_array(out, m, I32)
        out[:ids.shape[0]] = ids
        out[ids.shape[0]:m] = 0
        return out[:m]

    # ---- accounting -------------------------------------------------------------
    def chunks_in_use(self) -> int:
        return self.num_chunks - self.segment.free_chunks()

    def memory_stats(self) -> dict[str, int]:
        """Bytes of the row storage (see paged_memory)."""
        return paged_memory(self.segment, self.capacity)

    def get_stats(self) -> dict[str, int]:
        s = self.memory_stats()
        s["rows_in_use"] = int(np.count_nonzero(self.num_blocks))
        return s
