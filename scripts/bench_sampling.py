"""Sampling throughput: `jaxsr.sample.generate` against transformers' `generate` (PyTorch) on the same weights.

torch is not a jaxsr dependency; run this from an environment that has it, e.g.
    python3 -m venv /work/benchenv && /work/benchenv/bin/pip install torch==2.13.0 && /work/benchenv/bin/pip install -e .
    /work/benchenv/bin/python scripts/bench_sampling.py

For each config it builds a random Llama with torch, saves it with `save_pretrained`, loads it with
`jaxsr.load_policy`, and samples the same random prompts with both (temperature 0.7, top-p 0.9, exactly
`--new-tokens` tokens: no EOS stop in jaxsr, `min_new_tokens` in transformers). Both are warmed up first
(jaxsr's compile time is reported separately); each side reports the median of `--repeats` timed runs, the
two sides' runs alternating. The last lines are one JSON object per config, with the 1-minute load average
at its end: numbers taken while other processes compete for the cores are not comparable (transformers'
OpenMP threads slow down far more than XLA's). Run it on plain devices (do not force fake host devices).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

CONFIGS = {
    # ~1.57M parameters.
    "llama-1.5M": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=512, vocab_size=2048),
    # ~29.4M parameters, grouped-query attention 8:4.
    "llama-30M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1536, vocab_size=4096),
}


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_config(name: str, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import jax
    import jaxsr
    from jaxsr.sample import generate

    torch.manual_seed(args.seed)
    hf_cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(hf_cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rng = np.random.RandomState(args.seed)
    prompts = rng.randint(3, hf_cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int64)
    tokens = args.batch * args.new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        policy = jaxsr.load_policy(tmp)
    log(f"{name}: {n_params / 1e6:.2f}M parameters; jax devices {jax.devices()}; torch threads {torch.get_num_threads()}")

    def run_jaxsr():
        out = generate(policy, prompts.tolist(), max_new_tokens=args.new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, eos_token_ids=[], concurrency=args.concurrency, progress=False)
        assert all(len(c[0].token_ids) == args.new_tokens for c in out), "jaxsr stopped early"
        return out

    t = time.perf_counter()
    run_jaxsr()
    first = time.perf_counter() - t

    # Same weights? Greedy continuations of two prompts must agree (a broken conversion would not).
    ids = torch.tensor(prompts[:2])
    with torch.inference_mode():
        hf_greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                   min_new_tokens=8, pad_token_id=0)[:, args.prompt_len:].tolist()
    jx_greedy = [c[0].token_ids for c in generate(policy, prompts[:2].tolist(), max_new_tokens=8, temperature=0.0,
                                                  eos_token_ids=[], progress=False)]
    same_weights = hf_greedy == jx_greedy
    log(f"  greedy agreement on 2 prompts x 8 tokens: {same_weights}")

    ids, mask = torch.tensor(prompts), torch.ones(prompts.shape, dtype=torch.long)

    def run_hf():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                 top_p=args.top_p, top_k=0, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == args.prompt_len + args.new_tokens
        return out

    # Repeats alternate between the two so that a change in background load hits both alike.
    jax_times, hf_times = [], []
    if not args.skip_hf:
        run_hf()  # warm-up
    for _ in range(args.repeats):
        jax_times.append(timed(run_jaxsr))
        if not args.skip_hf:
            hf_times.append(timed(run_hf))
    jax_s = statistics.median(jax_times)
    hf_s = statistics.median(hf_times) if hf_times else None
    log(f"  jaxsr: first call {first:.2f}s (compile ~{first - jax_s:.2f}s), steady {jax_s * 1e3:.1f} ms "
        f"-> {tokens / jax_s:,.0f} tokens/s")
    if hf_s is not None:
        log(f"  transformers: steady {hf_s * 1e3:.1f} ms -> {tokens / hf_s:,.0f} tokens/s")

    result = {"model": name, "batch": args.batch, "jaxsr_tokens_per_s": round(tokens / jax_s, 1),
              "hf_tokens_per_s": None if hf_s is None else round(tokens / hf_s, 1),
              "speedup": None if hf_s is None else round(hf_s / jax_s, 2),
              "jaxsr_compile_s": round(first - jax_s, 2), "params": n_params, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "greedy_agrees": same_weights, "concurrency": args.concurrency,
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=None, help="jaxsr chunks in flight (default: one per core)")
    ap.add_argument("--skip-hf", action="store_true", help="time jaxsr only (no torch model generate)")
    args = ap.parse_args()
    results = [bench_config(name, args) for name in args.configs]
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
