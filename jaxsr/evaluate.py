"""Evaluation metrics: reward modelling (paper Table 4), head-to-head (Fig. 3), world score, iteration summary.

Pure numpy functions on plain Python lists, so they run on judge outputs read back from disk. Conventions
(ties, parse failures, undefined cases) are listed per function and in docs/evaluation.md. A metric that is
undefined on its input (no eligible pair, prompt or response) is None, never NaN, so reports stay valid JSON.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

TOP_SCORE = 5.0


# --- reward modelling (Table 4) ------------------------------------------------------------------------------

def scores_from_ranks(ranks: Sequence[int]) -> list[float]:
    """Human ranks (0 = best, as in Open Assistant) as reference scores where higher is better."""
    return [-float(r) for r in ranks]


def _valid(x) -> bool:
    return x is not None and not math.isnan(float(x))  # float(): numpy float32 NaN is not a Python float


def _check(model_scores, ref_scores) -> None:
    if len(model_scores) != len(ref_scores):
        raise ValueError(f"model_scores has {len(model_scores)} prompts, ref_scores has {len(ref_scores)}")
    for i, (m, r) in enumerate(zip(model_scores, ref_scores)):
        if len(m) != len(r):
            raise ValueError(f"prompt {i}: {len(m)} model scores for {len(r)} reference scores")
        if not all(_valid(x) for x in r):
            raise ValueError(f"prompt {i}: reference scores must all be numbers, got {list(r)}")


def _signs(x: Sequence[float]) -> np.ndarray:
    """sign(x[i] - x[j]) for every pair i < j."""
    a = np.asarray(x, dtype=np.float64)
    i, j = np.triu_indices(len(a), k=1)
    return np.sign(a[i] - a[j])


def _model_signs(m: Sequence) -> np.ndarray:
    """Pairwise signs of model scores, with NaN for any pair that has a parse failure."""
    return _signs([float(x) if _valid(x) else math.nan for x in m])


def _mean(xs) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def pairwise_accuracy(model_scores, ref_scores) -> float | None:
    """Share of response pairs with different reference scores that the model orders the same way.

    A model tie or a parse failure (None) on such a pair counts as a disagreement, so a judge that always
    answers 4 scores 0, not 50%. Pairs tied in the reference are not counted. None if there is no pair.
    """
    _check(model_scores, ref_scores)
    agree = total = 0
    for m, r in zip(model_scores, ref_scores):
        rs, ms = _signs(r), _model_signs(m)
        keep = rs != 0
        total += int(keep.sum())
        agree += int((ms[keep] == rs[keep]).sum())  # NaN == ±1 is False: failures disagree
    return agree / total if total else None


def _is_top_score(x, top_score: float) -> bool:
    # Half-up rounding to the top score: the mean of 3 judgements (5, 5, 4) = 4.67 counts as a 5.
    return _valid(x) and math.floor(float(x) + 0.5) >= top_score


def five_best(model_scores, ref_scores, *, top_score: float = TOP_SCORE) -> float | None:
    """Of the responses the model scores 5, the share that are a reference-top response of their prompt.

    "Scores 5" means the score rounds half-up to 5 (>= 4.5). Every response tied for the prompt's highest
    reference score is reference-top. None if the model gave no 5.
    """
    _check(model_scores, ref_scores)
    hits = fives = 0
    for m, r in zip(model_scores, ref_scores):
        best = max(r) if len(r) else None
        for x, y in zip(m, r):
            if _is_top_score(x, top_score):
                fives += 1
                hits += int(y == best)
    return hits / fives if fives else None


def exact_match(model_scores, ref_scores) -> float | None:
    """Share of prompts (with >= 2 responses) whose model ordering, ties included, equals the reference one.

    Every pair must agree in sign: a model tie matches only a reference tie; any parse failure is a mismatch.
    """
    _check(model_scores, ref_scores)
    hits = [bool(np.all(_model_signs(m) == _signs(r))) for m, r in zip(model_scores, ref_scores) if len(r) >= 2]
    return _mean(hits)


def _usable(m, r) -> tuple[np.ndarray, np.ndarray] | None:
    """Responses with a parsed model score; None when fewer than 2 remain or either side is constant."""
    keep = [k for k, x in enumerate(m) if _valid(x)]
    x = np.asarray([float(m[k]) for k in keep], dtype=np.float64)
    y = np.asarray([float(r[k]) for k in keep], dtype=np.float64)
    if len(keep) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return x, y


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (as scipy.stats.rankdata 'average')."""
    return np.array([(a < v).sum() + ((a == v).sum() + 1) / 2 for v in a], dtype=np.float64)


