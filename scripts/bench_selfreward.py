"""The sampling stages of one self-rewarding iteration: the shared-prefix sampler against the unshared one.

Runs the candidates stage (`selfreward.generate_candidates`: N = 4 answers per prompt, T 0.7, top-p 0.9) and the
judgements stage (`selfreward.judge_candidates`: K = 3 sampled judgements per answer) on random-weight Llamas of
~1.5M and ~30M parameters with the world's tokenizer and chat template. The 30M model judges with the paper's
template (jaxsr/templates/judge_paper.txt: ~990 tokens of rubric in this tokenizer, so prefill dominates the
judge's work, as it does for real models); the 1.5M one with the world's short rubric. "new" is this checkout's
sampler. "old" (`--old`) is either
  * `commit` (default): the stage functions of a pinned commit (`--old-commit`, default 5e3de46, where the sampler
    issue was filed: decode on the training layout, padding rows never done, nothing shared), extracted with
    `git archive` into a temporary package `jaxsr_old` and imported into this process beside jaxsr, with the
    same weights (copied in) and the same config; or
  * `flag`: this checkout with `sample.share_prefixes=false` (every row prefills its whole prompt).
Random weights rarely write EOS or "Score: d", so rows run to their `max_new_tokens`: both paths decode the same
number of tokens, and the ratio measures the sampler's work per row, not a shorter output (with trained weights
the early stops add to the new path's lead). The judge stage of both paths grades the same candidates.

Each path is warmed up once (compiling its shapes), then the paths alternate `--repeats` times in this process;
each side reports its median. Rows/s: candidates (prompt x sample) or judgements (candidate x judgement) per
second. The last lines are one JSON object per config and stage, with the machine, the commit and the 1-minute
load average (numbers taken while other processes compete for the cores are not comparable).

    python scripts/bench_selfreward.py                       # both configs
    python scripts/bench_selfreward.py --configs llama-30M --prompts 8 --repeats 2 --old flag
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    # ~1.5M parameters (with the world's 1,024-token vocabulary), the world's short rubric.
    "llama-1.5M": dict(arch=dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                                 intermediate_size=512), template="env"),
    # ~30M parameters, grouped-query attention 8:4, the paper's long rubric.
    "llama-30M": dict(arch=dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                                intermediate_size=1536), template="paper"),
}


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"commit": commit + ("+dirty" if dirty else ""), "machine": f"{platform.node()} ({os.cpu_count()} x {cpu})"}


def old_package(commit: str, work: Path):
    """The pinned commit's `jaxsr` package as `jaxsr_old` (its modules import each other relatively), with its
    configs in work/old_configs."""
    import importlib

    if (work / "jaxsr_old").is_dir():
        return importlib.import_module("jaxsr_old")
    subprocess.run(f"git archive {commit} jaxsr configs | tar -x -C {work}", shell=True, cwd=REPO, check=True)
    (work / "jaxsr").rename(work / "jaxsr_old")
    (work / "configs").rename(work / "old_configs")
    sys.path.insert(0, str(work))
    for module in ("config", "policy", "model.config", "selfreward"):
        importlib.import_module(f"jaxsr_old.{module}")
    return importlib.import_module("jaxsr_old")


def matmul_floor_s(params, rows: int, steps: int, repeats: int) -> float:
    """Seconds for `steps` decode steps of `rows` rows doing only the model's matmuls (q, k, v, o, gate, up, down
    per layer and the LM head: every weight read once per step, in float32 as the sampler computes on CPU), in
    one jitted loop: a lower bound on any sampler that does this arithmetic, whatever it does about attention,
    sampling, prefill or scheduling. Best of `repeats` after a compile."""
    import jax
    import jax.numpy as jnp

    layers = params["layers"]
    L, D = layers["wq"].shape[:2]
    # Each layer's weights as 2-D matmul operands: q, k, v [D, heads x head_dim], o [heads x head_dim, D].
    flat = [{k: layers[k][i].reshape(D, -1) for k in ("wq", "wk", "wv", "w_gate", "w_up")}
            | {"wo": layers["wo"][i].reshape(-1, D), "w_down": layers["w_down"][i]} for i in range(L)]
    head = params["lm_head"] if "lm_head" in params else params["embed"].T

    @jax.jit
    def run(flat, head, x_BxD):
        def step(_, x):
            for w in flat:
                # q stands in for attention's output; k and v are kept live through their sums.
                kv = (x @ w["wk"]).sum(-1, keepdims=True) + (x @ w["wv"]).sum(-1, keepdims=True)
                x = x + 1e-3 * ((x @ w["wq"]) + 1e-3 * kv) @ w["wo"]
                x = x + 1e-3 * (jax.nn.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]
            return x + 1e-3 * jnp.tanh(x @ head).sum(-1, keepdims=True)
        return jax.lax.fori_loop(0, steps, step, x_BxD)

    x = jnp.ones((rows, D), jnp.float32)
    run(flat, head, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run(flat, head, x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def bench_config(name: str, args, work: Path) -> list[dict]:
    import jax

    from jaxsr import backends
    from jaxsr.config import load_config
    from jaxsr.judge import load_judge_template
    from jaxsr.model.config import ModelConfig
    from jaxsr.policy import random_policy
    from jaxsr.selfreward import generate_candidates, judge_candidates
    from jaxsr.stages import write_rows
    from jaxsr.world import load_tokenizer
    from jaxsr.world.data import WORLD_JUDGE_TEMPLATE, new_instructions

    spec = CONFIGS[name]
    tok = load_tokenizer()
    mcfg = ModelConfig(model_type="llama", vocab_size=len(tok), max_position_embeddings=2048, **spec["arch"])
    policy = random_policy(mcfg, seed=0, tokenizer=tok)
    params = sum(x.size for x in jax.tree.leaves(policy.params))
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides=[
        f"sample.max_new_tokens={args.new_tokens}", f"judge.max_new_tokens={args.judge_tokens}",
        f"judge.template={spec['template']}", "judge.num_judgements=3", "judge.mode=sampled",
        "sample.num_samples=4", "sample.temperature=0.7", "sample.top_p=0.9",
        f"sample.max_batch_rows={args.max_batch_rows}"])
    template = WORLD_JUDGE_TEMPLATE if cfg.judge.template == "env" else load_judge_template(cfg.judge.template)
    prompts_dir = work / name / "prompts"
    rows = [{"prompt_id": i, "prompt": p} for i, p in enumerate(new_instructions(0, "bench", args.prompts, set()))]
    write_rows(prompts_dir, rows)
    log(f"{name}: {params / 1e6:.2f}M parameters, {len(rows)} prompts, judge template {cfg.judge.template!r} "
        f"({len(tok(template)['input_ids'])} tokens)")

    new_backend = backends.load(share_prefixes=True)
    reference_candidates = work / name / "candidates_ref"
    generate_candidates(policy, prompts_dir, reference_candidates, cfg, 1, backend=new_backend)
    template_path = work / name / "judge_template.txt"
    template_path.write_text(template, encoding="utf-8")

    def new_stage(backend):
        def run(stage, out):
            if stage == "candidates" and jax.device_count() == 1:
                generate_candidates(policy, prompts_dir, out, cfg, 1, backend=backend)
            else:
                judge_candidates(policy, reference_candidates, out, cfg, 1, template=template, backend=backend)
        return run

    paths = {"new": new_stage(new_backend)}
    if args.old == "flag":
        paths["old"] = new_stage(backends.load(share_prefixes=False))
    else:
        oldpkg = old_package(args.old_commit, work)
        ocfg = oldpkg.config.load_config(work / "old_configs" / "tiny.yaml", overrides=[
            f"sample.max_new_tokens={args.new_tokens}", f"judge.max_new_tokens={args.judge_tokens}",
            f"judge.template={template_path}", "judge.num_judgements=3", "judge.mode=sampled",
            "sample.num_samples=4", "sample.temperature=0.7", "sample.top_p=0.9",
            f"sample.max_batch_rows={args.max_batch_rows}"])
        opolicy = oldpkg.policy.random_policy(oldpkg.model.config.ModelConfig(
            model_type="llama", vocab_size=len(tok), max_position_embeddings=2048, **spec["arch"]), seed=0,
            tokenizer=tok)
        # The same weights on both sides.
        assert jax.tree.structure(opolicy.params) == jax.tree.structure(policy.params)
        opolicy = dataclasses.replace(opolicy, params=policy.params)

        def run_old(stage, out):
            if stage == "candidates" and jax.device_count() == 1:
                oldpkg.selfreward.generate_candidates(opolicy, prompts_dir, out, ocfg, 1)
            else:
                oldpkg.selfreward.judge_candidates(opolicy, reference_candidates, out, ocfg, 1)
        paths["old"] = run_old

    def run(path: str, stage: str, k: int) -> float:
        out = work / name / f"{stage}_{path}_{k}"
        t = time.perf_counter()
        paths[path](stage, out)
        dt = time.perf_counter() - t
        shutil.rmtree(out)
        return dt

    results = []
    for stage, rows_per_run in (("candidates", len(rows) * 4), ("judge", len(rows) * 4 * 3)):
        if stage not in args.stages:
            continue
        for path in paths:  # warm-up: compiles each path's shapes
            log(f"  {stage} {path}: warm-up {run(path, stage, -1):.1f} s")
        times = {p: [] for p in paths}
        for k in range(args.repeats):
            for path in (("new", "old") if k % 2 == 0 else ("old", "new")):
                times[path].append(run(path, stage, k))
                log(f"  {stage} {path}: {times[path][-1]:.2f} s")
        new, old = (rows_per_run / statistics.median(times[p]) for p in ("new", "old"))
        result = {"model": name, "params": params, "stage": stage, "rows": rows_per_run,
                  "old": args.old_commit if args.old == "commit" else "share_prefixes=false",
                  "new_rows_per_s": round(new, 2), "old_rows_per_s": round(old, 2), "speedup": round(new / old, 2)}
        if stage == "candidates" and jax.device_count() == 1:
            # Random weights: every row decodes its whole budget on both paths, so the decode matmuls of all rows
            # in one batch bound what any sampler can reach here; old / floor is the largest possible speedup. (Not
            # with several fake devices: the paths then spread rows over devices that the one-device loop does not.)
            floor = rows_per_run / matmul_floor_s(policy.params, rows_per_run, args.new_tokens, args.repeats + 1)
            log(f"  {stage} matmul floor: {rows_per_run / floor:.2f} s")
            result |= {"floor_rows_per_s": round(floor, 2), "max_speedup": round(floor / old, 2)}
        results.append(result)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--prompts", type=int, default=4,
                    help="prompts (x4 candidates, x3 judgements each); the old judge prefill of the 30M model holds "
                         "float32 scores of rows x heads x ~1,100^2 tokens: ~5 GB at 4 prompts on 2 cores")
    ap.add_argument("--stages", nargs="+", default=["candidates", "judge"], choices=["candidates", "judge"])
    ap.add_argument("--new-tokens", type=int, default=64, help="sample.max_new_tokens of the candidates")
    ap.add_argument("--judge-tokens", type=int, default=32, help="judge.max_new_tokens")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path, alternating")
    ap.add_argument("--max-batch-rows", type=int, default=256,
                    help="sample.max_batch_rows (the default config's; 5e3de46's stages do not pass it to generate, "
                         "which then uses its default, 256)")
    ap.add_argument("--devices", type=int, default=1,
                    help="CPU devices (XLA's --xla_force_host_platform_device_count, as the tests use 8): the policy's "
                         "training layout spans them (FSDP), which the old path decodes on and the new one reshards "
                         "from; they share the same cores, so this shows layout costs, not parallel speed")
    ap.add_argument("--old", choices=("commit", "flag"), default="commit", help="the old path (see above)")
    ap.add_argument("--old-commit", default="5e3de46", help="the pinned commit of --old commit")
    args = ap.parse_args()
    if args.devices > 1:  # before jax is imported (bench_config imports it)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    work = Path(tempfile.mkdtemp(prefix="bench_selfreward_"))
    extra = provenance() | {"prompts": args.prompts, "new_tokens": args.new_tokens, "judge_tokens": args.judge_tokens,
                            "max_batch_rows": args.max_batch_rows, "repeats": args.repeats, "devices": args.devices}
    try:
        for name in args.configs:  # one JSON line per config and stage as each config ends (stdout holds only these)
            for r in bench_config(name, args, work):
                print(json.dumps(r | extra | {"load_1min": round(os.getloadavg()[0], 2)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
