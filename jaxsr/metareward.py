"""Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594; ../shared/docs/PAPER.md §7.1): M_t as meta-judge of its own
judgements, so that DPO also trains the judge.

For the candidates whose K sampled judge scores vary most (the judge is least sure), M_t compares every two of the
candidate's judgements in both orders with a meta-judge prompt that ends in "Winner: Judgement A|B". Position bias
is corrected with the paper's weights (a win in first position counts w1 = wins_2nd / (wins_1st + wins_2nd), a
win in second position w2 = wins_1st / (...), counted over the iteration), an Elo rating per judgement is fitted to
the weighted outcomes by maximum likelihood, and the highest- and lowest-rated judgements of a candidate become a
judge-preference pair: prompt = the judge request, chosen / rejected = the two judgements. DPO trains on them
together with the actor pairs in the iterations `meta.iterations` names (the paper: the first two of four).

    judgements ─► judge_pairs (meta-judge both orders, Elo, + M_t's reference log-probs) ─► dpo
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from typing import Sequence

import datasets
import numpy as np

from . import artifacts
from .chat import chat_token_ids
from .judge import render_judge_prompt, render_meta_prompt
from .stages import Context, Stage, map_rows, write_rows

ELO_SCALE, ELO_INIT = 400.0, 1000.0  # as NeMo-Aligner's meta-judge (PAPER.md §7.1)
META_FEATURES = datasets.Features({"prompt_id": datasets.Value("int64"), "candidate_id": datasets.Value("int64"),
                                   "first": datasets.Value("int64"), "second": datasets.Value("int64"),
                                   "meta_text": datasets.Value("string"), "verdict": datasets.Value("string")})
_WINNER = re.compile(r"winner\s*[:：]\s*[\[\(\"'*]*\s*(?:judge?ments?\s*)?([ab])(?![a-z])", re.IGNORECASE)


def parse_winner(text: str) -> str | None:
    """"A" or "B" from the meta-judge's last "Winner: Judgement X" (also "Winner: A", "Winner: [Judgment B]")."""
    found = _WINNER.findall(text or "")
    return found[-1].upper() if found else None


def position_weights(verdicts: Sequence[tuple[str | None]]) -> tuple[float, float]:
    """(w1, w2): the weight of a win in first and in second position, from all verdicts ("A" = the judgement
    shown first won): w1 = wins_2nd / (wins_1st + wins_2nd), w2 = wins_1st / (...), as the paper has it, so the
    position that wins more often counts less; a meta-judge that always picks A gives w1 = 0 (no information).
    Without any valid verdict: (0.5, 0.5)."""
    counts = Counter(v for v in verdicts if v in ("A", "B"))
    total = counts["A"] + counts["B"]
    if not total:
        return 0.5, 0.5
    return counts["B"] / total, counts["A"] / total


def elo(n: int, outcomes: Sequence[tuple[int, int, float]], *, iters: int = 100, l2: float = 1e-3) -> np.ndarray:
    """Elo ratings of `n` players fitted by maximum likelihood to weighted outcomes (winner, loser, weight):
    P(i beats j) = 1 / (1 + 10^((r_j - r_i) / 400)); ratings centred on 1000. A small L2 penalty keeps a player
    who won every game finite. Newton's method on the (concave) log-likelihood."""
    beta = np.zeros(n)
    if not outcomes:
        return np.full(n, ELO_INIT)
    win = np.array([o[0] for o in outcomes])
    lose = np.array([o[1] for o in outcomes])
    w = np.array([o[2] for o in outcomes], float)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(beta[win] - beta[lose])))  # probability of the observed outcome
        grad = -l2 * beta
        np.add.at(grad, win, w * (1 - p))
        np.add.at(grad, lose, -w * (1 - p))
        h = w * p * (1 - p)
        hess = -l2 * np.eye(n)
        np.add.at(hess, (win, win), -h)
        np.add.at(hess, (lose, lose), -h)
        np.add.at(hess, (win, lose), h)
        np.add.at(hess, (lose, win), h)
        # Least squares: without the penalty the ratings are defined up to a shift (the Hessian is singular along
        # all-ones); the minimum-norm step leaves that direction alone.
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    beta -= beta.mean()
    return ELO_INIT + beta * ELO_SCALE / math.log(10)


def candidate_elo(k: int, comparisons: Sequence[tuple[int, int, str | None]], w1: float, w2: float) -> np.ndarray:
    """Ratings of a candidate's k judgements from its comparisons (first shown, second shown, verdict)."""
    outcomes = []
    for first, second, verdict in comparisons:
        if verdict == "A":
            outcomes.append((first, second, w1))
        elif verdict == "B":
            outcomes.append((second, first, w2))
    return elo(k, [o for o in outcomes if o[2] > 0])


def uncertain_candidates(judgements: list[dict], k: int, n: int, too_long) -> list[tuple[tuple[int, int], list[dict]]]:
    """The n candidates whose k judgements all parse, none too long, with the highest score variance (> 0), in
    (variance descending, prompt, candidate) order: ((prompt_id, candidate_id), its judgements by judge_id)."""
    by_cand: dict[tuple[int, int], list[dict]] = {}
    for r in judgements:
        by_cand.setdefault((r["prompt_id"], r["candidate_id"]), []).append(r)
    scored = []
    for key, rows in by_cand.items():
        rows = sorted(rows, key=lambda r: r["judge_id"])
        if len(rows) != k or any(r["excluded"] or r["score"] is None or too_long(r["judge_text"]) for r in rows):
            continue
        var = float(np.var([r["score"] for r in rows]))
        if var > 0:
            scored.append((-var, key, rows))
    scored.sort(key=lambda x: (x[0], x[1]))
    return [(key, rows) for _, key, rows in scored[:n]]