def _spearman_one(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1])


def _kendall_one(x: np.ndarray, y: np.ndarray) -> float:
    # tau-b: sum of concordance signs over sqrt(pairs untied in x * pairs untied in y).
    sx, sy = _signs(x), _signs(y)
    return float((sx * sy).sum() / math.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy)))


def _per_prompt(fn, model_scores, ref_scores) -> float | None:
    _check(model_scores, ref_scores)
    vals = [fn(*u) for m, r in zip(model_scores, ref_scores) if (u := _usable(m, r)) is not None]
    return _mean(vals)


def spearman(model_scores, ref_scores) -> float | None:
    """Spearman rho (average ranks for ties) per prompt, averaged over prompts.

    Responses with a parse failure are left out of their prompt; a prompt with < 2 scored responses, or
    constant model or reference scores (rho undefined), is skipped. None if every prompt is skipped.
    """
    return _per_prompt(_spearman_one, model_scores, ref_scores)


def kendall_tau(model_scores, ref_scores) -> float | None:
    """Kendall tau-b per prompt, averaged over prompts; failures and skipped prompts as in `spearman`."""
    return _per_prompt(_kendall_one, model_scores, ref_scores)


def reward_model_report(model_scores, ref_scores, *, top_score: float = TOP_SCORE) -> dict:
    """All Table 4 metrics plus the counts behind them."""
    _check(model_scores, ref_scores)
    flat = [x for m in model_scores for x in m]
    failures = sum(not _valid(x) for x in flat)
    return {
        "pairwise_accuracy": pairwise_accuracy(model_scores, ref_scores),
        "five_best": five_best(model_scores, ref_scores, top_score=top_score),
        "exact_match": exact_match(model_scores, ref_scores),
        "spearman": spearman(model_scores, ref_scores),
        "kendall_tau": kendall_tau(model_scores, ref_scores),
        "prompts": len(model_scores),
        "responses": len(flat),
        "pairs": int(sum(np.count_nonzero(_signs(r)) for r in ref_scores)),
        "parse_failures": failures,
        "parse_failure_rate": failures / len(flat) if flat else None,
        "scored_top": sum(_is_top_score(x, top_score) for x in flat),
        "correlation_prompts": sum(_usable(m, r) is not None for m, r in zip(model_scores, ref_scores)),
    }


# --- head-to-head (Fig. 3) -----------------------------------------------------------------------------------

OUTPUT_A_SLOT, OUTPUT_B_SLOT, PAIRWISE_INSTRUCTION_SLOT = "<OUTPUT_A_HERE>", "<OUTPUT_B_HERE>", "<INSTRUCTION_HERE>"

# In the spirit of AlpacaEval's pairwise prompt (forced choice, no tie option: ties come from judging both
# orders), with MT-Bench's "[[A]]" / "[[B]]" verdict marks, which are easy to parse after a justification.
PAIRWISE_TEMPLATE = """\
Select the output, A or B, that better follows the instruction below. Judge helpfulness, accuracy, \
relevance and level of detail; do not let the order of the outputs or their length decide. Explain your \
choice in at most three sentences, then end with exactly "[[A]]" if output A is better or "[[B]]" if \
output B is better.

## Instruction:
<INSTRUCTION_HERE>

## Output A:
<OUTPUT_A_HERE>

## Output B:
<OUTPUT_B_HERE>

## Which output is better, A or B?"""

