"""Moved to blocktable.tables.paged (issue 12); this name still imports."""
from ._lib import count
from .tables.paged import (SparseBlockTable, block_at, default_chunk_size, paged_memory,
                           read_row)

__all__ = ["SparseBlockTable", "read_row", "paged_memory", "block_at", "default_chunk_size",
           "count"]
