"""A vLLM engine whose block pool, prefix cache and block tables live in a
blocktable segment.

    make run                                   # shell 1: btd in the foreground
    make venv-vllm                             # once: vLLM's CPU build + blocktable
    BLOCKTABLE_VLLM=engine0 .venv-vllm/bin/python examples/vllm_engine.py   # shell 2
    .venv/bin/bt-ctl pools; .venv/bin/bt-ctl rows   # shell 3, while it waits

The model is a tiny Llama with dummy weights (a folder holding only its
config.json), so it needs no download; any model vLLM serves works the same
way. Nothing in this script is blocktable-specific: the plugin is loaded by
vLLM itself (entry point group vllm.general_plugins) in every process of the
engine when BLOCKTABLE_VLLM names a segment, and does nothing otherwise. Run
it once with the variable and once without: the generated tokens are the
same.
"""
import json
import os
import sys
import tempfile


def tiny_llama(path):
    """The tiny Llama with dummy weights: a directory holding only config.json
    (tests/engine and bench/bench_vllm.py use this one too)."""
    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
           "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
           "tie_word_embeddings": False}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def main():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    with tempfile.TemporaryDirectory() as model:
        llm = LLM(model=tiny_llama(model), load_format="dummy", skip_tokenizer_init=True,
                  dtype="float32", block_size=32, enforce_eager=True, seed=0,
                  enable_prefix_caching=True, max_model_len=1024, max_num_seqs=16,
                  disable_log_stats=False)
        system = list(range(10, 10 + 96))           # a shared prefix of 3 blocks
        prompts = [{"prompt_token_ids": system + [200 + i] * (8 + i)} for i in range(8)]
        sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        for out in llm.generate(prompts, sp, use_tqdm=False):
            print(out.request_id, list(out.outputs[0].token_ids)[:8], "...")
        hits = {m.name: m.value for m in llm.get_metrics()
                if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")}
        print("prefix cache:", hits)
        if os.environ.get("BLOCKTABLE_VLLM") and sys.stdin.isatty():
            input("the engine is idle: look at it with `bt-ctl pools` / `bt-ctl rows`; "
                  "Enter stops it (every block goes back) ")


if __name__ == "__main__":
    main()
