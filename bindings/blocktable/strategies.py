"""Allocation strategies (the seed's BlockAllocationStrategy, each one real).

Every strategy is a BlockSource: allocate(request_id, num_blocks) hands out
loose references held by one client (the caller appends them to a row, or
frees them), and get_stats() says what the strategy did, so each behaviour
can be seen and tested:

  SCATTERED   whatever the pool's free list gives, one shared pop per call.
              Baseline. Interleaved requests get interleaved ids.
  CONTIGUOUS  prefers runs of consecutive ids per request: a sorted local
              magazine of free blocks (refilled a batch per shared pop),
              from which each request continues its last run and new runs
              start in the middle of the largest free gap. Runs make slot
              mappings compressible (compress.py) and KV copies larger.
              Stats: runs, mean_run_length.
  NUMA_AWARE  allocates from the pool of the device's NUMA node (read from
              /sys/bus/pci/devices/<bdf>/numa_node), spilling to the other
              pools only when it is empty. Stats: numa_node, numa_source
              (where the node came from, or why it fell back to node 0),
              pool, spilled_blocks.
  PREDICTIVE  PredictiveBlockAllocator (below): per-request
              reservations ahead of need. Stats: hit_rate, reserved, reclaims.

The magazine is a prototype in Python of what libbt could do in C (see the
module's report): it holds at most `cache_limit` blocks in this client's
hand, invisible to other processes until trim() or close().

Every BlockSource counts runs the same way (a run continues across calls
of the same request when the next id is the last one plus one) and its
shared operations (pops and pushes on the shared free lists).

Thread safety: one thread at a time. Errors: BtError subclasses; a call
that raised changed nothing.
"""
from __future__ import annotations

import bisect
import enum
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping, TypeVar

import numpy as np

from . import _lib
from ._core import Segment
from ._errors import error_class, make_error
from ._lib import count
from ._types import I32, SegmentConfig, preview
from ._types import I32Array, IntsLike

if TYPE_CHECKING:
    import torch

    from ._core import Client

_B = TypeVar("_B", bound="BlockSource")

__all__ = ["BlockAllocationStrategy", "BlockSource", "ScatteredAllocator",
           "ContiguousAllocator", "NumaAwareAllocator", "PredictiveBlockAllocator",
           "make_allocator", "numa_node_of", "count_runs", "UnknownRequest"]

_EINVAL, _ERANGE, _ENOTHELD = _lib.BT_EINVAL, _lib.BT_ERANGE, _lib.BT_ENOTHELD
OutOfBlocks = error_class(_lib.BT_ENOBLOCKS)


class BlockAllocationStrategy(enum.Enum):
    """Strategy for block allocation; each one is implemented in
    blocktable.strategies (make_allocator) and blocktable.predictive:
    CONTIGUOUS prefers runs of consecutive ids, SCATTERED takes what the pool
    gives, NUMA_AWARE picks the pool of the device's NUMA node, PREDICTIVE
    reserves ahead from each request's growth."""
    CONTIGUOUS = enum.auto()
    SCATTERED = enum.auto()
    NUMA_AWARE = enum.auto()
    PREDICTIVE = enum.auto()

HandFull = error_class(_lib.BT_EHANDFULL)


def count_runs(ids: IntsLike) -> int:
    """Runs of consecutive ids (b, b+1, ...) in a sequence (0 for empty)."""
    a = np.asarray(ids, dtype=np.int64)
    return int(a.size and 1 + np.count_nonzero(np.diff(a) != 1))


class UnknownRequest(error_class(_EINVAL), KeyError):  # type: ignore[misc]
    """A request id the allocator has never seen, or one that has ended."""
    code = _EINVAL
    __str__ = Exception.__str__    # not KeyError's repr-quoting


def unknown_request(rid: Hashable) -> UnknownRequest:
    e = UnknownRequest(f"BT_EINVAL: unknown request {rid!r} (never allocated for, or ended)")
    e.code, e.detail = _EINVAL, f"unknown request {rid!r}"
    return e


