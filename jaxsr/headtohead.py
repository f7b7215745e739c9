"""Head-to-head evaluation (paper Fig. 3): greedy answers of two models to the same instructions, judged
pairwise by a third (or one of them) in both orders; disagreeing orders count as a tie (docs/evaluation.md).

The steps are separate functions so a caller can hold one model on the devices at a time: `greedy_answers` for
A, then for B, then `judge_both_orders` with the judge, then `tally` (pure, on the judge's texts).
`compare` runs all three on policies already loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .backends import Backend, builtin
from .chat import chat_token_ids
from .evaluate import (PAIRWISE_TEMPLATE, head_to_head, load_pairwise_template, parse_pairwise_verdict,
                       render_pairwise_prompt)
from .policy import Policy
from .sample import DEFAULT_MAX_BATCH_ROWS


def greedy_answers(policy: Policy, instructions: Sequence[str], *, max_new_tokens: int,
                   max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, backend: Backend | None = None) -> list[str]:
    """The policy's greedy (temperature 0) answer to each instruction, each as one chat-templated user turn;
    `backend`: the sampler (default: the built-in one)."""
    backend = builtin() if backend is None else backend
    outs = backend.generate(policy, chat_token_ids(policy.tokenizer, list(instructions)),
                            max_new_tokens=max_new_tokens, temperature=0.0, max_batch_rows=max_batch_rows)
    return [o[0].text for o in outs]


def pairwise_request_ids(tokenizer, context: int, instruction: str, output_a: str, output_b: str, *,
                         max_new_tokens: int, template: str = PAIRWISE_TEMPLATE) -> tuple[list[int], bool]:
    """The chat-templated pairwise request and whether the outputs were cut to fit `context - max_new_tokens`.

    Both outputs are cut to the same token budget (never the instruction), so swapping A and B shows the judge
    the same two texts.
    """
    limit = context - max_new_tokens

    def render(a: str, b: str) -> list[int]:
        return chat_token_ids(tokenizer, [render_pairwise_prompt(instruction, a, b, template)])[0]

    ids = render(output_a, output_b)
    if len(ids) <= limit:
        return ids, False
    room = limit - len(render("", ""))
    if room <= 0:
        raise ValueError(f"pairwise judge request for instruction {instruction[:60]!r} does not fit the judge's "
                         f"context ({limit - room} tokens without the outputs, limit {limit} = context {context} - "
                         f"max_new_tokens {max_new_tokens}); use a judge with a longer context or fewer new tokens")
    a_ids, b_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (output_a, output_b))
    short = min(len(a_ids), len(b_ids))
    cap = room - short if short <= room // 2 else room // 2  # the largest equal cap that fits both
    while cap > 0:  # token boundaries can shift after decoding: shrink until the rendered request fits
        cut_a, cut_b = (tokenizer.decode(t[:cap], skip_special_tokens=True) for t in (a_ids, b_ids))
        ids = render(cut_a, cut_b)
        if len(ids) <= limit:
            return ids, True
        cap -= max(1, len(ids) - limit)
    return render("", ""), True


def judge_both_orders(judge: Policy, instructions: Sequence[str], answers_a: Sequence[str],
                      answers_b: Sequence[str], *, max_new_tokens: int, template: str = PAIRWISE_TEMPLATE,
                      max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, backend: Backend | None = None
                      ) -> tuple[list[str], list[str], int]:
    """The judge's greedy replies with A's answer as output A (`texts_ab`) and as output B (`texts_ba`), and how
    many requests had their outputs cut to fit the judge's context; `backend`: the sampler (default: built-in)."""
    backend = builtin() if backend is None else backend
    if not len(instructions) == len(answers_a) == len(answers_b):
        raise ValueError(f"{len(instructions)} instructions, {len(answers_a)} answers of A, {len(answers_b)} of B")
    ctx = judge.config.max_position_embeddings
    reqs = [pairwise_request_ids(judge.tokenizer, ctx, i, x, y, max_new_tokens=max_new_tokens, template=template)
            for first, second in ((answers_a, answers_b), (answers_b, answers_a))
            for i, x, y in zip(instructions, first, second)]
    outs = backend.generate(judge, [ids for ids, _ in reqs], max_new_tokens=max_new_tokens, temperature=0.0,
                            max_batch_rows=max_batch_rows)
    texts, n = [o[0].text for o in outs], len(instructions)
    return texts[:n], texts[n:], sum(cut for _, cut in reqs)


def tally(texts_ab: Sequence[str], texts_ba: Sequence[str]) -> dict:
    """Win / tie / loss of A against B from the judge's replies in both orders (`evaluate.head_to_head`: a tie
    when the orders disagree or a reply has no verdict, counted apart as `inconsistent` / `unparsed`), the win
    rate (wins + ties/2) / n and its 95% Wilson interval."""
    return head_to_head([parse_pairwise_verdict(t) for t in texts_ab], [parse_pairwise_verdict(t) for t in texts_ba])


def result(names: tuple[str, str], judge_name: str, instructions: Sequence[str], answers_a: Sequence[str],
           answers_b: Sequence[str], texts_ab: Sequence[str], texts_ba: Sequence[str], truncated: int = 0) -> dict:
    """The head-to-head record written to eval/h2h_<A>_vs_<B>.json: the tally and every prompt's evidence."""
    rows = [{"instruction": i, "output_a": a, "output_b": b, "judge_ab": jab, "judge_ba": jba,
             "verdict_ab": parse_pairwise_verdict(jab), "verdict_ba": parse_pairwise_verdict(jba)}
            for i, a, b, jab, jba in zip(instructions, answers_a, answers_b, texts_ab, texts_ba)]
    return {"a": names[0], "b": names[1], "judge": judge_name, **tally(texts_ab, texts_ba),
            "ci_method": "wilson", "judge_requests_truncated": truncated, "prompts": rows}


