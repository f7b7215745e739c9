"""The control experiments on the same candidates (pairs.control: random, oracle), the pairs' true quality in the
stats, the world's grader of its generated prompts, and the report's fixed plot axes."""

import pytest

from jaxsr import artifacts, selfreward
from jaxsr.config import CONFIG_DIR, ConfigValueError, load_config
from jaxsr.envs.world import World
from jaxsr.report import axis_range
from jaxsr.world.data import new_instructions

# Per prompt, the judge's scores and the ground truth of candidates 0..2.
JUDGE = {0: [5, 1, 3], 1: [2, 4, 4], 2: [0, 3, 5], 3: [4, 4, 4], 4: [1, 5, 2], 5: [3, 0, 1]}
TRUTH = {0: [1, 4, 2], 1: [3, 1, 5], 2: [0, 2, 4], 3: [5, 0, 3], 4: [1, 5, 1], 5: [2, 2, 2]}


def _write(tmp_path):
    cands = artifacts.ShardedWriter(tmp_path / "c", shard_size=100)
    judged = artifacts.ShardedWriter(tmp_path / "j", shard_size=100)
    for pid, scores in JUDGE.items():
        for j, s in enumerate(scores):
            cands.append({"prompt_id": pid, "prompt": f"p{pid}", "candidate_id": j, "response": f"r{pid}-{j}",
                          "num_tokens": 3, "finish_reason": "eos"})
            judged.append({"prompt_id": pid, "candidate_id": j, "judge_id": 0, "judge_text": "", "score": float(s),
                           "digit_mass": [], "response_truncated": False, "excluded": False})
    cands.finalize()
    judged.finalize()


def truth(prompt, response):
    pid, j = map(int, response[1:].split("-"))
    return float(TRUTH[pid][j])


def _pairs(tmp_path, control, name):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"pairs.control={control}"] if control else [])
    stats = selfreward.build_pairs(None, tmp_path / "c", tmp_path / "j", tmp_path / name, cfg, 1, truth=truth,
                                   reference_fn=lambda pol, prs, c: ([-1.0] * len(prs), [-2.0] * len(prs)))
    return stats, [(p["prompt_id"], p["chosen"], p["rejected"]) for p in artifacts.read_dataset(tmp_path / name)]


def test_self_pairs_count_truly_better_and_worse(tmp_path):
    _write(tmp_path)
    stats, pairs = _pairs(tmp_path, "", "self")
    # Judge best vs worst: p0 r0>r1 (truth 1<4: worse), p1 r1>r0 (1<3: worse; r1 before r2 on the tie),
    # p2 r2>r0 (4>0: better), p4 r1>r0 (5>1: better), p5 r0>r1 (2=2: neither); p3 all tied: no pair.
    assert [p[0] for p in pairs] == [0, 1, 2, 4, 5]
    assert stats["truly_better"] == 2 / 5 and stats["truly_worse"] == 2 / 5 and "control" not in stats


def test_random_control_orients_the_same_pairs_by_a_seeded_coin(tmp_path):
    _write(tmp_path)
    _, self_pairs = _pairs(tmp_path, "", "self")
    stats, rand = _pairs(tmp_path, "random", "random")
    assert stats["control"] == "random"
    assert [(p, {c, r}) for p, c, r in rand] == [(p, {c, r}) for p, c, r in self_pairs]  # the same pairs
    flipped = sum(a[1] != b[1] for a, b in zip(rand, self_pairs))
    assert 0 < flipped < len(rand)  # this seed flips some, not all (a coin per pair)
    assert _pairs(tmp_path, "random", "random2")[1] == rand  # seeded by (run seed, iteration)


def test_oracle_control_pairs_best_vs_worst_by_the_ground_truth(tmp_path):
    _write(tmp_path)
    stats, pairs = _pairs(tmp_path, "oracle", "oracle")
    assert pairs == [(0, "r0-1", "r0-0"), (1, "r1-2", "r1-1"), (2, "r2-2", "r2-0"), (3, "r3-0", "r3-1"),
                     (4, "r4-1", "r4-0")]  # p5: all equal in truth, no pair
    assert stats["truly_better"] == 1.0 and stats["truly_worse"] == 0.0
    with pytest.raises(ValueError, match="oracle needs the environment's ground-truth grader"):
        selfreward.build_pairs(None, tmp_path / "c", tmp_path / "j", tmp_path / "x",
                               load_config(CONFIG_DIR / "tiny.yaml", ["pairs.control=oracle"]), 1)


def test_world_grades_the_prompts_its_sampler_generated():
    held = {"never"}
    streams = ["1/0", "1/1"]
    grader = World().prompt_grader(123, streams, 8, held)
    prompts = [p for s in streams for p in new_instructions(123, s, 8, held)]
    for p in prompts:
        assert 0.0 <= grader(p, "1. apple\n2. pear") <= 5.0
    with pytest.raises(KeyError):
        grader("an instruction it never generated", "x")


def test_control_needs_an_environment_that_grades_its_prompts():
    load_config(CONFIG_DIR / "tiny.yaml", ["pairs.control=oracle"]).check_run()
    with pytest.raises(ConfigValueError, match=r"pairs.control='random' needs the ground truth.*prompts.generator=''"):
        load_config(CONFIG_DIR / "tiny.yaml", ["pairs.control=random", "prompts.generator=''"]).check_run()
    with pytest.raises(ConfigValueError, match=r"pairs.control='best' is not allowed"):
        load_config(CONFIG_DIR / "tiny.yaml", ["pairs.control=best"])


def test_plot_axes_are_fixed():
    assert axis_range("world_score", [3.47, 3.55], {"world_score": (0.0, 5.0)}) == (0.0, 5.0)
    assert axis_range("judge_pairwise_accuracy", [0.67, 0.70]) == (0.5, 1.0)
    assert axis_range("judge_pairwise_accuracy", [0.25, 0.9]) == (0.25, 1.0)  # widened only to show a low value
    assert axis_range("pairs", [990, 1000]) == (0.0, 1100.0)