class BlockSource:
    """What every strategy shares: handed-out bookkeeping (free / detach /
    end_request refuse ids not handed out, or handed back twice), run and
    shared-operation counters, get_stats().

    Subclasses implement _take(request_id, n) -> list of n loose ids, all
    or nothing, and may override _give_back(ids) (default: one release)."""

    strategy: BlockAllocationStrategy | None = None
    _take: Callable[[Hashable, int], list[int]]    # the strategy's (a subclass's method)

    def __init__(self, client: Client, pool: int = 0) -> None:
        cfg = client.segment.config
        if not 0 <= count(pool, "pool") < cfg.num_pools:
            raise make_error(_ERANGE, f"pool {pool} not in [0, {cfg.num_pools})")
        self.client, self.segment, self.pool = client, client.segment, pool
        self._out = set()           # ids handed out and still loose
        self._last = {}             # request id -> last id handed to it (runs)
        self._s = dict.fromkeys(("allocations", "blocks_allocated", "runs", "shared_pops",
                                 "shared_pushes", "failed_pops", "pool_blocks", "failures",
                                 "requests_ended"), 0)

    # ---- allocation -----------------------------------------------------------
    def allocate(self, request_id: Hashable, num_blocks: int) -> I32Array:
        """num_blocks loose blocks (int32) for request_id (None: anonymous,
        no run continuity). Errors: OutOfBlocks, HandFull, OutOfRange."""
        n = count(num_blocks, "num_blocks")
        ids = self._take(request_id, n)
        self._record(request_id, ids)
        return np.array(ids, I32)

    def _record(self, rid: Hashable, ids: list[int]) -> None:
        s = self._s
        s["allocations"] += 1
        s["blocks_allocated"] += len(ids)
        if ids:
            runs = 1 if len(ids) == 1 else count_runs(ids)
            if rid is not None and self._last.get(rid) == ids[0] - 1:
                runs -= 1           # continues the request's run
            s["runs"] += runs
            if rid is not None:
                self._last[rid] = ids[-1]
        elif rid is not None:
            self._last.setdefault(rid, None)
        self._out.update(ids)

    def _pop(self, n: int, pool: int | None = None) -> list[int] | None:
        """n fresh ids in one shared pop, or None if the pool or hand can't."""
        try:
            ids = self.client.alloc(n, self.pool if pool is None else pool)
        except (OutOfBlocks, HandFull):
            self._s["failed_pops"] += 1
            return None
        self._s["shared_pops"] += 1
        self._s["pool_blocks"] += n
        return ids.tolist()

    def _fail(self, detail: str) -> Exception:
        self._s["failures"] += 1
        return make_error(_lib.BT_ENOBLOCKS, detail)

    # ---- giving back ------------------------------------------------------------
    def check_out(self, block_ids: IntsLike, what: str) -> list[int]:
        """block_ids as a list, if each was handed out by this allocator and
        is still loose (once); else NotHeld naming `what`."""
        a = np.asarray(block_ids).ravel()
        if a.size and a.dtype.kind not in "iu":
            raise make_error(_EINVAL, f"{what}: block ids must be integers, got {a.dtype}")
        ids, seen = a.tolist(), set()
        for b in ids:
            if b not in self._out or b in seen:
                why = "listed twice" if b in seen else \
                    "not handed out by this allocator, or already freed"
                raise make_error(_ENOTHELD, f"{what}: block {b} is {why} (ids {preview(ids)})")
            seen.add(b)
        return ids

    def _give_back(self, ids: list[int]) -> None:
        if ids:
            self.client.release(ids)
            self._s["shared_pushes"] += 1

    def free(self, block_ids: IntsLike) -> None:
        """Give back blocks allocate() handed out. Errors: NotHeld (an id not
        handed out, already freed or detached, or listed twice); nothing is
        freed then."""
        ids = self.check_out(block_ids, "free")
        self._give_back(ids)
        self._out.difference_update(ids)

    def detach(self, block_ids: IntsLike) -> None:
        """Forget blocks the caller moved into a row of this client (the row
        holds their references now). Errors: NotHeld, as free()."""
        self._out.difference_update(self.check_out(block_ids, "detach"))

    def knows(self, request_id: Hashable) -> bool:
        return request_id in self._last

    def end_request(self, request_id: Hashable, block_ids: IntsLike = ()) -> None:
        """The request is done: block_ids (loose blocks it still holds) go
        back, and what the strategy kept for it is dropped.
        Errors: UnknownRequest, NotHeld."""
        if request_id not in self._last:
            raise unknown_request(request_id)
        ids = self.check_out(block_ids, "end_request")
        self._give_back(ids)
        self._out.difference_update(ids)
        del self._last[request_id]
        self._s["requests_ended"] += 1

    def close(self) -> None:
        """Give back what the strategy keeps for itself (not handed-out blocks)."""

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- questions ----------------------------------------------------------------
    def get_num_free(self) -> int:
        """Free blocks in the pool (snapshot)."""
        return self.segment.free_blocks(self.pool)

    def get_stats(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self._s)
        s["strategy"] = self.strategy.name if self.strategy else None
        s["pool"] = self.pool
        s["shared_ops"] = s["shared_pops"] + s["shared_pushes"]
        s["mean_run_length"] = s["blocks_allocated"] / s["runs"] if s["runs"] else 0.0
        s["handed_out"] = len(self._out)
        s["free"] = self.get_num_free()
        return s


