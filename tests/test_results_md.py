"""scripts/results_md.py: docs/results.md from a sweep's outputs, the goal checked from the numbers."""

import importlib.util
import json
from pathlib import Path

from jaxsr import artifacts, sweep

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_md.py"


def _module():
    spec = importlib.util.spec_from_file_location("results_md", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep(tmp_path, scores):
    """A sweep directory as `jaxsr sweep` leaves it, with the given per-seed world scores of M1, M2, M3."""
    rows = {}
    for v, by_seed in scores.items():
        for s, (m1, m2, m3) in by_seed.items():
            rows[(v, s)] = [{"model": m, "world_score": x, "judge_pairwise_accuracy": 0.8 + 0.01 * i,
                             "truly_better": 0.3 if i < 2 else None, "truly_worse": 0.1 if i < 2 else None,
                             "pairs": 900 if i < 2 else None}
                            for i, (m, x) in enumerate((("M1", m1), ("M2", m2), ("M3", m3)))]
            d = sweep.run_dir(tmp_path, v, s)
            d.mkdir(parents=True)
            (d / "manifest.json").write_text(json.dumps({"created": "2026-12-01T03:00:00", "stages": {
                "sft": {"seconds": 120.0, "finished": "2026-12-01T03:02:00"},
                "report": {"seconds": 60.0, "finished": "2026-12-01T03:03:00"}}}))
    result = sweep.aggregate(rows, "world_score") | {"config": None, "overrides": [], "seeds": sorted(
        {s for _, s in rows}), "variants": list(scores), "score_key": "world_score"}
    artifacts.write_json_atomic(tmp_path / "sweep.json", result)
    return tmp_path


def test_a_clear_gain_meets_the_goal(tmp_path, capsys):
    d = _sweep(tmp_path / "s", {"self": {0: (3.0, 3.2, 3.5), 1: (3.1, 3.3, 3.5), 2: (2.9, 3.2, 3.3)},
                                "oracle": {0: (3.0, 3.5, 3.9), 1: (3.1, 3.6, 4.0), 2: (2.9, 3.4, 3.8)}})
    out = tmp_path / "results.md"
    assert _module().main(["--sweep", str(d), "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["goal_met"] is True and abs(line["gain"] - 0.4333) < 1e-3
    text = out.read_text()
    assert "**Met.**" in text and "at commit " in text and "2026-12-01T03:00:00 to 2026-12-01T03:03:00" in text
    assert "| self | 1 | 3.100 | 3.300 | 3.500 | +0.400 |" in text
    assert "| oracle | M3 | 3.90 ± 0.10 (sem 0.06) |" in text
    assert "3.0-3.0 min" in text


def test_a_seed_that_falls_fails_the_goal_and_says_which_check(tmp_path, capsys):
    d = _sweep(tmp_path / "s", {"self": {0: (3.0, 3.5, 3.9), 1: (3.1, 3.0, 3.0), 2: (2.9, 3.4, 3.8)}})
    out = tmp_path / "results.md"
    _module().main(["--sweep", str(d), "--out", str(out)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["goal_met"] is False and line["gain_on_every_seed"] is False and line["gain_at_least_0.3"] is True
    text = out.read_text()
    assert "**Not met.**" in text and "- **no**: M3 above M1 on every seed" in text


def test_the_runs_commit_comes_from_their_manifests(tmp_path, capsys):
    d = _sweep(tmp_path / "s", {"self": {0: (3.0, 3.2, 3.5), 1: (3.1, 3.3, 3.5)}})
    for s in (0, 1):
        m = sweep.run_dir(d, "self", s) / "manifest.json"
        m.write_text(json.dumps(json.loads(m.read_text()) | {"commit": "abc1234"}))
    out = tmp_path / "results.md"
    _module().main(["--sweep", str(d), "--out", str(out), "--runs-commit", "ignored"])
    assert "from runs made at commit abc1234 on that machine" in out.read_text()


def test_a_run_records_the_source_commit():
    from jaxsr.loop import source_commit

    commit = source_commit()
    assert commit is None or len(commit.split("+")[0]) >= 7
