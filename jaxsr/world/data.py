"""The world's seed and evaluation data: IFT, EFT, eval, rm_eval and Self-Instruct seed prompts.

Everything is a pure function of ``seed``. Held-out instructions (``eval`` and ``rm_eval``) are drawn
first and their texts are excluded from the training splits, so evaluation never sees a prompt the
model was trained on. Rows are plain dicts (``world_records``) so the TFDS builder can use them
without importing ``datasets``; ``build_world`` wraps them as ``datasets.Dataset`` objects.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from ..judge import load_judge_template, render_judge_prompt, render_meta_prompt
from .tasks import Task, degraded_response, grade, judge_target, perfect_response, sample_task

SPLITS = ("ift", "eft", "eval", "rm_eval", "seed_prompts")
# The short judge prompt of this world (the paper's long one stays the default for real models); the
# path is what the `judge.template` config option takes.
WORLD_JUDGE_TEMPLATE_PATH = str(resources.files("jaxsr") / "templates" / "judge_world.txt")
WORLD_JUDGE_TEMPLATE = load_judge_template(WORLD_JUDGE_TEMPLATE_PATH)


def _rng(seed: int, stream: str) -> random.Random:
    # A str seed is hashed with SHA-512 by random.Random, so each split gets its own stable stream and
    # resizing one split does not reshuffle the others.
    return random.Random(f"jaxsr-world/{seed}/{stream}")


def _unique_tasks(rng: random.Random, n: int, exclude: set[str]) -> list[Task]:
    tasks: list[Task] = []
    seen = set(exclude)
    while len(tasks) < n:
        task = sample_task(rng)
        if task.instruction not in seen:
            seen.add(task.instruction)
            tasks.append(task)
    return tasks


def _train_task(rng: random.Random, held_out: set[str]) -> Task:
    while True:
        task = sample_task(rng)
        if task.instruction not in held_out:
            return task


def eval_reference_rankings(tasks: list[Task], rng: random.Random, num_candidates: int = 4) -> list[dict]:
    """Per task, ``num_candidates`` responses with distinct ground-truth scores (no ties to rank)."""
    if not 2 <= num_candidates <= 6:
        raise ValueError(f"num_candidates must be in 2..6 (one per distinct score 0..5), got {num_candidates}")
    rows = []
    for task in tasks:
        levels = rng.sample(range(6), num_candidates)
        candidates = [degraded_response(task, rng, level) for level in levels]
        rows.append({"instruction": task.instruction, "spec": json.dumps(task.spec, sort_keys=True),
                     "candidates": candidates, "scores": [grade(task, c)[0] for c in candidates]})
    return rows


def eft_row(task: Task, candidate: str, template: str = WORLD_JUDGE_TEMPLATE, words: bool = False) -> dict:
    """One EFT example: the judge request as the prompt, the rubric judgement as the response (`words`: with the
    topic of each list word first, `judge_target`)."""
    return {"prompt": render_judge_prompt(template, task.instruction, candidate),
            "response": judge_target(task, candidate, words), "instruction": task.instruction,
            "candidate": candidate, "score": grade(task, candidate)[0], "spec": json.dumps(task.spec, sort_keys=True)}


def meta_eft_row(task: Task, rng: random.Random, template: str = WORLD_JUDGE_TEMPLATE, words: bool = False) -> dict:
    """One meta-judge training example (Meta-Rewarding, jaxsr.metareward): a response, its right judgement and the
    judgement of another response to the same task (a wrong score), in a random order; the target names the right
    one in the meta-judge's format."""
    level = rng.randrange(6)
    candidate = degraded_response(task, rng, level)
    right = judge_target(task, candidate, words)
    wrong = judge_target(task, degraded_response(task, rng, rng.choice([x for x in range(6) if x != level])), words)
    right_first = rng.random() < 0.5
    a, b = (right, wrong) if right_first else (wrong, right)
    return {"prompt": render_meta_prompt(template, task.instruction, candidate, a, b),
            "response": f"Winner: Judgement {'A' if right_first else 'B'}", "instruction": task.instruction,
            "candidate": candidate, "score": grade(task, candidate)[0], "spec": json.dumps(task.spec, sort_keys=True)}


def world_records(seed: int = 0, num_ift: int = 2000, num_eft: int = 2000, num_eval: int = 200,
                  num_rm_eval: int = 100, num_candidates: int = 4, num_meta_eft: int = 0,
                  judge_words: bool = False) -> dict[str, list[dict]]:
    """All splits as lists of dicts (see SPLITS and docs/world.md for the columns). `judge_words`: the EFT
    judgements name each list word's topic first (`judge_target(..., words=True)`)."""
    eval_tasks = _unique_tasks(_rng(seed, "eval"), num_eval, set())
    rm_tasks = _unique_tasks(_rng(seed, "rm_eval"), num_rm_eval, {t.instruction for t in eval_tasks})
    held_out = {t.instruction for t in eval_tasks + rm_tasks}

    rng = _rng(seed, "ift")
    ift = []
    for _ in range(num_ift):
        task = _train_task(rng, held_out)
        ift.append({"prompt": task.instruction, "response": perfect_response(task, rng),
                    "spec": json.dumps(task.spec, sort_keys=True)})

    # Scores drawn uniformly over 0..5, as the paper rebalances its EFT scores (PAPER.md §3).
    rng = _rng(seed, "eft")
    eft = []
    for _ in range(num_eft):
        task = _train_task(rng, held_out)
        eft.append(eft_row(task, degraded_response(task, rng, rng.randrange(6)), words=judge_words))
    # Meta-judge rows (the world option meta_eft) from their own stream: the other splits stay as they were.
    rng = _rng(seed, "meta_eft")
    eft += [meta_eft_row(_train_task(rng, held_out), rng, words=judge_words) for _ in range(num_meta_eft)]

    seed_prompts = list(dict.fromkeys(r["prompt"] for r in ift))
    return {
        "ift": ift,
        "eft": eft,
        "eval": [{"instruction": t.instruction, "spec": json.dumps(t.spec, sort_keys=True)} for t in eval_tasks],
        "rm_eval": eval_reference_rankings(rm_tasks, _rng(seed, "rm_eval_candidates"), num_candidates),
        "seed_prompts": [{"prompt": p} for p in seed_prompts],
    }


def build_world(seed: int = 0, **sizes) -> dict:
    """``world_records`` as ``datasets.Dataset`` objects, keyed by split name."""
    from datasets import Dataset

    return {name: Dataset.from_list(rows) for name, rows in world_records(seed, **sizes).items()}


def save_world(out_dir, seed: int = 0, **sizes) -> Path:
    """Write every split as ``out_dir/<split>/`` (save_to_disk) and ``out_dir/<split>.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, ds in build_world(seed, **sizes).items():
        ds.save_to_disk(str(out / name))
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in ds:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def new_instructions(seed: int, stream: str, n: int, held_out: set[str]) -> list[str]:
    """`n` fresh instructions from the world's task distribution, never one of `held_out` (the eval sets).

    The world's stand-in for the paper's fixed prompt generator (`prompts.generator: world`): the tiny model is
    not trained to write instructions, so Self-Instruct with M_t would give it nonsense to answer.
    """
    return [t.instruction for t in new_tasks(seed, stream, n, held_out)]


def new_tasks(seed: int, stream: str, n: int, held_out: set[str]) -> list[Task]:
    """The tasks behind `new_instructions(seed, stream, n, held_out)`, with their specs (the controls' grader)."""
    rng = _rng(seed, f"new/{stream}")
    return [_train_task(rng, held_out) for _ in range(n)]
