"""The stage graph of `jaxsr run` and the stages that are not self-rewarding data (jaxsr.selfreward has those).

    bootstrap (iteration 0):  data ─► sft (M0 → M1) ─► eval (M1)
      with data.build_eft:    data ─► sft_baseline (M0 → baseline) ─► eft_judge ─► eft_build ─► baseline_eval
                                   ─► sft (IFT + EFT: M0 → M1) ─► eval (M1)          (jaxsr.eft)
    iteration t = 1 .. T-1:   prompts ─► candidates ─► judgements ─► pairs [─► judge_pairs (meta.enabled)]
                              ─► dpo (M_t → M_{t+1}) ─► eval (M_{t+1}) [─► h2h (M_{t+1} vs M_t, with loop.head_to_head)]
    final:                    report

`GRAPH` is the one list the loop, the per-stage commands, the manifest and the report read; to add a stage,
define a `Stage` and insert it here (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np

from . import artifacts, distributed, evaluate, judging, selfreward
from .eft import EFT_BUILD, EFT_JUDGE
from .eft_answers import EFT_ANSWERS, eft_rows
from .metareward import JUDGE_PAIRS, judge_pairs_for
from .envs import SEED_SPLITS
from .chat import load_chat_policy, load_chat_tokenizer, set_chat_template
from .policy import Policy, random_policy
from .stages import Context, Graph, Stage, stage_seed, write_rows

log = logging.getLogger(__name__)


# --- data and SFT ------------------------------------------------------------------------------------------

def _data(ctx: Context) -> dict:
    """The environment's seed splits under run_dir/data, each one committed dataset."""
    m0_tokenizer(ctx)  # a tokenizer that cannot render chats fails here, before any download or compute
    splits = ctx.env.seed_data(ctx.cfg.seed)
    unknown = sorted(set(splits) - set(SEED_SPLITS))
    missing = [s for s in ("ift", "seed_prompts") if s not in splits]
    if unknown or missing:
        raise ValueError(f"environment {ctx.env.name!r}: seed_data gave splits {sorted(splits)}; "
                         f"required: ift, seed_prompts; allowed: {', '.join(SEED_SPLITS)}")
    if ctx.cfg.data.build_eft and ("eft_source" not in splits or "eft" in splits):
        raise ValueError(f"data.build_eft: environment {ctx.env.name!r} gave splits {sorted(splits)}; building EFT "
                         f"needs its ranked responses (eft_source) and no EFT of its own (eft)")
    for name, rows in splits.items():
        write_rows(ctx.paths.data(name), rows)
    return {"splits": sorted(splits)}


def m0_tokenizer(ctx: Context):
    """M0's tokenizer, without its weights, with `model.chat_template` applied and checked (jaxsr.chat)."""
    m = ctx.cfg.model
    if m.path:
        return load_chat_tokenizer(m.path, m)
    if m.tokenizer == "env":
        tok, name = ctx.env.tokenizer(), f"environment {ctx.env.name!r}'s tokenizer"
    else:
        from transformers import AutoTokenizer

        tok, name = AutoTokenizer.from_pretrained(m.tokenizer), m.tokenizer
    return set_chat_template(tok, m.chat_template, model=name)