class ScatteredAllocator(BlockSource):
    """Whatever the pool's free list gives: one shared pop per call."""

    strategy = BlockAllocationStrategy.SCATTERED

    def _take(self, rid: Hashable, n: int) -> list[int]:
        if n == 0:
            return []
        ids = self._pop(n)
        if ids is None:
            raise self._fail(f"{n} blocks asked, pool {self.pool} has {self.get_num_free()} free")
        return ids


class ContiguousAllocator(BlockSource):
    """Runs of consecutive ids per request, from a sorted local magazine.

    batch: blocks per refill (one shared pop), at least run_target per
    active request so that each has a gap of that many to grow into;
    cache_limit: most freed blocks the magazine keeps (beyond it they go
    back to the pool at once; default twice the batch).
    Under pressure (the pool cannot refill a batch) it refills exactly what
    is missing; an allocation fails only when the magazine and the pool
    together are short."""

    strategy = BlockAllocationStrategy.CONTIGUOUS

    def __init__(self, client: Client, pool: int = 0, batch: int = 256,
                 cache_limit: int | None = None, run_target: int = 16) -> None:
        super().__init__(client, pool)
        self.batch = max(1, count(batch, "batch"))
        self.run_target = count(run_target, "run_target")
        self.cache_limit = 2 * self.batch if cache_limit is None else count(cache_limit,
                                                                           "cache_limit")
        self._mag = []              # sorted free ids held loose
        self._s["refills"] = 0

    def _take(self, rid: Hashable, n: int) -> list[int]:
        short = n - len(self._mag)
        if short > 0:
            got = self._pop(max(short, self.batch, self.run_target * len(self._last)))
            if got is None:
                got = self._pop(short)
            if got is None:
                raise self._fail(f"{n} blocks asked: the magazine holds {len(self._mag)}, "
                                 f"pool {self.pool} has {self.get_num_free()} free")
            self._mag = sorted(self._mag + got)
            self._s["refills"] += 1
        out = []
        nxt = self._last.get(rid) if rid is not None else None
        nxt = None if nxt is None else nxt + 1
        while len(out) < n:
            i = self._find(nxt) if nxt is not None else -1
            if i < 0:
                i = self._new_run_start()
            b = self._mag.pop(i)
            out.append(b)
            nxt = b + 1
        return out

    def _find(self, b: int) -> int:
        i = bisect.bisect_left(self._mag, b)
        return i if i < len(self._mag) and self._mag[i] == b else -1

    def _new_run_start(self) -> int:
        """Index in the magazine where a new run starts: the largest free
        gap, at its start unless that is another request's continuation
        (then in its middle, leaving both room to grow)."""
        m = np.asarray(self._mag, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(m) != 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((starts, [m.size])))
        k = int(np.argmax(lengths))
        s, length = int(starts[k]), int(lengths[k])
        taken = {b + 1 for b in self._last.values() if b is not None}
        return s + length // 2 if self._mag[s] in taken else s

    def _give_back(self, ids: list[int]) -> None:
        room = max(0, self.cache_limit - len(self._mag))
        keep, back = ids[:room], ids[room:]
        if keep:
            self._mag = sorted(self._mag + keep)
        if back:
            self.client.release(back)
            self._s["shared_pushes"] += 1

    def trim(self) -> None:
        """Give the magazine back to the pool (one shared operation)."""
        if self._mag and not self.client.closed:
            self.client.release(self._mag)
            self._s["shared_pushes"] += 1
        self._mag = []

    close = trim

    def get_stats(self) -> dict[str, Any]:
        s = super().get_stats()
        s["cached"] = len(self._mag)
        return s


# ---- NUMA ------------------------------------------------------------------------
_BDF = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_list(text: str | None) -> set[int]:
    cpus: set[int] = set()
    for part in (text or "").split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.update(range(int(a), int(b) + 1))
        elif part.strip():
            cpus.add(int(part))
    return cpus


