"""vLLM v1's worker BlockTable (vllm/v1/worker/block_table.py) on libbt.

Same constructor, methods and attributes (block_table / slot_mapping buffers
with .np/.cpu/.gpu, num_blocks_per_row, map_to_kernel_blocks), so a vLLM
model runner can use it unchanged. The table lives in a blocktable segment
(embedded: a private mapping) instead of a torch CPU tensor; get_cpu_tensor()
and get_numpy_array() are zero-copy views of it.

Where vLLM differs and we don't follow it:
  * move_row: vLLM (at the version matched) left the source row stale; here
    the source row ends zeroed, with its count 0.
  * append_row past the row width: vLLM bumped num_blocks_per_row and then
    failed in numpy (count and table disagreeing); here RowFull, nothing
    changes. Ids outside [0, 2^31) raise OutOfRange.
  * Entries past a row's count are always 0 (add_row/clear_row/move_row
    leave no stale tail), and positions past a row's blocks map to slot -1
    instead of whatever the stale or null entry gave.
  * clear() also resets num_blocks_per_row (vLLM zeroed only the table).

On a CUDA device with cupy present, the device table is a GPU mirror of
the segment (blocktable.gpu.MirrorExporter, on that device):
commit_block_table(n) syncs rows [0, n) on torch's current stream, moving
only the entries that changed since the last sync (vLLM copies the n rows
whole), and get_device_tensor(num_reqs) / block_table.gpu are zero-copy
torch views of the mirror; ``mirror`` is the exporter (its slot mapping and
gather kernels read the same copy). Without cupy, CUDA tensors are plain
copies as in vLLM.

torch is optional: only the tensor methods (get_cpu_tensor,
get_device_tensor, the .cpu/.gpu attributes, commit_*) import it. Without a
GPU (or with device "cpu") the "device" tensor is the CPU tensor itself,
zero copy, and the commit_* calls are no-ops.

Thread safety: like vLLM's, one thread at a time. Errors: BtError
subclasses (RowFull, OutOfRange, InvalidArgument, ...); a call that raised
changed nothing.
"""
import numpy as np

from .._core import SlotParams, Segment
from .._errors import make_error
from .._ffi import ffi, lib
from .._types import I32, I64, SegmentConfig, as_array, c_array

__all__ = ["BlockTable", "CpuGpuBuffer"]

_ID_LIMIT = 2**31


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test extra
        raise ImportError("blocktable.compat.vllm: the tensor methods need torch") from e
    return torch


def _device(device):
    """The torch device to mirror to, or None to stay on the CPU (device
    "cpu", or CUDA asked for where there is none)."""
    torch = _torch()
    d = torch.device(device) if device is not None else torch.device("cpu")
    if d.type == "cpu":
        return None
    if d.type == "cuda" and not torch.cuda.is_available():
        return None
    return d


def _mirror_for(segment, device):
    """A MirrorExporter of `segment` on CUDA device `device`, or None where
    there is no GPU mirror to be had (CPU, no CUDA, no cupy)."""
    dev = _device(device)
    if dev is None or dev.type != "cuda":
        return None
    from .. import gpu
    ok, _ = gpu.gpu_available()
    if not ok:
        return None
    index = dev.index if dev.index is not None else _torch().cuda.current_device()
    return gpu.MirrorExporter(segment, index)


class CpuGpuBuffer:
    """vLLM's CpuGpuBuffer over memory we own: ``np`` (numpy), ``cpu`` (a
    torch view of the same memory) and ``gpu`` (a device copy, or ``cpu``
    itself when there is no device). torch is imported on first use. With
    ``mirror`` (a blocktable.gpu mirror of the segment that ``np`` views),
    ``gpu`` is the mirror's torch view and copy_to_gpu(n) syncs rows [0, n)."""

    def __init__(self, np_view, np_writable, device, pin_memory=False, mirror=None):
        self.np = np_view
        self._writable = np_writable
        self._device = device
        self._pin = pin_memory
        self._mirror = mirror
        self._cpu = self._gpu = None

    @property
    def cpu(self):
        if self._cpu is None:
            self._cpu = _torch().from_numpy(self._writable)
        return self._cpu

    @property
    def gpu(self):
        if self._mirror is not None:
            return self._mirror.tensor()
        if self._gpu is None:
            dev = _device(self._device)
            self._gpu = self.cpu if dev is None else _torch().zeros_like(self.cpu, device=dev)
        return self._gpu

    def copy_to_gpu(self, n=None):
        if self._mirror is not None:
            self._mirror.sync(num_rows=n)
            return self._mirror.tensor(n)
        gpu = self.gpu
        if gpu is not self._cpu:
            gpu[:n].copy_(self.cpu[:n], non_blocking=True)
        return gpu[:n]


