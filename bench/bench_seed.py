"""The seed's promises, measured: paged rows, prediction, per-worker pools.

    python bench/bench_seed.py [--quick] [--json FILE]

results(quick) returns every figure as a dict and main() prints them;
run(quick) gives bench/run.py its rows (what, figure, unit, baseline,
baseline figure, target), lower figures being better.

1. memory   1,024 rows able to hold 1M tokens each at block size 16 (65,536
            blocks), 512 holding 2K tokens and 4 holding 1M: paged rows
            (directory + chunks in use) against the dense table. Target:
            what paged rows spend beyond their fixed overhead (directories,
            chunk free list) is within 1.2x of 4 bytes per used block.
            Resident bytes are measured too (the shm object's allocated
            pages, st_blocks; all of them, since libbt fallocates at create).
2. decode   requests arriving and finishing, each growing a token per step,
            on BlockTableV2: shared free-list operations (pops, pushes, row
            releases) per block with and without prediction, with ample
            blocks and under pressure; allocation failures while the pool's
            free plus reserved blocks sufficed (must be 0).
3. workers  four processes, each allocating from its own pool, worker 0
            asking for 1.5x its pool: throughput (ns per block, all four
            together, against one process making the same calls in turn)
            and balance (spread of the other pools' use at worker
            0's peaks, against spilling to the next worker in order), and
            failures without spilling.
"""
import argparse
import json
import multiprocessing as mp
import os
import secrets
import sys
import time
from collections import deque

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bindings"))

import blocktable as bt  # noqa: E402
from blocktable.distributed import DistributedBlockTable  # noqa: E402
from blocktable.sparse import paged_memory  # noqa: E402
from blocktable.table import BlockTableConfig  # noqa: E402
from blocktable.v2 import BlockTableV2  # noqa: E402

FORK = mp.get_context("fork")
MiB = 1 << 20


