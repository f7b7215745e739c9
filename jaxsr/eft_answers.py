"""EFT from the policy's own answers (`eft.policy_prompts`): the judge learns the mistakes M1 actually makes.

    sft_baseline (M0 on IFT only) ──► eft_answers (its answers to fresh prompts, graded by the environment) ──► sft

The environment's own EFT rows grade synthetic answers (the world's `degraded_response`), whose mistakes are not
the policy's: a judge trained on them alone rates the policy's answers almost at random (on the world, 54%
pairwise accuracy on M1's own candidates, against 67% on the synthetic rm_eval). This is the analogue of the
paper's EFT seed, built from the SFT baseline's answers: the baseline answers `eft.policy_prompts` fresh prompts
of the environment's prompt source (`sample.num_samples` answers each, sampled as `sample`), the environment's
ground truth grades each answer and writes the judgement in its judge template's answer format
(`Environment.prompt_judge`), and the rows (rebalanced by score when `eft.rebalance`) join IFT + EFT in M1's SFT.
The fresh prompts never repeat an evaluation instruction, and the stream is its own (`eft_answers`), so the loop's
prompts of iteration t are drawn as they were without it.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets

from . import artifacts
from .chat import chat_token_ids
from .config import ConfigValueError
from .eft import _histogram, rebalance
from .judge import render_judge_prompt
from .selfreward import SHARD_PROMPTS, held_out_instructions, judge_template
from .stages import Context, Stage, map_rows, write_rows

ANSWER_FEATURES = datasets.Features({
    "prompt_id": datasets.Value("int64"), "instruction": datasets.Value("string"),
    "candidate_id": datasets.Value("int64"), "candidate": datasets.Value("string"),
    "score": datasets.Value("float64"), "judgement": datasets.Value("string")})

STREAM = "eft_answers"


def enabled(cfg) -> bool:
    return cfg.eft.policy_prompts > 0


def check_environment(env, where: str = "eft.policy_prompts") -> None:
    """The environment must make prompts and grade them into judgements; an error naming what is missing."""
    missing = [what for what, ok in (("a prompt source (new_prompts)", env.has_prompt_source()),
                                      ("a ground-truth judge of its prompts (prompt_judge)", env.has_prompt_judge()))
               if not ok]
    if missing:
        raise ConfigValueError(f"{where} > 0 needs an environment with {' and '.join(missing)}; "
                               f"data.source={env.name!r} has none: set {where}=0")


def _eft_answers(ctx: Context) -> dict:
    cfg, env = ctx.cfg, ctx.env
    check_environment(env)
    sec, n = cfg.sample, cfg.eft.policy_prompts
    seed, held = ctx.seed(), set(held_out_instructions(ctx))
    prompts = env.new_prompts(seed, STREAM, n, held)
    truth = env.prompt_judge(seed, [STREAM], n, held)
    policy, backend = ctx.policy("baseline"), ctx.backend()
    out = Path(ctx.path("eft_answers"))

    def answer(chunk, lo):
        ids = chat_token_ids(policy.tokenizer, chunk)
        outs = backend.generate(policy, ids, num_samples=sec.num_samples, max_new_tokens=sec.max_new_tokens,
                                temperature=sec.temperature, top_p=sec.top_p, top_k=sec.top_k, seed=seed + lo,
                                max_batch_rows=sec.max_batch_rows)
        rows = []
        for i, (prompt, comps) in enumerate(zip(chunk, outs)):
            for j, c in enumerate(comps):
                score, judgement = truth(prompt, c.text)
                rows.append({"prompt_id": lo + i, "instruction": prompt, "candidate_id": j, "candidate": c.text,
                             "score": score, "judgement": judgement})
        return rows

    map_rows(out / "answers", prompts, answer, chunk=SHARD_PROMPTS, rows_per_item=sec.num_samples,
             desc="EFT answers (baseline)", unit="prompt", features=ANSWER_FEATURES)
    answers = artifacts.read_dataset(out / "answers").to_list()
    keep = rebalance([r["score"] for r in answers], random.Random(seed)) if cfg.eft.rebalance else range(len(answers))
    template = judge_template(ctx)
    rows = [{"prompt": render_judge_prompt(template, answers[i]["instruction"], answers[i]["candidate"]),
             "response": answers[i]["judgement"], "score": answers[i]["score"]} for i in keep]
    write_rows(out / "eft", rows)
    stats = {"stage": "eft_answers", "prompts": len(prompts), "answers": len(answers), "eft": len(rows),
             "scores_before_rebalance": _histogram(r["score"] for r in answers),
             "scores_after_rebalance": _histogram(r["score"] for r in rows)}
    artifacts.write_json_atomic(out / "stats.json", stats)
    return stats


def eft_rows(ctx: Context) -> list[dict]:
    """The {prompt, response} rows `eft_answers` made, for M1's SFT; [] when the option is off."""
    if not enabled(ctx.cfg):
        return []
    return artifacts.read_dataset(Path(ctx.path("eft_answers")) / "eft").select_columns(["prompt", "response"]).to_list()


EFT_ANSWERS = Stage("eft_answers", _eft_answers, reads=("baseline", "data"), writes=("eft_answers",), section="eft",
                    when=enabled, help="the SFT baseline answers fresh prompts; the environment grades them into EFT "
                                       "rows (eft.policy_prompts)")
