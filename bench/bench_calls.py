"""Per-call cost from Python: each per-call method beside the bare cffi calls
it makes (the same calls on the same handle with buffers made once), and
alloc + release beside vLLM's BlockPool, all from one run.

Targets (issue 12): every method within 1.5x of its bare calls; alloc +
release of one block <= 450 ns and >= 1.9x vLLM's BlockPool; filling a
StepPlan from Python lists costs less than the step it runs.

vLLM's BlockPool comes from the wheel when vllm imports here, else from
.venv-vllm (make venv-vllm) in a child process of this run; without either
the row says so and has no peer figure.
The numbers are the least disturbed of many interleaved repeats: ours and
the baseline alternate, so a busy machine slows both alike.

    python bench/bench_calls.py [--quick] [--json FILE]
    (make bench runs it as the "calls" section of bench/run.py)
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VLLM_PY = os.path.join(ROOT, ".venv-vllm", "bin", "python")
WITHIN = "within 1.5x"    # ours / bare at most 1.5 (bench/run.py's fmt_rows)


def pair_ns(ours, base, number, repeat):
    """(ours, base) in ns per call: the minimum over `repeat` alternating runs."""
    bo = bb = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        ours(number)
        t1 = time.perf_counter_ns()
        base(number)
        t2 = time.perf_counter_ns()
        bo, bb = min(bo, (t1 - t0) / number), min(bb, (t2 - t1) / number)
    return bo, bb


# ---- vLLM's BlockPool -------------------------------------------------------------

def vllm_pool_ns(number, repeat):
    """get_new_blocks(1) + free_blocks of vLLM's own BlockPool, ns per pair,
    or None when vllm does not import here."""
    try:
        from vllm.v1.core.block_pool import BlockPool
    except Exception:           # noqa: BLE001 - not installed, or broken: no figure
        return None
    # Prefix caching on, as vLLM runs by default (and as the alloc section of
    # bench/run.py measures it).
    pool = BlockPool(num_gpu_blocks=65536, enable_caching=True, hash_block_size=16)

    def run(k):
        get, free = pool.get_new_blocks, pool.free_blocks
        for _ in range(k):
            free(get(1))
    run(1000)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        run(number)
        best = min(best, (time.perf_counter_ns() - t0) / number)
    return best


def vllm_baseline(number, repeat):
    """(name, ns) of vLLM's BlockPool: here, else in .venv-vllm, else None."""
    t = vllm_pool_ns(number, repeat)
    if t is not None:
        import vllm
        return f"vLLM {vllm.__version__} BlockPool get_new_blocks(1)+free_blocks (prefix caching on)", t
    if os.path.exists(VLLM_PY):
        try:
            res = subprocess.run([VLLM_PY, __file__, "--vllm-only", str(number), str(repeat)],
                                 capture_output=True, text=True, timeout=300)
            d = json.loads(res.stdout.strip().splitlines()[-1])
            if d.get("ns"):
                return (f"vLLM {d['version']} BlockPool get_new_blocks(1)+free_blocks (prefix caching on) "
                        "(.venv-vllm, same run)", d["ns"])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass
    return None


# ---- the methods ----------------------------------------------------------------------