def initial_policy(ctx: Context) -> Policy:
    """M0: `model.path`, or a random decoder of `model.architecture` with the configured tokenizer."""
    cfg = ctx.cfg
    if cfg.model.path:
        return load_chat_policy(cfg.model.path, cfg.model, ctx.mesh, decode_tensor=cfg.sample.decode_tensor)
    from .model.config import ModelConfig

    tok = m0_tokenizer(ctx)
    a = cfg.model.architecture
    mcfg = ModelConfig(model_type=a.model_type, vocab_size=len(tok), hidden_size=a.hidden_size,
                       intermediate_size=a.intermediate_size, num_layers=a.num_layers, num_heads=a.num_heads,
                       num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                       max_position_embeddings=a.max_position_embeddings, rope_theta=a.rope_theta,
                       tie_word_embeddings=a.tie_word_embeddings, bos_token_id=tok.bos_token_id,
                       eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    mesh = ctx.mesh if ctx.mesh is not None else cfg.mesh.build(mcfg.hidden_size)
    policy = random_policy(mcfg, seed=cfg.model.init_seed, **cfg.model.dtypes, mesh=mesh, tokenizer=tok)
    return dataclasses.replace(policy, decode_tensor=cfg.sample.decode_tensor, attention=cfg.model.attention)


def promote(src: Path, dst: Path, *, copy: bool = False) -> None:
    """The iteration checkpoint M_t: the training stage's final params-only checkpoint, moved (or copied) into
    models/."""
    if distributed.is_primary():
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            if copy:
                shutil.copytree(src, dst.with_name(dst.name + ".tmp"), dirs_exist_ok=True)
                dst.with_name(dst.name + ".tmp").rename(dst)
            else:
                src.rename(dst)
    distributed.barrier(f"promote {dst}")


def sft_from_m0(ctx: Context, splits: tuple[str, ...], work: str, model: str, extra: list[dict] = ()) -> None:
    """SFT of M0 on the seed splits that exist among `splits` and the `extra` {prompt, response} rows
    (run_dir/train/<work>), promoted to the artifact `model`."""
    from .train import train_sft

    rows = []
    for split in splits:
        ds = ctx.split(split)
        if ds is not None:
            rows += ds.select_columns(["prompt", "response"]).to_list()
    rows += list(extra)
    train_sft(initial_policy(ctx), rows, ctx.cfg.sft, ctx.paths.train(work), remat=ctx.cfg.model.remat)
    promote(ctx.paths.train(work) / "final", ctx.path(model))


def _dpo(ctx: Context) -> dict | None:
    from .train import train_dpo

    pairs = artifacts.read_dataset(ctx.path("pairs")).to_list()
    if not pairs:
        raise RuntimeError(f"iteration {ctx.t}: no preference pairs (see {ctx.path('pairs') / 'stats.json'} and "
                           f"{ctx.path('judgements') / 'stats.json'}); cannot train M{ctx.t + 1}")
    work, sec = ctx.paths.train(f"dpo{ctx.t}"), ctx.cfg.dpo
    if not sec.eval_every:
        judge_pairs = judge_pairs_for(ctx)
        ctx.policy().release_decode()  # the sampler's copy of M_t's weights: training needs the memory
        ctx.backend().release()  # and an external engine's
        train_dpo(ctx.policy(), pairs + judge_pairs, sec, work, remat=ctx.cfg.model.remat)
        promote(work / "final", ctx.path("M_next"))
        return {"train_pairs": len(pairs) + len(judge_pairs), "judge_pairs": len(judge_pairs)}
    return _dpo_with_selection(ctx, pairs, work)


def _dpo_with_selection(ctx: Context, pairs: list[dict], work: Path) -> dict:
    """DPO with checkpoint selection (jaxsr.selection): M_{t+1} is the selected checkpoint, M_t when none won."""
    from .selection import Selector, held_out
    from .train import train_dpo

    cfg, sec = ctx.cfg, ctx.cfg.dpo
    pairs, prompts = held_out(pairs, sec.selection_prompts, ctx.seed("selection"))
    judge_pairs = judge_pairs_for(ctx)  # added after the hold-out: validation prompts are never judge requests
    pairs += judge_pairs
    base = ctx.policy()
    judge = load_chat_policy(sec.selection_judge, cfg.model, ctx.mesh, sample_only=True,
                             decode_tensor=cfg.sample.decode_tensor) if sec.selection_judge else base
    sel = Selector(base, prompts, work, judge=judge, max_new_tokens=cfg.loop.eval_max_new_tokens,
                   judge_max_new_tokens=cfg.judge.max_new_tokens, max_batch_rows=cfg.sample.max_batch_rows,
                   template=evaluate.load_pairwise_template(cfg.judge.pairwise_template), backend=ctx.backend())
    base.release_decode()  # made again only if the selection judge is M_t
    ctx.backend().release()  # an external engine gets each checkpoint when the Selector samples from it
    train_dpo(base, pairs, sec, work, remat=cfg.model.remat, on_checkpoint=sel, hook_every=sec.eval_every)
    src = sel.selected_dir()
    promote(src or ctx.path("M_t"), ctx.path("M_next"), copy=src is None)
    return {"selection": sel.stats() | {"train_pairs": len(pairs), "judge_pairs": len(judge_pairs)}}


# --- evaluation and report ---------------------------------------------------------------------------------

def evaluate_policy(policy: Policy, ctx: Context, t: int) -> dict:
    """M_t on the environment's held-out instructions (greedy answers, its grader) and as a judge of the
    reference-ranked candidates of rm_eval."""
    from .chat import chat_token_ids
    from .judge import aggregate_scores

    cfg, out, backend = ctx.cfg, {"iteration": t}, ctx.backend()
    eval_rows = ctx.split("eval")
    if eval_rows is not None:
        rows = eval_rows.to_list()
        ids = chat_token_ids(policy.tokenizer, [r["instruction"] for r in rows])
        comps = backend.generate(policy, ids, max_new_tokens=cfg.loop.eval_max_new_tokens, temperature=0.0,
                                 max_batch_rows=cfg.sample.max_batch_rows)
        scores = [ctx.env.grade(r, c[0].text) for r, c in zip(rows, comps)]
        out |= ctx.env.eval_metrics(scores)
        out["eval_mean_tokens"] = float(np.mean([len(c[0].token_ids) for c in comps]))
        out["samples"] = [{"instruction": r["instruction"], "response": c[0].text, "score": s}
                          for r, c, s in list(zip(rows, comps, scores))[:5]]
    rm_rows = ctx.split("rm_eval")
    if rm_rows is not None:
        rows = rm_rows.to_list()
        cands = [r["candidates"] if "candidates" in r else r["responses"] for r in rows]
        template = selfreward.judge_template(ctx)
        reqs, owners = [], []
        for i, r in enumerate(rows):
            for j, cand in enumerate(cands[i]):
                reqs.append(judging.judge_request_ids(policy, template, r.get("instruction") or r["prompt"], cand,
                                                         cfg.judge.max_new_tokens)[0])
                owners.append((i, j))
        verdicts = judging.judge(policy, reqs, cfg.judge, seed=stage_seed(cfg.seed, t, "eval"),
                                    max_batch_rows=cfg.sample.max_batch_rows, backend=backend)
        model_scores = [[None] * len(c) for c in cands]
        failures = total = 0
        for (i, j), v in zip(owners, verdicts):
            parsed = [score for _, score, _ in v]
            failures, total = failures + sum(p is None for p in parsed), total + len(parsed)
            model_scores[i][j] = aggregate_scores(parsed)
        ref = [r["scores"] if "scores" in r else evaluate.scores_from_ranks(r["ranks"]) for r in rows]
        rm = evaluate.reward_model_report(model_scores, ref)
        out |= {"judge_pairwise_accuracy": rm.get("pairwise_accuracy"), "judge_five_best": rm.get("five_best"),
                "judge_exact_match": rm.get("exact_match"), "judge_spearman": rm.get("spearman"),
                "judge_kendall_tau": rm.get("kendall_tau"), "judge_eval_parse_failure_rate": failures / max(1, total)}
    return out


def _eval(ctx: Context) -> None:
    artifacts.write_json_atomic(ctx.path("eval"), evaluate_policy(ctx.policy(ctx.t + 1), ctx, ctx.t + 1))


def _baseline_eval(ctx: Context) -> None:
    # Iteration 0 in the figures (its judge stream is eval's at t = 0, which no M_t evaluation uses).
    artifacts.write_json_atomic(ctx.path("baseline_eval"), evaluate_policy(ctx.policy("baseline"), ctx, 0))


def _eval_row(ctx: Context, ev: dict) -> dict:
    row = {key: ev.get(key) for key, _, _ in ctx.env.report_columns}
    return row | {k: ev.get(k) for k in ("judge_pairwise_accuracy", "judge_five_best", "judge_exact_match",
                                         "judge_spearman", "judge_kendall_tau", "eval_mean_tokens")}


def h2h_instructions(ctx: Context) -> list[str]:
    """The head-to-head's prompts: the eval split's instructions, else the prompts of rm_eval (oasst's held-out
    trees: no model of the run trained on them)."""
    rows = ctx.split("eval")
    if rows is not None:
        return [r["instruction"] for r in rows.to_list()]
    rows = ctx.split("rm_eval")
    if rows is not None:
        return list(dict.fromkeys(r["prompt"] for r in rows.to_list()))
    raise FileNotFoundError(f"{ctx.paths.data('eval')}: this run has neither an eval nor an rm_eval split "
                            f"(data.source={ctx.env.name!r}) to compare models on; give prompts "
                            f"(jaxsr eval --head-to-head A B --prompts FILE)")


def _h2h(ctx: Context) -> dict:
    """M_{t+1} against M_t, and against the SFT baseline when the run has one, judged by M_{t+1}."""
    from .headtohead import evaluate_pair

    instructions = h2h_instructions(ctx)
    new, old = (f"M{ctx.t + 1}", ctx.path("M_next")), (f"M{ctx.t}", ctx.path("M_t"))
    stats = {}
    for other in (old, ("baseline", ctx.paths.model("baseline"))):
        if other[1].is_dir():
            res = evaluate_pair(ctx, new, other, instructions)
            stats[f"vs_{other[0]}"] = {k: res[k] for k in ("win", "tie", "loss", "win_rate", "win_rate_ci95", "n")}
        else:
            log.info("h2h %s: no %s model at %s; skipped", new[0], other[0], other[1])
    return stats


def _h2h_rows(ctx: Context, t: int) -> dict:
    """The report's head-to-head columns of M_t: against M_{t-1} and against the baseline, where recorded."""
    row = {}
    for other, key in ((f"M{t - 1}", "h2h_prev"), ("baseline", "h2h_baseline")):
        path = ctx.paths.h2h(f"M{t}", other)
        if path.is_file():
            res = json.loads(path.read_text())
            lo, hi = res["win_rate_ci95"] or (math.nan, math.nan)
            row |= {f"{key}_win_rate": res["win_rate"], f"{key}_ci95": res["win_rate_ci95"],
                    key: f"{res['win_rate']:.1%} [{lo:.1%}, {hi:.1%}] {res['wins']}/{res['ties']}/{res['losses']}"}
    return row


def report_rows(ctx: Context) -> list[dict]:
    """One row per model M_t (after the SFT baseline's, when the run trained one): the environment's figures, the
    judge's, and the data M_t generated."""
    rows = []
    baseline = ctx.paths.eval("baseline")
    if ctx.paths.model("baseline").is_dir() and baseline.is_file():
        ev = json.loads(baseline.read_text())
        rows.append({"iteration": 0, "model": "baseline"} | _eval_row(ctx, ev) | {"samples": ev.get("samples", [])})
    for t in range(1, ctx.cfg.loop.iterations + 1):
        path = ctx.paths.eval(t)
        ev = json.loads(path.read_text()) if path.is_file() else {"iteration": t}
        stages = {s.name: _stats(ctx.paths.stage(t, s.name)) for s in GRAPH.iteration if s.writes == (s.name,)}
        summary = evaluate.iteration_summary(stages)
        row = {"iteration": t, "model": f"M{t}"} | _eval_row(ctx, ev)
        row |= {"prompts": stages.get("prompts", {}).get("prompts")}
        row |= {k: summary.get(k) for k in ("pairs", "tie_rate", "parse_failure_rate", "mean_chosen_tokens",
                                            "mean_rejected_tokens", "truly_better", "truly_worse")}
        row |= _h2h_rows(ctx, t) | _selection_row(ctx, t)
        rows.append(row | {"samples": ev.get("samples", [])})
    return rows


def _selection_row(ctx: Context, t: int) -> dict:
    """The DPO step M_t was selected at and the step its DPO stopped at, when checkpoint selection made M_t."""
    from .selection import LOG_FILE

    path = ctx.paths.train(f"dpo{t - 1}") / LOG_FILE
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text())["entries"]
    selected = [e["step"] for e in entries if e["selected"]]
    stop = [e["step"] for e in entries if e["decision"] == "stop"]
    return {"dpo_selected_step": selected[-1] if selected else None, "dpo_stopped_at": stop[0] if stop else None}


