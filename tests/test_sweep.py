"""`jaxsr sweep`: several seeds and the controls as ordinary resumable runs, aggregated by hand-checkable rules."""

import json
import math

import pytest

from jaxsr import sweep
from jaxsr.cli import main as cli_main
from jaxsr.config import CONFIG_DIR


def test_aggregate_means_sds_and_gains_by_hand():
    rows = {("self", 0): [{"model": "M1", "world_score": 3.0, "judge_pairwise_accuracy": 0.6, "pairs": 10},
                          {"model": "M2", "world_score": 3.5, "judge_pairwise_accuracy": 0.7, "pairs": None}],
            ("self", 1): [{"model": "M1", "world_score": 2.0, "judge_pairwise_accuracy": 0.8, "pairs": 20},
                          {"model": "M2", "world_score": 1.9, "judge_pairwise_accuracy": 0.6, "pairs": None}]}
    out = sweep.aggregate(rows, "world_score")
    m1 = out["models"]["self"]["M1"]
    assert m1["world_score"]["mean"] == 2.5 and math.isclose(m1["world_score"]["sd"], math.sqrt(0.5))
    assert math.isclose(m1["world_score"]["sem"], math.sqrt(0.5) / math.sqrt(2))
    assert m1["per_seed"]["world_score"] == {"0": 3.0, "1": 2.0}
    assert out["models"]["self"]["M2"]["pairs"] == {"mean": None, "sd": None, "sem": None, "n": 0}
    g = out["gain"]["self"]
    assert (g["from"], g["to"]) == ("M1", "M2") and g["positive_seeds"] == 1
    assert math.isclose(g["per_seed"]["0"], 0.5) and math.isclose(g["per_seed"]["1"], -0.1)
    assert math.isclose(g["mean"], 0.2)


@pytest.mark.slow
def test_sweep_runs_seeds_and_a_control_resumably(tmp_path, capsys):
    from test_stages import ARITH

    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(CONFIG_DIR / "arithmetic.yaml"), "--seeds", "0", "1", "--out", str(out), *ARITH]
    assert cli_main(args) == 0
    result = sweep.read(out)
    assert result["variants"] == ["self"] and result["score_key"] == "accuracy"
    assert set(result["models"]["self"]) == {"M1", "M2"}
    for seed in (0, 1):
        report = json.loads((out / "self" / f"seed{seed}" / "report.json").read_text())
        assert result["models"]["self"]["M2"]["per_seed"]["accuracy"][str(seed)] == report[1]["accuracy"]
    assert (out / "sweep.png").is_file() and "| self | M1 |" in (out / "sweep.md").read_text()
    capsys.readouterr()
    assert cli_main(args) == 0  # a finished sweep only reads its runs
    assert capsys.readouterr().out.count("already complete") == 2


def test_sweep_refuses_a_control_the_environment_cannot_grade(tmp_path):
    from jaxsr.config import ConfigValueError
    from test_stages import ARITH

    with pytest.raises(ConfigValueError, match="pairs.control='oracle' needs the ground truth"):
        sweep.run_sweep(str(CONFIG_DIR / "arithmetic.yaml"), ARITH, [0], ["oracle"], tmp_path / "s")
    assert not (tmp_path / "s").exists()  # before any run starts


@pytest.mark.slow
def test_a_control_shares_the_self_runs_first_stages_and_ends_as_a_fresh_run(tmp_path):
    """Also the determinism claim of docs/results.md: two runs of one config on one machine with the same device
    count (here the fresh control and the self run, up to iteration 1's judgements) write byte-identical datasets
    (the manifest's content hashes), bit-identical models and the same report."""
    import numpy as np

    from jaxsr.config import load_config
    from jaxsr.loop import run
    from test_loop import MICRO, _params

    def same(a_dir, b_dir, a, b, key):
        for name, h in b[key]["outputs"].items():
            if name.startswith("M"):  # an Orbax checkpoint's files have random names: compare the parameters
                pa, pb = _params(a_dir / "models" / name), _params(b_dir / "models" / name)
                assert len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb)), (key, name)
            else:
                assert a[key]["outputs"][name] == h, (key, name)

    out = tmp_path / "sweep"
    result = sweep.run_sweep(str(CONFIG_DIR / "tiny.yaml"), MICRO, [1], ["oracle"], out)
    shared = [k for k, _, _ in sweep.shared_stages(load_config(CONFIG_DIR / "tiny.yaml", MICRO))]
    assert shared == ["data", "sft", "eval/M1", "iteration1/prompts", "iteration1/candidates", "iteration1/judgements"]
    fresh_dir = tmp_path / "fresh"
    fresh_rows = run(load_config(CONFIG_DIR / "tiny.yaml", [*MICRO, "pairs.control=oracle", f"run_dir={fresh_dir}"]))
    manifest = lambda d: json.loads((d / "manifest.json").read_text())["stages"]  # noqa: E731
    self_m, shared_m, fresh_m = (manifest(d) for d in (out / "self" / "seed1", out / "oracle" / "seed1", fresh_dir))
    shared_dir, self_dir = out / "oracle" / "seed1", out / "self" / "seed1"
    assert list(shared_m) == list(fresh_m)
    for key in fresh_m:
        same(shared_dir, fresh_dir, shared_m, fresh_m, key)
    for key in shared:
        same(self_dir, fresh_dir, self_m, fresh_m, key)
        assert shared_m[key]["finished"] == self_m[key]["finished"]  # copied, not recomputed
    assert self_m["iteration1/pairs"]["outputs"] != fresh_m["iteration1/pairs"]["outputs"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "samples"} for r in rows]  # noqa: E731
    assert drop(fresh_rows) == [r for r in json.loads((out / "oracle" / "seed1" / "report.json").read_text())]
    assert result["models"]["oracle"]["M2"]["per_seed"]["world_score"]["1"] == fresh_rows[1]["world_score"]
