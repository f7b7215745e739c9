"""The stage graph: the example environment runs the whole loop at micro scale; a stage inserted into the graph
changes no other stage's output; a run directory in use is refused and a stale lock is taken over."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxsr import envs, loop
from jaxsr.cli import main as cli_main
from jaxsr.config import CONFIG_DIR, load_config
from jaxsr.pipeline import GRAPH
from jaxsr.runlock import LOCK_NAME, RunLock
from jaxsr.stages import Stage

# configs/arithmetic.yaml at the smallest scale that still runs every stage (8 fake devices: batches of 8).
ARITH = [
    "data.options.train=48", "data.options.held_out=8", "model.architecture.hidden_size=32", "model.architecture.intermediate_size=64", "model.architecture.num_layers=1",
    "model.architecture.num_heads=2", "model.architecture.num_kv_heads=1", "model.architecture.head_dim=16",
    "model.architecture.max_position_embeddings=128", "loop.iterations=2", "loop.eval_max_new_tokens=4",
    "sft.max_steps=4", "sft.batch_size=8", "sft.max_length=96", "sft.checkpoint_every=4",
    "prompts.num_prompts=8", "prompts.requests_per_round=8", "prompts.max_rounds=2",
    "sample.num_samples=2",
    "dpo.max_steps=2", "dpo.batch_size=8", "dpo.max_length=96", "dpo.checkpoint_every=2",
]


def _cfg(run_dir, *extra):
    return load_config(CONFIG_DIR / "arithmetic.yaml", [f"run_dir={run_dir}", *ARITH, *extra])


def _outputs(run_dir) -> dict:
    """Each stage's output hashes; a model checkpoint's files hold run-specific metadata, so models are compared by
    their parameters instead."""
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {key: {k: v for k, v in s["outputs"].items() if not k.startswith("M")} for key, s in stages.items()}


def _params(model_dir):
    import jax
    import numpy as np

    from jaxsr import load_policy

    return [np.asarray(x) for x in jax.tree.leaves(load_policy(model_dir).params)]


def test_example_environment_runs_the_loop_and_an_inserted_stage_changes_nothing_else(tmp_path):
    rows = loop.run(_cfg(tmp_path / "plain"))
    assert [r["model"] for r in rows] == ["M1", "M2"]
    assert all(r["accuracy"] is not None for r in rows)  # the environment's own report column, from its grader
    assert rows[0]["pairs"] is not None and rows[0]["judge_pairwise_accuracy"] is not None
    report = (tmp_path / "plain" / "report.md").read_text()
    assert "| model | accuracy | judge pairwise acc |" in report
    assert loop.run(_cfg(tmp_path / "plain")) == rows  # a finished run returns the same rows again

    seen = []

    def noop(ctx):
        seen.append((ctx.t, ctx.path("candidates").is_dir()))
        return {"noop": True}

    graph = GRAPH.insert("iteration", Stage("noop", noop, reads=("candidates",)), after="candidates")
    loop.run(_cfg(tmp_path / "noop"), graph=graph)
    assert seen == [(1, True)]
    plain, with_noop = _outputs(tmp_path / "plain"), _outputs(tmp_path / "noop")
    assert with_noop.pop("iteration1/noop") == {}
    assert with_noop == plain  # every other stage wrote the same rows
    for t in (1, 2):
        for a, b in zip(_params(tmp_path / "plain" / "models" / f"M{t}"), _params(tmp_path / "noop" / "models" / f"M{t}")):
            np.testing.assert_array_equal(a, b)


def test_a_second_run_on_a_directory_in_use_is_refused_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        before = sorted(p.name for p in run_dir.iterdir())
        code = cli_main(["run", "--config", str(CONFIG_DIR / "arithmetic.yaml"), f"run_dir={run_dir}", *ARITH])
        err = capsys.readouterr().err
        assert sorted(p.name for p in run_dir.iterdir()) == before
    assert code == 2
    assert f"jaxsr run: error: {run_dir} is in use" in err or str(run_dir) in err
    assert "pid" in err and "Traceback" not in err


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A process that takes the lock and dies without releasing it (as a killed pod job would).
    code = ("import sys, os, importlib.util as u; s = u.spec_from_file_location('runlock', sys.argv[1]);"
            "m = sys.modules['runlock'] = u.module_from_spec(s); s.loader.exec_module(m);"
            "m.RunLock(sys.argv[2]).acquire(); os._exit(0)")
    import jaxsr.runlock as rl

    subprocess.run([sys.executable, "-c", code, rl.__file__, str(run_dir)], check=True, timeout=60)
    assert (run_dir / LOCK_NAME).is_file()
    with caplog.at_level("WARNING"), pytest.raises(SystemExit, match="stopped after stage data"):
        loop.run(_cfg(run_dir), stop_after="data")
    assert "taking over" in caplog.text.lower() or "dead" in caplog.text.lower()
    assert not (run_dir / LOCK_NAME).exists()  # released on the way out
    assert (run_dir / "data" / "ift").is_dir()


def test_every_environment_is_registered_with_its_options():
    assert {"world", "oasst", "files", "arithmetic"} <= set(envs.names())
    assert envs.get("world", {"ift": 5}).options.ift == 5
    with pytest.raises(ValueError, match=r"unknown key 'data.options.ift_size'; did you mean 'data.options.ift'\?"):
        load_config(CONFIG_DIR / "tiny.yaml", ["data.options.ift_size=3"])
    with pytest.raises(ValueError, match=r"data.source='nope' is not an environment; choose one of \['arithmetic'"):
        load_config(CONFIG_DIR / "tiny.yaml", ["data.source=nope"])


def test_stage_seeds_depend_on_run_seed_iteration_and_name_only():
    from jaxsr.stages import stage_seed

    seeds = {stage_seed(s, t, name) for s in (0, 1) for t in (1, 2) for name in ("prompts", "candidates", "eval", "new")}
    assert len(seeds) == 16 and all(0 <= x < 2**30 for x in seeds)
    # The same in another interpreter with another string-hash seed: nothing depends on Python's hash().
    code = "from jaxsr.stages import stage_seed; print(stage_seed(3, 2, 'judgements'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert int(other) == stage_seed(3, 2, "judgements")


@pytest.mark.slow
def test_dpo_checkpoint_selection_runs_in_the_loop_and_its_log_reaches_the_manifest(tmp_path):
    run_dir = tmp_path / "sel"
    # The pairwise template alone is ~255 tokens: the judge (M1) needs a longer context than ARITH's 128.
    loop.run(_cfg(run_dir, "dpo.eval_every=1", "dpo.selection_prompts=2", "prompts.num_prompts=12",
                  "model.architecture.max_position_embeddings=320"))
    stats = json.loads((run_dir / "manifest.json").read_text())["stages"]["iteration1/dpo"]["result"]["selection"]
    log = json.loads((run_dir / "train" / "dpo1" / "selection.json").read_text())
    assert len(log["prompts"]) == stats["prompts"] == 2
    assert [e["step"] for e in stats["log"]] == [e["step"] for e in log["entries"][1:]]
    assert stats["log"][0]["step"] == 1 and stats["log"][0]["against"] == 0
    selected = stats["selected_step"]
    rows = json.loads((run_dir / "report.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r.get("dpo_selected_step") for r in rows] == [None, selected]
    want = run_dir / "models" / "M1" if selected == 0 else run_dir / "train" / "dpo1" / "selected" / f"step{selected}"
    if selected:  # promoted (moved) into models/M2: compare with the step checkpoint's params instead
        assert not want.exists()
    else:
        for a, b in zip(_params(run_dir / "models" / "M2"), _params(want)):
            np.testing.assert_array_equal(a, b)
