"""DPO checkpoint selection (paper §3.1.3): every `dpo.eval_every` steps the current params play the selected
checkpoint head-to-head on held-out prompts; a win selects them, a loss stops training (docs/training.md).

`decide` is the rule on a tally; `held_out` splits the validation prompts off the pairs; `Selector` is the
trainer's `on_checkpoint` hook. Its log, work_dir/selection.json, is its whole state: a resumed run answers the
steps already logged from it and never judges them again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from . import artifacts, distributed
from .evaluate import PAIRWISE_TEMPLATE
from .backends import Backend, builtin
from .headtohead import greedy_answers, judge_both_orders, tally
from .policy import Policy, save_checkpoint
from .sample import DEFAULT_MAX_BATCH_ROWS

log = logging.getLogger(__name__)

LOG_FILE = "selection.json"


def decide(win_rate: float) -> str:
    """What a checkpoint's win rate against the selected one means: "select" above 0.5 (it becomes the selected
    checkpoint, training goes on), "stop" below 0.5 (training ends; the selected checkpoint stays), "keep" at
    exactly 0.5 (no evidence either way: the selected checkpoint stays and training goes on)."""
    if not 0.0 <= win_rate <= 1.0:
        raise ValueError(f"win rate {win_rate!r} must lie in [0, 1]")
    return "select" if win_rate > 0.5 else "stop" if win_rate < 0.5 else "keep"


def held_out(pairs: Sequence[dict], n: int, seed: int) -> tuple[list[dict], list[str]]:
    """(the pairs DPO trains on, the n validation prompts): a seeded choice of n distinct prompts of the pairs,
    whose pairs are left out of training."""
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
    if n >= len(prompts):
        raise ValueError(f"dpo.selection_prompts={n} holds out every one of the {len(prompts)} prompts of the pairs, "
                         f"leaving DPO nothing to train on; lower dpo.selection_prompts or generate more prompts")
    chosen = sorted(np.random.default_rng(seed).choice(len(prompts), n, replace=False))
    valid = [prompts[i] for i in chosen]
    held = set(valid)
    return [p for p in pairs if p["prompt"] not in held], valid


class Selector:
    """`on_checkpoint(step, params) -> "continue" | "stop"` for `train_dpo`: the params at `step` against the
    selected checkpoint (first `base`, M_t) on `prompts`, greedy answers judged in both orders by `judge`
    (default `base`), sampled through `backend` (default: the built-in sampler). A selected step's params are saved
    in work_dir/selected/step<k>; only the newest is kept.
    """

    def __init__(self, base: Policy, prompts: Sequence[str], work_dir, *, max_new_tokens: int,
                 judge_max_new_tokens: int, judge: Policy | None = None, template: str = PAIRWISE_TEMPLATE,
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, backend: Backend | None = None):
        self.base, self.prompts, self.judge, self.template = base, list(prompts), judge or base, template
        self.max_batch_rows, self.backend = max_batch_rows, builtin() if backend is None else backend
        self.max_new_tokens, self.judge_max_new_tokens = max_new_tokens, judge_max_new_tokens
        self.work_dir = Path(work_dir).absolute()
        self.path = self.work_dir / LOG_FILE
        self.entries: list[dict] = []
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved["prompts"] != self.prompts:
                raise ValueError(f"{self.path} was written for other validation prompts; resume with the same pairs "
                                 f"and dpo.selection_prompts, or use a new work directory")
            self.entries = saved["entries"]

    @property
    def selected(self) -> dict | None:
        """The log entry of the selected checkpoint (step 0 is M_t), None before the first evaluation."""
        return next((e for e in reversed(self.entries) if e["selected"]), None)

    def selected_dir(self) -> Path | None:
        """The params-only checkpoint of the selected step; None when M_t is still the selected model."""
        e = self.selected
        return None if e is None or e["step"] == 0 else self.work_dir / "selected" / f"step{e['step']}"

    def __call__(self, step: int, params) -> str:
        done = next((e for e in self.entries if e["step"] == step), None)
        if done is None:
            done = self._evaluate(step, params)
        return "stop" if done["decision"] == "stop" else "continue"

    def _evaluate(self, step: int, params) -> dict:
        if self.selected is None:  # M_t's answers, once: every later checkpoint is compared with stored answers
            self.entries.append({"step": 0, "decision": "select", "selected": True,
                                 "answers": self._answers(self.base)})
        prev = self.selected
        answers = self._answers(self.base.with_params(params))
        texts_ab, texts_ba, _ = judge_both_orders(self.judge, self.prompts, answers, prev["answers"],
                                                  max_new_tokens=self.judge_max_new_tokens, template=self.template,
                                                  max_batch_rows=self.max_batch_rows, backend=self.backend)
        t = tally(texts_ab, texts_ba)
        decision = decide(t["win_rate"])
        entry = {"step": step, "against": prev["step"], "wins": t["wins"], "ties": t["ties"], "losses": t["losses"],
                 "n": t["n"], "win_rate": t["win_rate"], "win_rate_ci95": t["win_rate_ci95"], "decision": decision,
                 "selected": decision == "select", "answers": answers}
        if entry["selected"]:
            out = self.work_dir / "selected" / f"step{step}"
            if out.exists() and distributed.is_primary():
                shutil.rmtree(out)  # a save cut short by a kill before its log entry
            save_checkpoint(self.base.with_params(params), out, extra={"selected_step": step})
        self.entries.append(entry)
        artifacts.write_json_atomic(self.path, {"prompts": self.prompts, "entries": self.entries})
        if entry["selected"] and distributed.is_primary():
            for old in (self.work_dir / "selected").iterdir():
                if old != out:
                    shutil.rmtree(old)
        self.judge.release_decode()  # training resumes and needs the memory; made again at the next evaluation
        log.info("selection step %d vs step %d: %d/%d/%d (win rate %.3f) -> %s", step, prev["step"], t["wins"],
                 t["ties"], t["losses"], t["win_rate"], decision)
        return entry

    def _answers(self, policy: Policy) -> list[str]:
        # One decode copy on the devices at a time (beside the training state): M_t's goes before the
        # checkpoint's is made, and the judge makes its own after both.
        try:
            return greedy_answers(policy, self.prompts, max_new_tokens=self.max_new_tokens,
                                  max_batch_rows=self.max_batch_rows, backend=self.backend)
        finally:
            policy.release_decode()

    def stats(self) -> dict:
        """The log without the answers, for the stage's stats (manifest and report)."""
        sel, stop = self.selected, next((e["step"] for e in self.entries if e["decision"] == "stop"), None)
        return {"prompts": len(self.prompts), "selected_step": sel and sel["step"], "stopped_at": stop,
                "log": [{k: v for k, v in e.items() if k != "answers"} for e in self.entries if e["step"]]}