class BlockTable:
    """vLLM v1's BlockTable on a blocktable segment.

    Args (vLLM's): block_size (KV-manager block size B), max_num_reqs,
    max_num_blocks_per_req (in B blocks), max_num_batched_tokens, pin_memory,
    device, kernel_block_size (K, divides B; default B),
    cp_kv_cache_interleave_size. vLLM reads the context-parallel group from
    torch.distributed; here it is given: dcp_world_size, dcp_rank,
    pcp_world_size, pcp_rank (keyword only, default 1/0: no parallelism).
    """

    def __init__(self, block_size, max_num_reqs, max_num_blocks_per_req,
                 max_num_batched_tokens, pin_memory=False, device="cpu",
                 kernel_block_size=None, cp_kv_cache_interleave_size=1, *,
                 dcp_world_size=1, dcp_rank=0, pcp_world_size=1, pcp_rank=0):
        kernel_block_size = kernel_block_size or block_size
        if block_size % kernel_block_size:
            raise make_error(lib.BT_ECONFIG, f"kernel_block_size {kernel_block_size} must "
                                             f"divide kv_manager_block_size {block_size}")
        self.max_num_reqs = max_num_reqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pin_memory = pin_memory
        self.device = device
        self.use_hybrid_blocks = kernel_block_size != block_size
        self.block_size = kernel_block_size  # the unit of the stored ids
        self.blocks_per_kv_block = block_size // kernel_block_size
        self.max_num_blocks_per_req = max_num_blocks_per_req * self.blocks_per_kv_block
        self._kernel_block_arange = (np.arange(self.blocks_per_kv_block, dtype=I32).reshape(1, -1)
                                     if self.use_hybrid_blocks else None)
        self._open_segment(block_size, kernel_block_size)
        self.pcp_world_size, self.pcp_rank = pcp_world_size, pcp_rank
        self.dcp_world_size, self.dcp_rank = dcp_world_size, dcp_rank
        self.cp_kv_cache_interleave_size = cp_kv_cache_interleave_size
        self._params = SlotParams(block_size=kernel_block_size,
                                  cp_world=pcp_world_size * dcp_world_size,
                                  cp_rank=pcp_rank * dcp_world_size + dcp_rank,
                                  cp_interleave=cp_kv_cache_interleave_size)
        # libbt checks the parameters on every call: check them once now.
        self.segment.slots_req(np.empty(0, I32), np.empty(0, I64), params=self._params)
        slots = np.zeros(max_num_batched_tokens, I64)
        self._slot_buf = ffi.from_buffer("int64_t[]", slots)
        self.slot_mapping = CpuGpuBuffer(slots, slots, device, pin_memory)

    def _open_segment(self, block_size, kernel_block_size):
        # RAW rows hold vLLM's own block ids: the segment's pool is unused.
        self.segment = Segment.create(None, SegmentConfig(
            block_size=block_size, kernel_block_size=kernel_block_size, num_pools=1,
            blocks_per_pool=2, num_rows=self.max_num_reqs,
            row_width=self.max_num_blocks_per_req, max_clients=1, hand_size=1))
        self._client = self.segment.client()
        for row in range(self.max_num_reqs):
            self._client.claim_row(key=row, row=row, raw=True)
        table_w, _, _ = self.segment.views(writable=True)
        self.mirror = _mirror_for(self.segment, self.device)
        self.block_table = CpuGpuBuffer(self.segment.table, table_w, self.device,
                                        self.pin_memory, self.mirror)
        self.num_blocks_per_row = self.segment.num_blocks
        self._seg = self.segment._seg

    # ---- rows ---------------------------------------------------------------
    def append_row(self, block_ids, row_idx):
        if len(block_ids) == 0:
            return
        ids = as_array(block_ids, I32, "block_ids")
        if self.use_hybrid_blocks:
            if int(ids.max()) >= _ID_LIMIT // self.blocks_per_kv_block:
                raise make_error(lib.BT_ERANGE, f"block id {int(ids.max())} does not fit "
                                                f"int32 as kernel blocks")
            ids = self.map_to_kernel_blocks(ids, self.blocks_per_kv_block,
                                            self._kernel_block_arange)
        self._client.append(row_idx, ids)

    def add_row(self, block_ids, row_idx):
        ids = as_array(block_ids, I32, "block_ids")
        if self.use_hybrid_blocks and ids.shape[0]:
            if int(ids.max()) >= _ID_LIMIT // self.blocks_per_kv_block:
                raise make_error(lib.BT_ERANGE, f"block id {int(ids.max())} does not fit "
                                                f"int32 as kernel blocks")
            ids = self.map_to_kernel_blocks(ids, self.blocks_per_kv_block,
                                            self._kernel_block_arange)
        self._client.set_row(row_idx, ids)

    def clear_row(self, row_idx):
        self._client.truncate(row_idx, 0)

    def move_row(self, src, tgt):
        """tgt gets src's blocks; src ends empty and zeroed (vLLM left it stale)."""
        self._client.move(src, tgt)

    def swap_row(self, src, tgt):
        self._client.swap(src, tgt)

    def clear(self):
        """Empty every row (entries and counts) and the device copy."""
        for row in range(self.max_num_reqs):
            if self.num_blocks_per_row[row]:
                self._client.truncate(row, 0)
        if self.mirror is not None:
            self.mirror.sync()               # the emptied rows (and counts) land
            return
        gpu = self.block_table._gpu
        if gpu is not None and gpu is not self.block_table._cpu:
            gpu.fill_(0)

    # ---- slot mapping -------------------------------------------------------
    def compute_slot_mapping(self, req_indices, positions):
        """slot_mapping.np[:n] = the slots of token i at positions[i] of row
        req_indices[i] (-1 where no block backs it, or, with context
        parallelism, where the token is another rank's)."""
        rb, nr = c_array(req_indices, I32, "int32_t[]", "req_indices")
        pb, n = c_array(positions, I64, "int64_t[]", "positions")
        if nr != n or n > self.max_num_batched_tokens:
            raise make_error(lib.BT_EINVAL, f"{nr} req_indices, {n} positions, "
                                            f"max_num_batched_tokens {self.max_num_batched_tokens}")
        rc = lib.bt_slots_req(self._seg, self._params.c, rb, pb, n, self._slot_buf)
        if rc:
            raise make_error(rc, f"compute_slot_mapping(n={n})")

    def commit_block_table(self, num_reqs):
        """Bring the device table's rows [0, num_reqs) up to date (a GPU
        mirror: only what changed moves), on torch's current stream."""
        self.block_table.copy_to_gpu(num_reqs)

    def commit_slot_mapping(self, num_tokens):
        self.slot_mapping.copy_to_gpu(num_tokens)

    # ---- views ----------------------------------------------------------------
    @staticmethod
    def map_to_kernel_blocks(kv_manager_block_ids, blocks_per_kv_block, kernel_block_arange):
        """KV-manager block ids -> kernel block ids (b -> b*ratio + j)."""
        if blocks_per_kv_block == 1:
            return kv_manager_block_ids
        ids = np.asarray(kv_manager_block_ids)
        return (ids.reshape(-1, 1) * blocks_per_kv_block + kernel_block_arange).reshape(-1)

    def get_device_tensor(self, num_reqs=None):
        """The device table ([:num_reqs]): the GPU mirror's torch view (zero
        copy) where there is one; the CPU tensor when there is no GPU."""
        return self.block_table.gpu[:num_reqs]

    def close(self):
        """Retire the GPU mirror (if any) and free its device memory. The
        table stays usable on the CPU; idempotent."""
        m, self.mirror = self.mirror, None
        if m is not None:
            self.block_table._mirror = None
            m.close()

    def get_cpu_tensor(self):
        """torch view of the shared table (zero copy; write through the methods)."""
        return self.block_table.cpu

    def get_numpy_array(self):
        """Read-only numpy view of the shared table (zero copy)."""
        return self.block_table.np

    # Older vLLM v1 spelled the buffers as attributes.
    @property
    def block_table_np(self):
        return self.block_table.np

    @property
    def block_table_cpu(self):
        return self.block_table.cpu

    @property
    def slot_mapping_np(self):
        return self.slot_mapping.np

    @property
    def slot_mapping_cpu(self):
        return self.slot_mapping.cpu
