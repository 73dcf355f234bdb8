"""make bench-vllm: vLLM's block pool, stock beside blocktable, from the same run.

For each mode (stock vLLM; blocktable: BLOCKTABLE_VLLM set, a btd of ours) one engine (the
tiny Llama, dummy weights, TP=1, prefix caching on) generates a warm-up batch and then
batches of 16, 64 and 256 requests (all of a batch run concurrently: max_num_seqs=256 and
KV for all of them; prompts share 4 prefixes). Measured per batch:
- block-pool time per scheduler step: the public methods of the pool class in use are timed
  in the EngineCore (bench/vllm_probe.py, a vLLM general plugin loaded only here), the same
  wrapper for both modes, split into alloc, free, touch, cache, lookup, other;
- end-to-end generated tokens/s of the engine (the driver's generate() wall time).
Both engines are alive at once and take turns: each batch runs in one engine, then the
same batch in the other (the order alternating), never both at once, so that both see the
same machine. Each size runs --repeat times per engine; pool figures are summed over the
repeats, tokens/s is their median. The timing wrapper's own cost per call is measured in
each EngineCore and printed. Prints a table and writes bench/vllm_results.json. Goal (issue 9): blocktable's block-pool
time per step <= 1/5 of stock's at 256 requests; throughput not lower at any size.

    python bench/bench_vllm.py [--json PATH] [--sizes 16,64,256] [--max-tokens 64] [--repeat 3]
"""
import argparse
import importlib.metadata
import json
import os
import random
import statistics
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


class EngineRun:
    """One engine (stock or blocktable) in its own driver process (tests/engine/engine.py),
    running its batches only when told to (the spec's turns), so that two engines alive at
    once take turns batch by batch and see the same machine load."""

    def __init__(self, mode, tmp, model, batches, max_tokens, max_seqs, daemon):
        self.mode, self.d = mode, os.path.join(tmp, mode)
        self.probe_dir = os.path.join(self.d, "probe-out")
        os.makedirs(self.probe_dir, exist_ok=True)
        self.spec = {"model": model, "tp": 1, "blocks": 4096, "max_num_seqs": max_seqs,
                     "max_model_len": 256, "max_tokens": max_tokens, "batches": batches,
                     "out": os.path.join(self.d, "result.json"), "turns": True,
                     "llm_kwargs": {"max_num_batched_tokens": 8192}}
        with open(os.path.join(self.d, "spec.json"), "w") as f:
            json.dump(self.spec, f)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
               "BT_BENCH_PROBE_DIR": self.probe_dir}
        full = child_env(env)
        full["PYTHONPATH"] = os.pathsep.join([HERE, probe_path(tmp), full["PYTHONPATH"]])
        full.pop("BLOCKTABLE_VLLM", None)
        self.segment = None
        if mode == "blocktable":
            self.segment = unique_name("bench")
            full.update({"BLOCKTABLE_VLLM": self.segment, "BT_SOCKET": daemon.socket})
        ctl_r, ctl_w = os.pipe()
        full["BT_ENGINE_CTL_FD"] = str(ctl_w)
        self.log = os.path.join(self.d, "engine.log")
        self.t0 = time.monotonic()
        with open(self.log, "wb") as lf:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "tests", "engine", "engine.py"),
                 os.path.join(self.d, "spec.json")], env=full, stdin=subprocess.PIPE,
                stdout=lf, stderr=subprocess.STDOUT, pass_fds=(ctl_w,))
        os.close(ctl_w)
        self.ctl = os.fdopen(ctl_r, "r")

    def expect(self, word, timeout=900):
        """Wait for the engine's next marker, which must be `word`."""
        import select
        ready, _, _ = select.select([self.ctl], [], [], timeout)
        line = self.ctl.readline().strip() if ready else ""
        if line != word:
            self.proc.kill()
            with open(self.log, errors="replace") as f:
                raise RuntimeError(f"{self.mode} engine said {line!r}, expected {word!r} "
                                   f"(exit {self.proc.poll()}):\n{f.read()[-4000:]}")

    def go(self):
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            # btd made this segment for the engine and keeps it (segments outlive
            # their users); the benchmark's own segment goes with the benchmark.
            if self.segment:
                try:
                    Segment.unlink(self.segment)
                except OSError:
                    pass

    def results(self, labels):
        if self.proc.returncode != 0:
            with open(self.log, errors="replace") as f:
                raise RuntimeError(f"{self.mode} engine failed ({self.proc.returncode}):\n"
                                   f"{f.read()[-4000:]}")
        with open(self.spec["out"]) as f:
            res = json.load(f)
        steps = []
        for fn in os.listdir(self.probe_dir):
            if fn.startswith("steps-"):
                with open(os.path.join(self.probe_dir, fn)) as f:
                    p = json.load(f)
                if p["steps"]:
                    steps.append(p)
        if len(steps) != 1:
            raise RuntimeError(f"{self.mode}: expected the steps of one EngineCore, got "
                               f"{len(steps)} ({os.listdir(self.probe_dir)}); is the probe "
                               "plugin loaded?")
        return summarize(self.mode, steps[0], res, labels, time.monotonic() - self.t0)