_SLOT_RE = re.compile("|".join(map(re.escape, (PAIRWISE_INSTRUCTION_SLOT, OUTPUT_A_SLOT, OUTPUT_B_SLOT))))
_VERDICT_RE = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_ALPACA_RE = re.compile(r"^\W*output\s*\(?\s*([ab])\s*\)?\W*$", re.IGNORECASE)


def render_pairwise_prompt(instruction: str, output_a: str, output_b: str, template: str = PAIRWISE_TEMPLATE) -> str:
    """Fill the three slots in one pass, so slot-like text inside an output is left alone."""
    for slot in (PAIRWISE_INSTRUCTION_SLOT, OUTPUT_A_SLOT, OUTPUT_B_SLOT):
        if slot not in template:
            raise ValueError(f"pairwise template has no {slot} slot")
    values = {PAIRWISE_INSTRUCTION_SLOT: instruction, OUTPUT_A_SLOT: output_a, OUTPUT_B_SLOT: output_b}
    return _SLOT_RE.sub(lambda m: values[m.group(0)], template)


def load_pairwise_template(path_or_name: str) -> str:
    """`judge.pairwise_template`: "default" (PAIRWISE_TEMPLATE) or a template file with the three slots."""
    if path_or_name == "default":
        return PAIRWISE_TEMPLATE
    path = Path(path_or_name)
    if not path.is_file():
        raise FileNotFoundError(f"pairwise judge template file {str(path)!r} does not exist; pass 'default' for "
                                f"jaxsr's template or the path of a text file with {PAIRWISE_INSTRUCTION_SLOT}, "
                                f"{OUTPUT_A_SLOT} and {OUTPUT_B_SLOT}")
    text = path.read_text(encoding="utf-8")
    template = text[:-1] if text.endswith("\n") else text  # a file's final newline is not part of the prompt
    missing = [s for s in (PAIRWISE_INSTRUCTION_SLOT, OUTPUT_A_SLOT, OUTPUT_B_SLOT) if s not in template]
    if missing:
        raise ValueError(f"pairwise judge template {str(path)!r} has no {', '.join(missing)} slot")
    return template


def parse_pairwise_verdict(text) -> str | None:
    """"A", "B", "tie" or None for a pairwise judgement. Never raises.

    The LAST "[[A]]" / "[[B]]" / "[[C]]" / "[[tie]]" mark wins (C = tie, as in MT-Bench), since a
    justification may quote a mark earlier. Without a mark, a reply that is only AlpacaEval's
    "Output (a)" / "Output (b)" is read as A / B. Anything else is None.
    """
    if not isinstance(text, str):
        return None
    marks = _VERDICT_RE.findall(text)
    if marks:
        v = marks[-1].upper()
        return "tie" if v in ("C", "TIE") else v
    m = _ALPACA_RE.match(text.strip())
    return m.group(1).upper() if m else None


def head_to_head(verdicts_ab, verdicts_ba) -> dict:
    """Win/tie/loss rates of model X against Y, each prompt judged with X as A (`verdicts_ab`) and as B.

    X wins when the two orders agree that X is better ("A" then "B"), loses when they agree Y is better,
    and ties otherwise: both "tie", inconsistent verdicts (position bias) or any None (unparsed). The win rate
    is (wins + ties / 2) / n, as the paper reports it, with its 95% Wilson interval (`wilson_interval`).
    """
    if len(verdicts_ab) != len(verdicts_ba):
        raise ValueError(f"{len(verdicts_ab)} verdicts with X as A but {len(verdicts_ba)} with X as B")
    allowed = {"A", "B", "tie", None}
    win = loss = inconsistent = unparsed = 0
    for i, (ab, ba) in enumerate(zip(verdicts_ab, verdicts_ba)):
        if ab not in allowed or ba not in allowed:
            raise ValueError(f"prompt {i}: verdicts must be 'A', 'B', 'tie' or None, got {ab!r}, {ba!r}")
        if ab is None or ba is None:
            unparsed += 1
        elif (ab, ba) == ("A", "B"):
            win += 1
        elif (ab, ba) == ("B", "A"):
            loss += 1
        elif (ab, ba) != ("tie", "tie"):
            inconsistent += 1
    n = len(verdicts_ab)
    tie = n - win - loss
    rate = (win + tie / 2) / n if n else None
    return {"win": win / n if n else None, "tie": tie / n if n else None, "loss": loss / n if n else None,
            "wins": win, "ties": tie, "losses": loss, "n": n, "inconsistent": inconsistent, "unparsed": unparsed,
            "win_rate": rate, "win_rate_ci95": list(wilson_interval(rate, n)) if n else None}


Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


