"""SharedBlockPool against vLLM 0.32's own BlockPool: the same random calls
on both must give the same ids, reference counts, keys, free-queue order,
lookups and KV-cache events. Runs only where vLLM imports."""
import random

import pytest

pytest.importorskip("vllm.v1.core.block_pool")

from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id  # noqa: E402

import blocktable as bt  # noqa: E402
from blocktable.vllm import _seg, scheduler  # noqa: E402
from blocktable.vllm.pool import SharedBlockPool  # noqa: E402

from conftest import unique_name  # noqa: E402

N = 40


def _plugin_env(monkeypatch, name):
    """The plugin as an engine of 4 x 256 tokens would run it over segment `name`, with
    no btd (the segment is made in-process) and no stats files."""
    monkeypatch.setenv("BLOCKTABLE_VLLM", name)
    monkeypatch.setenv("BLOCKTABLE_VLLM_DEV", "1")
    monkeypatch.delenv("BLOCKTABLE_VLLM_STATS_DIR", raising=False)
    monkeypatch.setitem(_seg.engine_sizes, "max_num_seqs", 4)
    monkeypatch.setitem(_seg.engine_sizes, "max_model_len", 256)
    monkeypatch.setattr(_seg, "_connect_btd", lambda *a: (_ for _ in ()).throw(RuntimeError("no btd")))


def _pool_pair(monkeypatch, name, events):
    """A stock BlockPool and a SharedBlockPool of N blocks over segment `name`; the
    segment is unlinked afterwards."""
    _plugin_env(monkeypatch, name)
    stock = BlockPool(N, True, 16, enable_kv_cache_events=events)
    shared = SharedBlockPool(N, True, 16, enable_kv_cache_events=events)
    try:
        yield stock, shared
    finally:
        _seg.disconnect()
        bt.Segment.unlink(name)


@pytest.fixture(params=[0, 10], ids=["exact", "larger-segment"])
def pools(monkeypatch, request):
    name = unique_name("vpool")
    if request.param:       # a segment left by a larger engine: its extra ids are never used
        cfg = _seg.segment_config(N + request.param, 16, 4, 256, cache_pools=1)
        bt.Segment.create(name, bt.SegmentConfig(**cfg)).close()
    yield from _pool_pair(monkeypatch, name, True)


def _key(i):
    return make_block_hash_with_group_id(i.to_bytes(32, "big"), 0)


def _same(stock, shared, strict=True):
    assert shared.get_num_free_blocks() == stock.get_num_free_blocks()
    assert shared.bt_cp.queue() == [b.block_id for b in stock.free_block_queue.get_all_free_blocks()]
    for a, b in zip(stock.blocks[1:], shared.blocks[1:]):
        assert (b.ref_cnt, b.block_hash, b.block_hash_num_tokens) == \
            (a.ref_cnt, a.block_hash, a.block_hash_num_tokens), a.block_id
    ea, eb = stock.take_events(), shared.take_events()
    if strict:
        assert eb == ea
    else:   # a block's extra keys are a set in vLLM: their removal order is unspecified
        assert sorted(map(repr, eb)) == sorted(map(repr, ea))


def _ids(blocks):
    return [b.block_id for b in blocks]


@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_random_calls_match_vllm(pools, seed, extras):
    stock, shared = pools
    rng = random.Random(seed)
    held = []                                   # [(stock blocks, shared blocks)] per "request"
    nkeys = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            n = rng.randint(1, 4)
            if n > stock.get_num_free_blocks():
                with pytest.raises(ValueError):
                    shared.get_new_blocks(n)
                continue
            a, b = stock.get_new_blocks(n), shared.get_new_blocks(n)
            assert _ids(b) == _ids(a)
            held.append((a, b))
        elif op < 0.5 and held:                 # cache some held blocks (cache_full_blocks' core)
            a, b = rng.choice(held)
            for x, y in zip(a, b):
                if x.block_hash is None or (extras and rng.random() < 0.2):
                    k = _key(rng.randrange(nkeys + 1))
                    nkeys += 1
                    stock._insert_block_hash(k, x, 16)
                    shared._insert_block_hash(k, y, 16)
        elif op < 0.65:                         # a prefix hit: lookup + touch
            k = rng.randrange(nkeys + 1).to_bytes(32, "big")
            a, b = stock.get_cached_block(k, [0]), shared.get_cached_block(k, [0])
            assert (b and _ids(b)) == (a and _ids(a))
            if a:
                stock.touch(a)
                shared.touch(b)
                held.append((a, b))
        elif op < 0.72 and held:                # copy-on-write: vLLM's `ref_cnt += 1`
            a, b = rng.choice(held)
            a[0].ref_cnt += 1
            b[0].ref_cnt += 1
            held.append(([a[0]], [b[0]]))
        elif op < 0.95 and held:                # a request ends: blocks freed tail first
            a, b = held.pop(rng.randrange(len(held)))
            stock.free_blocks(reversed(a))
            shared.free_blocks(reversed(b))
        elif op < 0.98 and held:                # evict_blocks (KV connectors)
            ids = {rng.randrange(1, N) for _ in range(2)}
            stock.evict_blocks(ids)
            shared.evict_blocks(ids)
        else:
            assert shared.reset_prefix_cache() == stock.reset_prefix_cache()
        _same(stock, shared, strict=not extras)
    while held:
        a, b = held.pop()
        stock.free_blocks(reversed(a))
        shared.free_blocks(reversed(b))
    assert shared.reset_prefix_cache() and stock.reset_prefix_cache()
    _same(stock, shared, strict=not extras)
    assert shared.get_num_free_blocks() == N - 1
    assert shared.bt_cp.stats()["in_use"] == len(shared.bt_pinned)


