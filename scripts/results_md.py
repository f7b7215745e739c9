"""Writes docs/results.md from `jaxsr sweep` outputs: no hand-typed numbers.

    python scripts/results_md.py --sweep runs/tiny_sweep [--meta runs/tiny_meta_sweep] [--out docs/results.md]

--sweep: a sweep of the default config (`jaxsr sweep --seeds 0 1 2 3 4 --controls random oracle`).
--meta: optionally, the same sweep with `meta.enabled=true` (Meta-Rewarding), for its effect.
The header names the commit, the machine and the dates of the runs; the goal of the evidence issue is checked
line by line from the numbers. Prints one JSON line with the goal's checks last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsr import sweep  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    return sha or "unknown"


def run_info(run_dir: Path) -> dict:
    """Wall time (sum of stage seconds), first and last stage times, the jaxsr commit the run recorded if any."""
    m = json.loads((run_dir / "manifest.json").read_text())
    stages = m["stages"].values()
    return {"seconds": sum(s.get("seconds", 0.0) for s in stages), "created": m.get("created", ""),
            "commit": m.get("commit"),
            "finished": max((s.get("finished", "") for s in stages), default="")}


def fmt(st: dict, f: str = "{:.2f}") -> str:
    return "–" if st["mean"] is None else f"{f.format(st['mean'])} ± {f.format(st['sd'])} (sem {f.format(st['sem'])})"


def goal_checks(result: dict) -> dict:
    """The evidence issue's goal, from the self variant's numbers."""
    key = result["score_key"]
    models = result["models"]["self"]
    names = [m for m in models if m.startswith("M")]
    means = [models[m][key]["mean"] for m in names]
    gain = result["gain"]["self"]
    first, last = models[names[0]], models[names[-1]]
    checks = {
        "increasing": all(a < b for a, b in zip(means, means[1:])),
        "gain_at_least_0.3": gain["mean"] is not None and gain["mean"] >= 0.3,
        "gain_at_least_3_sem": gain["mean"] is not None and gain["sem"] is not None and gain["sem"] > 0
        and gain["mean"] >= 3 * gain["sem"],
        "gain_on_every_seed": gain["n"] > 0 and gain["positive_seeds"] == gain["n"],
        "judge_last_at_least_first": (last["judge_pairwise_accuracy"]["mean"] or 0)
        >= (first["judge_pairwise_accuracy"]["mean"] or 0),
    }
    tb = [models[m]["truly_better"]["mean"] for m in names if models[m]["truly_better"]["mean"] is not None]
    tw = [models[m]["truly_worse"]["mean"] for m in names if models[m]["truly_worse"]["mean"] is not None]
    checks["pairs_truly_better_above_worse"] = bool(tb) and all(b > w for b, w in zip(tb, tw))
    return checks


def table(result: dict, variants) -> list[str]:
    key = result["score_key"]
    head = ["variant", "model", key, "judge pairwise acc", "chosen truly better", "chosen truly worse", "pairs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        for model, e in result["models"][v].items():
            lines.append("| " + " | ".join([v, model, fmt(e[key]), fmt(e["judge_pairwise_accuracy"], "{:.3f}"),
                                            fmt(e["truly_better"], "{:.3f}"), fmt(e["truly_worse"], "{:.3f}"),
                                            fmt(e["pairs"], "{:.0f}")]) + " |")
    return lines


def per_seed(result: dict, variants) -> list[str]:
    key = result["score_key"]
    seeds = [str(s) for s in result["seeds"]]
    models = list(result["models"][variants[0]])
    head = ["variant", "seed", *models, f"{models[-1]} − {models[0]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        g = result["gain"][v]["per_seed"]
        for s in seeds:
            vals = [result["models"][v][m]["per_seed"][key].get(s) for m in models]
            cells = [f"{x:.3f}" if x is not None else "–" for x in vals]
            lines.append("| " + " | ".join([v, s, *cells, f"{g[s]:+.3f}" if s in g else "–"]) + " |")
    return lines


def gains(result: dict, variants) -> list[str]:
    out = []
    for v in variants:
        g = result["gain"][v]
        if g["mean"] is None:
            continue
        out.append(f"- **{v}**: {g['to']} − {g['from']} = {g['mean']:+.3f} ± {g['sd']:.3f} (sem {g['sem']:.3f}), "
                   f"positive on {g['positive_seeds']} of {g['n']} seeds")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, type=Path)
    ap.add_argument("--meta", type=Path)
    ap.add_argument("--runs-commit", help="the jaxsr commit the runs were made at, for runs whose manifests do not "
                    "record it (made before jaxsr recorded it)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results.md")
    args = ap.parse_args(argv)

    result = sweep.read(args.sweep)
    variants = result["variants"]
    infos = {(v, s): run_info(sweep.run_dir(args.sweep, v, s)) for v in variants for s in result["seeds"]}
    dates = sorted(x for i in infos.values() for x in (i["created"], i["finished"]) if x)
    made_at = sorted({i["commit"] for i in infos.values() if i["commit"]}) or (
        [args.runs_commit] if args.runs_commit else ["unknown"])
    checks = goal_checks(result)
    met = all(checks.values())
    cmd = "jaxsr sweep --seeds " + " ".join(map(str, result["seeds"]))
    if len(variants) > 1:
        cmd += " --controls " + " ".join(variants[1:])
    cmd += " " + " ".join(result["overrides"]) if result["overrides"] else ""
    self_min = [infos[("self", s)]["seconds"] / 60 for s in result["seeds"]]
    lines = [
        "# Results on the built-in world",
        "",
        f"Generated by `python scripts/results_md.py --sweep {args.sweep}"
        + (f" --meta {args.meta}" if args.meta else "") + (f" --runs-commit {args.runs_commit}" if args.runs_commit else "")
        + f"` at commit {commit()} on {machine()}, from runs made "
        f"at commit {', '.join(made_at)} on that machine, {dates[0] if dates else '?'} to "
        f"{dates[-1] if dates else '?'} (UTC). Every number below is read from the sweep's run directories; nothing "
        f"here is typed by hand.",
        "",
        f"The sweep: `{cmd}` with the default config (configs/tiny.yaml: `jaxsr run` without arguments). World "
        "score: mean ground-truth score (0-5) of M_t's greedy answers to the 200 held-out instructions; judge "
        "pairwise accuracy: agreement of M_t's judge with the grader's ranking of 4 candidates on 100 held-out "
        "instructions (chance 0.5); chosen truly better / worse: share of the iteration's training pairs whose "
        "chosen answer the grader scores above / below the rejected one (the rest are true ties). Controls on the "
        "same candidates: `random` orients each self-judged pair by a seeded coin, `oracle` pairs best vs worst by "
        "the grader (the upper bound). Mean ± sample sd over seeds, with the standard error of the mean.",
        "",
        f"Wall time of one default run (`self`, sum of its stages, the machine possibly shared): "
        f"{min(self_min):.1f}-{max(self_min):.1f} min.",
        "",
        "## The goal",
        "",
        f"**{'Met' if met else 'Not met'}.**",
        "",
    ]
    names = {"increasing": "seed-mean world score M1 < M2 < M3",
             "gain_at_least_0.3": "M3 − M1 ≥ 0.3 world points (seed mean)",
             "gain_at_least_3_sem": "M3 − M1 ≥ 3 standard errors of the mean",
             "gain_on_every_seed": "M3 above M1 on every seed",
             "judge_last_at_least_first": "seed-mean judge pairwise accuracy M3 ≥ M1",
             "pairs_truly_better_above_worse": "chosen truly better above truly worse, every iteration"}
    lines += [f"- {'yes' if ok else '**no**'}: {names[k]}" for k, ok in checks.items()]
    lines += ["", "## Seed means", ""] + table(result, variants)
    lines += ["", "Gain, last model minus first:", ""] + gains(result, variants)
    lines += ["", "## Per seed (world score)", ""] + per_seed(result, variants)
    if args.meta:
        meta = sweep.read(args.meta)
        lines += ["", "## Meta-Rewarding", "",
                  f"`jaxsr sweep --seeds {' '.join(map(str, meta['seeds']))} {' '.join(meta['overrides'])}` "
                  f"({args.meta}): the model also meta-judges pairs of its own judgements, and DPO trains on the "
                  "judge-preference pairs with the actor pairs. Each run's iteration{t}/judge_pairs/stats.json has the "
                  "meta-judge's verdicts and the judge pairs it made.", ""]
        lines += table(meta, ["self"]) + [""] + gains(meta, ["self"])
    lines += ["", "## Determinism", "",
              "Two runs of one config at one commit, on one machine with the same number of devices, write the same "
              "datasets byte for byte and the same models bit for bit, so `jaxsr run seed=S` prints the row of seed "
              "S above (tests/test_sweep.py::test_a_control_shares_the_self_runs_first_stages_and_ends_as_a_fresh_run "
              "checks it on a micro config). Another device count changes how rows are batched and sharded, another "
              "machine or jax/XLA version may change floating-point reductions: the numbers may then differ slightly.",
              ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    print(json.dumps({"goal_met": met, **checks, "gain": result["gain"]["self"]["mean"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
