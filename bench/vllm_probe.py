"""A vLLM general plugin for bench/bench_vllm.py: times the block pool in the EngineCore.

Loaded only in the benchmark's engines (bench_vllm.py puts it on PYTHONPATH with a
dist-info naming it in vllm.general_plugins) and only acts when BT_BENCH_PROBE_DIR is set.

The pool is timed where the engine uses it, identically for stock vLLM and blocktable:
after a KV-cache coordinator is built, the public methods of the class of its block_pool
(vLLM's BlockPool, or the blocktable subclass the plugin installs) are wrapped with a
perf_counter_ns timer; a call made from inside another timed call is not counted twice.
Each scheduler step (Scheduler.schedule) records its wall time and the pool time spent since
the previous step, per category; the records go to BT_BENCH_PROBE_DIR/steps-<pid>.json
every second and at exit.
"""
import atexit
import json
import os
import time

CATEGORIES = {
    "get_new_blocks": "alloc",
    "free_blocks": "free", "unpin_blocks": "free",
    "touch": "touch",
    "cache_full_blocks": "cache", "cache_partial_block": "cache", "move_block_hashes": "cache",
    "get_cached_block": "lookup",
    "get_num_free_blocks": "other", "get_usage": "other", "take_events": "other",
    "evict_blocks": "other", "reset_prefix_cache": "other",
}
CATS = ("alloc", "free", "touch", "cache", "lookup", "other")

_acc = dict.fromkeys(CATS, 0)       # ns since the last step record
_calls = dict.fromkeys(CATS, 0)
_depth = [0]
_steps = []                         # (wall time at start, schedule ns, running, pool ns per cat)
_wrapped = set()
_last_dump = [0.0]
_pool_class = [None]
_probe_ns = [None]


def _timed(fn, cat):
    pc = time.perf_counter_ns

    def wrapper(*a, **kw):
        if _depth[0]:
            return fn(*a, **kw)
        _depth[0] = 1
        t = pc()
        try:
            return fn(*a, **kw)
        finally:
            _acc[cat] += pc() - t
            _calls[cat] += 1
            _depth[0] = 0
    wrapper.__wrapped__ = fn
    return wrapper


def _probe_cost(n=20000):
    """What a timed call of a no-op method records (ns): the wrapper's share that
    falls inside every figure (one perf_counter_ns and the call through *a, **kw),
    stock's and blocktable's alike. Median of 5."""
    class C:
        def f(self):
            return None
    c, runs = C(), []
    w = _timed(C.f, "other")
    for _ in range(5):
        before = _acc["other"]
        for _ in range(n):
            w(c)
        runs.append((_acc["other"] - before) / n)
    _acc["other"] = 0
    _calls["other"] = 0
    return sorted(runs)[2]


def _wrap_pool_class(cls):
    if cls in _wrapped:
        return
    _wrapped.add(cls)
    _pool_class[0] = f"{cls.__module__}.{cls.__qualname__}"
    for name, cat in CATEGORIES.items():
        fn = getattr(cls, name, None)
        if fn is not None:
            setattr(cls, name, _timed(fn, cat))


def _dump():
    d = os.environ["BT_BENCH_PROBE_DIR"]
    tmp = os.path.join(d, f".steps-{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "pool_class": _pool_class[0], "cats": CATS,
                   "probe_ns_per_call": _probe_ns[0], "steps": _steps}, f)
    os.replace(tmp, os.path.join(d, f"steps-{os.getpid()}.json"))
    _last_dump[0] = time.monotonic()


def register():
    if not os.environ.get("BT_BENCH_PROBE_DIR"):
        return
    from vllm.v1.core.sched import scheduler as sched
    if getattr(sched.Scheduler.schedule, "_bt_probe", False):
        return                      # inherited from a forked parent
    from vllm.v1.core import kv_cache_coordinator as kcc

    orig_init = kcc.KVCacheCoordinator.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        _wrap_pool_class(type(self.block_pool))
        if _probe_ns[0] is None:
            _probe_ns[0] = _probe_cost()
    kcc.KVCacheCoordinator.__init__ = init

    orig_schedule = sched.Scheduler.schedule

    def schedule(self, *a, **kw):
        t0 = time.time()
        p0 = time.perf_counter_ns()
        out = orig_schedule(self, *a, **kw)
        dt = time.perf_counter_ns() - p0
        _steps.append((t0, dt, len(self.running), [_acc[c] for c in CATS],
                       [_calls[c] for c in CATS]))
        for c in CATS:
            _acc[c] = 0
            _calls[c] = 0
        if time.monotonic() - _last_dump[0] > 1.0:
            _dump()
        return out
    schedule._bt_probe = True
    sched.Scheduler.schedule = schedule
    atexit.register(_dump)