def test_segment_too_small_for_the_engine(monkeypatch):
    name = unique_name("vsmall")
    _plugin_env(monkeypatch, name)
    cfg = _seg.segment_config(N, 16, 4, 128, cache_pools=1)   # rows too narrow for 256 tokens
    seg = bt.Segment.create(name, bt.SegmentConfig(**cfg))
    try:
        with pytest.raises(RuntimeError) as e:
            SharedBlockPool(N, True, 16)
        assert "row_width=9" in str(e.value) and "row_width=17" in str(e.value)
    finally:
        _seg.disconnect()
        seg.close()
        bt.Segment.unlink(name)


@pytest.fixture(params=[False, True], ids=["no-events", "events"])
def pool_pair(monkeypatch, request):
    """A stock and a shared pool of N blocks, KV events on or off (off takes
    SharedBlockPool's one-call cache_full_blocks; on, vLLM's own loop)."""
    name = unique_name("vcfb")
    yield from _pool_pair(monkeypatch, name, request.param)


@pytest.mark.parametrize("seed", range(3))
def test_cache_full_blocks_matches_vllm(pool_pair, seed):
    """Requests (vLLM's own Request and block hasher) grow token by token;
    each step caches its newly full blocks in both pools, finished requests
    free theirs, and new ones look their prefix up: ids, keys, counts, queue
    order and hits stay the same as vLLM's."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request
    init_none_hash(sha256)
    hasher = get_request_block_hasher(16, sha256)
    stock, shared = pool_pair
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(rng.choice([16, 40]))] for _ in range(3)]
    live = []                   # [request, stock blocks, shared blocks, cached]
    for step in range(300):
        if len(live) < 4 and rng.random() < 0.3:
            toks = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
            req = Request(f"r{step}", toks, SamplingParams(max_tokens=8), None,
                          block_hasher=hasher)
            hits = []
            for h in req.block_hashes:                      # the longest cached prefix
                a, b = stock.get_cached_block(h, [0]), shared.get_cached_block(h, [0])
                assert (b and _ids(b)) == (a and _ids(a))
                if not a:
                    break
                hits.append((a[0], b[0]))
            sa, sb = [x for x, _ in hits], [y for _, y in hits]
            stock.touch(sa)
            shared.touch(sb)
            live.append([req, sa, sb, len(hits)])
        for ent in live:
            req, sa, sb, cached = ent
            need = -(-req.num_tokens // 16) - len(sa)
            if need > 0:
                if need > stock.get_num_free_blocks():
                    continue
                sa += stock.get_new_blocks(need)
                sb += shared.get_new_blocks(need)
                assert _ids(sb) == _ids(sa)
            full = req.num_tokens // 16
            stock.cache_full_blocks(req, sa, cached, full, 16, 0)
            shared.cache_full_blocks(req, sb, cached, full, 16, 0)
            ent[3] = max(cached, full)
            req.append_output_token_ids(rng.randrange(1000))    # the hasher adds full blocks
        for ent in [e for e in live if e[0].num_tokens > 90 or rng.random() < 0.03]:
            live.remove(ent)
            stock.free_blocks(reversed(ent[1]))
            shared.free_blocks(reversed(ent[2]))
        _same(stock, shared)
    assert shared.bt_cp.stats()["stored"] > 0 and shared.bt_cp.stats()["hits"] > 0
