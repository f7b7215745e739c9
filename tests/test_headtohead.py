"""Head-to-head evaluation (paper Fig. 3): the win rate and its Wilson interval against published and hand-computed
values, the both-orders tie rule with a stub judge, request truncation, and `jaxsr eval --head-to-head` plus the
h2h stage on a micro run of the example environment."""

import json
import types

import numpy as np
import pytest

from jaxsr import backends, headtohead
from jaxsr.evaluate import head_to_head, wilson_interval
from jaxsr.sample import Completion


# --- the numbers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("successes, n, lo, hi", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17, Table I
    # (method 3, Wilson score without continuity correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombe_1998(successes, n, lo, hi):
    got = wilson_interval(successes / n, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_hand_computed_and_solves_the_score_equation():
    # p = 0.7, n = 10, z^2 = 3.841459: center (0.7 + 0.192073) / 1.384146 = 0.644493,
    # half 1.959964 / 1.384146 * sqrt(0.021 + 3.841459 / 400) = 1.416011 * 0.174939 = 0.247715.
    lo, hi = wilson_interval(0.7, 10)
    assert (lo, hi) == pytest.approx((0.644493 - 0.247715, 0.644493 + 0.247715), abs=2e-6)
    z = 1.959963984540054
    roots = np.roots([1 + z * z / 10, -(2 * 0.7 + z * z / 10), 0.49])  # (p_hat - p)^2 = z^2 p (1 - p) / n
    assert sorted(roots) == pytest.approx([lo, hi], abs=1e-12)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0.5, 0)


def test_win_rate_counts_ties_as_half_with_its_interval():
    # 3 wins, 4 ties (2 inconsistent, 1 both-tie, 1 unparsed), 1 loss: (3 + 4/2) / 8 = 0.625.
    ab = ["A", "A", "A", "B", "A", "B", "tie", None]
    ba = ["B", "B", "B", "A", "A", "B", "tie", "B"]
    res = head_to_head(ab, ba)
    assert (res["wins"], res["ties"], res["losses"], res["inconsistent"], res["unparsed"]) == (3, 4, 1, 2, 1)
    assert res["win_rate"] == pytest.approx(0.625)
    assert res["win_rate_ci95"] == pytest.approx(list(wilson_interval(0.625, 8)))
    assert head_to_head([], [])["win_rate"] is None and head_to_head([], [])["win_rate_ci95"] is None


def test_tally_reads_the_judge_texts_of_both_orders():
    texts_ab = ["A is right. [[A]]", "[[B]]", "B quotes [[A]] but [[B]]", "no verdict", "Output (a)"]
    texts_ba = ["[[B]]", "[[A]]", "[[A]]", "[[B]]", "[[A]]"]
    # win; loss; loss (the last mark counts); unparsed -> tie; inconsistent (A first both times) -> tie.
    res = headtohead.tally(texts_ab, texts_ba)
    assert (res["wins"], res["ties"], res["losses"], res["unparsed"], res["inconsistent"]) == (1, 2, 2, 1, 1)
    assert res["win_rate"] == pytest.approx((1 + 2 / 2) / 5)


# --- the protocol with a stub judge ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from jaxsr.world import load_tokenizer

    return load_tokenizer()


def _stub_generate(judge_rule):
    """`generate` for fake policies: a policy answers with its `answer`; the judge applies `judge_rule(a, b)` to
    the two outputs it reads in the request."""
    def generate(policy, ids, *, max_new_tokens, temperature, **_):
        assert temperature == 0.0  # greedy answers and verdicts
        out = []
        for row in ids:
            text = policy.tokenizer.decode(row)
            if "## Output A:" in text:
                a = text.split("## Output A:\n")[1].split("\n\n## Output B:")[0]
                b = text.split("## Output B:\n")[1].split("\n\n## Which")[0]
                reply = judge_rule(a, b)
            else:
                reply = policy.answer(text)
            out.append([Completion([], reply, [], "eos", len(row))])
        return out
    return generate


class _FakePolicy(types.SimpleNamespace):
    """A stand-in policy; weak-referenceable like a Policy (the sampling backend holds the model it prepared so)."""


def _policy(tok, answer, context=4096):
    return _FakePolicy(tokenizer=tok, answer=answer, config=types.SimpleNamespace(max_position_embeddings=context))


