"""`jaxsr run` end to end on a micro config: completes, is idempotent, refuses a changed config, and a run killed
(SIGKILL) at several points and rerun ends with the same pairs, models and report as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxsr import artifacts

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "seed=1", "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
    "model.architecture.num_layers=2", "model.architecture.num_heads=2", "model.architecture.num_kv_heads=1",
    "model.architecture.head_dim=32", "data.options.ift=96", "data.options.eft=96", "data.options.eval=12",
    "data.options.rm_eval=6", "loop.iterations=2", "loop.eval_max_new_tokens=16", "sft.max_steps=24",
    "sft.checkpoint_every=6", "sft.batch_size=16", "prompts.num_prompts=20", "prompts.requests_per_round=16",
    "prompts.max_new_tokens=24", "prompts.max_rounds=4", "sample.num_samples=2", "sample.max_new_tokens=16",
    "judge.mode=expected", "judge.max_new_tokens=16", "dpo.max_steps=8", "dpo.checkpoint_every=2", "dpo.batch_size=8",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cmd(run_dir):
    return [sys.executable, "-m", "jaxsr.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"run_dir={run_dir}", *MICRO]


def _run(run_dir, timeout=900):
    out = subprocess.run(_cmd(run_dir), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _stages_done(run_dir) -> set:
    m = Path(run_dir) / "manifest.json"
    if not m.is_file():
        return set()
    try:
        return {k for k, v in json.loads(m.read_text())["stages"].items() if v["status"] == "done"}
    except json.JSONDecodeError:
        return set()


def _kill_when(run_dir, condition, timeout=600, *, cmd=None, env=None):
    """Starts the run (`cmd`, default the micro tiny.yaml run), SIGKILLs it as soon as `condition(run_dir)` holds;
    returns whether it was killed."""
    proc = subprocess.Popen(cmd or _cmd(run_dir), env=env or _env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if condition(Path(run_dir)):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


def _params(model_dir):
    import jaxsr

    policy = jaxsr.load_policy(model_dir)
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(policy.params)]


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    ref = tmp_path / "ref"
    log = _run(ref)
    # Output to a file (not a terminal): one line per stage start and end, no progress-bar redraws.
    for key in ("data", "sft", "eval/M1", "iteration1/prompts", "iteration1/candidates", "iteration1/judgements",
                "iteration1/pairs", "iteration1/dpo", "eval/M2", "report"):
        assert log.count(f"stage {key}: start") == 1 and log.count(f"stage {key}: done in ") == 1, key
    assert "stage iteration1/candidates: done in" in log and "(candidates 40 rows)" in log
    assert "\r" not in log
    assert (ref / "report.md").is_file() and (ref / "report.png").is_file()
    report = json.loads((ref / "report.json").read_text())
    assert [r["iteration"] for r in report] == [1, 2]
    for key in ("world_score", "world_perfect", "judge_pairwise_accuracy", "pairs", "tie_rate", "parse_failure_rate"):
        assert key in report[0]
    assert "nothing to do" in _run(ref)

    run = tmp_path / "killed"
    kill_points = [
        ("during SFT", lambda d: any((d / "train" / "sft" / "steps").glob("[0-9]*"))),
        ("during candidates", lambda d: any((d / "iteration1" / "candidates").glob("shard-*"))),
        ("after judgements", lambda d: "iteration1/judgements" in _stages_done(d)),
        ("during DPO", lambda d: any((d / "train" / "dpo1" / "steps").glob("[0-9]*"))),
        ("during eval of M2", lambda d: "iteration1/dpo" in _stages_done(d)),
    ]
    killed = [name for name, cond in kill_points if _kill_when(run, cond)]
    assert len(killed) >= 3, killed  # a fast machine may finish a stage between polls; most points must hit
    _run(run)

    for stage in ("prompts", "candidates", "judgements", "pairs"):
        a = artifacts.read_dataset(ref / "iteration1" / stage)
        b = artifacts.read_dataset(run / "iteration1" / stage)
        assert artifacts.content_hash(a) == artifacts.content_hash(b), stage
    for t in (1, 2):
        for x, y in zip(_params(ref / "models" / f"M{t}"), _params(run / "models" / f"M{t}")):
            np.testing.assert_array_equal(x, y)
    assert json.loads((run / "report.json").read_text()) == report


def test_changed_config_is_refused(tmp_path):
    from jaxsr.config import load_config
    from jaxsr.loop import ConfigMismatch, Manifest

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}"])
    Manifest(tmp_path, cfg)
    Manifest(tmp_path, cfg)  # same config: fine
    other = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}", "dpo.beta=0.2", "sample.num_samples=2"])
    with pytest.raises(ConfigMismatch, match=r"2 keys differ: dpo.beta: 0.1 -> 0.2, sample.num_samples: 4 -> 2"):
        Manifest(tmp_path, other)
    # A key jaxsr added since the run started is no difference at its default value, and one otherwise.
    saved = json.loads((tmp_path / "manifest.json").read_text())
    del saved["config"]["judge"]["exclude_truncated"]
    (tmp_path / "manifest.json").write_text(json.dumps(saved))
    Manifest(tmp_path, cfg)
    changed = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}", "judge.exclude_truncated=true"])
    with pytest.raises(ConfigMismatch, match=r"judge.exclude_truncated: '<unset>' -> True"):
        Manifest(tmp_path, changed)