def _stats(path: Path) -> dict:
    f = path / "stats.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _report(ctx: Context) -> dict:
    from .report import write_report

    if not distributed.is_primary():
        return {}
    return write_report(report_rows(ctx), ctx.paths.root, ctx.cfg.name, ctx.env.report_columns, ctx.env.report_axes)


DATA = Stage("data", _data, writes=("data",), section="data", help="the environment's seed splits")
SFT = Stage("sft", lambda ctx: sft_from_m0(ctx, ("ift", "eft"), "sft", "M_next", eft_rows(ctx)),
            reads=("data", "eft_answers"),
            writes=("M_next",), section="sft", help="SFT of M0 on IFT (+ EFT) -> M1")
SFT_BASELINE = Stage("sft_baseline", lambda ctx: sft_from_m0(ctx, ("ift",), "sft_baseline", "baseline"),
                     reads=("data",), writes=("baseline",), section="sft",
                     when=lambda cfg: cfg.data.build_eft or cfg.eft.policy_prompts > 0,
                     help="the SFT baseline: SFT of M0 on IFT only (data.build_eft, eft.policy_prompts)")
BASELINE_EVAL = Stage("baseline_eval", _baseline_eval, reads=("baseline", "data"), writes=("baseline_eval",),
                      section="loop", when=lambda cfg: cfg.data.build_eft,
                      help="the environment's score and judge metrics of the SFT baseline")