def _gpu_bdf(index: int, sysfs_root: str, proc_root: str) -> tuple[str | None, str]:
    """PCI address of CUDA device `index`: from torch when it is already
    imported and knows it, else the index-th NVIDIA GPU in PCI order (what
    CUDA numbers with CUDA_DEVICE_ORDER=PCI_BUS_ID; with the default
    FASTEST_FIRST order it agrees on machines of identical GPUs)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            p = torch.cuda.get_device_properties(index)
            dom = getattr(p, "pci_domain_id", 0)
            return f"{dom:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0", "torch"
        except Exception:   # no CUDA, or a torch without the fields: try /proc
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        if index >= len(ids) or not ids[index].isdigit():
            return None, f"CUDA_VISIBLE_DEVICES={visible!r} does not name device {index} " \
                         "by number"
        index = int(ids[index])
    try:
        gpus = sorted(os.listdir(os.path.join(proc_root, "driver/nvidia/gpus")))
    except OSError:
        return None, "no NVIDIA driver (/proc/driver/nvidia/gpus)"
    if index >= len(gpus):
        return None, f"device {index} not among {len(gpus)} NVIDIA GPUs"
    return gpus[index].lower(), "/proc/driver/nvidia/gpus (PCI order)"


def numa_node_of(device: str | int | torch.device | None = None, sysfs_root: str = "/sys",
                 proc_root: str = "/proc") -> tuple[int, str]:
    """(node, source): the NUMA node of `device` and where that came from.

    device: None or "cpu" (the node of the first CPU this process may run
    on), "cuda:N" / N (an NVIDIA GPU), or a PCI address "0000:3b:00.0".
    Where nothing says, node 0 with source "fallback: <why>"."""
    def fallback(why: str) -> tuple[int, str]:
        return 0, f"fallback: {why}"

    if device is None or device == "cpu":
        cpus = sorted(os.sched_getaffinity(0))
        nodes_dir = os.path.join(sysfs_root, "devices/system/node")
        try:
            names = sorted(n for n in os.listdir(nodes_dir) if re.fullmatch(r"node\d+", n))
        except OSError:
            return fallback(f"no {nodes_dir}")
        for name in names:
            if cpus and cpus[0] in _cpu_list(_read(os.path.join(nodes_dir, name, "cpulist"))):
                return int(name[4:]), f"{nodes_dir}/{name}/cpulist (cpu {cpus[0]})"
        return fallback(f"cpu {cpus[0] if cpus else '?'} is in no node of {nodes_dir}")
    bdf: str | None
    if isinstance(device, str) and _BDF.match(device):
        bdf, how = device.lower(), "given"
    else:
        dev = str(device)
        m = re.fullmatch(r"(?:cuda:)?(\d+)", dev)
        if not m:
            return fallback(f"device {device!r} is neither cpu, cuda:N nor a PCI address")
        bdf, how = _gpu_bdf(int(m.group(1)), sysfs_root, proc_root)
        if bdf is None:
            return fallback(how)
    if bdf.count(":") == 2 and len(bdf.split(":")[0]) == 8:   # nvidia's 8-digit domain
        bdf = bdf[4:]
    path = os.path.join(sysfs_root, "bus/pci/devices", bdf, "numa_node")
    text = _read(path)
    if text is None:
        return fallback(f"no {path}")
    node = int(text)
    if node < 0:
        return fallback(f"{path} says {node} (the platform gives no NUMA information)")
    return node, f"{path} ({how})"


class NumaAwareAllocator(BlockSource):
    """Blocks from the pool of the device's NUMA node.

    The pool is node_to_pool[node] if given, else node % num_pools (pools
    numbered by node, as a daemon that makes one pool per socket would).
    When that pool is empty the rest comes from the pool with the most free
    blocks (spilled_blocks counts them)."""

    strategy = BlockAllocationStrategy.NUMA_AWARE

    def __init__(self, client: Client, device: str | int | torch.device | None = None,
                 node_to_pool: Mapping[int, int] | None = None, sysfs_root: str = "/sys",
                 proc_root: str = "/proc") -> None:
        node, source = numa_node_of(device, sysfs_root, proc_root)
        npools = client.segment.config.num_pools
        pool = node_to_pool[node] if node_to_pool and node in node_to_pool else node % npools
        super().__init__(client, pool)
        self.numa_node, self.numa_source, self.device = node, source, device
        self._s["spilled_blocks"] = 0

    def _take(self, rid: Hashable, n: int) -> list[int]:
        if n == 0:
            return []
        ids = self._pop(n)
        if ids is not None:
            return ids
        got, spilled, seg = [], 0, self.segment
        order = [self.pool] + sorted((p for p in range(seg.config.num_pools) if p != self.pool),
                                     key=lambda p: -seg.free_blocks(p))
        for p in order:
            k = min(n - len(got), seg.free_blocks(p))
            part = self._pop(k, p) if k else None
            if part:
                got += part
                spilled += len(part) if p != self.pool else 0
            if len(got) == n:
                self._s["spilled_blocks"] += spilled
                return got
        if got:                     # all or nothing
            self.client.release(got)
            self._s["shared_pushes"] += 1
        raise self._fail(f"{n} blocks asked, only {len(got)} free in all pools")

    def get_stats(self) -> dict[str, Any]:
        s = super().get_stats()
        s.update(numa_node=self.numa_node, numa_source=self.numa_source)
        return s


# ---- PREDICTIVE ------------------------------------------------------------------
# PredictiveBlockAllocator: reserve blocks ahead so most appends skip the
# shared free list.
#
# Each request's growth is learnt as an exponentially weighted moving average
# (EWMA) of the blocks it asks for per call after its first (the first is
# its size, a prompt, not growth: a 1,000-token prefill must not make the
# allocator reserve 4 x 63 blocks for a request that then decodes one block
# every 16 steps). When a request must go to the
# shared pool anyway (its reservation ran out), the allocator pops, in the
# same single operation, enough extra blocks to cover the next
# `prediction_horizon` calls at that rate; those calls are then served from
# the reservation without touching shared state. A request that needs one
# block per call and a horizon of 4 pays one pop per 5 blocks instead of one
# per block.
#
# Reservations are loose references in this client's hand (bt_blocks_alloc):
#   * invisible to rows, so the table's zero tail holds and no request can
#     read a reserved block's KV;
#   * recovered with everything else the client held if its process dies
#     (bt_seg_recover_client drops the hand);
#   * released when the request ends (end_request), and
#   * reclaimed under pressure: when the pool cannot serve an allocation, other
#     requests' reservations are taken (largest first), so an allocation never
#     fails while the pool's free blocks plus this allocator's reserved blocks
#     suffice. Moving a reserved block between requests is bookkeeping in this
#     process: the block stays in the same hand, no shared operation happens.
#
# Reservations held by *other* processes' allocators are in their hands and
# are not reclaimable from here; each process guarantees the property for its
# own reservations.
#
# The seed's allocator handed the predicted blocks to the caller as if asked
# for, never reclaimed them, and freed ids it had never allocated.
#
# Thread safety: one thread at a time (it drives one client). Errors:
# BtError subclasses; a call that raised changed nothing.

class PredictiveBlockAllocator(BlockSource):
    """Block allocator with per-request prediction (the seed's names).

    PredictiveBlockAllocator(total_blocks, block_size=16, prediction_horizon=4)
    makes its own embedded segment with one pool of total_blocks usable
    blocks. To share a segment with a table or other processes, pass
    ``client=`` (and ``pool=``); total_blocks is then the pool's (or must
    equal it). ``alpha`` weighs the newest observation of the EWMA;
    ``max_reserve`` caps one request's reservation (default: horizon x rate).

    The rate is blocks per allocate() call: call it once per scheduler step
    (num_blocks 0 when the request needs nothing) and the horizon counts
    steps; call it only when a block is needed and it counts allocations.
    block_size converts tokens (``blocks_for_tokens``) and nothing else.

    Blocks returned by allocate() are loose references held by this
    allocator's client until you free() them, end_request() with them, or
    append them to a row of the same client and call detach().
    """

    strategy = BlockAllocationStrategy.PREDICTIVE

    def __init__(self, total_blocks: int | None = None, block_size: int = 16,
                 prediction_horizon: int = 4, *, client: Client | None = None, pool: int = 0,
                 alpha: float = 0.5, max_reserve: int | None = None) -> None:
        self.block_size = count(block_size, "block_size")
        self.prediction_horizon = count(prediction_horizon, "prediction_horizon")
        if self.block_size == 0:
            raise make_error(_lib.BT_ECONFIG, "block_size must be positive")
        if not 0.0 < alpha <= 1.0:
            raise make_error(_lib.BT_ECONFIG, f"alpha {alpha} not in (0, 1]")
        self.alpha = float(alpha)
        self.max_reserve = None if max_reserve is None else count(max_reserve, "max_reserve")
        self._own_segment = None
        if client is None:
            total = count(total_blocks, "total_blocks")
            if total == 0:
                raise make_error(_lib.BT_ECONFIG, "total_blocks must be positive")
            self._own_segment = Segment.create(None, SegmentConfig(
                block_size=self.block_size, num_pools=1, blocks_per_pool=total + 1,
                num_rows=1, row_width=1, max_clients=1, hand_size=min(total, 1 << 20),
                max_mirrors=0))
            client, pool = self._own_segment.client(), 0
        super().__init__(client, pool)
        usable = client.segment.config.blocks_per_pool - (1 if pool == 0 else 0)
        if total_blocks is not None and total_blocks != usable:
            raise make_error(_lib.BT_ECONFIG, f"total_blocks {total_blocks} but pool {pool} "
                                             f"has {usable} blocks")
        self.total_blocks = usable
        self._reserve = {}      # request id -> reserved ids (loose, in the hand)
        self._rate = {}         # request id -> EWMA of blocks per call
        self._s.update(dict.fromkeys(("hits", "call_hits", "reclaims", "reclaimed_blocks",
                                      "reserved_released"), 0))

    # ---- allocation -----------------------------------------------------------
    def allocate(self, request_id: Hashable, num_blocks: int,  # type: ignore[override]
                 predict_future: bool = True) -> I32Array:
        """num_blocks blocks for request_id (int32 array): from its
        reservation first, then from the pool, topping the reservation up to
        ceil(rate x horizon) in the same pop (predict_future=False: no top
        up). Under pressure, other requests' reservations are reclaimed.
        Errors: OutOfBlocks (or HandFull) only when the pool's free blocks
        plus every reservation of this allocator cannot cover num_blocks;
        InvalidArgument / OutOfRange for a bad request id or count."""
        if request_id is None:
            raise make_error(_lib.BT_EINVAL, "request_id must not be None")
        n = count(num_blocks, "num_blocks")
        own = self._reserve.get(request_id, [])
        take = min(n, len(own))
        need = n - take
        if request_id not in self._rate:    # its size (the prompt), not its growth
            rate = None
        else:
            old = self._rate[request_id]
            rate = float(n) if old is None else self.alpha * n + (1.0 - self.alpha) * old
        extra = 0
        if predict_future and need and rate is not None:   # top up on a trip to the pool
            target = math.ceil(rate * self.prediction_horizon)
            if self.max_reserve is not None:
                target = min(target, self.max_reserve)
            extra = max(0, target - (len(own) - take))
        fresh, plan = self._obtain(request_id, need, extra)     # raises: nothing changed
        # Commit: nothing below can fail.
        for victim, k in plan:
            vr = self._reserve[victim]
            del vr[len(vr) - k:]
        ids = own[:take] + fresh[:need]
        del own[:take]
        own.extend(fresh[need:])
        self._reserve[request_id] = own
        self._rate[request_id] = rate
        self._record(request_id, ids)
        self._s["hits"] += take
        self._s["call_hits"] += need == 0
        return np.array(ids, I32)

    def _obtain(self, rid: Hashable, need: int, extra: int) -> tuple[list[int], Any]:
        """(need ids + whatever of extra the pool gave, [(victim, k)]): the
        reclaim plan takes each victim's last k reserved ids; the caller
        applies it. Raises OutOfBlocks with nothing changed."""
        if need + extra == 0:
            return [], []
        got = self._pop(need + extra)
        if got is None and extra:
            got = self._pop(need)
        if got is not None:
            return got, []
        # Pressure: the pool cannot serve `need`. Take the shortfall from
        # other requests' reservations, largest first; if the pool moved
        # under us, a second try takes all of `need` from them.
        victims = sorted(((len(r), v) for v, r in self._reserve.items() if v != rid and r),
                         key=lambda t: -t[0])
        reclaimable = sum(k for k, _ in victims)
        free = self.get_num_free()
        for short in dict.fromkeys((max(1, need - free), need)):
            if short > reclaimable:
                break
            plan, ids = [], []
            for k, v in victims:
                t = min(k, short - len(ids))
                if not t:
                    break
                plan.append((v, t))
                ids.extend(self._reserve[v][k - t:])
            rest = self._pop(need - short) if need > short else []
            if rest is not None:
                self._s["reclaims"] += 1
                self._s["reclaimed_blocks"] += short
                return ids + rest, plan
        raise self._fail(f"request {rid!r} needs {need} more blocks: the pool has {free} free "
                         f"and other requests reserve {reclaimable}")

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks that num_tokens tokens fill (ceil(num_tokens / block_size))."""
        return -(-count(num_tokens, "num_tokens") // self.block_size)

    # ---- giving back ------------------------------------------------------------
    def end_request(self, request_id: Hashable, block_ids: IntsLike = ()) -> None:
        """The request is done: its reservation and block_ids (blocks it was
        handed and still holds loose) go back to the pool in one shared
        operation, and its rate is forgotten. Errors: UnknownRequest,
        NotHeld (block_ids as in free()); nothing changes then."""
        if not self.knows(request_id):
            raise unknown_request(request_id)
        ids = self.check_out(block_ids, "end_request")
        res = self._reserve.pop(request_id, [])
        self._give_back(ids + res)
        self._out.difference_update(ids)
        self._s["reserved_released"] += len(res)
        self._s["requests_ended"] += 1
        del self._last[request_id]
        self._rate.pop(request_id, None)

    def release_reservations(self) -> None:
        """Give every reservation back (one shared operation); the requests
        stay known."""
        res = [b for r in self._reserve.values() for b in r]
        self._give_back(res)
        self._s["reserved_released"] += len(res)
        for r in self._reserve.values():
            r.clear()

    def close(self) -> None:
        """Release the reservations; close the segment if this allocator
        made it (blocks still handed out go with it)."""
        if self._own_segment is not None:
            self._own_segment.close()
            self._reserve.clear()
        elif not self.client.closed:
            self.release_reservations()

    # ---- questions ----------------------------------------------------------------
    def get_num_reserved(self) -> int:
        return sum(len(r) for r in self._reserve.values())

    def reserved_for(self, request_id: Hashable) -> int:
        """Blocks reserved for a request (0 for a known one without)."""
        if not self.knows(request_id):
            raise unknown_request(request_id)
        return len(self._reserve.get(request_id, ()))

    def predicted_rate(self, request_id: Hashable) -> float | None:
        """The request's EWMA of blocks per call (None until its second call)."""
        if not self.knows(request_id):
            raise unknown_request(request_id)
        return self._rate[request_id]

    def get_stats(self) -> dict[str, Any]:
        """BlockSource's counters plus: hits (blocks served from a
        reservation), hit_rate (hits / blocks_allocated), call_hit_rate
        (calls that needed no shared operation), reserved, reclaims
        (allocations that took other requests' reservations),
        reclaimed_blocks, active_requests."""
        s = super().get_stats()
        n = s["blocks_allocated"]
        s["hit_rate"] = s["hits"] / n if n else 0.0
        s["call_hit_rate"] = s["call_hits"] / s["allocations"] if s["allocations"] else 0.0
        s["reserved"] = self.get_num_reserved()
        s["active_requests"] = len(self._last)
        return s


def make_allocator(strategy: BlockAllocationStrategy | str, client: Client, pool: int = 0,
                   **kw: Any) -> BlockSource:
    """A BlockSource for `strategy` (a BlockAllocationStrategy or its name)
    on `client`. Keywords go to the strategy's class (batch, device,
    prediction_horizon, ...)."""
    if isinstance(strategy, str):
        try:
            strategy = BlockAllocationStrategy[strategy.upper()]
        except KeyError:
            raise make_error(_EINVAL, f"unknown strategy {strategy!r}; one of "
                                      f"{[s.name for s in BlockAllocationStrategy]}") from None
    if not isinstance(strategy, enum.Enum) or strategy not in BlockAllocationStrategy:
        raise make_error(_EINVAL, f"strategy must be a BlockAllocationStrategy, got {strategy!r}")
    if strategy is BlockAllocationStrategy.SCATTERED:
        return ScatteredAllocator(client, pool, **kw)
    if strategy is BlockAllocationStrategy.CONTIGUOUS:
        return ContiguousAllocator(client, pool, **kw)
    if strategy is BlockAllocationStrategy.NUMA_AWARE:
        return NumaAwareAllocator(client, **kw)
    return PredictiveBlockAllocator(client=client, pool=pool, **kw)
