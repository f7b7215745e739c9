"""DPO train-step throughput: jaxsr against PyTorch on the same Hugging Face model, batch and lengths.

One process, one CPU device for JAX (no fake devices), PyTorch with its default threads; the two steps run in
alternating blocks so that both see the same machine load; each side reports its median step time and the speedup
is the median of the rounds' paired ratios (with their range). Workload: 8 pairs per step, 64-token prompts,
64-token chosen and rejected responses, sigmoid loss with beta 0.1 and precomputed
reference log-probs, AdamW with global-norm clipping 1.0, no dropout, float32 parameters and optimizer state, the forward
and backward in float32 (--dtype bfloat16 adds a mixed-precision run: torch autocast, jaxsr compute_dtype). The
PyTorch side is the DPO step of TRL's DPOTrainer written out plainly (TRL itself is not needed): one concatenated
forward of chosen and rejected, summed response log-probs, the sigmoid loss, backward, clipping, AdamW. The jaxsr
side is its trainer's step as `jaxsr dpo` runs it: batches laid out by dpo.shared_prompt (the default: one row
per pair, the prompt computed once) and the host allocator tuned as the jaxsr command tunes it
(jaxsr.hostmem; the same process, so torch runs under the same allocator settings).

  python scripts/bench_dpo.py                      # both configs, float32, one JSON line each at the end
  python scripts/bench_dpo.py --config llama-1.5M --steps 20 --dtype float32 --dtype bfloat16

Needs torch (not a jaxsr dependency): run it from a venv that has both, e.g.
  python3 -m venv /work/benchenv2 && /work/benchenv2/bin/pip install torch==2.13.0 && /work/benchenv2/bin/pip install -e .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

CONFIGS = {
    "llama-1.5M": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       vocab_size=2048, intermediate_size=512),
    "llama-30M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      vocab_size=2048, intermediate_size=1536),
}
PAIRS, PROMPT, RESPONSE, BETA, LR = 8, 64, 64, 0.1, 1e-6


def make_model(name: str, out_dir: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=PROMPT + RESPONSE, tie_word_embeddings=False,
                      attention_dropout=0.0)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(out_dir)
    return model


def make_pairs(vocab: int, n: int = PAIRS, prompt: int = PROMPT, response: int = RESPONSE):
    """`n` random pairs of `prompt`-token prompts and `response`-token responses, with reference log-probs.

    The step builders below take their shapes from these pairs (scripts/bench_gpu.py passes its own)."""
    import numpy as np

    from jaxsr import data

    rng = np.random.default_rng(0)
    ids = lambda k: rng.integers(3, vocab, k).astype(np.int32)  # noqa: E731
    pairs = [data.Pair(ids(prompt), ids(response), ids(response), i, (float(-response * 7.0), float(-response * 7.5)))
             for i in range(n)]
    return pairs


def pair_shape(pairs) -> tuple[int, int, int]:
    """(pairs, prompt tokens, response tokens) of `make_pairs`' output."""
    return len(pairs), len(pairs[0].prompt), len(pairs[0].chosen)