def build_judge_pairs(ctx: Context, reference_fn=None) -> dict:
    """The judge_pairs stage: meta-judgements (resumable, `judge_pairs/meta`) then the pairs with reference
    log-probs (`judge_pairs/pairs`)."""
    from .selfreward import judge_template, with_reference_logps

    cfg, sec, policy, backend = ctx.cfg, ctx.cfg.meta, ctx.policy(), ctx.backend()
    template = judge_template(ctx)
    k = cfg.judge.num_judgements
    tok = policy.tokenizer
    # A judgement that used all of judge.max_new_tokens was cut off: left out, as the paper filters over-long ones.
    too_long = lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) >= cfg.judge.max_new_tokens  # noqa: E731
    cands = {(c["prompt_id"], c["candidate_id"]): c for c in artifacts.read_dataset(ctx.path("candidates")).to_list()}
    chosen = uncertain_candidates(artifacts.read_dataset(ctx.path("judgements")).to_list(), k, sec.responses, too_long)
    order = list(itertools.permutations(range(k), 2))  # both orders of every two judgements
    seed = ctx.seed("meta_judge")

    def meta_judge(chunk, lo):
        requests = []
        for key, rows in chunk:
            c = cands[key]
            for i, j in order:
                requests.append(render_meta_prompt(template, c["prompt"], c["response"], rows[i]["judge_text"],
                                                   rows[j]["judge_text"]))
        # A request longer than the context loses the start of its rubric (left truncation), never the judgements.
        outs = backend.generate(policy, chat_token_ids(tok, requests), max_new_tokens=sec.max_new_tokens,
                                temperature=sec.temperature, top_p=sec.top_p, seed=seed + lo, truncate_prompts=True,
                                max_batch_rows=cfg.sample.max_batch_rows)
        texts = iter(o[0].text for o in outs)
        return [{"prompt_id": key[0], "candidate_id": key[1], "first": i, "second": j, "meta_text": (t := next(texts)),
                 "verdict": parse_winner(t)} for key, _ in chunk for i, j in order]

    meta_dir = ctx.path("judge_pairs") / "meta"
    map_rows(meta_dir, chosen, meta_judge, chunk=16, rows_per_item=len(order), desc=f"meta-judge (M{ctx.t})",
             unit="cand", features=META_FEATURES)
    meta = artifacts.read_dataset(meta_dir).to_list()
    w1, w2 = position_weights([m["verdict"] for m in meta])
    by_cand: dict[tuple[int, int], list] = {}
    for m in meta:
        by_cand.setdefault((m["prompt_id"], m["candidate_id"]), []).append((m["first"], m["second"], m["verdict"]))
    pairs, flat = [], 0
    for key, rows in chosen:
        r = candidate_elo(k, by_cand.get(key, []), w1, w2)
        hi, lo_ = int(np.argmax(r)), int(np.argmin(r))
        if r[hi] - r[lo_] < 1e-6 or rows[hi]["judge_text"] == rows[lo_]["judge_text"]:
            flat += 1
            continue
        c = cands[key]
        pairs.append({"prompt_id": key[0], "candidate_id": key[1],
                      "prompt": render_judge_prompt(template, c["prompt"], c["response"]),
                      "chosen": rows[hi]["judge_text"], "rejected": rows[lo_]["judge_text"],
                      "chosen_score": rows[hi]["score"], "rejected_score": rows[lo_]["score"],
                      "chosen_elo": float(r[hi]), "rejected_elo": float(r[lo_])})
    pairs = with_reference_logps(policy, pairs, cfg, reference_fn)[0]
    write_rows(ctx.path("judge_pairs") / "pairs", pairs)
    verdicts = Counter(m["verdict"] for m in meta)
    stats = {"stage": "judge_pairs", "iteration": ctx.t, "candidates": len(chosen), "comparisons": len(meta),
             "verdicts": {"A": verdicts["A"], "B": verdicts["B"], "unparsed": verdicts[None]},
             "w1": w1, "w2": w2, "judge_pairs": len(pairs), "no_preference": flat,
             # The paper's score bias: how often the preferred judgement is the one that gave the higher score.
             "chosen_scored_higher": sum(p["chosen_score"] > p["rejected_score"] for p in pairs),
             "chosen_scored_lower": sum(p["chosen_score"] < p["rejected_score"] for p in pairs)}
    artifacts.write_json_atomic(ctx.path("judge_pairs") / "stats.json", stats)
    return stats


def judge_pairs_for(ctx: Context) -> list[dict]:
    """The judge-preference pairs DPO adds to iteration t's actor pairs (none outside `meta.iterations`)."""
    sec = ctx.cfg.meta
    path = ctx.path("judge_pairs") / "pairs"
    if not sec.enabled or ctx.t not in sec.iterations or not artifacts.is_complete(path):
        return []
    keys = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")
    return [{k: p[k] for k in keys} for p in artifacts.read_dataset(path).to_list()]


JUDGE_PAIRS = Stage("judge_pairs", build_judge_pairs, reads=("M_t", "candidates", "judgements"),
                    writes=("judge_pairs",), section="meta", when=lambda cfg: cfg.meta.enabled,
                    help="Meta-Rewarding: M_t meta-judges its judgements (both orders, Elo) -> judge-preference pairs")
