"""jaxsr.selection: the decision rule on hand-made tallies, the held-out prompts, and the trainer hook's log,
early stop and replay on resume (answers and judge replies stubbed; the training is real)."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxsr
from jaxsr import objectives, selection, train
from jaxsr.config import SftSection
from jaxsr.evaluate import head_to_head
from jaxsr.model import make_mesh

LLAMA3 = Path(__file__).parent / "fixtures" / "hf" / "llama3"


@pytest.mark.parametrize("ab, ba, decision", [
    (["A", "A", "A", "B"], ["B", "B", "B", "A"], "select"),  # 3 wins, 1 loss: 0.75
    (["A", "B", "tie", None], ["B", "A", "tie", "A"], "keep"),  # 1 win, 1 loss, 2 ties: exactly 0.5
    (["A", "A", "B", "B"], ["A", "A", "A", "A"], "stop"),  # 2 losses, 2 inconsistent (ties): 0.25
])
def test_decide_on_hand_made_tallies(ab, ba, decision):
    assert selection.decide(head_to_head(ab, ba)["win_rate"]) == decision


def test_decide_rejects_a_rate_outside_0_1():
    with pytest.raises(ValueError, match="win rate 1.5 must lie in"):
        selection.decide(1.5)


def test_held_out_prompts_are_a_seeded_choice_left_out_of_training():
    pairs = [{"prompt": f"p{i // 2}", "chosen": "c", "rejected": str(i)} for i in range(20)]  # 10 prompts, 2 pairs each
    train_pairs, valid = selection.held_out(pairs, 3, seed=7)
    assert selection.held_out(pairs, 3, seed=7) == (train_pairs, valid)
    assert len(valid) == len(set(valid)) == 3 and selection.held_out(pairs, 3, seed=8)[1] != valid
    assert len(train_pairs) == 14 and not {p["prompt"] for p in train_pairs} & set(valid)
    with pytest.raises(ValueError, match="selection_prompts=10 holds out every one of the 10 prompts"):
        selection.held_out(pairs, 10, seed=7)


VERDICT = {"win": ("[[A]]", "[[B]]"), "tie": ("[[A]]", "[[A]]"), "loss": ("[[B]]", "[[A]]")}


def test_selector_selects_on_a_win_keeps_on_a_tie_stops_on_a_loss_and_replays_on_resume(tmp_path, monkeypatch):
    policy = jaxsr.load_policy(LLAMA3, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    prompts = ["one", "two"]
    script, judged, seen = ["win", "tie", "loss"], [], {}

    def answers(pol, ps, max_new_tokens, max_batch_rows, backend):
        assert max_batch_rows == 16  # the Selector's (sample.max_batch_rows in a run)
        return [f"answer {p}" for p in ps]

    monkeypatch.setattr(selection, "greedy_answers", answers)

    def judge(judge_policy, ps, a, b, max_new_tokens, template, max_batch_rows, backend):
        assert template == selection.PAIRWISE_TEMPLATE and max_batch_rows == 16  # the Selector's default template
        ab, ba = VERDICT[script[len(judged)]]
        judged.append(len(ps))
        return [ab] * len(ps), [ba] * len(ps), 0

    monkeypatch.setattr(selection, "judge_both_orders", judge)
    section = SftSection(lr=1e-3, batch_size=4, max_steps=8, dropout=0.0, max_length=64, keep_checkpoints=1)
    records = [{"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in ("apple", "river", "stone", "cloud")]

    def run():
        sel = selection.Selector(policy, prompts, tmp_path, max_new_tokens=4, judge_max_new_tokens=4, max_batch_rows=16)

        def hook(step, params):
            seen[step] = jax.tree.map(np.asarray, params)
            return sel(step, params)

        train.train_objective(objectives.sft_objective(section), policy, records, tmp_path, on_checkpoint=hook,
                              hook_every=2)
        return sel

    sel = run()
    assert judged == [2, 2, 2] and sorted(seen) == [2, 4, 6]  # step 6 lost: steps 7 and 8 never ran
    logged = json.loads((tmp_path / "selection.json").read_text())
    assert logged["prompts"] == prompts
    assert [(e["step"], e["decision"], e["selected"]) for e in logged["entries"]] == [
        (0, "select", True), (2, "select", True), (4, "keep", False), (6, "stop", False)]
    stats = sel.stats()
    assert stats["selected_step"] == 2 and stats["stopped_at"] == 6 and stats["prompts"] == 2
    assert [(e["step"], e["against"], e["wins"], e["ties"], e["losses"], e["win_rate"]) for e in stats["log"]] == [
        (2, 0, 2, 0, 0, 1.0), (4, 2, 0, 2, 0, 0.5), (6, 2, 0, 0, 2, 0.0)]
    assert sel.selected_dir() == tmp_path / "selected" / "step2"
    assert [p.name for p in (tmp_path / "selected").iterdir()] == ["step2"]
    chosen = jaxsr.load_policy(sel.selected_dir(), mesh=policy.mesh)
    for a, b in zip(jax.tree.leaves(chosen.params), jax.tree.leaves(seen[2])):
        np.testing.assert_array_equal(np.asarray(a), b)
    # Killed after the step-6 save, before the final model: the resumed run replays step 6 from the log.
    shutil.rmtree(tmp_path / "final")
    seen.clear()
    again = run()
    assert judged == [2, 2, 2] and sorted(seen) == [6]
    assert again.stats() == stats
