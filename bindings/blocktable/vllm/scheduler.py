"""Scheduler side (the EngineCore): per-request rows written as the
scheduler allocates, and the BlockPool in the segment (pool.py).

What is patched, and why there (class attributes; only the EngineCore runs
this code):

  Scheduler.__init__           (wrapped) the engine's sizes (max_num_seqs,
      max_model_len) are known here and nowhere below: they are stashed for
      the BlockPool that KVCacheManager's coordinator builds inside it, which
      connects to the segment sized from them. After it, the rows writer is
      attached to the KVCacheManager.
  Scheduler.schedule / update_from_output  (wrapped) count the non-empty
      steps sent to the workers and answered by them (vLLM's own
      sched_step_seq / processed_step_seq exist only with KV connectors that
      defer frees). A row is released only once every batch scheduled
      before its release has been answered: with async scheduling a batch
      in flight may still have to be gathered from it.
  KVCacheManager.allocate_slots  (wrapped) the one call through which the
      scheduler gives a request blocks (prefix hits and new blocks): after
      it, the request's row is brought up to its block list (claim on first
      use, then append the new ids).
  KVCacheManager.free / pop_blocks_for_free  (wrapped) the two ways the
      scheduler gives up a request's blocks (finish, preemption, deferred
      free): the row is queued for release; a preempted request's next row
      gets the next incarnation's key (keys.py).
  kv_cache_coordinator.BlockPool (the name the coordinator constructs)
      -> pool.SharedBlockPool.

Supported: one KV-cache group of full attention (what a plain decoder
uses); anything else is refused at engine start (RuntimeError).
"""
import collections

from . import _seg
from .keys import request_key

__all__ = ["install", "SchedulerRows"]

_installed = False


class SchedulerRows:
    """The rows of one scheduler: request id -> [row, ids written]. Not
    thread-safe (the EngineCore's scheduler thread only). Errors:
    RuntimeError when the segment's rows run out (naming the sizes)."""

    def __init__(self, client, manager, stats):
        from blocktable import _lib
        self.cl = client
        self._clp = _lib.client_handle(client)  # the hot append: bt_row_append, bare
        self._append = _lib.row_append
        self._fail = _lib.fail
        self.mgr = manager                      # the single-type manager of group 0
        self.stats = stats
        self.rows = {}
        self.inc = {}
        self.pending = collections.deque()      # (sched_seq at release, row)
        self.sched_seq = 0
        self.done_seq = 0

    def sync(self, request):
        """Bring the request's row up to its block list."""
        rid = request.request_id
        blocks = self.mgr.req_to_blocks.get(rid)
        if not blocks:
            return
        st = self.rows.get(rid)
        if st is None:
            st = self.rows[rid] = [self._claim(request_key(rid, self.inc.get(rid, 0))), 0]
        n = len(blocks)
        if n > st[1]:
            ids = [b.block_id for b in blocks[st[1]:]]
            rc = self._append(self._clp, st[0], ids, len(ids))
            if rc:
                raise self._fail(rc, f"appending {ids[:8]} to row {st[0]} of {rid!r}")
        elif n < st[1]:                         # never for full attention; stay right anyway
            self.cl.set_row(st[0], [b.block_id for b in blocks])
        else:
            return
        st[1] = n
        self.stats["rows_written"] += 1

    def _claim(self, key):
        from blocktable import OutOfRows
        try:
            return self.cl.claim_row(key, raw=True)
        except OutOfRows:
            self.drain(force_done=False)
            try:
                return self.cl.claim_row(key, raw=True)
            except OutOfRows:
                c = self.cl.segment.config
                raise RuntimeError(
                    f"blocktable.vllm: segment {self.cl.segment.name!r} has {c.num_rows} rows, "
                    f"all in use ({len(self.rows)} live requests, {len(self.pending)} awaiting "
                    "batches in flight)") from None

    def release(self, request):
        rid = request.request_id
        st = self.rows.pop(rid, None)
        if st is not None:
            self.pending.append((self.sched_seq, st[0]))
        if request.is_finished():
            self.inc.pop(rid, None)
        else:                                   # preempted: a new row, a new key next time
            self.inc[rid] = self.inc.get(rid, 0) + 1
        if self.rows:
            self.stats.maybe_flush()
        else:                                   # idle: the counters are final for now
            self.stats.flush()

    def drain(self, force_done=False):
        p = self.pending
        while p and (force_done or p[0][0] <= self.done_seq):
            self.cl.release_row(p.popleft()[1])