def compare(policy_a: Policy, policy_b: Policy, instructions: Sequence[str], *, max_new_tokens: int,
            judge: Policy | None = None, judge_max_new_tokens: int, names: tuple[str, str] = ("A", "B"),
            judge_name: str | None = None, backend: Backend | None = None) -> dict:
    """A against B on `instructions`; the judge is A itself unless given. Returns `result(...)`."""
    backend = builtin() if backend is None else backend
    answers_a = greedy_answers(policy_a, instructions, max_new_tokens=max_new_tokens, backend=backend)
    answers_b = greedy_answers(policy_b, instructions, max_new_tokens=max_new_tokens, backend=backend)
    texts_ab, texts_ba, cut = judge_both_orders(judge or policy_a, instructions, answers_a, answers_b,
                                                max_new_tokens=judge_max_new_tokens, backend=backend)
    return result(names, judge_name or (names[0] if judge is None else "judge"), instructions, answers_a, answers_b,
                  texts_ab, texts_ba, cut)


def alpaca_eval_records(instructions: Sequence[str], outputs: Sequence[str], generator: str) -> list[dict]:
    """A model's answers in AlpacaEval's model-outputs format (a JSON list of these records)."""
    return [{"instruction": i, "output": o, "generator": generator} for i, o in zip(instructions, outputs)]


# --- in a run directory ----------------------------------------------------------------------------------------

def resolve_model(ctx, spec) -> tuple[str, Path]:
    """(name, checkpoint dir) of a model named on the command line: an iteration number t (run_dir/models/M{t}),
    a name under run_dir/models ("M2", "baseline"), or a model directory (named by its folder)."""
    spec = str(spec)
    models = ctx.paths.root / "models"
    candidates = [("M" + spec, ctx.paths.model(int(spec)))] if spec.isdigit() else []
    if Path(spec).name == spec:  # a bare name; a path is named by its folder
        candidates.append((spec, models / spec))
    candidates.append((Path(spec).resolve().name, Path(spec)))
    for name, path in candidates:
        if path.is_dir():
            return name, path
    tried = ", ".join(str(p) for _, p in candidates)
    raise FileNotFoundError(f"model {spec!r}: no checkpoint directory at {tried}; give an iteration number of the "
                            f"run, a name under {models}, or a model directory")


def _policy(ctx, path: Path) -> Policy:
    """A model of the run (M_t, baseline) through the context's cache (the stage before may hold it already), any
    other through the same loader (the run's compute dtype and chat template; it only samples)."""
    from .chat import load_chat_policy

    path = Path(path)
    if path.resolve().parent == (ctx.paths.root / "models").resolve():
        name = path.name
        return ctx.policy(int(name[1:]) if name[:1] == "M" and name[1:].isdigit() else name)
    ctx.release_models()  # one model on the devices at a time
    return load_chat_policy(path, ctx.cfg.model, ctx.mesh, sample_only=True, decode_tensor=ctx.cfg.sample.decode_tensor)


def evaluate_pair(ctx, a: tuple[str, Path], b: tuple[str, Path], instructions: Sequence[str], *,
                  judge: tuple[str, Path] | None = None) -> dict:
    """A against B in a run: answers at `loop.eval_max_new_tokens`, the judge (A unless given) at
    `judge.max_new_tokens`. Writes eval/h2h_<A>_vs_<B>.json and both models' answers in AlpacaEval's format
    (eval/alpaca_eval/<model>.json). Loads one model at a time."""
    from . import artifacts, distributed

    if not instructions:
        raise ValueError(f"head-to-head {a[0]} vs {b[0]}: no instructions to compare on")
    cfg, judge = ctx.cfg, judge or a
    answers = {}
    for name, path in (a, b):
        answers[name] = greedy_answers(_policy(ctx, path), instructions, max_new_tokens=cfg.loop.eval_max_new_tokens,
                                       max_batch_rows=cfg.sample.max_batch_rows, backend=ctx.backend())
        if distributed.is_primary():
            artifacts.write_json_atomic(ctx.paths.root / "eval" / "alpaca_eval" / f"{name}.json",
                                        alpaca_eval_records(instructions, answers[name], name))
    texts_ab, texts_ba, cut = judge_both_orders(_policy(ctx, judge[1]), instructions, answers[a[0]], answers[b[0]],
                                                max_new_tokens=cfg.judge.max_new_tokens,
                                                template=load_pairwise_template(cfg.judge.pairwise_template),
                                                max_batch_rows=cfg.sample.max_batch_rows, backend=ctx.backend())
    res = result((a[0], b[0]), judge[0], instructions, answers[a[0]], answers[b[0]], texts_ab, texts_ba, cut)
    if distributed.is_primary():
        artifacts.write_json_atomic(ctx.paths.h2h(a[0], b[0]), res)
    return res


def summary(res: dict) -> str:
    """One line: `M2 vs M1 (judge M2, n=8): win 37.5% tie 50.0% loss 12.5%, win rate 62.5% [95% CI 35.6-83.5%]`."""
    lo, hi = res["win_rate_ci95"] or (None, None)
    ci = f" [95% CI {lo:.1%}-{hi:.1%}]" if lo is not None else ""
    rate = "–" if res["win_rate"] is None else f"{res['win_rate']:.1%}"
    rates = " ".join(f"{k} {'–' if res[k] is None else format(res[k], '.1%')}" for k in ("win", "tie", "loss"))
    return (f"{res['a']} vs {res['b']} (judge {res['judge']}, n={res['n']}): {rates}, win rate {rate}{ci}; "
            f"inconsistent {res['inconsistent']}, unparsed {res['unparsed']}")
