"""Worker side: each worker's block table is gathered from the scheduler's
rows in the segment, in batch order, by one C call per step
(bt_rows_gather), instead of from a private copy of every request's ids.

What is patched (class attributes, in every process where the plugin is on;
only workers run this code):

  GPUModelRunner._update_states   (wrapped) before vLLM's own update, track
      each request's incarnation (new: 0, resumed after preemption: +1) so
      the worker derives the scheduler's row key (keys.py). This is the one
      place a worker learns of new, resumed and finished requests.
  GPUModelRunner._prepare_inputs  (wrapped) before vLLM's own body, which
      starts with commit_block_table() and then computes the slot mapping
      from block_table.np: gather rows [0, num_reqs) into block_table.np,
      the array the attention metadata and slot mapping read. This is the
      last point before the table is used, after the batch is condensed
      and reordered, so the batch order is final.
  BlockTable.append_row           (replaced; not with BLOCKTABLE_VLLM_CHECK)
      keeps vLLM's per-row block count (num_blocks_per_row, which the
      worker still needs: the scheduler's row may already hold the blocks
      of the next step, which async scheduling allocates while this one
      runs) but no longer writes ids: the ids come from the segment.
      CPUModelRunner inherits all three (it overrides none of them).

With BLOCKTABLE_VLLM_CHECK=1, append_row is left alone (vLLM keeps its own
ids) and every step compares the gathered rows with them; a mismatch is
counted, flushed to the stats file and raised (RuntimeError).

Rows and async scheduling: vLLM 0.32 schedules step N+1 while step N runs
(async_scheduling is on by default, on CPU too), so the scheduler may free or
preempt a request that batch N still reads before this worker gathers N. The
scheduler therefore releases a row only after every batch scheduled before
the release has been answered (scheduler.py), and a request resumed after a
preemption gets a new row under a new key (keys.py). The gather checks key
and generation of each hinted row (bt_rows_gather), and here each gathered
count is checked against vLLM's: a row missing or shorter than the count
is an error, never silently wrong ids. Rows longer than vLLM's count (blocks
already appended for the next step) are cut back to the count, so the table
equals stock vLLM's.
"""
import os

import numpy as np

from ._env import ENV_CHECK
from .keys import request_key

__all__ = ["install", "WorkerRows"]

_installed = False


