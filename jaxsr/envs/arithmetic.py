"""An example environment (docs/architecture.md): seed data, a prompt source, a grader and report columns in one
module with a `register`. Adds two numbers; reuses the world's tokenizer, which spells digits."""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

from . import Environment, register

JUDGE_TEMPLATE = ("Check the answer. Score: 5 if it is the right number, else 0.\n"
                  "Question: <INSTRUCTION_HERE>\nAnswer: <RESPONSE_HERE>")
_NUMBER = re.compile(r"-?\d+")


@register
class Arithmetic(Environment):
    """Questions "What is a + b?", graded 1 when the first number in the answer is the sum."""

    name = "arithmetic"
    report_columns = (("accuracy", "accuracy", "{:.1%}"),)
    eft_in_own_judge_template = True  # seed_data renders EFT prompts with JUDGE_TEMPLATE

    @dataclasses.dataclass
    class Options:
        """`train` questions for IFT and as many graded answers for EFT; `held_out` for eval and half as many for
        rm_eval; operands drawn from 0..max_operand."""

        train: int = 200
        held_out: int = 50
        max_operand: int = 20

    def _question(self, rng: random.Random) -> tuple[str, int]:
        a, b = rng.randint(0, self.options.max_operand), rng.randint(0, self.options.max_operand)
        return f"What is {a} + {b}?", a + b

    def seed_data(self, seed: int) -> dict[str, list[dict]]:
        rng, o = random.Random(f"arithmetic/{seed}"), self.options
        held = [self._question(rng) for _ in range(o.held_out + o.held_out // 2)]
        held_out = {q for q, _ in held}
        train = []
        while len(train) < 2 * o.train:
            q, ans = self._question(rng)
            if q not in held_out:
                train.append((q, ans))
        ift = [{"prompt": q, "response": str(ans)} for q, ans in train[:o.train]]
        eft = []
        for q, ans in train[o.train:]:
            given = ans if rng.random() < 0.5 else ans + rng.choice((-2, -1, 1, 2))
            eft.append({"prompt": JUDGE_TEMPLATE.replace("<INSTRUCTION_HERE>", q).replace("<RESPONSE_HERE>", str(given)),
                        "response": f"Score: {5 if given == ans else 0}"})
        rm_eval = [{"instruction": q, "candidates": [str(ans), str(ans + 1)], "scores": [5.0, 0.0]}
                   for q, ans in held[o.held_out:]]
        return {"ift": ift, "eft": eft, "seed_prompts": [{"prompt": r["prompt"]} for r in ift],
                "eval": [{"instruction": q, "answer": ans} for q, ans in held[:o.held_out]], "rm_eval": rm_eval}

    def new_prompts(self, seed: int, stream: str, n: int, held_out: set[str]) -> list[str]:
        rng, out = random.Random(f"arithmetic/{seed}/{stream}"), []
        while len(out) < n:
            q, _ = self._question(rng)
            if q not in held_out:
                out.append(q)
        return out

    def grade(self, row: dict, response: str) -> float:
        found = _NUMBER.search(response)
        return float(found is not None and int(found.group()) == row["answer"])

    def eval_metrics(self, scores: Sequence[float]) -> dict:
        return {"accuracy": sum(scores) / len(scores) if scores else None}

    def tokenizer(self):
        from ..world import load_tokenizer

        return load_tokenizer()

    def judge_template(self) -> str:
        return JUDGE_TEMPLATE
