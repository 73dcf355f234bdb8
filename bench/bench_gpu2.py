"""Two GPUs, one segment: a mirror per GPU, one process per GPU, an editor.

Processes (spawned; nothing forked after CUDA starts):

  editor        (CPU only) edits the rows of one segment (256 x 2048, managed
                rows, block size 16): decode appends, truncations, rows
                replaced (set_row) and requests finished and re-admitted
                (release_row + claim_row + alloc_append).
  gpu worker i  (one per GPU, CUDA_VISIBLE_DEVICES=i) exports its own mirror
                of the segment on its GPU (gpu.MirrorExporter: the public
                API's "one mirror per GPU"; the daemon exports none), syncs
                it and checks it against the segment.

Checks, all exact:

  A. paused rounds: the editor makes one step, then waits until the
     workers have synced and checked. With the editor paused the segment
     cannot change, so the whole mirror (table and counts) must equal the
     segment's, and the slot-mapping kernel on the mirror must give what
     libbt's bt_slots_qsl gives on the CPU (2 tokens per row: the last
     token and a random position, some past the row: -1 on both sides).
     Steps: 500 pure decode steps (every row +1 block: the issue's
     "256 rows +1 block, 256x2048"), alternately synced by every GPU at
     once ("decode_both") and one GPU after the other ("decode_solo",
     order rotating), then 300 mixed steps ("mixed_both": +1 block per
     row, ~1% of rows replaced by set_row, ~2% finished and re-admitted,
     ~2% truncated). Sync time = wall clock from a cudaDeviceSynchronize
     before the call to one after it (what torch.cuda.synchronize does),
     median per kind of step, the first 5 of each dropped.
  B. concurrent: the editor edits rows at full speed. It brackets every
     row write with a per-row sequence number in a shared side table
     (odd while writing, even after). A worker reads the side table,
     syncs, copies its mirror and the segment, reads the side table
     again: a row whose number was even and unchanged across that window
     was not written during it, so its mirror copy must equal the
     segment's exactly; rows written meanwhile are counted, not checked.
  C. DistributedBlockTable, a pool per GPU: a second segment (2 pools),
     worker i = DistributedBlockTable(worker_id=i) allocating into its
     own rows and clearing them, exporting a mirror of that segment on
     its GPU. Each step: its rows on its mirror equal get_row(), every
     id in its rows lives in its own pool, the GPU slot mapping of its
     rows equals compute_slot_mapping() and names slots of its own pool.
     At a final barrier: the whole mirror equals the segment on each GPU,
     and no block of one GPU's pool appears in the other's rows.

Slot mapping per GPU (after A/B, editor stopped; one GPU at a time): the SlotMapper launch
(host wall clock and device time, cupyx.profiler.benchmark) and the
kernel's device time alone (50 launches replayed from a CUDA graph), at
T = 256 (decode, 1 token x 256 rows), 8,192 and 65,536 tokens.

    python bench/bench_gpu2.py [--json out.json] [--log out.txt] [--gpus N]
                               [--pure-rounds 500] [--rounds 300] [--steps 400]

Without a GPU it says so and exits 0 (--cpu-protocol runs the same
processes and checks with the segment standing in for each mirror: the
harness only, no GPU figures). With one GPU it runs with one worker and
says so.
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bindings"))
import blocktable as bt  # noqa: E402
from blocktable import gpu  # noqa: E402
from blocktable.table import BlockTableConfig  # noqa: E402

R, W, BS = 256, 2048, 16          # the decode shape: 256 rows of a 256 x 2048 table
MAX_LEN = 1024                    # rows are truncated before they pass this
BLOCKS = R * MAX_LEN + 4096
SLOT_SIZES = (256, 8192, 65536)
DBT_REQS, DBT_WIDTH, DBT_MAXLEN = 64, 256, 200   # per worker; 64 x 200 < one pool: no spill
Q_TIMEOUT = 120.0


def _med_us(xs):
    return float(np.median(xs) * 1e6) if len(xs) else None


def _p90_us(xs):
    return float(np.percentile(xs, 90) * 1e6) if len(xs) else None


# ---- the editor ------------------------------------------------------------------
class Editor:
    """Edits rows of the segment; `side[r]` is row r's write sequence number
    (odd while a write is under way)."""

    def __init__(self, seg, side, seed):
        self.seg, self.side = seg, side
        self.cl = seg.client()
        self.rng = np.random.default_rng(seed)
        self.key = 1
        self.ops = {"append": 0, "truncate": 0, "set": 0, "readmit": 0}

    def setup(self):
        for r in range(R):
            self.cl.claim_row(key=self.key, row=r)
            self.key += 1
            self.cl.alloc_append(r, int(self.rng.integers(64, 256)))

    def edit(self, r, op):
        cl, side = self.cl, self.side
        side[r] += 1                                  # odd: row r is being written
        if op == "append":
            if int(self.seg.num_blocks[r]) >= MAX_LEN:
                cl.truncate(r, int(self.rng.integers(1, 64)))
            cl.alloc_append(r, 1)
        elif op == "truncate":
            cl.truncate(r, int(self.rng.integers(1, max(2, int(self.seg.num_blocks[r])))))
        elif op == "set":                             # vLLM's add_row: fresh blocks
            cl.set_row(r, cl.alloc(int(self.rng.integers(1, 400))))
        else:                                         # finished; a new request takes the row
            cl.release_row(r)
            cl.claim_row(key=self.key, row=r)
            self.key += 1
            cl.alloc_append(r, int(self.rng.integers(1, 400)))
        side[r] += 1                                  # even: done
        self.ops[op] += 1

    def decode_round(self, mixed=True):
        for r in range(R):
            u = self.rng.random() if mixed else 1.0
            op = "readmit" if u < 0.02 else "set" if u < 0.03 else \
                "truncate" if u < 0.05 else "append"
            self.edit(r, op)

    def random_edit(self):
        r = int(self.rng.integers(0, R))
        u = self.rng.random()
        self.edit(r, "readmit" if u < 0.02 else "set" if u < 0.04 else
                  "truncate" if u < 0.10 else "append")


def _ack(from_workers):
    msg = from_workers.get(timeout=Q_TIMEOUT)
    if msg[0] != "ack":
        raise RuntimeError(f"worker said {msg!r}")


def editor_main(name, side, to_workers, from_workers, n_workers, rounds, stop, res_q,
                pure_rounds):
    try:
        seg = bt.Segment.attach(name)
        ed = Editor(seg, side, seed=11)
        ed.setup()
        for q in to_workers:
            q.put(("ready",))
        # A: paused rounds. First pure decode steps (every row +1 block),
        # alternately synced by every GPU at once ("both") and by one GPU
        # at a time ("solo", the order rotating); then mixed steps.
        t_edit = []
        for k in range(pure_rounds + rounds):
            t0 = time.perf_counter()
            if k < pure_rounds:
                ed.decode_round(mixed=False)
                tag = "decode_solo" if k % 2 else "decode_both"
            else:
                ed.decode_round()
                tag = "mixed_both"
            t_edit.append(time.perf_counter() - t0)
            if tag.endswith("solo"):
                for i in range(n_workers):
                    to_workers[(i + k // 2) % n_workers].put(("round", k, tag))
                    _ack(from_workers)
            else:
                for q in to_workers:
                    q.put(("round", k, tag))
                for _ in range(n_workers):
                    _ack(from_workers)
        for q in to_workers:
            q.put(("concurrent",))
        # B: at full speed until every worker has finished its steps.
        n = 0
        t0 = time.perf_counter()
        while not stop.is_set():
            ed.random_edit()
            n += 1
        dt = time.perf_counter() - t0
        res_q.put(("editor", {"ops": ed.ops, "decode_round_edit_us": _med_us(t_edit),
                              "concurrent_edits": n,
                              "concurrent_edits_per_s": n / dt if dt else None}))
        ed.cl.close()
        seg.close()
    except Exception:
        res_q.put(("error", "editor", traceback.format_exc()))


# ---- what a worker checks through: the mirror, or (cpu protocol) the segment ----------
class GpuView:
    """A mirror of `seg` exported on this process's GPU (device 0 here)."""

    def __init__(self, seg):
        import cupy as cp
        self.cp, self.seg = cp, seg
        self.ex = gpu.MirrorExporter(seg)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.kp = gpu.SlotKernelParams(seg.config.block_size)
        self.mappers = {}

    def timed_sync(self):
        rt = self.cp.cuda.runtime
        rt.deviceSynchronize()
        t0 = time.perf_counter()
        n = self.ex.sync(stream=self.stream)
        rt.deviceSynchronize()
        return time.perf_counter() - t0, n

    def read(self):
        return self.cp.asnumpy(self.ex.table), self.cp.asnumpy(self.ex.counts)

    def slots(self, qsl, pos, rows):
        key = (len(rows), len(pos))
        m = self.mappers.get(key)
        if m is None:
            m = self.mappers[key] = self.ex.slot_mapper(len(rows), len(pos), params=self.kp)
        cp = self.cp
        with self.stream:            # the inputs land on the stream that launches
            m.query_start_loc[:] = cp.asarray(qsl)
            m.rows[:] = cp.asarray(rows)
            m.positions[:] = cp.asarray(pos)
        out = m(len(rows), len(pos), stream=self.stream.ptr)
        self.stream.synchronize()
        return cp.asnumpy(out)

    def close(self):
        self.ex.close()


