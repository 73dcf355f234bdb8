"""Moved to blocktable.tables.distributed (issue 12); this name still imports."""
from .tables.distributed import DistributedBlockTable

__all__ = ["DistributedBlockTable"]
