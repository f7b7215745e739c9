"""Seed data from your own files: JSONL or Hugging Face datasets directories (jaxsr.data.read_records)."""

from __future__ import annotations

import dataclasses

from ..config import ConfigValueError
from . import Environment, register


@register
class Files(Environment):
    """IFT (and EFT) records and seed prompts read from files; no grader, no evaluation sets."""

    name = "files"
    has_eval_prompts = False

    @dataclasses.dataclass
    class Options:
        """Attributes:
          ift_path: {prompt, response} records for SFT (required).
          eft_path: optional {prompt, response} judge-training records.
          prompts_path: records whose `prompt` column seeds Self-Instruct (default: the IFT prompts).
        """

        ift_path: str = ""
        eft_path: str = ""
        prompts_path: str = ""

    def seed_data(self, seed: int) -> dict[str, list[dict]]:
        from ..data import load_sft

        o = self.options
        if not o.ift_path:
            raise ConfigValueError("data.source=files needs data.options.ift_path (JSONL or HF-datasets directory)")
        out = {"ift": load_sft(o.ift_path)}
        if o.eft_path:
            out["eft"] = load_sft(o.eft_path)
        out["seed_prompts"] = [{"prompt": r["prompt"]} for r in load_sft(o.prompts_path or o.ift_path)]
        return out