class WorkerRows:
    """One model runner's view of the rows. Not thread-safe (the runner's
    step thread only). Errors: RuntimeError on a missing/short row or (with
    the check) a mismatch; the errors of blocktable.connect at first use."""

    def __init__(self, runner):
        from ._seg import Stats
        self.runner = runner
        self.check = os.environ.get(ENV_CHECK, "") not in ("", "0")
        self.inc = {}
        self.slot_keys = []             # (req_id, incarnation) per batch slot
        self.last_ids = None            # the batch's request ids when slot_keys was made
        self.inc_changed = False
        self.gather = None
        try:
            from vllm.distributed import get_tensor_model_parallel_rank
            rank = get_tensor_model_parallel_rank()
        except Exception:
            rank = 0
        self.stats = Stats("worker", rank=rank, steps=0, rows_read=0, check_mismatches=0,
                           checked_rows=0)

    def update(self, so):
        """Incarnations from one SchedulerOutput (before vLLM applies it)."""
        for rid in so.finished_req_ids:
            self.inc.pop(rid, None)
        if so.finished_req_ids:         # requests ended: counters worth keeping (an
            self.stats.flush()          # engine may go idle, or be killed, after this)
        for nr in so.scheduled_new_reqs:
            self.inc[nr.req_id] = 0
        for rid in so.scheduled_cached_reqs.resumed_req_ids:
            self.inc[rid] = self.inc.get(rid, 0) + 1
            self.inc_changed = True     # same id, same slot maybe, but a new key

    def _start(self):
        from blocktable import RowGather
        from ._seg import connect
        tables = self.runner.input_batch.block_table.block_tables
        if len(tables) != 1:
            raise RuntimeError(f"blocktable.vllm supports one KV-cache group; this model has "
                               f"{len(tables)}")
        self.table = tables[0]
        seg = connect(create=None).segment
        self.gather = RowGather(seg, self.table.max_num_reqs)
        self.width = self.table.block_table.np.shape[1]
        self.scratch = np.zeros((self.table.max_num_reqs, self.width), np.int32)
        self.cols = np.arange(self.width, dtype=np.int32)[None, :]

    def before_prepare(self, num_reqs):
        """Fill block_table.np[:num_reqs] from the rows."""
        if self.gather is None or self.runner.input_batch.block_table.block_tables[0] is not self.table:
            self._start()
            self.slot_keys = []
            self.last_ids = None
        ib = self.runner.input_batch
        g = self.gather
        ids = ib.req_ids[:num_reqs]
        if ids != self.last_ids or self.inc_changed:     # a list compare, in C
            self._rekey(ids)
        table = self.table.block_table.np
        counts = self.table.num_blocks_per_row[:num_reqs]
        out = self.scratch if self.check else table
        nb = g.gather(num_reqs, out[:num_reqs])
        if not self.check and (nb == counts).all():     # the usual step: nothing to fix
            self._count(num_reqs)
            return
        short = nb < counts
        if self.check:
            mask = self.cols < counts[:, None]
            bad = ((out[:num_reqs] != table[:num_reqs]) & mask).any(axis=1) | short
            self.stats["checked_rows"] += num_reqs
            if bad.any():
                self._fail(np.flatnonzero(bad), nb, counts, out, table, ib)
        elif short.any():
            self._fail(np.flatnonzero(short), nb, counts, out, None, ib)
        over = np.flatnonzero(nb > counts)
        for i in over:                  # the next step's blocks, already in the row
            out[i, counts[i]:min(nb[i], self.width)] = 0
        if self.check:
            table[:num_reqs] = out[:num_reqs]
        self._count(num_reqs)

    def _rekey(self, ids):
        """Slot i holds request ids[i] (its incarnation's key): give the
        gather the keys of the slots that changed."""
        g, sk, inc = self.gather, self.slot_keys, self.inc
        for i, rid in enumerate(ids):
            want = (rid, inc.get(rid, 0))
            if i >= len(sk):
                sk.append(None)
            if sk[i] != want:
                sk[i] = want
                g.set_key(i, request_key(*want))
        self.last_ids = ids             # a slice of req_ids: already a copy
        self.inc_changed = False

    def _count(self, num_reqs):
        st = self.stats
        st["steps"] += 1
        st["rows_read"] += num_reqs
        st.maybe_flush()

    def _fail(self, idx, nb, counts, got, want, ib):
        self.stats["check_mismatches"] += len(idx)
        self.stats.flush()
        i = int(idx[0])
        rid, n = ib.req_ids[i], int(counts[i])
        msg = (f"blocktable.vllm worker: {len(idx)} of the batch's rows differ from vLLM's block "
               f"ids; first: slot {i}, request {rid!r} (incarnation {self.inc.get(rid, 0)}): "
               f"the segment's row has {int(nb[i])} blocks {got[i, :max(0, min(int(nb[i]), n))].tolist()}, "
               f"vLLM has {n}")
        if want is not None:
            msg += f" {want[i, :n].tolist()}"
        raise RuntimeError(msg)


def _count_only_append_row(self, block_ids, row_idx):
    # The ids come from the segment (WorkerRows.before_prepare); vLLM's count
    # is kept because the row may be ahead of this step (see the docstring).
    if block_ids:
        self.num_blocks_per_row[row_idx] += len(block_ids)


def install():
    """Install the worker patches (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.worker import block_table as bt_mod
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig_update = GPUModelRunner._update_states
    orig_prepare = GPUModelRunner._prepare_inputs

    def _update_states(self, scheduler_output):
        rows = self.__dict__.get("_bt_rows")
        if rows is None:
            rows = self._bt_rows = WorkerRows(self)
        rows.update(scheduler_output)
        return orig_update(self, scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        self._bt_rows.before_prepare(self.input_batch.num_reqs)
        return orig_prepare(self, scheduler_output, num_scheduled_tokens)

    # _update_states: where a worker learns of new / resumed / finished requests
    # (their keys). _prepare_inputs: the last point before block_table.np is
    # committed and read, after the batch is condensed (final order).
    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    if os.environ.get(ENV_CHECK, "") in ("", "0"):
        # vLLM's private copy of the ids goes; its per-row count stays.
        bt_mod.BlockTable.append_row = _count_only_append_row
    _installed = True
