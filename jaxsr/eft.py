"""The EFT seed as the paper builds it (§3.1.1, PAPER.md §3): the SFT baseline judges human-ranked responses.

    sft_baseline (M0 on IFT only) ──► eft_judge (its judgements of every ranked response) ──► eft_build (data/eft)

A prompt's j-th judgements of its responses form one judgement set; a set is kept when its scores order the
responses as the humans ranked them (`agrees_with_ranking`); the kept judgements are rebalanced so the most
common score does not dominate (`rebalance`) and become data/eft: {prompt: the rendered judge request,
response: the judgement}. M1 then trains on IFT + EFT (pipeline's `sft`). The reward-model eval set is the
environment's rm_eval; an environment without one has `eft.eval_fraction` of the ranked prompts held out as
data/rm_eval (never judged, never trained on), whose human rankings are the reference.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np

from . import artifacts
from .judge import render_judge_prompt
from .oasst import in_eval_split
from .judging import judge, judge_request_ids
from .selfreward import SHARD_PROMPTS, judge_template
from .stages import Context, Stage, map_rows, write_rows

JUDGEMENT_FEATURES = datasets.Features({
    "source_id": datasets.Value("int64"), "response_id": datasets.Value("int64"), "rank": datasets.Value("int64"),
    "judge_id": datasets.Value("int64"), "judge_text": datasets.Value("string"), "score": datasets.Value("float64"),
    "response_truncated": datasets.Value("bool")})
EFT_FEATURES = datasets.Features({
    "prompt": datasets.Value("string"), "response": datasets.Value("string"), "score": datasets.Value("float64"),
    "instruction": datasets.Value("string"), "candidate": datasets.Value("string"), "rank": datasets.Value("int64"),
    "source_id": datasets.Value("int64"), "judge_id": datasets.Value("int64")})


# --- the two rules, as pure functions -----------------------------------------------------------------------------

def agrees_with_ranking(scores: Sequence[float | None], ranks: Sequence[int]) -> bool:
    """Whether one judgement per response orders a prompt's responses as the human ranks do (rank 0 = best).

    Agreement: at least two responses, every score valid (not None or NaN), and for every two responses of
    different rank the better-ranked one has the strictly higher score. A tie in score between different ranks
    disagrees; responses of equal rank constrain nothing.
    """
    if len(scores) != len(ranks):
        raise ValueError(f"{len(scores)} scores for {len(ranks)} ranked responses")
    if len(scores) < 2 or any(s is None or math.isnan(s) for s in scores):
        return False
    return all(scores[a] > scores[b] for a in range(len(ranks)) for b in range(len(ranks)) if ranks[a] < ranks[b])


def score_bin(score: float) -> int:
    """The integer score a judgement counts as in the histograms and rebalancing (0.5 rounds up)."""
    return int(math.floor(score + 0.5))


def rebalance(scores: Sequence[float], rng: random.Random) -> list[int]:
    """Indices (in input order) kept after down-sampling the most common score to the count of the next most common.

    The paper discards part of its most common score (4) "so that the scores are not skewed"; cutting it to the
    runner-up's count removes the skew without dropping any other score. Fewer than two distinct scores, or a
    shared top count, keep everything.
    """
    bins = Counter(score_bin(s) for s in scores)
    if len(bins) < 2:
        return list(range(len(scores)))
    (top, n_top), (_, n_next) = bins.most_common(2)
    in_top = [i for i, s in enumerate(scores) if score_bin(s) == top]
    dropped = set(rng.sample(in_top, n_top - n_next))
    return [i for i in range(len(scores)) if i not in dropped]


def stated_judgement(text: str, score: float | None, mode: str) -> tuple[str, float | None]:
    """(EFT target text, the score it states). Sampled judgements are kept as written. An `expected` judgement's
    score is a probability-weighted mean, which its text does not state: the target is its justification up to
    the last "Score:" followed by the rounded score, and that integer is the score the filters see."""
    if mode == "sampled" or score is None:
        return text, score
    cut = text.lower().rfind("score:")
    prefix = text[:cut] if cut >= 0 else text.rstrip() + "\n"
    return f"{prefix}Score: {score_bin(score)}", float(score_bin(score))


def _histogram(scores) -> dict[str, int]:
    hist = Counter(score_bin(s) for s in scores)
    return {str(k): hist.get(k, 0) for k in range(6)}


# --- the stages ---------------------------------------------------------------------------------------------------

def _eft_judge(ctx: Context) -> dict:
    """The baseline's judgements of every ranked response of the training side, `eft.judgements_per_response`
    each (one in judge.mode=expected), resumable by chunks of responses."""
    cfg = ctx.cfg
    source = ctx.split("eft_source").to_list()
    # Without an environment rm_eval, a hash of the prompt holds prompts out as the eval set (eft_build writes it).
    hold_out = ctx.split("rm_eval") is None
    items = [{"source_id": i, "response_id": j, "rank": r["ranks"][j], "prompt": r["prompt"], "response": resp}
             for i, r in enumerate(source)
             if not (hold_out and in_eval_split(r["prompt"], cfg.eft.eval_fraction, cfg.seed))
             for j, resp in enumerate(r["responses"])]
    k = cfg.eft.judgements_per_response if cfg.judge.mode == "sampled" else 1
    sec = dataclasses.replace(cfg.judge, num_judgements=k)
    policy, template, seed, backend = ctx.policy("baseline"), judge_template(ctx), ctx.seed(), ctx.backend()

    def grade(chunk, lo):
        reqs = [judge_request_ids(policy, template, it["prompt"], it["response"], sec.max_new_tokens) for it in chunk]
        verdicts = judge(policy, [r[0] for r in reqs], sec, seed + lo, max_batch_rows=cfg.sample.max_batch_rows,
                         backend=backend)
        return [{"source_id": it["source_id"], "response_id": it["response_id"], "rank": it["rank"], "judge_id": j,
                 "judge_text": text, "score": score, "response_truncated": truncated}
                for it, (_, truncated), v in zip(chunk, reqs, verdicts) for j, (text, score, _) in enumerate(v)]

    out = ctx.path("eft_judge")
    map_rows(out, items, grade, chunk=SHARD_PROMPTS * 4, rows_per_item=k, desc="EFT judge (baseline)", unit="response",
             features=JUDGEMENT_FEATURES)
    scores = artifacts.read_dataset(out)["score"]
    stats = {"stage": "eft_judge", "mode": cfg.judge.mode, "prompts": len({it["source_id"] for it in items}),
             "held_out_prompts": len(source) - len({it["source_id"] for it in items}), "responses": len(items),
             "judgements": len(scores),
             "parse_failure_rate": float(np.mean([s is None for s in scores])) if scores else 0.0,
             "score_histogram": _histogram(s for s in scores if s is not None)}
    artifacts.write_json_atomic(Path(out) / "stats.json", stats)
    return stats


def _eft_build(ctx: Context) -> dict:
    """data/eft from the judgement sets that agree with the human ranking, rebalanced (`eft.rebalance`); the
    held-out ranked prompts as data/rm_eval when the environment gave none."""
    cfg = ctx.cfg
    source = ctx.split("eft_source").to_list()
    judged = artifacts.read_dataset(ctx.path("eft_judge")).to_list()
    template = judge_template(ctx)
    sets: dict[tuple[int, int], dict[int, dict]] = {}
    for r in judged:
        sets.setdefault((r["source_id"], r["judge_id"]), {})[r["response_id"]] = r
    rows, prompts_kept, sets_agreeing = [], set(), 0
    for (i, j), by_response in sorted(sets.items()):
        src, order = source[i], sorted(by_response)
        stated = [stated_judgement(by_response[k]["judge_text"], by_response[k]["score"], cfg.judge.mode)
                  for k in order]
        if not agrees_with_ranking([s for _, s in stated], [src["ranks"][k] for k in order]):
            continue
        prompts_kept.add(i)
        sets_agreeing += 1
        rows += [{"prompt": render_judge_prompt(template, src["prompt"], src["responses"][k]), "response": text,
                  "score": score, "instruction": src["prompt"], "candidate": src["responses"][k],
                  "rank": src["ranks"][k], "source_id": i, "judge_id": j}
                 for k, (text, score) in zip(order, stated)]
    keep = rebalance([r["score"] for r in rows], random.Random(ctx.seed())) if cfg.eft.rebalance else range(len(rows))
    eft = [rows[i] for i in keep]
    write_rows(ctx.path("eft"), eft, features=EFT_FEATURES)
    held = sorted(set(range(len(source))) - {r["source_id"] for r in judged})
    if held:
        write_rows(ctx.path("rm_eval"), [source[i] for i in held])
    stats = {"stage": "eft_build", "prompts": len({i for i, _ in sets}), "judgement_sets": len(sets),
             "sets_agreeing": sets_agreeing,
             "prompts_agreeing": len(prompts_kept), "judgements_agreeing": len(rows),
             "scores_before_rebalance": _histogram(r["score"] for r in rows),
             "scores_after_rebalance": _histogram(r["score"] for r in eft), "eft": len(eft),
             "rm_eval_held_out": len(held)}
    artifacts.write_json_atomic(ctx.path("eft") / "stats.json", stats)
    return stats


def _enabled(cfg) -> bool:
    return cfg.data.build_eft


EFT_JUDGE = Stage("eft_judge", _eft_judge, reads=("baseline", "data"), writes=("eft_judge",), section="eft",
                  when=_enabled, help="the SFT baseline judges the environment's human-ranked responses")
EFT_BUILD = Stage("eft_build", _eft_build, reads=("data", "eft_judge"), writes=("eft",), section="eft",
                  when=_enabled, help="judgement sets that agree with the human ranking, rebalanced -> data/eft")
