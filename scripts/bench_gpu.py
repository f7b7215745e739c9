"""One-GPU benchmark: jaxsr's greedy decode (tokens/s, share of the HBM roofline) and its DPO train step (MFU),
each against PyTorch + transformers on the same weights in the same process.

  PYTHONPATH=. python scripts/bench_gpu.py                 # --shape 1b: TinyLlama-1.1B's shape, ~6 min on an H200
  PYTHONPATH=. python scripts/bench_gpu.py --shape tiny    # a ~1.3M-parameter Llama: a CPU smoke test (~2-3 min)
  ... --skip-torch | --only decode | --only dpo | --out results.jsonl | --hbm-bw 4.8e12 --peak-flops 989e12

Weights: random (std 0.02 normal, as transformers initialises them), made once with `jaxsr.random_policy`, saved
with `jaxsr.save_hf` (bfloat16 safetensors) to a temporary directory, and loaded from there by both sides:
jaxsr with `load_policy` (bfloat16 for decode; float32 master weights for DPO), PyTorch with
`LlamaForCausalLM.from_pretrained` (bfloat16 for decode, float32 for DPO). No network, no tokenizer.

Decode (one measurement per batch size, default 1 and 64): random 128-token prompts, greedy, no EOS stop
(jaxsr: `eos_token_ids=[]`; transformers: `min_new_tokens` = `max_new_tokens`, as scripts/bench_sampling.py
forces exact lengths). The time of one decode step is the difference of two generations of N_long and
N_short new tokens divided by N_long - N_short, so prefill, compilation and per-call overheads cancel; the
figure is the median of the repeats' paired differences. Default N = 264 and 384: both fall in jaxsr's new-token
bucket 384 (`jaxsr.data.bucket(n, fine=True)`), so both lengths run the same compiled prefill and decode
programs on the same cache (128 + 384 = 512 slots): one compilation per batch size, and the two runs differ
only in their number of decode steps. jaxsr and transformers alternate within every repeat.
  tokens/s = batch / step time.
  HBM roofline step time = (W + KV) / HBM bandwidth, where W = the bf16 bytes of the weights a step reads (every
  matmul weight including lm_head, the norms, and `batch` rows of the embedding table: 2.07 GB for the 1b
  shape, vs 2.20 GB for all weights) and KV = the bf16 keys and values of the filled context:
  2 (K and V) x layers x kv_heads x head_dim x 2 bytes x batch x mean context, the mean context of the
  differenced steps being prompt + (N_short + N_long) / 2 (452 by default). jaxsr's decode attends over the
  whole allocated cache (masked), not the filled part, so it reads prompt_bucket + new_bucket = 512 slots at
  every step: `*_roofline_share` uses the filled context (the ideal), `roofline_step_ms_allocated_kv` and
  `jaxsr_roofline_share_allocated_kv` the bytes jaxsr's program actually reads. transformers' DynamicCache
  reads the filled part (and appends by concatenation, i.e. also rewrites it every step). Logits, sampling
  and activations are not counted (a few MB per step at batch 64).
  Bandwidths: H200 4.8e12 B/s, H100 SXM 3.35e12 (see DEVICES; --hbm-bw overrides, unknown devices report null).

DPO: jaxsr's own train step (scripts/bench_dpo.py `jaxsr_step`: `train.make_step_fns` + `dpo_objective`, as
`jaxsr dpo` runs it), float32 master weights and AdamW state, bfloat16 matmuls (model.dtype=bfloat16,
param_dtype=float32), sigmoid loss beta 0.1, precomputed reference log-probs, global-norm clipping 1.0, no
dropout; batches laid out by dpo.shared_prompt (the default: one row per pair, prompt + chosen + rejected,
the prompt computed once). Default 16 pairs of a 256-token prompt and two 256-token responses (512-token
prompt+response sequences; jaxsr rows of 768 tokens, a bucket length: no padding). PyTorch: bench_dpo.py's
`torch_step` (TRL's DPO step written out: chosen and rejected as 2 x 16 rows of 512 tokens, one forward,
full-vocabulary log-softmax, backward, clipping, torch.optim.AdamW) under torch.autocast(bfloat16) with float32
weights. Both steps move their batch in and wait for the step to finish. The two run one after the other
(torch first, its memory released before jaxsr's step is built), not alternating: both at once would not fit
in one GPU's memory alongside each other with JAX holding its pool.
  Model FLOPs per step (the same figure for both sides, so MFU ratio = speed ratio) of standard DPO, where each
  pair is two causal sequences of T = prompt + response tokens, forward + backward, every position through
  lm_head:
      6 x N x tokens + 12 x L x H x E x causal_pairs,   tokens = 2 x pairs x T,   causal_pairs = 2 x pairs x T^2 / 2
  with N = the matmul weights: L x (D x (H + 2K) x E + H x E x D + 3 x D x F) + D x V (lm_head), i.e. the
  non-embedding parameters less the norms (0.01%), plus lm_head; L layers, D hidden, H heads, K kv heads,
  E head dim, F MLP width, V vocabulary. The reference log-probs are precomputed, so no reference forward.
  MFU = model FLOPs / step time / peak dense bf16 FLOP/s (H200 and H100 SXM: 989e12; --peak-flops overrides).
  jaxsr's layout needs fewer FLOPs for the same step (the prompt once per pair, lm_head only at the 2R
  scored positions): `jaxsr_layout_flops_per_step` = 6 x N_layers x pairs x (P + 2R) + 6 x D x V x pairs x 2R
  + 12 x L x H x E x pairs x (P^2/2 + 2PR + R^2), and `jaxsr_layout_utilisation` divides it by jaxsr's time
  and the peak: how busy the GPU's matrix units are with work the step needs (masked attention scores and
  rematerialisation are not counted). `jaxsr_mfu` > `jaxsr_layout_utilisation` because of that layout.

Output: progress on stderr, each result also on stderr as "result: {...}" when it is measured; the last lines
of stdout are one JSON object per measurement (decode batch 1, decode batch 64, dpo), each with device_kind,
the jax / jaxlib / torch / transformers versions and the git commit (JAXSR_COMMIT or GIT_COMMIT in the
environment, else `git rev-parse HEAD`, else "unknown"). A part that fails reports "error" (or "torch_error")
in its line and the others still run; the exit code is 1 when any part failed. --budget-s (default 360) caps
the decode repeats so the whole run stays near its budget: a decode measurement that runs late keeps the repeats
it has (at least one; `repeats` in its line says how many).

Environment set before JAX starts (unless already set): XLA_PYTHON_CLIENT_PREALLOCATE=false, so JAX takes GPU
memory as it needs it and PyTorch can have the rest (JAX's default preallocates 75% of the GPU), and
XLA_PYTHON_CLIENT_MEM_FRACTION=0.90, the most JAX may take (as scripts/launch_gpu.sh sets it). The host
allocator is tuned as the `jaxsr` command tunes it (jaxsr.hostmem; JAXSR_MALLOC_TUNING=0 turns it off).
Needs torch + transformers for the comparison (not for --skip-torch).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_dpo, bench_sampling
from bench_dpo import alternating, jaxsr_step, make_pairs, torch_step  # noqa: E402
from bench_sampling import log as _log  # noqa: E402

# TinyLlama-1.1B's shape, and a ~1.3M-parameter Llama with the same features (GQA, untied lm_head) for CPU tests.
SHAPES = {
    "1b": {
        "model": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=2048),
        "decode": dict(batches=[1, 64], prompt=128, new_tokens=[264, 384], repeats=3),
        "dpo": dict(pairs=16, prompt=256, response=256, steps=10),
    },
    "tiny": {
        "model": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=352, vocab_size=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=512),
        "decode": dict(batches=[1, 64], prompt=128, new_tokens=[33, 48], repeats=3),
        "dpo": dict(pairs=4, prompt=32, response=32, steps=6),
    },
}
# device_kind substring (lower case, first match wins) -> (HBM bytes/s, dense bf16 FLOP/s), vendors' figures.
DEVICES = [
    ("gh200", (4.0e12, 989e12)),  # the 96 GB HBM3 part (the 144 GB HBM3e one: 4.9e12): pass --hbm-bw
    ("h200", (4.8e12, 989e12)),
    ("h100 pcie", (2.0e12, 756e12)),
    ("h100 nvl", (3.9e12, 835e12)),
    ("h100", (3.35e12, 989e12)),  # SXM ("NVIDIA H100 80GB HBM3")
    ("a100-sxm4-40gb", (1.555e12, 312e12)),
    ("a100", (2.039e12, 312e12)),  # SXM 80 GB
]
START = time.perf_counter()


def log(msg: str):
    _log(f"[{time.perf_counter() - START:6.1f}s] {msg}")


# --- formulas ------------------------------------------------------------------------------------------------

def dims(m: dict) -> dict:
    D, H = m["hidden_size"], m["num_attention_heads"]
    return dict(L=m["num_hidden_layers"], D=D, H=H, K=m["num_key_value_heads"], E=D // H, F=m["intermediate_size"],
                V=m["vocab_size"])


def layer_matmul_params(d: dict) -> int:
    """Matmul weights of the layer stack (q, k, v, o, gate, up, down), all layers."""
    return d["L"] * (d["D"] * (d["H"] + 2 * d["K"]) * d["E"] + d["H"] * d["E"] * d["D"] + 3 * d["D"] * d["F"])


def param_count(d: dict) -> int:
    """Every parameter: embedding, layers (with their two norms), final norm, untied lm_head."""
    return 2 * d["V"] * d["D"] + layer_matmul_params(d) + (2 * d["L"] + 1) * d["D"]


def decode_weight_bytes(d: dict, batch: int) -> int:
    """bf16 bytes of the weights one decode step reads: every weight but the embedding table, of which `batch` rows."""
    return 2 * (layer_matmul_params(d) + d["D"] * d["V"] + (2 * d["L"] + 1) * d["D"] + batch * d["D"])


def kv_bytes_per_token(d: dict) -> int:
    return 2 * d["L"] * d["K"] * d["E"] * 2  # keys and values, every layer, bfloat16


def dpo_model_flops(d: dict, pairs: int, prompt: int, response: int) -> float:
    """Standard DPO (two causal sequences per pair, every position through lm_head), forward + backward."""
    T = prompt + response
    n_mm = layer_matmul_params(d) + d["D"] * d["V"]
    return 6.0 * n_mm * 2 * pairs * T + 12.0 * d["L"] * d["H"] * d["E"] * 2 * pairs * T * T / 2


def dpo_layout_flops(d: dict, pairs: int, prompt: int, response: int) -> float:
    """What jaxsr's shared-prompt rows need: the prompt once, lm_head at the 2R scored positions, attention of
    the prompt to itself and of each response to the prompt and to itself."""
    P, R = prompt, response
    attn_pairs = P * P / 2 + 2 * (R * P + R * R / 2)
    return (6.0 * layer_matmul_params(d) * pairs * (P + 2 * R) + 6.0 * d["D"] * d["V"] * pairs * 2 * R
            + 12.0 * d["L"] * d["H"] * d["E"] * pairs * attn_pairs)


# --- environment ---------------------------------------------------------------------------------------------

def git_commit() -> str:
    for var in ("JAXSR_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_figures(kind: str, args) -> tuple[float | None, float | None]:
    bw = flops = None
    for key, (b, f) in DEVICES:
        if key in kind.lower():
            bw, flops = b, f
            break
    return (args.hbm_bw or bw), (args.peak_flops or flops)


class Budget:
    """Measurement i may run until start + budget x (its cumulative weight): later repeats are skipped past it."""

    def __init__(self, total_s: float, weights: list[float]):
        self.total_s = total_s
        cum, self.ends = 0.0, []
        for w in weights:
            cum += w
            self.ends.append(cum / sum(weights))

    def room(self, i: int, needed_s: float) -> bool:
        if self.total_s <= 0:
            return True
        return time.perf_counter() - START + needed_s <= self.total_s * self.ends[i]


def gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def jax_peak_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        return None
    return stats.get("peak_bytes_in_use")


def free_torch():
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# --- decode --------------------------------------------------------------------------------------------------

class DecodeModels:
    """The bfloat16 jaxsr policy and (unless --skip-torch) transformers model, loaded once for every batch size."""

    def __init__(self, args, ctx: dict, model_dir: str):
        import jax

        import jaxsr

        mesh = jaxsr.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        log("decode: loading the bfloat16 weights (jaxsr, transformers)")
        self.policy = jaxsr.load_policy(model_dir, dtype="bfloat16", mesh=mesh)
        self.hf, self.torch_error = None, None
        if not args.skip_torch:
            try:
                self.hf = TorchDecoder(model_dir, ctx["torch_device"])
            except Exception as e:  # noqa: BLE001
                self.torch_error = f"{type(e).__name__}: {e}"
                log(f"  torch side unavailable: {self.torch_error}")
                traceback.print_exc()


def bench_decode(args, ctx: dict, models: DecodeModels, batch: int, budget: Budget, slot: int) -> dict:
    import numpy as np

    from jaxsr.data import bucket
    from jaxsr.sample import generate

    d, P = ctx["dims"], args.prompt_len
    short, long_ = args.new_tokens
    out = {"measurement": "decode", "batch": batch, "prompt_len": P, "new_tokens": [short, long_],
           "steps_differenced": long_ - short, "greedy": True}
    buckets = (bucket(short, fine=True), bucket(long_, fine=True))
    if buckets[0] != buckets[1]:
        log(f"  note: new-token buckets differ ({buckets[0]} vs {buckets[1]}): jaxsr compiles twice and the two runs "
            f"use caches of different sizes, which biases the differenced step time")
    p_bucket = bucket(P, fine=True)
    slots = p_bucket + buckets[1]
    mean_ctx = P + (short + long_) / 2
    out |= {"mean_context": mean_ctx, "jaxsr_cache_slots": slots, "jaxsr_new_token_buckets": list(buckets)}

    w_bytes = decode_weight_bytes(d, batch)
    kv_filled = kv_bytes_per_token(d) * batch * mean_ctx
    kv_alloc = kv_bytes_per_token(d) * batch * slots
    bw = ctx["hbm_bw"]
    roof = None if not bw else (w_bytes + kv_filled) / bw
    roof_alloc = None if not bw else (w_bytes + kv_alloc) / bw
    out |= {"weight_bytes_read_per_step": w_bytes, "weight_bytes_all": 2 * param_count(d),
            "kv_bytes_per_step_filled": int(kv_filled), "kv_bytes_per_step_allocated": int(kv_alloc),
            "hbm_bw": bw, "roofline_step_ms": None if roof is None else round(roof * 1e3, 4),
            "roofline_step_ms_allocated_kv": None if roof_alloc is None else round(roof_alloc * 1e3, 4)}

    rng = np.random.RandomState(args.seed + batch)
    prompts = rng.randint(3, d["V"], (batch, P)).astype(np.int64)
    policy = models.policy

    def run_jax(n):
        t = time.perf_counter()
        res = generate(policy, prompts.tolist(), max_new_tokens=n, temperature=0.0, seed=args.seed, eos_token_ids=[],
                       progress=False)
        dt = time.perf_counter() - t
        toks = [c[0].token_ids for c in res]
        if any(len(x) != n for x in toks):
            raise RuntimeError(f"jaxsr generated {sorted({len(x) for x in toks})} tokens, expected exactly {n}")
        return dt, np.asarray(toks)

    hf, torch_error = models.hf, models.torch_error
    if hf is not None:
        hf.set_prompts(prompts)

    log(f"decode batch {batch}: jaxsr warm-up ({short} tokens: compiles prefill + decode)")
    first, _ = run_jax(short)
    run_jax(long_)  # first execution of the long loop, untimed
    if hf is not None:
        try:
            log(f"decode batch {batch}: transformers warm-up")
            hf.run(8)
        except Exception as e:  # noqa: BLE001
            torch_error, hf = f"{type(e).__name__}: {e}", None
            traceback.print_exc()
    pause = 0.5 if ctx["platform"] == "cpu" else 0.0  # on a CPU, let one library's worker threads go idle

    jl, js, hl, hs = [], [], [], []
    jax_tokens = hf_tokens = None
    repeats = args.repeats
    for r in range(repeats):
        if r and jl and not budget.room(slot, (jl[-1] + js[-1] + (hl[-1] + hs[-1] if hl else 0))):
            log(f"  budget: stopping after {r} repeats")
            break
        # Each repeat: jaxsr long/short, then transformers long/short (the order flips every repeat).
        order = ["jax", "hf"] if r % 2 == 0 else ["hf", "jax"]
        for side in order:
            time.sleep(pause)
            if side == "jax":
                t_long, jax_tokens = run_jax(long_)
                t_short, _ = run_jax(short)
                jl.append(t_long)
                js.append(t_short)
                log(f"  repeat {r}: jaxsr {long_} tokens {t_long:.3f}s, {short} tokens {t_short:.3f}s")
            elif hf is not None:
                try:
                    t_long, hf_tokens = hf.run(long_)
                    t_short, _ = hf.run(short)
                except Exception as e:  # noqa: BLE001
                    torch_error, hf = f"{type(e).__name__}: {e}", None
                    traceback.print_exc()
                    continue
                hl.append(t_long)
                hs.append(t_short)
                log(f"  repeat {r}: transformers {long_} tokens {t_long:.3f}s, {short} tokens {t_short:.3f}s")
    out["repeats"] = len(jl)
    steps = long_ - short

    def summarise(prefix, tl, ts):
        per_step = [(a - b) / steps for a, b in zip(tl, ts)]
        step_s = statistics.median(per_step)
        res = {f"{prefix}_step_ms": round(step_s * 1e3, 4),
               f"{prefix}_step_ms_range": [round(min(per_step) * 1e3, 4), round(max(per_step) * 1e3, 4)],
               f"{prefix}_tokens_per_s": round(batch / step_s, 1) if step_s > 0 else None,
               f"{prefix}_roofline_share": None if roof is None or step_s <= 0 else round(roof / step_s, 4),
               f"{prefix}_long_generation_s": round(statistics.median(tl), 4)}
        return res, step_s

    res, jax_step = summarise("jaxsr", jl, js)
    out |= res
    out["jaxsr_roofline_share_allocated_kv"] = (None if roof_alloc is None or jax_step <= 0
                                                else round(roof_alloc / jax_step, 4))
    out["jaxsr_first_call_s"] = round(first, 2)  # compilation + a short generation
    out["jax_process_peak_mem_gib"] = gib(jax_peak_bytes())  # JAX's peak so far in this process (GPU only)
    if hl:
        res, hf_step = summarise("hf", hl, hs)
        out |= res
        out["speedup"] = round(hf_step / jax_step, 3) if jax_step > 0 else None
        out["hf_attn_implementation"] = hf.attn_implementation if hf is not None else None
        if jax_tokens is not None and hf_tokens is not None:
            # Same weights, both greedy in bfloat16: they agree until a near-tie of the top two logits falls the
            # other way under different rounding (random weights have flat logits, so that can happen early).
            same = jax_tokens == hf_tokens
            prefix = np.where(same.all(1), same.shape[1], same.argmin(1))
            out["greedy_first_token_agreement"] = round(float(same[:, 0].mean()), 4)
            out["greedy_common_prefix_mean"] = round(float(prefix.mean()), 2)
    if args.skip_torch:
        out["torch"] = "skipped"
    elif torch_error:
        out["torch_error"] = torch_error
    return out


class TorchDecoder:
    """transformers' generate on the bfloat16 copy of the same weights, exactly n new tokens, greedy."""

    def __init__(self, model_dir: str, device: str):
        import torch
        from transformers import LlamaForCausalLM

        self.torch, self.device = torch, device
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)

    def set_prompts(self, prompts):
        self.ids = self.torch.from_numpy(prompts).to(self.device)
        self.mask = self.torch.ones_like(self.ids)

    def run(self, n: int):
        import numpy as np

        torch = self.torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=self.mask, do_sample=False, max_new_tokens=n,
                                      min_new_tokens=n, pad_token_id=0)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if out.shape[1] != self.ids.shape[1] + n:
            raise RuntimeError(f"transformers generated {out.shape[1] - self.ids.shape[1]} tokens, expected {n}")
        return dt, np.asarray(out[:, self.ids.shape[1]:].cpu())


