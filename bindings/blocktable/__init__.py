"""blocktable: KV-cache block tables in shared memory.

Layers (after pyca/cryptography and pynacl):
  blocktable._ffi    the raw CFFI module (ffi, lib) over libbt
  blocktable._errors BtError and one subclass per libbt result code
  blocktable._core   Segment and Client, the handles people use
  blocktable.table   the seed's API (BlockTable, BlockTableConfig, ...)
  blocktable.cache   CachePool: vLLM's BlockPool and prefix cache in the segment
  blocktable.compat  adapters with other engines' signatures (vLLM v1)
  blocktable.connect registration with the daemon btd (connect())
  blocktable.sparse, .strategies, .predictive, .distributed, .v2, .factory,
  .multigroup, .compress: the rest of the seed's promises, for real
  blocktable.gpu     CUDA IPC mirrors, sync, kernels (imported on demand)
"""
from ._version import __version__
from ._ffi import BUILD_ID, ffi, lib
from ._errors import BtError, BtOSError, CODES, error_class
from ._errors import *  # noqa: F401,F403 - one class per code
from . import _errors as errors
from ._types import (BlockInfo, CheckReport, ClientSlotInfo, RowInfo,
                     SegmentConfig, SegmentInfo)
from ._core import ROW_MANAGED, ROW_PAGED, ROW_RAW, Client, Segment, SlotParams, StepPlan
from .cache import CachePool
from .table import (BlockAllocationStrategy, BlockTable, BlockTableConfig)
from .connect import DaemonError, DaemonNotRunning, connect
from .sparse import SparseBlockTable
from .strategies import (BlockSource, ContiguousAllocator, NumaAwareAllocator,
                         ScatteredAllocator, UnknownRequest, make_allocator)
from .predictive import PredictiveBlockAllocator
from .distributed import DistributedBlockTable
from .v2 import BlockTableV2
from .factory import BlockTableFactory
from .multigroup import MultiGroupBlockTable
from .compress import RunLengthSlots, compress_row, compress_rows, compress_slots
from .gather import RowGather  # also installs Segment.find_row / Segment.gather_rows

__all__ = [
    "__version__", "BUILD_ID", "ffi", "lib", "errors",
    "BtError", "BtOSError", "CODES", "error_class", *errors.__all__,
    "Segment", "Client", "CachePool", "StepPlan", "SlotParams", "SegmentConfig", "SegmentInfo", "RowInfo",
    "CheckReport", "ClientSlotInfo", "ROW_MANAGED", "ROW_RAW", "ROW_PAGED",
    "BlockAllocationStrategy", "BlockTableConfig", "BlockInfo", "BlockTable",
    "connect", "DaemonError", "DaemonNotRunning",
    "SparseBlockTable", "PredictiveBlockAllocator", "DistributedBlockTable", "BlockTableV2",
    "BlockTableFactory", "MultiGroupBlockTable", "BlockSource", "ScatteredAllocator",
    "ContiguousAllocator", "NumaAwareAllocator", "make_allocator", "UnknownRequest",
    "RunLengthSlots", "compress_slots", "compress_row", "compress_rows",
    "RowGather",
]
__all__ = list(dict.fromkeys(__all__))
