"""Building EFT (jaxsr/eft.py): the agreement filter and the rebalancing against hand-made cases, and the bootstrap
graph with data.build_eft on the Open Assistant fixture with a tiny from-scratch model."""

import json
import random

import pytest

from jaxsr import artifacts, loop
from jaxsr.config import ConfigValueError, load_config
from jaxsr.eft import agrees_with_ranking, rebalance, score_bin, stated_judgement
from jaxsr.world import TOKENIZER_DIR, WORLD_JUDGE_TEMPLATE_PATH


@pytest.mark.parametrize("scores, ranks, agrees", [
    ([5, 3, 1], [0, 1, 2], True),
    ([2.5, 2.0], [0, 1], True),
    ([1, 3, 5], [2, 1, 0], True),          # listed worst first: the ranks, not the order, say which is better
    ([4, 4.5], [1, 2], False),             # the worse-ranked response scored higher
    ([5, 3, 3], [0, 1, 2], False),         # a tie between different ranks
    ([5, 5, 3], [0, 0, 1], True),          # equal ranks constrain nothing
    ([5, None, 1], [0, 1, 2], False),      # a judgement without a valid score
    ([5, float("nan")], [0, 1], False),
    ([5], [0], False),                     # one response ranks nothing
    ([4, 2, 3], [0, 1, 2], False),         # right at the top, wrong below
])
def test_agreement(scores, ranks, agrees):
    assert agrees_with_ranking(scores, ranks) is agrees


def test_agreement_needs_one_score_per_response():
    with pytest.raises(ValueError, match="2 scores for 3 ranked responses"):
        agrees_with_ranking([1, 2], [0, 1, 2])


def test_rebalance_cuts_the_most_common_score_to_the_runner_up():
    scores = [4] * 10 + [5] * 3 + [2] * 2 + [4.4, 3.6]  # 4.4 and 3.6 count as 4: twelve 4s
    kept = rebalance(scores, random.Random(0))
    assert kept == sorted(kept)
    counts = {b: sum(score_bin(scores[i]) == b for i in kept) for b in (2, 4, 5)}
    assert counts == {2: 2, 4: 3, 5: 3}
    assert {i for i in range(len(scores)) if score_bin(scores[i]) != 4} <= set(kept)  # only 4s dropped
    assert kept == rebalance(scores, random.Random(0))  # a function of the rng's seed
    assert rebalance([3, 3, 3], random.Random(0)) == [0, 1, 2]  # one score: nothing to balance against
    assert rebalance([1, 1, 2, 2, 0], random.Random(0)) == [0, 1, 2, 3, 4]  # a shared top count
    assert rebalance([], random.Random(0)) == []
    assert score_bin(2.5) == 3 and score_bin(2.49) == 2


def test_stated_judgement():
    assert stated_judgement("Fine. Score: 4", 4.0, "sampled") == ("Fine. Score: 4", 4.0)
    assert stated_judgement("Fine. Score: 4 or so", 2.6, "expected") == ("Fine. Score: 3", 3.0)
    assert stated_judgement("no marker", 1.2, "expected") == ("no marker\nScore: 1", 1.0)
    assert stated_judgement("x", None, "expected") == ("x", None)


def test_config_keys():
    cfg = load_config(None, ["data.build_eft=true", "eft.judgements_per_response=3"])
    assert cfg.data.build_eft and cfg.eft.judgements_per_response == 3 and cfg.eft.rebalance
    assert not load_config(None).data.build_eft  # the world builds its own EFT
    with pytest.raises(ConfigValueError, match=r"eft\.eval_fraction=1\.0 must be in \[0, 1\)"):
        load_config(None, ["eft.eval_fraction=1.0"])
    with pytest.raises(ConfigValueError, match=r"unknown key 'eft\.judgements'"):
        load_config(None, ["eft.judgements=3"])


