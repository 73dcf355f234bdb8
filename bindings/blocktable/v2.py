"""Moved to blocktable.tables.owned (issue 12); this name still imports."""
from .tables.owned import BlockTableV2

__all__ = ["BlockTableV2"]
