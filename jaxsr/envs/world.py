"""The built-in verifiable instruction-following world (jaxsr/world, docs/world.md) as an environment."""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from . import Environment, register


@register
class World(Environment):
    """The world of docs/world.md: list-writing tasks graded by their five criteria."""

    name = "world"
    report_columns = (("world_score", "world score (0-5)", "{:.2f}"), ("world_perfect", "perfect", "{:.1%}"))
    report_axes = {"world_score": (0.0, 5.0), "world_perfect": (0.0, 1.0)}
    only_from_scratch = "the built-in world's data is for from-scratch tiny models"
    eft_in_own_judge_template = True  # world.data.eft_row renders WORLD_JUDGE_TEMPLATE

    @dataclasses.dataclass
    class Options:
        """Sizes of the world's splits (all seeded by the run's seed).

        Attributes:
          ift / eft: SFT examples (perfect answers) and judge-training examples (graded degraded answers).
          eval: held-out instructions for the world score; rm_eval: held-out ranked candidates for the judge.
          meta_eft: meta-judge examples added to EFT (which of two judgements of a response is right), so that
            Meta-Rewarding's meta-judge (meta.enabled) is trained on the format it is asked in.
          judge_words: every EFT judgement (the seed's and `eft.policy_prompts`') first names the topic of each
            list word of the response (`words: lion animals, ship vehicles.`), then the criteria and the score:
            the judge's worked reasoning, as the paper's judge justifies its score before giving it.
        """

        ift: int = 2000
        eft: int = 2000
        eval: int = 200
        rm_eval: int = 100
        meta_eft: int = 0
        judge_words: bool = False

    def seed_data(self, seed: int) -> dict[str, list[dict]]:
        from ..world.data import world_records

        o = self.options
        return world_records(seed=seed, num_ift=o.ift, num_eft=o.eft, num_eval=o.eval, num_rm_eval=o.rm_eval,
                             num_meta_eft=o.meta_eft, judge_words=o.judge_words)

    def new_prompts(self, seed: int, stream: str, n: int, held_out: set[str]) -> list[str]:
        # The tiny model is not trained to write instructions, so the world's task sampler plays the paper's
        # fixed prompt generator.
        from ..world.data import new_instructions

        return new_instructions(seed, stream, n, held_out)

    def prompt_grader(self, seed: int, streams: Sequence[str], n: int, held_out: set[str]):
        from ..world.data import new_tasks
        from ..world.tasks import grade

        specs = {t.instruction: t.spec for stream in streams for t in new_tasks(seed, stream, n, held_out)}
        return lambda prompt, response: float(grade(specs[prompt], response)[0])

    def prompt_judge(self, seed: int, streams: Sequence[str], n: int, held_out: set[str]):
        from ..world.data import new_tasks
        from ..world.tasks import grade, judge_target

        specs = {t.instruction: t.spec for stream in streams for t in new_tasks(seed, stream, n, held_out)}
        words = self.options.judge_words
        return lambda prompt, response: (float(grade(specs[prompt], response)[0]),
                                         judge_target(specs[prompt], response, words))

    def grade(self, row: dict, response: str) -> float:
        from ..world.tasks import grade

        return grade(json.loads(row["spec"]), response)[0]

    def eval_metrics(self, scores: Sequence[float]) -> dict:
        from ..evaluate import world_metrics

        return world_metrics(scores)

    def tokenizer(self):
        from ..world import load_tokenizer

        return load_tokenizer()

    def judge_template(self) -> str:
        from ..world.data import WORLD_JUDGE_TEMPLATE

        return WORLD_JUDGE_TEMPLATE
