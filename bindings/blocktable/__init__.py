"""blocktable: KV-cache block tables in shared memory.

Layers (after pyca/cryptography and pynacl):
  blocktable._ffi    the raw CFFI module (ffi, lib) over libbt, refusing a stale build
  blocktable._errors BtError and one subclass per libbt result code
  blocktable._lib    the one door to C: every bt.h call, the guard, conversions, errors
  blocktable._core   Segment, Client and StepPlan, the handles people use
  blocktable.tables  the seed's tables on one base: dense, paged, owned, distributed,
                     multigroup, factory
  blocktable.cache   CachePool: vLLM's BlockPool and prefix cache in the segment
  blocktable.compat  adapters with other engines' signatures (vLLM v1)
  blocktable.connect registration with the daemon btd (connect())
  blocktable.strategies  allocation strategies: the enum, BlockSource, each strategy
  blocktable.compress run-length slot mappings
  (blocktable.table, .sparse, .v2, .distributed, .factory, .multigroup, .predictive:
  old names, still importable)
  blocktable.gpu     CUDA IPC mirrors, sync, kernels (imported on demand)
"""
from ._version import __version__
from ._ffi import BUILD_ID, ffi, lib
from ._errors import BtError, BtOSError, CODES, error_class
from ._errors import *  # noqa: F401,F403 - one class per code
from . import _errors as errors
from ._types import (BlockInfo, CheckReport, ClientSlotInfo, RowInfo,
                     SegmentConfig, SegmentInfo)
from ._core import (ROW_MANAGED, ROW_PAGED, ROW_RAW, BtTypeError, Client, Segment, SlotParams,
                    StepPlan)
from .cache import CachePool
from .tables import (BlockTable, BlockTableConfig, BlockTableFactory, BlockTableV2,
                     DistributedBlockTable, SparseBlockTable)
from .connect import DaemonDisconnected, DaemonError, DaemonNotRunning, connect
from .strategies import (BlockAllocationStrategy, BlockSource, ContiguousAllocator,
                         NumaAwareAllocator, PredictiveBlockAllocator, ScatteredAllocator,
                         UnknownRequest, make_allocator)
from .tables.multigroup import MultiGroupBlockTable
from .compress import RunLengthSlots, compress_row, compress_rows, compress_slots
from .gather import RowGather

__all__ = [
    "__version__", "BUILD_ID", "ffi", "lib", "errors",
    "BtError", "BtOSError", "BtTypeError", "CODES", "error_class", *errors.__all__,
    "Segment", "Client", "CachePool", "StepPlan", "SlotParams", "SegmentConfig", "SegmentInfo", "RowInfo",
    "CheckReport", "ClientSlotInfo", "ROW_MANAGED", "ROW_RAW", "ROW_PAGED",
    "BlockAllocationStrategy", "BlockTableConfig", "BlockInfo", "BlockTable",
    "connect", "DaemonDisconnected", "DaemonError", "DaemonNotRunning",
    "SparseBlockTable", "PredictiveBlockAllocator", "DistributedBlockTable", "BlockTableV2",
    "BlockTableFactory", "MultiGroupBlockTable", "BlockSource", "ScatteredAllocator",
    "ContiguousAllocator", "NumaAwareAllocator", "make_allocator", "UnknownRequest",
    "RunLengthSlots", "compress_slots", "compress_row", "compress_rows", "CpuGpuBuffer",
    "RowGather",
]
__all__ = list(dict.fromkeys(__all__))


def __getattr__(name):
    """blocktable.CpuGpuBuffer: vLLM's CpuGpuBuffer(*size, dtype, device,
    pin_memory, with_numpy) (also the seed's CpuGpuBuffer(shape, dtype)),
    from blocktable.gpu.buffer; imported on first use so that importing
    blocktable pulls in no GPU code."""
    if name == "CpuGpuBuffer":
        from .gpu.buffer import CpuGpuBuffer
        globals()["CpuGpuBuffer"] = CpuGpuBuffer
        return CpuGpuBuffer
    raise AttributeError(f"module 'blocktable' has no attribute {name!r}")
