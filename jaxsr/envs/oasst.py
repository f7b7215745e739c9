"""Open Assistant seeds (paper §3.1.1): IFT from rank-0 first-turn replies, ranked replies for the judge."""

from __future__ import annotations

import dataclasses

from . import Environment, register


@dataclasses.dataclass
class OasstOptions:
    """`path`: hub name or local directory / file of the oasst1 message table (parquet or JSON lines); `num_ift`: cap
    on IFT examples (paper: 3,200 first turns); `eft_path`: optional JSONL / HF-datasets EFT {prompt, response}."""

    path: str = "OpenAssistant/oasst1"
    num_ift: int = 3200
    eft_path: str = ""


@register
class OpenAssistant(Environment):
    name = "oasst"
    Options = OasstOptions

    def seed_data(self, seed: int) -> dict[str, list[dict]]:
        from ..data import load_sft
        from ..oasst import build_oasst_seeds

        seeds = build_oasst_seeds(self.options.path, num_ift=self.options.num_ift)
        ift = seeds["ift"].select_columns(["prompt", "response"]).to_list()
        out = {"ift": ift, "rm_eval": seeds["rm_eval"].to_list(), "seed_prompts": [{"prompt": r["prompt"]} for r in ift],
               "eft_source": seeds["eft_train"].to_list()}  # what data.build_eft judges (jaxsr/eft.py)
        if self.options.eft_path:
            out["eft"] = load_sft(self.options.eft_path)
        return out
