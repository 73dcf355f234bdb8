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

The public signatures carry type annotations (PEP 561: the package ships
py.typed); the array types are numpy.typing.NDArray of the C type
(blocktable._types: I32Array, I64Array, U32Array, U64Array, IntsLike).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import BtError, BtOSError, error_class
from ._errors import *  # noqa: F401,F403 - one class per code
from . import _errors as errors
from ._types import (BlockInfo, CheckReport, ClientSlotInfo, RowInfo,
                     SegmentConfig, SegmentInfo)
from ._core import BtTypeError, Client, Segment, SlotParams, StepPlan
from . import _core, _ffi, _version
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

# The constants, re-bound here so that each has a documented place (pdoc reads
# a string literal after an assignment in this module; help() shows this module's).
__version__: str = _version.__version__
"""The package version (PEP 440), e.g. "0.1.0"; the compiled extension must
carry the same (see BUILD_ID)."""
BUILD_ID: str = _ffi.BUILD_ID
"""The build id compiled into the extension blocktable._bt: the package
version, then "+" and a digest of libbt's sources and bt.h. The import refuses
an extension whose version differs (and, in a source checkout, whose digest
does)."""
ffi: Any = _ffi.ffi
"""The CFFI FFI object of libbt (cffi.FFI): ffi.new, ffi.cast, ffi.string,
ffi.from_buffer for code that calls ``lib`` directly."""
lib: Any = _ffi.lib
"""The compiled libbt (the CFFI lib): every bt_* function and BT_* constant of
bt.h. Calls return 0 or a negative code (see CODES); nothing is checked for
you: prefer Segment and Client, which raise BtError."""
CODES: dict[int, type[BtError]] = errors.CODES  # type: ignore[no-redef]  # (the star import's)
"""Result code (a negative int: BT_E* of bt.h, or -errno) -> the BtError
subclass raised for it. Holds every library code; an OS code is added the
first time it is seen (error_class(code) looks a code up, adding it)."""
ROW_MANAGED: int = _core.ROW_MANAGED
"""Row flag BT_ROW_MANAGED (0): the row's entries are references to the
segment's blocks, counted by libbt (Client.claim_row's default)."""
ROW_RAW: int = _core.ROW_RAW
"""Row flag BT_ROW_RAW: the entries are ids the caller manages (libbt keeps no
reference counts for them): ``claim_row(raw=True)``."""
ROW_PAGED: int = _core.ROW_PAGED
"""Row flag BT_ROW_PAGED: the entries live in chunks of the segment's chunk
pool, so a row may hold holes and grow past row_width: ``claim_row(paged=True)``."""

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


if TYPE_CHECKING:
    # A type checker sees CpuGpuBuffer directly, and no module __getattr__ (which
    # would make every misspelt blocktable.X pass as Any).
    from .gpu.buffer import CpuGpuBuffer
else:
    def __getattr__(name: str) -> Any:
        """blocktable.CpuGpuBuffer: vLLM's CpuGpuBuffer(*size, dtype, device,
        pin_memory, with_numpy) (also the seed's CpuGpuBuffer(shape, dtype)),
        from blocktable.gpu.buffer; imported on first use so that importing
        blocktable pulls in no GPU code."""
        if name == "CpuGpuBuffer":
            from .gpu.buffer import CpuGpuBuffer
            globals()["CpuGpuBuffer"] = CpuGpuBuffer
            return CpuGpuBuffer
        raise AttributeError(f"module 'blocktable' has no attribute {name!r}")
