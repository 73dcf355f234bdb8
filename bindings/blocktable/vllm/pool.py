"""SharedBlockPool: vLLM 0.32's BlockPool with its state in the segment.

The pool's state (reference counts, the LRU free queue, the block-hash ->
block map) lives in one of the segment's cache pools (libbt bt_cache_*,
called through blocktable._lib): allocation, freeing, touching, eviction and
lookups are libbt calls, one per vLLM call (caching a request's newly full
blocks is one bt_cache_insert_many), with vLLM's exact semantics (the same ids
come out, the same blocks are evicted first). What stays in Python is what
vLLM builds around that state: the KVCacheBlock objects vLLM's managers hold
(SharedKVCacheBlock: ref_cnt, block_hash and block_hash_num_tokens read and
write the segment), the KV-cache events (vLLM's own code, inherited:
cache_full_blocks when events are on, cache_partial_block,
emit_cached_block_events, _emit_block_removed_events, evict_blocks and
move_block_hashes run unchanged over the overridden primitives, so events
have the same content), the metrics collector hooks and the reuse watchers
of unpin_blocks.

Overridden (each a primitive vLLM's other methods are built on):
__init__ (no Python queue or map), get_cached_block, get_new_blocks, touch,
free_blocks, unpin_blocks, _insert_block_hash, _remove_cached_block_hashes,
reset_prefix_cache, get_num_free_blocks; and cache_full_blocks, which without
events, block masks or partial blocks caches the new full blocks in one call
(else vLLM's own loop runs over the primitives).

get_num_free_blocks (vLLM asks once per request per step) returns the count
as this process last read it after its own calls: the pool's owner is its
only writer.

A segment's cache pool larger than num_gpu_blocks (made by an earlier,
larger engine) is used with its ids past num_gpu_blocks held for good (they
show as used in bt-ctl; bt_pinned lists them); a smaller one is refused at start (btd's create,
or _seg.check_fits: RuntimeError naming both sizes).
Limits: ``cached_block_hash_to_block.contain(key, block)`` (used only by partial-block hits, off by default) sees a block's primary
key and the oldest block of a key, not a block's later extra keys.
Errors: those of blocktable.connect and CachePool; RuntimeError at start for
a segment that does not fit. Not thread-safe (as vLLM's BlockPool).
"""
from vllm.distributed.kv_events import MEDIUM_GPU, AllBlocksCleared
from vllm.logger import init_logger
from vllm.v1.core import block_pool as _vllm_block_pool
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashWithGroupId, KVCacheBlock

from blocktable import _lib

from . import _seg

__all__ = ["SharedBlockPool", "SharedKVCacheBlock"]

logger = init_logger(__name__)

# The hot libbt calls, bound once (a module attribute lookup per call is
# measurable next to calls of ~100 ns).
_alloc, _free, _touch = _lib.cache_alloc, _lib.cache_free, _lib.cache_touch
_lookup, _insert_many = _lib.cache_lookup, _lib.cache_insert_many
_resolve = _vllm_block_pool.resolve_block_hashes


class SharedKVCacheBlock(KVCacheBlock):
    """A KVCacheBlock whose ref_cnt, block_hash and block_hash_num_tokens are
    the segment's (vLLM's managers read them, and its copy-on-write paths do
    ``ref_cnt += 1`` on held blocks: set_ref in the segment)."""

    __slots__ = ("_cp",)

    @property
    def ref_cnt(self):
        return self._cp.refcnt(self.block_id)

    @ref_cnt.setter
    def ref_cnt(self, n):
        try:
            cp = self._cp
        except AttributeError:          # KVCacheBlock.__init__ storing its default 0
            return
        if n != cp.refcnt(self.block_id):
            cp.set_ref(self.block_id, n)

    @property
    def block_hash(self):
        k = self._cp.block_key(self.block_id)
        return None if k is None else BlockHashWithGroupId(k[0])

    @property
    def block_hash_num_tokens(self):
        k = self._cp.block_key(self.block_id)
        return None if k is None else k[1]

    def set_block_hash(self, block_hash, num_tokens=None):
        raise AssertionError("SharedKVCacheBlock: keys are set through the pool")

    def reset_hash(self):
        pass                            # the pool's remove already dropped the keys

    def __repr__(self):
        return (f"SharedKVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, "
                f"block_hash={self.block_hash!r})")


