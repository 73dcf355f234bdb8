"""One vLLM engine run for the engine test and the benchmark, in a process of its own.

    python tests/engine/engine.py SPEC.json

SPEC (JSON): model (directory), tp, blocks (num_gpu_blocks_override), max_num_seqs,
max_model_len, max_tokens, batches (a list of prompt lists: each list is one generate()
call, in order, so later batches hit the prefixes earlier ones cached), out (result path),
hold (bool: after the last batch, say "HOLD" and wait for a line on stdin before
shutting down, so the caller can look at btd while the engine lives), kill_batch (a prompt
list generated in a thread once the caller answers "HOLD" with a line, kill_max_tokens each:
the caller SIGKILLs the EngineCore meanwhile, then sends another line to end this process),
turns (bool: before batch i say "READY i" and wait for a line on stdin, and say
"FINISHED" once the result is written, so that a caller can run two engines' batches in
turn). The markers (READY, FINISHED, HOLD, GENERATING, DONE) go to the file descriptor
$BT_ENGINE_CTL_FD (else stdout): vLLM logs to stdout, which the caller sends to a file.

The environment picks stock vLLM or blocktable (BLOCKTABLE_VLLM=<segment>; the plugin is
loaded through vLLM's general-plugins entry point in every process of the engine).

Result (JSON): outputs (token ids per request, in batch order), metrics (vLLM's own counters
from LLM.get_metrics(): prefix-cache queries and hits, preemptions, prompt and generation
tokens), engine_pids (EngineCore and workers: {pid: title}), timings (start_s, generate_s,
tokens per second).
"""
import json
import os
import sys
import threading
import time

# The tiny Llama with dummy weights is the example's (one definition for the example, the
# engine test and bench/bench_vllm.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from vllm_engine import tiny_llama  # noqa: E402,F401


def engine_processes():
    """{pid: title} of this process's descendants (EngineCore, workers)."""
    import psutil
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            pass
    return out


METRICS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
           "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success")


def metric_values(llm):
    out = {}
    for m in llm.get_metrics():
        if m.name in METRICS and hasattr(m, "value"):
            out[m.name] = out.get(m.name, 0) + m.value
    return out


def make_llm(spec):
    from vllm import LLM
    kw = dict(model=spec["model"], load_format="dummy", skip_tokenizer_init=True,
              dtype="float32", block_size=32, enforce_eager=True, seed=0,
              enable_prefix_caching=True, tensor_parallel_size=spec["tp"],
              num_gpu_blocks_override=spec["blocks"], max_num_seqs=spec["max_num_seqs"],
              max_model_len=spec["max_model_len"], disable_log_stats=False)
    kw.update(spec.get("llm_kwargs", {}))
    return LLM(**kw)


def say(word):
    fd = int(os.environ.get("BT_ENGINE_CTL_FD", "1"))
    os.write(fd, (word + "\n").encode())


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from vllm import SamplingParams
    t0 = time.monotonic()
    llm = make_llm(spec)
    t_start = time.monotonic() - t0
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    outputs, t_gen, ntok, windows = [], 0.0, 0, []
    for i, batch in enumerate(spec["batches"]):
        if spec.get("turns"):
            say(f"READY {i}")
            sys.stdin.readline()
        prompts = [{"prompt_token_ids": p} for p in batch]
        w0, t1 = time.time(), time.monotonic()
        res = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.monotonic() - t1
        t_gen += dt
        btok = 0
        for r in res:
            ids = list(r.outputs[0].token_ids)
            outputs.append(ids)
            btok += len(ids)
        ntok += btok
        windows.append({"start": w0, "end": time.time(), "requests": len(batch),
                        "tokens": btok, "seconds": dt})
    result = {"outputs": outputs, "metrics": metric_values(llm),
              "engine_pids": engine_processes(), "driver_pid": os.getpid(),
              "batches": windows,
              "timings": {"start_s": round(t_start, 3), "generate_s": round(t_gen, 3),
                          "tokens": ntok, "tokens_per_s": round(ntok / t_gen, 1) if t_gen else 0}}
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    if spec.get("turns"):
        say("FINISHED")
    if spec.get("hold"):
        say("HOLD")
        if spec.get("kill_batch"):
            sys.stdin.readline()        # the caller has looked at the idle engine
            # The caller SIGKILLs the EngineCore while this runs; the front end then
            # raises (engine dead) and this process exits without a clean shutdown.
            prompts = [{"prompt_token_ids": p} for p in spec["kill_batch"]]
            ksp = SamplingParams(temperature=0, max_tokens=spec["kill_max_tokens"],
                                 ignore_eos=True)
            err = []
            t = threading.Thread(target=lambda: _gen_catch(llm, prompts, ksp, err), daemon=True)
            t.start()
            say("GENERATING")
        sys.stdin.readline()
    if spec.get("kill_batch"):
        os._exit(0)         # the engine is dead: nothing to shut down cleanly
    # A clean stop: the EngineCore and the workers exit (their clients close, the
    # engine's cache entries and blocks go back) before this process does.
    llm.llm_engine.engine_core.shutdown()
    say("DONE")


def _gen_catch(llm, prompts, sp, err):
    try:
        llm.generate(prompts, sp, use_tqdm=False)
        say("GENERATED")            # finished before the caller killed the engine
    except BaseException as e:  # noqa: BLE001 - the engine was killed on purpose
        err.append(repr(e))
        say("GENERATE_FAILED " + repr(e)[:200])


if __name__ == "__main__":
    main()
