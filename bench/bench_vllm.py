"""make bench-vllm: vLLM's block pool, stock beside blocktable, from the same run.

For each mode (stock vLLM; blocktable: BLOCKTABLE_VLLM set, a btd of ours) one engine (the
tiny Llama, dummy weights, TP=1, prefix caching on) generates a warm-up batch and then
batches of 16, 64 and 256 requests (all of a batch run concurrently: max_num_seqs=256 and
KV for all of them; prompts share 4 prefixes). Measured per batch:
- block-pool time per scheduler step: the public methods of the pool class in use are timed
  in the EngineCore (bench/vllm_probe.py, a vLLM general plugin loaded only here), the same
  wrapper for both modes, split into alloc, free, touch, cache, lookup, other;
- end-to-end generated tokens/s of the engine (the driver's generate() wall time).
Each size runs --repeat times per engine; figures are over all of them (summed). Prints a
table and writes bench/vllm_results.json. Goal (issue 9): blocktable's block-pool
time per step <= 1/5 of stock's at 256 requests; throughput not lower at any size.

    python bench/bench_vllm.py [--json PATH] [--sizes 16,64,256] [--max-tokens 64] [--repeat 1]
"""
import argparse
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "engine"))
from engine import tiny_llama  # noqa: E402

from blocktable import Segment  # noqa: E402
from blocktable_daemon.testing import DaemonProcess, child_env, unique_name  # noqa: E402

CATS = ("alloc", "free", "touch", "cache", "lookup", "other")


def prompts(n, rng, prefixes):
    return [prefixes[i % len(prefixes)] + [rng.randrange(3, 1000)
                                           for _ in range(16 + (i * 7) % 32)]
            for i in range(n)]


