"""SharedBlockPool: vLLM's BlockPool, connected to the segment.

(First stage: the pool's state still lives in vLLM's Python objects; it
connects the EngineCore to the segment, sized from the engine, and counts
the pool's work for the stats file. The segment-backed state comes with
the cache pools.)
"""
from vllm.v1.core.block_pool import BlockPool

from . import _seg
from .scheduler import _engine

__all__ = ["SharedBlockPool"]


class SharedBlockPool(BlockPool):
    """BlockPool whose engine is registered on the blocktable segment.
    Errors: those of blocktable.connect (btd refusing, a segment too small:
    RuntimeError naming both sizes). Not thread-safe (as vLLM's)."""

    def __init__(self, num_gpu_blocks, enable_caching, hash_block_size, *args, **kwargs):
        super().__init__(num_gpu_blocks, enable_caching, hash_block_size, *args, **kwargs)
        if not _engine:
            raise RuntimeError("blocktable.vllm: a BlockPool was built outside the scheduler")
        need = _seg.segment_config(num_gpu_blocks, hash_block_size, _engine["max_num_seqs"],
                                   _engine["max_model_len"])
        self.bt_client = _seg.connect(create=need)
        self.bt_stats = _seg.Stats("scheduler", rows_written=0, allocs=0, frees=0, touches=0,
                                   lookups=0, hits=0)

    def get_new_blocks(self, num_blocks):
        out = super().get_new_blocks(num_blocks)
        self.bt_stats["allocs"] += num_blocks
        return out

    def touch(self, blocks):
        super().touch(blocks)
        self.bt_stats["touches"] += len(blocks)

    def free_blocks(self, ordered_blocks):
        blocks = list(ordered_blocks)
        super().free_blocks(blocks)
        self.bt_stats["frees"] += len(blocks)

    def get_cached_block(self, block_hash, kv_cache_group_ids):
        out = super().get_cached_block(block_hash, kv_cache_group_ids)
        st = self.bt_stats
        st["lookups"] += 1
        if out is not None:
            st["hits"] += 1
        return out
