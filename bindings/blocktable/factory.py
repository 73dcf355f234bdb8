"""Moved to blocktable.tables.factory (issue 12); this name still imports."""
from .tables.factory import BlockTableFactory

__all__ = ["BlockTableFactory"]
