"""The four self-rewarding data stages on a tiny model: determinism, resume after a crash, stats vs datasets."""

import json
import math

import numpy as np
import pytest

import jaxsr
from jaxsr import artifacts, selfreward
from jaxsr.config import load_config
from jaxsr.sample import Completion

SEEDS = ["Write a short poem about the sea.", "List three colors, one per line.",
         "Explain why the sky is blue in two sentences.", "Respond with exactly five words.",
         "Name two rivers in Europe and their countries.", "Describe a cat in one sentence.",
         "Give a synonym for happy and use it in a sentence.", "Summarise the plot of a fairy tale."]


@pytest.fixture(scope="module")
def policy(fixtures_dir):
    return jaxsr.load_policy(fixtures_dir / "hf" / "qwen3")


@pytest.fixture
def cfg(tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("Rate the answer.\nQ: <INSTRUCTION_HERE>\nA: <RESPONSE_HERE>\nEnd with Score: <0-5>")
    return load_config(None, [
        f"run_dir={tmp_path}", "seed=3", "sample.num_samples=3", "sample.max_new_tokens=12",
        f"judge.template={template}", "judge.num_judgements=2", "judge.max_new_tokens=8", "judge.mode=expected",
        "prompts.num_prompts=5", "prompts.requests_per_round=4", "prompts.max_new_tokens=8", "prompts.min_words=1",
        "prompts.max_rounds=20"])


def write_prompts(directory, texts):
    w = artifacts.ShardedWriter(directory, shard_size=100)
    w.extend({"prompt_id": i, "prompt": t, "round": 0} for i, t in enumerate(texts))
    w.finalize()


def run_stages(policy, cfg, root, crash_after=None, monkeypatch=None):
    write_prompts(root / "prompts", SEEDS[:6])
    selfreward.generate_candidates(policy, root / "prompts", root / "candidates", cfg, 1)
    selfreward.judge_candidates(policy, root / "candidates", root / "judgements", cfg, 1)
    return selfreward.build_pairs(policy, root / "candidates", root / "judgements", root / "pairs", cfg, 1)


def test_stages_deterministic_and_consistent(policy, cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    stats_a = run_stages(policy, cfg, a)
    run_stages(policy, cfg, b)
    for stage in ("candidates", "judgements", "pairs"):
        da, db = artifacts.read_dataset(a / stage), artifacts.read_dataset(b / stage)
        assert artifacts.content_hash(da) == artifacts.content_hash(db), stage
    cands = artifacts.read_dataset(a / "candidates")
    assert len(cands) == 6 * 3
    cstats = json.loads((a / "candidates" / "stats.json").read_text())
    assert cstats["candidates"] == len(cands)
    assert math.isclose(cstats["mean_tokens"], float(np.mean(cands["num_tokens"])))
    judgements = artifacts.read_dataset(a / "judgements")
    assert len(judgements) == len(cands)  # expected mode: one judgement per candidate
    jstats = json.loads((a / "judgements" / "stats.json").read_text())
    assert sum(jstats["score_histogram"].values()) == sum(s is not None for s in judgements["score"])
    pairs = artifacts.read_dataset(a / "pairs")
    assert stats_a["pairs"] == len(pairs) > 0
    for p in pairs:
        assert p["chosen_score"] > p["rejected_score"]
        assert p["chosen"] != p["rejected"]
        assert p["ref_chosen_logps"] < 0 and p["ref_rejected_logps"] < 0
    assert math.isclose(stats_a["mean_chosen_tokens"], float(np.mean(pairs["chosen_tokens"])))


def test_candidates_resume_after_crash(policy, cfg, tmp_path, monkeypatch):
    write_prompts(tmp_path / "prompts", SEEDS * 3)  # 24 prompts -> 2 shards of 16 prompts
    selfreward.generate_candidates(policy, tmp_path / "prompts", tmp_path / "full", cfg, 1)

    calls = {"n": 0}
    real = selfreward.generate

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(selfreward, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        selfreward.generate_candidates(policy, tmp_path / "prompts", tmp_path / "resumed", cfg, 1)
    assert artifacts.ShardedWriter(tmp_path / "resumed", shard_size=48).done_rows() == 16 * 3
    monkeypatch.setattr(selfreward, "generate", real)
    selfreward.generate_candidates(policy, tmp_path / "prompts", tmp_path / "resumed", cfg, 1)
    full, resumed = artifacts.read_dataset(tmp_path / "full"), artifacts.read_dataset(tmp_path / "resumed")
    assert full.to_list() == resumed.to_list()


def test_prompts_stage_filters_rounds_and_resumes(policy, cfg, tmp_path, monkeypatch):
    # A scripted generator: exercises the filter and round bookkeeping without depending on a model's text.
    script = iter(["Describe the sea in a poem.", "Write a short poem about the sea.", "Draw a map of France.",
                   "Name three fruits that are red.", "Name three fruits that are red!", "Explain gravity to a child.",
                   "What is the capital of Peru?", "Translate hello into Spanish.", "Count from one to five.",
                   "Describe your favourite meal.", "List two uses of copper.", "Why do leaves fall?"] * 3)

    def fake_generate(policy, prompts, **kw):
        assert all(p.count("Task ") >= 9 for p in prompts)  # 8 shots + the open slot
        return [[Completion(token_ids=[], text=next(script), logprobs=[], finish_reason="eos", prompt_tokens=0)] for _ in prompts]

    monkeypatch.setattr(selfreward, "generate", fake_generate)
    stats = selfreward.generate_prompts(policy, SEEDS, tmp_path / "p", cfg, 1)
    rows = artifacts.read_dataset(tmp_path / "p").to_list()
    texts = [r["prompt"] for r in rows]
    assert len(texts) == 5 == stats["prompts"]
    assert "Write a short poem about the sea." not in texts  # a seed: duplicate
    assert "Draw a map of France." not in texts               # blocklist
    assert "Name three fruits that are red!" not in texts      # ROUGE-L near-duplicate
    assert stats["rejections"]["duplicate"] >= 1 and stats["rejections"]["blocklist"] >= 1
    assert [r["prompt_id"] for r in rows] == list(range(5))


def test_judge_truncates_response_not_instruction(policy, cfg):
    template = jaxsr.judge.load_judge_template(cfg.judge.template)
    long_response = "word " * 400
    ids, truncated = selfreward.judge_request_ids(policy, template, "Say something.", long_response, 8)
    assert truncated and len(ids) <= policy.config.max_position_embeddings - 8
    assert "Say something." in policy.tokenizer.decode(ids)
    ids2, truncated2 = selfreward.judge_request_ids(policy, template, "Say something.", "ok", 8)
    assert not truncated2 and len(ids2) < len(ids)


def test_pairs_ties_and_invalid_are_discarded(policy, cfg, tmp_path):
    write_prompts(tmp_path / "prompts", SEEDS[:3])
    cands = artifacts.ShardedWriter(tmp_path / "c", shard_size=100)
    judged = artifacts.ShardedWriter(tmp_path / "j", shard_size=100)
    scores = {0: [4.0, 4.0, 4.0], 1: [None, 3.0, None], 2: [5.0, 1.0, 3.0]}
    for pid, ss in scores.items():
        for j, s in enumerate(ss):
            cands.append({"prompt_id": pid, "prompt": SEEDS[pid], "candidate_id": j, "response": f"answer {pid}-{j}",
                          "num_tokens": 3 + j, "finish_reason": "eos"})
            judged.append({"prompt_id": pid, "candidate_id": j, "judge_id": 0, "judge_text": "", "score": s,
                           "digit_mass": [], "response_truncated": False, "excluded": False})
    cands.finalize()
    judged.finalize()
    stats = selfreward.build_pairs(policy, tmp_path / "c", tmp_path / "j", tmp_path / "pairs", cfg, 1,
                                   reference_fn=lambda pol, pairs, c: ([-1.0] * len(pairs), [-2.0] * len(pairs)))
    pairs = artifacts.read_dataset(tmp_path / "pairs").to_list()
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs] == [(2, "answer 2-0", "answer 2-1")]
    assert stats["pairs"] == 1 and stats["too_few_valid"] == 1 and math.isclose(stats["tie_rate"], 1 / 3)