class _QueueView:
    """What is left of FreeKVCacheBlockQueue: its count (the queue is in the
    segment; blocktable.CachePool.queue() lists it)."""

    def __init__(self, cp):
        self._cp = cp

    @property
    def num_free_blocks(self):
        return self._cp.num_free


class _MapView:
    """BlockHashToBlockMap's read side over the segment's map."""

    def __init__(self, pool):
        self._pool = pool

    def get_one_block(self, key):
        b = self._pool.bt_cp.lookup(key)
        return None if b is None else self._pool.blocks[b]

    def contain(self, key, block_id):
        blk = self._pool.blocks[block_id]
        return blk.block_hash == key or self._pool.bt_cp.lookup(key) == block_id

    def __len__(self):
        return self._pool.bt_cp.stats()["keys"]


class SharedBlockPool(BlockPool):
    """vLLM's BlockPool over a segment cache pool (module docstring)."""

    def __init__(self, num_gpu_blocks, enable_caching, hash_block_size,
                 enable_kv_cache_events=False, metrics_collector=None, medium=MEDIUM_GPU):
        # BlockPool.__init__ is not called: what it builds (the Python free
        # queue, the hash map, a ref count per object) is what the segment
        # replaces. The attributes vLLM's inherited methods read are set here.
        assert isinstance(num_gpu_blocks, int) and num_gpu_blocks > 0
        if not _seg.engine_sizes:
            raise RuntimeError("blocktable.vllm: a BlockPool was built outside the scheduler")
        need = _seg.segment_config(num_gpu_blocks, hash_block_size, _seg.engine_sizes["max_num_seqs"],
                                   _seg.engine_sizes["max_model_len"], cache_pools=1)
        self.bt_client = _seg.connect(create=need)
        self.bt_cp = cp = self.bt_client.cache_pool(0)
        self._pin_excess(num_gpu_blocks)
        self.num_free = cp.num_free         # see get_num_free_blocks
        # The hot calls go to libbt directly with buffers made once (a list
        # into a cffi array is one slice store; no numpy per call). They hold
        # the client's handle: the pool is dead once its client is closed.
        self._cl = _lib.client_handle(self.bt_client)
        self._nfree = cp._nfree
        self._cap = max(256, num_gpu_blocks)
        self._ids = _lib.new("int32_t[]", self._cap)
        self._rm_cap = 64
        self._rm = _lib.new("bt_cache_key[]", self._rm_cap)
        self._nout = _lib.new("uint32_t *")
        self._ins = _lib.new("int *")
        self._seg = _lib.seg_handle(self.bt_client.segment)
        self._bout = _lib.new("int32_t *")
        self.bt_stats = _seg.Stats("scheduler", rows_written=0)
        # Hot counters are attributes (a dict update per call costs more than
        # the call's C work); the stats file reads them when it is written.
        self._n_alloc = self._n_free = self._n_touch = self._n_lookup = self._n_hit = 0
        self.bt_stats.sources.append(lambda: {
            "allocs": self._n_alloc, "frees": self._n_free, "touches": self._n_touch,
            "lookups": self._n_lookup, "hits": self._n_hit})
        self._partial = False
        self.num_gpu_blocks = num_gpu_blocks
        self.medium = medium
        self.enable_caching = enable_caching
        self._caching = 1 if enable_caching else 0
        self.hash_block_size = hash_block_size
        self.blocks = [SharedKVCacheBlock(i, pool=self) for i in range(num_gpu_blocks)]
        for b in self.blocks:
            b._cp = cp
        self.free_block_queue = _QueueView(cp)
        self.cached_block_hash_to_block = _MapView(self)
        self.cached_block_hashes_by_block = {}      # unused: extra keys are in the segment
        self.null_block = self.blocks[0]            # pool 0's id 0: never in the queue
        self.null_block.is_null = True
        self.enable_kv_cache_events = enable_kv_cache_events
        self.kv_event_queue = []
        self.metrics_collector = metrics_collector
        self._reuse_watchers = {}

    def _pin_excess(self, n):
        """A segment made for a larger engine has ids past vLLM's KV tensors:
        hold them (count 1, never in the queue) so that they are never handed
        out. All blocks are taken, then the first n - 1 given back: they are
        prepended in order, so the queue is exactly a fresh n-block pool's."""
        cp = self.bt_cp
        total = cp.num_blocks
        self.bt_pinned = ids = []
        if total == n:
            return
        ids = cp.alloc(cp.num_free)
        cp.free(ids[:n - 1], caching=False)
        self.bt_pinned = ids[n - 1:]

    # ---- lookups ----------------------------------------------------------------
    def get_cached_block(self, block_hash, kv_cache_group_ids):
        seg, bout, blocks = self._seg, self._bout, self.blocks
        out = []
        for gid in kv_cache_group_ids:
            self._n_lookup += 1
            k = block_hash + gid.to_bytes(4, "big")     # make_block_hash_with_group_id
            rc = _lookup(seg, 0, k, len(k), bout)
            if rc:
                raise _lib.fail(rc, f"prefix-cache lookup (key of {len(k)} bytes)")
            b = bout[0]
            if not b:
                return None
            self._n_hit += 1
            out.append(blocks[b])
        return out

    # ---- the map ------------------------------------------------------------------
    def _insert_block_hash(self, block_hash_with_group_id, block, num_tokens):
        k = block_hash_with_group_id
        rc = _lib.cache_insert(self._cl, 0, block.block_id, k, len(k), num_tokens or 0, self._ins)
        if rc:
            raise _lib.fail(rc, f"caching block {block.block_id} (key of {len(k)} bytes)")

    def _remove_cached_block_hashes(self, block):
        return [BlockHashWithGroupId(k) for _, k, _ in self.bt_cp.remove(block.block_id)]

    def cache_partial_block(self, *args, **kwargs):
        self._partial = True                # from now on, full blocks may hold keys already
        return super().cache_partial_block(*args, **kwargs)

    def cache_full_blocks(self, request, blocks, num_cached_blocks, num_full_blocks, block_size,
                          kv_cache_group_id, block_mask=None):
        # vLLM's loop makes one _insert_block_hash call per block, after reading
        # the block's current key (a block only has one before it is full when
        # partial blocks were cached). Without events, masks or partial blocks,
        # that is one bt_cache_insert_many; otherwise vLLM's own method runs.
        if self.enable_kv_cache_events or block_mask is not None or self._partial:
            return super().cache_full_blocks(request, blocks, num_cached_blocks, num_full_blocks,
                                             block_size, kv_cache_group_id, block_mask)
        if num_cached_blocks >= num_full_blocks:
            return None
        hashes = _resolve(request.block_hashes, self.hash_block_size, block_size)
        gid = kv_cache_group_id.to_bytes(4, "big")
        ids, keys, ntok = [], [], []
        for i in range(num_cached_blocks, num_full_blocks):
            blk = blocks[i]
            if not blk.is_null:
                ids.append(blk.block_id)
                keys.append(hashes[i] + gid)
                ntok.append((i + 1) * block_size)
        n = len(ids)
        if not n:
            return None
        klen, joined = len(keys[0]), b"".join(keys)
        if len(joined) != klen * n:                 # keys of one hash function: never
            for b, k, t in zip(ids, keys, ntok):
                self._insert_block_hash(k, self.blocks[b], t)
            return None
        rc = _insert_many(self._cl, 0, ids, n, joined, klen, ntok, self._nout)
        if rc:
            raise _lib.fail(rc, f"caching blocks {ids[:8]} (keys of {klen} bytes)")
        return None

    # ---- allocation ---------------------------------------------------------------
    def get_new_blocks(self, num_blocks):
        if num_blocks > self.num_free:
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        if num_blocks > self._cap:
            idl, removed = self._alloc_large(num_blocks)
        else:
            rc = _alloc(self._cl, 0, num_blocks, self._ids, self._rm, self._rm_cap, self._nout)
            if rc:
                self._alloc_failed(rc, num_blocks)
                return self.get_new_blocks(num_blocks)
            idl = self._ids[0:num_blocks]
            # The evicted keys are wanted only for KV-cache events.
            removed = self._removed() if self._nout[0] and self.enable_kv_cache_events else None
        self.num_free = self._nfree[0]
        blocks = self.blocks
        ret = [blocks[i] for i in idl]
        if self._reuse_watchers:
            self._notify_reuse(ret)
        mc = self.metrics_collector
        if mc:
            for block in ret:
                if self.enable_caching:
                    mc.on_block_evicted(block)
                mc.on_block_allocated(block)
        if removed:         # evictions, block by block, primary key first: as vLLM emits them
            self._emit_block_removed_events(removed)
        self._n_alloc += num_blocks
        return ret

    def _removed(self):
        rm = self._rm
        return [BlockHashWithGroupId(_lib.buffer(rm[i].key, rm[i].len)[:])
                for i in range(self._nout[0])]

    def _alloc_failed(self, rc, n):
        """bt_cache_alloc failed: grow the evicted-keys buffer (BT_EINVAL with
        more keys than room; nothing changed) or raise."""
        if rc == _lib.BT_EINVAL and self._nout[0] > self._rm_cap:
            self._rm_cap = 2 * self._nout[0]
            self._rm = _lib.new("bt_cache_key[]", self._rm_cap)
            return
        raise _lib.fail(rc, f"allocating {n} blocks ({self._nfree[0]} free)")

    def _alloc_large(self, n):
        ids, rm = self.bt_cp.alloc(n, removed=True)
        return ids.tolist(), [BlockHashWithGroupId(k) for _, k, _ in rm]

    def touch(self, blocks):
        ids = [b.block_id for b in blocks]
        # cffi turns the list into a temporary int32_t array (cheaper than a
        # slice store into a kept one); C checks every id before changing any.
        rc = _touch(self._cl, 0, ids, len(ids))
        self.num_free = self._nfree[0]
        if rc:
            raise _lib.fail(rc, f"touching blocks {ids[:8]}")
        if self.metrics_collector:
            for b in blocks:
                self.metrics_collector.on_block_accessed(b)
        self._n_touch += len(ids)

    def free_blocks(self, ordered_blocks):
        if not isinstance(ordered_blocks, list):
            ordered_blocks = list(ordered_blocks)       # vLLM passes reversed(...)
        ids = [b.block_id for b in ordered_blocks if b.pool is self]
        if len(ids) != len(ordered_blocks):
            return self._free_mixed(ordered_blocks)
        if ids:
            rc = _free(self._cl, 0, ids, len(ids), self._caching)
            self.num_free = self._nfree[0]
            if rc:
                raise _lib.fail(rc, f"freeing blocks {ids[:8]}")
        self._n_free += len(ids)
        return None

    def _free_mixed(self, ordered_blocks):
        """free_blocks with blocks of other pools (vLLM's multi-pool case):
        each pool frees its own, in order."""
        mine, other_pools = [], {}
        for block in ordered_blocks:
            if block.pool is not None and block.pool is not self:
                other_pools.setdefault(block.pool, []).append(block)
            else:
                mine.append(block.block_id)
        if mine:
            rc = _free(self._cl, 0, mine, len(mine), self._caching)
            self.num_free = self._nfree[0]
            if rc:
                raise _lib.fail(rc, f"freeing blocks {mine[:8]}")
        for pool, blocks in other_pools.items():
            pool.free_blocks(blocks)
        self._n_free += len(mine)

    def unpin_blocks(self, blocks, on_reuse):
        blocks = list(blocks)
        self.bt_cp.unpin([b.block_id for b in blocks])
        self.num_free = self._nfree[0]
        for b in blocks:
            self._reuse_watchers[b.block_id] = on_reuse

    def reset_prefix_cache(self):
        cp, pinned = self.bt_cp, self.bt_pinned
        if len(pinned):     # libbt resets only an idle pool: unpin around it (front out, front in)
            cp.free(pinned, caching=False)
        ok = cp.reset()
        if len(pinned):
            again = cp.alloc(len(pinned))
            assert (again == pinned).all(), "the pinned ids did not come back first"
        self.num_free = self._nfree[0]
        if not ok:
            logger.warning("Failed to reset prefix cache because some blocks (%d) are not "
                           "freed yet", self.num_gpu_blocks - self.get_num_free_blocks() - 1)
            return False
        if self._reuse_watchers:
            self._notify_reuse([self.blocks[i] for i in list(self._reuse_watchers)])
        if self.metrics_collector:
            self.metrics_collector.reset()
        logger.info("Successfully reset prefix cache")
        if self.enable_kv_cache_events:
            self.kv_event_queue.append(AllBlocksCleared())
        return True

    def get_num_free_blocks(self):
        # The segment's count as this process last left it: the pool's owner
        # (this client) is its only writer, so it changes only in the calls
        # above, each of which re-reads it. vLLM asks once per request per step.
        return self.num_free
