"""CachePool: vLLM 0.32's BlockPool (block allocation, reference counts, the
LRU free queue and the prefix cache's block-hash -> block map) kept in a
blocktable segment by libbt (bt.h section 10, bt_cache_*).

Every method does what the vLLM method named in its docstring does, in the
same order, so that a pool driven by the same calls holds the same state as
vLLM's: the same ids come out of ``alloc``, the same block is found for a key,
the same blocks are evicted first. Keys are bytes of 1..64 (vLLM's
BlockHashWithGroupId is a 32-byte hash plus a 4-byte group id).

Errors: BtError subclasses (blocktable.errors): InvalidArgument (a bad
argument, the null block where vLLM forbids it, a pool that is not a cache
pool), OutOfRange (a block id not in the pool), OutOfBlocks (alloc of more
than are free), NotHeld (a free would take a count below 0), OutOfKeys (the
pool's key entries, SegmentConfig.cache_keys, are all in use), NotOwner (the
pool was given up or taken over), Busy (open: a live client owns the pool),
Corrupt (the pool's shared state was scribbled on: close and reopen it, or
run a repairing check). A call that raised changed nothing, except where its
docstring says otherwise.

Thread and process safety: a pool has one writer, the client that opened it
(``Client.cache_pool``); its methods must not be called from two threads at
once (the client's rule). Any process attached to the segment may read the
pool lock-free: ``Segment.cache_lookup`` and ``Segment.cache_stats``. When the
owning client closes, or its process dies and is recovered, the pool is reset
(every block free, every key gone).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence, overload

import numpy as np

from ._errors import make_error
from . import _lib
from ._types import I32, c_array, preview
from ._types import I32Array, IntsLike

if TYPE_CHECKING:
    from ._core import Client

#: a key the cache removed: (block, key, ntokens)
Removed = tuple[int, bytes, int]

__all__ = ["CachePool", "cache_stats", "cache_lookup"]

_EINVAL, _EBUSY, _ECLIENT = _lib.BT_EINVAL, _lib.BT_EBUSY, _lib.BT_ECLIENT
_KEY_MAX = _lib.BT_CACHE_KEY_MAX
_STATS_FIELDS = _lib.struct_fields("bt_cache_stats")


def _ids(values: IntsLike, what: str = "ids") -> tuple[Any, int]:
    """(C int32 array, length) of block ids: an int32 numpy array without a
    copy, a list or tuple of ints through cffi's own conversion (several
    times cheaper than numpy for the few ids a request holds), anything else
    through c_array's checks."""
    t = type(values)
    if t is list or t is tuple:
        try:
            return _lib.new("int32_t[]", values), len(values)
        except (OverflowError, TypeError):
            pass                        # c_array names the problem
    return c_array(values, I32, "int32_t[]", what)


def _stats_dict(st: Any) -> dict[str, int]:
    return {n: getattr(st, n) for n in _STATS_FIELDS}


def cache_stats(seg: Any, pool: int) -> dict[str, int]:
    """bt_cache_stats_get on a raw bt_seg *: a dict (lock-free snapshot)."""
    st = _lib.new("bt_cache_stats *")
    rc = _lib.cache_stats_get(seg, pool, st)
    if rc:
        raise make_error(rc, f"cache_stats(pool={pool})")
    return _stats_dict(st)


def cache_lookup(seg: Any, pool: int, key: bytes) -> int | None:
    """bt_cache_lookup on a raw bt_seg *: the oldest block mapped from key,
    or None."""
    out = _lib.new("int32_t *")
    rc = _lib.cache_lookup(seg, pool, key, len(key), out)
    if rc:
        raise make_error(rc, f"cache_lookup(pool={pool}, key of {len(key)} bytes)")
    return out[0] or None


