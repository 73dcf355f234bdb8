"""Moved to blocktable.tables.multigroup (issue 12); this name still imports."""
from .tables.multigroup import MultiGroupBlockTable

__all__ = ["MultiGroupBlockTable"]
