"""The built-in verifiable instruction-following world (docs/world.md).

Small enough that a ~1-3M-parameter decoder learns it on a laptop CPU in minutes, and graded exactly,
so a self-rewarding run can be checked against ground truth at every iteration.
"""

from __future__ import annotations

from pathlib import Path

from .data import (
    SPLITS, WORLD_JUDGE_TEMPLATE, WORLD_JUDGE_TEMPLATE_PATH, build_world, eft_row, eval_reference_rankings,
    save_world, world_records,
)
from .tasks import (
    CRITERIA, TOPICS, Task, criteria, degraded_response, grade, judge_target, perfect_response, render_instruction,
    sample_task,
)

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"


def load_tokenizer(path=TOKENIZER_DIR):
    """The world's committed tokenizer (scripts/make_world_tokenizer.py) via AutoTokenizer."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; run scripts/make_world_tokenizer.py to create it")
    return AutoTokenizer.from_pretrained(str(path))


__all__ = [
    "CRITERIA", "SPLITS", "TOKENIZER_DIR", "TOPICS", "Task", "WORLD_JUDGE_TEMPLATE", "WORLD_JUDGE_TEMPLATE_PATH",
    "build_world", "criteria", "degraded_response", "eft_row", "eval_reference_rankings", "grade", "judge_target",
    "load_tokenizer", "perfect_response", "render_instruction", "sample_task", "save_world", "world_records",
]