def alternating(steps: dict, n: int, warmup: int, rounds: int = 8,
                pause: float = 0.5) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Median seconds per call of each step, over all calls and per round, measured in alternating blocks.

    Each round runs a block of every step in turn, so both see the same machine load; the speedup is then
    taken round by round (a paired estimate), which a shared machine's drifting load distorts far less than
    a ratio of two overall medians. Blocks rather than single steps, with a pause between them: XLA's and
    OpenMP's worker threads spin for a while after their work, and would otherwise steal the cores from the
    other library's next step.
    """
    for f in steps.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in steps}
    per_round = []
    for r in range(rounds):
        this = {}
        for k, f in steps.items():
            time.sleep(pause)
            block = []
            for _ in range(-(-n // rounds)):
                t = time.perf_counter()
                f()
                block.append(time.perf_counter() - t)
            times[k] += block
            this[k] = statistics.median(block)
        per_round.append(this)
    return {k: statistics.median(v) for k, v in times.items()}, per_round


def jaxsr_step(model_dir: str, pairs, dtype: str):
    import jax
    import jax.numpy as jnp

    import jaxsr
    from jaxsr import data, train
    from jaxsr.config import DpoSection
    from jaxsr.model.sharding import batch_sharding
    from jaxsr.objectives import dpo_objective

    n, prompt, response = pair_shape(pairs)
    mesh = jaxsr.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    policy = jaxsr.load_policy(model_dir, mesh=mesh)
    section = DpoSection(lr=LR, final_lr=LR, schedule="constant", batch_size=n, dropout=0.0, beta=BETA,
                         loss_type="sigmoid", max_length=prompt + response, clip_norm=1.0)
    tx, schedule = train.make_optimizer(section, 1000)
    # Mixed precision as the trainer runs it with sft/dpo.compute_dtype=bfloat16: float32 parameters and
    # optimizer state, the forward and backward in `dtype`.
    step_fn, _, shardings = train.make_step_fns(dpo_objective(section), policy.config, mesh, tx, schedule,
                                                dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    state = jax.jit(lambda p: train.init_state(jax.tree.map(jnp.copy, p), tx), out_shardings=shardings)(policy.params)
    # The trainer's batches (dpo.shared_prompt, the default): one row per pair, prompt + chosen + rejected.
    host = data.pair_batch(pairs, [[i] for i in range(n)], batch_size=n, max_length=prompt + response,
                           shared_prompt=section.shared_prompt)
    assert host["ids"].shape == (1, n, prompt + 2 * response), host["ids"].shape
    rng = jax.random.key(0)
    holder = {"state": state}

    def step():
        # As the training loop: the batch goes to the device and the metrics come back every step.
        batch = train.to_device(host, batch_sharding(mesh, micro_axis=True))
        holder["state"], metrics = step_fn(holder["state"], batch, rng, None)
        jax.device_get(metrics["loss"])

    return step


def torch_step(model, pairs, dtype: str, device: str = "cpu"):
    """The step on `model` (already on `device`); on a GPU it waits for the step to finish, as the jaxsr step
    waits for its loss."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    n, prompt, _ = pair_shape(pairs)
    device_type = torch.device(device).type
    model.train()
    # On a GPU the fused AdamW kernel, transformers' Trainer default there ("adamw_torch_fused").
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True if device_type == "cuda" else None)
    chosen = np.stack([np.concatenate([p.prompt, p.chosen]) for p in pairs])
    rejected = np.stack([np.concatenate([p.prompt, p.rejected]) for p in pairs])
    ids = torch.from_numpy(np.concatenate([chosen, rejected])).long().to(device)  # [2B, T]: chosen rows, then rejected
    mask = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    ref = torch.tensor([p.ref_logps for p in pairs], dtype=torch.float32, device=device)

    def step():
        # bfloat16: torch's mixed precision (autocast; float32 weights and AdamW), as TRL runs with bf16=True.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels, lm = ids[:, 1:], loss_mask[:, 1:]
        token_logps = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)
        logps = (token_logps * lm).sum(-1)
        pc, pr = logps[:n], logps[n:]
        z = (pc - pr) - (ref[:, 0] - ref[:, 1])
        loss = -F.logsigmoid(BETA * z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device_type == "cuda":
            torch.cuda.synchronize(device)

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS), help="default: all")
    ap.add_argument("--steps", type=int, default=0, help="timed steps, spread over 8 rounds (default: 24 for 1.5M, 8 for 30M)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                    help="compute dtype of both sides, repeatable (default: float32, one JSON line per config); "
                         "parameters and optimizer state stay float32")
    ap.add_argument("--threads", type=int, default=0,
                    help="pin the process to this many cores and give torch as many threads (default: all, torch's "
                         "default); --threads 1 compares per-core speed, which a busy machine distorts least")
    args = ap.parse_args(argv)
    from jaxsr.hostmem import tune_allocator

    # As the jaxsr command does, before JAX starts its threads; it applies to both sides of the comparison. It
    # speeds up torch's float32 step as well, but slows its bfloat16 autocast step (one malloc arena for all
    # threads): compare bfloat16 with JAXSR_MALLOC_TUNING=0 (docs/benchmarks.md).
    tuned = tune_allocator()
    if args.threads:
        # Before JAX starts: XLA sizes its thread pool from the CPUs this process may run on.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        print("note: XLA_FLAGS asks for fake devices; the bench uses only the first one", file=sys.stderr)
    try:
        import torch
    except ImportError:
        print("bench_dpo needs torch (pip install torch==2.13.0 in a separate venv)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = []
    for name in args.config or list(CONFIGS):
        steps = args.steps or (24 if name == "llama-1.5M" else 8)
        for dtype in args.dtype or ["float32"]:
            with tempfile.TemporaryDirectory() as d:
                model = make_model(name, d)
                pairs = make_pairs(CONFIGS[name]["vocab_size"])
                sec, rounds = alternating({"jaxsr": jaxsr_step(d, pairs, dtype),
                                           "torch": torch_step(model, pairs, dtype)}, steps, args.warmup)
                jax_ps, torch_ps = PAIRS / sec["jaxsr"], PAIRS / sec["torch"]
            # The speedup is the median of the rounds' ratios (paired, see `alternating`), with their range.
            ratios = sorted(r["torch"] / r["jaxsr"] for r in rounds)
            line = {"model": name, "dtype": dtype, "jaxsr_pairs_per_s": round(jax_ps, 2),
                    "torch_pairs_per_s": round(torch_ps, 2), "speedup": round(statistics.median(ratios), 2),
                    "speedup_range": [round(ratios[0], 2), round(ratios[-1], 2)], "rounds": len(ratios),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "malloc_tuned": tuned} | ({"threads": args.threads} if args.threads else {})
            print(f"{name} {dtype}: jaxsr {jax_ps:.1f} pairs/s, torch {torch_ps:.1f} pairs/s, per-round speedups "
                  f"{' '.join(f'{x:.2f}' for x in ratios)} (torch {torch.__version__}, {torch.get_num_threads()} "
                  f"threads)", file=sys.stderr)
            lines.append(line)
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
