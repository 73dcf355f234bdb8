"""CachePool: vLLM's BlockPool and prefix cache in the segment.

The orders and results vLLM relies on (the ids get_new_blocks hands out, the
block a key finds, what eviction removes), the refusals, ownership across
processes (a SIGKILLed owner is recovered and its pool reset), and a
differential test against vLLM's own BlockPool where vllm is importable."""
import multiprocessing as mp
import os
import random
import signal

import numpy as np
import pytest

import blocktable as bt

CFG = bt.SegmentConfig(num_pools=3, blocks_per_pool=32, num_rows=8, row_width=16,
                       max_clients=8, hand_size=64, cache_pools=2)
FORK = mp.get_context("fork")


def key(i, n=36):
    return (i.to_bytes(4, "little") * 16)[:n]


@pytest.fixture
def cseg():
    with bt.Segment.create(None, CFG) as s:
        yield s


@pytest.fixture
def cp(cseg):
    """Cache pool 0 of cseg, through a client of its own."""
    with cseg.client() as c, c.cache_pool(0) as p:
        yield p


def test_initial_state(cseg, cp):
    assert cp.pool == 0 and cp.null_block == 0 and cp.num_blocks == 32 and cp.first_id == 0
    assert cp.num_free == 31
    assert cp.queue() == list(range(1, 32))
    st = cseg.cache_stats(0)
    assert st["free"] == 31 and st["in_use"] == 0 and st["keys"] == 0
    assert st["key_cap"] == 64 and st["owner"] == cp._client.id and st["owner_pid"] == os.getpid()
    assert cseg.config.cache_keys == 64          # 0 resolved to 2 * blocks_per_pool
    with cseg.client() as c2:
        p1 = c2.cache_pool(1)
        assert p1.null_block is None and p1.queue() == list(range(32, 64))
        assert p1.num_free == 32
        p1.close()
    assert cseg.check().clean


def test_free_orders_like_vllm(cp):
    ids = cp.alloc(4)
    assert ids.tolist() == [1, 2, 3, 4] and ids.dtype == np.int32
    assert [cp.refcnt(b) for b in ids] == [1, 1, 1, 1]
    # no hash: prepended in the given order (vLLM frees a request reversed)
    cp.free(ids[::-1][:2])                        # 4, 3
    assert cp.queue()[:3] == [4, 3, 5]
    # hashed: appended to the tail
    assert cp.insert(1, key(1), 16) and cp.insert(2, key(2), 32)
    cp.free([2, 1])
    assert cp.queue()[-2:] == [2, 1]
    assert cp.stats()["cached_free"] == 2
    # a hit on an eviction candidate: touch takes it out of the queue
    assert cp.lookup(key(2)) == 2
    cp.touch([2, 0])                              # the null block: accepted, ignored
    assert 2 not in cp.queue() and cp.refcnt(2) == 1 and cp.refcnt(0) == 0
    cp.free([2, 0])
    assert cp.queue()[-1] == 2
    with pytest.raises(bt.NotHeld):
        cp.free([2])
    # caching=False: hashed blocks are prepended too
    cp.touch([1])
    cp.free([1], caching=False)
    assert cp.queue()[0] == 1
    # eviction: allocating a hashed block removes its keys, reported in order
    got, removed = cp.alloc(1, removed=True)
    assert got.tolist() == [1] and removed == [(1, key(1), 16)]
    assert cp.lookup(key(1)) is None
    st = cp.stats()
    assert st["evicted"] == 1 and st["blocks_evicted"] == 1 and st["stored"] == 2
    # unpin: appended whatever the keys
    cp.unpin([1])
    assert cp.queue()[-1] == 1
    with pytest.raises(bt.InvalidArgument):
        cp.unpin([0])
    with pytest.raises(bt.OutOfBlocks):
        cp.alloc(cp.num_free + 1)


