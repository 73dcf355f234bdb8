"""MultiGroupBlockTable: one block table per KV-cache group (the seed's
promise, in vLLM v1's earlier signature: max_model_len, kernel_block_sizes).
vLLM 0.32's own MultiGroupBlockTable is blocktable.compat.vllm's.

Hybrid models (full attention beside sliding-window or Mamba layers) keep
one block table per KV-cache group, each with its own block size and kernel
block size. This is vLLM's MultiGroupBlockTable (vllm/v1/worker/
block_table.py) over blocktable.compat.vllm.BlockTable, one segment per
group: same constructor, methods and __getitem__.

Where vLLM differs and we don't follow it: a row operation over the groups
is all or nothing. vLLM appended group by group, so a RowFull in group 2
left groups 0 and 1 appended; here every group is checked first (lengths,
room, ids) and a failure in a later group undoes the earlier ones.

vLLM reads the context-parallel world from torch.distributed; here it is
given (dcp_world_size, dcp_rank, pcp_world_size, pcp_rank keywords), and it
divides max_model_len over the ranks as vLLM does.

The GPU paths (commit_* copies, device tensors) are compat.vllm.BlockTable's.
Thread safety: one thread at a time. Errors: BtError subclasses (RowFull,
OutOfRange, InvalidArgument, ConfigError); a call that raised changed nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .._errors import make_error
from .. import _lib
from .._lib import ID_LIMIT as _ID_LIMIT, count
from .._types import I32, as_array
from ..compat.vllm import BlockTable
from .._types import I32Array, IntsLike

if TYPE_CHECKING:
    import torch

__all__ = ["MultiGroupBlockTable"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class MultiGroupBlockTable:
    """The BlockTables for each KV-cache group.

    Args (vLLM's): max_num_reqs, max_model_len, max_num_batched_tokens,
    pin_memory, device, block_sizes (one per group), kernel_block_sizes (one
    per group, each dividing its block size), num_speculative_tokens,
    cp_kv_cache_interleave_size. Group i's rows hold
    max(cdiv(max_model_len, block_sizes[i] * cp_world), 1 +
    num_speculative_tokens) KV blocks.
    """

    def __init__(self, max_num_reqs: int, max_model_len: int, max_num_batched_tokens: int,
                 pin_memory: bool, device: str | torch.device, block_sizes: Sequence[int],
                 kernel_block_sizes: Sequence[int], num_speculative_tokens: int = 0,
                 cp_kv_cache_interleave_size: int = 1, *, dcp_world_size: int = 1,
                 dcp_rank: int = 0, pcp_world_size: int = 1, pcp_rank: int = 0) -> None:
        block_sizes, kernel_block_sizes = list(block_sizes), list(kernel_block_sizes)
        if len(kernel_block_sizes) != len(block_sizes):
            raise make_error(_lib.BT_ECONFIG, f"kernel_block_sizes length "
                                             f"({len(kernel_block_sizes)}) must match "
                                             f"block_sizes length ({len(block_sizes)})")
        if not block_sizes:
            raise make_error(_lib.BT_ECONFIG, "at least one KV-cache group is needed")
        cp_world = dcp_world_size * pcp_world_size
        self.block_tables = []
        for bs, kbs in zip(block_sizes, kernel_block_sizes):
            if bs < 1 or kbs < 1:
                raise make_error(_lib.BT_ECONFIG, f"block size {bs} / kernel block size {kbs} "
                                                 "must be positive")
            width = max(_cdiv(max_model_len, bs * cp_world), 1 + num_speculative_tokens)
            self.block_tables.append(BlockTable(
                bs, max_num_reqs, width, max_num_batched_tokens, pin_memory, device,
                cp_kv_cache_interleave_size, kernel_block_size=kbs,
                dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
                pcp_world_size=pcp_world_size, pcp_rank=pcp_rank))
        self.block_sizes, self.kernel_block_sizes = block_sizes, kernel_block_sizes
        self.max_num_reqs = max_num_reqs

    def __getitem__(self, idx: int) -> BlockTable:
        return self.block_tables[idx]

    def __len__(self) -> int:
        return len(self.block_tables)

    # ---- checks shared by the row operations --------------------------------
    def _groups(self, block_ids: Sequence[IntsLike]) -> list[I32Array]:
        if len(block_ids) != len(self.block_tables):
            raise make_error(_lib.BT_EINVAL, f"{len(block_ids)} id lists for "
                                            f"{len(self.block_tables)} KV-cache groups")
        out = []
        for g, (t, ids) in enumerate(zip(self.block_tables, block_ids)):
            a = as_array(ids, I32, f"block_ids[{g}]")
            if a.shape[0] and (int(a.min()) < 0 or
                               int(a.max()) >= _ID_LIMIT // t.blocks_per_kv_block):
                bad = int(a.min()) if int(a.min()) < 0 else int(a.max())
                raise make_error(_lib.BT_ERANGE, f"group {g}: block id {bad} out of range")
            out.append(a)
        return out

    def _row(self, row_idx: int) -> int:
        row_idx = count(row_idx, "row_idx")
        if row_idx >= self.max_num_reqs:
            raise make_error(_lib.BT_ERANGE, f"row_idx {row_idx} not in [0, {self.max_num_reqs})")
        return row_idx

    def _every_group(self, ids, save, apply, undo):
        """apply(t, ids[g]) to every group's table t, or to none: if one fails, the
        groups already done get undo(t, what save(t) returned before apply)."""
        done = []
        try:
            for t, a in zip(self.block_tables, ids):
                kept = save(t)
                apply(t, a)
                done.append((t, kept))
        except BaseException:
            for t, kept in done:
                undo(t, kept)
            raise

    # ---- rows -------------------------------------------------------------------
    def append_row(self, block_ids: Sequence[IntsLike], row_idx: int) -> None:
        """Append block_ids[g] to row row_idx of group g, for every group, or
        to none (RowFull, OutOfRange)."""
        ids, r = self._groups(block_ids), self._row(row_idx)
        for g, (t, a) in enumerate(zip(self.block_tables, ids)):
            have = int(t.num_blocks_per_row[r])
            if have + a.shape[0] * t.blocks_per_kv_block > t.max_num_blocks_per_req:
                raise make_error(_lib.BT_EROWFULL, f"group {g}: row {r} holds "
                                                  f"{have // t.blocks_per_kv_block} blocks, "
                                                  f"{a.shape[0]} more do not fit")
        self._every_group(ids, lambda t: int(t.num_blocks_per_row[r]),
                          lambda t, a: t.append_row(a, r),
                          lambda t, keep: t._client.truncate(r, keep))

    def add_row(self, block_ids: Sequence[IntsLike], row_idx: int) -> None:
        """Replace row row_idx of every group (vLLM's add_row), or none."""
        ids, r = self._groups(block_ids), self._row(row_idx)
        for g, (t, a) in enumerate(zip(self.block_tables, ids)):
            width = t.max_num_blocks_per_req // t.blocks_per_kv_block
            if a.shape[0] > width:
                raise make_error(_lib.BT_EROWFULL, f"group {g}: {a.shape[0]} blocks do not fit "
                                                  f"a row of {width}")
        self._every_group(ids, lambda t: t.segment.read_row(r)[0].copy(),
                          lambda t, a: t.add_row(a, r),
                          lambda t, old: t._client.set_row(r, old))

    def clear_row(self, row_idx: int) -> None:
        r = self._row(row_idx)
        for t in self.block_tables:
            t.clear_row(r)

    def move_row(self, src: int, tgt: int) -> None:
        self._row(src), self._row(tgt)
        for t in self.block_tables:
            t.move_row(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        self._row(src), self._row(tgt)
        for t in self.block_tables:
            t.swap_row(src, tgt)

    def clear(self) -> None:
        """Empty every row of every group (entries and counts). compat.vllm's
        clear() follows vLLM 0.32 and keeps the counts; this API empties."""
        for t in self.block_tables:
            t.clear()
            for r in np.flatnonzero(t.num_blocks_per_row):
                t.clear_row(int(r))

    # ---- slot mapping and the GPU copies ------------------------------------------
    def compute_slot_mapping(self, req_indices: IntsLike, positions: IntsLike) -> None:
        """Each group's slot_mapping.np[:n] for the tokens (row
        req_indices[i], position positions[i]); checked once for all groups."""
        r = as_array(req_indices, I32, "req_indices")
        p = np.asarray(positions)
        if r.shape[0] and (int(r.min()) < 0 or int(r.max()) >= self.max_num_reqs):
            raise make_error(_lib.BT_ERANGE, f"req_indices outside [0, {self.max_num_reqs})")
        for t in self.block_tables:
            t.compute_slot_mapping_tokens(r, p)

    def commit_block_table(self, num_reqs: int) -> None:
        for t in self.block_tables:
            t.commit_block_table(num_reqs)

    def commit_slot_mapping(self, num_tokens: int) -> None:
        for t in self.block_tables:
            t.commit_slot_mapping(num_tokens)

    def close(self) -> None:
        for t in self.block_tables:
            t.segment.close()

    def __enter__(self) -> MultiGroupBlockTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
