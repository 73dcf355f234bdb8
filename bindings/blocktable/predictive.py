"""PredictiveBlockAllocator lives in blocktable.strategies with the other
strategies (issue 12); this name stays importable from here."""
from .strategies import PredictiveBlockAllocator, UnknownRequest

__all__ = ["PredictiveBlockAllocator", "UnknownRequest"]
