"""The four self-rewarding data stages on a tiny model: determinism, resume after a crash, stats vs datasets."""

import json
import math

import numpy as np
import pytest

import jaxsr
from jaxsr import artifacts, backends, judging, selfreward
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


def test_stages_deterministic_and_consistent(policy, cfg, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    stats_a = run_stages(policy, cfg, a)
    # Run b samples in chunks of at most sample.max_batch_rows = 8 rows (18 candidates, 18 judge requests per
    # call): the same rows, since a row's output depends only on (seed, prompt, sample).
    cfg.sample.max_batch_rows = 8
    calls = []

    def recording_generate(*args, **kw):
        stats = {}
        out = jaxsr.sample.generate(*args, stats=stats, **kw)
        calls.append(stats["chunks"])
        return out

    monkeypatch.setattr(backends, "generate", recording_generate)
    run_stages(policy, cfg, b)
    assert len(calls) == 2 and all(len(c) == 3 and max(x["rows"] for x in c) <= 8 for c in calls)  # 18 rows -> 3 chunks
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
    real = backends.generate

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(backends, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        selfreward.generate_candidates(policy, tmp_path / "prompts", tmp_path / "resumed", cfg, 1)
    assert artifacts.ShardedWriter(tmp_path / "resumed", shard_size=48).done_rows() == 16 * 3
    monkeypatch.setattr(backends, "generate", real)
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
        assert all(policy.tokenizer.decode(p).count("Task ") >= 9 for p in prompts)  # 8 shots + the open slot
        return [[Completion(token_ids=[], text=next(script), logprobs=[], finish_reason="eos", prompt_tokens=0)] for _ in prompts]

    monkeypatch.setattr(backends, "generate", fake_generate)
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
    ids, truncated = judging.judge_request_ids(policy, template, "Say something.", long_response, 8)
    assert truncated and len(ids) <= policy.config.max_position_embeddings - 8
    assert "Say something." in policy.tokenizer.decode(ids)
    ids2, truncated2 = judging.judge_request_ids(policy, template, "Say something.", "ok", 8)
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


class _Env:
    """A prompt source standing in for a fixed generator: `fresh` new prompts per round, then only repeats."""

    name = "scripted"

    def __init__(self, fresh_rounds: int = 100):
        self.fresh_rounds = fresh_rounds

    def has_prompt_source(self):
        return True

    def has_prompt_grader(self):
        return False

    WORDS = ("river apple stone cloud violin garden lantern copper meadow falcon harbor pepper marble canyon "
             "orchid thunder velvet glacier saddle compass ember willow quartz tunnel").split()

    def new_prompts(self, seed, stream, n, held_out):
        rnd = int(stream.split("/")[1])
        rnd = rnd if rnd < self.fresh_rounds else 0  # after `fresh_rounds`, only prompts seen before: rejected
        w = self.WORDS
        # Prompt i names 3 words no other prompt shares in that order: ROUGE-L keeps them apart.
        return [f"Compare {w[i % 24]} with {w[(5 * i + 1) % 24]} and {w[(7 * i + 3) % 24]}."
                for i in range(rnd * n, rnd * n + n)]


def _target_ctx(policy, cfg, root, env):
    from jaxsr.stages import Context, RunPaths

    ctx = Context(cfg=cfg, paths=RunPaths(root), mesh=None, env=env, t=1)
    ctx._models[1] = policy  # M1 = the fixture model (no checkpoint on disk)
    w = artifacts.ShardedWriter(RunPaths(root).data("seed_prompts"), shard_size=100)
    w.extend({"prompt": p} for p in SEEDS)
    w.finalize()
    return ctx


def _run_iteration_data(ctx):
    """The prompts, candidates, judgements and pairs stages of iteration 1, as the loop runs them."""
    from jaxsr.pipeline import GRAPH

    for stage in GRAPH.iteration[:4]:
        assert stage.name in ("prompts", "candidates", "judgements", "pairs")
        stage.run(ctx.at(stage, 1))
    return json.loads((ctx.path("pairs") / "stats.json").read_text())


@pytest.fixture
def target_cfg(cfg):
    cfg.prompts.generator = "env"
    cfg.prompts.target_pairs = [8]
    return cfg


def test_pairs_target_grows_blocks_until_met_and_a_kill_resumes_to_the_same_rows(policy, target_cfg, tmp_path,
                                                                                   monkeypatch):
    stats = _run_iteration_data(_target_ctx(policy, target_cfg, tmp_path / "a", _Env()))
    root = tmp_path / "a" / "iteration1"
    # Block 0: prompts.num_prompts = 5; each further block is sized from the yield so far, at least one round (4).
    assert stats["prompt_blocks"][0] == 5 and len(stats["prompt_blocks"]) >= 2
    n = stats["prompt_blocks"][-1]
    assert len(artifacts.read_dataset(root / "prompts")) == n
    assert [r["prompt_id"] for r in artifacts.read_dataset(root / "candidates")] == [i for i in range(n) for _ in range(3)]
    assert len(artifacts.read_dataset(root / "judgements")) == 3 * n  # expected mode: one per candidate
    pairs = artifacts.read_dataset(root / "pairs").to_list()
    assert len(pairs) == 8 == stats["pairs"] and stats["target_met"] and stats["shortfall"] == 0
    assert stats["usable_pairs"] >= 8 and [p["prompt_id"] for p in pairs] == sorted(p["prompt_id"] for p in pairs)
    all_pairs, counts = selfreward.select_pairs(artifacts.read_dataset(root / "candidates").to_list(),
                                                artifacts.read_dataset(root / "judgements").to_list(), 0.0)
    assert [p["prompt_id"] for p in pairs] == [p["prompt_id"] for p in all_pairs[:8]]  # the first 8 in prompt order
    assert json.loads((root / "candidates" / "stats.json").read_text())["candidates"] == 3 * n

    # Killed while judging the second block: the judgements directory is reopened and incomplete.
    calls = {"n": 0}
    real = backends.generate

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # block 0: candidates, judgements; block 1: candidates, then this
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(backends, "generate", crashing)
    ctx_b = _target_ctx(policy, target_cfg, tmp_path / "b", _Env())
    with pytest.raises(KeyboardInterrupt):
        _run_iteration_data(ctx_b)
    assert not artifacts.is_complete(tmp_path / "b" / "iteration1" / "judgements")
    monkeypatch.setattr(backends, "generate", real)
    from jaxsr.pipeline import GRAPH

    pairs_stage = GRAPH.iteration[3]
    pairs_stage.run(ctx_b.at(pairs_stage, 1))  # the loop reruns only the unfinished stage
    for name in ("prompts", "candidates", "judgements", "pairs"):
        a = artifacts.read_dataset(root / name)
        b = artifacts.read_dataset(tmp_path / "b" / "iteration1" / name)
        assert artifacts.content_hash(a) == artifacts.content_hash(b), name


def test_pairs_target_short_when_the_generator_runs_dry(policy, target_cfg, tmp_path, caplog):
    target_cfg.prompts.target_pairs = [40]
    stats = _run_iteration_data(_target_ctx(policy, target_cfg, tmp_path, _Env(fresh_rounds=3)))
    # Rounds of 4 prompts: rounds 0 and 1 give block 0's 5 (the rest of round 1 is cut), round 2 gives 4 more, then
    # only repeats until prompts.max_rounds.
    assert stats["prompts"] == 9 and stats["prompt_blocks"] == [5, 9]
    assert not stats["target_met"] and stats["shortfall"] == 40 - stats["pairs"] > 0
    assert "short of the 40 wanted (prompts.target_pairs=[40])" in caplog.text and "no new prompt" in caplog.text


def test_pairs_target_config_errors():
    from jaxsr.config import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"target_pairs\[0\]=100 cannot be met.*prompts.max_prompts=50"):
        load_config(None, ["prompts.num_prompts=10", "prompts.target_pairs=[100]", "prompts.max_prompts=50"])
    with pytest.raises(ConfigValueError, match=r"10 x prompts.num_prompts"):
        load_config(None, ["prompts.num_prompts=10", "prompts.target_pairs=[101]"])
    cfg = load_config(None, ["loop.iterations=3", "prompts.target_pairs=[3964,6942]"])
    assert (cfg.prompts.target(1), cfg.prompts.target(2)) == (3964, 6942)
    with pytest.raises(ConfigValueError, match="3 values but loop.iterations=3 makes 2"):
        load_config(None, ["loop.iterations=3", "prompts.target_pairs=[1,2,3]"]).check_run()
    assert load_config(None, ["prompts.target_pairs=[7]"]).prompts.target(2) == 7
    # Checkpoint selection holds out dpo.selection_prompts pairs' prompts: the pairs stage keeps that many more.
    sel = load_config(None, ["prompts.target_pairs=[7]", "dpo.eval_every=2", "dpo.selection_prompts=3"])
    assert selfreward.pairs_wanted(sel, 1) == 10 and selfreward.pairs_wanted(load_config(None, []), 1) == 0
    with pytest.raises(ConfigValueError, match=r"\+ dpo.selection_prompts=253 .* capped at 1000"):
        load_config(None, ["prompts.num_prompts=100", "prompts.target_pairs=[900]", "dpo.eval_every=200"]).check_run()


def test_next_block_sizes_from_the_yield():
    assert selfreward.next_block(100, 50, 80, 10_000, 8) == 100 + 66   # 30 missing at 0.5 per prompt, +10%
    assert selfreward.next_block(100, 99, 100, 10_000, 8) == 108       # at least one round
    assert selfreward.next_block(100, 0, 80, 500, 8) == 500            # no pair yet: at most the cap


@pytest.mark.parametrize("mode, stop_at_score, want", [("sampled", True, "score"), ("expected", True, "score_marker"),
                                                       ("sampled", False, None)])
def test_judge_stops_where_its_score_is_read(policy, cfg, monkeypatch, mode, stop_at_score, want):
    cfg.judge.mode, cfg.judge.stop_at_score = mode, stop_at_score
    seen = []

    def fake_generate(pol, reqs, *, num_samples, stop, **kw):
        seen.append(stop)
        return [[Completion([1], "yes.\nScore: 4", [0.0], "stop", 3)] * num_samples for _ in reqs]

    monkeypatch.setattr(backends, "generate", fake_generate)
    verdicts = judging.judge(policy, [[5, 6, 7]], cfg.judge, seed=0)
    assert seen == [want] and len(verdicts[0]) == (2 if mode == "sampled" else 1)
    if mode == "sampled":
        assert [v[1] for v in verdicts[0]] == [4.0, 4.0]
