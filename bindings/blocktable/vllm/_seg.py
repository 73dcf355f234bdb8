"""The segment connection of one engine process, and its stats file.

One connection per process (the EngineCore's scheduler and, at TP=1, its
in-process worker share it). It goes through btd: ``blocktable.connect(name,
create=config)`` asks btd to serve the segment, creating it with `config` if
it does not exist yet (btd answers BT_ECONFIG, naming both sizes, when an
existing one is too small). Workers connect without `create`: by the time
they run a step the scheduler has made the segment.

BLOCKTABLE_VLLM_DEV=1 (development only): when btd is not running, the
segment is created / attached directly, with the same size check here.
"""
import atexit
import json
import multiprocessing.util
import os
import threading
import time

import blocktable
from blocktable import Segment, SegmentConfig
from blocktable.connect import DaemonNotRunning

from ._env import ENV_DEV, ENV_STATS, enabled

__all__ = ["connect", "disconnect", "segment_config", "check_fits", "Stats", "SIZE_FIELDS"]

SIZE_FIELDS = ("blocks_per_pool", "num_rows", "row_width")   # existing must be >= asked
SAME_FIELDS = ("block_size",)                                # existing must equal asked

_lock = threading.Lock()
_client = None



# The engine's sizes, stashed by the patched Scheduler.__init__ (scheduler.py)
# for the BlockPool that KVCacheManager builds inside it (pool.py): only
# Scheduler.__init__ knows max_num_seqs and max_model_len.
engine_sizes = {}

def segment_config(num_blocks, block_size, max_num_seqs, max_model_len, cache_pools=1):
    """The segment an engine needs, as a dict of bt_config fields.
    Rows: each live request holds one, and a freed request's row is kept
    until the batches in flight that may read it are done (async scheduling
    keeps up to two steps in flight): 3 x max_num_seqs plus a margin."""
    row_width = -(-int(max_model_len) // int(block_size)) + 1
    cfg = {"block_size": int(block_size), "num_pools": 1, "blocks_per_pool": int(num_blocks),
           "num_rows": 3 * int(max_num_seqs) + 8, "row_width": row_width}
    if cache_pools:
        cfg["cache_pools"] = cache_pools
    return cfg


def check_fits(name, have, need):
    """RuntimeError naming both sizes when segment config `have` cannot host
    an engine needing `need` (dicts or SegmentConfigs)."""
    get = (lambda c, k: c[k] if isinstance(c, dict) else getattr(c, k))  # noqa: E731
    bad = [k for k in SIZE_FIELDS if k in need and get(have, k) < need[k]]
    bad += [k for k in SAME_FIELDS if k in need and get(have, k) != need[k]]
    if need.get("cache_pools") and get(have, "cache_pools") < need["cache_pools"]:
        bad.append("cache_pools")
    if bad:
        h = ", ".join(f"{k}={get(have, k)}" for k in need)
        n = ", ".join(f"{k}={v}" for k, v in need.items())
        raise RuntimeError(f"segment {name!r} has {h}; the engine needs {n}")


def _connect_btd(name, create):
    return blocktable.connect(name, create=create)


def _connect_local(name, create):
    if create is not None:
        seg = Segment.create(name, SegmentConfig(**create), exclusive=False)
        check_fits(name, seg.config, create)
    else:
        seg = Segment.attach(name)
    return seg.client()


def connect(create=None):
    """This process's Client on the segment named by BLOCKTABLE_VLLM (made
    once). create: the config dict the engine needs (scheduler), or None
    (workers: the segment must exist)."""
    global _client
    with _lock:
        if _client is not None and not _client.closed:
            if create is not None:
                check_fits(enabled(), _client.segment.config, create)
            return _client
        name = enabled()
        try:
            _client = _connect_btd(name, create)
        except (DaemonNotRunning, RuntimeError):
            if not os.environ.get(ENV_DEV):
                raise
            _client = _connect_local(name, create)
        if create is not None:
            check_fits(name, _client.segment.config, create)
        return _client


def disconnect():
    """Close this process's client (its rows are released, its cache pool
    reset). The next connect() makes a new one."""
    global _client
    with _lock:
        if _client is not None:
            seg = _client.segment
            _client.close()
            seg.close()
        _client = None


class Stats(dict):
    """Counters of one patched process, written as JSON to
    $BLOCKTABLE_VLLM_STATS_DIR/<role>-<pid>.json at exit (atexit, and
    multiprocessing's exit finalizers), at most every `period` seconds while
    counting (maybe_flush), and whenever the owner calls flush(). Without the variable,
    nothing is written. Not thread-safe (one per role per process)."""

    def __init__(self, role, period=0.5, **fields):
        super().__init__(role=role, pid=os.getpid(), segment=enabled(), **fields)
        self.sources = []       # callables returning counters kept elsewhere (read at flush)
        d = os.environ.get(ENV_STATS)
        self.path = os.path.join(d, f"{role}-{os.getpid()}.json") if d else None
        self.period = period
        self._last = 0.0
        if self.path:
            os.makedirs(d, exist_ok=True)
            # vLLM's EngineCore and workers are multiprocessing children, which
            # leave through os._exit: atexit never runs there, multiprocessing's
            # finalizers do (util._exit_function in Process._bootstrap).
            atexit.register(self.flush)
            multiprocessing.util.Finalize(self, self.flush, exitpriority=10)

    def maybe_flush(self):
        if self.path:
            now = time.monotonic()
            if now - self._last >= self.period:
                self._last = now
                self.flush()

    def flush(self):
        if not self.path:
            return
        for src in self.sources:
            self.update(src())
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(self), f)
        os.replace(tmp, self.path)      # readers never see half a file