def run(quick=False):
    import numpy as np
    import blocktable as bt
    from blocktable import _lib

    number, repeat = (2000, 15) if quick else (5000, 60)
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=65536, num_rows=512,
                                                   row_width=16))
    cl = seg.client()
    h = cl._cl                       # the bare handle, for the bare calls
    buf = np.empty(1, np.int32)
    cb = _lib.from_buffer("int32_t[]", buf)
    u32 = _lib.new("uint32_t *")
    row = cl.claim_row(key=1)
    row2 = cl.claim_row(key=2)
    held = cl.alloc(1)               # a block to share and release
    hb = _lib.from_buffer("int32_t[]", held)
    cl.alloc_append(row2, 2)
    slots = np.empty(16, np.int64)
    sb = _lib.from_buffer("int64_t[]", slots)
    params = seg._params.c
    A, R = _lib.blocks_alloc, _lib.blocks_release
    rows = []

    def method(what, ours, bare):
        t_o, t_b = pair_ns(ours, bare, number, repeat)
        rows.append((what, t_o, "ns", "bare cffi calls, same run", t_b, WITHIN))
        return t_o, t_b

    def ours_ar(k):
        a, r = cl.alloc, cl.release
        for _ in range(k):
            r(a(1, out=buf))

    def bare_ar(k):
        for _ in range(k):
            A(h, 0, 1, cb)
            R(h, cb, 1)
    t_ar, _ = method("alloc(1, out) + release", ours_ar, bare_ar)

    def ours_aat(k):
        a, t = cl.alloc_append, cl.truncate
        for _ in range(k):
            a(row, 1, out=buf)
            t(row, 0)

    def bare_aat(k):
        a, t = _lib.row_alloc_append, _lib.row_truncate
        for _ in range(k):
            a(h, row, 0, 1, cb)
            t(h, row, 0)
    method("alloc_append(row, 1, out) + truncate", ours_aat, bare_aat)

    def ours_apt(k):
        a, ap, t = cl.alloc, cl.append, cl.truncate
        for _ in range(k):
            ap(row, a(1, out=buf))
            t(row, 0)

    def bare_apt(k):
        ap, t = _lib.row_append, _lib.row_truncate
        for _ in range(k):
            A(h, 0, 1, cb)
            ap(h, row, cb, 1)
            t(h, row, 0)
    method("alloc + append(row, ids) + truncate", ours_apt, bare_apt)

    def ours_sr(k):
        s, r = cl.share, cl.release
        for _ in range(k):
            s(held)
            r(held)

    def bare_sr(k):
        s = _lib.blocks_share
        for _ in range(k):
            s(h, hb, 1)
            R(h, hb, 1)
    method("share(ids) + release(ids)", ours_sr, bare_sr)

    def ours_cr(k):
        c, r = cl.claim_row, cl.release_row
        for i in range(k):
            r(c(key=i))

    def bare_cr(k):
        c, r = _lib.row_claim, _lib.row_release
        for i in range(k):
            c(h, i, -1, 0, u32)
            r(h, u32[0])
    method("claim_row(key) + release_row", ours_cr, bare_cr)

    def ours_tok(k):
        s = cl.set_tokens
        for i in range(k):
            s(row2, i)

    def bare_tok(k):
        s = _lib.row_set_tokens
        for i in range(k):
            s(h, row2, i)
    method("set_tokens(row, n)", ours_tok, bare_tok)

    def ours_sw(k):
        s = cl.swap
        for _ in range(k):
            s(row, row2)

    def bare_sw(k):
        s = _lib.row_swap
        for _ in range(k):
            s(h, row, row2)
    method("swap(a, b)", ours_sw, bare_sw)

    def ours_sl(k):
        s = seg.slots_row
        for _ in range(k):
            s(row2, 0, 16, out=slots)

    def bare_sl(k):
        s, sh = _lib.slots_row, seg._seg
        for _ in range(k):
            s(sh, params, row2, 0, 16, sb)
    method("Segment.slots_row(row, 0, 16, out)", ours_sl, bare_sl)

    # StepPlan: one request grows by a block and is cut back (run), then the
    # steady state of 256 ending + 256 arriving, filled from Python lists.
    plan = cl.step_plan(max_free=256, max_rows=256, max_arrive=256)
    plan.rows[0], plan.n_new[0] = row, 1
    args = plan._args

    def ours_run(k):
        r, t = plan.run, cl.truncate
        for _ in range(k):
            r(0, 1, 0)
            t(row, 0)

    def bare_run(k):
        s, t = _lib.step_ex, _lib.row_truncate
        for _ in range(k):
            args.n_free, args.n_rows, args.n_arrive = 0, 1, 0
            s(h, args)
            t(h, row, 0)
    method("StepPlan.run(0, 1, 0) + truncate", ours_run, bare_run)

    big = cl.step_plan(max_free=256, max_rows=0, max_arrive=256)
    big.arrive_keys[:] = np.arange(1000, 1256)
    big.arrive_n[:] = 1
    big.run(0, 0, 256)
    keys, ones = list(range(1000, 1256)), [1] * 256

    def step_arrays(k):
        run_, free, arrived = big.run, big.free_rows, big.arrive_rows
        for _ in range(k):
            free[:] = arrived
            run_(256, 0, 256)

    def step_lists(k):
        run_, fill, arrived = big.run, big.fill, big.arrive_rows
        for _ in range(k):
            freed = arrived.tolist()            # what a scheduler holds: Python lists
            t0 = time.perf_counter_ns()
            fill(free_rows=freed, arrive_keys=keys, arrive_n=ones)
            fill_ns[0] += time.perf_counter_ns() - t0
            run_(256, 0, 256)
    sn = 40 if quick else 300
    t_step, _ = pair_ns(step_arrays, step_arrays, sn, 5 if quick else 15)
    fill_best = float("inf")
    for _ in range(5 if quick else 15):
        fill_ns = [0]
        step_lists(sn)
        fill_best = min(fill_best, fill_ns[0] / sn)
    rows.append(("StepPlan.fill from lists (256 free, 256 arrive)", fill_best, "ns",
                 "the step it fills (run 256 end + 256 arrive)", t_step, 1.0))

    # Against vLLM's BlockPool (from its wheel) and 450 ns.
    rows.append(("alloc + release of one block, Python", t_ar, "ns", "target", 450.0, "abs"))
    vb = vllm_baseline(number, repeat)
    if vb is None:
        rows.append(("alloc + release of one block, Python", t_ar, "ns",
                     "vLLM's BlockPool: not installed here nor in .venv-vllm", None, "abs"))
    else:
        name, t_v = vb
        rows.append(("alloc + release of one block, Python", t_ar, "ns", name, t_v, 1.9))
    cl.close()
    seg.close()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--vllm-only", nargs=2, type=int, metavar=("NUMBER", "REPEAT"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.vllm_only:
        t = vllm_pool_ns(*a.vllm_only)
        version = None
        if t is not None:
            import vllm
            version = vllm.__version__
        print(json.dumps({"ns": t, "version": version}))
        return
    sys.path.insert(0, HERE)
    from run import fmt_rows
    rows = run(a.quick)
    table = fmt_rows("calls", rows)
    head = ("section", "what", "figure", "baseline", "baseline figure", "ratio", "target met")
    widths = [max(len(str(x[i])) for x in [head] + table) for i in range(len(head))]
    for line in [head] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(zip(("what", "figure", "unit", "baseline", "baseline_figure",
                                 "target"), r)) for r in rows], f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