def test_eft_build_keeps_agreeing_sets_rebalances_and_holds_out(tmp_path):
    from jaxsr import envs
    from jaxsr.eft import EFT_BUILD
    from jaxsr.stages import Context, RunPaths, write_rows

    cfg = load_config(None, [f"run_dir={tmp_path}", f"judge.template={WORLD_JUDGE_TEMPLATE_PATH}"])
    ctx = Context(cfg=cfg, paths=RunPaths(tmp_path), mesh=None, env=envs.get("oasst")).at(EFT_BUILD, 0)
    source = [{"prompt": f"q{i}", "responses": [f"q{i} r{j}" for j in range(n)], "ranks": list(range(n))}
              for i, n in enumerate((3, 2, 2, 2))]
    write_rows(ctx.paths.data("eft_source"), source)
    # (prompt, judge_id) -> scores of its responses in rank order; prompt 3 was held out (never judged).
    sets = {(0, 0): [5, 4, 2], (0, 1): [4, 4, 1], (1, 0): [4, 2], (1, 1): [2, 4], (2, 0): [4, 3], (2, 1): [None, 3]}
    write_rows(ctx.path("eft_judge"), [
        {"source_id": i, "response_id": k, "rank": k, "judge_id": j, "score": s, "response_truncated": False,
         "judge_text": "why" if s is None else f"why. Score: {s}"}
        for (i, j), scores in sets.items() for k, s in enumerate(scores)])
    stats = EFT_BUILD.run(ctx)
    assert {k: stats[k] for k in ("judgement_sets", "sets_agreeing", "prompts_agreeing", "judgements_agreeing",
                                  "eft", "rm_eval_held_out")} == {
        "judgement_sets": 6, "sets_agreeing": 3, "prompts_agreeing": 3, "judgements_agreeing": 7, "eft": 6,
        "rm_eval_held_out": 1}
    assert stats["scores_before_rebalance"] == {"0": 0, "1": 0, "2": 2, "3": 1, "4": 3, "5": 1}
    assert stats["scores_after_rebalance"] == {"0": 0, "1": 0, "2": 2, "3": 1, "4": 2, "5": 1}
    eft = artifacts.read_dataset(ctx.path("eft")).to_list()
    assert {(r["source_id"], r["judge_id"]) for r in eft} == {(0, 0), (1, 0), (2, 0)}
    first = next(r for r in eft if r["candidate"] == "q0 r0")
    assert first["response"] == "why. Score: 5" and "q0" in first["prompt"] and "q0 r0" in first["prompt"]
    assert artifacts.read_dataset(ctx.paths.data("rm_eval")).to_list() == [source[3]]


# The bootstrap phase only (loop.iterations=1: M1 and the report) at the smallest size that trains.
def _cfg(run_dir, fixtures_dir, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", "data.source=oasst", f"data.options.path={fixtures_dir / 'oasst' / 'messages.jsonl'}",
        "data.build_eft=true", f"model.tokenizer={TOKENIZER_DIR}", "model.architecture.hidden_size=32",
        "model.architecture.intermediate_size=64", "model.architecture.num_layers=1",
        "model.architecture.num_heads=2", "model.architecture.num_kv_heads=1", "model.architecture.head_dim=16",
        "model.architecture.max_position_embeddings=256", "loop.iterations=1", "loop.eval_max_new_tokens=4",
        f"judge.template={WORLD_JUDGE_TEMPLATE_PATH}", "judge.mode=expected", "judge.max_new_tokens=4", "sft.max_steps=2", "sft.batch_size=8",
        "sft.max_length=256", "sft.checkpoint_every=2", *extra])


def _stats(run_dir, key):
    return json.loads((run_dir / "manifest.json").read_text())["stages"][key]


def test_build_eft_runs_the_bootstrap_on_open_assistant(tmp_path, fixtures_dir):
    run_dir = tmp_path / "run"
    rows = loop.run(_cfg(run_dir, fixtures_dir))
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(stages) == ["data", "sft_baseline", "eft_judge", "eft_build", "baseline_eval", "sft", "eval/M1",
                            "report"]
    judged, built = stages["eft_judge"]["result"], stages["eft_build"]["result"]
    # The fixture's training side (tests/test_oasst.py): 4 prompts with 3, 2, 2 and 4 ranked responses; rm_eval
    # comes from the environment, so nothing is held out here.
    assert (judged["prompts"], judged["responses"], judged["judgements"], judged["held_out_prompts"]) == (4, 11, 11, 0)
    assert built["judgement_sets"] == 4 and built["rm_eval_held_out"] == 0
    assert built["prompts_agreeing"] == built["sets_agreeing"] <= 4
    assert sum(built["scores_before_rebalance"].values()) == built["judgements_agreeing"]
    assert sum(built["scores_after_rebalance"].values()) == built["eft"] == artifacts.read_dataset(
        run_dir / "data" / "eft").num_rows
    assert all(built["scores_after_rebalance"][k] <= v for k, v in built["scores_before_rebalance"].items())
    # An untrained judge's expected scores all round alike, so usually nothing agrees; the rows are checked if any.
    eft = artifacts.read_dataset(run_dir / "data" / "eft").to_list()
    for r in eft:
        assert r["instruction"] in r["prompt"] and r["candidate"] in r["prompt"]
        assert r["response"].endswith(f"Score: {int(r['score'])}")
    assert (run_dir / "models" / "baseline").is_dir() and (run_dir / "models" / "M1").is_dir()
    assert [r["model"] for r in rows] == ["baseline", "M1"]
    assert rows[0]["judge_pairwise_accuracy"] is not None  # the reward-model table's first row


@pytest.mark.slow  # ~40 s: three partial runs
def test_build_eft_resumes_to_the_same_dataset(tmp_path, fixtures_dir):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    with pytest.raises(SystemExit, match="stopped after stage eft_judge"):
        loop.run(_cfg(parts, fixtures_dir), stop_after="eft_judge")
    assert not (parts / "data" / "eft").exists()
    for run_dir in (parts, whole):
        with pytest.raises(SystemExit, match="stopped after stage eft_build"):
            loop.run(_cfg(run_dir, fixtures_dir), stop_after="eft_build")
    for key in ("eft_judge", "eft_build"):
        assert _stats(parts, key)["outputs"] == _stats(whole, key)["outputs"]