def test_both_orders_with_a_stub_judge(tok, monkeypatch):
    questions = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    right = _policy(tok, lambda q: "3" if "1 + 2" in q else "7" if "3 + 4" in q else "11" if "5 + 6" in q else "16")
    wrong = _policy(tok, lambda q: "3" if "1 + 2" in q else "0")  # right on the first question only

    def fair(a, b):  # prefers the right answer; a tie of equal answers makes it pick the first shown
        def ok(x):
            return x in ("3", "7", "11", "15")
        return "[[A]]" if ok(a) or not ok(b) else "[[B]]"

    monkeypatch.setattr(backends, "generate", _stub_generate(fair))
    res = headtohead.compare(right, wrong, questions, max_new_tokens=4, judge_max_new_tokens=8, names=("R", "W"))
    # q1: both "3" -> A then A: inconsistent, a tie. q2, q3: R right -> wins. q4: both wrong ("16", "0"), the
    # judge picks the first shown both times -> a tie.
    assert (res["wins"], res["ties"], res["losses"], res["inconsistent"]) == (2, 2, 0, 2)
    assert res["win_rate"] == pytest.approx(0.75)
    assert (res["a"], res["b"], res["judge"], res["ci_method"]) == ("R", "W", "R", "wilson")
    assert [p["output_a"] for p in res["prompts"]] == ["3", "7", "11", "16"]
    assert [(p["verdict_ab"], p["verdict_ba"]) for p in res["prompts"]][1] == ("A", "B")

    monkeypatch.setattr(backends, "generate", _stub_generate(lambda a, b: "[[A]]"))  # pure position bias
    res = headtohead.compare(right, wrong, questions, max_new_tokens=4, judge_max_new_tokens=8)
    assert (res["wins"], res["ties"], res["losses"], res["win_rate"]) == (0, 4, 0, 0.5)


def test_pairwise_request_cuts_both_outputs_to_the_same_budget(tok):
    long_a, long_b = "one two three " * 40, "four five six " * 40
    short = headtohead.pairwise_request_ids(tok, 4096, "Count.", "a", "b", max_new_tokens=8)
    assert short[1] is False
    ids, cut = headtohead.pairwise_request_ids(tok, 400, "Count.", long_a, long_b, max_new_tokens=8)
    assert cut and len(ids) <= 392
    text = tok.decode(ids)
    a = text.split("## Output A:\n")[1].split("\n\n## Output B:")[0]
    b = text.split("## Output B:\n")[1].split("\n\n## Which")[0]
    n_a, n_b = (len(tok(x, add_special_tokens=False)["input_ids"]) for x in (a, b))
    assert abs(n_a - n_b) <= 2 and n_a > 20  # equal budgets, and the room is used
    with pytest.raises(ValueError, match="does not fit the judge's context"):
        headtohead.pairwise_request_ids(tok, 128, "Count.", long_a, long_b, max_new_tokens=8)


# --- `jaxsr eval --head-to-head` and the h2h stage on a micro run ----------------------------------------------