def test_map(cp, cseg):
    a = cp.alloc(4).tolist()
    assert cp.insert(a[1], key(5), 16) and cp.insert(a[0], key(5), 16)
    assert cp.lookup(key(5)) == a[1]              # the oldest block with the key
    assert cseg.cache_lookup(0, key(5)) == a[1]
    assert not cp.insert(a[0], key(5), 99)        # already maps there
    assert cp.insert(a[0], key(6), 32) and cp.insert(a[0], key(7, 20), 48)
    assert cp.block_key(a[0]) == (key(5), 16) and cp.num_extra_keys(a[0]) == 2
    assert cp.block_key(a[3]) is None
    assert cp.remove(a[1]) == [(a[1], key(5), 16)]
    assert cp.lookup(key(5)) == a[0]
    assert cp.remove(a[0]) == [(a[0], key(5), 16), (a[0], key(6), 32), (a[0], key(7, 20), 48)]
    assert cp.remove(a[0]) == []
    assert cp.insert_many(a[:3], [key(10), key(11), key(12)], [1, 2, 3]) == 3
    assert cp.insert_many(a[:3], [key(10), key(11), key(12)], 0) == 0
    assert cp.lookup_many([key(10), key(11), key(99), key(12)]) == a[:2]
    assert cp.insert_many([a[3], a[3]], [key(13, 8), key(14, 9)], 5) == 2   # mixed lengths
    with pytest.raises(bt.InvalidArgument):
        cp.insert(a[0], b"", 0)
    with pytest.raises(bt.InvalidArgument):
        cp.insert(a[0], b"x" * 65, 0)
    with pytest.raises(bt.InvalidArgument):
        cp.insert(0, key(1), 0)                   # the null block is never cached
    with pytest.raises(bt.OutOfRange):
        cp.insert(40, key(1), 0)                  # pool 1's id
    # reset_prefix_cache: False while blocks are in use, then clears the map
    assert cp.reset() is False and cp.lookup(key(10)) == a[0]
    cp.free(a)
    before = cp.queue()
    assert cp.reset() is True
    assert cp.queue() == before and cp.lookup(key(10)) is None
    assert cp.stats()["keys"] == 0 and cp.stats()["resets"] == 1


def test_out_of_keys():
    cfg = bt.SegmentConfig(num_pools=1, blocks_per_pool=16, num_rows=4, row_width=4,
                           max_clients=4, hand_size=8, cache_pools=1, cache_keys=3)
    with bt.Segment.create(None, cfg) as s, s.client() as c, c.cache_pool(0) as p:
        a = p.alloc(4).tolist()
        assert p.insert_many(a[:3], [key(1), key(2), key(3)], 0) == 3
        with pytest.raises(bt.OutOfKeys):
            p.insert(a[3], key(4), 0)
        p.remove(a[0])
        with pytest.raises(bt.OutOfKeys) as ei:
            p.insert_many([a[0], a[3]], [key(8), key(9)], 0)
        assert ei.value.inserted == 1 and p.lookup(key(8)) == a[0]
        assert isinstance(ei.value, MemoryError)


def test_set_ref(cp):
    b = int(cp.alloc(1)[0])
    cp.set_ref(b, 3)
    assert cp.refcnt(b) == 3
    with pytest.raises(bt.InvalidArgument):
        cp.set_ref(b, 0)
    with pytest.raises(bt.InvalidArgument):
        cp.set_ref(cp.queue()[0], 2)
    cp.free([b, b, b])
    assert cp.queue()[0] == b


def test_refusals(cseg):
    with cseg.client() as a, cseg.client() as b:
        with pytest.raises(bt.InvalidArgument):
            a.alloc(1, pool=0)                    # a cache pool: never on a free stack
        with pytest.raises(bt.InvalidArgument):
            cseg.pool_pop(1, 1)
        with pytest.raises(bt.InvalidArgument):
            a.cache_pool(2)                       # a Treiber pool
        with pytest.raises(bt.OutOfRange):
            a.cache_pool(3)
        p = a.cache_pool(0)
        with pytest.raises(bt.Busy):
            b.cache_pool(0)
        ids = p.alloc(2)
        row = a.claim_row(key=1)                  # MANAGED rows never hold cache ids
        with pytest.raises(bt.InvalidArgument):
            a.append(row, ids)
        raw = a.claim_row(key=2, raw=True)        # RAW rows may: the scheduler's rows
        a.append(raw, ids)
        assert cseg.read_row(raw)[0].tolist() == ids.tolist()
        assert a.alloc(2, pool=2).tolist() == [64, 65]
        assert cseg.check().clean
        p.close()
        assert cseg.cache_stats(0)["owner"] == 0 and cseg.cache_stats(0)["in_use"] == 0
        with pytest.raises(bt.NotOwner):
            p.alloc(1)
        q = b.cache_pool(0)
        q.alloc(3)
    # closing b's client reset its pool
    st = cseg.cache_stats(0)
    assert st["owner"] == 0 and st["free"] == 31


