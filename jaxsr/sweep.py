"""`jaxsr sweep`: one config over several seeds (and the pair controls), resumable, with one aggregate report.

Each (variant, seed) is an ordinary run directory, `<out>/<variant>/seed<k>`, run by `jaxsr.loop.run`: a finished
one is read, an interrupted one resumes, so rerunning the same sweep after a kill loses at most one stage's work.
A control changes `pairs.control` alone, so its run starts from a copy of the self run's stages before the first
pairs stage (seed data, SFT, M1's evaluation, iteration 1's prompts, candidates and judgements: `shared_stages`),
which it would compute byte for byte the same (tests/test_sweep.py checks a shared run against a fresh one).
Variants: "self" (the config as given) and the controls `pairs.control` names ("random", "oracle"; the world).
The aggregate (`<out>/sweep.json`, `sweep.md`, `sweep.png`) has, per variant and model, the mean, sample standard
deviation and standard error over seeds of the environment's first report column, the judge's pairwise accuracy
and the pairs' true quality, and the per-seed values.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from . import artifacts

METRICS = ("judge_pairwise_accuracy", "truly_better", "truly_worse", "pairs")


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / variant / f"seed{seed}"


def variant_overrides(variant: str) -> list[str]:
    return [] if variant == "self" else [f"pairs.control={variant}"]


def run_sweep(config: str | None, overrides: Sequence[str], seeds: Sequence[int], controls: Sequence[str],
              out: Path) -> dict:
    """Runs (or resumes, or reads) every (variant, seed) and writes the aggregate; returns it."""
    from .config import load_config
    from .loop import run

    if not seeds:
        raise ValueError("jaxsr sweep: no seeds given (--seeds 0 1 2 ...)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"jaxsr sweep: --seeds {list(seeds)} repeats a seed")
    variants = ["self", *controls]
    cfgs = {(v, s): load_config(config, [*overrides, *variant_overrides(v), f"seed={s}",
                                         f"run_dir={run_dir(out, v, s)}"])
            for v in variants for s in seeds}
    for cfg in cfgs.values():
        cfg.check_run()  # every config's mistakes before the first run starts
    rows = {}
    for (v, s), cfg in cfgs.items():
        if v != "self":
            copy_shared_stages(cfgs[("self", s)], cfg)
        rows[(v, s)] = [{k: x for k, x in r.items() if k != "samples"} for r in run(cfg)]
    from .envs import environment_class

    env = environment_class(next(iter(cfgs.values())).data.source)
    score_key = env.report_columns[0][0] if env.report_columns else None
    result = aggregate(rows, score_key)
    result |= {"config": config, "overrides": list(overrides), "seeds": list(seeds), "variants": variants,
               "score_key": score_key}
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(out / "sweep.json", result)
    (out / "sweep.md").write_text(markdown(result))
    plot(result, out / "sweep.png", env.report_axes)
    return result


def shared_stages(cfg) -> list[tuple[str, int, object]]:
    """(manifest key, iteration, stage) of the stages before the first pairs stage: what a control computes as the
    self run of its seed does."""
    from .pipeline import GRAPH

    out = []
    for phase, t, stage in GRAPH.schedule(cfg.loop.iterations, cfg):
        if stage.section == "pairs":
            break
        out.append((stage.key(phase, t), t, stage))
    return out


def copy_shared_stages(src_cfg, dst_cfg) -> list[str]:
    """Starts the control run `dst_cfg` from copies of the shared stages its seed's self run `src_cfg` has done
    (none when the control's run directory exists already, or the configs differ in more than pairs.control);
    returns the stage keys copied."""
    import shutil

    from .config import to_dict
    from .loop import MANIFEST, Manifest, _flatten
    from .stages import RunPaths

    src, dst = Path(src_cfg.run_dir), Path(dst_cfg.run_dir)
    a, b = _flatten(to_dict(src_cfg)), _flatten(to_dict(dst_cfg))
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - {"run_dir", "pairs.control"}
    if differ or dst.exists() or not (src / MANIFEST).is_file():
        return []
    done = json.loads((src / MANIFEST).read_text())["stages"]
    src_paths, dst_paths = RunPaths(src), RunPaths(dst)
    copied = {}
    for key, t, stage in shared_stages(src_cfg):
        if done.get(key, {}).get("status") != "done":
            break
        for name in stage.writes:
            frm, to = src_paths.artifact(name, t)[1], dst_paths.artifact(name, t)[1]
            to.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if frm.is_dir() else shutil.copy2)(frm, to)
        copied[key] = done[key]
    if copied:
        manifest = Manifest(dst, dst_cfg)
        manifest.data["stages"].update(copied)
        manifest.save()
    return list(copied)


def _stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "sem": None, "n": 0}
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "sem": sd / math.sqrt(len(vals)), "n": len(vals)}


def aggregate(rows: dict[tuple[str, int], list[dict]], score_key: str | None) -> dict:
    """{"models": {variant: {model: {metric: stats, "per_seed": {seed: value}}}}, "gain": {variant: stats of
    last - first model's score per seed, with the seeds it was positive on}}."""
    keys = ([score_key] if score_key else []) + list(METRICS)
    models: dict[str, dict] = {}
    for (variant, seed), runs in sorted(rows.items()):
        for r in runs:
            entry = models.setdefault(variant, {}).setdefault(r["model"], {"per_seed": {k: {} for k in keys}})
            for k in keys:
                entry["per_seed"][k][str(seed)] = r.get(k)
    for variant in models.values():
        for entry in variant.values():
            for k in keys:
                entry[k] = _stats(list(entry["per_seed"][k].values()))
    gain = {}
    if score_key:
        for variant, by_model in models.items():
            names = [m for m in by_model if m.startswith("M")]
            first, last = names[0], names[-1]
            per_seed = {s: (by_model[last]["per_seed"][score_key][s] - v)
                        for s, v in by_model[first]["per_seed"][score_key].items()
                        if v is not None and by_model[last]["per_seed"][score_key].get(s) is not None}
            gain[variant] = _stats(list(per_seed.values())) | {
                "from": first, "to": last, "per_seed": per_seed, "positive_seeds": sum(d > 0 for d in per_seed.values())}
    return {"models": models, "gain": gain}


def _fmt(st: dict, fmt: str) -> str:
    if st["mean"] is None:
        return "–"
    return f"{fmt.format(st['mean'])} ± {fmt.format(st['sd'])}"


def markdown(result: dict) -> str:
    key = result["score_key"]
    lines = [f"# jaxsr sweep: {result['config'] or 'default config'} {' '.join(result['overrides'])}".rstrip(), "",
             f"Seeds {result['seeds']}; mean ± sample sd over seeds.", ""]
    head = ["variant", "model"] + ([key] if key else []) + ["judge pairwise acc", "chosen truly better",
                                                             "chosen truly worse", "pairs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, by_model in result["models"].items():
        for model, e in by_model.items():
            cells = [variant, model] + ([_fmt(e[key], "{:.2f}")] if key else [])
            cells += [_fmt(e["judge_pairwise_accuracy"], "{:.3f}"), _fmt(e["truly_better"], "{:.3f}"),
                      _fmt(e["truly_worse"], "{:.3f}"), _fmt(e["pairs"], "{:.0f}")]
            lines.append("| " + " | ".join(cells) + " |")
    if key:
        lines += ["", f"Gain in {key}, last model minus first, per seed:", ""]
        for variant, g in result["gain"].items():
            per = ", ".join(f"seed {s}: {d:+.3f}" for s, d in g["per_seed"].items())
            lines.append(f"- {variant}: {g['to']} − {g['from']} = {g['mean']:+.3f} ± {g['sd']:.3f} (sem {g['sem']:.3f}; "
                         f"positive on {g['positive_seeds']} of {g['n']} seeds) — {per}")
        lines += ["", f"Per seed ({key}):", ""]
        for variant, by_model in result["models"].items():
            for model, e in by_model.items():
                vals = ", ".join(f"{s}: {v:.2f}" if v is not None else f"{s}: –" for s, v in e["per_seed"][key].items())
                lines.append(f"- {variant} {model}: {vals}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, env_axes: dict | None = None) -> None:
    """Mean ± sd per model for each variant, on fixed axes (jaxsr.report.axis_range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import axis_range

    key = result["score_key"]
    panels = ([key] if key else []) + ["judge_pairwise_accuracy"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        values = []
        for i, (variant, by_model) in enumerate(result["models"].items()):
            pts = [(m, e[metric]) for m, e in by_model.items() if e[metric]["mean"] is not None]
            if not pts:
                continue
            xs = [j + 0.08 * i for j in range(len(pts))]
            ax.errorbar(xs, [p[1]["mean"] for p in pts], yerr=[p[1]["sd"] for p in pts], marker="o", capsize=3,
                        label=variant)
            ax.set_xticks(range(len(pts)), [p[0] for p in pts])
            values += [p[1]["mean"] + s * p[1]["sd"] for p in pts for s in (-1, 1)]
        if values:
            ax.set_ylim(*axis_range(metric, values, env_axes))
        ax.set_title(f"{metric} (mean ± sd, {len(result['seeds'])} seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read(out: Path) -> dict:
    return json.loads((Path(out) / "sweep.json").read_text())