def wilson_interval(p_hat: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a proportion p_hat observed on n items; z = 1.96 gives 95%.

    The bounds solve (p_hat - p)^2 = z^2 p (1 - p) / n for p:
        (p_hat + z^2/2n  -/+  z sqrt(p_hat (1 - p_hat) / n + z^2 / 4n^2)) / (1 + z^2/n).
    Used for the head-to-head win rate (wins + ties/2) / n, whose per-prompt outcomes are 1, 1/2 or 0: any
    outcome in [0, 1] with mean p has variance <= p (1 - p), so the interval is conservative there.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 items, got n={n}")
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"wilson_interval: p_hat={p_hat} must lie in [0, 1]")
    z2n = z * z / n
    center = (p_hat + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p_hat * (1 - p_hat) / n + z2n / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)


# --- instruction following and iteration logs ----------------------------------------------------------------

def world_metrics(scores: Sequence[float], *, top_score: float = TOP_SCORE) -> dict:
    """Mean verifiable score and the share of perfect (== 5) responses."""
    if any(not _valid(s) for s in scores):
        raise ValueError("world scores must all be numbers (a verifier always returns one); got None/NaN")
    a = np.asarray(scores, dtype=np.float64)
    return {"world_score": float(a.mean()) if a.size else None,
            "world_perfect": float((a == top_score).mean()) if a.size else None, "n": int(a.size)}


def iteration_summary(stats_by_stage: dict) -> dict:
    """One flat row per iteration from the stage `stats.json` dicts; a missing stage gives None fields."""
    cand = stats_by_stage.get("candidates") or {}
    judg = stats_by_stage.get("judgements") or {}
    pairs = stats_by_stage.get("pairs") or {}
    hist = {int(k): int(v) for k, v in (judg.get("score_histogram") or {}).items()}
    n_scored = sum(hist.values())
    chosen, rejected = pairs.get("mean_chosen_tokens"), pairs.get("mean_rejected_tokens")
    return {
        "candidates": cand.get("candidates"),
        "mean_candidate_tokens": cand.get("mean_tokens"),
        "parse_failure_rate": judg.get("parse_failure_rate"),
        "score_histogram": {str(k): hist[k] for k in sorted(hist)} if hist else None,
        # Watched for judge saturation at 5 (PAPER.md §7.4).
        "mean_score": sum(k * v for k, v in hist.items()) / n_scored if n_scored else None,
        "share_score_5": hist.get(5, 0) / n_scored if n_scored else None,
        "pairs": pairs.get("pairs"),
        "tie_rate": pairs.get("tie_rate"),
        # With an environment that knows the prompts' ground truth: how often the chosen answer is truly better / worse.
        "truly_better": pairs.get("truly_better"),
        "truly_worse": pairs.get("truly_worse"),
        "mean_chosen_tokens": chosen,
        "mean_rejected_tokens": rejected,
        # Length explosion shows up first as chosen responses growing longer than rejected ones.
        "chosen_minus_rejected_tokens": chosen - rejected if chosen is not None and rejected is not None else None,
    }
