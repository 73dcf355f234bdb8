"""The seed API's block tables, on one shared base (tables/base.py):

  base.py         BlockTableConfig; TableBase, the life cycle every table shares
                  (its segment and client, close, with-block, row lookup)
  dense.py        BlockTable: dense rows of ids allocated elsewhere (RAW)
  paged.py        SparseBlockTable: paged rows, memory follows use; paged-row helpers
  owned.py        BlockTableV2: a table that owns its blocks (MANAGED rows, a strategy)
  distributed.py  DistributedBlockTable: one pool per worker in one shared segment
  factory.py      BlockTableFactory: the seed's three constructors
  multigroup.py   MultiGroupBlockTable, one table per KV-cache group (vLLM v1's earlier
                  signature, all or nothing); imported on first use (it needs compat.vllm)

vLLM's own BlockTable and MultiGroupBlockTable are in blocktable.compat.vllm.
The old module names (blocktable.table, .sparse, .v2, .distributed,
.factory) still import.
"""
from .base import BlockTableConfig, TableBase
from .dense import BlockTable, expand_kernel_blocks
from .distributed import DistributedBlockTable
from .factory import BlockTableFactory
from .owned import BlockTableV2
from .paged import SparseBlockTable, block_at, default_chunk_size, paged_memory, read_row

__all__ = ["BlockTableConfig", "TableBase", "BlockTable", "SparseBlockTable", "BlockTableV2",
           "DistributedBlockTable", "BlockTableFactory", "expand_kernel_blocks", "read_row",
           "block_at", "paged_memory", "default_chunk_size"]
