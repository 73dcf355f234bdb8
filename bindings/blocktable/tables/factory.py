"""BlockTableFactory: the seed's three constructors, with the seed's defaults.

  create_standard(block_size=16, max_num_reqs=256, max_blocks_per_req=128)
      -> BlockTable (tables/dense.py): rows of ids you allocate elsewhere.
  create_sparse(block_size=16)
      -> SparseBlockTable (tables/paged.py): paged rows, memory follows use.
  create_v2(block_size=16, use_sparse=False, use_prediction=True)
      -> BlockTableV2 (tables/owned.py): a table that owns its blocks.

Every table made here lives in an embedded segment (a private mapping): it
works with nothing else running, no daemon. The other BlockTableConfig
fields keep their defaults, except kernel_block_size, which follows
block_size (the seed's default of 16 would refuse a block size of 8).
Keyword arguments beyond the seed's go to the table's constructor.
"""
from __future__ import annotations

from typing import Any

from .base import BlockTableConfig
from .dense import BlockTable
from .owned import BlockTableV2
from .paged import SparseBlockTable

__all__ = ["BlockTableFactory"]


class BlockTableFactory:
    """Factory for block tables (the seed's names and defaults)."""

    @staticmethod
    def create_standard(block_size: int = 16, max_num_reqs: int = 256,
                        max_blocks_per_req: int = 128) -> BlockTable:
        return BlockTable(BlockTableConfig(block_size=block_size, kernel_block_size=block_size,
                                           max_num_reqs=max_num_reqs,
                                           max_num_blocks_per_req=max_blocks_per_req))

    @staticmethod
    def create_sparse(block_size: int = 16, **kw: Any) -> SparseBlockTable:
        return SparseBlockTable(BlockTableConfig(block_size=block_size,
                                                 kernel_block_size=block_size), **kw)

    @staticmethod
    def create_v2(block_size: int = 16, use_sparse: bool = False, use_prediction: bool = True,
                  **kw: Any) -> BlockTableV2:
        return BlockTableV2(BlockTableConfig(block_size=block_size, kernel_block_size=block_size),
                            use_sparse=use_sparse, use_prediction=use_prediction, **kw)