def test_eval_head_to_head_command_and_stage_on_a_micro_run(tmp_path, capsys):
    import dataclasses

    from jaxsr import loop, pipeline, save_checkpoint
    from jaxsr.cli import main as cli_main
    from jaxsr.config import CONFIG_DIR
    from test_stages import ARITH, _cfg

    run_dir = tmp_path / "run"
    # The pairwise request is ~260 tokens of the world tokenizer: a longer context than ARITH's 128.
    extra = ["model.architecture.max_position_embeddings=384", "judge.max_new_tokens=6"]
    cfg = _cfg(run_dir, *extra)
    with pytest.raises(SystemExit):
        loop.run(cfg, stop_after="data")
    ctx = loop.context(cfg)
    for t, seed in ((1, 0), (2, 1)):  # two random decoders stand in for M1 and M2
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_seed=seed))
        save_checkpoint(pipeline.initial_policy(dataclasses.replace(ctx, cfg=c)), ctx.paths.model(t))

    args = ["eval", "--config", str(CONFIG_DIR / "arithmetic.yaml"), "--head-to-head", "2", "1",
            f"run_dir={run_dir}", *ARITH, *extra]
    assert cli_main(args) == 0
    assert "M2 vs M1 (judge M2, n=8)" in capsys.readouterr().out
    instructions = [r["instruction"] for r in ctx.split("eval").to_list()]
    res = json.loads((run_dir / "eval" / "h2h_M2_vs_M1.json").read_text())
    assert (res["a"], res["b"], res["judge"], res["n"]) == ("M2", "M1", "M2", 8)
    assert res["wins"] + res["ties"] + res["losses"] == 8
    lo, hi = res["win_rate_ci95"]
    assert lo <= res["win_rate"] <= hi and res["win_rate"] == (res["wins"] + res["ties"] / 2) / 8
    assert [p["instruction"] for p in res["prompts"]] == instructions
    assert set(res["prompts"][0]) == {"instruction", "output_a", "output_b", "judge_ab", "judge_ba", "verdict_ab",
                                      "verdict_ba"}
    for name in ("M1", "M2"):
        records = json.loads((run_dir / "eval" / "alpaca_eval" / f"{name}.json").read_text())
        assert [set(r) for r in records] == [{"instruction", "output", "generator"}] * 8
        assert [r["instruction"] for r in records] == instructions and records[0]["generator"] == name
    alpaca_m2 = [r["output"] for r in json.loads((run_dir / "eval" / "alpaca_eval" / "M2.json").read_text())]
    assert [p["output_a"] for p in res["prompts"]] == alpaca_m2

    # --prompts FILE, a model directory and --judge.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "What is 1 + 1?"}\n\n{"prompt": "What is 2 + 3?"}')
    args = ["eval", "--config", str(CONFIG_DIR / "arithmetic.yaml"), "--head-to-head", str(run_dir / "models" / "M1"),
            "2", "--prompts", str(prompts), "--judge", "2", f"run_dir={run_dir}", *ARITH, *extra]
    assert cli_main(args) == 0
    res = json.loads((run_dir / "eval" / "h2h_M1_vs_M2.json").read_text())
    assert (res["judge"], res["n"]) == ("M2", 2)
    assert [p["instruction"] for p in res["prompts"]] == ["What is 1 + 1?", "What is 2 + 3?"]
    assert cli_main([*args[:4], "7", *args[5:]]) == 2
    assert "model '7': no checkpoint directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "What is 1 + 1?"}\n{"text": "no instruction"}\n')
    assert cli_main([*args[:7], str(bad), *args[8:]]) == 2
    assert "bad.jsonl: record 2 has no 'instruction' or 'prompt' string" in capsys.readouterr().err

    # The h2h stage at t = 1 (M2 against M1, and against a baseline when there is one) and the report's columns.
    import shutil

    shutil.copytree(ctx.paths.model(1), ctx.paths.model("baseline"))
    stats = pipeline.H2H.run(ctx.at(pipeline.H2H, 1))
    assert set(stats) == {"vs_M1", "vs_baseline"}
    assert (run_dir / "eval" / "h2h_M2_vs_baseline.json").is_file()
    rows = pipeline.report_rows(ctx)
    assert rows[0].get("h2h_prev") is None and rows[1]["h2h_prev_win_rate"] == stats["vs_M1"]["win_rate"]
    from jaxsr.report import table

    assert "vs M_{t-1}: win rate [95% CI] W/T/L" in table(rows)


def test_the_h2h_stage_runs_only_with_loop_head_to_head(tmp_path):
    from jaxsr.pipeline import GRAPH
    from test_stages import _cfg

    def names(cfg):
        return [s.key(phase, t) for phase, t, s in GRAPH.schedule(3) if s.enabled(cfg)]

    off, on = names(_cfg(tmp_path)), names(_cfg(tmp_path, "loop.head_to_head=true"))
    assert [k for k in on if k not in off] == ["h2h/M2", "h2h/M3"]
    assert not any(k.startswith("h2h") for k in off)


def test_head_to_head_prompts_come_from_eval_else_rm_eval_else_an_error(tmp_path):
    """`jaxsr eval --head-to-head` and the h2h stage share their default prompts: the eval split's instructions,
    else the rm_eval prompts (oasst), else an error that says how to give prompts."""
    from jaxsr import artifacts
    from jaxsr.config import ConfigValueError, load_config
    from jaxsr.pipeline import h2h_instructions
    from jaxsr.stages import Context, RunPaths

    ctx = Context(cfg=None, paths=RunPaths(tmp_path), mesh=None, env=type("E", (), {"name": "files"})())
    with pytest.raises(FileNotFoundError, match=r"neither an eval nor an rm_eval split.*--prompts FILE"):
        h2h_instructions(ctx)
    w = artifacts.ShardedWriter(ctx.paths.data("rm_eval"), shard_size=10)
    w.extend([{"prompt": "Why?", "responses": ["a", "b"]}, {"prompt": "Why?", "responses": ["c", "d"]},
              {"prompt": "How?", "responses": ["e", "f"]}])
    w.finalize()
    assert h2h_instructions(ctx) == ["Why?", "How?"]  # one per prompt, in order
    w = artifacts.ShardedWriter(ctx.paths.data("eval"), shard_size=10)
    w.extend([{"instruction": "Name a fruit."}])
    w.finalize()
    assert h2h_instructions(ctx) == ["Name a fruit."]
    with pytest.raises(ConfigValueError, match=r"loop.head_to_head=true with data.source='files'.*--prompts FILE"):
        load_config(None, ["data.source=files", "judge.template=paper", "model.path=x/y", "loop.head_to_head=true"]).check_run()