def summarize(mode, probe, res, labels, seconds):
    out = {"mode": mode, "pool_class": probe["pool_class"], "seconds": seconds,
           "start_s": res["timings"]["start_s"],
           "probe_ns_per_call": probe.get("probe_ns_per_call"), "sizes": {}}
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
    # Tokens/s is the median over the repeats (each repeat ran right next to the other
    # engine's, so the pairs saw the same machine).
    for cur in out["sizes"].values():
        runs = cur["runs"]
        steps = sum(x["steps"] for x in runs)
        pool_us = sum(x["pool_us_per_step"] * x["steps"] for x in runs)
        calls = sum(sum(x["calls_by_cat"].values()) for x in runs)
        cur.update({
            "steps": steps, "max_running": max(x["max_running"] for x in runs),
            "pool_ms_total": pool_us / 1e3,
            "pool_us_per_step": pool_us / steps,
            "pool_calls_per_step": calls / steps,
            "pool_us_per_step_by_cat": {
                c: sum(x["pool_us_per_step_by_cat"][c] * x["steps"] for x in runs) / steps
                for c in CATS},
            "schedule_us_per_step": sum(x["schedule_us_per_step"] * x["steps"]
                                        for x in runs) / steps,
            "us_per_call_by_cat": {
                c: (sum(x["pool_us_by_cat"][c] for x in runs) /
                    max(1, sum(x["calls_by_cat"][c] for x in runs))) for c in CATS},
            "tokens": sum(x["tokens"] for x in runs),
            "seconds": sum(x["seconds"] for x in runs),
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs)})
    return out


def run_modes(modes, tmp, model, sizes, max_tokens, repeat, daemon):
    """Both engines alive at once; batch i runs in one engine, then in the other (the
    order alternating from batch to batch), never both at once."""
    rng = random.Random(11)
    prefixes = [[rng.randrange(3, 1000) for _ in range(64)] for _ in range(4)]
    batches = [prompts(8, rng, prefixes)]                       # warm-up (not reported)
    labels = ["warmup"]
    for _ in range(repeat):
        for n in sizes:
            batches.append(prompts(n, rng, prefixes))
            labels.append(n)
    runs = {}
    try:
        for m in modes:
            runs[m] = EngineRun(m, tmp, model, batches, max_tokens, max(sizes), daemon)
        for r in runs.values():
            r.expect("READY 0")
        order = list(modes)
        for i in range(len(batches)):
            for m in order:
                runs[m].go()
                runs[m].expect(f"READY {i + 1}" if i + 1 < len(batches) else "FINISHED")
            order.reverse()
        for r in runs.values():
            r.close()
        return {m: r.results(labels) for m, r in runs.items()}
    finally:
        for r in runs.values():
            if r.proc.poll() is None:
                r.proc.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "vllm_results.json"))
    ap.add_argument("--sizes", default="16,64,256")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3,
                    help="batches of each size per engine (pool figures sum over them, "
                         "tokens/s is their median)")
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
            results["modes"] = run_modes(modes, tmp, model, sizes, a.max_tokens, a.repeat,
                                         daemon)
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
    _print_by_kind(st, bt, sizes, "pool_us_per_step_by_cat", ".1f")
    print("\nScheduler.schedule() us/step, all of it (stock | blocktable; blocktable's rows are"
          " written there):")
    print("    " + "  ".join(
        f"{n}: {st['sizes'][str(n)]['schedule_us_per_step']:.0f}|"
        + (f"{bt['sizes'][str(n)]['schedule_us_per_step']:.0f}" if bt else "-") for n in sizes))
    print("\npool calls per step (stock | blocktable): " + "  ".join(
        f"{n}: {st['sizes'][str(n)]['pool_calls_per_step']:.0f}|"
        + (f"{bt['sizes'][str(n)]['pool_calls_per_step']:.0f}" if bt else "-") for n in sizes))
    print("a timed no-op records, per call (ns; the timer's share of every figure above): "
          + ", ".join(f"{m} {r['probe_ns_per_call']:.0f}" for m, r in results["modes"].items()
                      if r.get("probe_ns_per_call") is not None))
    print("\nblock-pool us per call by kind (stock | blocktable):")
    _print_by_kind(st, bt, sizes, "us_per_call_by_cat", ".2f")


def _print_by_kind(st, bt, sizes, key, fmt):
    """One line per size: results[key][kind] of stock | blocktable (stock alone without bt)."""
    for n in sizes:
        s = st["sizes"][str(n)][key]
        b = bt["sizes"][str(n)][key] if bt else {}
        print(f"{n:>8}  " + "  ".join(
            f"{c} {s[c]:{fmt}}|{b[c]:{fmt}}" if bt else f"{c} {s[c]:{fmt}}" for c in CATS))


if __name__ == "__main__":
    main()