class CpuView:
    """--cpu-protocol: the segment stands in for the mirror (harness only)."""

    def __init__(self, seg):
        self.seg = seg

    def timed_sync(self):
        return 0.0, 0

    def read(self):
        return self.seg.table.copy(), self.seg.num_blocks.copy()

    def slots(self, qsl, pos, rows):
        return self.seg.slots_qsl(qsl, pos, rows=rows).copy()

    def close(self):
        pass


def device_info(cpu):
    if cpu:
        return {"name": "cpu-protocol (no GPU)", "uuid": None}
    import cupy as cp
    p = cp.cuda.runtime.getDeviceProperties(0)
    info = {"name": p["name"].decode(), "uuid": gpu.device_uuid(0).hex(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        info["pci_bus_id"] = cp.cuda.runtime.deviceGetPCIBusId(0)
    except Exception as e:          # a name only: not worth failing the run over
        info["pci_bus_id"] = f"? ({type(e).__name__})"
    return info


def decode_slot_inputs(seg, rng):
    """2 tokens per row: its last token and a random position (up to a
    block past the row: those get -1)."""
    nb = seg.num_blocks.astype(np.int64)
    last = nb * BS - 1
    rnd = (rng.random(R) * (nb * BS + BS)).astype(np.int64)
    pos = np.stack([last, rnd], 1).reshape(-1)
    qsl = np.arange(0, 2 * R + 1, 2, dtype=np.int32)
    return qsl, pos, np.arange(R, dtype=np.int32)


def phase_a(seg, view, inq, ackq, wid, rng, log):
    """Paused rounds: exact whole-table checks and decode-sync timing."""
    ts, moved = {}, {}
    mism = {"table_rows": 0, "counts": 0, "slots": 0, "rounds_bad": 0}
    first_bad = None
    k = 0
    while True:
        msg = inq.get(timeout=Q_TIMEOUT)
        if msg[0] == "concurrent":
            break
        k, tag = msg[1], msg[2]
        dt, n = view.timed_sync()
        ts.setdefault(tag, []).append(dt)
        moved.setdefault(tag, []).append(n)
        tab, cnt = view.read()
        bad_rows = np.flatnonzero((tab != seg.table).any(1))
        bad_cnt = int(np.count_nonzero(cnt != seg.num_blocks))
        qsl, pos, rows = decode_slot_inputs(seg, rng)
        got = view.slots(qsl, pos, rows)
        want = seg.slots_qsl(qsl, pos, rows=rows)
        bad_slots = int(np.count_nonzero(got != want))
        if len(bad_rows) or bad_cnt or bad_slots:
            mism["rounds_bad"] += 1
            if first_bad is None:
                first_bad = {"round": k, "rows": bad_rows[:10].tolist(), "counts": bad_cnt,
                             "slots": bad_slots}
                log(f"worker {wid}: round {k} MISMATCH {first_bad}")
        mism["table_rows"] += len(bad_rows)
        mism["counts"] += bad_cnt
        mism["slots"] += bad_slots
        ackq.put(("ack", wid, k))
    sync = {}
    for tag, xs in ts.items():                       # the first 5 of a kind warm up
        xs, mv = xs[5:], moved[tag][5:]
        sync[tag] = {"samples": len(xs), "us": _med_us(xs), "p90_us": _p90_us(xs),
                     "min_us": float(np.min(xs) * 1e6) if xs else None,
                     "entries_moved_median": float(np.median(mv)) if mv else None}
    return {"rounds": k + 1, "sync": sync, "mismatches": mism, "first_mismatch": first_bad}


def phase_b(seg, view, side, steps, wid, log):
    """Concurrent edits: rows not written during a sync window must match."""
    sv = np.frombuffer(side, np.int64)
    ts, moved, checked, flux = [], [], 0, 0
    bad_total, first_bad = 0, None
    for i in range(steps):
        s0 = sv.copy()
        dt, n = view.timed_sync()
        tab, cnt = view.read()
        seg_tab, seg_cnt = seg.table.copy(), seg.num_blocks.copy()
        s1 = sv.copy()
        stable = (s0 == s1) & (s0 % 2 == 0)
        diff = (tab != seg_tab).any(1) | (cnt != seg_cnt)
        bad = np.flatnonzero(stable & diff)
        checked += int(stable.sum())
        flux += int((~stable).sum())
        ts.append(dt)
        moved.append(n)
        if len(bad):
            bad_total += len(bad)
            if first_bad is None:
                first_bad = {"step": i, "rows": bad[:10].tolist()}
                log(f"worker {wid}: concurrent step {i} MISMATCH {first_bad}")
    return {"steps": steps, "sync_us": _med_us(ts), "sync_p90_us": _p90_us(ts),
            "entries_moved_median": float(np.median(moved)) if moved else None,
            "rows_checked": checked, "rows_in_flux_skipped": flux,
            "mismatched_rows": bad_total, "first_mismatch": first_bad}


def slot_bench(seg, view, rng):
    """SlotMapper at several sizes on the (now still) mirror."""
    import cupy as cp
    from cupyx.profiler import benchmark
    ex, kp = view.ex, view.kp
    nb = seg.num_blocks.astype(np.int64)
    out = {}
    for T in SLOT_SIZES:
        per = T // R
        rows = np.arange(R, dtype=np.int32)
        qsl = (np.arange(R + 1) * per).astype(np.int32)
        if per == 1:                                   # decode: each row's last token
            pos = nb * BS - 1
        else:                                          # a run of `per` tokens in each row
            hi = np.maximum(nb * BS - per, 0)
            starts = (rng.random(R) * hi).astype(np.int64)
            pos = (starts[:, None] + np.arange(per)).reshape(-1)
        want = seg.slots_qsl(qsl, pos, rows=rows)
        m = ex.slot_mapper(R, T, params=kp)
        m.query_start_loc[:] = cp.asarray(qsl)
        m.rows[:] = cp.asarray(rows)
        m.positions[:] = cp.asarray(pos)
        cp.cuda.runtime.deviceSynchronize()    # inputs in place before any stream reads them
        s = view.stream
        m(R, T, stream=s.ptr)
        s.synchronize()
        bad = int(np.count_nonzero(cp.asnumpy(m.out[:T]) != want))
        cur = cp.cuda.get_current_stream().ptr
        r = benchmark(lambda: m(R, T, stream=cur), n_repeat=2000, n_warmup=100)
        gs = cp.cuda.Stream(non_blocking=True)
        gs.begin_capture()
        for _ in range(50):
            m(R, T, stream=gs.ptr)
        graph = gs.end_capture()
        graph.launch(gs)
        gs.synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        dts = []
        for _ in range(30):
            e0.record(gs)
            graph.launch(gs)
            e1.record(gs)
            e1.synchronize()
            dts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / 50)
        bad += int(np.count_nonzero(cp.asnumpy(m.out[:T]) != want))
        out[str(T)] = {"tokens": T, "rows": R, "mismatches": bad,
                       "launch_host_us": float(np.median(r.cpu_times) * 1e6),
                       "launch_gpu_us": float(np.median(r.gpu_times[0]) * 1e6),
                       "kernel_device_us": float(np.median(dts)),
                       "ns_per_token_device": float(np.median(dts)) * 1e3 / T}
    return out


def worker_main(wid, cpu, name, side, inq, ackq, steps, res_q, turn):
    if not cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(wid)   # before cupy starts CUDA
    logs = []

    def log(s):
        logs.append(s)
        print(s, flush=True)
    try:
        seg = bt.Segment.attach(name)
        view = CpuView(seg) if cpu else GpuView(seg)
        dev = device_info(cpu)
        log(f"worker {wid}: {dev['name']} {dev.get('pci_bus_id', '')} mirror "
            f"{getattr(getattr(view, 'ex', None), 'index', '-')}")
        rng = np.random.default_rng(100 + wid)
        msg = inq.get(timeout=Q_TIMEOUT)
        assert msg[0] == "ready", msg
        view.timed_sync()                                # the first, full sync
        a = phase_a(seg, view, inq, ackq, wid, rng, log)
        log(f"worker {wid}: A {a['rounds']} rounds, sync medians " + ", ".join(
            f"{t} {v['us']:.1f} us ({v['entries_moved_median']:.0f} entries)"
            for t, v in a["sync"].items()) + f", mismatches {a['mismatches']}")
        b = phase_b(seg, view, side, steps, wid, log)
        log(f"worker {wid}: B {b['steps']} steps, sync median {b['sync_us']} us, "
            f"{b['rows_checked']} rows checked, {b['rows_in_flux_skipped']} in flux, "
            f"mismatched {b['mismatched_rows']}")
        res_q.put(("b_done", wid))                       # the editor may stop
        msg = inq.get(timeout=Q_TIMEOUT)                 # ... and has stopped
        assert msg[0] == "still", msg
        view.timed_sync()
        tab, cnt = view.read()
        final_bad = int(((tab != seg.table).any(1) | (cnt != seg.num_blocks)).sum())
        with turn:                   # one GPU at a time: no host contention in the timings
            slots = None if cpu else slot_bench(seg, view, rng)
        if slots:
            log(f"worker {wid}: slots " + ", ".join(
                f"T={k}: {v['kernel_device_us']:.2f} us device, {v['launch_host_us']:.2f} us "
                f"host, mism {v['mismatches']}" for k, v in slots.items()))
        view.close()
        seg.close()
        res_q.put(("worker", wid, {"device": dev, "paused_rounds": a, "concurrent": b,
                                   "final_still_mismatched_rows": final_bad,
                                   "slot_mapping": slots, "log": logs}))
    except Exception:
        res_q.put(("error", f"worker {wid}", traceback.format_exc()))


# ---- C: DistributedBlockTable, a pool per GPU -----------------------------------------
def dbt_main(wid, n, cpu, name, barrier, steps, res_q):
    if not cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(wid)
    try:
        from blocktable.distributed import DistributedBlockTable
        seg = bt.Segment.attach(name)
        cfg = BlockTableConfig(block_size=BS, max_num_reqs=DBT_REQS,
                               max_num_blocks_per_req=DBT_WIDTH)
        t = DistributedBlockTable(cfg, n, wid, segment=seg)
        view = CpuView(seg) if cpu else GpuView(seg)
        bpp = t.blocks_per_pool
        base = wid * DBT_REQS
        rng = np.random.default_rng(7 + wid)
        barrier.wait(Q_TIMEOUT)            # every table is open (its rows claimed)
        t_alloc, t_sync = [], []
        mism = {"rows": 0, "foreign_ids": 0, "slots": 0, "foreign_slots": 0}
        for i in range(steps):
            for r in rng.choice(DBT_REQS, 16, replace=False):
                r = int(r)
                have = t.get_num_blocks(r)
                if have >= DBT_MAXLEN - 8 or rng.random() < 0.05:
                    t.clear_row(r)
                else:
                    t0 = time.perf_counter()
                    t.allocate_blocks(r, int(rng.integers(1, 9)))
                    t_alloc.append(time.perf_counter() - t0)
            dt, _ = view.timed_sync()
            t_sync.append(dt)
            tab, cnt = view.read()
            mine = [t.get_row(r) for r in range(DBT_REQS)]   # only this worker edits them
            for r, ids in enumerate(mine):
                k, g = len(ids), base + r
                if cnt[g] != k or not np.array_equal(tab[g, :k], ids) \
                        or not np.array_equal(tab[g], seg.table[g]):
                    mism["rows"] += 1
                mism["foreign_ids"] += int(np.count_nonzero(ids // bpp != wid))
            # GPU slot mapping of this worker's rows vs the table's own (CPU).
            nb = np.array([len(x) for x in mine], np.int64)
            pos = (rng.random(DBT_REQS) * (nb * BS + BS)).astype(np.int64)
            rows = np.arange(base, base + DBT_REQS, dtype=np.int32)
            qsl = np.arange(DBT_REQS + 1, dtype=np.int32)
            got = view.slots(qsl, pos, rows)
            want = np.array([t.compute_slot_mapping(r, 1, int(p))[0]
                             for r, p in enumerate(pos)], np.int64)
            mism["slots"] += int(np.count_nonzero(got != want))
            live = got[got >= 0]
            mism["foreign_slots"] += int(np.count_nonzero(live // (BS * bpp) != wid))
        barrier.wait(Q_TIMEOUT)            # both stopped editing: the segment is still
        view.timed_sync()
        tab, cnt = view.read()
        whole_bad = int(((tab != seg.table).any(1) | (cnt != seg.num_blocks)).sum())
        pools_in_rows = {}
        for w in range(n):
            blk = seg.table[w * DBT_REQS:(w + 1) * DBT_REQS]
            ids = blk[blk != 0]
            pools_in_rows[w] = np.unique(ids // bpp).tolist()
        my_ids = np.concatenate([x for x in mine if len(x)] or [np.empty(0, np.int32)])
        st = t.get_stats()
        barrier.wait(Q_TIMEOUT)            # everyone has read before anyone clears
        res = {"device": device_info(cpu), "steps": steps,
               "alloc_call_us": _med_us(t_alloc), "alloc_calls": len(t_alloc),
               "sync_us": _med_us(t_sync), "sync_p90_us": _p90_us(t_sync),
               "mismatches": mism, "final_whole_mirror_mismatched_rows": whole_bad,
               "pools_seen_in_rows_of_worker": {str(k): v for k, v in pools_in_rows.items()},
               "blocks_held": int(len(my_ids)),
               "spilled_blocks": st["spilled_blocks"], "local_ratio": st["local_ratio"],
               "pool_free": st["pool_free"], "ids": my_ids.tolist()}
        view.close()
        t.close()
        seg.close()
        res_q.put(("dbt", wid, res))
    except Exception:
        res_q.put(("error", f"dbt worker {wid}", traceback.format_exc()))


# ---- the parent ------------------------------------------------------------------------
class Pump:
    """Messages of the spawned processes, one queue: ("error", who, traceback)
    raises at once; others are kept by kind until asked for."""

    def __init__(self, q, procs):
        self.q, self.procs, self.kept = q, procs, []

    def take(self, kind, want, what, timeout=600.0):
        deadline = time.monotonic() + timeout
        got = []
        while True:
            for m in [m for m in self.kept if m[0] == kind]:
                if len(got) < want:
                    self.kept.remove(m)
                    got.append(m)
            if len(got) >= want:
                return got
            try:
                m = self.q.get(timeout=1.0)
            except queue.Empty:
                dead = [(p.name, p.exitcode) for p in self.procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: processes {dead} died, or time ran out")
                continue
            if m[0] == "error":
                raise RuntimeError(f"{m[1]} failed:\n{m[2]}")
            self.kept.append(m)


def _end(procs):
    for p in procs:
        if p.pid is None:            # never started
            continue
        p.join(30)
        if p.is_alive():
            p.kill()                 # ours, by its Process object
            p.join(5)


def run_mirrors(ctx, n, cpu, rounds, steps, log, pure_rounds):
    name = f"bench-gpu2-{os.getpid()}"
    seg = bt.Segment.create(name, bt.SegmentConfig(
        block_size=BS, num_pools=1, blocks_per_pool=BLOCKS, num_rows=R, row_width=W,
        max_clients=8, hand_size=1024, max_mirrors=max(2, n)))
    procs = []
    try:
        side = ctx.Array("q", R, lock=False)
        to_w = [ctx.Queue() for _ in range(n)]
        acks, res_q = ctx.Queue(), ctx.Queue()
        stop, turn = ctx.Event(), ctx.Lock()
        procs = [ctx.Process(target=worker_main, name=f"gpu-worker-{i}",
                             args=(i, cpu, name, side, to_w[i], acks, steps, res_q, turn))
                 for i in range(n)]
        procs.append(ctx.Process(target=editor_main, name="editor",
                                 args=(name, side, to_w, acks, n, rounds, stop, res_q,
                                       pure_rounds)))
        for p in procs:
            p.start()
        pump = Pump(res_q, procs)
        pump.take("b_done", n, "gpu workers' concurrent steps")
        stop.set()
        ed = pump.take("editor", 1, "editor")[0]
        for q in to_w:
            q.put(("still",))
        ws = pump.take("worker", n, "gpu workers")
        _end(procs)
        workers = {str(m[1]): m[2] for m in ws}
        return {"editor": ed[1], "workers": workers, "segment_check": str(seg.check())}
    finally:
        _end(procs)
        seg.close()
        bt.Segment.unlink(name)


def run_dbt(ctx, n, cpu, steps):
    name = f"bench-gpu2-dbt-{os.getpid()}"
    bpw = DBT_REQS * DBT_WIDTH
    seg = bt.Segment.create(name, bt.SegmentConfig(
        block_size=BS, kernel_block_size=BS, num_pools=n, blocks_per_pool=bpw,
        num_rows=n * DBT_REQS, row_width=DBT_WIDTH, max_clients=max(8, 2 * n),
        hand_size=DBT_WIDTH, max_mirrors=max(2, n)))
    procs = []
    try:
        barrier, res_q = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=dbt_main, name=f"dbt-{i}",
                             args=(i, n, cpu, name, barrier, steps, res_q)) for i in range(n)]
        for p in procs:
            p.start()
        got = {str(m[1]): m[2] for m in Pump(res_q, procs).take("dbt", n, "dbt workers")}
        _end(procs)
        owner = {}
        cross = 0
        for w, r in got.items():
            for b in r.pop("ids"):
                if b in owner:
                    cross += 1
                owner[b] = int(w)
        wrong_pool = sum(1 for b, w in owner.items() if b // bpw != w)
        return {"workers": got, "blocks_in_two_tables": cross,
                "blocks_outside_owner_pool": wrong_pool, "segment_check": str(seg.check())}
    finally:
        _end(procs)
        seg.close()
        bt.Segment.unlink(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--log")
    ap.add_argument("--gpus", type=int, default=0, help="workers (default: every GPU, max 8)")
    ap.add_argument("--rounds", type=int, default=300, help="mixed decode rounds")
    ap.add_argument("--pure-rounds", type=int, default=500,
                    help="pure decode rounds, half synced by all GPUs at once, half one by one")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--dbt-steps", type=int, default=200)
    ap.add_argument("--cpu-protocol", action="store_true",
                    help="no GPU: the segment stands in for each mirror (harness check only)")
    a = ap.parse_args(argv)
    lines = []

    def log(s):
        lines.append(s)
        print(s, flush=True)
    cpu = a.cpu_protocol
    if cpu:
        n = a.gpus or 2
        log(f"bench_gpu2: --cpu-protocol, {n} workers, the segment stands in for the mirrors "
            "(no GPU figures)")
    else:
        ok, why = gpu.gpu_available()
        if not ok:
            log(f"bench_gpu2: skipped, {why}")
            return 0
        import cupy as cp
        count = cp.cuda.runtime.getDeviceCount()
        n = min(a.gpus or count, count, 8)
        if n < 2:
            log(f"bench_gpu2: only {count} GPU visible: running with {n} worker "
                "(the two-GPU figures need two)")
    t0 = time.time()
    ctx = mp.get_context("spawn")
    res = {"machine": platform.node(), "gpus_used": n, "cpu_protocol": cpu,
           "shape": {"rows": R, "row_width": W, "block_size": BS, "blocks": BLOCKS,
                     "pure_decode_rounds": a.pure_rounds, "mixed_rounds": a.rounds,
                     "concurrent_steps": a.steps,
                     "slot_sizes": list(SLOT_SIZES)},
           "mirror_api": "each GPU worker exports its own mirror: blocktable.gpu.MirrorExporter"
                         "(segment) on its device (CUDA_VISIBLE_DEVICES=i); the daemon has no "
                         "mirror export"}
    if not cpu:
        try:
            res["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,name,pci.bus_id,driver_version,memory.total",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
            res["nvidia_topo"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True,
                                                text=True, timeout=30).stdout
            log(res["nvidia_smi"].strip())
            log(res["nvidia_topo"].strip())
        except (OSError, subprocess.SubprocessError) as e:
            log(f"nvidia-smi: {e}")
    res["mirrors"] = run_mirrors(ctx, n, cpu, a.rounds, a.steps, log, a.pure_rounds)
    res["dbt"] = run_dbt(ctx, n, cpu, a.dbt_steps)
    m, d = res["mirrors"], res["dbt"]
    total = 0
    for w, r in sorted(m["workers"].items()):
        pa, pb = r["paused_rounds"], r["concurrent"]
        mm = pa["mismatches"]
        total += mm["table_rows"] + mm["counts"] + mm["slots"] + pb["mismatched_rows"] + \
            r["final_still_mismatched_rows"]
        total += sum(v["mismatches"] for v in (r["slot_mapping"] or {}).values())
        for tag, v in pa["sync"].items():
            log(f"GPU {w} ({r['device']['name']}): sync {tag} (256x2048 table): median "
                f"{v['us']:.1f} us, p90 {v['p90_us']:.1f} us, {v['samples']} samples, "
                f"{v['entries_moved_median']:.0f} entries moved")
        log(f"GPU {w}: concurrent-edit sync median {pb['sync_us']:.1f} us; mismatches A {mm}, "
            f"B {pb['mismatched_rows']} of {pb['rows_checked']} rows checked "
            f"({pb['rows_in_flux_skipped']} in flux), final {r['final_still_mismatched_rows']}")
        for k, v in (r["slot_mapping"] or {}).items():
            log(f"GPU {w}: slot mapping T={k}: kernel {v['kernel_device_us']:.2f} us device "
                f"({v['ns_per_token_device']:.3f} ns/token), launch {v['launch_host_us']:.2f} us "
                f"host / {v['launch_gpu_us']:.2f} us gpu, mismatches {v['mismatches']}")
    log(f"editor: {m['editor']}")
    for w, r in sorted(d["workers"].items()):
        mm = r["mismatches"]
        total += sum(mm.values()) + r["final_whole_mirror_mismatched_rows"]
        log(f"DBT worker {w} ({r['device']['name']}): alloc call median {r['alloc_call_us']} us, "
            f"sync median {r['sync_us']} us, {r['blocks_held']} blocks held, spilled "
            f"{r['spilled_blocks']}, pools in its rows {r['pools_seen_in_rows_of_worker']}, "
            f"mismatches {mm}, final whole mirror {r['final_whole_mirror_mismatched_rows']}")
    total += d["blocks_in_two_tables"] + d["blocks_outside_owner_pool"]
    log(f"DBT: blocks in two workers' tables {d['blocks_in_two_tables']}, outside their "
        f"owner's pool {d['blocks_outside_owner_pool']}")
    res["mismatches_total"] = total
    res["seconds"] = time.time() - t0
    log(f"bench_gpu2: {'OK' if total == 0 else 'FAILED'}: {total} mismatches in all, "
        f"{res['seconds']:.1f} s")
    res["log"] = lines
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.log:
        with open(a.log, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