def _sizes_from(vllm_config):
    sc, mc = vllm_config.scheduler_config, vllm_config.model_config
    return {"max_num_seqs": sc.max_num_seqs, "max_model_len": mc.max_model_len,
            "caching": bool(vllm_config.cache_config.enable_prefix_caching)}


def install():
    """Install the scheduler patches (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.core import kv_cache_coordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from . import pool

    orig_init = Scheduler.__init__
    orig_schedule = Scheduler.schedule
    orig_update = Scheduler.update_from_output
    orig_alloc = KVCacheManager.allocate_slots
    orig_free = KVCacheManager.free
    orig_pop = KVCacheManager.pop_blocks_for_free

    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        groups = kv_cache_config.kv_cache_groups
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
            raise RuntimeError("blocktable.vllm supports one KV-cache group of full attention; "
                               f"this model has {[type(g.kv_cache_spec).__name__ for g in groups]}")
        _seg.engine_sizes.clear()
        _seg.engine_sizes.update(_sizes_from(vllm_config))
        orig_init(self, vllm_config, kv_cache_config, *args, **kwargs)
        bp = self.kv_cache_manager.block_pool
        if not isinstance(bp, pool.SharedBlockPool):
            raise RuntimeError("blocktable.vllm: the coordinator did not build the shared BlockPool "
                               f"(got {type(bp).__name__}); vLLM's internals differ from 0.32's")
        mgr = self.kv_cache_manager.coordinator.single_type_managers[0]
        self.kv_cache_manager._bt_rows = SchedulerRows(bp.bt_client, mgr, bp.bt_stats)

    def schedule(self, *args, **kwargs):
        out = orig_schedule(self, *args, **kwargs)
        rows = getattr(self.kv_cache_manager, "_bt_rows", None)
        if rows is not None and out.total_num_scheduled_tokens > 0:
            rows.sched_seq += 1
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        rows = getattr(self.kv_cache_manager, "_bt_rows", None)
        if rows is not None and scheduler_output.total_num_scheduled_tokens > 0:
            rows.done_seq += 1                  # every worker has gathered that batch
        out = orig_update(self, scheduler_output, model_runner_output)
        if rows is not None:
            rows.drain()
        return out

    def allocate_slots(self, request, *args, **kwargs):
        out = orig_alloc(self, request, *args, **kwargs)
        rows = self.__dict__.get("_bt_rows")
        if out is not None and rows is not None:
            rows.sync(request)
        return out

    def free(self, request):
        orig_free(self, request)
        rows = self.__dict__.get("_bt_rows")
        if rows is not None:
            rows.release(request)

    def pop_blocks_for_free(self, request):
        out = orig_pop(self, request)
        rows = self.__dict__.get("_bt_rows")
        if rows is not None:
            rows.release(request)
        return out

    # Why each (module docstring has the detail): the engine's sizes exist only
    # in Scheduler.__init__; schedule/update_from_output bound the batches in
    # flight; allocate_slots is the one way blocks reach a request, free and
    # pop_blocks_for_free the two ways they leave it. AsyncScheduler inherits
    # all of them (it overrides none).
    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
    KVCacheManager.allocate_slots = allocate_slots
    KVCacheManager.free = free
    KVCacheManager.pop_blocks_for_free = pop_blocks_for_free
    # The coordinator's module imported the name BlockPool; rebinding it there
    # (not in block_pool, whose other importers keep vLLM's class) swaps only
    # the pool the KV-cache coordinator builds for the scheduler.
    kv_cache_coordinator.BlockPool = pool.SharedBlockPool
    _installed = True