def probe_path(tmp):
    """A directory that makes bench/vllm_probe.py a vLLM general plugin: a dist-info whose
    entry point importlib.metadata finds on PYTHONPATH."""
    d = os.path.join(tmp, "probe")
    di = os.path.join(d, "bt_vllm_probe-0.dist-info")
    os.makedirs(di, exist_ok=True)
    with open(os.path.join(di, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: bt-vllm-probe\nVersion: 0\n")
    with open(os.path.join(di, "entry_points.txt"), "w") as f:
        f.write("[vllm.general_plugins]\nbt_bench_probe = vllm_probe:register\n")
    return d


def run_mode(mode, tmp, model, sizes, max_tokens, repeat, daemon):
    rng = random.Random(11)
    prefixes = [[rng.randrange(3, 1000) for _ in range(64)] for _ in range(4)]
    batches = [prompts(8, rng, prefixes)]                       # warm-up (not reported)
    labels = ["warmup"]
    for _ in range(repeat):
        for n in sizes:
            batches.append(prompts(n, rng, prefixes))
            labels.append(n)
    d = os.path.join(tmp, mode)
    probe_dir = os.path.join(d, "probe-out")
    os.makedirs(probe_dir, exist_ok=True)
    spec = {"model": model, "tp": 1, "blocks": 4096, "max_num_seqs": max(sizes),
            "max_model_len": 256, "max_tokens": max_tokens, "batches": batches,
            "out": os.path.join(d, "result.json"),
            "llm_kwargs": {"max_num_batched_tokens": 8192}}
    with open(os.path.join(d, "spec.json"), "w") as f:
        json.dump(spec, f)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
           "BT_BENCH_PROBE_DIR": probe_dir}
    full = child_env(env)
    full["PYTHONPATH"] = os.pathsep.join([HERE, probe_path(tmp), full["PYTHONPATH"]])
    full.pop("BLOCKTABLE_VLLM", None)
    if mode == "blocktable":
        full.update({"BLOCKTABLE_VLLM": unique_name("bench"), "BT_SOCKET": daemon.socket})
    log = os.path.join(d, "engine.log")
    t0 = time.monotonic()
    try:
        with open(log, "wb") as lf:
            r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "engine", "engine.py"),
                                os.path.join(d, "spec.json")], env=full, stdout=lf,
                               stderr=subprocess.STDOUT, timeout=1200)
    finally:
        # btd made this segment for the engine and keeps it (segments outlive
        # their users); the benchmark's own segment goes with the benchmark.
        if mode == "blocktable":
            try:
                Segment.unlink(full["BLOCKTABLE_VLLM"])
            except OSError:
                pass
    if r.returncode != 0:
        with open(log, errors="replace") as f:
            raise RuntimeError(f"{mode} engine failed ({r.returncode}):\n{f.read()[-4000:]}")
    with open(spec["out"]) as f:
        res = json.load(f)
    steps = []
    for fn in os.listdir(probe_dir):
        if fn.startswith("steps-"):
            with open(os.path.join(probe_dir, fn)) as f:
                p = json.load(f)
            if p["steps"]:
                steps.append(p)
    if len(steps) != 1:
        raise RuntimeError(f"{mode}: expected the steps of one EngineCore, got {len(steps)} "
                           f"({os.listdir(probe_dir)}); is the probe plugin loaded?")
    [probe] = steps
    out = {"mode": mode, "pool_class": probe["pool_class"], "seconds": time.monotonic() - t0,
           "start_s": res["timings"]["start_s"], "sizes": {}}
    for label, w in zip(labels, res["batches"]):
        if label == "warmup":
            continue
        ss = [s for s in probe["steps"] if w["start"] <= s[0] <= w["end"]]
        nsteps = len(ss)
        cat_ns = [sum(s[3][i] for s in ss) for i in range(len(CATS))]
        cat_calls = [sum(s[4][i] for s in ss) for i in range(len(CATS))]
        pool_ns = sum(cat_ns)
        cur = out["sizes"].setdefault(str(label), {"runs": []})
        cur["runs"].append({
            "steps": nsteps, "max_running": max((s[2] for s in ss), default=0),
            "pool_us_per_step": pool_ns / nsteps / 1e3 if nsteps else None,
            "pool_us_per_step_by_cat": {c: cat_ns[i] / nsteps / 1e3 if nsteps else None
                                        for i, c in enumerate(CATS)},
            "calls_by_cat": dict(zip(CATS, cat_calls)),
            "pool_us_by_cat": {c: cat_ns[i] / 1e3 for i, c in enumerate(CATS)},
            "schedule_us_per_step": sum(s[1] for s in ss) / nsteps / 1e3 if nsteps else None,
            "tokens": w["tokens"], "seconds": w["seconds"],
            "tokens_per_s": w["tokens"] / w["seconds"]})
    # Over the repeats, summed: the same requests in both modes, so the total block-pool time
    # compares the same work even where the step count differs (requests arriving while the
    # engine already runs make more, smaller steps; that depends on timing, not on the pool).
    for cur in out["sizes"].values():
        runs = cur["runs"]
        steps = sum(x["steps"] for x in runs)
        pool_us = sum(x["pool_us_per_step"] * x["steps"] for x in runs)
        cur.update({
            "steps": steps, "max_running": max(x["max_running"] for x in runs),
            "pool_ms_total": pool_us / 1e3,
            "pool_us_per_step": pool_us / steps,
            "pool_us_per_step_by_cat": {
                c: sum(x["pool_us_per_step_by_cat"][c] * x["steps"] for x in runs) / steps
                for c in CATS},
            "schedule_us_per_step": sum(x["schedule_us_per_step"] * x["steps"]
                                        for x in runs) / steps,
            "us_per_call_by_cat": {
                c: (sum(x["pool_us_by_cat"][c] for x in runs) /
                    max(1, sum(x["calls_by_cat"][c] for x in runs))) for c in CATS},
            "tokens": sum(x["tokens"] for x in runs),
            "seconds": sum(x["seconds"] for x in runs)})
        cur["tokens_per_s"] = cur["tokens"] / cur["seconds"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "vllm_results.json"))
    ap.add_argument("--sizes", default="16,64,256")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2,
                    help="batches of each size per engine (figures sum over them)")
    ap.add_argument("--modes", default="stock,blocktable")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    modes = a.modes.split(",")
    plugin = any(ep.name == "blocktable"
                 for ep in importlib.metadata.entry_points(group="vllm.general_plugins"))
    if "blocktable" in modes and not plugin:
        print("bench-vllm: the blocktable.vllm plugin is not installed: stock only",
              file=sys.stderr)
        modes = [m for m in modes if m != "blocktable"]
    import vllm
    results = {"vllm": vllm.__version__, "sizes": sizes, "max_tokens": a.max_tokens,
               "cpus": os.cpu_count(), "load_before": os.getloadavg(), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        model = tiny_llama(os.path.join(tmp, "tiny-llama"))
        daemon = None
        if "blocktable" in modes:
            daemon = DaemonProcess(os.path.join(tmp, "btd"),
                                   sizes={"blocks_per_pool": 64, "num_rows": 8,
                                          "row_width": 8}).start()
        try:
            for mode in modes:
                results["modes"][mode] = run_mode(mode, tmp, model, sizes, a.max_tokens,
                                                  a.repeat, daemon)
        finally:
            if daemon is not None:
                daemon.cleanup()
    results["load_after"] = os.getloadavg()
    print_table(results, sizes)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten to {a.json}")


def print_table(results, sizes):
    st = results["modes"].get("stock")
    bt = results["modes"].get("blocktable")
    print(f"vLLM {results['vllm']} CPU, tiny Llama, TP=1, prefix caching on, "
          f"{results['max_tokens']} tokens per request; pool classes: "
          + ", ".join(f"{m}={r['pool_class']}" for m, r in results["modes"].items()))
    head = (f"{'requests':>8}  {'steps':>9}  {'pool us/step':>21}  {'ratio':>6}  "
            f"{'pool ms total':>17}  {'ratio':>6}  {'tokens/s':>13}  {'ratio':>6}")
    print(head)
    print(f"{'':>8}  {'st/bt':>9}  {'stock':>10} {'blocktable':>10}  {'bt/st':>6}  "
          f"{'stock':>8} {'bt':>8}  {'bt/st':>6}  {'stock':>6} {'bt':>6}  {'bt/st':>6}")
    for n in sizes:
        s = st["sizes"][str(n)]
        b = bt["sizes"][str(n)] if bt else None

        def r(k, s=s, b=b):
            return f"{b[k] / s[k]:>6.2f}" if b else f"{'-':>6}"

        def v(x, k, fmt):
            return format(x[k], fmt) if x else "-"
        steps = f"{s['steps']}/{b['steps']}" if b else str(s["steps"])
        print(f"{n:>8}  {steps:>9}  {v(s, 'pool_us_per_step', '10.1f')} "
              f"{v(b, 'pool_us_per_step', '10.1f'):>10}  {r('pool_us_per_step')}  "
              f"{v(s, 'pool_ms_total', '8.2f')} {v(b, 'pool_ms_total', '8.2f'):>8}  "
              f"{r('pool_ms_total')}  {v(s, 'tokens_per_s', '6.0f')} "
              f"{v(b, 'tokens_per_s', '6.0f'):>6}  {r('tokens_per_s')}")
    print("\nblock-pool us/step by kind (stock | blocktable):")
    for n in sizes:
        s = st["sizes"][str(n)]["pool_us_per_step_by_cat"]
        b = bt["sizes"][str(n)]["pool_us_per_step_by_cat"] if bt else {}
        print(f"{n:>8}  " + "  ".join(
            f"{c} {s[c]:.1f}|{b[c]:.1f}" if bt else f"{c} {s[c]:.1f}" for c in CATS))
    print("\nScheduler.schedule() us/step, all of it (stock | blocktable; blocktable's rows are"
          " written there):")
    print("    " + "  ".join(
        f"{n}: {st['sizes'][str(n)]['schedule_us_per_step']:.0f}|"
        + (f"{bt['sizes'][str(n)]['schedule_us_per_step']:.0f}" if bt else "-") for n in sizes))
    print("\nblock-pool us per call by kind (stock | blocktable):")
    for n in sizes:
        s = st["sizes"][str(n)]["us_per_call_by_cat"]
        b = bt["sizes"][str(n)]["us_per_call_by_cat"] if bt else {}
        print(f"{n:>8}  " + "  ".join(
            f"{c} {s[c]:.2f}|{b[c]:.2f}" if bt else f"{c} {s[c]:.2f}" for c in CATS))


if __name__ == "__main__":
    main()
