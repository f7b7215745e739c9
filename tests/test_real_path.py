"""The users' real path at micro scale: configs/paper_llama2_70b.yaml with size overrides, on a tiny HF-format Llama
with a real BPE tokenizer and the Open Assistant fixture, through every stage of `jaxsr run` (EFT building,
checkpoint selection, head-to-head), its resume and its rerun."""

import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsr import artifacts
from jaxsr.config import load_config
from test_loop import _kill_when

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "paper_llama2_70b.yaml"
FIXTURES = ROOT / "tests" / "fixtures"

STAGES = ["data", "sft_baseline", "eft_judge", "eft_build", "baseline_eval", "sft", "eval/M1",
          "iteration1/prompts", "iteration1/candidates", "iteration1/judgements", "iteration1/pairs",
          "iteration1/dpo", "eval/M2", "h2h/M2", "report"]


def _model_dir(tmp_path):
    """A copy of the tiny Llama 2 fixture as a base model: no chat template, as Llama-2-70b-hf has none."""
    out = tmp_path / "llama2_base"
    if not out.exists():
        shutil.copytree(FIXTURES / "hf" / "llama2", out)
        (out / "chat_template.jinja").unlink()
    return out


def _overrides(tmp_path, run_dir):
    model = _model_dir(tmp_path)
    # The fixture's context is 128 positions and an HF model's max_position_embeddings cannot be overridden, so the
    # paper's Fig. 2 judge template (~990 tokens) cannot fit: a short template with the same two slots stands in.
    template = tmp_path / "judge.txt"
    template.write_text("Rate the reply 1-5.\nQ: <INSTRUCTION_HERE>\nA: <RESPONSE_HERE>\nScore:")
    # Likewise jaxsr's pairwise prompt (head-to-head, checkpoint selection), ~390 of the fixture's tokens.
    pairwise = tmp_path / "pairwise.txt"
    pairwise.write_text("Q: <INSTRUCTION_HERE>\nA: <OUTPUT_A_HERE>\nB: <OUTPUT_B_HERE>\nBetter, [[A]] or [[B]]?")
    return [
        # seed 1: one of the untrained baseline's 4 judgement sets agrees with the human ranking, so data/eft is
        # not empty (seeds 2-4 keep none)
        "seed=1", f"run_dir={run_dir}", f"model.path={model}", f"prompts.generator={FIXTURES / 'hf' / 'llama2'}",
        "model.dtype=float32", "model.remat=none", "mesh.data=null", "mesh.fsdp=null", "mesh.tensor=null",
        f"data.options.path={FIXTURES / 'oasst' / 'messages.parquet'}",
        "loop.iterations=2", "loop.head_to_head=true", "loop.eval_max_new_tokens=4",
        # A pairs target: 4 prompts in the first block, more until 5 training pairs + 2 held out for selection.
        "prompts.num_prompts=4", "prompts.target_pairs=[5]", "prompts.max_prompts=12",
        "prompts.num_seed_shots=2", "prompts.num_generated_shots=1",
        "prompts.max_new_tokens=16", "prompts.requests_per_round=8", "prompts.max_rounds=8", "prompts.min_words=1",
        "sample.num_samples=2", "sample.max_new_tokens=8",
        f"judge.template={template}", f"judge.pairwise_template={pairwise}",
        "judge.mode=expected", "judge.max_new_tokens=4",
        "sft.batch_size=2", "sft.max_steps=2", "sft.max_length=96", "sft.dropout=0.0",
        "dpo.batch_size=2", "dpo.max_steps=2", "dpo.max_length=96", "dpo.dropout=0.0",
        "dpo.checkpoint_every=1", "dpo.eval_every=1", "dpo.selection_prompts=2",
    ]


def _config(tmp_path, run_dir):
    return load_config(CONFIG, _overrides(tmp_path, run_dir))


