"""EFT from the policy's own answers (eft.policy_prompts): the SFT baseline answers fresh prompts, the environment
grades each answer into a judgement in its judge format, and the rows join M1's SFT data."""

import json

import pytest

from jaxsr import artifacts
from jaxsr.config import CONFIG_DIR, ConfigValueError, load_config
from jaxsr.eft_answers import check_environment
from jaxsr.envs import Environment
from jaxsr.envs.world import World
from jaxsr.judge import parse_score, render_judge_prompt
from jaxsr.world.data import WORLD_JUDGE_TEMPLATE, new_instructions, new_tasks
from jaxsr.world.tasks import grade, judge_target

from test_loop import MICRO


def test_world_judges_the_prompts_its_sampler_generated():
    held = {"never"}
    judge = World().prompt_judge(7, ["s"], 6, held)
    tasks = new_tasks(7, "s", 6, held)
    assert [t.instruction for t in tasks] == new_instructions(7, "s", 6, held)
    for task, response in zip(tasks, ["", "1. apple\n2. pear", "RED, BLUE", "Sure:\nhammer\nsaw", "x", "lion."]):
        score, text = judge(task.instruction, response)
        assert score == grade(task, response)[0]
        assert text == judge_target(task, response)
        assert parse_score(text) == score
    with pytest.raises(KeyError):
        judge("an instruction it never generated", "x")


def test_an_environment_without_a_prompt_judge_is_a_config_error():
    class NoJudge(Environment):
        name = "nojudge"

        def new_prompts(self, seed, stream, n, held_out):
            return ["a"] * n

    with pytest.raises(ConfigValueError, match=r"eft.policy_prompts > 0 needs .*prompt_judge.*'nojudge'"):
        check_environment(NoJudge())
    check_environment(World())
    with pytest.raises(ConfigValueError, match=r"eft.policy_prompts=-1 must be >= 0"):
        load_config(CONFIG_DIR / "tiny.yaml", ["eft.policy_prompts=-1"])


def test_baseline_answers_become_judge_rows_in_m1_sft(tmp_path):
    from jaxsr.loop import run

    run_dir = tmp_path / "run"
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"run_dir={run_dir}", *MICRO, "eft.policy_prompts=6",
                                                 "eft.rebalance=false"])
    cfg.check_run()
    with pytest.raises(SystemExit, match="stopped after stage sft"):
        run(cfg, stop_after="sft")
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(stages) == ["data", "sft_baseline", "eft_answers", "sft"]
    assert "eft_answers" in stages["sft"]["inputs"]
    answers = artifacts.read_dataset(run_dir / "iteration0/eft_answers/answers").to_list()
    eft = artifacts.read_dataset(run_dir / "iteration0/eft_answers/eft").to_list()
    assert len(answers) == len(eft) == 6 * cfg.sample.num_samples
    tasks = {t.instruction: t for t in new_tasks(stages_seed(cfg), "eft_answers", 6, held_out(run_dir))}
    for a, e in zip(answers, eft):
        task = tasks[a["instruction"]]  # a fresh prompt of the world's sampler, never an eval instruction
        assert a["score"] == grade(task, a["candidate"])[0] == e["score"]
        assert e["response"] == judge_target(task, a["candidate"])
        assert e["prompt"] == render_judge_prompt(WORLD_JUDGE_TEMPLATE, a["instruction"], a["candidate"])
    stats = json.loads((run_dir / "iteration0/eft_answers/stats.json").read_text())
    assert stats["answers"] == stats["eft"] == 12 and stats["prompts"] == 6


def stages_seed(cfg):
    from jaxsr.stages import stage_seed

    return stage_seed(cfg.seed, 0, "eft_answers")


def held_out(run_dir):
    held = set()
    for split in ("eval", "rm_eval"):
        held |= set(artifacts.read_dataset(run_dir / "data" / split)["instruction"])
    return held