def cdiv(a, b):
    return -(-a // b)


def shm_name(tag):
    return f"bench-{tag}-{os.getpid()}-{secrets.token_hex(3)}"


def shm_bytes(name):
    """Pages the shm object really holds (tmpfs allocates on first touch)."""
    return os.stat(f"/dev/shm/bt.{name}").st_blocks * 512


# ---- 1. memory -------------------------------------------------------------------
ROWS, CAP, BS = 1024, (1 << 20) // 16, 16


def workload(jitter, rng):
    """Blocks per row: 4 rows of 1M tokens, 512 of 2K (jitter: 1..4096 tokens)."""
    lengths = np.zeros(ROWS, np.int64)
    lengths[:4] = CAP
    lengths[4:516] = cdiv(rng.integers(1, 4097, 512), BS) if jitter else 2048 // BS
    return lengths


def fill(name, cfg, lengths, paged, churn):
    """Fill the rows to `lengths` in a fresh named segment; return the
    logical bytes, the resident bytes, the segment's size. Resident is the
    whole shm object's allocated pages: libbt fallocates a segment when it
    creates it (a full tmpfs fails create, never a later store with
    SIGBUS), so every page is resident from the start and what rows add is
    always 0; the object's size is what a table layout costs.
    churn: first let every row hold a 1M-token request once (appended, then
    cleared), as hours of traffic would: tmpfs keeps every page touched."""
    seg = bt.Segment.create(name, cfg)
    try:
        c = seg.client()
        for r in range(ROWS):
            c.claim_row(key=r, row=r, raw=True, paged=paged)
        ids = np.arange(1, CAP + 1, dtype=np.int32)
        if churn:
            for r in range(ROWS):
                c.append(r, ids)
                c.truncate(r, 0)
        for r in np.flatnonzero(lengths):
            c.append(int(r), ids[:lengths[r]])
        resident = shm_bytes(name)
        logical = paged_memory(seg, CAP) if paged else {"total_bytes": ROWS * CAP * 4}
        return logical, resident, seg.info.size
    finally:
        seg.close()
        bt.Segment.unlink(name)


def bench_memory(quick):
    rng = np.random.default_rng(0)
    out = {}
    base = dict(block_size=BS, num_pools=1, blocks_per_pool=2, num_rows=ROWS,
                max_clients=2, hand_size=1, max_mirrors=0)
    exact = workload(False, rng)
    dense_cfg = bt.SegmentConfig(row_width=CAP, **base)
    logical, resident, size = fill(shm_name("dense"), dense_cfg, exact, False, False)
    out["dense"] = {"bytes": logical["total_bytes"], "resident_bytes": resident,
                    "segment_bytes": size}
    if not quick:
        out["dense"]["resident_after_churn"] = fill(shm_name("dense"), dense_cfg, exact,
                                                    False, True)[1]
    cases = [("2K", False, 64)] + ([] if quick else [("2K", False, 16), ("2K", False, 256)]) + \
        [("jitter", True, 64)] + ([] if quick else [("jitter", True, 256)])
    for label, jitter, cs in cases:
        lengths = exact if not jitter else workload(True, rng)
        used = int(lengths.sum())
        nchunks = cdiv(used, cs) + ROWS         # the pool's blocks, one partial chunk a row
        cfg = bt.SegmentConfig(row_width=1, chunk_size=cs, num_chunks=nchunks,
                               dir_width=CAP // cs, **base)
        m, resident, size = fill(shm_name("paged"), cfg, lengths, True, False)
        fixed = m["directory_bytes"] + nchunks * 4 + 64     # directories, chunk free list
        r = out[f"paged_{label}_c{cs}"] = {
            "used_blocks": used, "chunk_size": cs, "chunks_in_use": m["chunks_in_use"],
            "bytes": m["total_bytes"] + nchunks * 4 + 64, "fixed_bytes": fixed,
            "variable_bytes": m["chunk_bytes"],
            "per_used_block": m["chunk_bytes"] / used,
            "ratio_to_4B_per_block": m["chunk_bytes"] / (4 * used),
            "resident_bytes": resident, "segment_bytes": size}
        if not quick and label == "2K" and cs == 64:
            r["resident_after_churn"] = fill(shm_name("paged"), cfg, lengths, True, True)[1]
    return out


# ---- 2. decode -------------------------------------------------------------------
def simulate(prediction, total_blocks, steps, seed, rows=128):
    """Requests arrive (Poisson), prefill in one allocation, then decode a
    token per step (a block every 16); a finished request's row is cleared.
    When even free + reserved blocks cannot serve a decode block, the newest
    request is preempted (vLLM's policy) and requeued."""
    cfg = BlockTableConfig(block_size=BS, max_num_reqs=rows, max_num_blocks_per_req=256)
    t = BlockTableV2(cfg, use_prediction=prediction, total_blocks=total_blocks)
    a, rng = t.allocator, np.random.default_rng(seed)
    queue, running, free_rows = deque(), {}, list(range(rows))[::-1]
    n = {"blocks": 0, "decode_blocks": 0, "decode_pops": 0, "row_releases": 0,
         "failures_with_supply": 0, "shortages": 0, "preemptions": 0, "finished": 0}
    nid = 0

    def supply():
        return t.segment.free_blocks(0) + (a.get_num_reserved() if prediction else 0)

    def alloc(rid, row, k, decode=False):
        s, pops = supply(), a._s["shared_pops"]
        try:
            t.allocate_for_request(rid, row, k)
            n["blocks"] += k
            if decode:
                n["decode_blocks"] += k
                n["decode_pops"] += a._s["shared_pops"] - pops
            return True
        except bt.OutOfBlocks:
            n["shortages"] += 1
            n["failures_with_supply"] += s >= k
            return False

    def release(rid):
        row = running.pop(rid)[0]
        n["row_releases"] += t.clear_row(row) > 0
        free_rows.append(row)

    for step in range(steps):
        for _ in range(rng.poisson(0.2)):
            queue.append((nid, int(rng.integers(64, 1025)), int(rng.integers(64, 1025))))
            nid += 1
        while queue and free_rows:
            rid, prompt, output = queue[0]
            row = free_rows[-1]
            if not alloc(rid, row, cdiv(prompt, BS)):
                break
            queue.popleft()
            free_rows.pop()
            running[rid] = [row, prompt, prompt + output]
        for rid in list(running):
            if rid not in running:
                continue
            st = running[rid]
            st[1] += 1
            if st[1] >= st[2]:
                release(rid)
                n["finished"] += 1
            elif st[1] > t.get_num_blocks(st[0]) * BS:
                while not alloc(rid, st[0], 1, decode=True):
                    victim = max(running)                   # the newest request
                    _, done, total = running[victim]        # recomputed on readmission
                    queue.appendleft((victim, done, total - done))
                    release(victim)
                    n["preemptions"] += 1
                    if victim == rid:
                        break
    s = a.get_stats()
    ops = s["shared_ops"] + n["row_releases"]
    t.close()
    return dict(n, shared_ops=ops, ops_per_block=ops / n["blocks"],
                decode_ops_per_block=n["decode_pops"] / n["decode_blocks"],
                hit_rate=s.get("hit_rate", 0.0), reclaims=s.get("reclaims", 0),
                reclaimed_blocks=s.get("reclaimed_blocks", 0))


def bench_decode(quick):
    steps = 600 if quick else 3000
    out = {}
    for label, total in (("ample", 32768), ("pressure", 2500)):
        for pred in (False, True):
            out[f"{label}_{'prediction' if pred else 'no_prediction'}"] = \
                simulate(pred, total, steps, seed=1)
    return out


# ---- 3. workers ------------------------------------------------------------------
WCFG = BlockTableConfig(max_num_reqs=16, max_num_blocks_per_req=4096)
POOL = 4096


def _naive_allocate(t, row, k):
    """Baseline: spill to the next workers in a fixed order."""
    got = []
    for p in [(t.worker_id + i) % t.num_workers for i in range(t.num_workers)]:
        take = min(k - len(got), t.segment.free_blocks(p))
        if take:
            try:
                got += t._client.alloc(take, p).tolist()
            except bt.OutOfBlocks:
                continue
        if len(got) == k:
            t._client.append(t._row(row), got)
            return
    if got:
        t._client.release(got)
    raise bt.OutOfBlocks("naive spill: not enough blocks")


def _allocate(t, mode, row, k):
    if mode == "least_loaded":
        t.allocate_blocks(row, k)
    elif mode == "next":
        _naive_allocate(t, row, k)
    else:                                                   # local pool only
        t._client.alloc_append(t._row(row), k, t.worker_id)


def _worker(name, wid, nworkers, rounds, mode, sync, demand, barrier, conn):
    """Rounds of: fill every row (demand blocks in all), clear them. With
    sync, all workers hold their blocks at once when worker 0 samples the
    pools (barriers around the sample); without, they run free (throughput)."""
    try:
        t = DistributedBlockTable(WCFG, nworkers, wid, name=name, blocks_per_worker=POOL)
        per_row = cdiv(demand, WCFG.max_num_reqs)
        samples, failures, blocks = [], 0, 0
        barrier.wait(60)
        t0 = time.perf_counter()
        for _ in range(rounds):
            for r in range(WCFG.max_num_reqs):
                try:
                    _allocate(t, mode, r, per_row)
                    blocks += per_row
                except bt.OutOfBlocks:
                    failures += 1
            if sync:
                barrier.wait(60)
                if wid == 0:
                    samples.append([POOL - (p == 0) - t.segment.free_blocks(p)
                                    for p in range(nworkers)])
                barrier.wait(60)
            for r in range(WCFG.max_num_reqs):
                t.clear_row(r)
        dt = time.perf_counter() - t0
        conn.send({"blocks": blocks, "seconds": dt, "failures": failures, "samples": samples})
        t.close()
    except BaseException as e:
        conn.send({"error": repr(e)})


def run_workers(nworkers, rounds, mode, sync, demands, pool=POOL):
    """Worker w fills demands[w] blocks a round; returns blocks, wall time
    (first start to last finish), ns per block and, with sync, the other
    pools' use at worker 0's peaks."""
    name = shm_name("dist")
    DistributedBlockTable(WCFG, nworkers, 0, name=name, blocks_per_worker=pool).close()
    barrier = FORK.Barrier(nworkers)
    pipes = [FORK.Pipe() for _ in range(nworkers)]
    procs = [FORK.Process(target=_worker, args=(name, w, nworkers, rounds, mode, sync,
                                                demands[w], barrier, pipes[w][1]))
             for w in range(nworkers)]
    for p in procs:
        p.start()
    try:
        res = [pipes[w][0].recv() for w in range(nworkers)]
    finally:
        for p in procs:
            p.join(60)
        bt.Segment.unlink(name)
    errors = [r["error"] for r in res if "error" in r]
    if errors:
        raise RuntimeError(f"worker failed: {errors[0]}")
    blocks = sum(r["blocks"] for r in res)
    wall = max(r["seconds"] for r in res)
    out = {"blocks": blocks, "seconds": wall, "ns_per_block": wall / blocks * 1e9,
           "failures": sum(r["failures"] for r in res)}
    if sync and nworkers > 1:
        used = np.array(res[0]["samples"], float)[:, 1:] / pool
        out["other_pools_used_mean"] = used.mean(axis=0).round(3).tolist()
        out["spread"] = float((used.max(axis=1) - used.min(axis=1)).mean())
    return out


def run_serial(rounds, demands):
    """The same calls as run_workers(4, ..., "least_loaded", False), made by
    one process that plays every worker in turn (four tables, one segment)."""
    n = len(demands)
    first = DistributedBlockTable(WCFG, n, 0, blocks_per_worker=POOL)
    tables = [first] + [DistributedBlockTable(WCFG, n, w, segment=first.segment,
                                              blocks_per_worker=POOL) for w in range(1, n)]
    per_row = [cdiv(d, WCFG.max_num_reqs) for d in demands]
    blocks = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for t, k in zip(tables, per_row):
            for r in range(WCFG.max_num_reqs):
                t.allocate_blocks(r, k)
                blocks += k
        for t in tables:
            for r in range(WCFG.max_num_reqs):
                t.clear_row(r)
    dt = time.perf_counter() - t0
    for t in tables[::-1]:
        t.close()
    return {"blocks": blocks, "seconds": dt, "ns_per_block": dt / blocks * 1e9, "failures": 0}


def bench_workers(quick):
    """Worker 0 wants 1.5 pools a round, the others half a pool each: three
    pools' worth over four pools, so spilling can serve everyone."""
    demands = [int(POOL * 1.5)] + [POOL // 2] * 3
    rounds, srounds = (60, 20) if quick else (400, 60)
    return {
        # throughput: free-running workers against one process making the
        # same calls in turn (the speed-up of running them in parallel)
        "four_least_loaded": run_workers(4, rounds, "least_loaded", False, demands),
        "one_process": run_serial(rounds, demands),
        # balance and failures: every worker holds its blocks when sampled
        "sync_least_loaded": run_workers(4, srounds, "least_loaded", True, demands),
        "sync_next_worker": run_workers(4, srounds, "next", True, demands),
        "sync_local_only": run_workers(4, srounds, "local", True, demands),
    }


# ---- the table -------------------------------------------------------------------
def results(quick=False):
    return {"memory": bench_memory(quick), "decode": bench_decode(quick),
            "workers": bench_workers(quick)}


def rows(r):
    m, d, w = r["memory"], r["decode"], r["workers"]
    out = []
    p = m["paged_2K_c64"]
    out.append(("memory, 1024 rows x 1M tokens (512 at 2K, 4 at 1M), paged C=64",
                p["bytes"] / MiB, "MiB", "dense table", m["dense"]["bytes"] / MiB, 1.0))
    out.append(("  resident (st_blocks), paged C=64, just filled", p["resident_bytes"] / MiB,
                "MiB", "dense, just filled", m["dense"]["resident_bytes"] / MiB, None))
    if "resident_after_churn" in p:
        out.append(("  resident after every row once held 1M tokens, paged C=64",
                    p["resident_after_churn"] / MiB, "MiB", "dense, same history",
                    m["dense"]["resident_after_churn"] / MiB, 1.0))
    for key in [k for k in m if k.startswith("paged_")]:
        q = m[key]
        out.append((f"  {key}: beyond fixed {q['fixed_bytes'] / MiB:.2f} MiB, per used block",
                    q["per_used_block"], "B", "1.2 x 4 B", 4.8, "abs"))
    for label in ("ample", "pressure"):
        a, b = d[f"{label}_prediction"], d[f"{label}_no_prediction"]
        out.append((f"decode ({label}): shared free-list pops per generated block, H=4",
                    a["decode_ops_per_block"], "ops", "no prediction",
                    b["decode_ops_per_block"], 1.0))
        out.append((f"  ({label}) all shared ops (pops, pushes, row releases) per block",
                    a["ops_per_block"], "ops", "no prediction", b["ops_per_block"], 1.0))
        out.append((f"  ({label}) failures while free + reserved sufficed", float(
            a["failures_with_supply"]), "", "must be", 0.0, "abs"))
    four, one = w["four_least_loaded"], w["one_process"]
    ll, nx, lo = w["sync_least_loaded"], w["sync_next_worker"], w["sync_local_only"]
    out.append(("4 worker processes, spilling: time per block (all together)",
                four["ns_per_block"], "ns", "1 process making the same calls", one["ns_per_block"],
                None))
    out.append(("  balance: spread of the other pools' use at worker 0's peaks",
                ll["spread"], "", "spill to the next worker", nx["spread"], 1.0))
    out.append(("  allocation failures, spilling", float(ll["failures"] + four["failures"]), "",
                "local pools only", float(lo["failures"]), None))
    return out


def run(quick=False):
    return rows(results(quick))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the full results here")
    a = ap.parse_args()
    r = results(a.quick)
    table = [("what", "figure", "baseline", "baseline figure", "ratio / target")]
    for what, fig, unit, bname, bfig, target in rows(r):
        if target == "abs":
            verdict = "ok" if fig <= bfig else "MISSED"
            table.append((what, f"{fig:,.3f} {unit}", bname, f"<= {bfig:g} {unit}", verdict))
        else:
            ratio = bfig / fig if fig else float("inf")
            table.append((what, f"{fig:,.3f} {unit}", bname, f"{bfig:,.3f} {unit}",
                          f"{ratio:,.1f}x" + (f" (>= {target:g}x)" if target else "")))
    widths = [max(len(str(x[i])) for x in table) for i in range(5)]
    for line in table:
        print("  ".join(str(c).ljust(wd) for c, wd in zip(line, widths)).rstrip())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=float)
    return r


if __name__ == "__main__":
    main()
