"""Diagnostic for the built-in world: DPO from M1 on pairs picked by the ground-truth grader instead of the
self-judge, from the same iteration-1 candidates of a finished run, then the M2 evaluation. It tells whether the
DPO stage can improve M1 when the preferences are right (docs/results.md). Not part of a run: it reads the
world's task specs, which a real self-rewarding run never has.

  python scripts/oracle_pairs.py RUN_DIR OUT_DIR [dpo.lr=5e-5 ...]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from jaxsr import artifacts, load_policy, selfreward
from jaxsr.config import load_config
from jaxsr.loop import context
from jaxsr.pipeline import evaluate_policy
from jaxsr.selfreward import held_out_instructions
from jaxsr.stages import stage_seed
from jaxsr.train import train_dpo
from jaxsr.world import data as wd
from jaxsr.world.tasks import grade


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    run, out, over = Path(argv[0]), Path(argv[1]), argv[2:]
    manifest = json.loads((run / "manifest.json").read_text())
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(load_config(None, [])),
                                              OmegaConf.create(manifest["config"]), OmegaConf.from_dotlist(over)))
    cfg.run_dir = str(run)
    ctx = context(cfg)
    paths = ctx.paths
    # Iteration 1's prompts come from the world's seeded task sampler (prompts.generator: env): replay it to
    # recover each instruction's spec.
    held = set(held_out_instructions(ctx))
    seed = stage_seed(cfg.seed, 1, "prompts")
    spec = {}
    for rnd in range(50):
        rng = wd._rng(seed, f"new/1/{rnd}")
        for _ in range(cfg.prompts.requests_per_round):
            task = wd._train_task(rng, held)
            spec.setdefault(task.instruction, task.spec)
    cands = paths.stage(1, "candidates")
    rows = artifacts.read_dataset(cands).to_list()
    shutil.rmtree(out, ignore_errors=True)
    writer = artifacts.ShardedWriter(out / "judgements", shard_size=len(rows))
    for c in rows:
        score = float(grade(spec[c["prompt"]], c["response"])[0])
        writer.append({"prompt_id": c["prompt_id"], "candidate_id": c["candidate_id"], "judge_id": 0,
                       "judge_text": f"Score: {int(score)}", "score": score, "digit_mass": [],
                       "response_truncated": False, "excluded": False})
    writer.finalize()
    policy = load_policy(paths.model(1))
    selfreward.build_pairs(policy, cands, out / "judgements", out / "pairs", cfg, 1)
    pairs = artifacts.read_dataset(out / "pairs").to_list()
    print(f"{len(pairs)} pairs; mean true score chosen {np.mean([p['chosen_score'] for p in pairs]):.2f}, "
          f"rejected {np.mean([p['rejected_score'] for p in pairs]):.2f}", file=sys.stderr)
    m2 = train_dpo(policy, pairs, cfg.dpo, out / "train")
    res = evaluate_policy(m2, ctx, 2)
    print(json.dumps({"overrides": over, "pairs": len(pairs),
                      **{k: v for k, v in res.items() if not isinstance(v, (list, dict))}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
