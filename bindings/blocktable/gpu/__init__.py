"""blocktable.gpu: the segment's tables on the GPU.

  mirror.py   MirrorExporter / Mirror: a device copy of the table and counts
              per GPU, published in the segment and opened by any process
              through CUDA IPC; zero-copy CuPy arrays and torch tensors
  sync.py     sync(stream): stage what changed (libbt), move only that
  pinned.py   cudaHostRegister of this process's mapping of a segment
  kernels.py  CuPy RawKernels: scatter, slot mapping (bit-identical to
              libbt's bt_slots_*), batch gather of rows into a dense table
  buffer.py   CpuGpuBuffer (the seed's and vLLM's), on the same machinery

Importing this package needs neither cupy nor a GPU; the first call that
does raises GpuUnavailable with the reason (``gpu_available()`` asks first).
"""
from ._cuda import (GpuUnavailable, MirrorGone, MirrorNotFound, device_uuid,
                    gpu_available)
from .buffer import CpuGpuBuffer
from .kernels import SlotKernelParams
from .mirror import Mirror, MirrorExporter, MirrorInfo, SlotMapper, export, list_mirrors
from .pinned import register_segment
from .sync import DEFAULT_MODE, MODES

__all__ = ["GpuUnavailable", "MirrorGone", "MirrorNotFound", "gpu_available", "device_uuid",
           "Mirror", "MirrorExporter", "MirrorInfo", "SlotMapper", "export", "list_mirrors",
           "CpuGpuBuffer", "SlotKernelParams", "register_segment", "MODES", "DEFAULT_MODE"]