# ---- across processes ---------------------------------------------------------

def _own_then_block(name, conn):
    seg = bt.Segment.attach(name)
    c = seg.client()
    p = c.cache_pool(0)
    ids = p.alloc(6)
    p.insert(int(ids[0]), key(1), 16)
    p.free(ids[:2])
    conn.send((c.id, ids.tolist()))
    conn.recv()                                   # the parent kills us here


@pytest.mark.parametrize("how", ["recover", "repair"])
def test_sigkilled_owner_is_recovered(shm_name, how):
    with bt.Segment.create(shm_name, CFG) as seg:
        parent, child = FORK.Pipe()
        p = FORK.Process(target=_own_then_block, args=(shm_name, child))
        p.start()
        assert parent.poll(30), "child did not report"
        cid, ids = parent.recv()
        st = seg.cache_stats(0)
        assert st["owner"] == cid and st["in_use"] == 4 and st["keys"] == 1
        assert seg.cache_lookup(0, key(1)) == ids[0]      # a reader in another process
        with seg.client() as c:
            with pytest.raises(bt.Busy):
                c.cache_pool(0)
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            assert p.exitcode == -signal.SIGKILL
            if how == "recover":
                seg.recover_client(cid)
            else:
                rep = seg.check(repair=True)
                assert rep.cache_reset == 1 and rep.clients_reaped == 1
            st = seg.cache_stats(0)
            assert st["owner"] == 0 and st["free"] == 31 and st["keys"] == 0
            assert seg.cache_lookup(0, key(1)) is None
            with c.cache_pool(0) as np_:
                assert np_.queue() == list(range(1, 32))
                assert np_.alloc(2).tolist() == [1, 2]
            assert seg.check().clean


# ---- differential test against vLLM's BlockPool ------------------------------