class CachePool:
    """A cache pool of a segment, opened for writing by one client
    (``client.cache_pool(pool)``; bt_cache_open resets it to its initial
    state: every block free, queued in id order, no keys).

    Attributes: ``pool``; ``num_blocks`` (blocks_per_pool, the null block of
    pool 0 included); ``null_block`` (0 for pool 0, whose id 0 is vLLM's
    null_block, else None: other pools have none); ``first_id`` (pool *
    blocks_per_pool: ids are global, as everywhere in blocktable).

    ``close()`` (or leaving a ``with`` block) resets the pool and gives it up
    (bt_cache_close). Module docstring: errors, thread and process safety.
    """

    __slots__ = ("_client", "_segobj", "_seg", "pool", "num_blocks", "null_block", "first_id",
                 "_nfree", "_rm", "_rm_cap", "_n", "_ins", "_b", "_key", "_hits", "_closed",
                 "__weakref__")

    def __init__(self, client: Client, pool: int = 0) -> None:
        """Private: use Client.cache_pool(pool). Errors: Busy (a live client
        owns it), InvalidArgument (not a cache pool), OutOfRange."""
        cl = client._cl
        if cl is None:
            client._gone()
        self._client = client
        self._segobj = client._segobj
        self._seg = self._segobj._s()
        _lib.cache_open(cl, pool)
        cfg = self._segobj.config
        self.pool = pool
        self.num_blocks = cfg.blocks_per_pool
        self.first_id = pool * cfg.blocks_per_pool
        self.null_block = 0 if pool == 0 else None
        self._nfree = _lib.cache_nfree_ptr(self._seg, pool)
        self._rm_cap = 64
        self._rm = _lib.new("bt_cache_key[]", self._rm_cap)
        self._n = _lib.new("uint32_t *")
        self._ins = _lib.new("int *")
        self._b = _lib.new("int32_t *")
        self._key = _lib.new("bt_cache_key *")
        self._hits = _lib.new("int32_t[]", self.num_blocks)
        self._closed = False

    # ---- life cycle ---------------------------------------------------------
    def close(self) -> None:
        """Reset the pool (every block free, every key gone) and give it up.
        Idempotent; a no-op once the client is closed (that reset it)."""
        if self._closed:
            return
        self._closed = True
        cl = self._client._cl
        if cl is None:
            return
        _lib.cache_close(cl, self.pool)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> CachePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<blocktable.CachePool pool={self.pool} free={self.num_free}/"
                f"{self.num_blocks} {'closed' if self._closed else 'open'}>")

    def _cl(self) -> Any:
        cl = self._client._cl
        if cl is None:
            raise make_error(_ECLIENT, f"cache pool {self.pool}: the client is closed")
        return cl

    def _ids_call(self, what, fn, ids, *extra):
        """fn(client, pool, ids, n, *extra) for the C calls that take a list
        of block ids; the error names `what` and the ids."""
        cl = self._client._cl
        if cl is None:
            self._cl()
        b, n = _ids(ids)
        rc = fn(cl, self.pool, b, n, *extra)
        if rc:
            raise make_error(rc, f"{what}({preview(ids)}) in cache pool {self.pool}")

    def _grow(self, n: int) -> None:
        self._rm_cap = max(n, 2 * self._rm_cap)
        self._rm = _lib.new("bt_cache_key[]", self._rm_cap)

    def _removed(self, n: int) -> list[Removed]:
        rm = self._rm
        return [(rm[i].block, bytes(_lib.buffer(rm[i].key, rm[i].len)), rm[i].ntokens)
                for i in range(n)]

    # ---- allocation and references ---------------------------------------------
    @overload
    def alloc(self, n: int, removed: Literal[False] = ...) -> I32Array: ...
    @overload
    def alloc(self, n: int, removed: Literal[True]) -> tuple[I32Array, list[Removed]]: ...

    def alloc(self, n: int, removed: bool = False) -> I32Array | tuple[I32Array, list[Removed]]:
        """vLLM get_new_blocks(n): the first n blocks of the free queue, each
        with count 1; blocks that had keys lose them (an eviction). Returns an
        int32 array of ids, or with removed=True (ids, [(block, key,
        ntokens), ...]): the keys removed, block by block, each block's
        primary key first (vLLM's BlockRemoved events). Errors: OutOfBlocks."""
        cl = self._client._cl
        if cl is None:
            self._cl()
        try:
            out = np.empty(n, I32)
        except ValueError:
            raise make_error(_lib.BT_ERANGE, f"alloc(n={n})") from None
        ob = _lib.from_buffer("int32_t[]", out)
        rc = _lib.cache_alloc(cl, self.pool, n, ob, self._rm, self._rm_cap, self._n)
        if rc == _EINVAL and self._n[0] > self._rm_cap:     # more keys than room: nothing done
            self._grow(self._n[0])
            rc = _lib.cache_alloc(cl, self.pool, n, ob, self._rm, self._rm_cap, self._n)
        if rc:
            raise make_error(rc, f"alloc(n={n}) from cache pool {self.pool} "
                                 f"({self._nfree[0]} free)")
        if removed:
            return out, self._removed(self._n[0])
        return out

    def touch(self, ids: IntsLike) -> None:
        """vLLM touch(blocks): each block with count 0 leaves the free queue
        (a prefix-cache hit on an eviction candidate); count += 1. The null
        block is accepted and ignored. Errors: OutOfRange."""
        self._ids_call("touch", _lib.cache_touch, ids)

    def free(self, ids: IntsLike, caching: bool = True) -> None:
        """vLLM free_blocks(ordered_blocks): count -= 1 each, in order; the
        blocks reaching 0 without keys (all of them when caching is False)
        go to the front of the queue in list order, those with keys to the
        tail in list order. The null block is skipped. Errors: NotHeld (a
        count would go below 0; duplicates count), OutOfRange."""
        self._ids_call("free", _lib.cache_free, ids, 1 if caching else 0)

    def unpin(self, ids: IntsLike) -> None:
        """vLLM unpin_blocks(blocks, on_reuse) (the reuse callbacks are the
        caller's): count -= 1; blocks reaching 0 go to the tail of the queue,
        with or without keys. Errors: NotHeld, InvalidArgument (null block)."""
        self._ids_call("unpin", _lib.cache_unpin, ids)

    def refcnt(self, block: int) -> int:
        """The block's reference count (vLLM ref_cnt; the null block's is 0)."""
        rc, ref = _lib.block_ref(self._seg, block)
        if rc:
            raise make_error(rc, f"refcnt({block})")
        return ref

    def set_ref(self, block: int, n: int) -> None:
        """Set a held block's count (vLLM's copy-on-write writes ref_cnt):
        only from >= 1 to >= 1, else InvalidArgument."""
        rc = _lib.cache_set_ref(self._cl(), self.pool, block, n)
        if rc:
            raise make_error(rc, f"set_ref({block}, {n}) in cache pool {self.pool}")

    @property
    def num_free(self) -> int:
        """Blocks in the free queue (vLLM get_num_free_blocks), read from the
        segment without a call."""
        return self._nfree[0]

    # ---- the map ----------------------------------------------------------------
    def insert(self, block: int, key: bytes, ntokens: int = 0) -> bool:
        """vLLM _insert_block_hash(key, block, num_tokens): False if key
        already maps to block (nothing changes); else True: key becomes the
        block's primary key (with ntokens) if it had none, an extra key
        otherwise, and maps to block after any older blocks with that key.
        Errors: OutOfKeys, InvalidArgument (key not 1..64 bytes, null block)."""
        cl = self._client._cl
        if cl is None:
            self._cl()
        rc = _lib.cache_insert(cl, self.pool, block, key, len(key), ntokens, self._ins)
        if rc:
            raise make_error(rc, f"insert(block={block}, key of {len(key)} bytes) "
                                 f"in cache pool {self.pool}")
        return self._ins[0] == 1

    def insert_many(self, blocks: IntsLike, keys: Sequence[bytes],
                    ntokens: int | Sequence[int] = 0) -> int:
        """insert() for each (block, key) pair (vLLM cache_full_blocks);
        ntokens: one int for all, or one per block. Returns how many were
        inserted. On OutOfKeys the earlier inserts stand (the exception's
        ``inserted`` attribute counts them)."""
        cl = self._client._cl
        if cl is None:
            self._cl()
        b, n = _ids(blocks, "blocks")
        if len(keys) != n:
            raise make_error(_EINVAL, f"{n} blocks for {len(keys)} keys")
        if n == 0:
            return 0
        klen = len(keys[0])
        if len(set(map(len, keys))) != 1:      # mixed lengths: one by one
            done = 0
            for i in range(n):
                done += self.insert(int(b[i]), keys[i],
                                    ntokens if isinstance(ntokens, int) else int(ntokens[i]))
            return done
        try:
            nt = _lib.NULL if ntokens == 0 and type(ntokens) is int else \
                _lib.new("uint32_t[]", [ntokens] * n if type(ntokens) is int else list(ntokens))  # type: ignore[arg-type]
        except (OverflowError, TypeError) as e:
            raise make_error(_lib.BT_ERANGE, f"ntokens: {e}") from None
        if nt != _lib.NULL and len(nt) != n:
            raise make_error(_EINVAL, f"{n} blocks for {len(nt)} ntokens")
        rc = _lib.cache_insert_many(cl, self.pool, b, n, b"".join(keys), klen, nt, self._n)
        if rc:
            e = make_error(rc, f"insert_many({n} keys) in cache pool {self.pool}")  # type: ignore[misc]
            e.inserted = self._n[0]  # type: ignore[misc, attr-defined]
            raise e  # type: ignore[misc]
        return self._n[0]

    def remove(self, block: int) -> list[Removed]:
        """vLLM _remove_cached_block_hashes(block): every key of the block
        leaves the map. Returns [(block, key, ntokens), ...], primary first
        (vLLM's extra keys are a set: their order there is unspecified)."""
        cl = self._client._cl
        if cl is None:
            self._cl()
        rc = _lib.cache_remove(cl, self.pool, block, self._rm, self._rm_cap, self._n)
        if rc == _EINVAL and self._n[0] > self._rm_cap:
            self._grow(self._n[0])
            rc = _lib.cache_remove(cl, self.pool, block, self._rm, self._rm_cap, self._n)
        if rc:
            raise make_error(rc, f"remove({block}) in cache pool {self.pool}")
        return self._removed(self._n[0]) if self._n[0] else []

    def lookup(self, key: bytes) -> int | None:
        """vLLM get_one_block(key): the oldest block mapped from key, or None.
        Counts a query (and a hit) in the pool's statistics."""
        rc = _lib.cache_lookup(self._seg, self.pool, key, len(key), self._b)
        if rc:
            raise make_error(rc, f"lookup(key of {len(key)} bytes) in cache pool {self.pool}")
        return self._b[0] or None

    def lookup_many(self, keys: Sequence[bytes]) -> list[int]:
        """Look keys up in order, stopping at the first miss (vLLM's
        find_longest_cache_hit loop): the list of blocks hit."""
        n = len(keys)
        if n == 0:
            return []
        klen = len(keys[0])
        if len(set(map(len, keys))) != 1:
            out = []
            for k in keys:
                b = self.lookup(k)
                if b is None:
                    break
                out.append(b)
            return out
        blocks = self._hits if n <= self.num_blocks else _lib.new("int32_t[]", n)
        rc = _lib.cache_lookup_many(self._seg, self.pool, b"".join(keys), n, klen, blocks, self._n)
        if rc:
            raise make_error(rc, f"lookup_many({n} keys) in cache pool {self.pool}")
        return list(blocks[0:self._n[0]])

    def block_key(self, block: int) -> tuple[bytes, int] | None:
        """The block's primary key (vLLM block.block_hash) and its ntokens
        (block_hash_num_tokens): (key, ntokens), or None without one."""
        rc = _lib.cache_block_key(self._seg, block, self._key, self._n)
        if rc:
            raise make_error(rc, f"block_key({block})")
        k = self._key
        return (bytes(_lib.buffer(k.key, k.len)), k.ntokens) if k.len else None

    def num_extra_keys(self, block: int) -> int:
        """How many keys the block has besides its primary one."""
        rc = _lib.cache_block_key(self._seg, block, self._key, self._n)
        if rc:
            raise make_error(rc, f"block_key({block})")
        return self._n[0]

    def reset(self) -> bool:
        """vLLM reset_prefix_cache(): True and every key removed (queue order
        and counts kept) when no block but the null block is in use; False
        otherwise, nothing changed."""
        rc = _lib.cache_reset(self._cl(), self.pool)
        if rc == _EBUSY:
            return False
        if rc:
            raise make_error(rc, f"reset() of cache pool {self.pool}")
        return True

    # ---- observation -----------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """A dict: owner, owner_pid, num_blocks, free, cached_free, in_use,
        keys, key_cap, queries, hits, stored, evicted, blocks_evicted, resets."""
        return cache_stats(self._seg, self.pool)

    def queue(self) -> list[int]:
        """The free queue in order (first = next allocated), as a list."""
        cap = self.num_blocks
        out = _lib.new("int32_t[]", cap)
        rc = _lib.cache_queue(self._seg, self.pool, out, cap, self._n)
        if rc:
            raise make_error(rc, f"queue() of cache pool {self.pool}")
        return list(out[0:min(self._n[0], cap)])