def _killed_when(tmp_path, run_dir, condition):
    """`jaxsr run` in a subprocess, SIGKILLed as soon as `condition(run_dir)` holds; whether it was."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")  # as conftest
    cmd = [sys.executable, "-m", "jaxsr.cli", "run", "--config", str(CONFIG), *_overrides(tmp_path, run_dir)]
    return _kill_when(run_dir, condition, cmd=cmd, env=env)


def _stages(run_dir):
    return _manifest(run_dir)["stages"] if (run_dir / "manifest.json").is_file() else {}


def _during_eft_judging(run_dir):
    return "sft_baseline" in _stages(run_dir)


def _during_selection(run_dir):
    """DPO has evaluated its first checkpoint (jaxsr.selection's log) and not finished."""
    return (run_dir / "train" / "dpo1" / "selection.json").is_file() and "iteration1/dpo" not in _stages(run_dir)


def _manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def _rows(path):
    return artifacts.content_hash(artifacts.read_dataset(path).to_list())


def _params(path):
    from jaxsr.policy import load_policy

    return jax.tree.map(np.asarray, load_policy(path).params)


@pytest.mark.slow
def test_paper_config_runs_every_stage_resumes_and_reruns(tmp_path, capsys):
    from jaxsr import loop

    full = tmp_path / "full"
    cfg = _config(tmp_path, full)
    rows = loop.run(cfg)
    stages = _manifest(full)["stages"]
    assert sorted(stages) == sorted(STAGES)
    assert all(s["status"] == "done" for s in stages.values())

    res = {k: s.get("result", {}) for k, s in stages.items()}
    judged, eft = res["eft_judge"], res["eft_build"]
    assert judged["judgements"] == judged["responses"] * cfg.eft.judgements_per_response == 11  # the fixture's 11
    assert sum(judged["score_histogram"].values()) == judged["judgements"]  # expected mode: every one parses
    assert eft["prompts"] == judged["prompts"] == 4 and eft["judgement_sets"] == 4
    assert eft["prompts_agreeing"] <= eft["sets_agreeing"] <= eft["judgement_sets"]
    assert sum(eft["scores_before_rebalance"].values()) == eft["judgements_agreeing"]
    assert eft["eft"] > 0
    assert eft["eft"] == sum(eft["scores_after_rebalance"].values()) == len(artifacts.read_dataset(full / "data" / "eft"))

    it = {k.split("/")[1]: v for k, v in res.items() if k.startswith("iteration1/")}
    # The first block (prompts.num_prompts) is what the prompts stage made; the pairs stage grew the prompts,
    # candidates and judgements to the target and the manifest hashed them again.
    assert it["prompts"]["prompts"] == cfg.prompts.num_prompts
    blocks = it["pairs"]["prompt_blocks"]
    assert blocks[0] == cfg.prompts.num_prompts and len(blocks) >= 2
    n_prompts = len(artifacts.read_dataset(full / "iteration1" / "prompts"))
    assert n_prompts == blocks[-1] == it["pairs"]["prompts"]
    n_cands = len(artifacts.read_dataset(full / "iteration1" / "candidates"))
    assert n_cands == n_prompts * cfg.sample.num_samples
    assert len(artifacts.read_dataset(full / "iteration1" / "judgements")) == n_cands  # expected mode: one each
    for name in ("prompts", "candidates", "judgements"):
        assert stages["iteration1/pairs"]["outputs"][name] == loop.path_hash(full / "iteration1" / name)
    n_pairs = len(artifacts.read_dataset(full / "iteration1" / "pairs"))
    assert it["pairs"]["target_met"] and n_pairs == it["pairs"]["pairs"] == 5 + cfg.dpo.selection_prompts
    assert it["pairs"]["usable_pairs"] >= n_pairs
    sel = it["dpo"]["selection"]
    assert sel["prompts"] == cfg.dpo.selection_prompts
    assert sel["train_pairs"] == 5  # the target; the held-out prompts' pairs are gone
    assert [e["step"] for e in sel["log"]] == [1, 2]  # dpo.eval_every=1, max_steps=2 (no loss: no early stop)
    h2h = res["h2h/M2"]
    assert set(h2h) == {"vs_M1", "vs_baseline"}
    assert all(v["n"] == 1 and v["win"] + v["tie"] + v["loss"] == 1 for v in h2h.values())  # oasst's 1 rm_eval tree

    assert [(r["iteration"], r["model"]) for r in rows] == [(0, "baseline"), (1, "M1"), (2, "M2")]
    assert (rows[1]["prompts"], rows[1]["pairs"]) == (n_prompts, n_pairs)
    assert rows[2]["h2h_prev"] and rows[2]["h2h_baseline"]

    capsys.readouterr()
    assert loop.run(cfg) == rows
    assert "already complete" in capsys.readouterr().out

    # Resume: a run stopped after EFT judging, and one SIGKILLed during EFT judging, rerun and SIGKILLed again
    # during checkpoint selection, rerun, end as the uninterrupted one.
    part, killed = tmp_path / "part", tmp_path / "killed"
    with pytest.raises(SystemExit, match="eft_judge"):
        loop.run(_config(tmp_path, part), stop_after="eft_judge")
    loop.run(_config(tmp_path, part))
    assert _killed_when(tmp_path, killed, _during_eft_judging)
    assert "eft_judge" not in _stages(killed)
    assert _killed_when(tmp_path, killed, _during_selection)  # takes over the dead run's lock
    assert "iteration1/dpo" not in _stages(killed)
    loop.run(_config(tmp_path, killed))
    for run in (part, killed):
        assert _rows(run / "data" / "eft") == _rows(full / "data" / "eft")
        for name in ("prompts", "candidates", "judgements", "pairs"):
            assert _rows(run / "iteration1" / name) == _rows(full / "iteration1" / name)
        assert _manifest(run)["stages"]["iteration1/dpo"]["result"] == stages["iteration1/dpo"]["result"]
        for model in ("baseline", "M1", "M2"):
            jax.tree.map(np.testing.assert_array_equal, _params(run / "models" / model), _params(full / "models" / model))