def _vllm():
    try:
        from vllm.v1.core.block_pool import BlockPool
        from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id
    except Exception as e:  # noqa: BLE001 - any import failure means: not here
        pytest.skip(f"vllm is not importable here ({type(e).__name__}: {e}); run this file "
                    f"with a Python that has vllm 0.32 to compare against its BlockPool")
    return BlockPool, BlockHash, make_block_hash_with_group_id


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_matches_vllm_block_pool(seed):
    BlockPool, BlockHash, with_group = _vllm()
    from vllm.distributed.kv_events import BlockRemoved
    from vllm.v1.core.kv_cache_utils import get_block_hash, maybe_convert_block_hash
    N = 40
    cfg = bt.SegmentConfig(num_pools=1, blocks_per_pool=N, num_rows=4, row_width=4,
                           max_clients=4, hand_size=8, cache_pools=1, cache_keys=4 * N)
    rng = random.Random(seed)
    keys = [with_group(BlockHash(rng.randbytes(32)), rng.randrange(2)) for _ in range(60)]
    vp = BlockPool(num_gpu_blocks=N, enable_caching=True, hash_block_size=16,
                   enable_kv_cache_events=True)
    with bt.Segment.create(None, cfg) as seg, seg.client() as c, c.cache_pool(0) as cp:
        held = []                                 # block ids, with multiplicity
        B = vp.blocks

        def removed_events():
            ev = vp.take_events()
            out = []
            for e in ev:
                assert isinstance(e, BlockRemoved)
                out.extend(e.block_hashes)
            return out

        def ext(k):                               # vLLM's event form of a key
            return maybe_convert_block_hash(get_block_hash(k))

        def same_removed(ours, theirs):
            # primary first in both; vLLM's extra keys are a set: compare as sets
            assert [ext(k) for _, k, _ in ours][:1] == theirs[:1] or not ours
            assert sorted(ext(k) for _, k, _ in ours) == sorted(theirs)

        for step in range(3000):
            op = rng.random()
            if op < 0.22:
                n = rng.randrange(6)
                if n > vp.get_num_free_blocks():
                    with pytest.raises(bt.OutOfBlocks):
                        cp.alloc(n)
                    continue
                vb = vp.get_new_blocks(n)
                ids, rm = cp.alloc(n, removed=True)
                assert ids.tolist() == [b.block_id for b in vb]
                # block by block, each block's primary first; vLLM's extras
                # are a set, so within a block the rest compares as a set
                theirs, at = removed_events(), 0
                assert len(rm) == len(theirs)
                for b in ids.tolist():
                    mine = [ext(k) for blk, k, _ in rm if blk == b]
                    chunk = theirs[at:at + len(mine)]
                    at += len(mine)
                    assert mine[:1] == chunk[:1] and sorted(mine) == sorted(chunk)
                held += ids.tolist()
            elif op < 0.40 and held:
                rng.shuffle(held)
                k = rng.randrange(1, min(6, len(held)) + 1)
                batch, held = held[:k], held[k:]
                if rng.random() < 0.2:
                    batch.append(0)               # a request's null-block entries
                vp.free_blocks([B[b] for b in batch])
                cp.free(batch)
            elif op < 0.55:
                # touch: prefix-cache hits, plus held blocks (shared prefixes)
                batch = []
                for _ in range(rng.randrange(4)):
                    hit = vp.cached_block_hash_to_block.get_one_block(rng.choice(keys))
                    if hit is not None:
                        batch.append(hit.block_id)
                    elif held:
                        batch.append(rng.choice(held))
                vp.touch([B[b] for b in batch])
                cp.touch(batch)
                held += batch
            elif op < 0.60 and held:
                b = held.pop(rng.randrange(len(held)))
                if b == 0 or held.count(b) or vp.blocks[b].ref_cnt != 1:
                    held.append(b)
                    continue
                vp.unpin_blocks([B[b]], on_reuse=lambda blk: None)
                cp.unpin([b])
            elif op < 0.85:
                b = rng.randrange(1, N)
                k = rng.choice(keys)
                nt = rng.randrange(1, 500)
                expect = not (B[b].block_hash == k or vp.cached_block_hash_to_block.contain(k, b))
                vp._insert_block_hash(k, B[b], num_tokens=nt)
                assert cp.insert(b, k, nt) == expect
            elif op < 0.93:
                b = rng.randrange(1, N)
                theirs = vp._remove_cached_block_hashes(B[b])
                ours = cp.remove(b)
                same_removed(ours, [ext(k) for k in theirs])
                vp.take_events()
            elif op < 0.96:
                assert cp.reset() == vp.reset_prefix_cache()
                vp.take_events()
            else:                                 # free everything: a quiet point
                vp.free_blocks([B[b] for b in held])
                cp.free(held)
                held = []
            # the whole observable state
            assert cp.queue() == [b.block_id for b in vp.free_block_queue.get_all_free_blocks()]
            assert cp.num_free == vp.get_num_free_blocks()
            for b in range(1, N):
                assert cp.refcnt(b) == B[b].ref_cnt, f"block {b}"
                bk = cp.block_key(b)
                assert (bk[0] if bk else None) == B[b].block_hash
                if bk:
                    assert bk[1] == B[b].block_hash_num_tokens
                assert cp.num_extra_keys(b) == len(vp.cached_block_hashes_by_block.get(b, ()))
            for k in keys:
                vb = vp.cached_block_hash_to_block.get_one_block(k)
                assert cp.lookup(k) == (vb.block_id if vb else None)
        st = cp.stats()
        assert st["evicted"] > 0 and st["hits"] > 0 and st["resets"] > 0   # it was exercised
        assert seg.check().clean