# --- DPO -----------------------------------------------------------------------------------------------------

def bench_dpo_step(args, ctx: dict, model_dir: str) -> dict:
    d = ctx["dims"]
    n, P, R = args.pairs, args.dpo_prompt, args.dpo_response
    row = P + 2 * R
    flops = dpo_model_flops(d, n, P, R)
    layout_flops = dpo_layout_flops(d, n, P, R)
    peak = ctx["peak_flops"]
    out = {"measurement": "dpo", "pairs": n, "prompt_len": P, "response_len": R, "sequence_len": P + R,
           "jaxsr_row_len": row, "layout": "shared_prompt", "torch_rows": f"{2 * n} x {P + R}",
           "compute": "bfloat16 matmuls, float32 master weights and AdamW", "reference": "precomputed",
           "model_flops_per_step": flops, "jaxsr_layout_flops_per_step": layout_flops, "peak_flops": peak}
    pairs = make_pairs(d["V"], n, P, R)
    on_cpu = ctx["platform"] == "cpu"
    pause = 0.5 if on_cpu else 0.0  # bench_dpo's pause lets CPU worker threads wind down; a GPU has none
    rounds = min(4, args.dpo_steps)

    def mfu(step_s):
        return None if not peak else round(flops / step_s / peak, 4)

    # torch first: its memory is released before jaxsr builds its step (JAX keeps what it takes in its pool).
    if args.skip_torch:
        out["torch"] = "skipped"
    else:
        try:
            import torch
            from transformers import LlamaForCausalLM

            dev = ctx["torch_device"]
            log(f"dpo: torch step ({2 * n} rows x {P + R} tokens, autocast bfloat16)")
            model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            step = torch_step(model, pairs, "bfloat16", device=dev)
            t = time.perf_counter()
            step()
            first = time.perf_counter() - t
            sec, _ = alternating({"torch": step}, args.dpo_steps, warmup=1, rounds=rounds, pause=pause)
            s = sec["torch"]
            out |= {"torch_step_s": round(s, 4), "torch_pairs_per_s": round(n / s, 2), "torch_mfu": mfu(s),
                    "torch_first_step_s": round(first, 2),
                    "torch_attn_implementation": getattr(model.config, "_attn_implementation", None)}
            if dev.startswith("cuda"):
                out["torch_peak_mem_gib"] = gib(torch.cuda.max_memory_allocated())
            log(f"  torch: {s * 1e3:.1f} ms/step, MFU {out['torch_mfu']}")
            del model, step
        except Exception as e:  # noqa: BLE001
            out["torch_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        free_torch()

    log(f"dpo: jaxsr step ({n} rows x {row} tokens, shared prompt)")
    step = jaxsr_step(model_dir, pairs, "bfloat16")
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    log(f"  jaxsr first step (compiles) {first:.1f}s")
    sec, _ = alternating({"jaxsr": step}, args.dpo_steps, warmup=1, rounds=rounds, pause=pause)
    s = sec["jaxsr"]
    out |= {"jaxsr_step_s": round(s, 4), "jaxsr_pairs_per_s": round(n / s, 2), "jaxsr_mfu": mfu(s),
            "jaxsr_layout_utilisation": None if not peak else round(layout_flops / s / peak, 4),
            "jaxsr_first_step_s": round(first, 2), "jax_process_peak_mem_gib": gib(jax_peak_bytes())}
    if "torch_step_s" in out:
        out["speedup"] = round(out["torch_step_s"] / s, 3)
    log(f"  jaxsr: {s * 1e3:.1f} ms/step, MFU {out['jaxsr_mfu']}")
    out["steps"] = args.dpo_steps
    del step
    gc.collect()
    return out


# --- main ----------------------------------------------------------------------------------------------------

def make_weights(cfg_dict: dict, out_dir: str):
    """Random weights in an HF directory (config.json + bfloat16 safetensors), made with jaxsr on the first device."""
    import jax

    import jaxsr
    from jaxsr.model.config import from_hf_dict

    hf = {"model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
          "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **cfg_dict}
    cfg = from_hf_dict(hf, where="bench_gpu shape")
    mesh = jaxsr.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    policy = jaxsr.random_policy(cfg, seed=0, dtype="float32", mesh=mesh)
    # bfloat16 on disk (half the bytes to write and read); the DPO sides load them as float32 master weights.
    jaxsr.save_hf(policy, out_dir, dtype="bfloat16")
    del policy
    gc.collect()


def emit(line: dict, args):
    text = json.dumps(line)
    _log(f"result: {text}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--only", choices=["decode", "dpo"], help="run one part (default: both)")
    ap.add_argument("--skip-torch", action="store_true", help="time jaxsr only")
    ap.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default: 1 64)")
    ap.add_argument("--prompt-len", type=int, help="decode prompt tokens (default 128)")
    ap.add_argument("--new-tokens", type=int, nargs=2, metavar=("SHORT", "LONG"),
                    help="the two generation lengths whose difference is timed (default: 264 384 for 1b)")
    ap.add_argument("--repeats", type=int, help="decode repeats (default 3; fewer if --budget-s runs out)")
    ap.add_argument("--pairs", type=int, help="DPO pairs per step (default 16 for 1b)")
    ap.add_argument("--dpo-prompt", type=int, help="DPO prompt tokens (default 256 for 1b)")
    ap.add_argument("--dpo-response", type=int, help="DPO response tokens, each of chosen and rejected (default 256)")
    ap.add_argument("--dpo-steps", type=int, help="timed DPO steps per side (default 10 for 1b)")
    ap.add_argument("--hbm-bw", type=float, help="HBM bytes/s (default: from the device kind, e.g. H200 4.8e12)")
    ap.add_argument("--peak-flops", type=float, help="dense bf16 FLOP/s (default: from the device kind, H200 989e12)")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="wall-time target that later decode repeats give way to; 0 = none (default 360)")
    ap.add_argument("--out", help="also append each JSON line to this file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    for key, value in (("batches", shape["decode"]["batches"]), ("prompt_len", shape["decode"]["prompt"]),
                       ("new_tokens", shape["decode"]["new_tokens"]), ("repeats", shape["decode"]["repeats"]),
                       ("pairs", shape["dpo"]["pairs"]), ("dpo_prompt", shape["dpo"]["prompt"]),
                       ("dpo_response", shape["dpo"]["response"]), ("dpo_steps", shape["dpo"]["steps"])):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.dpo_steps < 1:
        ap.error("--repeats and --dpo-steps must be >= 1")
    if not 0 < args.new_tokens[0] < args.new_tokens[1]:
        ap.error(f"--new-tokens needs 0 < SHORT < LONG, got {args.new_tokens}")
    if min(args.batches) < 1 or args.prompt_len < 1 or min(args.pairs, args.dpo_prompt, args.dpo_response) < 1:
        ap.error("batch sizes, lengths and --pairs must be >= 1")
    from jaxsr.data import bucket

    row = args.dpo_prompt + 2 * args.dpo_response
    if args.only != "decode" and bucket(row, fine=True) != row:
        ap.error(f"--dpo-prompt {args.dpo_prompt} + 2 x --dpo-response {args.dpo_response} = {row} is not a jaxsr "
                 f"bucket length (e.g. 96, 128, 192, 256, 384, 512, 768, 1024): jaxsr's rows would be padded")

    # Before JAX starts: take GPU memory on demand (torch shares the GPU) and tune the host allocator like `jaxsr`.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")  # JAX's cap (as scripts/launch_gpu.sh)
    logging.getLogger("jaxsr.policy").setLevel(logging.ERROR)  # "no tokenizer files": expected here
    from jaxsr.hostmem import tune_allocator

    tuned = tune_allocator()
    log(f"bench_gpu --shape {args.shape}: starting (malloc tuned: {tuned})")
    try:
        import jax
        import jaxlib
    except ImportError as e:
        print(f"bench_gpu: cannot import jax ({e}); run with PYTHONPATH=. from the repository root", file=sys.stderr)
        return 2
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    hbm_bw, peak_flops = device_figures(kind, args)
    ctx = {"dims": dims(shape["model"]), "platform": dev.platform, "hbm_bw": hbm_bw, "peak_flops": peak_flops}
    common = {"shape": args.shape, "params": param_count(ctx["dims"]), "device_kind": kind, "platform": dev.platform,
              "devices": jax.device_count(), "jax_version": jax.__version__,
              "jaxlib_version": getattr(jaxlib, "__version__", None), "commit": git_commit(),
              "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
              "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), "malloc_tuned": tuned}
    log(f"device {kind} ({dev.platform}); HBM {hbm_bw} B/s, peak {peak_flops} FLOP/s; "
        f"{common['params'] / 1e6:.1f}M parameters")
    if not args.skip_torch:
        try:
            import torch
            import transformers

            ctx["torch_device"] = "cuda" if dev.platform == "gpu" and torch.cuda.is_available() else "cpu"
            try:
                transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
            except AttributeError:
                pass
            common |= {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
                       "torch_device": ctx["torch_device"]}
            if dev.platform == "gpu" and ctx["torch_device"] == "cpu":
                log("warning: JAX sees a GPU but torch.cuda is not available: the torch side runs on the CPU")
        except ImportError as e:
            print(f"bench_gpu: torch/transformers not importable ({e}); install them or pass --skip-torch",
                  file=sys.stderr)
            return 2

    parts = ([("decode", b) for b in args.batches] if args.only in (None, "decode") else []) + \
            ([("dpo", None)] if args.only in (None, "dpo") else [])
    # Decode part i may run until the budget's cumulative share of parts 0..i (DPO's steps are fixed: it gets less).
    budget = Budget(args.budget_s, [1.2 if p == "decode" else 0.6 for p, _ in parts])
    lines, failed = [], False
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as model_dir:
        try:
            log(f"making random weights in {model_dir}")
            make_weights(shape["model"], model_dir)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            line = common | {"measurement": "setup", "error": f"{type(e).__name__}: {e}"}
            emit(line, args)
            print(json.dumps(line), flush=True)
            return 1
        models = None
        for i, (part, batch) in enumerate(parts):
            t = time.perf_counter()
            try:
                if part == "decode":
                    if models is None:
                        models = DecodeModels(args, ctx, model_dir)
                    line = bench_decode(args, ctx, models, batch, budget, i)
                else:
                    models = None  # frees the decode models (and their GPU memory) before the train steps
                    free_torch()
                    line = bench_dpo_step(args, ctx, model_dir)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                line = {"measurement": part, "error": f"{type(e).__name__}: {e}"} | ({"batch": batch} if batch else {})
                gc.collect()
                free_torch()
            line = common | line | {"wall_s": round(time.perf_counter() - t, 1),
                                    "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            failed |= "error" in line or "torch_error" in line
            emit(line, args)
            lines.append(line)
    log(f"done in {time.perf_counter() - START:.0f}s")
    for line in lines:
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
