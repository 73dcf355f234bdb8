"""Moved to blocktable.tables.dense (issue 12); this name still imports."""
from ._types import BlockInfo
from .strategies import BlockAllocationStrategy
from .tables.base import BlockTableConfig
from .tables.dense import BlockTable, expand_kernel_blocks

__all__ = ["BlockAllocationStrategy", "BlockTableConfig", "BlockInfo", "BlockTable"]