DPO = Stage("dpo", _dpo, reads=("M_t", "pairs", "judge_pairs"), writes=("M_next",), section="dpo",
            help="DPO of M_t on its pairs (+ the judge pairs of Meta-Rewarding) -> M_{t+1}")
EVAL = Stage("eval", _eval, reads=("M_next",), writes=("eval",), section="loop", per_model=True,
             help="the environment's score and judge metrics of the model the iteration made")
H2H = Stage("h2h", _h2h, reads=("M_t", "M_next"), writes=("h2h",), section="loop", per_model=True,
            when=lambda cfg: cfg.loop.head_to_head,
            help="M_{t+1} against M_t (and the SFT baseline), judged pairwise by M_{t+1} (loop.head_to_head)")
REPORT = Stage("report", _report, writes=("report",), help="table, plot, report.json and TensorBoard events")

GRAPH = Graph(bootstrap=(DATA, SFT_BASELINE, EFT_JUDGE, EFT_BUILD, EFT_ANSWERS, BASELINE_EVAL, SFT, EVAL),
              iteration=(selfreward.PROMPTS, selfreward.CANDIDATES, selfreward.JUDGEMENTS, selfreward.PAIRS, JUDGE_PAIRS,
                         DPO, EVAL, H2H),
              final=(REPORT,))
