"""The four self-rewarding data stages of one iteration (paper §2.2-2.3): M_t creates its own training data.

    prompts ──► candidates ──► judgements ──► pairs (+ reference log-probs under M_t)

Each stage reads the previous stage's dataset, writes an HF `datasets` dataset of atomically committed shards
(`jaxsr.artifacts.ShardedWriter`), and a stats JSON. A stage interrupted at any point resumes after its last
committed shard; all randomness is a function of (seed, iteration, row), so a resumed stage writes exactly the
rows an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import artifacts, backends, distributed
from .chat import chat_token_ids
from .config import JaxsrConfig
from .judge import aggregate_scores, load_judge_template
from .judging import expected_scores, judge, judge_request_ids  # noqa: F401 (the judge stage's helpers)
from .pairs import select_pair
from .policy import Policy
from .selfinstruct import PromptFilter, build_fewshot_prompt, extract_instruction
from .stages import Context, Stage, map_rows, stage_seed, write_rows

log = logging.getLogger(__name__)

# Prompts per committed shard of the candidate and judge stages; a kill loses at most one shard of work.
SHARD_PROMPTS = 16
# A prompt source standing in for a fixed generator model: (seed, stream, n, held_out) -> n instructions.
PromptSource = Callable[[int, str, int, set], list]


# --- 1. prompts ------------------------------------------------------------------------------------------------

def generate_prompts(policy: Policy | None, seed_prompts: Sequence[str], out_dir, cfg: JaxsrConfig, iteration: int, *,
                     held_out: Sequence[str] = (), source: PromptSource | None = None, count: int | None = None,
                     backend: backends.Backend | None = None) -> dict:
    """Self-Instruct: few-shot requests to the generator, filtered by ROUGE-L, length, blocklist and dedup.

    One round = `prompts.requests_per_round` requests; each round's accepted prompts are one committed shard,
    so resuming replays the filter state from disk and continues with the next round. A `source` (the
    environment's prompt sampler, `prompts.generator: env`) stands in for the generator model; it never
    returns one of `held_out` (the evaluation instructions). `count` (default `prompts.num_prompts`): the prompts
    wanted; a larger count than a finished directory holds grows it (the pairs target). `backend`: the sampler
    (default: `sample.backend`'s).
    """
    sec = cfg.prompts
    count = sec.num_prompts if count is None else count
    if not seed_prompts:
        raise ValueError("generate_prompts: no seed prompts (the IFT seed data is empty)")
    writer = artifacts.ShardedWriter(out_dir, shard_size=10**9)
    done = artifacts.read_dataset(out_dir, require_complete=False).to_list() if writer.done_rows() else []
    filt = PromptFilter(max_rouge=sec.max_rouge, min_words=sec.min_words, max_words=sec.max_words, existing=seed_prompts)
    accepted = []
    for row in done:
        filt.add(row["prompt"])
        accepted.append(row["prompt"])
    start_round = (max(r["round"] for r in done) + 1) if done else 0
    seed = stage_seed(cfg.seed, iteration, "prompts")
    rnd = start_round
    if len(accepted) < count and rnd < sec.max_rounds:
        writer.reopen()
    bar = distributed.progress(count, initial=min(count, len(accepted)), desc=f"prompts (M{iteration})", unit="prompt")
    while len(accepted) < count and rnd < sec.max_rounds:
        if source is not None:
            texts = source(seed, f"{iteration}/{rnd}", sec.requests_per_round, set(held_out))
        else:
            rng = random.Random(seed + rnd)
            requests = [build_fewshot_prompt(seed_prompts, accepted, rng, num_seed=sec.num_seed_shots,
                                             num_generated=sec.num_generated_shots)
                        for _ in range(sec.requests_per_round)]
            if backend is None:
                backend = backends.from_config(cfg)
            # The tokenizer's default special tokens, as for any plain-text prompt (docs/sampling.md). Left-truncation
            # keeps the open "Task N:" slot when the few-shot list outgrows the context.
            ids = policy.tokenizer(requests)["input_ids"]
            outs = backend.generate(policy, ids, max_new_tokens=sec.max_new_tokens, temperature=sec.temperature,
                                    top_p=sec.top_p, seed=seed + rnd, truncate_prompts=True,
                                    max_batch_rows=cfg.sample.max_batch_rows)
            texts = [extract_instruction(out[0].text) or "" for out in outs]
        rows = []
        for text in texts:
            if filt.check(text) is None and len(accepted) < count:
                filt.add(text)
                accepted.append(text)
                rows.append({"prompt_id": len(accepted) - 1, "prompt": text, "round": rnd})
        writer.extend(rows)
        writer.flush()
        bar.update(len(rows))
        rnd += 1
    bar.close()
    if not accepted:
        raise RuntimeError(f"generate_prompts: no prompt passed the filters in {rnd} rounds (rejections: {dict(filt.counts)})")
    writer.finalize()
    stats = {"stage": "prompts", "iteration": iteration, "prompts": len(accepted), "rounds": rnd,
             "rejections": dict(filt.counts)}
    artifacts.write_json_atomic(Path(out_dir) / "stats.json", stats)
    return stats


def _first_prompts(rows: list[dict], limit: int | None, where) -> list[dict]:
    """The rows of prompts 0 .. limit-1 (all rows when `limit` is None)."""
    if limit is None:
        return rows
    out = [r for r in rows if r["prompt_id"] < limit]
    if len({r["prompt_id"] for r in out}) != limit:
        raise RuntimeError(f"{where}: has rows for {len({r['prompt_id'] for r in out})} of prompts 0..{limit - 1}; "
                           f"the stage before it has not finished this block")
    return out


# --- 2. candidates ---------------------------------------------------------------------------------------------

def generate_candidates(policy: Policy, prompts_dir, out_dir, cfg: JaxsrConfig, iteration: int, *,
                        limit: int | None = None, backend: backends.Backend | None = None) -> dict:
    """N responses per prompt from M_t through the chat template, with token counts and finish reasons.
    `limit`: answer the first `limit` prompts only (a block of the pairs target; the prompts may still be growing).
    `backend`: the sampler (default: `sample.backend`'s)."""
    sec = cfg.sample
    backend = backends.from_config(cfg) if backend is None else backend
    prompts = _first_prompts(artifacts.read_dataset(prompts_dir, require_complete=limit is None).to_list(), limit,
                             prompts_dir)
    seed = stage_seed(cfg.seed, iteration, "candidates")

    def respond(chunk, lo):
        ids = chat_token_ids(policy.tokenizer, [p["prompt"] for p in chunk])
        # The seed depends on the chunk, not on where a resumed run starts.
        outs = backend.generate(policy, ids, num_samples=sec.num_samples, max_new_tokens=sec.max_new_tokens,
                                temperature=sec.temperature, top_p=sec.top_p, top_k=sec.top_k, seed=seed + lo,
                                max_batch_rows=sec.max_batch_rows)
        return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "candidate_id": j, "response": c.text,
                 "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                for p, comps in zip(chunk, outs) for j, c in enumerate(comps)]

    map_rows(out_dir, prompts, respond, chunk=SHARD_PROMPTS, rows_per_item=sec.num_samples,
             desc=f"candidates (M{iteration})", unit="prompt")
    rows = artifacts.read_dataset(out_dir).select(range(len(prompts) * sec.num_samples))
    stats = {"stage": "candidates", "iteration": iteration, "prompts": len(prompts), "candidates": len(rows),
             "mean_tokens": float(np.mean(rows["num_tokens"])) if len(rows) else 0.0,
             "truncated_rate": float(np.mean([r == "length" for r in rows["finish_reason"]])) if len(rows) else 0.0}
    artifacts.write_json_atomic(Path(out_dir) / "stats.json", stats)
    return stats


# --- 3. judgements ---------------------------------------------------------------------------------------------

def judge_candidates(policy: Policy, candidates_dir, out_dir, cfg: JaxsrConfig, iteration: int, *,
                     template: str | None = None, limit: int | None = None,
                     backend: backends.Backend | None = None) -> dict:
    """K sampled judgements per candidate (mean of valid scores), or one `expected` judgement.
    `limit`: judge the candidates of the first `limit` prompts only (a block of the pairs target).
    `backend`: the sampler (default: `sample.backend`'s)."""
    sec = cfg.judge
    backend = backends.from_config(cfg) if backend is None else backend
    template = template if template is not None else load_judge_template(sec.template)
    cands = _first_prompts(artifacts.read_dataset(candidates_dir, require_complete=limit is None).to_list(), limit,
                           candidates_dir)
    k = sec.num_judgements if sec.mode == "sampled" else 1
    seed = stage_seed(cfg.seed, iteration, "judgements")

    def grade(chunk, lo):
        reqs = [judge_request_ids(policy, template, c["prompt"], c["response"], sec.max_new_tokens) for c in chunk]
        verdicts_per_candidate = judge(policy, [r[0] for r in reqs], sec, seed + lo,
                                       max_batch_rows=cfg.sample.max_batch_rows, backend=backend)
        rows = []
        for c, (_, truncated), verdicts in zip(chunk, reqs, verdicts_per_candidate):
            skipped = sec.exclude_truncated and c["finish_reason"] == "length"
            for j, (text, score, mass) in enumerate(verdicts):
                if skipped:
                    score, mass = None, [0.0] * 6 if mass else []
                rows.append({"prompt_id": c["prompt_id"], "candidate_id": c["candidate_id"], "judge_id": j,
                             "judge_text": text, "score": score, "digit_mass": mass,
                             "response_truncated": truncated, "excluded": skipped})
        return rows

    map_rows(out_dir, cands, grade, chunk=SHARD_PROMPTS * cfg.sample.num_samples, rows_per_item=k,
             desc=f"judge (M{iteration})", unit="cand")
    rows = artifacts.read_dataset(out_dir).to_list()[: len(cands) * k]
    judged = [r for r in rows if not r["excluded"]]
    scores = [r["score"] for r in judged]
    hist = Counter(str(int(round(s))) for s in scores if s is not None)
    stats = {"stage": "judgements", "iteration": iteration, "mode": sec.mode, "judgements": len(judged),
             "parse_failure_rate": float(np.mean([s is None for s in scores])) if scores else 0.0,
             "score_histogram": {str(i): hist.get(str(i), 0) for i in range(6)},
             "response_truncated": int(sum(r["response_truncated"] for r in rows if r["judge_id"] == 0)),
             "excluded_candidates": int(sum(r["excluded"] for r in rows if r["judge_id"] == 0))}
    artifacts.write_json_atomic(Path(out_dir) / "stats.json", stats)
    return stats


# --- 4. pairs --------------------------------------------------------------------------------------------------

def candidate_scores(judgements: list[dict]) -> dict[tuple[int, int], float | None]:
    by_cand: dict[tuple[int, int], list] = {}
    for r in judgements:
        by_cand.setdefault((r["prompt_id"], r["candidate_id"]), []).append(None if r["excluded"] else r["score"])
    return {key: aggregate_scores(v) for key, v in by_cand.items()}


def select_pairs(cands: list[dict], judgements: list[dict], length_control: float) -> tuple[list[dict], dict]:
    """Best vs worst per prompt, in prompt order, and the counts of prompts without a pair (`ties`, `too_few_valid`)."""
    scores = candidate_scores(judgements)
    by_prompt: dict[int, list[dict]] = {}
    for c in cands:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    pairs, ties, too_few = [], 0, 0
    for pid in sorted(by_prompt):
        group = sorted(by_prompt[pid], key=lambda c: c["candidate_id"])
        s = [scores.get((pid, c["candidate_id"])) for c in group]
        valid = [x for x in s if x is not None and not math.isnan(x)]
        picked = select_pair(s, [c["num_tokens"] for c in group], length_control=length_control)
        if picked is None:
            if len(valid) < 2:
                too_few += 1
            else:
                ties += 1
            continue
        ci, ri = picked
        if group[ci]["response"] == group[ri]["response"]:
            ties += 1  # different scores for identical text: no preference signal
            continue
        pairs.append({"prompt_id": pid, "prompt": group[ci]["prompt"], "chosen": group[ci]["response"],
                      "rejected": group[ri]["response"], "chosen_score": s[ci], "rejected_score": s[ri],
                      "chosen_tokens": group[ci]["num_tokens"], "rejected_tokens": group[ri]["num_tokens"]})
    return pairs, {"prompts": len(by_prompt), "ties": ties, "too_few_valid": too_few}


def with_reference_logps(policy: Policy, pairs: list[dict], cfg: JaxsrConfig, reference_fn=None
                         ) -> tuple[list[dict], int]:
    """(the pairs with M_t's reference log-probs, how many were dropped): a pair the trainer would drop (e.g. its
    prompt alone exceeds dpo.max_length) gets non-finite values and is left out. `reference_fn(policy, pairs, cfg)`
    defaults to the DPO trainer's own tokenisation and truncation, so the stored values are what it would compute."""
    if not pairs:
        return pairs, 0
    if reference_fn is None:
        from .train import reference_logps

        def reference_fn(pol, prs, c):
            return reference_logps(pol, prs, max_length=c.dpo.max_length, overlong=c.dpo.overlong,
                                   shared_prompt=c.dpo.shared_prompt)
    ref_c, ref_r = reference_fn(policy, pairs, cfg)
    kept = [p | {"ref_chosen_logps": float(a), "ref_rejected_logps": float(b)}
            for p, a, b in zip(pairs, ref_c, ref_r) if np.isfinite(a) and np.isfinite(b)]
    return kept, len(pairs) - len(kept)


def build_pairs(policy: Policy, candidates_dir, judgements_dir, out_dir, cfg: JaxsrConfig, iteration: int,
                *, reference_fn=None, target: int = 0, truth: Callable[[str, str], float] | None = None,
                extra_stats: dict | None = None) -> dict:
    """Best vs worst per prompt (ties and < 2 valid scores discarded), with M_t's reference log-probs; with a
    `target`, the first `target` usable pairs in prompt order.

    `truth(prompt, response) -> score`: the environment's ground truth of the iteration's prompts, when it has one:
    the stats then count the pairs whose chosen answer is truly better or worse, and `pairs.control` can use it
    ("oracle": the pairs by the ground truth; "random": the self-judged pairs oriented by a seeded coin).
    `extra_stats` go into the stats as they are (the blocks of the pairs target)."""
    cands = artifacts.read_dataset(candidates_dir).to_list()
    judged = artifacts.read_dataset(judgements_dir).to_list()
    control = cfg.pairs.control
    if control == "oracle":
        if truth is None:
            raise ValueError("pairs.control=oracle needs the environment's ground-truth grader of the prompts")
        judged = [{"prompt_id": c["prompt_id"], "candidate_id": c["candidate_id"], "excluded": False,
                   "score": truth(c["prompt"], c["response"])} for c in cands]
    pairs, counts = select_pairs(cands, judged, cfg.pairs.length_control)
    if control == "random":
        rng = np.random.default_rng(stage_seed(cfg.seed, iteration, "pairs/random"))
        flips = rng.random(len(pairs)) < 0.5
        for p, flip in zip(pairs, flips):
            if flip:
                for a, b in (("chosen", "rejected"), ("chosen_score", "rejected_score"),
                             ("chosen_tokens", "rejected_tokens")):
                    p[a], p[b] = p[b], p[a]
    ties, too_few, n_prompts = counts["ties"], counts["too_few_valid"], counts["prompts"]
    pairs, unusable = with_reference_logps(policy, pairs, cfg, reference_fn)
    usable = len(pairs)
    if target:
        pairs = pairs[:target]
    write_rows(out_dir, pairs)  # all pairs (with their reference log-probs) are committed or none are
    stats = {"stage": "pairs", "iteration": iteration, "prompts": n_prompts, "pairs": len(pairs),
             "tie_rate": ties / n_prompts if n_prompts else 0.0, "too_few_valid": too_few, "unusable_for_dpo": unusable,
             "mean_chosen_tokens": float(np.mean([p["chosen_tokens"] for p in pairs])) if pairs else 0.0,
             "mean_rejected_tokens": float(np.mean([p["rejected_tokens"] for p in pairs])) if pairs else 0.0,
             "length_control": cfg.pairs.length_control}
    if target:
        stats |= {"target_pairs": target, "usable_pairs": usable, "target_met": len(pairs) >= target,
                  "shortfall": max(0, target - len(pairs))}
    if control:
        stats["control"] = control
    if truth is not None and pairs:
        diff = [truth(p["prompt"], p["chosen"]) - truth(p["prompt"], p["rejected"]) for p in pairs]
        stats |= {"truly_better": float(np.mean([d > 0 for d in diff])),
                  "truly_worse": float(np.mean([d < 0 for d in diff]))}
    stats |= extra_stats or {}
    artifacts.write_json_atomic(Path(out_dir) / "stats.json", stats)
    return stats


# --- the four stages as graph nodes (jaxsr.pipeline.GRAPH) ------------------------------------------------------

def held_out_instructions(ctx: Context) -> list[str]:
    """The evaluation sets' instructions, which no generated prompt may repeat."""
    out = []
    for split, col in (("eval", "instruction"), ("rm_eval", "instruction"), ("rm_eval", "prompt")):
        ds = ctx.split(split)
        if ds is not None and col in ds.column_names:
            out += ds[col]
    return out


def _prompts(ctx: Context, count: int | None = None) -> dict:
    # The paper generates prompts with a fixed model (prompts.generator = its path); "" uses M_t itself, and
    # "env" the environment's own prompt sampler.
    gen = ctx.cfg.prompts.generator
    source, policy = None, None
    if gen == "env":
        if not ctx.env.has_prompt_source():
            raise ValueError(f"prompts.generator=env: environment {ctx.env.name!r} has no prompt source; "
                             f"use prompts.generator='' (M_t) or a generator model path")
        source = ctx.env.new_prompts
    elif gen:
        from .policy import load_policy

        ctx.release_models()  # the fixed generator has the devices to itself
        policy = load_policy(gen, dtype=ctx.cfg.model.dtype, mesh=ctx.mesh)  # only samples: stored as it computes
        policy.decode_tensor = ctx.cfg.sample.decode_tensor
    else:
        policy = ctx.policy()
    return generate_prompts(policy, ctx.split("seed_prompts")["prompt"], ctx.path("prompts"), ctx.cfg, ctx.t,
                            held_out=held_out_instructions(ctx), source=source, count=count,
                            backend=None if source else ctx.backend())


def next_block(n: int, pairs: int, target: int, cap: int, min_block: int) -> int:
    """How many prompts the next block of the pairs target brings the iteration to: enough for the missing pairs
    at the pair yield so far (+10%), at least `min_block` more, at most `cap`."""
    per_prompt = max(pairs, 1) / n
    return min(cap, n + max(min_block, math.ceil((target - pairs) / per_prompt * 1.1)))


def pairs_wanted(cfg: JaxsrConfig, t: int) -> int:
    """Pairs iteration t's pairs stage keeps: the DPO target, plus the pairs whose prompts checkpoint selection
    holds out; 0 = no target (every pair)."""
    target = cfg.prompts.target(t)
    return target + (cfg.dpo.selection_prompts if target and cfg.dpo.eval_every else 0)


def grow_to_target(ctx: Context) -> dict:
    """Extends iteration t's prompts, candidates and judgements block by block until their pairs reach the
    iteration's target (`prompts.target_pairs`) or the prompts reach the cap (`prompts.max_prompts`).

    Block 0 is what the prompts, candidates and judgements stages made (`prompts.num_prompts` prompts). Each
    block's size follows from the pairs of the blocks before it, so a run resumed after a kill derives the same
    blocks again (reading what is on disk) and continues where it stopped: the same rows as an uninterrupted run.
    """
    cfg, t = ctx.cfg, ctx.t
    target, cap = pairs_wanted(cfg, t), cfg.prompts.prompt_cap
    read = lambda name: artifacts.read_dataset(ctx.path(name), require_complete=False).to_list()  # noqa: E731
    blocks = [cfg.prompts.num_prompts]
    while True:
        n = blocks[-1]
        have = len(select_pairs([c for c in read("candidates") if c["prompt_id"] < n],
                                [j for j in read("judgements") if j["prompt_id"] < n], cfg.pairs.length_control)[0])
        log.info("iteration %d: %d pairs from %d prompts (target %d)", t, have, n, target)
        if have >= target or n >= cap:
            break
        want = next_block(n, have, target, cap, cfg.prompts.requests_per_round)
        made = _prompts(ctx, count=want)["prompts"]
        if made <= n:
            log.warning("iteration %d: the prompt generator gave no new prompt within prompts.max_rounds=%d",
                        t, cfg.prompts.max_rounds)
            break
        generate_candidates(ctx.policy(), ctx.path("prompts"), ctx.path("candidates"), cfg, t, limit=made,
                            backend=ctx.backend())
        judge_candidates(ctx.policy(), ctx.path("candidates"), ctx.path("judgements"), cfg, t,
                         template=judge_template(ctx), limit=made, backend=ctx.backend())
        blocks.append(made)
    if have < target:
        log.warning("iteration %d: %d pairs, short of the %d wanted (prompts.target_pairs=%s%s) with %d prompts "
                    "(prompts.max_prompts=%d, cap %d)", t, have, target, cfg.prompts.target_pairs,
                    " + dpo.selection_prompts" if target != cfg.prompts.target(t) else "", n, cfg.prompts.max_prompts,
                    cap)
    return {"prompt_blocks": blocks}


def prompt_truth(ctx: Context) -> Callable[[str, str], float] | None:
    """The environment's ground truth of iteration t's prompts (`Environment.prompt_grader`), when its prompt
    source made them; None otherwise."""
    cfg = ctx.cfg
    if cfg.prompts.generator != "env" or not ctx.env.has_prompt_grader():
        return None
    rounds = sorted(set(artifacts.read_dataset(ctx.path("prompts"))["round"]))
    return ctx.env.prompt_grader(stage_seed(cfg.seed, ctx.t, "prompts"), [f"{ctx.t}/{r}" for r in rounds],
                                 cfg.prompts.requests_per_round, set(held_out_instructions(ctx)))


def _pairs(ctx: Context) -> dict:
    target = pairs_wanted(ctx.cfg, ctx.t)
    blocks = grow_to_target(ctx) if target else None
    return build_pairs(ctx.policy(), ctx.path("candidates"), ctx.path("judgements"), ctx.path("pairs"), ctx.cfg,
                       ctx.t, target=target, truth=prompt_truth(ctx), extra_stats=blocks)


def judge_template(ctx: Context) -> str:
    return ctx.env.judge_template() if ctx.cfg.judge.template == "env" else load_judge_template(ctx.cfg.judge.template)


PROMPTS = Stage("prompts", _prompts, reads=("M_t", "data"), writes=("prompts",), section="prompts", command="prompts",
                help="Self-Instruct prompts of iteration t (M_t as generator by default)")
CANDIDATES = Stage(
    "candidates", lambda ctx: generate_candidates(ctx.policy(), ctx.path("prompts"), ctx.path("candidates"), ctx.cfg,
                                                  ctx.t, backend=ctx.backend()),
    reads=("M_t", "prompts"), writes=("candidates",), section="sample", command="sample",
    help="N candidate responses per prompt from M_t")
JUDGEMENTS = Stage(
    "judgements", lambda ctx: judge_candidates(ctx.policy(), ctx.path("candidates"), ctx.path("judgements"), ctx.cfg,
                                               ctx.t, template=judge_template(ctx), backend=ctx.backend()),
    reads=("M_t", "candidates"), writes=("judgements",), section="judge", command="judge",
    help="M_t judges the candidates (LLM-as-a-Judge)")
PAIRS = Stage(
    "pairs", _pairs, reads=("M_t", "candidates", "judgements"), writes=("pairs",), section="pairs", command="pairs",
    grows=("prompts", "candidates", "judgements"),
    help="best-vs-worst pairs with M_t's reference log-probs (to prompts.target_pairs when set)")
