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
