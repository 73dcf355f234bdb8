"""make bench: every figure beside a named baseline measured in the same run.

Ratios survive a noisy machine; absolute times do not. Each section returns
rows of (what, figure, unit, baseline name, baseline figure, target); the
table prints them with the ratio and whether the target was met, and --json
writes them all. Sections whose parts are missing (no GPU, no daemon yet)
say so and are skipped.

    python bench/run.py [--json FILE] [--quick] [--only NAME ...]
"""
import argparse
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from baselines import FreeKVCacheBlockQueue, KVCacheBlock, python_pool_alloc, python_pool_free  # noqa: E402


def best_ns(fn, number, repeat=5):
    """Best of `repeat` runs of `number` calls, in ns per call: the least
    disturbed run is the closest to the code's own cost."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn(number)
        best = min(best, (time.perf_counter_ns() - t0) / number)
    return best


# ---- section: allocation from Python ------------------------------------------

def bench_python_alloc(quick):
    import numpy as np
    import blocktable as bt

    n_iter = 2000 if quick else 20000
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=65536, num_rows=512, row_width=16))
    cl = seg.client()
    queue = FreeKVCacheBlockQueue([KVCacheBlock(i) for i in range(1, 65536)])
    rows_out = []
    for n in (1, 16):
        buf = np.empty(n, np.int32)

        def ours(k, n=n, buf=buf):
            alloc, release = cl.alloc, cl.release
            for _ in range(k):
                release(alloc(n, out=buf))

        def theirs(k, n=n):
            for _ in range(k):
                python_pool_free(queue, python_pool_alloc(queue, n))

        t_ours, t_base = best_ns(ours, n_iter), best_ns(theirs, n_iter)
        rows_out.append((f"alloc+free {n} block(s), Python, per block", t_ours / n, "ns",
                         "pure-Python FreeKVCacheBlockQueue (vLLM-style)", t_base / n, None))

    # A whole scheduler step in one call, steady state: the 256 requests of
    # the last step end (their rows released, blocks freed) and 256 new ones
    # arrive with one block each (rows claimed, blocks allocated). The
    # baseline only allocates and frees the same blocks: it keeps no table.
    plan = cl.step_plan(max_free=256, max_rows=0, max_arrive=256)
    plan.arrive_keys[:] = np.arange(256)
    plan.arrive_n[:] = 1
    plan.run(n_arrive=256)

    def step_real(k):
        run, free, arrived = plan.run, plan.free_rows, plan.arrive_rows
        for _ in range(k):
            free[:] = arrived              # last step's requests end
            run(256, 0, 256)

    def step_base(k):
        held = [python_pool_alloc(queue, 1) for _ in range(256)]
        for _ in range(k):
            for g in held:
                python_pool_free(queue, g)
            held = [python_pool_alloc(queue, 1) for _ in range(256)]
        for g in held:
            python_pool_free(queue, g)

    k = 50 if quick else 300
    t_step = best_ns(step_real, k)
    t_base = best_ns(step_base, k)
    rows_out.append(("step: 256 end + 256 arrive with 1 block, one call, per block",
                     t_step / 256, "ns", "pure-Python queue, per block", t_base / 256, 20.0))
    seg.close()
    return rows_out


# ---- section: slot mapping --------------------------------------------------------

def bench_slots(quick):
    import numpy as np
    import blocktable as bt

    R, W, B, T = 256, 128, 16, 8192
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=65536, num_rows=R, row_width=W))
    cl = seg.client()
    rng = np.random.default_rng(0)
    for r in range(R):
        row = cl.claim_row(key=r, row=r)
        cl.alloc_append(row, int(rng.integers(8, 64)))
    table = seg.table  # zero-copy view
    req = np.sort(rng.integers(0, R, T)).astype(np.int32)
    nb = seg.num_blocks[req].astype(np.int64)
    pos = (rng.random(T) * nb * B).astype(np.int64)
    out = np.empty(T, np.int64)
    params = seg.slot_params()
    ref = table.ravel()[req * W + pos // B] * B + pos % B

    def ours(k):
        f = seg.slots_req
        for _ in range(k):
            f(req, pos, out=out, params=params)

    def theirs(k):
        flat = table.ravel()
        for _ in range(k):
            flat[req * W + pos // B] * B + pos % B

    ours(1)
    assert (out == ref).all(), "slot mapping disagrees with the numpy expression"
    n = 200 if quick else 2000
    t_ours, t_base = best_ns(ours, n), best_ns(theirs, n)
    seg.close()
    return [("slot mapping, 8192 tokens over 256 rows", t_ours / 1000, "us",
             "numpy expression of vLLM v1", t_base / 1000, 3.0)]


# ---- section: the C allocator alone ---------------------------------------------

def bench_c_alloc(quick):
    exe = os.path.join(ROOT, "build", "bench_alloc")
    if not os.path.exists(exe):
        return "build/bench_alloc missing (make build/bench_alloc)"
    iters = "300000" if quick else "3000000"
    res = subprocess.run([exe, iters], capture_output=True, text=True, check=True)
    got = {(d["api"], d["batch"], d["threads"]): d["ns_per_block"]
           for d in map(json.loads, res.stdout.split("\n")[:-1])}
    rows = []
    for batch, target in ((16, 10.0), (1, 60.0)):
        for threads in (1, 2):
            raw = got[("raw", batch, threads)]
            client = got[("client", batch, threads)]
            rows.append((f"C pool pop+push, batch {batch}, {threads} thread(s), ns/block", raw, "ns",
                         "target", target if threads == 1 else None, "abs"))
            rows.append((f"C client alloc+release (crash-safe), batch {batch}, {threads} thr", client,
                         "ns", "raw pool, same run", raw, None))
    return rows


SECTIONS = [
    ("python_alloc", bench_python_alloc),
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


def fmt_rows(name, rows):
    out = []
    for r in rows:
        what, fig, unit, bname, bfig, target = r
        if isinstance(target, str) and target.startswith("within "):   # ours / baseline <= x
            most = float(target.split()[1].rstrip("x"))
            ratio = fig / bfig if bfig else float("inf")
            out.append((name, what, f"{fig:,.2f} {unit}", bname, f"{bfig:,.2f} {unit}",
                        f"{ratio:,.2f}x of it (<= {most:g}x)", "yes" if ratio <= most else "NO"))
            continue
        if target == "abs":       # figure against an absolute target
            ok = "" if bfig is None else ("yes" if fig <= bfig else "NO")
            out.append((name, what, f"{fig:,.2f} {unit}", bname, "" if bfig is None else f"< {bfig:g}", "", ok))
            continue
        ratio = bfig / fig if fig else float("inf")
        ok = "" if target is None else ("yes" if ratio >= target else "NO")
        out.append((name, what, f"{fig:,.2f} {unit}", bname, f"{bfig:,.2f} {unit}",
                    f"{ratio:,.1f}x" + (f" (>= {target:g}x)" if target else ""), ok))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    ap.add_argument("--only", nargs="*", help="section names")
    a = ap.parse_args()
    results, table = {}, []
    todo = [(n, f) for n, f in SECTIONS]
    for name, mod in OPTIONAL:
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
    for name, fn in todo:
        if a.only and name not in a.only:
            continue
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows = fn(a.quick)
        if isinstance(rows, str):          # a reason to skip
            results[name] = {"skipped": rows}
            continue
        results[name] = [dict(zip(("what", "figure", "unit", "baseline", "baseline_figure", "target"), r))
                         for r in rows]
        table += fmt_rows(name, rows)
    head = ("section", "what", "figure", "baseline", "baseline figure", "ratio", "target met")
    widths = [max(len(str(x[i])) for x in [head] + table) for i in range(len(head))]
    for line in [head] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    for name, v in results.items():
        if isinstance(v, dict) and "skipped" in v:
            print(f"skipped {name}: {v['skipped']}")
    meta = {"machine": platform.node(), "cpu": _cpu(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": a.quick}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"wrote {a.json}")


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
